"""SimMIM (Xie et al. 2022; microsoft/SimMIM): every patch enters the encoder, masked ones as a learned mask
token; one linear map per token predicts the patch's p*p*3 normalized pixels; L1 loss on the masked pixels;
masks of 32-px units."""
from .base import Method, register_method


@register_method("simmim")
class SimMIM(Method):
    recipe = {
        "head": "linear", "target.kind": "pixels", "loss": "l1", "mask.kind": "grid", "mask.ratio": 0.6,
        # ViT-B: lr 1e-4 per 512 images, AdamW (0.9, 0.999), wd 0.05,
        # 10 warmup epochs, clip 5.0, crops 0.67-1
        "optim.blr": 1e-4, "optim.lr_batch_ref": 512, "optim.betas": [0.9, 0.999], "optim.warmup_epochs": 10,
        "optim.clip_grad": 5.0, "data.crop_scale": [0.67, 1.0],
    }
