"""Token ids (BEiT: dVAE, BEiT v2: VQ-KD, ClusterMIM: k-means, and any kind in mimkit.tokenizers.TOKENIZERS):
the id of each patch under a frozen tokenizer file, computed from the same augmented view the encoder sees
(converted to the tokenizer's own normalization).

A tokenizer that drops patches (LaVIT's, mimkit.tokenizers.lavit) gives -1 at its dropped patches;
`target.tokens.dropped` says what they train on: `ignore` (the id stays -1 and the cross-entropy skips it, so
only masked and kept patches count) or `merged` (the id of the kept token that read the patch most in LaVIT's
merger)."""
from __future__ import annotations

from pathlib import Path

import torch

from mimkit.config import ConfigError
from mimkit.images import renormalize
from mimkit.parts import TokensConfig
from mimkit.tokenizers.base import Tokenizer
from mimkit.tokenizers.lavit import LaVIT

from .base import Frozen, Target, TargetContext, register_target
from .panels import score_panel


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
        self.drops_patches = isinstance(self.tokenizer, LaVIT)
        self.dynamic = Frozen(self.tokenizer, call="dynamic") if self.drops_patches else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """ids LongTensor[B, N], frozen and without gradients (-1 at dropped patches with dropped=ignore)."""
        return self.ids_and_keep(images)[0] if self.drops_patches else self.ids_of(images)

    def ids_and_keep(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, N] as `__call__`, the tokenizer's keep mask BoolTensor[B, N]: all True for fixed-grid kinds)."""
        if not self.drops_patches:
            ids = self.ids_of(images)
            return ids, torch.ones_like(ids, dtype=torch.bool)
        ids, merged = self.dynamic(renormalize(images, self.ids_of.data_stats, self.ids_of.own_stats))
        return (merged if self.cfg.dropped == "merged" else ids), ids >= 0

    @torch.no_grad()
    def panel(self, imgs, mask, pred):
        """Masked patches green where the arg-max prediction is the tokenizer's id, red where it is not."""
        hits = pred.argmax(-1) == self(imgs)  # a dropped patch (-1, dropped=ignore) shows as a miss
        return score_panel(imgs, mask, hits, self.ctx.patch_size, self.ctx.data_name)
