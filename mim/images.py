"""Image tensor helpers every part shares: patches <-> images, resizing, renormalization, panel grids."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], patches in row-major grid order, pixels (row, col, channel)."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify` for a square grid."""
    B, N, _ = x.shape
    h = w = int(N ** 0.5)
    x = x.reshape(B, h, w, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, h * p, w * p)


def pixel_target(imgs: torch.Tensor, p: int, norm_pix: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Patch pixels [B, N, p*p*C]; with norm_pix each patch is standardized by its own mean and (unbiased)
    variance, as in MAE's norm_pix_loss."""
    target = patchify(imgs, p)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    return target


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize to size x size (a no-op at that size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def renormalize(images: torch.Tensor, src: tuple, dst: tuple) -> torch.Tensor:
    """Images normalized with src=(mean, std) -> the same images normalized with dst=(mean, std)."""
    (m0, s0), (m1, s1) = src, dst
    if list(m0) == list(m1) and list(s0) == list(s1):
        return images
    view = lambda v: torch.tensor(v, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)  # noqa: E731
    return (images * view(s0) + view(m0) - view(m1)) / view(s1)


def uint8_normalizer(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift [C, 1, 1], factor [C, 1, 1]) in float32: uint8 pixels x are normalized as (x - shift) * factor, i.e.
    (x / 255 - mean) / std, with the same two roundings wherever it runs (a loader worker or the device)."""
    return torch.tensor(mean).view(-1, 1, 1) * 255, 1 / (torch.tensor(std).view(-1, 1, 1) * 255)


def normalize_uint8(imgs: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images [B, C, H, W] (or [C, H, W]) -> float32 normalized: bit for bit what the loader's
    `PretrainTransform` returns for the same pixels, on any device."""
    shift, factor = (t.to(imgs.device) for t in uint8_normalizer(mean, std))
    return imgs.to(torch.float32).sub_(shift).mul_(factor)


def image_grid(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack batches [B, 3, H, W] as rows of one image; tiny images (digits) are blown up for legibility."""
    from torchvision.utils import make_grid
    x = torch.cat(rows)
    scale = max(1, 64 // x.shape[-1])
    x = F.interpolate(x, scale_factor=scale, mode="nearest")
    return make_grid(x, nrow=len(rows[0]), padding=2, pad_value=1.0)
