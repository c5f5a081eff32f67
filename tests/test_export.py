"""`mimkit export`: the state dict loads into timm's VisionTransformer of the same shape and gives the same
features as the mimkit encoder."""
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from mimkit.cli import main
from mimkit.engine import save_checkpoint
from mimkit.methods import build_method
from mimkit.probes.export import export_state_dict, timm_kwargs, timm_recipe, to_timm
from mimkit.encoders import load_encoder
from mimkit.probes.features import encode
from mimkit.vit import ViT


@pytest.mark.parametrize("layer_scale", [0.0, 0.1])
def test_timm_model_gives_identical_features(layer_scale):
    torch.manual_seed(0)
    enc = ViT(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3, layer_scale=layer_scale).eval()
    with torch.no_grad():  # make every parameter non-trivial (init leaves biases and LayerScale constant)
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = to_timm(enc)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ours, theirs = enc(x), model.forward_features(x)
        assert torch.allclose(ours, theirs, atol=1e-6), (ours - theirs).abs().max()
        cls = model.forward_head(theirs, pre_logits=True)  # timm's token pooling = our CLS feature
        assert torch.allclose(cls, encode(enc, x, "cls"), atol=1e-6)
    assert set(export_state_dict(enc)) == set(model.state_dict())
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(48))  # MAE's sin-cos with a zero CLS slot


def test_export_cli_writes_a_state_dict_timm_loads(cfg_factory, tmp_path, capsys):
    # a ViT-Tiny-shaped encoder: the printed recipe uses timm.create_model('vit_tiny_patch16_224', ...)
    cfg = cfg_factory("model.arch=vit_tiny", "model.depth=0", "model.embed_dim=0", "model.num_heads=0",
                      "model.patch_size=8")
    model = build_method(cfg)
    ckpt = tmp_path / "pretrain.pt"
    save_checkpoint(ckpt, model, torch.optim.SGD(model.parameters(), lr=0.1), 0, 0, cfg, [])
    out = tmp_path / "vit.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=8, num_classes=0)" in printed
    enc = load_encoder(ckpt)[0].eval()
    scope = {"timm": timm, "torch": torch}
    exec(timm_recipe(enc, str(out)), scope)  # the printed recipe works as written
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(scope["model"].eval().forward_features(x), enc(x), atol=1e-6)
    sd = torch.load(out, weights_only=True)
    generic = VisionTransformer(**timm_kwargs(enc))
    generic.load_state_dict(sd)  # strict: no missing or extra keys
    assert "mask_token" not in sd


def test_export_bad_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(bad) in err
    assert not (tmp_path / "x.pt").exists()
