"""Batched HOG against scikit-image (central differences) and a plain numpy reference (Sobel), in both of its
implementations: the numba kernel the CPU runs and the tensor ops a GPU runs (here on the CPU)."""
import functools
import math
import multiprocessing

import numpy as np
import pytest
import torch

from mimkit.data import synthetic
from mimkit.hog import HOG, cells_to_patches, gaussian_window, hog_glyphs, patches_to_cells

skfeature = pytest.importorskip("skimage.feature")


@pytest.fixture(params=[True, False], ids=["cpu_kernel", "tensor_ops"])
def make_hog(request):
    return functools.partial(HOG, cpu_kernel=request.param)


def images(n=3, size=32, seed=0):
    """Random noise plus structured stripes (so cells have real dominant orientations), float64."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 3, size, size, generator=g, dtype=torch.float64)
    stripes = synthetic("train", size=n, img_size=size, seed=seed).images.double()
    return torch.cat([noise, stripes * 2 - 1])


@pytest.mark.parametrize("cell", [8, 4, 2])
def test_central_difference_matches_skimage_per_channel(make_hog, cell):
    """Central differences + one-cell blocks + L2 = skimage.feature.hog on each channel. Deliberate
    differences, all cancelled here: skimage averages over a cell (we sum: same after L2) and adds eps^2 inside
    the square root (we clamp the norm at 1e-12); bin edges are identical ([k, k+1) * 20 deg)."""
    x = images()
    ours = make_hog(9, cell, "central")(x)  # [B, C, 9, h, w]
    for b in range(len(x)):
        for c in range(3):
            ref = skfeature.hog(x[b, c].numpy(), orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(1, 1),
                                block_norm="L2", feature_vector=False)[:, :, 0, 0]  # [h, w, 9]
            np.testing.assert_allclose(ours[b, c].permute(1, 2, 0).numpy(), ref, atol=1e-6)


def numpy_hog(img, cell, kernel, nbins=9, weight=None):
    """Straightforward per-pixel HOG of one channel: reflect padding, cross-correlation, loops."""
    H, W = img.shape
    p = np.pad(img, 1, mode="reflect")
    k = np.array(kernel, dtype=np.float64)
    hist = np.zeros((H // cell, W // cell, nbins))
    for r in range(H):
        for c in range(W):
            win = p[r:r + 3, c:c + 3]
            gx, gy = (win * k).sum(), (win * k.T).sum()
            mag = math.hypot(gx, gy) * (1.0 if weight is None else weight[r, c])
            angle = math.degrees(math.atan2(gy, gx)) % 180
            hist[r // cell, c // cell, min(int(angle // (180 / nbins)), nbins - 1)] += mag
    norm = np.sqrt((hist ** 2).sum(-1, keepdims=True))
    return hist / np.maximum(norm, 1e-12)


SOBEL = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]


@pytest.mark.parametrize("window", [0, 16])
def test_sobel_matches_numpy_reference(make_hog, window):
    # values on a 1/64 grid make every gradient exact in any summation order, so both sides bin the same
    # angles (pixels whose exact gradient lies on a bin edge, e.g. at reflect-padded borders, included)
    x = (images(n=1, size=32, seed=1) * 64).round() / 64
    ours = make_hog(9, 8, "sobel", window=window)(x)
    weight = np.tile(gaussian_window(16, 8).double().numpy(), (2, 2)) if window else None
    for b in range(len(x)):
        for c in range(3):
            ref = numpy_hog(x[b, c].numpy(), 8, SOBEL, weight=weight)
            np.testing.assert_allclose(ours[b, c].permute(1, 2, 0).numpy(), ref, atol=1e-9)


def test_sobel_differs_from_central_and_window_matters(make_hog):
    x = images(n=1, size=16)
    sobel, central = make_hog(9, 8, "sobel")(x), make_hog(9, 8, "central")(x)
    assert (sobel - central).abs().max() > 1e-2
    assert (make_hog(9, 8, "sobel", window=16)(x) - sobel).abs().max() > 1e-3


def test_known_orientations(make_hog):
    """A vertical edge (gradient along columns) falls in bin 0, a horizontal one (gradient along rows, 90 deg)
    in bin 4; each non-empty cell histogram has unit L2 norm, flat cells are zero."""
    x = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    x[..., :, 8:] = 1.0  # vertical edge at column 8
    h = make_hog(9, 8, "sobel")(x)
    assert torch.allclose(h[0, :, 0], torch.ones(3, 2, 2, dtype=torch.float64))
    y = x.transpose(-1, -2).contiguous()
    assert torch.allclose(make_hog(9, 8, "sobel")(y)[0, :, 4], torch.ones(3, 2, 2, dtype=torch.float64))
    flat = make_hog(9, 8)(torch.ones(1, 3, 16, 16))
    assert flat.abs().max() == 0


@pytest.mark.parametrize("gradient", ["sobel", "central"])
def test_zero_row_gradient_is_exact(make_hog, gradient):
    """Columns of constant (real-valued) pixels have d/drow = 0 exactly, so every gradient is at 0 or 180 deg:
    all the mass goes to bin 0. (A one-pass 3x3 Sobel leaves +-1e-16 residues that scatter it into bin 8.)"""
    x = torch.randn(2, 3, 1, 32, generator=torch.Generator().manual_seed(0)).expand(2, 3, 32, 32).contiguous()
    h = make_hog(9, 8, gradient).histograms(x)
    assert h[:, :, 1:].abs().max() == 0 and h[:, :, 0].sum() > 0


def test_per_patch_layout_108_at_patch16():
    x = images(n=1, size=32)[:2].float()
    x = torch.nn.functional.interpolate(x, size=224)
    hist = HOG(9, 8)(x)  # [2, 3, 9, 28, 28]
    t = cells_to_patches(hist, 2)
    assert t.shape == (2, 196, 108)
    # patch (row 3, col 5), value (channel 2, bin 7, cell row 1, cell col 0), SlowFast's order
    assert t[1, 3 * 14 + 5, 2 * 36 + 7 * 4 + 1 * 2 + 0] == hist[1, 2, 7, 3 * 2 + 1, 5 * 2 + 0]
    assert torch.equal(patches_to_cells(t, 3, 9, 2), hist)


def test_batched_equals_per_image_and_autocast_keeps_float32(make_hog):
    x = images().float()
    hog = make_hog(9, 4, "sobel")
    batched = hog(x)
    assert torch.allclose(batched, torch.cat([hog(x[i:i + 1]) for i in range(len(x))]), atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = hog(x)
    assert auto.dtype == torch.float32 and torch.allclose(auto, batched, atol=1e-6)
    assert hog.state_dict() == {}  # fixed kernels are not checkpointed


def test_cpu_chunks_change_nothing(monkeypatch):
    """On CPU the tensor path takes the maps in chunks of CPU_CHUNK_VALUES (pixels + histogram slots): chunks of 5
    maps (not a whole number of RGB images) give the same histograms as one pass over the batch."""
    import mimkit.hog as hog_module
    x = images().float()
    h, w = x.shape[-2:]
    whole = HOG(9, 4, "central", cpu_kernel=False)(x)
    monkeypatch.setattr(hog_module, "CPU_CHUNK_VALUES", 5 * (h * w + 2 * 9 * (h // 4) * (w // 4)))
    chunks, slot_histograms = [], HOG.slot_histograms
    monkeypatch.setattr(HOG, "slot_histograms", lambda self, maps, *a: chunks.append(len(maps)) or
                        slot_histograms(self, maps, *a))
    assert torch.equal(HOG(9, 4, "central", cpu_kernel=False)(x), whole)
    assert chunks[0] == 5 and sum(chunks) == len(x) * 3 and len(chunks) > 1


def test_glyphs_draw_lines_along_edges():
    hist = torch.zeros(1, 3, 9, 1, 1)
    hist[0, :, 0, 0, 0] = 1.0  # gradient ~10 deg (along columns): the edge, and the line, is near vertical
    img = hog_glyphs(hist, 9)[0, 0]
    assert img.shape == (9, 9) and 0 <= img.min() and img.max() <= 1
    assert img[:, 4].sum() > 3 * img[4, :].sum() - 1e-6 and img[:, 4].sum() > 5


def test_slot_indices_exact_on_huge_images(make_hog):
    """Past 2^24 histogram slots per map float32 can no longer hold every slot index (here 1-px cells on a 1096-px
    map; a vertical gradient, 90 deg, lands in the highest slot used): the last cells must still get their own
    gradients. A pattern in the bottom-right corner gives the same histograms as that corner cut out on its own
    (whose border is flat, so padding changes nothing)."""
    x = torch.zeros(1, 1, 1096, 1096)
    x[..., -8:-4, -10:-4] = 1.0  # rows of pure d/drow at its top and bottom edges, plus corners and sides
    whole, corner = make_hog(9, 1, "central")(x), make_hog(9, 1, "central")(x[..., -32:, -32:].contiguous())
    assert corner.abs().sum() > 0 and torch.equal(whole[..., -32:, -32:], corner)


def test_integer_too_small_or_indivisible_images_are_refused(make_hog):
    with pytest.raises(ValueError, match="not divisible"):
        make_hog(9, 8)(torch.zeros(1, 3, 12, 16))
    with pytest.raises(ValueError, match="too small"):
        make_hog(9, 1, "sobel")(torch.zeros(1, 3, 1, 8))
    with pytest.raises(TypeError, match="float images"):
        make_hog(9, 8)(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_cpu_kernel_matches_tensor_ops():
    """The two implementations on photo-like float32 images (smooth, upsampled, with a window): they may bin a
    pixel differently only where its angle is within rounding of a bin edge; in float64, equal to 1e-12."""
    x = torch.nn.functional.interpolate(images(n=2, size=32), size=64, mode="bicubic", align_corners=False)
    for gradient in ("sobel", "central"):
        kernel, tensor = (HOG(9, 4, gradient, window=16, cpu_kernel=k) for k in (True, False))
        diff = (kernel(x.float()) - tensor(x.float())).abs()
        assert diff.max() < 1e-2 and (diff < 1e-6).float().mean() > 0.999
        assert (kernel(x) - tensor(x)).abs().max() < 1e-12


def _hog_in_child(queue):
    torch.set_num_threads(1)  # as a DataLoader worker: torch's own OpenMP ops hang in a forked child otherwise
    queue.put(HOG(9, 4, "sobel")(images()).numpy())  # plain bytes: a tensor would travel as a shared fd


def test_cpu_kernel_serial_and_in_forked_children():
    """One torch thread runs the serial kernel, as a forked child (a DataLoader worker) does: GNU OpenMP's pool does
    not survive a fork (numba aborts the child if it is used there). Both give exactly the parallel kernel's result."""
    hog = HOG(9, 4, "sobel")
    parallel = hog(images())  # the parent starts the parallel kernel's thread pool before forking
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(hog(images()), parallel)
    finally:
        torch.set_num_threads(threads)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_hog_in_child, args=(queue,))
    child.start()
    try:
        assert np.array_equal(queue.get(timeout=120), parallel.numpy())
        child.join(timeout=30)
        assert child.exitcode == 0
    finally:
        child.kill()


def test_cpu_kernel_under_torch_compile():
    """A compiled model (`compile=true`) with the HOG target inside: dynamo cannot trace numba's dispatcher, so the
    kernel runs outside the graph, with the same result (to rounding)."""
    hog, x = HOG(9, 4, "sobel"), images().float()
    compiled = torch.compile(lambda imgs: hog(imgs) * 2)
    assert torch.allclose(compiled(x), hog(x) * 2, atol=1e-6)  # inductor fuses the normalization: rounding
