"""ViT encoder on timm blocks with the two masked modes MIM needs.

- mode="drop": only visible patches enter the blocks (MAE, ClusterMIM). The boolean mask must mask the
  same number of patches in every sample so the visible tokens form a dense [B, n_visible, D] tensor.
- mode="token": masked patch embeddings are replaced by a learned mask token and every patch enters the
  blocks (SimMIM, MaskFeat, BEiT).

Parameter names follow timm's VisionTransformer (patch_embed, cls_token, pos_embed, blocks, norm), so an
encoder exports to timm by dropping `mask_token`.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from .sections import ARCHS, ModelConfig  # noqa: F401  (re-exported)

def sincos_pos_embed(grid: int, dim: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos positions [1, (1+) grid*grid, dim]; the CLS slot gets zeros (as in MAE)."""
    pe = build_sincos2d_pos_embed([grid, grid], dim=dim, temperature=10000.0)
    if cls_token:
        pe = torch.cat([torch.zeros(1, dim), pe], dim=0)
    return pe.unsqueeze(0)


def visible_first(mask: torch.Tensor) -> torch.Tensor:
    """Per sample, the patch indices with the visible ones first, each group in grid order: [B, N]. Index
    gathers with it, unlike boolean indexing, keep shapes static for torch.compile and launch no nonzero."""
    return mask.to(torch.uint8).argsort(dim=1, stable=True)


def init_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform linears with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                layer_scale: float = 0.0) -> nn.ModuleList:
    dpr = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
    return nn.ModuleList([
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, init_values=layer_scale or None, drop_path=dpr[i],
              norm_layer=partial(nn.LayerNorm, eps=1e-6))
        for i in range(depth)
    ])


def use_fused_attention(model: nn.Module, fused: bool) -> None:
    """Switch every timm attention layer in `model` between torch's fused scaled-dot-product kernel and timm's
    plain matmul-softmax-matmul path (the same function)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


class ViT(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale: float = 0.0):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, embed_dim))
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path, layer_scale)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(init_weights)
        w = self.patch_embed.proj.weight.data  # init the conv like a linear layer (MAE)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "drop") -> torch.Tensor:
        """Patch embeddings + positions (+ CLS) after masking; [B, 1 + n, D]."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        B, N, D = x.shape
        if mask is not None:
            if mode == "drop":
                masked = mask.sum(1).unique()  # one host sync, as boolean indexing would take
                if len(masked) != 1:
                    raise ValueError(f"mode='drop' needs the same number of masked patches in every sample, "
                                     f"got {masked.tolist()}")
                keep = visible_first(mask)[:, : N - int(masked)]  # visible patches, in grid order
                x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, D))
            elif mode == "token":
                w = mask.unsqueeze(-1).to(x.dtype)
                x = x * (1 - w) + (self.mask_token + self.pos_embed[:, 1:]) * w
            else:
                raise ValueError(f"mode must be 'drop' or 'token', got {mode!r}")
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "drop",
                return_layers: tuple[int, ...] = ()) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Tokens after the final norm, [B, 1 + n, D]; with `return_layers` also the raw outputs of those
        blocks (0-based; -1 = last)."""
        x = self.embed(x, mask, mode)
        wanted = {i % self.depth for i in return_layers}
        layers = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in wanted:
                layers.append(x)
        x = self.norm(x)
        return (x, layers) if return_layers else x


def build_encoder(model_cfg, img_size: int, in_chans: int = 3) -> ViT:
    dims = model_cfg.resolved()
    return ViT(img_size=img_size, patch_size=model_cfg.patch_size, in_chans=in_chans, mlp_ratio=model_cfg.mlp_ratio,
               drop_path=model_cfg.drop_path, layer_scale=model_cfg.layer_scale, **dims)
