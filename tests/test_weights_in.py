"""Official checkpoint formats in: each test builds a state dict under the official code's key names (listed here
from facebookresearch/mae models_mae.py, microsoft/unilm beit*/modeling_pretrain.py, microsoft/SimMIM
models/simmim.py, facebookresearch/ijepa src/train.py) with random values, and checks the converted model gives
the features of the same weights in a model that computes the official definition (timm's ViT for MAE and
I-JEPA, timm's Beit with BEiT's own options for BEiT and SimMIM; MAE's decoder written out below)."""
import argparse
from functools import partial

import pytest
import timm
import torch
from timm.models.beit import Beit
from timm.models.vision_transformer import Block, VisionTransformer

from mimkit.checkpoint import CheckpointError
from mimkit.cli import main
from mimkit.convert import load_pretrain
from mimkit.encoders import load_encoder
from mimkit.methods import build_method, pretrain_config
from mimkit.teachers import load_probe_encoder, load_teacher
from mimkit.vit import sincos_pos_embed
from mimkit.weights import detect, flat_state, read_file

# one block's keys and the top-level ones, as the official modules name them
MAE_KEYS = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            "mask_token", "decoder_embed.weight", "decoder_embed.bias", "decoder_pos_embed", "decoder_norm.weight",
            "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
TIMM_BLOCK = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
              "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}
BEIT_KEYS = {"cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
             "rel_pos_bias.relative_position_bias_table", "rel_pos_bias.relative_position_index", "lm_head.weight",
             "lm_head.bias"}
BEIT_BLOCK = {"gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias",
              "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias"}
LN = partial(torch.nn.LayerNorm, eps=1e-6)  # mae_vit_*: norm_layer=partial(nn.LayerNorm, eps=1e-6), decoder too
DIM, DEPTH, HEADS = 128, 2, 2  # 128 wide: mimkit reads 2 heads from the width (official widths: their own)


def jitter(model):
    with torch.no_grad():  # every parameter non-trivial (inits leave biases and layer scales constant)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def top_keys(state: dict, block: str = "blocks.") -> set:
    return {k for k in state if not k.startswith(block) and not k.startswith("decoder_blocks.")}


def block_keys(state: dict, prefix: str) -> set:
    return {k[len(prefix):] for k in state if k.startswith(prefix)}


def official_mae(dec_dim: int = 128, dec_depth: int = 2) -> tuple[VisionTransformer, dict]:
    """MAE's encoder (a timm ViT with fixed sin-cos positions) and its decoder, under models_mae.py's names."""
    enc = jitter(VisionTransformer(img_size=16, patch_size=4, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                                   num_classes=0, global_pool="token"))
    enc.pos_embed.data.copy_(sincos_pos_embed(4, DIM))
    state = dict(enc.state_dict())
    blocks = [jitter(Block(dec_dim, 2, qkv_bias=True, norm_layer=LN)) for _ in range(dec_depth)]
    for i, b in enumerate(blocks):
        state.update({f"decoder_blocks.{i}.{k}": v for k, v in b.state_dict().items()})
    state.update({"mask_token": torch.randn(1, 1, dec_dim), "decoder_embed.weight": torch.randn(dec_dim, DIM) * 0.05,
                  "decoder_embed.bias": torch.randn(dec_dim) * 0.05, "decoder_pos_embed": sincos_pos_embed(4, dec_dim),
                  "decoder_norm.weight": 1 + 0.05 * torch.randn(dec_dim), "decoder_norm.bias": torch.randn(dec_dim),
                  "decoder_pred.weight": torch.randn(48, dec_dim) * 0.05, "decoder_pred.bias": torch.randn(48)})
    return enc, state


