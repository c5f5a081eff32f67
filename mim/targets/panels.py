"""Panels shared by target kinds: what TensorBoard and reconstructions.png show of a prediction."""
from __future__ import annotations

import torch

from mimkit.data import denormalize
from mimkit.images import image_grid, patchify, unpatchify

GREEN, RED = (0.1, 0.9, 0.1), (0.9, 0.1, 0.1)


def masked_images(imgs: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """The images with their masked patches blacked out (zeros in the normalized space)."""
    patches = patchify(imgs, p)
    return unpatchify(torch.where(mask.unsqueeze(-1), torch.zeros_like(patches), patches), p, imgs.shape[1])


def score_panel(imgs: torch.Tensor, mask: torch.Tensor, score: torch.Tensor, p: int, data_name: str) -> torch.Tensor:
    """Rows original / masked / masked patches tinted from red (score 0) to green (score 1): `score` [B, N] in
    [0, 1] per patch, e.g. whether the predicted id is the tokenizer's, or a prediction's cosine similarity."""
    x = denormalize(imgs.float(), data_name)
    patches = patchify(x, p)
    green, red = (torch.tensor(c, device=x.device).repeat(p * p) for c in (GREEN, RED))
    s = score.float().clamp(0, 1).unsqueeze(-1)
    tint = s * green + (1 - s) * red
    m = mask.unsqueeze(-1)
    masked = torch.where(m, torch.zeros_like(patches), patches)
    tinted = torch.where(m, 0.5 * patches + 0.5 * tint, patches)
    return image_grid([x, unpatchify(masked, p, x.shape[1]), unpatchify(tinted, p, x.shape[1])])
