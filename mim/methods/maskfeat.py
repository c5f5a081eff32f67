"""MaskFeat (Wei et al. 2022; SlowFast, mmpretrain): mask-token encoder, block-wise masks, a linear head per
token that predicts the patch's HOG (per channel, 2x2 cells x 9 bins x 3 channels = 108 values), MSE on masked
patches."""
from .base import Method, register_method


@register_method("maskfeat")
class MaskFeat(Method):
    recipe = {
        "head": "linear", "target.kind": "hog", "loss": "mse", "mask.kind": "block", "mask.ratio": 0.4,
        # mmpretrain's ViT-B: lr 2e-4 per 256 images, AdamW (0.9, 0.999), wd 0.05, 30 warmup epochs, clip 0.02
        "optim.blr": 2e-4, "optim.betas": [0.9, 0.999], "optim.warmup_epochs": 30, "optim.clip_grad": 0.02,
        "data.crop_scale": [0.5, 1.0],
    }
