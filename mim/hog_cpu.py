"""HOG's histograms on the CPU in one numba kernel per map: gradients, magnitude, bin and histogram of each row
while it is in the L1 cache, instead of a dozen tensor passes over the batch (faster on CPU: benchmarks/hog.py, benchmarks/README.md). The same definition as the tensor path in `mimkit.hog`, which the GPU uses: tests/test_hog.py
checks both against scikit-image and a numpy reference.

The bin comes from comparisons, not from an arctangent: after folding the gradient into the upper half-plane
(angle in [0, pi)), the angle is past the k-th bin edge phi_k = k * pi / nbins exactly when the cross product
gy cos(phi_k) - gx sin(phi_k) is >= 0, and the bin is the number of edges passed. With the edges in the outer
loop these compile to vector instructions (inside the pixel loop they did not, and the kernel took 3x longer)."""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange, set_num_threads
from numba import config as numba_config


def _kernel(maps, weight, cos_edge, sin_edge, cell, sobel, out):
    """maps [N, H, W] -> out [N, nbins, (H / cell) * (W / cell)], cells row-major, with weight [H, W] on the
    magnitudes. Gradients as `HOG.gradients`: central differences, 0 on the border (reflect padding), and for
    Sobel the [1, 2, 1] filter across them, reflect-padded, summed in the tensor path's order."""
    N, H, W = maps.shape
    K = out.shape[1]
    cells_per_row = W // cell
    cell_col = np.empty(W, np.int64)
    for c in range(W):
        cell_col[c] = c // cell
    for n in prange(N):
        m, h = maps[n], out[n]
        h[:] = 0
        dx = np.zeros((3, W), maps.dtype)  # d/dcol of rows r-1, r, r+1 (Sobel) or of row r (central)
        dy = np.zeros(W + 2, maps.dtype)  # d/drow of row r, one reflected column each side
        gx, gy, mag = np.empty(W, maps.dtype), np.empty(W, maps.dtype), np.empty(W, maps.dtype)
        bins = np.empty(W, np.int32)
        for r in range(H):
            for j in range(3 if sobel else 1):
                src = r + j - 1 if sobel else r
                src = 1 if src < 0 else H - 2 if src >= H else src  # reflect: row -1 is row 1
                for c in range(1, W - 1):
                    dx[j, c] = m[src, c + 1] - m[src, c - 1]
            for c in range(W):
                gx[c] = (dx[0, c] + dx[2, c]) + 2 * dx[1, c] if sobel else dx[0, c]
            if 0 < r < H - 1:
                for c in range(W):
                    dy[c + 1] = m[r + 1, c] - m[r - 1, c]
            else:
                dy[:] = 0
            dy[0], dy[W + 1] = dy[2], dy[W - 1]
            for c in range(W):
                gy[c] = (dy[c] + dy[c + 2]) + 2 * dy[c + 1] if sobel else dy[c + 1]
            w = weight[r]
            for c in range(W):
                x, y = gx[c], gy[c]
                mag[c] = math.sqrt(x * x + y * y) * w[c]
                flip = (y < 0) | ((y == 0) & (x < 0))  # unsigned: (x, y) and (-x, -y) share a bin
                gx[c], gy[c] = (-x, -y) if flip else (x, y)
                bins[c] = 0
            for k in range(K - 1):  # edges outer, pixels inner: this loop vectorizes
                ck, sk = cos_edge[k], sin_edge[k]
                for c in range(W):
                    bins[c] += gy[c] * ck - gx[c] * sk >= 0
            first = (r // cell) * cells_per_row
            for c in range(W):
                h[bins[c], first + cell_col[c]] += mag[c]
    return out


# Two entry points with their own names, as numba's cache keys a function by its name, not by its options; the
# kernel is inlined into both, so `prange` becomes a parallel loop in the first and a plain loop in the second.
_options = dict(cache=True, error_model="numpy", boundscheck=False)
_inlined = njit(inline="always", **_options)(_kernel)


@njit(parallel=True, **_options)
def _parallel(maps, weight, cos_edge, sin_edge, cell, sobel, out):
    return _inlined(maps, weight, cos_edge, sin_edge, cell, sobel, out)


@njit(**_options)
def _serial(maps, weight, cos_edge, sin_edge, cell, sobel, out):
    return _inlined(maps, weight, cos_edge, sin_edge, cell, sobel, out)


@torch.compiler.disable  # numba's dispatcher cannot be traced: a compiled model (compile=true) calls it eagerly
def histograms(maps: torch.Tensor, nbins: int, cell: int, sobel: bool,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """maps [N, H, W] (float32 or float64, CPU) -> magnitude-weighted orientation histograms [N, nbins, cells].
    Runs on torch's intra-op thread count. One thread (as in a DataLoader worker) runs the serial kernel, which
    starts no OpenMP pool: GNU OpenMP's pool does not survive a fork, and numba aborts a forked child that uses it."""
    N, H, W = maps.shape
    a = maps.detach().contiguous().numpy()
    edges = np.arange(1, nbins) * np.pi / nbins
    w = np.ones((H, W), a.dtype) if weight is None else weight.to(maps.dtype).contiguous().numpy()
    out = torch.empty(N, nbins, (H // cell) * (W // cell), dtype=maps.dtype)
    threads = min(torch.get_num_threads(), numba_config.NUMBA_NUM_THREADS)
    args = (a, w, np.cos(edges).astype(a.dtype), np.sin(edges).astype(a.dtype), cell, sobel, out.numpy())
    if threads > 1:
        set_num_threads(threads)
        _parallel(*args)
    else:
        _serial(*args)
    return out
