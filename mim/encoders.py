"""Encoders from files: the ViT of any mimkit pretraining checkpoint (probes, teachers, analysis) and the
random-init baseline of the same shape."""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .checkpoint import CheckpointError
from .config import ConfigError, known_fields
from .data import DataConfig
from .vit import ModelConfig, ViT, build_encoder, sincos_pos_embed


class EncoderSpec:
    """What a pretraining checkpoint says about its encoder: the model and data sections, method and seed."""

    def __init__(self, model: ModelConfig, data: DataConfig, method: str, seed: int):
        self.model, self.data, self.method, self.seed = model, data, method, seed


def read_spec(path: str | Path, stored: dict) -> EncoderSpec:
    """The encoder's settings from a checkpoint's stored config. Only the encoder's shape and data matter here;
    keys of another mimkit version in those sections are ignored."""
    try:
        model = known_fields(ModelConfig, stored.get("model", {}))
        data = known_fields(DataConfig, stored.get("data", {}))
    except ConfigError as e:
        raise CheckpointError(f"{path}: stored config is not readable ({e})") from None
    return EncoderSpec(model, data, str(stored.get("method", "")), int(stored.get("seed", 0)))


# which encoder of a checkpoint: the trained student, or the EMA teacher of data2vec 2.0 / I-JEPA (target.kind=ema)
ENCODER_KEYS = {"student": "encoder.", "ema": "target.teacher."}


def load_encoder(path: str | Path, img_size: int | None = None, ckpt: dict | None = None,
                 weights: str = "student") -> tuple[ViT, EncoderSpec, dict]:
    """The encoder of a pretraining checkpoint (weights under `encoder.` in ckpt["model"], whatever the
    method; with weights="ema" the EMA teacher's), its settings, and the checkpoint (pass `ckpt` if already loaded
    from `path`). A different `img_size` regenerates the fixed sin-cos positions for the new grid."""
    ckpt = checkpoint.load(path, "pretrain") if ckpt is None else ckpt
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} has no 'model' and 'config' entries; is it a mimkit pretraining checkpoint?")
    spec = read_spec(path, ckpt["config"])
    prefix = ENCODER_KEYS[weights]
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        hint = "; encoder=ema needs a run whose target.kind is ema (data2vec2, ijepa)" if weights == "ema" else ""
        raise CheckpointError(f"{path} holds no {weights} encoder weights (no '{prefix}' keys in its model){hint}")
    size = img_size or spec.data.img_size
    if size % spec.model.patch_size:
        raise ConfigError(f"data.img_size={size} is not divisible by the checkpoint's patch size "
                          f"{spec.model.patch_size}")
    encoder = build_encoder(spec.model, size)
    state["pos_embed"] = sincos_pos_embed(encoder.grid, encoder.embed_dim)  # fixed, so rebuilt for any grid
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: encoder weights do not fit the stored model config "
                              f"({str(e).splitlines()[0][:200]})") from None
    return encoder, spec, ckpt


def random_encoder(model_cfg: ModelConfig, img_size: int, seed: int) -> ViT:
    """A random-init encoder of the same shape: the init a pretraining run with this seed started from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(model_cfg, "random_init"):  # a timm / OpenCLIP probe encoder: its architecture, fresh weights
            return model_cfg.random_init()
        return build_encoder(model_cfg, img_size)
