"""A method is a composition of parts, each named in its recipe (dotted config keys applied under the data
preset, config files and command-line overrides):

- the encoder (mimkit.vit), in the mode its head needs: visible patches only ("drop") or mask tokens ("token");
- the mask generator (`mask.kind`, mimkit.masking; it runs in the data loader);
- the head (`head`, mimkit.heads) and the target (`target.kind`, mimkit.targets);
- the loss (`loss`, mimkit.losses) between them at the masked positions.

A recipe-only method is a class with a `recipe`; a method that adds to the composition (BEiT v2's auxiliary
head) overrides `forward` and may bring its own config section (`Config`, named after the method).
"""
from __future__ import annotations

import torch
from torch import nn

from mimkit.config import ConfigError
from mimkit.heads import HEADS
from mimkit.losses import LOSSES
from mimkit.masking import prefer_kept
from mimkit.parts import METHOD_SECTIONS, RECIPES
from mimkit.registry import registrar
from mimkit.targets import TARGETS, TargetContext, build_target
from mimkit.targets.ema import EMATeacher
from mimkit.vit import build_encoder

METHODS: dict[str, type["Method"]] = {}
register_method = registrar(METHODS, sections=METHOD_SECTIONS, recipes=RECIPES)


def target_context(cfg) -> TargetContext:
    return TargetContext(cfg.data.img_size, cfg.model.patch_size, cfg.data.name, cfg.method)


def check_parts(cfg) -> None:
    """The recipe (or the user) named a head, a target and a loss that fit together."""
    for key, value, table in (("head", cfg.head, HEADS), ("loss", cfg.loss, LOSSES),
                              ("target.kind", cfg.target.kind, TARGETS)):
        if value not in table:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(table)}")
    wants_ids, has_ids = LOSSES[cfg.loss][1], TARGETS[cfg.target.kind].ids
    if wants_ids != has_ids:
        fit = [name for name, (_, ids) in LOSSES.items() if ids == has_ids]
        raise ConfigError(f"loss={cfg.loss} takes {'token ids' if wants_ids else 'float features'} but "
                          f"target.kind={cfg.target.kind} gives {'ids' if has_ids else 'float features'}; "
                          f"use loss={' or '.join(fit)}")


class Method(nn.Module):
    name: str = ""
    recipe: dict = {}
    Config: type | None = None  # the method's own section `<name>`; None: no settings of its own
    mask_sets: bool = False  # True: takes the context + target masks of mask.kind=multiblock (I-JEPA)

    def __init__(self, cfg):
        super().__init__()
        check_parts(cfg)
        self.cfg = cfg
        self.encoder = build_encoder(cfg.model, cfg.data.img_size)
        if (cfg.mask.kind == "multiblock") != self.mask_sets:
            raise ConfigError(f"method={cfg.method} takes {'only' if self.mask_sets else 'no'} mask.kind=multiblock "
                              f"(context and target blocks, I-JEPA's)")
        self.target = build_target(cfg.target, target_context(cfg))  # not a submodule: frozen, outside the optimizer
        if isinstance(self.target, EMATeacher):  # the exception: a teacher that follows the encoder, in the checkpoint
            self.target.follow(self.encoder)
        head_cls = HEADS[cfg.head]
        self.add_module(head_cls.attr, head_cls.build(cfg, self.encoder, self.target.out_dim))
        self.head_attr = head_cls.attr
        self.loss = LOSSES[cfg.loss][0]
        self.panel_name = self.target.panel_name
        if cfg.mask.prefer_kept and not (getattr(self.target, "drops_patches", False) and cfg.mask.clones == 1):
            raise ConfigError(f"mask.prefer_kept=true needs target.kind=tokens with a tokenizer that drops patches "
                              f"(kind lavit) and one mask per image (mask.clones=1); method={cfg.method} has "
                              f"target.kind={cfg.target.kind}")

    def after_step(self, progress: float) -> None:
        """After every optimizer step; `progress` = the updates before this one / the run's updates. The EMA
        teacher follows the encoder here."""
        if isinstance(self.target, EMATeacher):
            self.target.update(self.encoder, progress)

    @property
    def predictor(self) -> nn.Module:
        """The head (under its attribute: `decoder` or `head`)."""
        return getattr(self, self.head_attr)

    def tokens(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder's tokens [B, 1 + n, D] in the head's mode."""
        return self.encoder(imgs, mask, mode=self.predictor.encoder_mode)

    def predict(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The head's prediction: [B, N, out_dim], or [M, out_dim] at the masked positions (masked_linear)."""
        return self.predictor(self.tokens(imgs, mask), mask)

    def target_and_mask(self, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target of imgs (frozen, without gradients) and the mask to train with: the loader's, or with
        mask.prefer_kept moved onto the patches the tokenizer keeps (mimkit.masking.prefer_kept)."""
        if not self.cfg.mask.prefer_kept:
            return self.target(imgs), mask
        target, keep = self.target.ids_and_keep(imgs)
        return target, prefer_kept(mask, keep)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> dict:
        """{"loss": scalar, other scalars the loss reports, "pred": the prediction}."""
        target, mask = self.target_and_mask(imgs, mask)
        pred = self.predict(imgs, mask)
        return {**self.loss(pred, target, mask), "pred": pred}

    def masked_logits(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The prediction at the masked positions [M, out_dim], rows in mask.nonzero() order (as in the loss)."""
        pred = self.predict(imgs, mask)
        return pred if pred.dim() == 2 else pred[mask]

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The TensorBoard / reconstructions.png panel of the target kind (one image [3, H, W] in [0, 1])."""
        return self.target.panel(imgs, mask, self.predictor.dense(self.tokens(imgs, mask), mask))


def build_method(cfg) -> Method:
    return METHODS[cfg.method](cfg)
