"""The one registry: method name -> model that turns (images, mask) into a loss.

A method owns its encoder, decoder/head and target; `recipe` holds the paper's defaults as dotted config
keys (applied under data presets, config files and command-line overrides)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import MAEDecoder
from .data import denormalize
from .targets import patchify, pixel_target, unpatchify
from .vit import build_encoder, init_weights

METHODS: dict[str, type["Method"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def image_grid(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack batches [B, 3, H, W] as rows of one image; tiny images (digits) are blown up for legibility."""
    from torchvision.utils import make_grid
    x = torch.cat(rows)
    scale = max(1, 64 // x.shape[-1])
    x = F.interpolate(x, scale_factor=scale, mode="nearest")
    return make_grid(x, nrow=len(rows[0]), padding=2, pad_value=1.0)


def masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of a per-patch loss [B, N] over the masked patches only."""
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum()


class Method(nn.Module):
    name: str = ""
    recipe: dict = {}
    encoder_mode: str = "drop"  # "drop": encoder sees visible patches only; "token": mask token

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.model, cfg.data.img_size)
        self.patch_size = cfg.model.patch_size

    # Each method defines forward(imgs, mask) -> {"loss": scalar, ...}.

    panel_name = "original_masked_reconstruction"

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Images rebuilt from the prediction with visible patches pasted back, for the panels; None when the
        target is not pixels."""
        return None

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor, mask: torch.Tensor, data_name: str) -> torch.Tensor | None:
        """The TensorBoard / reconstructions.png panel, one image [3, H, W] in [0, 1]: rows original / masked /
        reconstruction. Methods whose target is not pixels override it (or return None)."""
        rec = self.reconstruct(imgs, mask)
        if rec is None:
            return None
        p = self.patch_size
        patches = patchify(imgs, p)
        masked = unpatchify(torch.where(mask.unsqueeze(-1), torch.zeros_like(patches), patches), p, imgs.shape[1])
        return image_grid([denormalize(x.float(), data_name) for x in (imgs, masked, rec)])


class TokenHeadMethod(Method):
    """Mask-token encoder and one linear head per patch token (SimMIM, MaskFeat); `out_dim(cfg)` sizes the head."""
    encoder_mode = "token"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.head = nn.Linear(self.encoder.embed_dim, self.out_dim(cfg))
        self.head.apply(init_weights)

    def predict(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The head's prediction [B, N, out_dim] for every patch from its token (the CLS token is dropped)."""
        return self.head(self.encoder(imgs, mask, mode="token")[:, 1:])


@register("mae")
class MAE(Method):
    recipe = {
        "mask.kind": "random", "mask.ratio": 0.75, "target.norm_pix": True,
        "optim.blr": 1.5e-4, "optim.lr_batch_ref": 256, "optim.betas": [0.9, 0.95], "optim.weight_decay": 0.05,
        "optim.warmup_epochs": 40, "optim.clip_grad": 0.0, "data.crop_scale": [0.2, 1.0],
    }

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.model
        self.decoder = MAEDecoder(self.encoder.grid, self.encoder.embed_dim, self.out_dim(cfg), m.decoder_embed_dim,
                                  m.decoder_depth, m.decoder_num_heads, m.mlp_ratio)

    def out_dim(self, cfg) -> int:
        return self.patch_size ** 2 * self.encoder.in_chans

    def predict(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(imgs, mask, mode="drop"), mask)

    def forward(self, imgs, mask):
        pred = self.predict(imgs, mask)
        target = pixel_target(imgs, self.patch_size, self.cfg.target.norm_pix)
        loss = masked_mean(((pred.float() - target) ** 2).mean(dim=-1), mask)
        return {"loss": loss, "pred": pred}

    @torch.no_grad()
    def reconstruct(self, imgs, mask):
        pred = self.predict(imgs, mask).float()
        if self.cfg.target.norm_pix:  # undo the per-patch standardization with the true patch statistics
            raw = pixel_target(imgs, self.patch_size)
            pred = pred * (raw.var(-1, keepdim=True) + 1e-6) ** 0.5 + raw.mean(-1, keepdim=True)
        visible = pixel_target(imgs, self.patch_size)
        out = torch.where(mask.unsqueeze(-1), pred, visible)
        return unpatchify(out, self.patch_size, imgs.shape[1])


def build_method(cfg) -> Method:
    return METHODS[cfg.method](cfg)


# Methods defined in their own modules (`from .methods import Method, register`) register on import;
# add yours to this line.
from . import maskfeat, simmim  # noqa: E402,F401
from . import beit, clustermim  # noqa: E402,F401
