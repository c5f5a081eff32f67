"""MaskFeat (SlowFast; mmpretrain): mask-token encoder, block-wise masks, a linear head per token that
predicts the patch's HOG (per channel, 2x2 cells x 9 bins x 3 channels = 108 values), MSE on masked patches."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ConfigError
from .data import denormalize
from .hog import HOG, cells_to_patches, hog_glyphs, patches_to_cells
from .methods import TokenHeadMethod, image_grid, masked_mean, register


def hog_for(cfg) -> HOG:
    """The HOG of a config: cells of patch_size / target.hog_cells_per_patch pixels."""
    t, p = cfg.target, cfg.model.patch_size
    k = t.hog_cells_per_patch
    if k < 1 or p % k:
        raise ConfigError(f"target.hog_cells_per_patch={k} must divide model.patch_size={p} (cells of whole pixels)")
    if t.hog_bins < 1:
        raise ConfigError(f"target.hog_bins={t.hog_bins} must be at least 1")
    return HOG(t.hog_bins, p // k, t.hog_gradient, window=p if t.hog_gaussian else 0)


@register("maskfeat")
class MaskFeat(TokenHeadMethod):
    recipe = {
        "mask.kind": "block", "mask.ratio": 0.4, "target.norm_pix": False,
        "optim.blr": 2e-4, "optim.lr_batch_ref": 256, "optim.betas": [0.9, 0.999], "optim.weight_decay": 0.05,
        "optim.warmup_epochs": 30, "optim.clip_grad": 0.02, "data.crop_scale": [0.5, 1.0],
    }
    panel_name = "original_masked_hog_target_prediction"

    def out_dim(self, cfg) -> int:
        # TokenHeadMethod.__init__ sizes the head from here: HOG [3 * bins * cells^2] per patch
        self.hog, self.cells = hog_for(cfg), cfg.target.hog_cells_per_patch
        return 3 * self.hog.nbins * self.cells ** 2

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Per-patch HOG [B, N, 3 * bins * cells^2]."""
        return cells_to_patches(self.hog(imgs), self.cells)

    def forward(self, imgs, mask):
        pred = self.predict(imgs, mask)
        loss = masked_mean(((pred.float() - self.target(imgs)) ** 2).mean(dim=-1), mask)
        return {"loss": loss, "pred": pred}

    @torch.no_grad()
    def visualize(self, imgs, mask, data_name):
        """Rows: original / masked / HOG target glyphs / predicted HOG on masked patches (target elsewhere),
        each cell drawn as one line per orientation bin, channels in their own colour."""
        target = self.target(imgs)
        pred = torch.where(mask.unsqueeze(-1), self.predict(imgs, mask).float(), target)
        glyph_px = max(8, self.hog.cell)
        rows = [hog_glyphs(patches_to_cells(t, imgs.shape[1], self.hog.nbins, self.cells), glyph_px)
                for t in (target, pred)]
        size = rows[0].shape[-2:]
        g, p = self.encoder.grid, self.patch_size
        visible = (~mask).view(-1, 1, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)
        images = [F.interpolate(x, size=size, mode="nearest") for x in (imgs, imgs * visible)]
        return image_grid([denormalize(x.float(), data_name) for x in images] + rows)
