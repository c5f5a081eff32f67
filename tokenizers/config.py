"""Configuration of `mimkit tokenizer train`: the run keys and shared sections (data, optim, ckpt, teacher) plus
one section per registered kind, in the same layers as pretraining: dataclass defaults < the kind's recipe < the
dataset's scale preset < YAML files < dotted overrides, with the same ConfigErrors. The tables are plain data
(mimkit.tokenizer_config); this module adds what the kinds decide: a vocabulary their settings imply and their
own checks."""
from __future__ import annotations

from mimkit.config import ConfigError, check_range
from mimkit.tokenizer_config import DEFAULT_KIND, TokenizerRunConfig, build, config_class, data_presets, validate_shared

from .base import tokenizer_class

__all__ = ["DEFAULT_KIND", "TokenizerRunConfig", "config_class", "data_presets", "tokenizer_config", "validate"]


def tokenizer_config(files: list[str] = (), overrides: list[str] = ()):
    """The resolved config of `mimkit tokenizer train --config FILE... key=value...`."""
    cfg = build(files, overrides)
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
    validate_shared(cfg)
    check_range("vocab_size", cfg.vocab_size, 2)
    tokenizer_class(cfg.kind).check_config(cfg)
