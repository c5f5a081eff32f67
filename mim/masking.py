"""Mask generators. One interface: `gen(generator) -> BoolTensor[N]` for one sample on the patch grid
(True = masked). They run per sample in the data loader, seeded per (run seed, epoch, sample index), so a
step never waits on them and masks do not depend on the number of processes or loader workers.

- RandomMask (MAE): a uniformly random subset of patches.
- GridMask (SimMIM): a random subset of coarse mask units of `mask.patch_px` pixels, upsampled to patches.
- BlockMask (BEiT, MaskFeat): random rectangles of patches until the target count is reached.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from .config import ConfigError, choices

MASK_KINDS = ("random", "grid", "block")


@dataclass
class MaskConfig:
    kind: str = choices(*MASK_KINDS, default="")  # named by each method's recipe
    ratio: float = 0.75
    patch_px: int = 32  # SimMIM: side of a mask unit in pixels (grid masks)
    min_block: int = 16  # BEiT: smallest block in patches at 14x14; scaled with the grid
    min_aspect: float = 0.3  # BEiT: block aspect ratio in [min_aspect, 1/min_aspect]
    exact: bool = True  # block masks: fill or trim to exactly ratio * N patches


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


class GridMask:
    """SimMIM (microsoft/SimMIM MaskGenerator): mask ceil(ratio * units) of the units of a coarse grid whose
    cells are `unit` patches wide, then repeat each unit over its unit x unit patches. The count is fixed on
    the coarse grid, so every sample masks exactly `num_mask_units * unit**2` patches."""

    def __init__(self, grid: int, ratio: float, unit: int):
        if grid % unit:
            raise ValueError(f"grid {grid} is not divisible by the mask unit {unit}")
        self.grid, self.ratio, self.unit = grid, ratio, unit
        self.units = grid // unit
        self.num_units = self.units ** 2
        self.num_mask_units = math.ceil(self.num_units * ratio)  # SimMIM rounds up
        self.num_patches = grid * grid

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        coarse = torch.zeros(self.num_units, dtype=torch.bool)
        coarse[torch.randperm(self.num_units, generator=generator)[: self.num_mask_units]] = True
        coarse = coarse.view(self.units, self.units)
        return coarse.repeat_interleave(self.unit, 0).repeat_interleave(self.unit, 1).flatten()


class BlockMask:
    """BEiT's block-wise masking (microsoft/unilm beit/masking_generator.py), with BEiT v2's exact count.

    Until `num_mask` patches are masked: draw a block area uniform in [min_block, remaining], an aspect ratio
    h/w log-uniform in [min_aspect, 1/min_aspect], h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)),
    a uniform position; accept the block if it adds between 1 and `remaining` new patches; up to 10 tries per
    block, and stop when a block cannot be placed. With `exact`, randomly chosen patches are then added or
    removed so every sample masks exactly round(ratio * N) patches (beit2/masking_generator.py).
    """

    tries = 10

    def __init__(self, grid: int, ratio: float, min_block: int = 16, min_aspect: float = 0.3, exact: bool = True):
        self.grid, self.ratio, self.exact = grid, ratio, exact
        self.num_patches = grid * grid
        self.num_mask = round(ratio * self.num_patches)
        self.min_block = min_block
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _block(self, mask: np.ndarray, max_new: int, rng: random.Random) -> tuple[int, int, int, int] | None:
        """Try to place one block adding 1..max_new new patches; returns (top, left, h, w) or None."""
        for _ in range(self.tries):
            area = rng.uniform(self.min_block, max_new)  # as BEiT: also when max_new < min_block
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h < self.grid and w < self.grid:  # BEiT keeps blocks strictly smaller than the grid
                top, left = rng.randint(0, self.grid - h), rng.randint(0, self.grid - w)
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= max_new:
                    mask[top:top + h, left:left + w] = True
                    return top, left, h, w
        return None

    def draw(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """The block phase: a [grid, grid] mask that is the union of the returned (top, left, h, w) blocks."""
        mask, blocks = self._draw(_python_rng(generator))
        return torch.from_numpy(mask), blocks

    def _draw(self, rng: random.Random) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
        mask = np.zeros((self.grid, self.grid), dtype=bool)
        blocks, count = [], 0
        while count < self.num_mask:
            block = self._block(mask, self.num_mask - count, rng)
            if block is None:
                break
            blocks.append(block)
            count = int(mask.sum())
        return mask, blocks

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        rng = _python_rng(generator)
        mask = self._draw(rng)[0].reshape(-1)
        extra = int(mask.sum()) - self.num_mask
        if self.exact and extra:
            # trim random masked patches, or fill random visible ones, to reach the exact count
            pool = np.flatnonzero(mask if extra > 0 else ~mask).tolist()
            mask[rng.sample(pool, abs(extra))] = extra < 0
        return torch.from_numpy(mask)


def _python_rng(generator: torch.Generator | None) -> random.Random:
    """A Python RNG seeded from the torch generator: block masks take many scalar draws, which cost ~0.1 us
    each from `random` against ~5 us from torch."""
    return random.Random(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))


def build_mask_generator(mask_cfg, grid: int, patch_size: int):
    """The mask generator named by `mask.kind` for a grid x grid layout of patch_size-pixel patches."""
    kind, ratio, n = mask_cfg.kind, mask_cfg.ratio, grid * grid
    if kind == "random":
        return RandomMask(grid, ratio)
    if kind == "grid":
        px, img = mask_cfg.patch_px, grid * patch_size
        if px < patch_size or px % patch_size:
            raise ConfigError(f"mask.patch_px={px} must be a multiple of model.patch_size={patch_size} "
                              f"(a mask unit covers whole patches), e.g. mask.patch_px={max(2, px // patch_size) * patch_size}")
        if img % px:
            raise ConfigError(f"mask.patch_px={px} does not divide data.img_size={img}; pick a divisor that is a "
                              f"multiple of model.patch_size={patch_size}")
        gen = GridMask(grid, ratio, px // patch_size)
        if not 0 < gen.num_mask_units < gen.num_units:
            raise ConfigError(f"mask.patch_px={px} gives {gen.num_units} mask unit(s) at data.img_size={img}, of "
                              f"which mask.ratio={ratio} masks {gen.num_mask_units}; use a smaller mask.patch_px")
        return gen
    if kind == "block":
        num_mask = round(ratio * n)  # as BlockMask counts it
        if not 0 < num_mask < n:
            raise ConfigError(f"mask.ratio={ratio} masks {num_mask} of {n} patches; need at least 1 and "
                              f"fewer than {n}")
        if not 1 <= mask_cfg.min_block <= num_mask:
            raise ConfigError(f"mask.min_block={mask_cfg.min_block} must be between 1 and the {num_mask} "
                              f"patches to mask on the {grid}x{grid} grid (BEiT: 16 at 14x14; scale it with the grid)")
        if not 0 < mask_cfg.min_aspect <= 1:
            raise ConfigError(f"mask.min_aspect={mask_cfg.min_aspect} is out of range; need 0 < min_aspect <= 1")
        return BlockMask(grid, ratio, mask_cfg.min_block, mask_cfg.min_aspect, mask_cfg.exact)
    raise ConfigError(f"mask.kind={kind!r} is not valid; choose one of: {', '.join(MASK_KINDS)}")
