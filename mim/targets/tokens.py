"""Token ids (BEiT: dVAE, BEiT v2: VQ-KD, ClusterMIM: k-means, and any kind in mimkit.tokenizers.TOKENIZERS):
the id of each patch under a frozen tokenizer file, computed from the same augmented view the encoder sees
(converted to the tokenizer's own normalization). The panel tints masked patches green where the arg-max
prediction is the tokenizer's id and red where it is not."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mimkit.config import ConfigError
from mimkit.data import denormalize
from mimkit.images import image_grid, patchify, renormalize, unpatchify
from mimkit.tokenizers.base import Tokenizer

from .base import Frozen, Target, TargetContext, register_target


@dataclass
class TokensConfig:
    tokenizer: str = ""  # path of a tokenizer file (`mimkit tokenizer train`)
    vocab_size: int = 0  # 0 = the tokenizer's; when set, checked against it


def hits_panel(imgs: torch.Tensor, mask: torch.Tensor, hits: torch.Tensor, p: int, data_name: str) -> torch.Tensor:
    """Rows original / masked / masked patches tinted green where the predicted id is the tokenizer's and red
    where it is not."""
    x = denormalize(imgs.float(), data_name)
    patches = patchify(x, p)
    green, red = (torch.tensor(c, device=x.device).repeat(p * p) for c in ([0.1, 0.9, 0.1], [0.9, 0.1, 0.1]))
    tint = torch.where(hits.unsqueeze(-1), green, red)
    m = mask.unsqueeze(-1)
    masked = torch.where(m, torch.zeros_like(patches), patches)
    tinted = torch.where(m, 0.5 * patches + 0.5 * tint, patches)
    return image_grid([x, unpatchify(masked, p, x.shape[1]), unpatchify(tinted, p, x.shape[1])])


def load_checked(cfg: TokensConfig, ctx: TargetContext) -> Tokenizer:
    """The tokenizer file of target.tokens.tokenizer, checked against the encoder's patch grid and (when set)
    target.tokens.vocab_size; mistakes are ConfigErrors raised before training starts."""
    path = cfg.tokenizer
    if not path:
        raise ConfigError(f"target.tokens.tokenizer is required for method={ctx.method or 'this method'}: the path of "
                          f"a tokenizer file (train one with `mimkit tokenizer train --config "
                          f"configs/tokenizer/<kind>_*.yaml`)")
    if not Path(path).is_file():
        raise ConfigError(f"target.tokens.tokenizer={path!r}: no such file")
    tok = Tokenizer.load(path)
    if tok.grid != ctx.grid:
        raise ConfigError(f"target.tokens.tokenizer {path} has a {tok.grid}x{tok.grid} token grid but the encoder has "
                          f"{ctx.grid}x{ctx.grid} patches (data.img_size={ctx.img_size} / model.patch_size="
                          f"{ctx.patch_size}); train the tokenizer for this grid")
    if cfg.vocab_size and cfg.vocab_size != tok.vocab_size:
        raise ConfigError(f"target.tokens.vocab_size={cfg.vocab_size} does not match target.tokens.tokenizer {path} "
                          f"(vocab_size {tok.vocab_size}); set target.tokens.vocab_size={tok.vocab_size} or 0")
    return tok


class TokenIds:
    """A tokenizer as a fixed function of images normalized with `data_stats`: ids LongTensor[B, N], frozen,
    computed in the tokenizer's own normalization."""

    def __init__(self, tokenizer: Tokenizer, data_stats: tuple):
        self.tokenizer, self.data_stats = tokenizer, data_stats
        self.encode = Frozen(tokenizer, call="encode")
        self.own_stats = (tokenizer.mean, tokenizer.std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(renormalize(images, self.data_stats, self.own_stats))


@register_target("tokens")
class Tokens(Target):
    Config = TokensConfig
    ids = True
    panel_name = "original_masked_hits"

    def __init__(self, cfg: TokensConfig, ctx: TargetContext):
        super().__init__(cfg, ctx)
        self.tokenizer = load_checked(cfg, ctx)
        self.ids_of = TokenIds(self.tokenizer, ctx.stats)
        self.out_dim = self.tokenizer.vocab_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """ids LongTensor[B, N], frozen and without gradients."""
        return self.ids_of(images)

    @torch.no_grad()
    def panel(self, imgs, mask, pred):
        hits = pred.argmax(-1) == self(imgs)
        return hits_panel(imgs, mask, hits, self.ctx.patch_size, self.ctx.data_name)
