"""The config machinery every command shares: nested dataclasses set by dotted keys, built in layers
(dataclass defaults < presets chosen by a key, e.g. the method's recipe and the dataset's preset < YAML file(s)
< dotted command-line overrides), and the sections more than one command uses (optim, ckpt).

Each part owns its section's dataclass (data: mimkit.data, model: mimkit.vit, mask: mimkit.masking, a target
kind: its module in mimkit.targets, ...); a command's config class is assembled from them with `make_config`.
Every mistake (unknown key, wrong type, value out of range) raises ConfigError with one line that names the
key and, where it helps, the valid choices; the CLI turns it into `error: ...` and exit 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file, an override or a command-line argument. The message stays one line: a line
    break the user typed into a key or value is shown escaped (`\\n`)."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


# every character str.splitlines() breaks at -> its escape
LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(text: Any) -> str:
    """`text` with its line breaks escaped: a key, value or path the user typed stays on the error's one line."""
    return str(text).translate(LINE_BREAKS)


def choices(*values: str, default: str) -> Any:
    return field(default=default, metadata={"choices": values})


# Every command's `device` and `precision` keys (precision auto: bf16 autocast on CUDA, fp32 on CPU; bf16 on CPU is
# faster where the CPU multiplies bf16 natively, AMX on Xeon Sapphire Rapids and later, and slower elsewhere).
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine (pretraining, tokenizer training). The defaults are MAE's (the default method);
    other recipes set what differs."""
    blr: float = 1.5e-4  # base lr; lr = blr * effective batch / lr_batch_ref
    lr_batch_ref: int = 256  # SimMIM scales per 512 images
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    warmup_start_lr: float = 0.0  # the lr the warmup starts from (I-JEPA's start_lr); absolute, as min_lr
    min_lr: float = 0.0
    clip_grad: float = 0.0  # 0 = no clipping
    # >= 0: cosine from weight_decay to this over the run (I-JEPA: 0.04 -> 0.4); < 0: weight_decay throughout
    weight_decay_end: float = -1.0
    skip_nonfinite: int = 0  # skip up to N steps with a NaN/Inf loss instead of stopping


@dataclass
class CkptConfig:
    every: int = 10  # save checkpoints/last.pt every N epochs (and at the end)


def make_config(name: str, base: type, sections: dict[str, type], kinds: tuple[str, ...] = (),
                default_kind: str = "") -> type:
    """A dataclass `name` with the fields of `base` plus one section per entry of `sections` (section name ->
    its dataclass) and, with `kinds`, a `kind` key choosing among them (`default_kind` when none is named): how
    a command's config takes in the sections of registered parts (targets, methods, tokenizer kinds) without
    this module knowing them. The same arguments give the same class (configs compare equal only within one
    class)."""
    return _config_class(name, base, tuple(sections.items()), tuple(kinds), default_kind)


@functools.lru_cache(maxsize=None)
def _config_class(name: str, base: type, sections: tuple[tuple[str, type], ...], kinds: tuple[str, ...],
                  default_kind: str) -> type:
    clash = {key for key, _ in sections} & (set(_fields(base)) if dataclasses.is_dataclass(base) else set())
    if clash:
        raise ValueError(f"config sections {sorted(clash)} clash with fields of {base.__name__}")
    fields = [("kind", str, choices(*kinds, default=default_kind))] if kinds else []
    fields += [(key, cls, field(default_factory=cls)) for key, cls in sections]
    return dataclasses.make_dataclass(name, fields, bases=(base,))


def known_fields(cls: type, values: dict) -> Any:
    """An instance of `cls` from the entries of `values` that are its fields (a section stored by another
    mimkit version may hold keys this one does not know)."""
    names = _fields(cls)
    return from_dict(cls, {k: v for k, v in values.items() if k in names}, renamed=False)


# ---------------------------------------------------------------------------------------------
# Setting values by dotted key with type checks


# Keys renamed when targets became parts of their own: an old key names its new one in the error.
RENAMED = {
    "target.norm_pix": "target.pixels.norm_pix", "target.hog_bins": "target.hog.bins",
    "target.hog_cells_per_patch": "target.hog.cells_per_patch", "target.hog_gradient": "target.hog.gradient",
    "target.hog_gaussian": "target.hog.gaussian", "target.tokenizer": "target.tokens.tokenizer",
    "target.vocab_size": "target.tokens.vocab_size", "model.decoder_depth": "decoder.depth",
    "model.decoder_embed_dim": "decoder.embed_dim", "model.decoder_num_heads": "decoder.num_heads",
    "model.aux_layer": "beitv2.aux_layer", "model.aux_depth": "beitv2.aux_depth", "probe.limit": "data.test_limit",
    "test_limit": "data.test_limit", "eval_limit": "data.test_limit", "ckpt_every": "ckpt.every",
}


def migrate(flat: dict[str, Any]) -> dict[str, Any]:
    """A stored config's flat keys under their current names (configs saved before a rename stay readable)."""
    return {RENAMED.get(k, k): v for k, v in flat.items()}


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _unknown(key: str, valid: list[str], section: str, where: str) -> ConfigError:
    close = [RENAMED[key]] if key in RENAMED else difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    source = f" in {where}" if where not in ("config", "command line") else ""
    return ConfigError(f"unknown config key '{key}'{source}{hint}; valid keys in {section}: {', '.join(valid)}")


