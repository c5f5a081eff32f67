"""Teacher features (the continuous targets of EVA, MaskDistill, MILAN): a frozen network's patch features at
the encoder's grid (`mimkit.teachers`: timm, OpenCLIP or a mimkit checkpoint from a local file), computed from
the same augmented view the encoder sees."""
from __future__ import annotations

import torch

from mimkit.config import ConfigError
from mimkit.teachers import TeacherConfig, load_teacher

from .base import Frozen, Target, TargetContext, register_target


@register_target("teacher")
class TeacherFeatures(Target):
    Config = TeacherConfig

    def __init__(self, cfg: TeacherConfig, ctx: TargetContext):
        super().__init__(cfg, ctx)
        if not cfg.name:
            raise ConfigError("target.kind=teacher needs target.teacher.name (timm:<model>, openclip:<model> or "
                              "mimkit:<checkpoint>)")
        self.teacher = load_teacher(cfg.name, cfg.weights, cfg.img_size)
        self.features = Frozen(self.teacher)
        self.out_dim = self.teacher.feature_dim()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher features [B, N, D] (float32) at the encoder's grid."""
        return self.features(images, self.ctx.stats, self.ctx.grid)
