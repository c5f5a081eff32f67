"""Batched HOG (histograms of oriented gradients), MaskFeat's target, computed on the training device.

Per RGB channel of the normalized image: gradients by Sobel (MaskFeat default) or central differences, both
on reflect-padded maps; magnitude sqrt(gx^2 + gy^2); unsigned orientation atan2(gy, gx) mod 180 deg in `nbins`
equal bins; each pixel adds its magnitude to its bin (hard assignment); histograms are summed over
cell x cell pixels and each cell's histogram is L2-normalized on its own (no block normalization). All of it
is batched (no per-image loop) on whatever device the images are: tensor ops on a GPU, one fused numba kernel
per map on the CPU (`mimkit.hog_cpu`, faster there; `cpu_kernel=False` runs the tensor ops on the CPU too).

Conventions, compared with the references:
- Bins are [k, k+1) * 180/nbins deg of atan2(d/drow, d/dcol), as in scikit-image. With central differences
  and one-cell L2 blocks the histograms equal `skimage.feature.hog` on each channel (reflect padding makes
  the border gradients zero, as skimage sets them; skimage averages rather than sums over a cell, which
  L2 normalization cancels), except in nearly flat cells: skimage divides by sqrt(|h|^2 + 1e-10), which damps
  cells whose mean gradient is ~1e-5 or less, where our eps (1e-12, SlowFast's) still scales them to unit norm.
- SlowFast's HOGLayerC measures atan2(gx, gy), from the other axis: its bins are ours reflected and shifted
  by half a bin (centred on multiples of 20 deg). The target carries the same information; we keep one
  convention so both gradient modes can be checked against scikit-image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .parts import GRADIENTS

CPU_CHUNK_VALUES = 2 ** 19  # pixels + histogram slots per chunk on CPU (see histograms)


def gaussian_window(size: int, std: float) -> torch.Tensor:
    """2-D Gaussian [size, size] summing to 1 (SlowFast's get_gkern)."""
    n = torch.arange(size, dtype=torch.float64)
    g = torch.exp(-0.5 * ((n - n.mean()) / std) ** 2)
    g2 = torch.outer(g, g)
    return (g2 / g2.sum()).float()


class HOG(nn.Module):
    """imgs [B, C, H, W] -> per-cell L2-normalized histograms [B, C, nbins, H / cell, W / cell].

    `window` > 0 weights the gradient magnitudes by a Gaussian of that size (std window / 2) tiled over the
    image, as MaskFeat's optional window over each patch (mmpretrain uses 16 at patch 16)."""

    def __init__(self, nbins: int = 9, cell: int = 8, gradient: str = "sobel", window: int = 0, eps: float = 1e-12,
                 cpu_kernel: bool = True):
        super().__init__()
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
        self.nbins, self.cell, self.gradient, self.window, self.eps = nbins, cell, gradient, window, eps
        self.cpu_kernel = cpu_kernel
        if window:  # not persistent: checkpoints hold only learned weights
            self.register_buffer("gkern", gaussian_window(window, window // 2), persistent=False)

    def gradients(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """maps [N, H, W] -> (d/dcol, d/drow), each [N, H, W], with reflect padding at the border."""
        N, H, W = maps.shape
        # Central differences written straight into their buffers, zero on the border: reflect padding makes
        # x[-1] = x[1], so a border gradient is exactly 0 (as scikit-image sets it). Differencing first, then
        # smoothing, keeps them exactly 0 under Sobel too (a one-pass 3x3 Sobel sum leaves +-1e-16 residues whose
        # sign throws their angle between 0 and 180 deg), and on CPU shifted slices beat conv2d.
        gx, gy = maps.new_zeros(N, H, W), maps.new_zeros(N, H, W)  # zeroing all is faster than zeroing columns
        torch.sub(maps[:, :, 2:], maps[:, :, :-2], out=gx[:, :, 1:-1])
        torch.sub(maps[:, 2:], maps[:, :-2], out=gy[:, 1:-1])
        if self.gradient == "sobel":  # the [1, 2, 1] filter across each difference, reflect-padded likewise
            px, py = F.pad(gx, (0, 0, 1, 1), mode="reflect"), F.pad(gy, (1, 1, 0, 0), mode="reflect")
            gx = (px[:, :-2] + px[:, 2:]).add_(px[:, 1:-1], alpha=2)
            gy = (py[:, :, :-2] + py[:, :, 2:]).add_(py[:, :, 1:-1], alpha=2)
        return gx, gy

    def histograms(self, imgs: torch.Tensor) -> torch.Tensor:
        """Magnitude-weighted orientation histograms per cell [B, C, nbins, H / cell, W / cell], before
        normalization."""
        B, C, H, W = imgs.shape
        c, K = self.cell, self.nbins
        if not imgs.is_floating_point():  # integer differences would wrap around
            raise TypeError(f"HOG takes float images (normalized, as the model sees them), got {imgs.dtype}")
        if H % c or W % c:
            raise ValueError(f"image size {H}x{W} is not divisible by the HOG cell size {c}")
        if min(H, W) < 2:  # reflect padding needs a neighbour; the CPU kernel does not check its indices
            raise ValueError(f"image size {H}x{W} is too small for HOG gradients (at least 2x2)")
        maps = imgs.reshape(B * C, H, W)
        # the Gaussian window tiled over the map, once per call (not per chunk)
        weight = self.gkern.to(maps.dtype).repeat(H // self.window, W // self.window) if self.window else None
        if maps.device.type == "cpu" and self.cpu_kernel:
            from . import hog_cpu  # numba compiles (or loads from its cache) on first use only
            hist = hog_cpu.histograms(maps, K, c, self.gradient == "sobel", weight)
            return hist.view(B, C, K, H // c, W // c)
        # Slots are bin-major: slot s of cell i is s * cells + i, so the histograms come out as [.., nbins, cells]
        # with no transpose, and both the fold and the normalization in forward() reduce over whole contiguous
        # planes (F.normalize over the 9 bins of each cell is far slower). Each pixel's offset is computed
        # once per call; indices are whole numbers, exact in float32 below 2^24 (float64 beyond, for huge images).
        n_cells = (H // c) * (W // c)
        cell_row, cell_col = torch.arange(H, device=maps.device) // c, torch.arange(W, device=maps.device) // c
        first_slot = (K * n_cells + cell_row[:, None] * (W // c) + cell_col[None, :])
        first_slot = first_slot.to(maps.dtype if 2 * K * n_cells <= 2 ** 24 else torch.float64)
        # On CPU, chunks keep the dozen elementwise passes below in the cores' caches (benchmarks/README.md:
        # faster than one pass over the batch); a GPU takes the batch at once. The budget counts the
        # 2 * nbins slots of each cell too, as they outnumber the pixels 4.5 to 1 at 2-px cells: the fastest chunks
        # were 2^18-2^19 pixels at 8-px cells and 2^16-2^17 at 2-px cells (sweeps on 32 and 224 px images).
        per_map = H * W + 2 * K * n_cells
        per_chunk = max(1, CPU_CHUNK_VALUES // per_map) if maps.device.type == "cpu" else len(maps)
        hist = maps.new_empty(B * C, K, n_cells)
        for chunk, out in zip(maps.split(per_chunk), hist.split(per_chunk)):
            slots = self.slot_histograms(chunk, first_slot, n_cells, weight)
            torch.add(slots[:, :K], slots[:, K:], out=out)  # slot mod nbins (the unsigned fold), while in cache
        return hist.view(B, C, K, H // c, W // c)

    def slot_histograms(self, maps: torch.Tensor, first_slot: torch.Tensor, n_cells: int,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
        """maps [N, H, W] -> per-cell histograms over 2 * nbins slots [N, 2 * nbins, cells], cells in row-major
        order; first_slot [H, W] is nbins * cells + (the pixel's cell); weight [H, W] scales the magnitudes."""
        N, H, W = maps.shape
        K = self.nbins
        gx, gy = self.gradients(maps)
        mag = (gx * gx).addcmul_(gy, gy).sqrt_()  # on CPU faster than hypot; gradients are O(1), no overflow
        if weight is not None:
            mag.mul_(weight)
        # The unsigned angle is atan(gy / gx) mod pi: atan2 differs from atan only by +-pi, which the fold removes,
        # and atan + a division cost less than atan2 on CPU. 0 / 0 -> 0, as atan2(0, 0) = 0.
        # floor(atan * K / pi) + K is a slot in [0, 2K); slot mod K is the bin, folded on the small histograms
        # rather than on every pixel (a per-pixel remainder costs 20 additions). The index is cast once.
        # In place in gy's buffer: fewer live buffers per chunk stay in cache.
        slot = gy.div_(gx).nan_to_num_(0.0).atan_().mul_(K / math.pi).floor_()
        in_place = slot if first_slot.dtype == slot.dtype else None  # not when the index needs float64
        idx = torch.add(first_slot, slot, alpha=n_cells, out=in_place).long()
        hist = mag.new_zeros(N, 2 * K * n_cells)
        return hist.scatter_add_(1, idx.view(N, -1), mag.view(N, -1)).view(N, 2 * K, n_cells)

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        # full precision even under bf16 autocast: angles near bin edges and tiny magnitudes matter
        with torch.autocast(imgs.device.type, enabled=False):
            hist = self.histograms(imgs.float() if imgs.dtype in (torch.float16, torch.bfloat16) else imgs)
            # = F.normalize(hist, dim=2, eps=self.eps), whose norm over this layout's dim 2 is 30x slower on CPU
            return hist / hist.square().sum(2, keepdim=True).sqrt_().clamp_min_(self.eps)


def cells_to_patches(hist: torch.Tensor, cells_per_patch: int) -> torch.Tensor:
    """[B, C, nbins, h, w] cell histograms -> [B, N, C * nbins * cells_per_patch^2] per patch, patches in
    row-major order, values ordered (channel, bin, cell row, cell col) as SlowFast's MaskFeat labels."""
    B, C, K, h, w = hist.shape
    k = cells_per_patch
    x = hist.reshape(B, C * K, h // k, k, w // k, k)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (h // k) * (w // k), C * K * k * k)


def patches_to_cells(target: torch.Tensor, channels: int, nbins: int, cells_per_patch: int) -> torch.Tensor:
    """Inverse of `cells_to_patches` for a square patch grid."""
    B, N, _ = target.shape
    g, k = int(N ** 0.5), cells_per_patch
    x = target.reshape(B, g, g, channels * nbins, k, k).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, nbins, g * k, g * k)


def hog_glyphs(hist: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Render cell histograms [B, C, nbins, h, w] as images [B, C, h * size, w * size]: in each cell, one line
    per bin through the centre along the edge direction (perpendicular to the bin's mean gradient), as bright
    as the bin's value; each channel is drawn in its own colour plane (skimage's HOG visualization, batched)."""
    B, C, K, h, w = hist.shape
    theta = (torch.arange(K, dtype=torch.float32) + 0.5) * math.pi / K  # bin centres (gradient angle)
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    # distance of each pixel to the line through the centre with direction (-sin t, cos t) (x right, y down)
    dist = (xx[None] * torch.cos(theta)[:, None, None] + yy[None] * torch.sin(theta)[:, None, None]).abs()
    inside = (xx ** 2 + yy ** 2).sqrt()[None] <= size / 2
    stencil = ((1 - dist).clamp(min=0) * inside).to(hist.device, hist.dtype)  # [K, size, size]
    glyph = torch.einsum("bckhw,kpq->bchpwq", hist, stencil).reshape(B, C, h * size, w * size)
    return glyph.clamp(0, 1)
