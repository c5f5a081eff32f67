"""SimMIM (microsoft/SimMIM): every patch enters the encoder, masked ones as a learned mask token; one linear
map per token predicts the patch's p*p*3 normalized pixels; L1 loss on the masked pixels."""
from __future__ import annotations

from .methods import MAE, TokenHeadMethod, masked_mean, register
from .targets import pixel_target


@register("simmim")
class SimMIM(TokenHeadMethod):
    recipe = {
        "mask.kind": "grid", "mask.ratio": 0.6, "target.norm_pix": False,
        "optim.blr": 1e-4, "optim.lr_batch_ref": 512, "optim.betas": [0.9, 0.999], "optim.weight_decay": 0.05,
        "optim.warmup_epochs": 10, "optim.clip_grad": 5.0, "data.crop_scale": [0.67, 1.0],
    }

    def out_dim(self, cfg) -> int:
        return cfg.model.patch_size ** 2 * 3  # the patch's pixels (SimMIM: a 1x1 conv)

    def forward(self, imgs, mask):
        pred = self.predict(imgs, mask)
        target = pixel_target(imgs, self.patch_size, self.cfg.target.norm_pix)
        # SimMIM: |x - x_rec| summed over masked pixels and channels / (masked pixels * channels); every masked
        # patch has the same number of pixels, so this is the per-patch mean averaged over masked patches.
        loss = masked_mean((pred.float() - target).abs().mean(dim=-1), mask)
        return {"loss": loss, "pred": pred}

    # Same rebuild as MAE's (prediction on masked patches, visible pixels pasted back), through self.predict.
    reconstruct = MAE.reconstruct
