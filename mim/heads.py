"""Heads: what turns the encoder's tokens into a prediction of the target. Each head fixes the encoder mode it
needs (`encoder_mode`: "drop" feeds the encoder the visible patches only, "token" every patch with masked ones
as a mask token), the attribute it lives under in a method (`attr`, kept from the original methods so their
checkpoints load), and optionally its own config section (`Config`, named after the head).

- `decoder` (MAE, ClusterMIM): MAE's transformer decoder over visible tokens + mask tokens, [B, N, out_dim].
- `linear` (SimMIM, MaskFeat): one linear map per patch token, xavier init, [B, N, out_dim].
- `masked_linear` (BEiT's lm_head): the same map evaluated at the masked positions only, [M, out_dim] in the
  order of mask.nonzero(), trunc-normal(0.02) init.
Heads register with `@register_head(name)`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .registry import registrar
from .vit import ViT, init_weights, make_blocks, sincos_pos_embed, visible_first

HEADS: dict[str, type[nn.Module]] = {}
register_head = registrar(HEADS)


@dataclass
class DecoderConfig:
    """MAE's decoder (the `decoder` section); MAE ViT-B: 8 blocks of width 512, 16 heads."""
    depth: int = 8
    embed_dim: int = 512
    num_heads: int = 16


@register_head("decoder")
class MAEDecoder(nn.Module):
    """MAE's decoder: project the visible tokens, fill masked slots with a shared mask token, add fixed
    sin-cos positions, a few transformer blocks, norm, and a linear map to `out_dim` per patch
    (p*p*3 pixels for MAE, K logits for ClusterMIM)."""
    Config = DecoderConfig
    encoder_mode, attr = "drop", "decoder"

    def __init__(self, grid: int, embed_dim: int, out_dim: int, dim: int = 512, depth: int = 8, num_heads: int = 16,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid, dim))
        self.blocks = make_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def build(cls, cfg, encoder: ViT, out_dim: int) -> "MAEDecoder":
        d = cfg.decoder
        return cls(encoder.grid, encoder.embed_dim, out_dim, d.embed_dim, d.depth, d.num_heads, cfg.model.mlp_ratio)

    def forward(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """latent: encoder output [B, 1 + n_visible, D] (CLS first); mask: [B, N] bool. Returns [B, N, out_dim]."""
        x = self.embed(latent)
        (B, N), D = mask.shape, x.shape[-1]
        # MAE's unshuffle: [visible tokens, mask tokens], then each token back to its grid slot
        patches = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(B, N + 1 - x.shape[1], -1)], dim=1)
        slots = visible_first(mask).argsort(dim=1)  # grid slot -> its row in `patches`
        patches = torch.gather(patches, 1, slots.unsqueeze(-1).expand(-1, -1, D))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]

    dense = forward  # every position already


@register_head("linear")
class LinearHead(nn.Linear):
    """One linear map per patch token (SimMIM: a 1x1 conv; MaskFeat), MAE's xavier init."""
    Config = None
    encoder_mode, attr = "token", "head"

    @classmethod
    def build(cls, cfg, encoder: ViT, out_dim: int) -> "LinearHead":
        head = cls(encoder.embed_dim, out_dim)
        head.init()
        return head

    def init(self) -> None:
        self.apply(init_weights)

    def dense(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1 + N, D] (CLS first) -> [B, N, out_dim] at every position."""
        return nn.functional.linear(tokens[:, 1:], self.weight, self.bias)

    forward = dense


@register_head("masked_linear")
class MaskedLinearHead(LinearHead):
    """BEiT's lm_head: the linear map over the masked patch tokens only (trunc-normal std 0.02, zero bias)."""

    def init(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1 + N, D] (CLS first) -> [M, out_dim] at the masked positions, in mask.nonzero() order."""
        return nn.functional.linear(tokens[:, 1:][mask], self.weight, self.bias)