def mae_decoder_reference(state: dict, latent: torch.Tensor, ids_restore: torch.Tensor, heads: int) -> torch.Tensor:
    """models_mae.py forward_decoder, written out (with its eps 1e-6 LayerNorms): embed, append mask tokens, unshuffle, add positions, blocks,
    norm, predictor, drop CLS."""
    x = latent @ state["decoder_embed.weight"].T + state["decoder_embed.bias"]
    mask_tokens = state["mask_token"].repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + state["decoder_pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks."))
    for i in range(depth):
        blk = Block(x.shape[-1], heads, qkv_bias=True, norm_layer=LN)
        blk.load_state_dict({k[len(f"decoder_blocks.{i}."):]: v for k, v in state.items()
                             if k.startswith(f"decoder_blocks.{i}.")})
        x = blk.eval()(x)
    x = torch.nn.functional.layer_norm(x, x.shape[-1:], state["decoder_norm.weight"], state["decoder_norm.bias"],
                                       eps=1e-6)
    return (x @ state["decoder_pred.weight"].T + state["decoder_pred.bias"])[:, 1:]


def test_mae_pretraining_checkpoint_converts_encoder_and_decoder(tmp_path):
    torch.manual_seed(0)
    enc, state = official_mae()
    assert top_keys(state) == MAE_KEYS and block_keys(state, "blocks.0.") == TIMM_BLOCK
    assert block_keys(state, "decoder_blocks.0.") == TIMM_BLOCK
    path = tmp_path / "checkpoint-399.pth"  # as main_pretrain.py saves it: args is an argparse.Namespace
    torch.save({"model": state, "optimizer": {}, "epoch": 399, "args": argparse.Namespace(norm_pix_loss=True)}, path)
    ckpt = load_pretrain(path)
    assert ckpt["config"]["method"] == "mae" and ckpt["config"]["decoder"]["depth"] == 2
    ours = load_encoder(path, ckpt=ckpt)[0].eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ours(x), enc.forward_features(x), atol=1e-5)
    cfg = pretrain_config([], [f"{k}={v}" for k, v in [("method", "mae")]] + _cfg_keys(ckpt))
    model = build_method(cfg).eval()
    model.load_state_dict(ckpt["model"])
    mask = torch.zeros(3, 16, dtype=torch.bool)
    for i in range(3):
        mask[i, torch.randperm(16)[:12]] = True
    ids_restore = torch.argsort(torch.argsort(mask.to(torch.uint8), dim=1, stable=True), dim=1)
    with torch.no_grad():
        latent = model.encoder(x, mask)
        ref = mae_decoder_reference(state, latent, ids_restore, 2)
        assert torch.allclose(model.decoder(latent, mask), ref, atol=1e-4)


def _cfg_keys(ckpt: dict) -> list[str]:
    c = ckpt["config"]
    return [f"model.{k}={c['model'][k]}" for k in ("patch_size", "embed_dim", "depth", "num_heads")] + [
        f"decoder.{k}={c['decoder'][k]}" for k in ("embed_dim", "depth", "num_heads")] + [
        f"data.img_size={c['data']['img_size']}", "data.name=imagefolder"]


def official_beit(v2: bool = False) -> tuple[Beit, dict]:
    """BEiT's pretraining ViT (shared relative position bias, layer scale 0.1, no absolute positions), as timm's Beit
    with BEiT's options computes it, and its state dict under modeling_pretrain.py's names."""
    native = jitter(Beit(img_size=32, patch_size=4, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, use_abs_pos_emb=False,
                         use_shared_rel_pos_bias=True, init_values=0.1, global_pool="token", num_classes=0))
    state = dict(native.state_dict())
    table = state["rel_pos_bias.relative_position_bias_table"]
    state.update({"mask_token": torch.randn(1, 1, DIM), "lm_head.weight": torch.randn(64, DIM),
                  "lm_head.bias": torch.randn(64),
                  "rel_pos_bias.relative_position_index": torch.zeros(65, 65, dtype=torch.long)})
    assert table.shape[0] == 15 * 15 + 3
    if v2:  # BEiT v2's CLS-pretraining head: extra blocks over the middle layer
        state.update({f"cls_pt_layers.0.{k[len('blocks.0.'):]}": v.clone() for k, v in state.items()
                      if k.startswith("blocks.0.")})
    return native, state


