"""Run configuration: dataclass defaults < method recipe < YAML file(s) < dotted CLI overrides.

Every mistake (unknown key, wrong type, value out of range) raises ConfigError with one line that
names the key and, where it helps, the valid choices; the CLI turns it into `error: ...` and exit 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file, an override or a command-line argument."""


def choices(*values: str, default: str) -> Any:
    return field(default=default, metadata={"choices": values})


# Every command's `device` and `precision` keys (precision auto: bf16 autocast on CUDA, fp32 on CPU; bf16 on CPU is
# 2x faster where the CPU multiplies bf16 natively, AMX on Xeon Sapphire Rapids and later, and slower elsewhere).
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class DataConfig:
    name: str = choices("digits", "cifar10", "imagefolder", "synthetic", default="digits")
    root: str = ""  # folder with train/ and val/ or test/ (cifar10, imagefolder)
    limit: int = 0  # use only N training images, evenly spread over the split (0 = all)
    img_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop scale for pretraining
    hflip: bool = True
    num_workers: int = -1  # -1: 0 for in-memory data, else min(8, cpus)
    skip_corrupt: bool = False  # replace unreadable images with another sample (counted) instead of failing
    synthetic_size: int = 512  # number of images of the synthetic dataset


ARCHS: dict[str, dict[str, int]] = {
    "vit_mini": dict(embed_dim=128, depth=6, num_heads=4),  # CPU preset for the embedded digits
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


@dataclass
class ModelConfig:
    arch: str = choices(*ARCHS, default="vit_base")
    patch_size: int = 16
    # 0 = take the value from `arch`
    depth: int = 0
    embed_dim: int = 0
    num_heads: int = 0
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    layer_scale: float = 0.0  # LayerScale init value (BEiT: 0.1); 0 = off
    decoder_depth: int = 8
    decoder_embed_dim: int = 512
    decoder_num_heads: int = 16
    aux_layer: int = 0  # BEiT v2: block (1-based) whose patch tokens feed the auxiliary head; 0 = depth // 2
    aux_depth: int = 2  # BEiT v2: blocks of the auxiliary head

    def resolved(self) -> dict[str, int]:
        """embed_dim/depth/num_heads after applying the arch preset to the zero fields."""
        base = ARCHS[self.arch]
        return {k: (getattr(self, k) or base[k]) for k in base}


@dataclass
class MaskConfig:
    kind: str = choices("random", "grid", "block", default="random")
    ratio: float = 0.75
    patch_px: int = 32  # SimMIM: side of a mask unit in pixels (grid masks)
    min_block: int = 16  # BEiT: smallest block in patches at 14x14; scaled with the grid
    min_aspect: float = 0.3  # BEiT: block aspect ratio in [min_aspect, 1/min_aspect]
    exact: bool = True  # block masks: fill or trim to exactly ratio * N patches


@dataclass
class TargetConfig:
    norm_pix: bool = False  # MAE: standardize each target patch by its own mean/var
    hog_bins: int = 9
    hog_cells_per_patch: int = 2  # MaskFeat: 2x2 cells per patch (8-px cells at patch 16)
    hog_gradient: str = choices("sobel", "central", default="sobel")
    hog_gaussian: bool = False  # Gaussian window over each patch's gradient magnitudes
    tokenizer: str = ""  # path of a tokenizer file (beit, beitv2, clustermim)
    vocab_size: int = 0  # beit, beitv2, clustermim: head size; 0 = the tokenizer's (checked when set)


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # base lr; lr = blr * effective batch / lr_batch_ref
    lr_batch_ref: int = 256  # SimMIM scales per 512 images
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    min_lr: float = 0.0
    clip_grad: float = 0.0  # 0 = no clipping
    skip_nonfinite: int = 0  # skip up to N steps with a NaN/Inf loss instead of stopping


@dataclass
class CkptConfig:
    every: int = 10  # save checkpoints/last.pt every N epochs (and at the end)


@dataclass
class ProbeConfig:
    enabled: bool = True  # after pretraining: k-NN of the pretrained vs a random-init encoder
    knn_k: int = 20
    knn_t: float = 0.07
    limit: int = 0  # use only N images of each split for the probe, evenly spread (0 = all)


@dataclass
class Config:
    method: str = "mae"
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
    target: TargetConfig = field(default_factory=TargetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


# ---------------------------------------------------------------------------------------------
# Setting values by dotted key with type checks


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _unknown(key: str, valid: list[str], section: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    source = f" in {where}" if where not in ("config", "command line") else ""
    return ConfigError(f"unknown config key '{key}'{source}{hint}; valid keys in {section}: {', '.join(valid)}")


def _coerce(key: str, value: Any, tp: Any, meta: typing.Mapping) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [yaml.safe_load(v) for v in value.strip("()[] ").split(",")]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} numbers, e.g. {key}=[0.9,0.95]; got {value!r}")
        return tuple(_coerce(key, v, a, {}) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string; got {value!r}")
        value = "" if value is None else str(value)
        valid = meta.get("choices")
        if valid and value not in valid:
            close = difflib.get_close_matches(value, valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{key}={value!r} is not valid{hint}; choose one of: {', '.join(valid)}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in the dataclass, not the user's


def set_key(cfg: Any, key: str, value: Any, where: str = "config") -> None:
    """Set a dotted key (`optim.blr`) on nested dataclasses, checking the key and the type."""
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        fields = _fields(obj)
        if part not in fields:
            prefix = ".".join(parts[:i])
            raise _unknown(key, [f"{prefix}.{n}" if prefix else n for n in fields], f"'{prefix}'" if prefix else "the config",
                           where)
        f = fields[part]
        tp = typing.get_type_hints(type(obj))[part]
        if dataclasses.is_dataclass(tp):
            if i == len(parts) - 1:
                if not isinstance(value, dict):
                    raise ConfigError(f"'{key}' is a section; set its keys, e.g. {key}.{next(iter(_fields(tp)))}=...")
                for k, v in value.items():
                    set_key(cfg, f"{key}.{k}", v, where)
                return
            obj = getattr(obj, part)
            continue
        if i != len(parts) - 1:
            raise ConfigError(f"'{'.'.join(parts[:i + 1])}' is a value, not a section; cannot set '{key}'")
        setattr(obj, part, _coerce(key, value, tp, f.metadata))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"YAML syntax error in {path}{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. optim.blr=1.5e-4")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def _pick(key: str, layers: list[tuple[str, dict]], default: Any) -> Any:
    return next((layer[key] for _, layer in reversed(layers) if key in layer), default)


def build_config(cls: type, files: list[str] = (), overrides: list[str] = (),
                 presets: list[tuple[str, dict[str, dict]]] = ()) -> Any:
    """defaults < presets < files in order < overrides.

    A preset is (key, {value: {dotted key: value}}): e.g. ("method", RECIPES) applies the recipe of the
    method the user finally chose, whichever layer chose it. Later presets win over earlier ones.
    """
    layers = [(str(f), flatten(load_yaml(f))) for f in files]
    layers.append(("command line", parse_overrides(list(overrides))))
    cfg = cls()
    for key, table in presets:
        probe = cls()
        set_key(probe, key, _pick(key, layers, _get(cfg, key)))  # type/choice check of the chooser key
        value = _get(probe, key)
        if value not in table:
            if key == "method":
                close = difflib.get_close_matches(str(value), list(table), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"{key}={value!r} is not valid{hint}; choose one of: {', '.join(table)}")
            continue  # choices without a preset keep the defaults
        for k, v in table[value].items():
            set_key(cfg, k, v, f"{key}={value} preset")
    for where, layer in layers:
        for k, v in layer.items():
            set_key(cfg, k, v, where)
    return cfg


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, d: dict) -> Any:
    cfg = cls()
    for k, v in flatten(d).items():
        set_key(cfg, k, v, "saved config")
    return cfg


def dump_yaml(cfg: Any) -> str:
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return list(x)
        return x

    return yaml.safe_dump(plain(to_dict(cfg)), sort_keys=False)


def diff(a: Any, b: Any) -> list[str]:
    """Dotted keys whose values differ between two configs (as dicts or dataclasses)."""
    fa = flatten(a if isinstance(a, dict) else to_dict(a))
    fb = flatten(b if isinstance(b, dict) else to_dict(b))
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return sorted(k for k in set(fa) | set(fb) if norm(fa.get(k)) != norm(fb.get(k)))


def check_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or \
          (hi is not None and (value > hi or (hi_open and value == hi)))
    if bad:
        lo_s = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
        hi_s = "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
        raise ConfigError(f"{key}={value} is out of range; need {lo_s}{key.split('.')[-1]}{hi_s}")


def validate_data(data: DataConfig) -> None:
    """The checks of the `data` section every command shares (pretrain, tokenizer, probe, analyze)."""
    check_range("data.limit", data.limit, 0)
    check_range("data.img_size", data.img_size, 1)
    lo, hi = data.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale={list(data.crop_scale)} must satisfy 0 < min <= max <= 1")
    if data.name in ("cifar10", "imagefolder") and not data.root:
        raise ConfigError(f"data.root is required for data.name={data.name}, e.g. data.root=../shared/data/cifar10")


def validate(cfg: Config) -> None:
    """Cross-field and range checks for a pretraining config."""
    check_range("epochs", cfg.epochs, 1)
    check_range("batch_size", cfg.batch_size, 1)
    check_range("accum_iter", cfg.accum_iter, 1)
    check_range("mask.ratio", cfg.mask.ratio, 0, 1, lo_open=True, hi_open=True)
    check_range("optim.blr", cfg.optim.blr, 0, lo_open=True)
    check_range("optim.weight_decay", cfg.optim.weight_decay, 0)
    check_range("optim.warmup_epochs", cfg.optim.warmup_epochs, 0)
    check_range("optim.min_lr", cfg.optim.min_lr, 0)
    check_range("optim.clip_grad", cfg.optim.clip_grad, 0)
    for i, b in enumerate(cfg.optim.betas):
        check_range(f"optim.betas[{i}]", b, 0, 1, hi_open=True)
    validate_data(cfg.data)
    check_range("model.patch_size", cfg.model.patch_size, 1)
    check_range("model.drop_path", cfg.model.drop_path, 0, 1, hi_open=True)
    check_range("ckpt.every", cfg.ckpt.every, 1)
    if cfg.data.img_size % cfg.model.patch_size:
        raise ConfigError(f"data.img_size={cfg.data.img_size} is not divisible by model.patch_size="
                          f"{cfg.model.patch_size}; pick sizes with img_size % patch_size == 0")
    dims = cfg.model.resolved()
    if dims["embed_dim"] % dims["num_heads"]:
        raise ConfigError(f"model.embed_dim={dims['embed_dim']} is not divisible by model.num_heads={dims['num_heads']}")
    if cfg.model.decoder_embed_dim % cfg.model.decoder_num_heads:
        raise ConfigError(f"model.decoder_embed_dim={cfg.model.decoder_embed_dim} is not divisible by "
                          f"model.decoder_num_heads={cfg.model.decoder_num_heads}")
    if cfg.resume not in ("auto", "none") and not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint file (use auto, none or a path to a .pt file)")
