"""HOG (MaskFeat): per patch, the L2-normalized orientation histograms of its cells, per colour channel
(2x2 cells x 9 bins x 3 channels = 108 values at MaskFeat's settings), by `mimkit.hog.HOG`. The panel draws
the target's and the prediction's histograms as glyphs."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from mimkit.config import ConfigError
from mimkit.data import denormalize
from mimkit.hog import HOG, cells_to_patches, hog_glyphs, patches_to_cells
from mimkit.images import image_grid
from mimkit.parts import HOGConfig

from .base import Frozen, Target, TargetContext, register_target


@register_target("hog")
class HOGTarget(Target):
    Config = HOGConfig
    panel_name = "original_masked_hog_target_prediction"

    def __init__(self, cfg: HOGConfig, ctx: TargetContext):
        super().__init__(cfg, ctx)
        p, k = ctx.patch_size, cfg.cells_per_patch
        if k < 1 or p % k:
            raise ConfigError(f"target.hog.cells_per_patch={k} must divide model.patch_size={p} "
                              f"(cells of whole pixels)")
        if cfg.bins < 1:
            raise ConfigError(f"target.hog.bins={cfg.bins} must be at least 1")
        self.hog = HOG(cfg.bins, p // k, cfg.gradient, window=p if cfg.gaussian else 0)
        self.features = Frozen(self.hog)
        self.out_dim = ctx.in_chans * cfg.bins * k ** 2

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Per-patch HOG [B, N, 3 * bins * cells^2]."""
        return cells_to_patches(self.features(images), self.cfg.cells_per_patch)

    @torch.no_grad()
    def panel(self, imgs, mask, pred):
        """Rows: original / masked / HOG target glyphs / predicted HOG on masked patches (target elsewhere),
        each cell drawn as one line per orientation bin, channels in their own colour."""
        target = self(imgs)
        pred = torch.where(mask.unsqueeze(-1), pred.float(), target)
        cells, glyph_px = self.cfg.cells_per_patch, max(8, self.hog.cell)
        rows = [hog_glyphs(patches_to_cells(t, imgs.shape[1], self.cfg.bins, cells), glyph_px) for t in (target, pred)]
        size = rows[0].shape[-2:]
        g, p = self.ctx.grid, self.ctx.patch_size
        visible = (~mask).view(-1, 1, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)
        images = [F.interpolate(x, size=size, mode="nearest") for x in (imgs, imgs * visible)]
        return image_grid([denormalize(x.float(), self.ctx.data_name) for x in images] + rows)
