"""Masks of the latent-target methods against their official definitions: data2vec 2.0's inverse block mask
(fairseq compute_block_mask_2d with inverse_mask) and I-JEPA's multi-block mask (ijepa src/masks/multiblock.py)."""
import math

import numpy as np
import pytest
import torch

from mimkit.config import ConfigError
from mimkit.masking import InverseBlockMask, MaskConfig, MultiBlockMask, RandomMask, build_mask_generator


def draws(gen, n, seed=0):
    return torch.stack([gen(torch.Generator().manual_seed(seed + i)) for i in range(n)])


def inverse_block_reference(grid, ratio, block_len, adjust, g):
    """compute_block_mask_2d for one sample, written plainly with the same draws."""
    n, keep_prob = grid * grid, 1 - ratio
    centers = torch.randint(0, n, (int(n * (keep_prob + adjust) / block_len ** 2),), generator=g)
    keep = torch.zeros(grid, grid, dtype=torch.bool)
    for c in centers.tolist():
        for i in range(block_len):
            for j in range(block_len):
                r = min(max(c // grid + i - block_len // 2, 0), grid - 1)
                s = min(max(c % grid + j - block_len // 2, 0), grid - 1)
                keep[r, s] = True
    keep = keep.flatten()
    target = int(n * keep_prob)
    extra = int(keep.sum()) - target
    if extra:
        pool = torch.nonzero(keep if extra > 0 else ~keep).squeeze(1)
        keep[pool[torch.randperm(len(pool), generator=g)[:abs(extra)]]] = extra < 0
    return ~keep


@pytest.mark.parametrize("grid,block_len", [(14, 3), (8, 2), (5, 4)])
def test_inverse_block_equals_the_plain_reference(grid, block_len):
    gen = InverseBlockMask(grid, 0.8, block_len, 0.07)
    for seed in range(20):
        ref = inverse_block_reference(grid, 0.8, block_len, 0.07, torch.Generator().manual_seed(seed))
        assert torch.equal(gen(torch.Generator().manual_seed(seed)), ref)


def test_inverse_block_count_clones_and_clustering():
    gen = InverseBlockMask(14, 0.8, 3, 0.07, clones=16)
    masks = draws(gen, 40)
    assert masks.shape == (40, 16, 196)
    assert (masks.sum(-1) == 196 - int(196 * (1 - 0.8))).all()  # 39 visible patches in every mask: 157 masked
    assert not torch.equal(masks[:, 0], masks[:, 1])  # the clones are different masks
    assert torch.equal(masks, draws(gen, 40))  # seeded per sample

    def visible_neighbours(m):  # mean number of visible 4-neighbours of a visible patch
        v = (~m).view(-1, 14, 14).float()
        nb = torch.zeros_like(v)
        nb[:, 1:] += v[:, :-1]
        nb[:, :-1] += v[:, 1:]
        nb[:, :, 1:] += v[:, :, :-1]
        nb[:, :, :-1] += v[:, :, 1:]
        return float((nb * v).sum() / v.sum())
    # blocks of visible patches: far more visible neighbours than a uniformly random mask of the same ratio
    random = draws(RandomMask(14, 1 - 39 / 196), 640)
    assert visible_neighbours(masks.flatten(0, 1)) > 2.0 > 1.0 > visible_neighbours(random)


def test_inverse_block_single_mask_is_flat():
    assert InverseBlockMask(8, 0.8, 2)(torch.Generator().manual_seed(0)).shape == (64,)


def test_multiblock_block_size_by_hand():
    gen = MultiBlockMask(14)
    # r = 0: max_keep = int(196 * 0.15) = 29, aspect 0.75: h = round(sqrt(21.75)) = 5, w = round(sqrt(38.67)) = 6
    assert gen.block_size(0.0, (0.15, 0.2), (0.75, 1.5)) == (5, 6)
    # r -> 1: max_keep = int(196 * 0.2) = 39, aspect 1.5: h = round(sqrt(58.5)) = 8, w = round(sqrt(26)) = 5
    assert gen.block_size(0.9999999, (0.15, 0.2), (0.75, 1.5)) == (8, 5)
    # the context at scale 1: 14 x 14 is cut to 13 x 13 (sides stay below the grid's)
    assert gen.block_size(0.9999999, (0.85, 1.0), (1.0, 1.0)) == (13, 13)


def rectangle(block):
    """(top, left, h, w) when `block` [g, g] is exactly one filled rectangle, else None."""
    rows, cols = np.nonzero(block)
    top, left, h, w = rows.min(), cols.min(), np.ptp(rows) + 1, np.ptp(cols) + 1
    return (top, left, h, w) if block.sum() == h * w else None


def test_multiblock_statistics_and_overlap_rules():
    grid, n = 16, 256  # ViT-H/14 at 224
    gen = MultiBlockMask(grid, 4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0), min_keep=10)
    masks = draws(gen, 400).numpy()
    assert masks.shape == (400, 5, n)
    scales, aspects, overlapping = [], [], 0
    for m in masks:
        context, targets = ~m[0].reshape(grid, grid), m[1:].reshape(4, grid, grid)
        rects = [rectangle(t) for t in targets]
        assert all(r is not None for r in rects)  # each target is one rectangle
        assert len({(h, w) for _, _, h, w in rects}) == 1  # of one size per sample
        _, _, h, w = rects[0]
        assert h * w > 10
        # the official corner draw excludes the last position: a block never reaches the last row or column
        assert all(top + h < grid and left + w < grid for top, left, h, w in rects)
        scales.append(h * w / n)
        aspects.append(h / w)
        assert context.sum() > 10  # min_keep
        overlapping += bool((context & targets.any(0)).any())
        box = rectangle(np.ones_like(context) & _bbox(context))
        assert box is not None and box[2] <= grid - 1 and box[3] <= grid - 1  # inside one square block
    scales, aspects = np.array(scales), np.array(aspects)
    # max_keep = int(N * s), s uniform in [0.15, 0.2]; rounding the sides moves the area a little
    assert 0.13 < scales.min() and scales.max() < 0.22
    assert abs(scales.mean() - 0.175) < 0.01
    assert 0.6 < aspects.min() < 0.9 and 1.3 < aspects.max() < 1.8 and abs(np.median(aspects) - 1.1) < 0.2
    # the context block avoids every target block unless the cut leaves <= min_keep patches (then relaxed)
    assert overlapping < 0.05 * len(masks)


def _bbox(mask):
    rows, cols = np.nonzero(mask)
    out = np.zeros_like(mask)
    out[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    return out


def test_multiblock_relaxes_the_cut_when_too_little_context_is_left():
    # 4 targets of ~45% each leave almost nothing of the context: the last targets' constraints are dropped
    gen = MultiBlockMask(8, 4, (0.4, 0.45), (1.0, 1.0), (0.85, 1.0), min_keep=6)
    relaxed = 0
    for m in draws(gen, 50).numpy():
        context, targets = ~m[0], m[1:]
        assert context.sum() > 6
        hit = [bool((context & t).any()) for t in targets]
        relaxed += any(hit)
        if hit[0]:  # constraints are dropped from the last target backwards: the first one goes last
            assert rectangle(context.reshape(8, 8)) is not None  # no cut left: the whole context block
    assert relaxed > 10


def test_multiblock_seeded_per_sample():
    gen = MultiBlockMask(14)
    assert np.array_equal(draws(gen, 10).numpy(), draws(gen, 10).numpy())
    assert not np.array_equal(draws(gen, 10).numpy(), draws(gen, 10, seed=100).numpy())


@pytest.mark.parametrize("overrides,words", [
    ({"kind": "multiblock", "min_keep": 40}, ["mask.target_scale", "mask.min_keep"]),
    ({"kind": "multiblock", "target_scale": (0.3, 0.2)}, ["mask.target_scale"]),
    ({"kind": "multiblock", "target_aspect": (0.0, 1.5)}, ["mask.target_aspect"]),
    ({"kind": "multiblock", "num_targets": 0}, ["mask.num_targets"]),
    ({"kind": "inverse_block", "block_len": 15}, ["mask.block_len"]),
    ({"kind": "inverse_block", "clones": 0}, ["mask.clones"]),
    ({"kind": "inverse_block", "ratio": 0.999}, ["mask.ratio"]),
])
def test_bad_settings_are_one_error(overrides, words):
    with pytest.raises(ConfigError) as e:
        build_mask_generator(MaskConfig(**overrides), 14, 16)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_scaled_small_grid_settings_build():
    """The CIFAR-10 (8x8) and digits settings of the shipped configs give valid generators."""
    assert build_mask_generator(MaskConfig(kind="inverse_block", ratio=0.8, block_len=2), 8, 4).num_keep == 12
    gen = build_mask_generator(MaskConfig(kind="multiblock", min_keep=4), 8, 4)
    assert math.prod(gen.block_size(0.0, gen.target_scale, gen.target_aspect)) > 4
