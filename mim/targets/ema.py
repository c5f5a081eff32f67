"""The EMA teacher (data2vec 2.0, I-JEPA): a copy of the student encoder that follows it by an exponential moving
average after every optimizer step, and whose features on the full image are the target.

Unlike the other kinds, this one is state of the run: the teacher is a submodule of the method (under `target.`),
so it is in the checkpoint and an interrupted run resumes bit for bit; its parameters do not require gradients,
so they are in neither the optimizer (timm's parameter groups skip them) nor DDP's gradient buckets; `train()`
leaves it in eval mode. Every rank updates it from the same synchronized student, so the ranks hold the same
teacher.

- momentum: linear from `momentum` to `momentum_end` over the first `anneal_end` share of the run's updates,
  then held (I-JEPA: 0.996 -> 1.0 over the whole run; data2vec 2.0: 0.9998 -> 0.99999 over 100k of 375.3k
  updates). The update after the i-th step uses the momentum at progress i / updates (I-JEPA's scheduler), as
  t <- m t + (1 - m) s.
- features: `top_k=0` the teacher's output tokens after its final norm (I-JEPA); K > 0 the mean of its last K
  blocks' feed-forward outputs before the residual (data2vec 2.0's ffn targets), each first instance-normalized
  over the patches per channel with `instance_norm` (data2vec 2.0); then, with `norm=layernorm`, LayerNorm without
  affine per patch (both). CLS is dropped: [B, N, D].
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.config import check_range
from mimkit.parts import EMAConfig

from .base import Target, TargetContext, register_target


def instance_norm_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, N, D] normalized over N for each sample and channel (F.instance_norm on [B, D, N], eps 1e-5)."""
    return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)


def average_top_k(layers: list[torch.Tensor], instance_norm: bool, layer_norm: bool) -> torch.Tensor:
    """data2vec 2.0's make_targets: the mean of `layers` ([B, N, D] each, float32), each instance-normalized
    first when asked, then the mean LayerNorm'd (no affine) when asked."""
    layers = [x.float() for x in layers]
    if instance_norm:
        layers = [instance_norm_tokens(x) for x in layers]
    y = torch.stack(layers).mean(dim=0)
    return F.layer_norm(y, y.shape[-1:]) if layer_norm else y


@register_target("ema")
class EMATeacher(Target, nn.Module):
    Config = EMAConfig

    def __init__(self, cfg: EMAConfig, ctx: TargetContext):
        nn.Module.__init__(self)
        Target.__init__(self, cfg, ctx)
        for key in ("momentum", "momentum_end"):
            check_range(f"target.ema.{key}", getattr(cfg, key), 0, 1)
        check_range("target.ema.anneal_end", cfg.anneal_end, 0, 1, lo_open=True)
        check_range("target.ema.top_k", cfg.top_k, 0)
        self.teacher: nn.Module | None = None
        # the momentum of the last update, a device scalar the method reports (no host sync)
        self.register_buffer("momentum_now", torch.tensor(float(cfg.momentum)))

    def follow(self, student: nn.Module) -> None:
        """Start the teacher as a copy of `student` (a ViT; target.ema.top_k <= its depth, checked with the config);
        sets out_dim to its width."""
        self.teacher = copy.deepcopy(student).requires_grad_(False).eval()
        self.out_dim = student.embed_dim

    def train(self, mode: bool = True) -> "EMATeacher":
        return super().train(False)  # the teacher never drops paths

    def momentum(self, progress: float) -> float:
        """The momentum at `progress` = updates done / the run's updates."""
        c = self.cfg
        return c.momentum + (c.momentum_end - c.momentum) * min(progress / c.anneal_end, 1.0)

    @torch.no_grad()
    def update(self, student: nn.Module, progress: float) -> None:
        """t <- m t + (1 - m) s for every parameter, m = momentum(progress)."""
        m = self.momentum(progress)
        teacher = list(self.teacher.parameters())
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, [p.detach() for p in student.parameters()], alpha=1 - m)
        self.momentum_now.fill_(m)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's features [B, N, D] (float32) on the full images."""
        k = self.cfg.top_k
        if k == 0:
            y = self.teacher(images)[:, 1:].float()
            return F.layer_norm(y, y.shape[-1:]) if self.cfg.norm == "layernorm" else y
        outs: list[torch.Tensor] = []
        hooks = [blk.mlp.register_forward_hook(lambda mod, inp, out: outs.append(out[:, 1:]))
                 for blk in self.teacher.blocks[-k:]]
        try:
            self.teacher(images)
        finally:
            for h in hooks:
                h.remove()
        return average_top_k(outs, self.cfg.instance_norm, self.cfg.norm == "layernorm")
