"""SimMIM grid masks and BEiT block-wise masks against their reference definitions."""
import math
import random
from types import SimpleNamespace

import pytest
import torch

from mimkit.config import ConfigError
from mimkit.masking import MaskConfig
from mimkit.masking import BlockMask, GridMask, RandomMask, build_mask_generator


def draws(gen, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([gen(g) for _ in range(n)])


# ---------------------------------------------------------------------------------------------
# Grid (SimMIM)

@pytest.mark.parametrize("img, patch, px, ratio", [(224, 16, 32, 0.6), (32, 4, 8, 0.6), (8, 2, 4, 0.6), (192, 4, 32, 0.5)])
def test_grid_mask_exact_count_and_constant_units(img, patch, px, ratio):
    grid, unit = img // patch, px // patch
    gen = build_mask_generator(MaskConfig(kind="grid", ratio=ratio, patch_px=px), grid, patch)
    assert isinstance(gen, GridMask)
    masks = draws(gen, 300)
    units = img // px
    mask_units = math.ceil(ratio * units ** 2)  # SimMIM: int(np.ceil(token_count * mask_ratio))
    assert (masks.sum(1) == mask_units * unit ** 2).all()
    # constant within each unit x unit block of patches
    blocks = masks.view(-1, units, unit, units, unit)
    assert (blocks == blocks[:, :, :1, :, :1]).all()
    # each unit is masked with probability mask_units / units^2
    freq = blocks[:, :, 0, :, 0].float().mean(0)
    assert (freq - mask_units / units ** 2).abs().max() < 0.15


def test_grid_mask_matches_upsampled_coarse_draw():
    gen = GridMask(8, 0.6, 2)
    m = gen(torch.Generator().manual_seed(3)).view(8, 8)
    coarse = m[::2, ::2]
    assert torch.equal(m, coarse.repeat_interleave(2, 0).repeat_interleave(2, 1))


@pytest.mark.parametrize("px, patch, img, match", [
    (2, 4, 32, "multiple of model.patch_size"), (6, 4, 32, "multiple of model.patch_size"),
    (12, 4, 48 + 4, "does not divide"), (32, 4, 32, "mask unit"),
])
def test_grid_mask_config_errors(px, patch, img, match):
    with pytest.raises(ConfigError, match=match):
        build_mask_generator(MaskConfig(kind="grid", ratio=0.6, patch_px=px), img // patch, patch)


# ---------------------------------------------------------------------------------------------
# Block-wise (BEiT)

def beit_reference(grid, num_mask, min_block, min_aspect, rng):
    """microsoft/unilm beit/masking_generator.py transcribed with Python's `random` (no exact fill):
    returns the mask and the accepted blocks (h, w)."""
    mask = [[0] * grid for _ in range(grid)]
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count, blocks = 0, []
    while count < num_mask:
        max_new, delta = num_mask - count, 0
        for _ in range(10):
            area = rng.uniform(min_block, max_new)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < grid and h < grid:
                top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
                masked = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - masked <= max_new:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            delta += 1 - mask[i][j]
                            mask[i][j] = 1
                if delta > 0:
                    blocks.append((h, w))
                    break
        if delta == 0:
            break
        count += delta
    return count, blocks


@pytest.mark.parametrize("grid, ratio, min_block", [(14, 0.4, 16), (8, 0.4, 4), (4, 0.4, 2), (14, 0.75, 16)])
def test_block_mask_exact_count(grid, ratio, min_block):
    gen = BlockMask(grid, ratio, min_block)
    masks = draws(gen, 200)
    assert (masks.sum(1) == round(ratio * grid * grid)).all()
    assert masks.float().mean(0).min() > 0  # every position can be masked


def aspect_reachable(h, w, lo, hi):
    """h = round(sqrt(A a)), w = round(sqrt(A / a)) for some aspect a in [lo, hi] only if the interval of
    aspects consistent with the rounding, [(h - .5) / (w + .5), (h + .5) / (w - .5)], meets [lo, hi]."""
    return (h - 0.5) / (w + 0.5) <= hi and (h + 0.5) / max(w - 0.5, 1e-9) >= lo


@pytest.mark.parametrize("grid, min_block, min_aspect", [(14, 16, 0.3), (8, 4, 0.3), (14, 4, 0.5)])
def test_blocks_are_rectangles_in_aspect_range(grid, min_block, min_aspect):
    gen = BlockMask(grid, 0.4, min_block, min_aspect, exact=False)
    g = torch.Generator().manual_seed(1)
    target = round(0.4 * grid * grid)
    for _ in range(150):
        mask, blocks = gen.draw(g)
        union = torch.zeros(grid, grid, dtype=torch.bool)
        for top, left, h, w in blocks:
            assert 0 < h < grid and 0 < w < grid and top + h <= grid and left + w <= grid
            assert aspect_reachable(h, w, min_aspect, 1 / min_aspect), (h, w)
            before = int(union.sum())
            union[top:top + h, left:left + w] = True
            assert int(union.sum()) > before  # each accepted block adds new patches
        assert torch.equal(union, mask)  # the mask is exactly the union of the rectangles
        assert int(mask.sum()) <= target  # blocks never overshoot: exactness comes from fill/trim only


def test_block_mask_statistics_match_beit_reference():
    """Over many draws, the number of blocks, their shapes and the block-phase coverage follow the official
    algorithm (run here with Python's RNG) within sampling error."""
    grid, ratio, min_block, n = 14, 0.4, 16, 600
    num_mask = round(ratio * grid * grid)
    gen = BlockMask(grid, ratio, min_block, exact=False)
    g, rng = torch.Generator().manual_seed(0), random.Random(0)
    ours = [gen.draw(g) for _ in range(n)]
    ref = [beit_reference(grid, num_mask, min_block, 0.3, rng) for _ in range(n)]

    def stats(counts, shapes):
        log_ar = [math.log(h / w) for h, w in shapes]
        return {"blocks": len(shapes) / n, "coverage": sum(counts) / n / num_mask,
                "area": sum(h * w for h, w in shapes) / len(shapes),
                "log_aspect_mean": sum(log_ar) / len(log_ar),
                "log_aspect_abs": sum(abs(a) for a in log_ar) / len(log_ar)}

    a = stats([int(m.sum()) for m, _ in ours], [(h, w) for _, b in ours for _, _, h, w in b])
    b = stats([c for c, _ in ref], [s for _, shapes in ref for s in shapes])
    assert a["blocks"] == pytest.approx(b["blocks"], rel=0.1)
    assert a["coverage"] == pytest.approx(b["coverage"], abs=0.02)
    assert a["area"] == pytest.approx(b["area"], rel=0.1)
    assert a["log_aspect_abs"] == pytest.approx(b["log_aspect_abs"], rel=0.1)
    assert abs(a["log_aspect_mean"]) < 0.1 and abs(b["log_aspect_mean"]) < 0.1  # log-uniform: symmetric
    # and the exact option tops up / trims to the target count with random patches
    exact = draws(BlockMask(grid, ratio, min_block), 50)
    assert (exact.sum(1) == num_mask).all()


def test_masks_are_seeded():
    for gen in (BlockMask(14, 0.4), GridMask(14, 0.6, 2), RandomMask(14, 0.75)):
        a, b = gen(torch.Generator().manual_seed(5)), gen(torch.Generator().manual_seed(5))
        c = gen(torch.Generator().manual_seed(6))
        assert a.dtype == torch.bool and a.shape == (196,)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_build_mask_generator_dispatch_and_errors():
    assert isinstance(build_mask_generator(MaskConfig(kind="random"), 4, 2), RandomMask)
    gen = build_mask_generator(MaskConfig(kind="block", ratio=0.4, min_block=2, min_aspect=0.5, exact=False), 4, 2)
    assert isinstance(gen, BlockMask) and gen.min_block == 2 and not gen.exact and gen.num_mask == 6
    with pytest.raises(ConfigError, match="mask.min_block"):
        build_mask_generator(MaskConfig(kind="block", ratio=0.4, min_block=16), 4, 2)  # 16 > 6 patches to mask
    with pytest.raises(ConfigError, match="mask.kind"):
        build_mask_generator(SimpleNamespace(kind="blocks", ratio=0.4), 4, 2)
