"""Losses between a head's prediction and a target, at the masked positions only.

Each loss takes (pred, target, mask): pred [B, N, D] at every position or [M, D] at the masked ones (a
`masked_linear` head), target [B, N, D] floats or [B, N] ids, mask [B, N] bool; it returns {"loss": scalar, ...}
with any extra scalars it reports (token accuracy for ids). `ids` says which kind of target a loss takes."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of a per-patch loss [B, N] over the masked patches only."""
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum()


def token_accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of positions whose arg-max prediction is the target id (a detached scalar)."""
    return (logits.detach().argmax(-1) == target).float().mean()


def _masked(per_patch: Callable, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """per_patch(pred, target) -> a loss per patch, averaged over the masked patches (pred at every position,
    or already at the masked ones)."""
    if pred.dim() == 2:
        return per_patch(pred.float(), target[mask]).mean()
    return masked_mean(per_patch(pred.float(), target), mask)


def mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict:
    """Mean squared error per patch (MAE, MaskFeat)."""
    return {"loss": _masked(lambda a, b: ((a - b) ** 2).mean(dim=-1), pred, target, mask)}


def l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict:
    """SimMIM: |x - x_rec| summed over masked pixels and channels / (masked pixels * channels); every masked
    patch has the same number of values, so this is the per-patch mean averaged over masked patches."""
    return {"loss": _masked(lambda a, b: (a - b).abs().mean(dim=-1), pred, target, mask)}


def cosine(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict:
    """1 - cosine similarity per patch, averaged over masked patches (EVA; MILAN). EVA's official loss is this
    up to the constant: minus the mean cosine similarity, the same gradients."""
    return {"loss": _masked(lambda a, b: 1 - F.cosine_similarity(a, b.float(), dim=-1), pred, target, mask)}


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict:
    """Smooth-L1 with beta 1 (MaskDistill) per value, the per-patch mean averaged over masked patches."""
    return {"loss": _masked(lambda a, b: F.smooth_l1_loss(a, b, reduction="none", beta=1.0).mean(dim=-1), pred,
                            target, mask)}


def cross_entropy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Cross-entropy over the vocabulary and arg-max accuracy at the masked positions (BEiT, ClusterMIM). An id
    of -1 (a patch a LaVIT tokenizer dropped) is left out of both."""
    if logits.dim() == 2:  # logits [M, V] at the masked positions
        logits, target = logits.float(), ids[mask]
        valid = target >= 0
        return {"loss": F.cross_entropy(logits, target, ignore_index=-1),
                "acc": token_accuracy(logits[valid], target[valid])}
    logits = logits.float()
    mask = mask & (ids >= 0)
    loss = masked_mean(F.cross_entropy(logits.transpose(1, 2), ids, reduction="none", ignore_index=-1), mask)
    return {"loss": loss, "acc": token_accuracy(logits[mask], ids[mask])}


# name -> (loss, whether it takes ids)
LOSSES: dict[str, tuple[Callable[..., dict], bool]] = {
    "mse": (mse, False), "l1": (l1, False), "cosine": (cosine, False), "smooth_l1": (smooth_l1, False),
    "ce": (cross_entropy, True)}