@pytest.mark.parametrize("fmt", ["beit", "beitv2", "simmim"])
def test_beit_family_through_timm_beit(tmp_path, fmt):
    torch.manual_seed(1)
    native, state = official_beit(v2=fmt == "beitv2")
    assert top_keys(state, "blocks.") - {"cls_pt_layers.0." + k for k in BEIT_BLOCK} == BEIT_KEYS
    assert block_keys(state, "blocks.1.") == BEIT_BLOCK
    if fmt == "simmim":  # SimMIM(encoder=VisionTransformerForSimMIM, decoder=Conv2d + PixelShuffle)
        state = {**{f"encoder.{k}": v for k, v in state.items() if not k.startswith("lm_head")},
                 "decoder.0.weight": torch.randn(48, DIM, 1, 1), "decoder.0.bias": torch.randn(48)}
    path = tmp_path / f"{fmt}.pth"
    torch.save({"model": state, "epoch": 799, "args": argparse.Namespace(model="beit_base")}, path)
    assert detect(flat_state(read_file(path))) == fmt
    arch = "beitv2_base_patch16_224" if fmt == "beitv2" else "beit_base_patch16_224"
    teacher = load_teacher(f"timm:{arch}", str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher.model.forward_features(x), native.forward_features(x), atol=1e-5)
    # the converted file reads back the same, and its normalization is the architecture's (BEiT v2: ImageNet's)
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 0
    again = load_teacher(f"timm:{arch}", str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        assert torch.equal(again.model.forward_features(x), teacher.model.forward_features(x))
    assert again.mean == ([0.485, 0.456, 0.406] if fmt == "beitv2" else [0.5, 0.5, 0.5])


def test_ijepa_target_encoder_through_timm_vit(tmp_path):
    torch.manual_seed(2)
    native = jitter(VisionTransformer(img_size=16, patch_size=4, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                                      class_token=False, global_pool="avg", fc_norm=False, num_classes=0))
    state = {f"module.{k}": v for k, v in native.state_dict().items()}
    assert {k for k in native.state_dict() if not k.startswith("blocks.")} == {
        "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    predictor = {"module.predictor_embed.weight": torch.randn(64, DIM), "module.mask_token": torch.zeros(1, 1, 64)}
    path = tmp_path / "in1k-latest.pth.tar"  # as src/train.py saves it (DDP: "module." prefixes)
    torch.save({"encoder": {k: v + 1 for k, v in state.items()}, "predictor": predictor, "target_encoder": state,
                "opt": {}, "scaler": None, "epoch": 300, "loss": 0.1, "batch_size": 2048, "world_size": 16,
                "lr": 1e-3}, path)
    enc = load_probe_encoder("timm:vit_huge_patch14_gap_224", str(path), ([0.5] * 3, [0.5] * 3))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # the target encoder (I-JEPA evaluates it), pooled as timm pools I-JEPA: the patch mean
        ref = native.forward_features(x)
        ours = enc.teacher.model.forward_features(x)
        assert torch.allclose(ours, ref, atol=1e-5)
        assert torch.allclose(enc(x * 2 - 0)[:, 0], enc.teacher.model.forward_head(
            enc.teacher.model.forward_features(enc.teacher.prepare(x * 2, ([0.5] * 3, [0.5] * 3))), pre_logits=True))


def test_data2vec2_is_refused_with_the_reason(tmp_path, capsys):
    state = {"modality_encoders.IMAGE.local_encoder.proj.weight": torch.zeros(8, 3, 4, 4),
             "modality_encoders.IMAGE.extra_tokens": torch.zeros(1, 1, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8),
             "blocks.0.norm1.weight": torch.ones(8)}
    path = tmp_path / "d2v.pt"
    torch.save({"model": state}, path)
    assert main(["convert", str(path), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data2vec 2.0" in err and "post-LayerNorm" in err


def test_unknown_file_is_one_line_naming_formats_and_closest(tmp_path, capsys):
    enc, state = official_mae()
    state = {k.replace("qkv", "query_key_value"): v for k, v in state.items()}  # another codebase's naming
    path = tmp_path / "other.pth"
    torch.save(state, path)
    assert main(["convert", str(path), str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    for name in ("mae", "beit", "beitv2", "simmim", "ijepa", "data2vec2"):
        assert name in err
    assert "closest: mae, missing blocks.0.attn.qkv.bias" in err
    with pytest.raises(CheckpointError, match="matches no known weights format"):
        load_pretrain(path)


def test_probe_and_convert_an_official_mae_file(tmp_path, capsys):
    torch.manual_seed(3)
    _, state = official_mae()
    path = tmp_path / "mae_visualize.pth"
    torch.save({"model": state}, path)
    out = tmp_path / "mae.pt"
    assert main(["convert", str(path), str(out)]) == 0
    assert "encoder and decoder" in capsys.readouterr().out
    enc_a = load_encoder(out)[0]
    enc_b = load_encoder(path, ckpt=load_pretrain(path))[0]
    assert all(torch.equal(a, b) for a, b in zip(enc_a.state_dict().values(), enc_b.state_dict().values()))
    args = ["probe", "knn", "--checkpoint", str(path), "data.name=synthetic", "data.synthetic_size=64",
            "data.img_size=16", "knn.random_init=false", f"output_dir={tmp_path / 'knn'}"]
    assert main(args) == 0


def test_pretraining_continues_from_an_official_mae_file(tmp_path):
    """model.init_from=FILE: the run starts from the official encoder and decoder (a fresh optimizer); a file of
    another shape is one error before anything is written."""
    from mimkit.engine import setup
    torch.manual_seed(4)
    _, state = official_mae()
    path = tmp_path / "mae_visualize.pth"
    torch.save({"model": state}, path)
    shape = ["method=mae", "data.name=synthetic", "data.img_size=16", "model.patch_size=4", f"model.embed_dim={DIM}",
             f"model.depth={DEPTH}", f"model.num_heads={HEADS}", "decoder.embed_dim=128", "decoder.depth=2",
             "decoder.num_heads=2", f"model.init_from={path}"]
    run = setup(pretrain_config([], [*shape, f"output_dir={tmp_path / 'run'}"]))
    expected = load_pretrain(path)["model"]
    assert all(torch.equal(v, expected[k]) for k, v in run.model.state_dict().items())
    with pytest.raises(CheckpointError, match="decoder.blocks.1"):
        setup(pretrain_config([], [*shape, "decoder.depth=1", f"output_dir={tmp_path / 'other'}"]))
    assert not (tmp_path / "other").exists()


def test_export_reads_tokenizers_through_the_checked_loader(tmp_path, capsys):
    """`mimkit export` reads a tokenizer file with checkpoint.load: an intact one exports, one flipped byte in a
    tensor (torch.load still reads the file) is one error line naming the file, and nothing is written."""
    from mimkit.tokenizers.kmeans import KMeansTokenizer
    tok = KMeansTokenizer(16, 4, 8, [0.5] * 3, [0.25] * 3, dim=48)
    with torch.no_grad():
        tok.centroids.normal_()
    good, bad = tmp_path / "tok.pt", tmp_path / "flipped.pt"
    tok.save(good)
    assert main(["export", "--format", "safetensors", str(good), str(tmp_path / "tok.safetensors")]) == 0
    assert "kmeans tokenizer" in capsys.readouterr().out
    data = bytearray(good.read_bytes())
    at = bytes(data).find(tok.centroids.detach().numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x10
    bad.write_bytes(bytes(data))
    assert torch.load(bad, weights_only=True)["mimkit"] == "tokenizer"  # only the checksum can tell
    assert main(["export", "--format", "safetensors", str(bad), str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0] and "checksum" in err[0], err
    assert not (tmp_path / "bad.safetensors").exists()
