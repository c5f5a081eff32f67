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


def exported_run(cfg_factory, tmp_path):
    """A saved MAE checkpoint of a ViT-Tiny-wide encoder (depth 2) with every weight non-trivial."""
    cfg = cfg_factory("model.arch=vit_tiny", "model.depth=2", "model.embed_dim=0", "model.num_heads=0",
                      "model.patch_size=4", "data.img_size=16",
                      "decoder.depth=1")
    torch.manual_seed(0)
    model = build_method(cfg)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = tmp_path / "pretrain.pt"
    save_checkpoint(ckpt, model, torch.optim.SGD(model.parameters(), lr=0.1), 0, 0, cfg, [])
    return ckpt, load_encoder(ckpt)[0].eval()


def test_each_format_round_trips_to_identical_features(cfg_factory, tmp_path, capsys):
    import json

    from mimkit.data import dataset_stats
    from mimkit.teachers import load_teacher
    ckpt, enc = exported_run(cfg_factory, tmp_path)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = enc(x)
    models = {}
    assert main(["export", "--format", "timm", str(ckpt), str(tmp_path / "vit.pt")]) == 0
    models["timm"] = VisionTransformer(**timm_kwargs(enc))
    models["timm"].load_state_dict(torch.load(tmp_path / "vit.pt", weights_only=True))
    assert main(["export", "--format", "safetensors", str(ckpt), str(tmp_path / "vit.safetensors")]) == 0
    line = capsys.readouterr().out.splitlines()[-1]  # the printed timm call, run as written
    models["safetensors (printed call)"] = eval(line, {"timm": timm})
    models["safetensors (timm: spec)"] = load_teacher("timm:vit_tiny_patch16_224", str(tmp_path / "vit.safetensors")).model
    hf = tmp_path / "hf"
    assert main(["export", "--format", "hf", str(ckpt), str(hf)]) == 0
    config = json.loads((hf / "config.json").read_text())
    mean, std = dataset_stats("synthetic")
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["model_args"]["patch_size"] == 4 and config["model_args"]["img_size"] in (16, [16, 16])
    assert config["pretrained_cfg"]["mean"] == list(mean) and config["pretrained_cfg"]["std"] == list(std)
    models["hf (local-dir)"] = timm.create_model(f"local-dir:{hf}", pretrained=True)
    models["hf (pretrained_cfg_overlay)"] = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(hf / "model.safetensors")),
        **config["model_args"])
    for name, model in models.items():
        with torch.no_grad():
            assert torch.allclose(model.eval().forward_features(x), ref, atol=1e-5), name
    teacher = load_teacher("timm:vit_tiny_patch16_224", str(hf))  # the folder: its model.safetensors + config.json
    assert teacher.mean == list(mean) and teacher.input_size == 16


def test_knn_probe_through_timm_equals_the_checkpoints_own(cfg_factory, tmp_path):
    """The report's check at test size: weights exported from a mimkit run, probed as a timm model with its own
    normalization and input size, give the mimkit checkpoint's own k-NN accuracies, and the same features."""
    ckpt, enc = exported_run(cfg_factory, tmp_path)
    assert main(["export", "--format", "safetensors", str(ckpt), str(tmp_path / "vit.safetensors")]) == 0
    common = ["data.synthetic_size=96", "knn.random_init=true", "features.cache=false"]
    assert main(["probe", "knn", "--checkpoint", str(ckpt), *common, f"output_dir={tmp_path / 'a'}"]) == 0
    assert main(["probe", "knn", "--checkpoint", "timm:vit_tiny_patch16_224", "--weights",
                 str(tmp_path / "vit.safetensors"), "data.name=synthetic", *common,
                 f"output_dir={tmp_path / 'b'}"]) == 0
    import json
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert a["pretrained"] == b["pretrained"] and len(a["pretrained"]) == 8  # top-1 and top-5 at k = 10 ... 200
    assert b["img_size"] == 16 and "random_init" in b  # the model's own input size, its own random init
