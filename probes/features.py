"""Frozen-encoder features for probes: CLS after the final norm, mean-pooled patches, or a block's output."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """tokens [B, 1 + N, D] (CLS first) -> [B, D]."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")


@torch.no_grad()
def extract(encoder, loader: DataLoader, device: torch.device, pool: str = "cls",
            layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n, D] and labels [n] of every batch of `loader` (eval mode, bf16 autocast on CUDA).
    `layer` (0-based block index) probes that block's output instead of the final normed tokens."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for imgs, y in loader:
        imgs = imgs.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if layer is None:
                tokens = encoder(imgs)
            else:
                tokens = encoder(imgs, return_layers=(layer,))[1][0]
        feats.append(pool_tokens(tokens, pool).float().cpu())
        labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)
