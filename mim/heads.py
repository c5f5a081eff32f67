"""Decoders and prediction heads that sit on top of the encoder."""
from __future__ import annotations

import torch
from torch import nn

from .vit import init_weights, make_blocks, sincos_pos_embed, visible_first


class MAEDecoder(nn.Module):
    """MAE's decoder: project the visible tokens, fill masked slots with a shared mask token, add fixed
    sin-cos positions, a few transformer blocks, norm, and a linear map to `out_dim` per patch
    (p*p*3 pixels for MAE, K logits for ClusterMIM)."""

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
