"""The target interface: what a method learns to predict at the masked positions.

A target is a frozen function of the (augmented, normalized) images the encoder sees: `__call__(images
[B, C, H, W]) -> Tensor[B, N, out_dim]` (float features) or `LongTensor[B, N]` (ids in [0, out_dim), `ids = True`),
one row per patch of the encoder's grid in row-major order. It is deliberately not an nn.Module attribute of the
method: whatever network it runs (a tokenizer, a teacher) stays out of the optimizer, the pretraining checkpoint
and DDP's gradient buckets, and `method.train()` cannot flip it to train mode (`Frozen`).

Each kind has a name, an optional config dataclass (the section `target.<name>`), and a panel that shows its
predictions (`panel`, TensorBoard and reconstructions.png). Kinds register with `@register_target(name)`; the
package's `__init__` imports them, as timm registers models.
"""
from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from mimkit.data import dataset_stats
from mimkit.parts import TARGET_SECTIONS
from mimkit.registry import registrar

TARGETS: dict[str, type["Target"]] = {}
register_target = registrar(TARGETS, sections=TARGET_SECTIONS)


@dataclass
class TargetContext:
    """What a target needs to know of the run: the encoder's geometry and the data's normalization."""
    img_size: int
    patch_size: int
    data_name: str
    method: str = ""
    in_chans: int = 3

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def stats(self) -> tuple:
        return dataset_stats(self.data_name)


class Target(ABC):
    name: str = ""
    Config: type | None = None  # the kind's section `target.<name>`; None: no settings
    ids: bool = False  # True: LongTensor[B, N] ids in [0, out_dim); False: float features [B, N, out_dim]
    panel_name: str = "original_masked_reconstruction"

    def __init__(self, cfg, ctx: TargetContext):
        self.cfg, self.ctx = cfg, ctx
        self.out_dim = 0  # each kind sets it: features per patch, or the number of ids

    @abstractmethod
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The target of images [B, C, H, W]: [B, N, out_dim] floats, or [B, N] ids when `ids`."""

    @torch.no_grad()
    def panel(self, imgs: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor) -> torch.Tensor | None:
        """One image [3, H, W] in [0, 1] showing the prediction `pred` [B, N, out_dim] (every position) against
        this target on `imgs` with `mask`; None when the kind has nothing to draw."""
        return None


class Frozen:
    """A module used as a fixed function (its `forward`, or the method named by `call`): eval mode, no
    gradients, moved to its input's device on first use."""

    def __init__(self, module: nn.Module, call: str = "forward"):
        self.module, self.call = module.eval().requires_grad_(False), call

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, *args) -> torch.Tensor:
        first = next(itertools.chain(self.module.parameters(), self.module.buffers()), None)
        if first is not None and first.device != x.device:
            self.module.to(x.device)
        return getattr(self.module, self.call)(x, *args)


def build_target(target_cfg, ctx: TargetContext) -> Target:
    """The target named by target_cfg.kind, with its section."""
    cls = TARGETS[target_cfg.kind]
    return cls(getattr(target_cfg, target_cfg.kind, None), ctx)