def _scalar(text: str) -> Any:
    """One piece of a list given as text (`[0.9,0.95]` on the command line) as YAML reads it; text it cannot read
    stays text (the type check then names the key)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(key: str, value: Any, tp: Any, meta: typing.Mapping) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [_scalar(v) for v in value.strip("()[] ").split(",")]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} numbers, e.g. {key}=[0.9,0.95]; got {value!r}")
        return tuple(_coerce(key, v, a, {}) for v, a in zip(value, args))
    if origin is list:  # any length, e.g. fsq.levels=[8,5,5,5]
        (arg,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [_scalar(v) for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, e.g. {key}=[1,2]; got {value!r}")
        return [_coerce(key, v, arg, {}) for v in value]
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
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number; got {value!r}")
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
        section = getattr(obj, part)
        if dataclasses.is_dataclass(section):  # the instance's class: sections may be assembled at run time
            if i == len(parts) - 1:
                if not isinstance(value, dict):
                    first = next(iter(_fields(section)), "key")
                    raise ConfigError(f"'{key}' is a section; set its keys, e.g. {key}.{first}=...")
                for k, v in value.items():
                    set_key(cfg, f"{key}.{k}", v, where)
                return
            obj = section
            continue
        if i != len(parts) - 1:
            raise ConfigError(f"'{'.'.join(parts[:i + 1])}' is a value, not a section; cannot set '{key}'")
        setattr(obj, part, _coerce(key, value, typing.get_type_hints(type(obj))[part], f.metadata))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_yaml(text: str, where: str) -> Any:
    """YAML through PyYAML's safe loader only: no Python object is ever built. A syntax error or a tag the safe
    loader refuses (`!!python/object:...`, `!!python/name:...`, any `!!python/` tag) is one ConfigError naming
    `where` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        tag = re.search(r"constructor for the tag '([^']*)'", problem)
        if tag:
            name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
            raise ConfigError(f"{where}{at}: YAML tag {name} refused; mimkit reads plain YAML values only "
                              f"(a !!python/ tag would build or run Python objects)") from None
        raise ConfigError(f"YAML syntax error in {where}{at}: {problem}") from None


def load_yaml(path: str | Path) -> dict:
    """A YAML file holding a mapping (config files, study files, a run directory's config.yaml), read safely."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
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
        set_key(probe, key, _pick(key, layers, get_key(cfg, key)))  # type/choice check of the chooser key
        value = get_key(probe, key)
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


def get_key(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, d: dict, renamed: bool = True) -> Any:
    """A config from a stored dict (config.yaml, a checkpoint's config), old key names included (`renamed`:
    `d` holds a whole command's config, whose keys RENAMED may list)."""
    cfg = cls()
    flat = flatten(d)
    for k, v in (migrate(flat) if renamed else flat).items():
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
