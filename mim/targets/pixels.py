"""Pixels (MAE, SimMIM): each patch's p*p*C normalized pixels, optionally standardized per patch (MAE's
norm_pix_loss). The panel rebuilds the images from the prediction with the visible patches pasted back."""
from __future__ import annotations


import torch

from mimkit.data import denormalize
from mimkit.images import image_grid, pixel_target, unpatchify
from mimkit.parts import PixelsConfig

from .base import Target, TargetContext, register_target
from .panels import masked_images


@register_target("pixels")
class Pixels(Target):
    Config = PixelsConfig

    def __init__(self, cfg: PixelsConfig, ctx: TargetContext):
        super().__init__(cfg, ctx)
        self.out_dim = ctx.patch_size ** 2 * ctx.in_chans

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return pixel_target(images, self.ctx.patch_size, self.cfg.norm_pix)

    def reconstruct(self, imgs: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Images rebuilt from the prediction on masked patches and the true pixels elsewhere."""
        p = self.ctx.patch_size
        pred = pred.float()
        if self.cfg.norm_pix:  # undo the per-patch standardization with the true patch statistics
            raw = pixel_target(imgs, p)
            pred = pred * (raw.var(-1, keepdim=True) + 1e-6) ** 0.5 + raw.mean(-1, keepdim=True)
        out = torch.where(mask.unsqueeze(-1), pred, pixel_target(imgs, p))
        return unpatchify(out, p, imgs.shape[1])

    @torch.no_grad()
    def panel(self, imgs, mask, pred):
        """Rows: original / masked / reconstruction."""
        rows = (imgs, masked_images(imgs, mask, self.ctx.patch_size), self.reconstruct(imgs, mask, pred))
        return image_grid([denormalize(x.float(), self.ctx.data_name) for x in rows])
