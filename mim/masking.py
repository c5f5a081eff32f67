"""Mask generators. One interface: `gen(generator) -> BoolTensor[N]` for one sample on the patch grid
(True = masked). They run per sample in the data loader, seeded per (run seed, epoch, sample index), so a
step never waits on them and masks do not depend on the number of processes or loader workers.

- RandomMask (MAE): a uniformly random subset of patches.
- GridMask (SimMIM): a random subset of coarse mask units of `mask.patch_px` pixels, upsampled to patches.
- BlockMask (BEiT, MaskFeat): random rectangles of patches until the target count is reached.
- InverseBlockMask (data2vec 2.0): random squares of *visible* patches, trimmed to an exact count; several
  masks per image (`mask.clones`) give BoolTensor[clones, N].
- MultiBlockMask (I-JEPA): target blocks and a context block with the targets cut out: BoolTensor[1 + targets, N],
  row 0 the patches hidden from the context encoder, rows 1.. the target blocks.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from .config import ConfigError, check_range
from .sections import MASK_KINDS, MaskConfig  # noqa: F401  (re-exported)

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


class InverseBlockMask:
    """data2vec 2.0's inverse block mask (fairseq data_utils.compute_block_mask_2d, inverse_mask=True).

    Visible share keep = 1 - ratio. Draw int(N * (keep + prob_adjust) / block_len**2) centers uniformly with
    replacement, make each a block_len x block_len square of visible patches (offsets -block_len//2 onward,
    clamped at the border), then hide or reveal random patches until exactly int(N * keep) are visible
    (require_same_masks). Returns BoolTensor[N] (True = masked), or [clones, N] independent masks."""

    def __init__(self, grid: int, ratio: float, block_len: int = 3, prob_adjust: float = 0.07, clones: int = 1):
        self.grid, self.block_len, self.clones = grid, block_len, clones
        self.num_patches = grid * grid
        keep = 1 - ratio
        self.num_centers = int(self.num_patches * (keep + prob_adjust) / block_len ** 2)
        self.num_keep = int(self.num_patches * keep)

    def one(self, generator: torch.Generator | None = None) -> torch.Tensor:
        g, n = self.grid, self.num_patches
        centers = torch.randint(0, n, (self.num_centers,), generator=generator)
        offsets = torch.arange(self.block_len) - self.block_len // 2
        rows = (centers.div(g, rounding_mode="floor")[:, None] + offsets).clamp(0, g - 1)
        cols = (centers.remainder(g)[:, None] + offsets).clamp(0, g - 1)
        keep = torch.zeros(g, g, dtype=torch.bool)
        keep[rows[:, :, None], cols[:, None, :]] = True
        keep = keep.flatten()
        extra = int(keep.sum()) - self.num_keep
        if extra:  # hide random visible patches, or reveal random hidden ones
            pool = (keep if extra > 0 else ~keep).nonzero().squeeze(1)
            keep[pool[torch.randperm(len(pool), generator=generator)[: abs(extra)]]] = extra < 0
        return ~keep

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.clones == 1:
            return self.one(generator)
        return torch.stack([self.one(generator) for _ in range(self.clones)])


class MultiBlockMask:
    """I-JEPA's multi-block mask (facebookresearch/ijepa src/masks/multiblock.py), per sample.

    A block size: one uniform r gives both the scale s = lo + r (hi - lo) and the aspect a (the official code
    draws one number for both), max_keep = int(N * s), h = round(sqrt(max_keep * a)), w = round(sqrt(max_keep
    / a)), each cut below the grid side; the top-left corner is uniform in [0, side - h) (torch.randint's
    exclusive bound, as the official code). The `num_targets` target blocks share one size; each must hold more
    than `min_keep` patches. The context block (aspect 1) is cut by the target blocks' complements; after 20
    failed tries the constraint of the last target block is dropped, and so on. The official collator draws the
    two sizes once per batch; here each sample draws its own (masks are made per sample in the loader), and the
    method trims every sample to the batch's smallest count as the collator does.

    Returns BoolTensor[1 + num_targets, N]: row 0 True where a patch is hidden from the context encoder, row
    1 + k True inside target block k."""

    timeout = 20

    def __init__(self, grid: int, num_targets: int = 4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                 context_scale=(0.85, 1.0), min_keep: int = 10):
        self.grid, self.num_targets, self.min_keep = grid, num_targets, min_keep
        self.num_patches = grid * grid
        self.target_scale, self.target_aspect = tuple(target_scale), tuple(target_aspect)
        self.context_scale = tuple(context_scale)

    def block_size(self, r: float, scale: tuple[float, float], aspect: tuple[float, float]) -> tuple[int, int]:
        """(h, w) of a block for the uniform draw r in [0, 1)."""
        max_keep = int(self.num_patches * (scale[0] + r * (scale[1] - scale[0])))
        a = aspect[0] + r * (aspect[1] - aspect[0])
        h, w = round(math.sqrt(max_keep * a)), round(math.sqrt(max_keep / a))
        return min(h, self.grid - 1), min(w, self.grid - 1)

    def _place(self, h: int, w: int, rng: random.Random, regions: list[np.ndarray] = ()) -> np.ndarray:
        """A block at a random corner, cut by `regions` (all of them, then fewer after each timeout)."""
        tries, timeout = 0, self.timeout
        while True:
            top, left = rng.randrange(self.grid - h), rng.randrange(self.grid - w)
            block = np.zeros((self.grid, self.grid), dtype=bool)
            block[top:top + h, left:left + w] = True
            for region in regions[: max(len(regions) - tries, 0)]:
                block &= region
            if block.sum() > self.min_keep:
                return block
            timeout -= 1
            if timeout == 0:
                tries, timeout = tries + 1, self.timeout

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        rng = _python_rng(generator)
        th, tw = self.block_size(rng.random(), self.target_scale, self.target_aspect)
        ch, cw = self.block_size(rng.random(), self.context_scale, (1.0, 1.0))
        targets = [self._place(th, tw, rng) for _ in range(self.num_targets)]
        context = self._place(ch, cw, rng, [~t for t in targets])
        return torch.from_numpy(np.stack([~context, *targets]).reshape(1 + self.num_targets, -1))


def _python_rng(generator: torch.Generator | None) -> random.Random:
    """A Python RNG seeded from the torch generator: block masks take many scalar draws, which cost ~0.1 us
    each from `random` against ~5 us from torch."""
    return random.Random(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))


def prefer_kept(mask: torch.Tensor, keep: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`mask.prefer_kept`: mask [B, N] (True = masked) moved onto the patches a tokenizer keeps, keep [B, N]. Per
    sample the masked count stays; while there are masked dropped patches and unmasked kept ones, a random one of
    each swaps. A mask already on kept patches, or a sample whose kept patches are all masked, is unchanged.
    It runs where the keep mask is known, after the loader (the tokenizer runs on the model's device), with
    `generator` (default: the global one of mask's device, which checkpoints store)."""
    free, spare = mask & ~keep, ~mask & keep  # masked but dropped; kept but visible
    swaps = torch.minimum(free.sum(1), spare.sum(1)).unsqueeze(1)
    noise = torch.rand(2, *mask.shape, generator=generator, device=mask.device)

    def first(pool: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The `swaps` patches of pool with the smallest noise."""
        rank = torch.where(pool, r, 2.0).argsort(1).argsort(1)
        return pool & (rank < swaps)

    return (mask & ~first(free, noise[0])) | first(spare, noise[1])


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
    if kind == "inverse_block":
        return _inverse_block(mask_cfg, grid)
    if kind == "multiblock":
        return _multiblock(mask_cfg, grid)
    raise ConfigError(f"mask.kind={kind!r} is not valid; choose one of: {', '.join(MASK_KINDS)}")


def _inverse_block(mask_cfg, grid: int) -> InverseBlockMask:
    n = grid * grid
    if not 1 <= mask_cfg.block_len <= grid:
        raise ConfigError(f"mask.block_len={mask_cfg.block_len} must be between 1 and the grid side {grid} "
                          f"(data2vec 2.0: 3 at 14x14; scale it with the grid)")
    check_range("mask.prob_adjust", mask_cfg.prob_adjust, 0)
    check_range("mask.clones", mask_cfg.clones, 1)
    gen = InverseBlockMask(grid, mask_cfg.ratio, mask_cfg.block_len, mask_cfg.prob_adjust, mask_cfg.clones)
    if not 0 < gen.num_keep < n:
        raise ConfigError(f"mask.ratio={mask_cfg.ratio} leaves {gen.num_keep} of {n} patches visible; need at least "
                          f"1 and fewer than {n}")
    return gen


def _multiblock(mask_cfg, grid: int) -> MultiBlockMask:
    m = mask_cfg
    check_range("mask.num_targets", m.num_targets, 1)
    check_range("mask.min_keep", m.min_keep, 0)
    for key, (lo, hi) in (("mask.target_scale", m.target_scale), ("mask.context_scale", m.context_scale)):
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{key}={list((lo, hi))} must satisfy 0 < min <= max <= 1")
    if not 0 < m.target_aspect[0] <= m.target_aspect[1]:
        raise ConfigError(f"mask.target_aspect={list(m.target_aspect)} must satisfy 0 < min <= max")
    gen = MultiBlockMask(grid, m.num_targets, m.target_scale, m.target_aspect, m.context_scale, m.min_keep)
    # every block size the draws can give must hold more than min_keep patches, or placing it never ends
    for key, scale, aspect in (("mask.target_scale", m.target_scale, m.target_aspect),
                               ("mask.context_scale", m.context_scale, (1.0, 1.0))):
        smallest = min(h * w for h, w in (gen.block_size(r / 4096, scale, aspect) for r in range(4096)))
        if smallest <= m.min_keep:
            raise ConfigError(f"{key}={list(scale)} gives blocks of {smallest} patches on the {grid}x{grid} grid, "
                              f"not more than mask.min_keep={m.min_keep}; raise the scale or lower mask.min_keep "
                              f"(I-JEPA: 10 at 16x16)")
    return gen
