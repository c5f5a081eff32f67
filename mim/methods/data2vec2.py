"""data2vec 2.0 for images (Baevski et al. 2023; fairseq examples/data2vec, models/data2vec2.py and
config/v2/base_images_only_task.yaml): the student encoder sees the visible patches of an inverse block mask
(80% masked, several masks per image so the teacher runs once for all of them), a light convolutional decoder
restores the grid, and at the masked positions it regresses the EMA teacher's target on the full image: the mean
of its top-K blocks' FFN outputs, each instance-normalized, the mean layer-normalized (`target.kind=ema`).

Loss (fairseq d2v_loss, loss_beta 0): the squared error summed over the D channels times 1/sqrt(D), averaged over
the masked patches, i.e. the `loss` key's per-patch mean times sqrt(D). Plus the CLS term (cls_loss 0.01): the
student's output CLS regresses the image's mean target with the same scaled error, summed over the process's
samples (fairseq adds it times the sample size before dividing every loss by the sample size).

Recipe (base_images_only_task.yaml): Adam (0.9, 0.95), wd 0.05, lr 1e-3 at 16 images x 16 GPUs, cosine with
50040 of 375300 updates of warmup (10 of 75 ImageNet epochs), clip 4, EMA 0.9998 -> 0.99999 over the first 100k
updates, top 10 of the 12 blocks (its 2 "prenet" blocks are left out), clone_batch 16, mask_prob 0.8,
mask_prob_adjust 0.07, mask_length 3, decoder 6 x 768, kernel 3, 16 groups, mask_noise_std 0.01. fairseq's
blocks are post-LN; mimkit's encoder is the same pre-LN ViT for every method.
"""
from __future__ import annotations

import math
import torch

from mimkit.config import check_range
from mimkit.parts import RECIPES, Data2Vec2Config

from .base import Method, register_method


def feature_std(x: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the standard deviation over rows of x [..., D] (fairseq's target_var / pred_var,
    without its 1e-6): near 0 when the representation collapses."""
    return x.detach().float().reshape(-1, x.shape[-1]).std(dim=0).mean()


@register_method("data2vec2")
class Data2Vec2(Method):
    Config = Data2Vec2Config
    recipe = RECIPES["data2vec2"]

    def __init__(self, cfg):
        super().__init__(cfg)
        check_range("data2vec2.cls_loss", cfg.data2vec2.cls_loss, 0)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> dict:
        """imgs [B, C, H, W]; mask [B, N] or [B, clones, N] (True = masked)."""
        masks = mask if mask.dim() == 3 else mask.unsqueeze(1)
        clones = masks.shape[1]
        target = self.target(imgs)  # [B, N, D], once per image
        masks = masks.flatten(0, 1)
        tokens = self.encoder(imgs.repeat_interleave(clones, dim=0), masks, mode="drop")
        pred = self.decoder(tokens, masks)
        scale = math.sqrt(target.shape[-1])
        regression = self.loss(pred, target.repeat_interleave(clones, dim=0), masks)["loss"] * scale
        cls_error = (tokens[:, 0].float() - target.mean(dim=1).repeat_interleave(clones, dim=0)) ** 2
        cls = cls_error.mean(dim=-1).sum() * scale * self.cfg.data2vec2.cls_loss
        return {"loss": regression + cls, "regression": regression.detach(), "cls_loss": cls.detach(),
                "target_std": feature_std(target), "pred_std": feature_std(pred[masks]),
                "ema_momentum": self.target.momentum_now}

    def visualize(self, imgs: torch.Tensor, mask: torch.Tensor) -> None:
        """No panel: the target is a latent, not an image."""
        return None
