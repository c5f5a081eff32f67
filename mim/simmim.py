"""SimMIM (microsoft/SimMIM): every patch enters the encoder, masked ones as a learned mask token; one linear
map per token predicts the patch's p*p*3 normalized pixels; L1 loss on the masked pixels."""
from __future__ import annotations

import torch
from torch import nn

from .methods import MAE, Method, masked_mean, register
from .targets import pixel_target
from .vit import init_weights


@register("simmim")
class SimMIM(Method):
    encoder_mode = "token"
    recipe = {
        "mask.kind": "grid", "mask.ratio": 0.6, "target.norm_pix": False,
        "optim.blr": 1e-4, "optim.lr_batch_ref": 512, "optim.betas": [0.9, 0.999], "optim.weight_decay": 0.05,
        "optim.warmup_epochs": 10, "optim.clip_grad": 5.0, "data.crop_scale": [0.67, 1.0],
    }

    def __init__(self, cfg):
        super().__init__(cfg)
        self.head = nn.Linear(self.encoder.embed_dim, cfg.model.patch_size ** 2 * 3)  # SimMIM: 1x1 conv
        self.head.apply(init_weights)

    def predict(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pixels [B, N, p*p*3] of every patch from its token (the CLS token is dropped)."""
        return self.head(self.encoder(imgs, mask, mode="token")[:, 1:])

    def forward(self, imgs, mask):
        pred = self.predict(imgs, mask)
        target = pixel_target(imgs, self.patch_size, self.cfg.target.norm_pix)
        # SimMIM: |x - x_rec| summed over masked pixels and channels / (masked pixels * channels); every masked
        # patch has the same number of pixels, so this is the per-patch mean averaged over masked patches.
        loss = masked_mean((pred.float() - target).abs().mean(dim=-1), mask)
        return {"loss": loss, "pred": pred}

    # Same rebuild as MAE's (prediction on masked patches, visible pixels pasted back), through self.predict.
    reconstruct = MAE.reconstruct
