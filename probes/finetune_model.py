"""A timm or OpenCLIP model (`probe finetune --checkpoint timm:<arch>|openclip:<arch> --weights FILE`, or a
fine-tuned one) as a classifier to fine-tune: the data's images brought to the model's own normalization and input
size, the feature the model pools itself, a fresh linear head (MAE's init, std 2e-5). Layer-wise lr decay reads
its blocks through `group_matcher`, as timm's `param_groups_layer_decay` does for timm's own models."""
from __future__ import annotations

import re

import torch
from timm.layers import trunc_normal_
from torch import nn

from mimkit.data import dataset_stats
from mimkit.images import renormalize, resize
from mimkit.teachers import ProbeEncoder, pooled_feature, trainable_copy

from .export import timm_arch_args, timm_kwargs

# OpenCLIP's own ViT: patch embedding and positions are layer 0, resblock i is i + 1, the final norm and projection
# the top (the head, matched by nothing, joins them there)
OPENCLIP_GROUPS = {"stem": r"^(?:conv1|class_embedding|positional_embedding|ln_pre)",
                   "blocks": [(r"^transformer\.resblocks\.(\d+)", None), (r"^(?:ln_post|proj|attn_pool)", (99999,))]}


def prefixed(matcher: dict, prefix: str) -> dict:
    """A timm group_matcher of a submodule as one of its parent's: every pattern anchored under `prefix`."""
    def one(pattern: str) -> str:
        return f"^{re.escape(prefix)}(?:{pattern.removeprefix('^')})"
    return {name: one(spec) if isinstance(spec, str) else [(one(p), suffix) for p, suffix in spec]
            for name, spec in matcher.items()}


class Classifier(nn.Module):
    """images normalized with `stats` [B, 3, H, W] -> logits [B, num_classes]; `spec` rebuilds `model` (the
    teachers' loader) and its weights are the state's `model.*` entries."""

    def __init__(self, encoder: ProbeEncoder, num_classes: int, drop_path: float = 0.0):
        super().__init__()
        teacher = encoder.teacher
        self.model, self.spec = trainable_copy(teacher, drop_path)
        self.source, self.stats = self.spec["source"], encoder.stats
        self.mean, self.std, self.input_size = teacher.mean, teacher.std, teacher.input_size
        with torch.no_grad():
            dim = self.pooled(torch.zeros(1, 3, self.input_size, self.input_size)).shape[-1]
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D] of images already at the model's input size and normalization."""
        return pooled_feature(self.model, self.source, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize(renormalize(x, self.stats, (self.mean, self.std)), self.input_size)
        return self.head(self.pooled(x))

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer groups under `model.`: a timm model's own, an OpenCLIP tower's resblocks (or its timm
        trunk's); the head is in the top group."""
        if self.source == "timm":
            return prefixed(self.model.group_matcher(coarse), "model.")
        trunk = getattr(self.model, "trunk", None)
        if trunk is not None:
            return prefixed(trunk.group_matcher(coarse), "model.trunk.")
        return prefixed(OPENCLIP_GROUPS, "model.")

    def no_weight_decay(self) -> set[str]:
        """The model's own list (timm's pos_embed and cls_token, OpenCLIP's positions and class embedding)."""
        trunk = getattr(self.model, "trunk", None) if self.source == "openclip" else None
        inner, prefix = (trunk, "model.trunk.") if trunk is not None else (self.model, "model.")
        return {f"{prefix}{n}" for n in getattr(inner, "no_weight_decay", set)()}


def saved_model(run, model: nn.Module, num_classes: int) -> dict:
    """What a fine-tuning checkpoint records beside the weights so that `probe --checkpoint <it>` rebuilds the model
    (mimkit.teachers.load_finetuned): the teachers' spec of a timm or OpenCLIP model and where its weights sit in
    the state; a mimkit encoder's VisionTransformer is timm's named ViT of its width, every shape value pinned and
    the data's normalization as its own (plus its kwargs, as before)."""
    if isinstance(model, Classifier):
        return {"encoder": {"spec": model.spec, "prefix": "model."}}
    kwargs = timm_kwargs(run.encoder, num_classes=num_classes, global_pool="avg")
    mean, std = dataset_stats(run.cfg.data.name)
    spec = {"source": "timm", "name": timm_arch_args(run.encoder)[0],
            "kwargs": {**kwargs, "pretrained_cfg_overlay": {"mean": list(mean), "std": list(std)}}}
    return {"timm_kwargs": kwargs, "encoder": {"spec": spec, "prefix": ""}}
