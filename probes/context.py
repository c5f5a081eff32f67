"""What a probe protocol is handed: the config, the frozen encoder, the device, logging and the features."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mimkit import checkpoint
from mimkit.config import to_dict
from mimkit.encoders import EncoderSpec
from mimkit.loop import RunLog
from mimkit.vit import ViT

from .config import ProbeRunConfig
from .features import split_features


@dataclass
class ProbeRun:
    """What a protocol needs: the config, the frozen encoder, the device, logging and the feature source."""
    cfg: ProbeRunConfig
    encoder: ViT
    pretrain_cfg: EncoderSpec  # the checkpoint's model and data settings, method and seed
    device: torch.device
    out: Path
    log: RunLog
    writer: object  # torch.utils.tensorboard.SummaryWriter
    ckpt_id: str
    num_classes: int = 0
    _features: dict = field(default_factory=dict)

    @property
    def cache_dir(self) -> Path | None:
        if not self.cfg.features.cache:
            return None
        return Path(self.cfg.features.cache_dir) if self.cfg.features.cache_dir else self.out.parent / "feature_cache"

    def features(self, split: str, encoder: ViT | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-transform features of a split; the checkpoint's encoder goes through the cache."""
        cfg = self.cfg
        mine = encoder is None
        if mine and split in self._features:
            return self._features[split]
        limit = cfg.data.limit if split == "train" else cfg.data.test_limit
        result = split_features(self.encoder if mine else encoder, cfg.data, split, self.device, cfg.features.pool,
                                cfg.features.layer, limit, cfg.batch_size, self.cache_dir if mine else None,
                                self.ckpt_id, self.log)
        if mine:
            self._features[split] = result
        return result

    def save(self, name: str, obj: dict) -> None:
        checkpoint.save({**obj, "config": to_dict(self.cfg)}, self.out / "checkpoints" / name)
