"""Batched HOG (mimkit.hog, one call for the whole batch) vs scikit-image's per-image `hog` (one call per image and
channel) on the same CIFAR-10 training images, in one run: speed ratio (goal >= 50x) and agreement.

Both sides compute the same thing: central differences, 9 unsigned bins, one-cell L2 blocks, per RGB channel of
the normalized image; on 256 images at 32 px with 8-px cells (skimage's default size) and 2-px cells (mimkit's
CIFAR-10 MaskFeat preset: patch 4, 2x2 cells), and on 16 images resized to 224 px with 8-px cells (MaskFeat's
ImageNet setting; resized in PIL as uint8, as a training pipeline's RandomResizedCrop makes them). Sobel mode
(MaskFeat's default) is timed too, with nothing to compare it with, and so is mimkit's tensor-op path (what a GPU
runs, `cpu_kernel=False`) against the numba kernel the CPU runs by default."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mimkit.data import CIFAR10_STATS
from mimkit.hog import HOG

from .common import SHARED_DATA, side_by_side, speedup, spread, write_result

CIFAR10 = SHARED_DATA / "cifar10"


def load_images(n: int = 256, size: int = 32) -> torch.Tensor:
    """n training images spread over the classes, resized (bicubic, uint8) to `size` if it is not 32, normalized
    with CIFAR-10 statistics, [n, 3, size, size]."""
    files = sorted((CIFAR10 / "train").glob("*/*"))
    if len(files) < n:
        raise FileNotFoundError(f"need {n} images under {CIFAR10 / 'train'}, found {len(files)}")
    picked = files[:: len(files) // n][:n]
    imgs = [Image.open(f).convert("RGB") for f in picked]
    imgs = [im if im.size == (size, size) else im.resize((size, size), Image.BICUBIC) for im in imgs]
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in imgs])
    x = x.permute(0, 3, 1, 2) / 255.0
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR10_STATS)
    return ((x - mean) / std).contiguous()  # as a collated batch


def skimage_hog(x: np.ndarray, cell: int) -> np.ndarray:
    """Per image, per channel skimage hog -> [n, 3, 9, h, w] (the same layout as mimkit.hog.HOG)."""
    from skimage.feature import hog
    out = [[hog(img[c], orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(1, 1), block_norm="L2",
                feature_vector=False)[:, :, 0, 0] for c in range(img.shape[0])] for img in x]
    return np.asarray(out).transpose(0, 1, 4, 2, 3)


def one_thread(fn):
    """fn on one thread (skimage runs on one core: the per-core ratio, robust to other load on the machine)."""
    def call():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)
    return call


def compare(cell: int, x: torch.Tensor, repeats: int, calls: int = 10) -> dict:
    x64 = x.double().numpy()
    central, sobel = HOG(9, cell, "central"), HOG(9, cell, "sobel")
    tensor_ops = HOG(9, cell, "central", cpu_kernel=False)
    batch = lambda hog: lambda: [hog(x) for _ in range(calls)]  # noqa: E731 (a few ms alone is too short to time)
    # Interleaved rounds. Two estimates: the fastest round of each contender (a call's own cost, if the machine
    # was ever quiet during the run), and the ratio within each round (both sides under the same load; its
    # median is what the other entries report). The machine's speed swings 2x over seconds, so they can differ.
    timed = side_by_side({"batched": batch(central), "sobel": batch(sobel), "one_thread": one_thread(batch(central)),
                          "tensor_ops": batch(tensor_ops), "skimage": lambda: skimage_hog(x64, cell)}, repeats)
    t_batched, t_sobel, t_one, t_tensor = (timed[k]["min_s"] / calls for k in ("batched", "sobel", "one_thread",
                                                                            "tensor_ops"))
    t_skimage = timed["skimage"]["min_s"]
    rounds = spread([sk / (b / calls) for b, sk in zip(timed["batched"]["times_s"], timed["skimage"]["times_s"])])
    kernel_rounds = speedup(timed, "batched", "tensor_ops")
    ref = skimage_hog(x64, cell)
    diff32 = np.abs(central(x).double().numpy() - ref)  # float32 batched vs float64 skimage
    diff64 = np.abs(central(x.double()).numpy() - ref)
    return {"image_px": x.shape[-1], "images": len(x), "cell_px": cell, "values": int(ref.size),
            "batched_s": t_batched, "batched_sobel_s": t_sobel, "batched_1thread_s": t_one, "skimage_s": t_skimage,
            "tensor_ops_s": t_tensor, "kernel_vs_tensor_ops_rounds": kernel_rounds, "speedup": t_skimage / t_batched,
            "speedup_rounds": rounds, "speedup_1thread": t_skimage / t_one,
            "max_abs_diff_float32": float(diff32.max()), "frac_within_1e-4_float32": float((diff32 < 1e-4).mean()),
            "max_abs_diff_float64": float(diff64.max())}


def run(n: int = 256, repeats: int = 9) -> dict:
    x = load_images(n)
    rows = [compare(8, x, repeats), compare(2, x, repeats), compare(8, load_images(16, 224), repeats)]
    for r in rows:
        print(f"hog {r['images']} CIFAR-10 images at {r['image_px']} px, {r['cell_px']}-px cells: "
              f"batched {r['batched_s'] * 1000:.1f} ms "
              f"(sobel {r['batched_sobel_s'] * 1000:.1f} ms; 1 thread {r['batched_1thread_s'] * 1000:.1f} ms; "
              f"tensor ops {r['tensor_ops_s'] * 1000:.1f} ms, kernel "
              f"{r['kernel_vs_tensor_ops_rounds']['median']:.2f}x faster per round) vs "
              f"skimage {r['skimage_s'] * 1000:.0f} ms (a call per image and channel) = {r['speedup']:.0f}x "
              f"({r['speedup_1thread']:.0f}x on one thread; per round {r['speedup_rounds']['median']:.0f}x "
              f"[{r['speedup_rounds']['min']:.0f}-{r['speedup_rounds']['max']:.0f}]); "
              f"max |diff| {r['max_abs_diff_float32']:.1e} (float32), "
              f"{r['max_abs_diff_float64']:.1e} (float64), {100 * r['frac_within_1e-4_float32']:.3f}% within 1e-4")
    result = {"goal_speedup": 50, "speedup_min": min(r["speedup"] for r in rows),
              "speedup_rounds_median_min": min(r["speedup_rounds"]["median"] for r in rows),
              "speedup_1thread_min": min(r["speedup_1thread"] for r in rows), "rows": rows}
    path = write_result("hog", result)
    print(f"written to {path}")
    return result
