"""Configuration of `mimkit tokenizer train`: the run keys and shared sections (data, optim, ckpt, teacher) plus
one section per registered kind (mimkit.tokenizers.TOKENIZERS), in the same layers as pretraining: dataclass
defaults < the kind's recipe < the dataset's scale preset < YAML files < dotted overrides, with the same
ConfigErrors."""
from __future__ import annotations

from dataclasses import dataclass, field

from mimkit.config import (DEVICES, PRECISIONS, CkptConfig, ConfigError, OptimConfig, build_config, check_range,
                           choices, get_key, make_config)
from mimkit.data import DATA_PRESETS, DataConfig, validate_data
from mimkit.teachers import TeacherConfig

from .base import TOKENIZERS, tokenizer_class

DEFAULT_KIND = "kmeans"  # a run that names no kind


@dataclass
class TokenizerRunConfig:
    """The keys every kind shares; `config_class` adds `kind` and the kinds' sections."""
    output_dir: str = ""  # default: runs/tokenizer_<kind>_<data.name>
    seed: int = 0
    device: str = choices(*DEVICES, default="auto")
    precision: str = choices(*PRECISIONS, default="auto")
    patch_size: int = 16  # the encoder's patch size: one token per patch, grid = data.img_size // patch_size
    vocab_size: int = 0  # 0 = the kind's: its recipe's, or what its settings imply (fsq: the product of the levels)
    epochs: int = 100  # kinds trained by gradient steps
    batch_size: int = 64
    accum_iter: int = 1
    resume: str = choices("auto", "none", default="auto")  # auto: continue from <output_dir>/checkpoints/last.pt
    overwrite: bool = False
    vis_every: int = 10  # epochs between held-out evaluations and TensorBoard image panels
    data: DataConfig = field(default_factory=DataConfig)  # data.test_limit: held-out images (0 = the test split)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


def config_class() -> type:
    """TokenizerRunConfig with `kind` and the section of every registered kind that has settings, as they are
    now."""
    sections = {kind: cls.Config for kind, cls in TOKENIZERS.items() if cls.Config is not None}
    return make_config("TokenizerConfig", TokenizerRunConfig, sections, kinds=tuple(TOKENIZERS),
                       default_kind=DEFAULT_KIND)


def data_presets() -> dict[str, dict]:
    """The pretraining dataset presets reduced to what a tokenizer needs: data keys and the patch size."""
    out = {}
    for name, preset in DATA_PRESETS.items():
        keys = {k: v for k, v in preset.items() if k.startswith("data.")}
        if "model.patch_size" in preset:
            keys["patch_size"] = preset["model.patch_size"]
        out[name] = keys
    return out


def tokenizer_config(files: list[str] = (), overrides: list[str] = ()):
    """The resolved config of `mimkit tokenizer train --config FILE... key=value...`."""
    recipes = {kind: cls.recipe for kind, cls in TOKENIZERS.items()}
    cfg = build_config(config_class(), files, overrides, presets=[("kind", recipes), ("data.name", data_presets())])
    derived = tokenizer_class(cfg.kind).derived_vocab(cfg)
    if derived:
        size, why = derived
        if cfg.vocab_size not in (0, size):
            raise ConfigError(f"vocab_size={cfg.vocab_size} conflicts with {why} ({size} codes); leave vocab_size "
                              f"unset or set it to {size}")
        cfg.vocab_size = size
    return cfg


def validate(cfg) -> None:
    """The shared checks, then the kind's own (`check_config`)."""
    cls = tokenizer_class(cfg.kind)
    for key, lo in (("patch_size", 1), ("vocab_size", 2), ("epochs", 0), ("batch_size", 1), ("accum_iter", 1),
                    ("vis_every", 1), ("ckpt.every", 1)):
        check_range(key, get_key(cfg, key), lo)
    validate_data(cfg.data)
    check_range("optim.blr", cfg.optim.blr, 0, lo_open=True)
    if cfg.data.img_size % cfg.patch_size:
        raise ConfigError(f"data.img_size={cfg.data.img_size} is not divisible by patch_size={cfg.patch_size}")
    cls.check_config(cfg)

