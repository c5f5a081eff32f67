"""BEiT v2's released VQ-KD tokenizer (microsoft/unilm beit2 `modeling_vqkd.py`) as a mimkit `vqkd` tokenizer.

The official VQKD holds `encoder` and `decoder` (beit2 `modeling_finetune.VisionTransformer`: learned absolute
positions, no layer scale, `attn.q_bias`/`attn.v_bias` and no key bias, mean pooling so `norm` is an identity
and `fc_norm` is applied to every patch token), `encode_task_layer` / `decode_task_layer` (Linear, Tanh,
Linear) and `quantize` (`NormEMAVectorQuantizer`: the L2-normalized codebook `embedding.weight`), plus the
frozen CLIP teacher and its scaling layer, which a tokenizer does not need. mimkit's VQ-KD is the same
computation: its ViT's `norm` is the official `fc_norm`, its qkv bias is [q_bias, 0, v_bias]. Its input is the
official 'default' preprocessing, x * 2 - 1 of [0, 1] pixels: mean = std = 0.5.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mimkit.checkpoint import CheckpointError
from mimkit.weights import HEADS_BY_WIDTH, flat_state, read_file

from .vqkd import VQKD

SIGNATURE = ("encoder.patch_embed.proj.weight", "encoder.pos_embed", "encoder.blocks.0.attn.q_bias",
             "encode_task_layer.0.weight", "quantize.embedding.weight", "decoder.patch_embed.proj.weight",
             "decode_task_layer.2.weight")
RENAMED = {"encode_task_layer.": "encode_task.", "decode_task_layer.": "decode_task.", "quantize.embedding.weight":
           "quantizer.codebook", "quantize.cluster_size": "quantizer.usage"}


def vit_part(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """One official ViT (`encoder` or `decoder`) under mimkit ViT names: fc_norm -> norm, q/v biases -> one qkv
    bias with zeros for the keys."""
    out = {}
    for k, v in state.items():
        if not k.startswith(f"{part}.") or "relative_position" in k or k.endswith(("q_bias", "v_bias")):
            continue
        name = k[len(part) + 1:]
        out[f"{part}.{name.replace('fc_norm.', 'norm.', 1) if name.startswith('fc_norm.') else name}"] = v
        if name.endswith("attn.qkv.weight") and k.replace("qkv.weight", "q_bias") in state:
            q, v_ = state[k.replace("qkv.weight", "q_bias")], state[k.replace("qkv.weight", "v_bias")]
            out[f"{part}.{name.replace('weight', 'bias')}"] = torch.cat([q, torch.zeros_like(q), v_])
    return out


def vqkd_args(state: dict[str, torch.Tensor]) -> dict:
    """The mimkit VQKD constructor arguments of an official state dict's shapes."""
    patch = state["encoder.patch_embed.proj.weight"].shape[-1]
    grid = int(round((state["encoder.pos_embed"].shape[1] - 1) ** 0.5))
    vocab, code_dim = state["quantize.embedding.weight"].shape
    dim, dec_dim = state["encoder.patch_embed.proj.weight"].shape[0], state["decoder.patch_embed.proj.weight"].shape[0]

    def depth(part):
        return 1 + max(int(k.split(".")[2]) for k in state if k.startswith(f"{part}.blocks."))
    return dict(img_size=grid * patch, grid=grid, vocab_size=vocab, mean=[0.5] * 3, std=[0.5] * 3,
                teacher_dim=state["decode_task_layer.2.weight"].shape[0], embed_dim=dim, depth=depth("encoder"),
                num_heads=HEADS_BY_WIDTH.get(dim, max(1, dim // 64)), code_dim=code_dim,
                decoder_depth=depth("decoder"), decoder_embed_dim=dec_dim,
                decoder_num_heads=HEADS_BY_WIDTH.get(dec_dim, max(1, dec_dim // 64)))


def vqkd_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official tensors under mimkit VQKD names (what the tokenizer needs; the teacher is dropped)."""
    out = {**vit_part(state, "encoder"), **vit_part(state, "decoder")}
    for k, v in state.items():
        for old, new in RENAMED.items():
            if k == old or (old.endswith(".") and k.startswith(old)):
                out[new + k[len(old):]] = v
    return out


def import_vqkd(path: str | Path) -> VQKD:
    """A mimkit `vqkd` tokenizer holding BEiT v2's released VQ-KD weights (a file that is not one: one error)."""
    state = flat_state(read_file(path))
    lacking = [k for k in SIGNATURE if k not in state]
    if lacking:
        raise CheckpointError(f"{path} is not a BEiT v2 VQ-KD checkpoint (modeling_vqkd.VQKD): missing "
                              f"{', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''}")
    args = vqkd_args(state)
    tok = VQKD(**args)
    ours = tok.state_dict()
    converted = vqkd_state(state)
    converted.setdefault("quantizer.usage", torch.full((args["vocab_size"],), 1.0))
    converted.update({"quantizer.initialized": torch.tensor(True), "encoder.mask_token": torch.zeros_like(
        ours["encoder.mask_token"]), "decoder.mask_token": torch.zeros_like(ours["decoder.mask_token"])})
    try:
        missing, unexpected = tok.load_state_dict(converted, strict=False)
    except RuntimeError as e:  # a shape that does not fit
        raise CheckpointError(f"{path}: the VQ-KD weights do not fit mimkit's vqkd of the shape they imply "
                              f"({str(e).splitlines()[1].strip()[:200]})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: the VQ-KD weights do not map onto mimkit's vqkd (missing "
                              f"{', '.join(missing[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'})")
    return tok.eval()
