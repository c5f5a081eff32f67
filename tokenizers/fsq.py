"""Finite scalar quantization (FSQ; Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of the d = len(levels) dimensions is bounded and rounded to L_i values; the code is the vector of rounded
values and the id its mixed-radix number (first dimension least significant). No codebook is learned, so none
can collapse, and there is no commitment or codebook loss.

Bound (the corrected form the FSQ author confirmed in vector-quantize-pytorch issue #94): with
half_l = (L - 1)(1 + eps) / 2, offset = 0.5 for even L (else 0) and shift = atanh(offset / half_l),
bound(z) = tanh(z + shift) * half_l - offset, which rounds to exactly L integers (-L//2 .. (L-1)//2) and maps
z = 0 to 0 for odd L; codes are round(bound(z)) / (L // 2) in [-1, 1], rounded with a straight-through
gradient. Level sets the paper recommends (Table 1) for vocabularies of about 2^8 .. 2^16:
FSQ_LEVELS[bits] -> [8, 6, 5] (240), [8, 5, 5, 5] (1000), [7, 5, 5, 5, 5] (4375), [8, 8, 8, 6, 5] (15360),
[8, 8, 8, 5, 5, 5] (64000).

Written here rather than imported from vector-quantize-pytorch (whose FSQ is the same definition): the
~40 lines would bring four more dependencies (einx, einops, loguru, torch-einops-utils) into every install.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mimkit.config import ConfigError
from mimkit.tokenizer_config import FSQ_LEVELS, FSQConfig, TOKENIZER_RECIPES

from .base import register_tokenizer
from .quantized import QuantizedTokenizer, Quantizer

EPS = 1e-3  # keeps the bounded range just wider than the outer levels so they are reached


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (x.round() - x).detach()


class FSQuantizer(Quantizer):
    def __init__(self, levels: list[int]):
        super().__init__()
        self.levels_list = [int(v) for v in levels]
        self.dim, self.vocab_size = len(self.levels_list), math.prod(self.levels_list)
        levels_t = torch.tensor(self.levels_list)
        # derived from `levels` (stored in the tokenizer's config), so not part of the state dict
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.tensor([1] + self.levels_list[:-1]), 0), persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """z [M, d] -> values in (-L//2 - 0.5, (L-1)//2 + 0.5) per dimension, before rounding."""
        levels = self.levels.to(z.dtype)
        half_l = (levels - 1) * (1 + EPS) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def digits(self, z: torch.Tensor) -> torch.Tensor:
        """The rounded level of each dimension as a digit 0 .. L - 1 (LongTensor [M, d])."""
        return self.bound(z).round().long() + self.levels // 2

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        return (self.digits(z) * self.basis).sum(-1)

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        digits = (ids.unsqueeze(-1) // self.basis) % self.levels
        half_width = self.levels // 2
        return (digits - half_width).float() / half_width

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        q = round_ste(self.bound(z)) / (self.levels // 2)
        return q, self.indices(z.detach()), z.new_zeros(()), {}


@register_tokenizer("fsq")
class FSQTokenizer(QuantizedTokenizer):
    paper = "FSQ"
    Config = FSQConfig
    recipe = TOKENIZER_RECIPES["fsq"]

    @classmethod
    def make_quantizer(cls, levels: list[int]) -> FSQuantizer:
        return FSQuantizer(levels)

    @classmethod
    def quantizer_config(cls, cfg) -> dict:
        return {"levels": list(cfg.fsq.levels)}

    @classmethod
    def derived_vocab(cls, cfg) -> tuple[int, str] | None:
        return math.prod(cfg.fsq.levels), f"fsq.levels={list(cfg.fsq.levels)}"

    @classmethod
    def check_config(cls, cfg) -> None:
        levels = cfg.fsq.levels
        if not levels or min(levels) < 2:
            raise ConfigError(f"fsq.levels={list(levels)} must list at least one level count, each >= 2 "
                              f"(e.g. {FSQ_LEVELS[10]})")
        super().check_config(cfg)

