"""`mimkit tokenizer import --kind vqkd`: BEiT v2's VQ-KD checkpoint (microsoft/unilm beit2 modeling_vqkd.py) as
a mimkit vqkd tokenizer. The official encoder is beit2's VisionTransformer with learned absolute positions, q/v
biases, no layer scale and mean pooling (fc_norm on every patch token): timm's Beit with those options computes
it, and the official tokens are the nearest L2-normalized code (by cosine) to l2norm(encode_task_layer(tokens))."""
import pytest
import torch
from timm.models.beit import Beit

from mimkit.checkpoint import CheckpointError
from mimkit.cli import main
from mimkit.tokenizers import Tokenizer
from mimkit.tokenizers.vqkd import VQKD
from mimkit.tokenizers.vqkd_official import vqkd_args, vqkd_state

VIT_TOP = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "fc_norm.weight",
           "fc_norm.bias"}
VIT_BLOCK = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
             "mlp.fc2.bias"}


def beit2_vit(img_size, patch, in_chans, dim, depth, heads) -> Beit:
    """beit2 modeling_finetune.VisionTransformer(use_abs_pos_emb=True, init_values=0, use_mean_pooling=True)."""
    vit = Beit(img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth, num_heads=heads,
               use_abs_pos_emb=True, use_rel_pos_bias=False, init_values=None, global_pool="avg", num_classes=0)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vit.eval()


def mlp_state(name: str, dim: int, out: int) -> dict:
    return {f"{name}.0.weight": torch.randn(dim, dim) * 0.1, f"{name}.0.bias": torch.randn(dim) * 0.1,
            f"{name}.2.weight": torch.randn(out, dim) * 0.1, f"{name}.2.bias": torch.randn(out) * 0.1}


def official_vqkd(dim=128, depth=2, dec_depth=3, vocab=64, code_dim=8, teacher_dim=32):
    encoder = beit2_vit(32, 4, 3, dim, depth, 2)
    decoder = beit2_vit(8, 1, code_dim, dim, dec_depth, 2)  # over the code grid: patch 1, code_dim channels
    state = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
             **{f"decoder.{k}": v for k, v in decoder.state_dict().items()},
             **mlp_state("encode_task_layer", dim, code_dim), **mlp_state("decode_task_layer", dim, teacher_dim),
             "quantize.embedding.weight": torch.nn.functional.normalize(torch.randn(vocab, code_dim), dim=-1),
             "quantize.embedding.cluster_size": torch.rand(vocab), "quantize.embedding.embed_avg": torch.randn(vocab, code_dim),
             "quantize.embedding.initted": torch.tensor([1.0]), "quantize.cluster_size": torch.rand(vocab),
             "scaling_layer.shift": torch.zeros(1, 3, 1, 1), "scaling_layer.scale": torch.ones(1, 3, 1, 1),
             "teacher_model.visual.proj": torch.randn(dim, 512)}
    return encoder, state


def official_ids(encoder: Beit, state: dict, x: torch.Tensor) -> torch.Tensor:
    """modeling_vqkd.VQKD.encode: patch tokens after fc_norm -> encode_task_layer -> l2norm -> nearest code."""
    t = encoder.fc_norm(encoder.forward_features(x)[:, 1:])
    h = torch.tanh(t @ state["encode_task_layer.0.weight"].T + state["encode_task_layer.0.bias"])
    z = torch.nn.functional.normalize(h @ state["encode_task_layer.2.weight"].T + state["encode_task_layer.2.bias"],
                                      dim=-1)
    return (z @ state["quantize.embedding.weight"].T).argmax(-1)


def test_import_gives_the_official_tokens_and_round_trips_through_safetensors(tmp_path, capsys):
    torch.manual_seed(0)
    encoder, state = official_vqkd()
    assert {k[8:] for k in state if k.startswith("encoder.") and ".blocks." not in k and
            not k.startswith("encoder.blocks.")} == VIT_TOP
    assert {k[len("encoder.blocks.0."):] for k in state if k.startswith("encoder.blocks.0.")} == VIT_BLOCK
    path = tmp_path / "vqkd.pth"
    torch.save({"model": state, "epoch": 99}, path)
    out = tmp_path / "vqkd_mimkit.pt"
    assert main(["tokenizer", "import", "--kind", "vqkd", str(path), str(out)]) == 0
    assert "64 x 8 codebook, 2-block encoder, 3-block decoder" in capsys.readouterr().out
    tok = Tokenizer.load(out)
    x01 = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = official_ids(encoder, state, x01 * 2 - 1)  # the official 'default' preprocessing
    ids = tok.encode((x01 - 0.5) / 0.5)  # mimkit: images normalized with the tokenizer's mean/std (0.5)
    assert torch.equal(ids, ref), (ids != ref).float().mean()
    assert len(ref.unique()) > 4  # the check is not a constant id
    assert main(["export", "--format", "safetensors", str(out), str(tmp_path / "vqkd.safetensors")]) == 0
    again = Tokenizer.load(tmp_path / "vqkd.safetensors")
    assert again.config() == tok.config() and torch.equal(again.encode((x01 - 0.5) / 0.5), ids)


def test_full_size_key_mapping_covers_every_tensor():
    """ViT-B/16 encoder, 8192 x 32 codebook, 3-block decoder (vqkd_encoder_base_decoder_3x768x12_clip), built on
    the meta device (the official side): every official tensor lands on a mimkit tensor of its shape, and nothing is left over."""
    with torch.device("meta"):
        enc, dec = Beit(use_abs_pos_emb=True, init_values=None, num_classes=0), Beit(
            img_size=14, patch_size=1, in_chans=32, depth=3, use_abs_pos_emb=True, init_values=None, num_classes=0)
        state = {**{f"encoder.{k}": v for k, v in enc.state_dict().items()},
                 **{f"decoder.{k}": v for k, v in dec.state_dict().items()},
                 "encode_task_layer.0.weight": torch.empty(768, 768), "encode_task_layer.0.bias": torch.empty(768),
                 "encode_task_layer.2.weight": torch.empty(32, 768), "encode_task_layer.2.bias": torch.empty(32),
                 "decode_task_layer.0.weight": torch.empty(768, 768), "decode_task_layer.0.bias": torch.empty(768),
                 "decode_task_layer.2.weight": torch.empty(512, 768), "decode_task_layer.2.bias": torch.empty(512),
                 "quantize.embedding.weight": torch.empty(8192, 32), "quantize.cluster_size": torch.empty(8192)}
        args = vqkd_args(state)
        assert args == dict(img_size=224, grid=14, vocab_size=8192, mean=[0.5] * 3, std=[0.5] * 3, teacher_dim=512,
                            embed_dim=768, depth=12, num_heads=12, code_dim=32, decoder_depth=3, decoder_embed_dim=768,
                            decoder_num_heads=12)
    ours = VQKD(**args).state_dict()  # on the CPU: mimkit's ViT reads its drop-path rates at construction
    converted = vqkd_state(state)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in ours.items() if k not in ("encoder.mask_token", "decoder.mask_token",
                                                                 "quantizer.initialized")}


def test_not_a_vqkd_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "x.pth"
    torch.save({"model": {"encoder.cls_token": torch.zeros(1, 1, 8)}}, path)
    assert main(["tokenizer", "import", "--kind", "vqkd", str(path), str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a BEiT v2 VQ-KD checkpoint" in err
    with pytest.raises(CheckpointError):
        Tokenizer.load(tmp_path / "o.pt")
