"""Mask generators. One interface: `gen(generator) -> BoolTensor[N]` for one sample on the patch grid
(True = masked). They run per sample in the data loader, seeded per (run seed, epoch, sample index), so a
step never waits on them and masks do not depend on the number of processes or loader workers.
"""
from __future__ import annotations

import torch


class RandomMask:
    """MAE: uniform noise, argsort, mask all but the first int(N * (1 - ratio)) patches."""

    def __init__(self, grid: int, ratio: float):
        self.grid, self.ratio = grid, ratio
        self.num_patches = grid * grid
        self.num_keep = int(self.num_patches * (1 - ratio))

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.rand(self.num_patches, generator=generator)
        mask = torch.ones(self.num_patches, dtype=torch.bool)
        mask[noise.argsort()[: self.num_keep]] = False
        return mask


def build_mask_generator(mask_cfg, grid: int, patch_size: int):
    """The mask generator named by `mask.kind` for a grid x grid patch layout."""
    if mask_cfg.kind == "random":
        return RandomMask(grid, mask_cfg.ratio)
    raise ValueError(f"mask.kind={mask_cfg.kind!r} is not implemented yet")
