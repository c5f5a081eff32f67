"""Official checkpoint formats, recognized by their keys: what each one holds, and its encoder as a timm model.

- `mae` (facebookresearch/mae `models_mae.py`): a timm ViT encoder (`blocks.*`, `norm`, fixed sin-cos
  `pos_embed`) and, in full pretraining checkpoints, the decoder (`decoder_embed`, `mask_token`,
  `decoder_pos_embed`, `decoder_blocks.*`, `decoder_norm`, `decoder_pred`);
- `beit` / `beitv2` (microsoft/unilm `beit/`, `beit2/` `modeling_pretrain.py`): BEiT's ViT (`attn.q_bias` and
  `attn.v_bias` instead of a qkv bias, layer scale `gamma_1`/`gamma_2`, a relative position bias shared by all
  blocks `rel_pos_bias.*` or one per block), `mask_token`, `lm_head`; BEiT v2 adds `cls_pt_layers.*`;
- `simmim` (microsoft/SimMIM `models/simmim.py`): the same BEiT ViT under `encoder.`, a conv `decoder.0`;
- `ijepa` (facebookresearch/ijepa `src/train.py`): `encoder`, `predictor`, `target_encoder` state dicts saved
  from DDP (`module.` prefix), a ViT without CLS token whose `pos_embed` is fixed sin-cos;
- `data2vec2` (fairseq `examples/data2vec`): recognized (`modality_encoders.IMAGE.*`) and refused: its image
  encoder is post-LayerNorm (`layer_norm_first: false`), which no timm ViT computes.

`timm_weights` turns a recognized file into (timm state dict, timm.create_model kwargs); the kwargs pin the
shape read from the weights, so the converted model gives the same features as the official one. Official
files often pickle an `argparse.Namespace` of the run's arguments: it is the one class allowed besides
tensors (weights_only loading still refuses any code).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import checkpoint
from .checkpoint import CheckpointError
from .config import ConfigError

# The keys that recognize a format (after unwrapping "model" / "state_dict" and stripping "module.")
SIGNATURES: dict[str, tuple[str, ...]] = {
    "mae": ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.bias", "norm.weight"),
    "beit": ("cls_token", "mask_token", "patch_embed.proj.weight", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias",
             "lm_head.weight"),
    "beitv2": ("cls_token", "mask_token", "patch_embed.proj.weight", "blocks.0.attn.q_bias", "lm_head.weight",
               "cls_pt_layers.0.attn.q_bias"),
    "simmim": ("encoder.cls_token", "encoder.mask_token", "encoder.patch_embed.proj.weight",
               "encoder.blocks.0.attn.q_bias", "decoder.0.weight"),
    "ijepa": ("target_encoder/patch_embed.proj.weight", "target_encoder/pos_embed",
              "target_encoder/blocks.0.attn.qkv.weight", "target_encoder/norm.weight"),
    "data2vec2": ("modality_encoders.IMAGE.local_encoder.proj.weight", "blocks.0.attn.qkv.weight"),
}
# Official dims whose head count the weights do not show (ViT-Ti/S/B/L/H/g)
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}


def read_file(path: str | Path):
    """The object in a local weights file: safetensors, or a torch file read with weights_only=True (an
    argparse.Namespace of arguments allowed)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read weights {path} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None


