"""Heads: what turns the encoder's tokens into a prediction of the target. Each head fixes the encoder mode it
needs (`encoder_mode`: "drop" feeds the encoder the visible patches only, "token" every patch with masked ones
as a mask token), the attribute it lives under in a method (`attr`, kept from the original methods so their
checkpoints load), and optionally its own config section (`Config`, named after the head).

- `decoder` (MAE, ClusterMIM): MAE's transformer decoder over visible tokens + mask tokens, [B, N, out_dim].
- `linear` (SimMIM, MaskFeat): one linear map per patch token, xavier init, [B, N, out_dim].
- `masked_linear` (BEiT's lm_head): the same map evaluated at the masked positions only, [M, out_dim] in the
  order of mask.nonzero(), trunc-normal(0.02) init.
- `conv_decoder` (data2vec 2.0): convolutions over the restored token grid, [B, N, out_dim].
- `predictor` (I-JEPA): a narrow transformer from the context tokens to the target blocks' positions.
Heads register with `@register_head(name)`."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .parts import HEAD_SECTIONS, ConvDecoderConfig, DecoderConfig, PredictorConfig
from .registry import registrar
from .vit import ViT, init_weights, make_blocks, sincos_pos_embed, visible_first

HEADS: dict[str, type[nn.Module]] = {}
register_head = registrar(HEADS, sections=HEAD_SECTIONS)


def token_trunk(module: nn.Module, grid: int, embed_dim: int, dim: int, depth: int, num_heads: int,
                mlp_ratio: float) -> None:
    """The layers MAE's decoder and I-JEPA's predictor share, set on `module` in this order: the projection from
    the encoder's width, a mask token, fixed sin-cos positions of the grid, `depth` blocks and a final norm."""
    module.embed = nn.Linear(embed_dim, dim)
    module.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
    module.register_buffer("pos_embed", sincos_pos_embed(grid, dim))
    module.blocks = make_blocks(dim, depth, num_heads, mlp_ratio)
    module.norm = nn.LayerNorm(dim, eps=1e-6)


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
        token_trunk(self, grid, embed_dim, dim, depth, num_heads, mlp_ratio)
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


@register_head("conv_decoder")
class ConvDecoder(nn.Module):
    """Visible tokens back in their grid slots, masked slots noise; `depth` layers of grouped conv (same padding),
    LayerNorm over channels without affine and GELU, each added to its input when the widths match (fairseq's
    decoder_residual); a linear map to `out_dim` per patch."""
    Config = ConvDecoderConfig
    encoder_mode, attr = "drop", "decoder"

    def __init__(self, grid: int, embed_dim: int, out_dim: int, dim: int, depth: int = 6, kernel: int = 3,
                 groups: int = 16, noise_std: float = 0.01):
        super().__init__()
        self.grid, self.noise_std = grid, noise_std
        self.convs = nn.ModuleList([nn.Conv2d(embed_dim if i == 0 else dim, dim, kernel, padding=kernel // 2,
                                              groups=groups) for i in range(depth)])
        self.proj = nn.Linear(dim, out_dim)

    @classmethod
    def build(cls, cfg, encoder: ViT, out_dim: int) -> "ConvDecoder":
        d = cfg.conv_decoder
        dim = d.embed_dim or encoder.embed_dim
        for key, value in (("conv_decoder.depth", d.depth), ("conv_decoder.kernel", d.kernel),
                           ("conv_decoder.groups", d.groups)):
            if value < 1:
                raise ConfigError(f"{key}={value} must be at least 1")
        if d.kernel % 2 == 0 or encoder.embed_dim % d.groups or dim % d.groups:
            raise ConfigError(f"conv_decoder.groups={d.groups} must divide the encoder's width {encoder.embed_dim} "
                              f"and conv_decoder.embed_dim={dim}, and conv_decoder.kernel={d.kernel} must be odd")
        return cls(encoder.grid, encoder.embed_dim, out_dim, dim, d.depth, d.kernel, d.groups, d.noise_std)

    def forward(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """latent: encoder output [B, 1 + n_visible, D] (CLS first); mask: [B, N] bool. Returns [B, N, out_dim]."""
        x = latent[:, 1:]
        (B, N), D = mask.shape, x.shape[-1]
        noise = x.new_empty(B, N - x.shape[1], D).normal_(0, self.noise_std)
        slots = visible_first(mask).argsort(dim=1)
        x = torch.gather(torch.cat([x, noise], dim=1), 1, slots.unsqueeze(-1).expand(-1, -1, D))
        x = x.transpose(1, 2).reshape(B, D, self.grid, self.grid)
        for conv in self.convs:
            y = F.gelu(F.layer_norm(conv(x).permute(0, 2, 3, 1), (conv.out_channels,)).permute(0, 3, 1, 2))
            x = y + x if y.shape == x.shape else y
        return self.proj(x.flatten(2).transpose(1, 2))

    dense = forward


@register_head("predictor")
class JEPAPredictor(nn.Module):
    """I-JEPA's VisionTransformerPredictor: the context tokens projected to the predictor's width plus its fixed
    sin-cos positions, and for each target block a mask token plus the positions of that block's patches; the
    blocks run as separate sequences (the context repeated per block), then norm and a linear map back to the
    encoder's width at the target positions."""
    Config = PredictorConfig
    encoder_mode, attr = "drop", "jepa_predictor"

    def __init__(self, grid: int, embed_dim: int, out_dim: int, dim: int = 384, depth: int = 12, num_heads: int = 16,
                 mlp_ratio: float = 4.0):
        super().__init__()
        token_trunk(self, grid, embed_dim, dim, depth, num_heads, mlp_ratio)
        self.proj = nn.Linear(dim, out_dim)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @classmethod
    def build(cls, cfg, encoder: ViT, out_dim: int) -> "JEPAPredictor":
        p = cfg.predictor
        heads = p.num_heads or encoder.num_heads
        if p.depth < 1 or p.embed_dim < 1 or p.embed_dim % heads:
            raise ConfigError(f"predictor.depth={p.depth} and predictor.embed_dim={p.embed_dim} must be positive, and "
                              f"the width divisible by its {heads} heads (predictor.num_heads; 0 = the encoder's)")
        return cls(encoder.grid, encoder.embed_dim, out_dim, p.embed_dim, p.depth, heads, cfg.model.mlp_ratio)

    def forward(self, latent: torch.Tensor, context: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """latent: the context encoder's tokens [B, 1 + n, D] (CLS first) at the patches `context` [B, n] (grid
        indices); targets: [B, T, k] grid indices of T blocks. Returns the predictions [B, T, k, out_dim]."""
        (B, T, k), pos = targets.shape, self.pos_embed[0, 1:]
        x = self.embed(latent)
        x = x + torch.cat([self.pos_embed[:, :1].expand(B, -1, -1), pos[context]], dim=1)
        queries = (self.mask_token + pos[targets]).flatten(0, 1)  # [B * T, k, dim]
        x = torch.cat([x.repeat_interleave(T, dim=0), queries.to(x.dtype)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x[:, -k:])).unflatten(0, (B, T))
