"""Official checkpoints as mimkit files (`mimkit convert IN OUT`, and on load wherever a pretraining checkpoint is
read): facebookresearch/mae's becomes a mimkit MAE pretraining checkpoint (encoder and, when the file has it, the
decoder), so probes read it and pretraining continues from it (`model.init_from`); the formats whose encoder mimkit's ViT does not
compute (BEiT's relative position bias and q/v biases, I-JEPA's missing CLS token) become a timm weights file
(safetensors, the timm.create_model kwargs in its metadata) that `--checkpoint timm:<arch> --weights FILE` reads."""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .checkpoint import CheckpointError
from .config import to_dict
from .weights import (HEADS_BY_WIDTH, detect, flat_state, no_format_error, read_file, timm_arch, timm_weights, vit_shape,
                      write_safetensors)

# MAE's decoder keys -> mimkit's (the encoder's are timm's names in both)
MAE_DECODER = {"decoder_embed.": "decoder.embed.", "mask_token": "decoder.mask_token",
               "decoder_pos_embed": "decoder.pos_embed", "decoder_blocks.": "decoder.blocks.",
               "decoder_norm.": "decoder.norm.", "decoder_pred.": "decoder.pred."}
ENCODER_PARTS = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")


def mae_overrides(state: dict[str, torch.Tensor]) -> list[str]:
    """The pretraining config keys of an official MAE state dict's shapes."""
    s = vit_shape(state)
    keys = [f"model.patch_size={s['patch_size']}", f"model.embed_dim={s['embed_dim']}", f"model.depth={s['depth']}",
            f"model.num_heads={s['num_heads']}", f"model.mlp_ratio={s['mlp_ratio']}", f"data.img_size={s['img_size']}"]
    if "decoder_embed.weight" in state:
        width = state["decoder_embed.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks."))
        keys += [f"decoder.embed_dim={width}", f"decoder.depth={depth}",
                 f"decoder.num_heads={HEADS_BY_WIDTH.get(width, 16 if width == 512 else max(1, width // 64))}"]
    return keys


def mae_model_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official MAE state dict under mimkit's MAE method names (encoder.*, decoder.*)."""
    out = {}
    for k, v in state.items():
        if k.split(".")[0] in ENCODER_PARTS:
            out[f"encoder.{k}"] = v
            continue
        for old, new in MAE_DECODER.items():
            if k == old or (old.endswith(".") and k.startswith(old)):
                out[new + k[len(old):]] = v
    return out


def mae_checkpoint(state: dict[str, torch.Tensor], path: str | Path) -> dict:
    """A mimkit MAE pretraining checkpoint of an official one: its config from the shapes, the model from a fresh
    MAE of that config with every official tensor copied in (a file without the decoder keeps a fresh one)."""
    from .methods import build_method, pretrain_config
    cfg = pretrain_config([], ["method=mae", "data.name=imagefolder", *mae_overrides(state)])
    with torch.random.fork_rng(devices=[]):  # a file without the decoder converts to the same file every time
        torch.manual_seed(cfg.seed)
        model = build_method(cfg)
    ours = model.state_dict()
    converted = mae_model_state(state)
    converted["encoder.mask_token"] = torch.zeros_like(ours["encoder.mask_token"])  # MAE's encoder has none
    for k, v in converted.items():
        if k not in ours or ours[k].shape != v.shape:
            raise CheckpointError(f"{path}: MAE key {k} does not fit mimkit's MAE of the same shape "
                                  f"({tuple(v.shape)} vs {tuple(ours[k].shape) if k in ours else 'no such key'})")
    model.load_state_dict(converted, strict=False)
    with_decoder = "decoder.embed.weight" in converted
    return {"mimkit": "pretrain", "model": model.state_dict(), "config": to_dict(cfg), "epoch": -1, "step": 0,
            "history": [], "converted_from": {"format": "mae", "file": str(path), "decoder": with_decoder}}


def init_from(model: torch.nn.Module, path: str | Path) -> None:
    """`model.init_from`: a pretraining checkpoint's model weights (mimkit's, or an official MAE file converted)
    loaded into `model` before training; every tensor of the file must fit one of the model's."""
    state = load_pretrain(path)["model"]
    ours = model.state_dict()
    bad = [k for k, v in state.items() if k not in ours or ours[k].shape != v.shape]
    if bad:
        k = bad[0]
        theirs = tuple(state[k].shape)
        raise CheckpointError(f"model.init_from={path}: {len(bad)} of its tensors do not fit this run's model (first: "
                              f"{k} {theirs} vs {tuple(ours[k].shape) if k in ours else 'no such key'}); the run "
                              f"needs the file's method and model/decoder shape")
    model.load_state_dict(state, strict=False)


def official(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(format, tensors) of an official checkpoint file; a file of no known format is one CheckpointError naming
    the formats tried and the closest mismatch."""
    state = flat_state(read_file(path))
    fmt = detect(state)
    if fmt is None:
        raise no_format_error(path, state, also="mimkit, ")
    return fmt, state


def load_pretrain(path: str | Path) -> dict:
    """A mimkit pretraining checkpoint, or an official MAE checkpoint converted to one. Other official formats
    are an error saying how to use them (through timm)."""
    try:
        return checkpoint.load(path, "pretrain")
    except CheckpointError as first:
        try:
            obj = read_file(path)
        except CheckpointError:
            raise first from None
        if not isinstance(obj, dict) or "mimkit" in obj:
            raise first from None
    fmt, state = official(path)
    if fmt == "mae":
        return mae_checkpoint(state, path)
    _, kwargs = timm_weights(fmt, state, path)
    raise CheckpointError(f"{path} is an official {fmt} checkpoint, whose encoder mimkit's ViT does not compute: "
                          f"probe it with --checkpoint timm:{timm_arch(fmt, kwargs)} --weights {path}, or write a "
                          f"timm weights file with `mimkit convert {path} OUT.safetensors`")


def convert(src: str | Path, out: str | Path) -> str:
    """`mimkit convert`: an official checkpoint -> a mimkit pretraining checkpoint (MAE) or a timm safetensors
    file with its create_model kwargs (the others). Returns what was written, as one line."""
    fmt, state = official(src)
    if fmt == "mae":
        ckpt = mae_checkpoint(state, src)
        checkpoint.save(ckpt, out)
        part = "encoder and decoder" if ckpt["converted_from"]["decoder"] else "encoder (a fresh decoder)"
        return (f"{src}: official MAE ({part}) -> mimkit pretraining checkpoint {out}; probe it with "
                f"--checkpoint {out}")
    tensors, kwargs = timm_weights(fmt, state, src)
    arch = timm_arch(fmt, kwargs)
    write_safetensors(tensors, out, {"architecture": arch, "model_args": kwargs})
    return (f"{src}: official {fmt} -> timm weights {out} ({arch}, {kwargs['depth']} blocks); probe it with "
            f"--checkpoint timm:{arch} --weights {out}")

