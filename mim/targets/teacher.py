"""Teacher features (the continuous targets of EVA, MaskDistill, MILAN): a frozen network's patch features at
the encoder's grid (`mimkit.teachers`: timm, OpenCLIP or a mimkit checkpoint from a local file), computed once per
step, under no_grad, from the same augmented view the encoder sees, then normalized per patch as asked. The panel
tints each masked patch by the cosine similarity of its prediction to the teacher's feature."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from mimkit.config import ConfigError
from mimkit.parts import TeacherTargetConfig
from mimkit.teachers import load_teacher

from .base import Frozen, Target, TargetContext, register_target
from .panels import score_panel

def normalize(feats: torch.Tensor, norm: str) -> torch.Tensor:
    """feats [B, N, D] normalized per patch over D as `norm` says."""
    if norm == "layernorm":
        return F.layer_norm(feats, feats.shape[-1:], eps=1e-6)
    if norm == "l2":
        return F.normalize(feats, dim=-1)
    return feats


@register_target("teacher")
class TeacherFeatures(Target):
    Config = TeacherTargetConfig
    panel_name = "original_masked_cosine"

    def __init__(self, cfg: TeacherTargetConfig, ctx: TargetContext):
        super().__init__(cfg, ctx)
        if not cfg.name:
            raise ConfigError("target.kind=teacher needs target.teacher.name (timm:<model>, openclip:<model> or "
                              "mimkit:<checkpoint>)")
        self.teacher = load_teacher(cfg.name, cfg.weights, cfg.img_size, cfg.layer)
        self.features = Frozen(self.teacher)
        self.out_dim = self(torch.zeros(1, ctx.in_chans, ctx.img_size, ctx.img_size)).shape[-1]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher features [B, N, D] (float32) at the encoder's grid, normalized per patch."""
        return normalize(self.features(images, self.ctx.stats, self.ctx.grid), self.cfg.norm)

    @torch.no_grad()
    def panel(self, imgs, mask, pred):
        """Masked patches from red (cosine similarity to the teacher's feature <= 0) to green (1)."""
        cos = F.cosine_similarity(pred.float(), self(imgs), dim=-1)
        return score_panel(imgs, mask, cos, self.ctx.patch_size, self.ctx.data_name)