def flat_state(obj) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, one level deep: a bare state dict, the one under "model" / "state_dict" /
    "module", or (I-JEPA) each sub-dict's tensors as "<entry>/<key>"; DDP's "module." prefix stripped."""
    if not isinstance(obj, dict):
        return {}
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k.removeprefix("module.")] = v
        elif isinstance(v, dict) and k in ("encoder", "target_encoder", "predictor"):
            out.update({f"{k}/{sk.removeprefix('module.')}": sv for sk, sv in v.items()
                        if isinstance(sv, torch.Tensor)})
    return out


def detect(state: dict[str, torch.Tensor]) -> str | None:
    """The official format whose signature keys `state` holds (the most specific first), or None."""
    for name in ("beitv2", "beit", "simmim", "ijepa", "data2vec2", "mae"):
        if all(k in state for k in SIGNATURES[name]):
            return name
    return None


def closest_mismatch(state: dict[str, torch.Tensor]) -> str:
    """The format whose signature `state` matches best, and the keys it lacks (for the error line)."""
    best = max(SIGNATURES, key=lambda n: sum(k in state for k in SIGNATURES[n]))
    lacking = [k for k in SIGNATURES[best] if k not in state]
    return f"closest: {best}, missing {', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''}"


def no_format_error(path: str | Path, state: dict, also: str = "") -> CheckpointError:
    sample = ", ".join(list(state)[:3]) or "no tensors"
    return CheckpointError(f"{path} is not a mimkit checkpoint and matches no known weights format (tried "
                           f"{also}{', '.join(SIGNATURES)}; "
                           f"{closest_mismatch(state)}; its first keys: {sample})")


def vit_shape(state: dict[str, torch.Tensor], prefix: str = "") -> dict:
    """embed_dim, depth, num_heads, patch_size, mlp_ratio and img_size of a ViT state dict (the grid from the
    number of positions, or the relative position table's window)."""
    w = state[f"{prefix}patch_embed.proj.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    depth = 1 + max(int(k[len(prefix):].split(".")[1]) for k in state if k.startswith(f"{prefix}blocks."))
    pos = state.get(f"{prefix}pos_embed")
    if pos is not None:
        n = pos.shape[1]
        grid = int(round(n ** 0.5)) if int(round(n ** 0.5)) ** 2 == n else int(round((n - 1) ** 0.5))
    else:  # a (2g-1)^2 + 3 relative position table
        table = state.get(f"{prefix}rel_pos_bias.relative_position_bias_table",
                          state.get(f"{prefix}blocks.0.attn.relative_position_bias_table"))
        grid = (int(round((table.shape[0] - 3) ** 0.5)) + 1) // 2
    mlp = state[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0] / dim
    return dict(img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth,
                num_heads=HEADS_BY_WIDTH.get(dim, max(1, dim // 64)), mlp_ratio=mlp)


def beit_to_timm(state: dict[str, torch.Tensor], prefix: str = "") -> tuple[dict, dict]:
    """A BEiT-style ViT (BEiT, BEiT v2, SimMIM) -> timm's Beit with one relative position table per block (the
    shared one copied into each, as BEiT's fine-tuning does) and its final norm on every token."""
    enc = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    shape = vit_shape(enc)
    out = {k: v for k, v in enc.items() if k.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "blocks",
                                                             "norm") and "relative_position_index" not in k}
    shared = enc.get("rel_pos_bias.relative_position_bias_table")
    if shared is not None:
        for i in range(shape["depth"]):
            out[f"blocks.{i}.attn.relative_position_bias_table"] = shared.clone()
    kwargs = dict(shape, use_abs_pos_emb="pos_embed" in enc,
                  use_rel_pos_bias=shared is not None or "blocks.0.attn.relative_position_bias_table" in enc,
                  init_values=0.1 if "blocks.0.gamma_1" in enc else None, global_pool="token", num_classes=0)
    return out, kwargs


def vit_to_timm(state: dict[str, torch.Tensor], prefix: str = "", class_token: bool = True) -> tuple[dict, dict]:
    """A timm-named ViT encoder (MAE's, I-JEPA's) -> its keys, without the decoder or predictor."""
    enc = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out = {k: v for k, v in enc.items() if k.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "blocks",
                                                             "norm")}
    kwargs = dict(vit_shape(enc), num_classes=0)
    if not class_token:  # I-JEPA: no CLS token, features are the mean of the patch tokens
        kwargs.update(class_token=False, global_pool="avg", fc_norm=False)
    return out, kwargs


TIMM_FAMILY = {"mae": "vit", "beit": "beit", "beitv2": "beitv2", "simmim": "beit", "ijepa": "vit"}


def timm_weights(fmt: str, state: dict[str, torch.Tensor], path: str | Path = "") -> tuple[dict, dict]:
    """(timm state dict, timm.create_model kwargs) of the encoder in an official checkpoint of format `fmt`."""
    if fmt == "data2vec2":
        raise CheckpointError(f"{path} is a data2vec 2.0 checkpoint: its image encoder is post-LayerNorm "
                              f"(layer_norm_first: false), which no timm ViT computes; it cannot be converted")
    if fmt in ("beit", "beitv2"):
        return beit_to_timm(state)
    if fmt == "simmim":
        return beit_to_timm(state, "encoder.")
    if fmt == "ijepa":
        return vit_to_timm(state, "target_encoder/", class_token=False)
    return vit_to_timm(state)


def timm_arch(fmt: str, kwargs: dict) -> str:
    """A timm architecture of the format's family (its pretrained config supplies mean/std); the kwargs pin the
    shape."""
    family = TIMM_FAMILY[fmt]
    size = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}.get(kwargs["embed_dim"], "base")
    if family != "vit" and size not in ("base", "large"):
        size = "base"
    if fmt == "ijepa":
        return f"vit_{size}_patch{kwargs['patch_size']}_gap_224" if size == "huge" else f"vit_{size}_patch16_224"
    return f"{family}_{size}_patch16_224"


def export_kwargs(path: Path) -> dict:
    """The timm.create_model kwargs a mimkit export records (`mimkit export`): the shape (`model_args`) and the
    normalization (`pretrained_cfg_overlay`), from a safetensors file's metadata or the config.json beside it."""
    meta = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k in ("model_args", "pretrained_cfg")}
    config = path.parent / "config.json"
    if not meta and config.is_file():
        meta = json.loads(config.read_text())
    kwargs = dict(meta.get("model_args") or {})
    if isinstance(kwargs.get("img_size"), list):  # timm's config.json records (h, w); mimkit's images are square
        kwargs["img_size"] = kwargs["img_size"][-1]
    cfg = meta.get("pretrained_cfg") or {}
    if "mean" in cfg and "std" in cfg:
        kwargs["pretrained_cfg_overlay"] = {"mean": list(cfg["mean"]), "std": list(cfg["std"])}
    return kwargs


def timm_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, timm.create_model kwargs) of a weights file (or a folder with model.safetensors) for a timm
    model: an official format converted (`timm_weights`), a mimkit export with the shape it records, or any
    other file's tensors as they are (a timm model's own weights). MAE's files already use timm's names."""
    p = Path(path)
    p = p / "model.safetensors" if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"weights {str(path)!r}: no such file (nothing is downloaded)")
    state = flat_state(read_file(p))
    if not state:
        raise CheckpointError(f"{path} does not hold a state dict")
    fmt = detect(state)
    if fmt not in (None, "mae"):
        return timm_weights(fmt, state, path)
    return state, export_kwargs(p)


def read_tokenizer(path: str | Path) -> dict | None:
    """The mimkit tokenizer a torch file holds, read by `checkpoint.load` (format and checksum verified: a
    damaged tokenizer file is a CheckpointError naming it); None for a file of another kind."""
    p = Path(path)
    if p.suffix == ".safetensors" or not p.is_file():
        return None
    try:
        return checkpoint.load(p, "tokenizer")
    except checkpoint.OtherKind:
        return None


def export_tokenizer(ckpt: dict, out: str | Path) -> str:
    """A mimkit tokenizer (`read_tokenizer`'s dict) as safetensors: its tensors, and its kind and config as
    metadata (`Tokenizer.load` reads it back)."""
    write_safetensors(ckpt["state"], out, {"mimkit": "tokenizer", "kind": ckpt["kind"], "config": ckpt["config"]})
    return f"wrote {out} ({ckpt['kind']} tokenizer, {len(ckpt['state'])} tensors)"


def read_tokenizer_safetensors(path: str | Path) -> dict:
    """An exported tokenizer (`export_tokenizer`) as the dict a tokenizer file holds."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    if meta.get("mimkit") != "tokenizer":
        raise CheckpointError(f"{path} is not a mimkit tokenizer export (no 'mimkit: tokenizer' metadata)")
    return {"mimkit": "tokenizer", "kind": meta.get("kind"), "config": meta.get("config"), "state": load_file(str(path))}


def write_safetensors(tensors: dict[str, torch.Tensor], out: str | Path, meta: dict) -> None:
    """A safetensors file written atomically, each metadata value as JSON."""
    from safetensors.torch import save
    data = save({k: v.detach().contiguous() for k, v in tensors.items()}, {k: json.dumps(v) for k, v in meta.items()})
    checkpoint.atomic_write(out, lambda f: f.write(data))
