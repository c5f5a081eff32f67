"""I-JEPA (Assran et al. 2023; facebookresearch/ijepa, src/train.py, configs/in1k_vith14_ep300.yaml): the context
encoder sees one large block of patches with the target blocks cut out (`mask.kind=multiblock`), and a narrow
transformer predictor, given the context tokens and mask tokens at each target block's positions, predicts the
EMA target encoder's output tokens on the full image, LayerNorm'd without affine, at those positions
(`target.kind=ema`, top_k 0). Loss: Smooth-L1 (beta 1) averaged over every value (the official code's
F.smooth_l1_loss; the paper writes L2). No pixel decoder.

Masks are drawn per sample; as the official collator, each sample's context and target blocks are then trimmed
to the batch's smallest count, keeping the first patches in grid order. mimkit's encoder has a CLS token (I-JEPA's
has none); it is part of the context the predictor attends to, so it is trained and the probes can use it.

Recipe (in1k_vith14_ep300.yaml): batch 128 x 16 GPUs, lr 1e-3 after 40 warmup epochs from 2e-4
(`optim.warmup_start_lr`, absolute as the official start_lr), cosine to 1e-6, AdamW with wd cosine from 0.04 to 0.4
over the run (`optim.weight_decay_end`; src/utils/schedulers.py), 300 epochs, crops 0.3-1, no flip, EMA 0.996 ->
1.0 over the run, predictor 12 x 384, 4 target blocks of scale 0.15-0.2 and aspect 0.75-1.5, context scale
0.85-1, min_keep 10. The official schedulers step before each iteration, so its iteration k gets the value of
step k + 1; here iteration k gets the value at fractional epoch k / iterations per epoch (MAE's convention, one
step earlier).
"""
from __future__ import annotations

import torch

from mimkit.parts import RECIPES

from .base import Method, register_method
from .data2vec2 import feature_std


def first_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The grid indices of the first k True entries of each row of mask [..., N], in grid order: [..., k]."""
    return (~mask).to(torch.uint8).argsort(dim=-1, stable=True)[..., :k]


@register_method("ijepa")
class IJEPA(Method):
    mask_sets = True
    recipe = RECIPES["ijepa"]

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> dict:
        """imgs [B, C, H, W]; mask [B, 1 + T, N]: row 0 the patches hidden from the context, rows 1.. the T
        target blocks (mimkit.masking.MultiBlockMask)."""
        visible, blocks = ~mask[:, 0], mask[:, 1:]
        context = first_indices(visible, int(visible.sum(-1).min()))  # [B, n]
        targets = first_indices(blocks, int(blocks.sum(-1).min()))  # [B, T, k]
        hidden = torch.ones_like(visible).scatter_(1, context, False)
        tokens = self.encoder(imgs, hidden, mode="drop")  # the context tokens, in grid order as `context`
        target = self.target(imgs)  # [B, N, D]
        B, T, k = targets.shape
        target = torch.gather(target, 1, targets.flatten(1).unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        pred = self.jepa_predictor(tokens, context, targets).flatten(0, 2)  # [B * T * k, D]
        rows = torch.ones(1, len(pred), dtype=torch.bool, device=pred.device)
        loss = self.loss(pred, target.reshape(1, len(pred), -1), rows)["loss"]
        return {"loss": loss, "target_std": feature_std(target), "pred_std": feature_std(pred),
                "ema_momentum": self.target.momentum_now}

    def visualize(self, imgs: torch.Tensor, mask: torch.Tensor) -> None:
        """No panel: the target is a latent, not an image."""
        return None
