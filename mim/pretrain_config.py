"""The pretraining config: run keys, the shared sections (data, model, mask, optim, ckpt, probe), the parts'
sections (`decoder`, `target.<kind>`, one per method that has settings), and its layers: dataclass defaults <
the method's recipe < the dataset's preset (mimkit.sections.DATA_PRESETS) < YAML files < dotted overrides.

Built from plain dataclasses and dicts (mimkit.sections, mimkit.parts), without importing torch or the parts'
modules: a mistake in a key or value is reported before the engine loads."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import (DEVICES, PRECISIONS, CkptConfig, ConfigError, OptimConfig, build_config, check_range, choices,
                     get_key, make_config)
from .parts import HEAD_SECTIONS, LOSS_NAMES, METHOD_SECTIONS, RECIPES, TARGET_SECTIONS
from .sections import DATA_PRESETS, DataConfig, MaskConfig, ModelConfig, validate_data
from .writers import LogConfig, check_log


@dataclass
class ProbeConfig:
    enabled: bool = True  # after pretraining: k-NN of the pretrained vs a random-init encoder (mimkit pretrain)
    knn_k: int = 20
    knn_t: float = 0.07


@dataclass
class RunConfig:
    method: str = "mae"
    head: str = choices(*HEAD_SECTIONS, default="")  # named by the method's recipe
    loss: str = choices(*LOSS_NAMES, default="")  # named by the method's recipe
    output_dir: str = ""  # default: runs/<method>_<data.name>
    seed: int = 0
    device: str = choices(*DEVICES, default="auto")
    epochs: int = 800
    batch_size: int = 64  # per process; effective batch = batch_size * accum_iter * world size
    accum_iter: int = 1
    resume: str = "auto"  # auto | none | path to a checkpoint
    overwrite: bool = False  # start afresh in an existing output_dir
    deterministic: bool = False
    compile: bool = False
    precision: str = choices(*PRECISIONS, default="auto")
    vis_every: int = 10  # epochs between TensorBoard image panels
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    log: LogConfig = field(default_factory=LogConfig)


def target_config_class() -> type:
    """The `target` section: `kind` plus one section per registered kind that has settings."""
    sections = {name: cls for name, cls in TARGET_SECTIONS.items() if cls is not None}
    return make_config("TargetConfig", object, sections, kinds=tuple(TARGET_SECTIONS))


def config_class() -> type:
    """RunConfig with the sections of the registered parts (heads, target kinds, methods) as they are now."""
    sections = {name: cls for name, cls in HEAD_SECTIONS.items() if cls is not None}
    sections["target"] = target_config_class()
    sections.update({name: cls for name, cls in METHOD_SECTIONS.items() if cls is not None})
    return make_config("Config", RunConfig, sections)


def pretrain_config(files: list[str] = (), overrides: list[str] = ()):
    """The resolved config of `mimkit pretrain --config FILE... key=value...`."""
    return build_config(config_class(), files, overrides,
                        presets=[("method", RECIPES), ("data.name", DATA_PRESETS)])


def validate(cfg) -> None:
    """Cross-field and range checks for a pretraining config (the parts check their own sections when built)."""
    for key in ("epochs", "batch_size", "accum_iter", "ckpt.every", "model.patch_size"):
        check_range(key, get_key(cfg, key), 1)
    check_range("mask.ratio", cfg.mask.ratio, 0, 1, lo_open=True, hi_open=True)
    check_range("optim.blr", cfg.optim.blr, 0, lo_open=True)
    for key in ("optim.weight_decay", "optim.warmup_epochs", "optim.warmup_start_lr", "optim.min_lr",
                "optim.clip_grad"):
        check_range(key, get_key(cfg, key), 0)
    if cfg.optim.weight_decay_end >= 0 and cfg.optim.weight_decay == 0:
        raise ConfigError(f"optim.weight_decay_end={cfg.optim.weight_decay_end} needs optim.weight_decay > 0 (the "
                          f"cosine starts there); set optim.weight_decay, or optim.weight_decay_end=-1 for none")
    for i, b in enumerate(cfg.optim.betas):
        check_range(f"optim.betas[{i}]", b, 0, 1, hi_open=True)
    validate_data(cfg.data)
    check_log(cfg.log)
    check_range("model.drop_path", cfg.model.drop_path, 0, 1, hi_open=True)
    if cfg.data.img_size % cfg.model.patch_size:
        raise ConfigError(f"data.img_size={cfg.data.img_size} is not divisible by model.patch_size="
                          f"{cfg.model.patch_size}; pick sizes with img_size % patch_size == 0")
    dims = cfg.model.resolved()
    if dims["embed_dim"] % dims["num_heads"]:
        raise ConfigError(f"model.embed_dim={dims['embed_dim']} is not divisible by model.num_heads={dims['num_heads']}")
    if cfg.target.kind == "ema" and cfg.target.ema.top_k > dims["depth"]:
        raise ConfigError(f"target.ema.top_k={cfg.target.ema.top_k} exceeds the encoder's {dims['depth']} blocks; "
                          f"use 1..{dims['depth']}, or 0 for the output tokens")
    if cfg.decoder.embed_dim % cfg.decoder.num_heads:
        raise ConfigError(f"decoder.embed_dim={cfg.decoder.embed_dim} is not divisible by "
                          f"decoder.num_heads={cfg.decoder.num_heads}")
    if cfg.resume not in ("auto", "none") and not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint file (use auto, none or a path to a .pt file)")

