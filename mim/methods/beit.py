"""BEiT (microsoft/unilm beit) and BEiT v2 (beit2): masked patches are replaced by a mask token, every patch
goes through the encoder, and a linear head over the tokenizer's vocabulary predicts each masked patch's id
(cross-entropy on masked positions only).

- `beit`: ids from a dVAE (`mimkit tokenizer train` with kind=dvae), computed on the half-resolution copy of
  the encoder's view inside the tokenizer.
- `beitv2`: ids from VQ-KD, plus the auxiliary head of BEiT v2: the final CLS token concatenated with the patch
  tokens of a middle block goes through 2 extra blocks, the shared final norm and the shared head; loss =
  main CE + auxiliary CE."""
from __future__ import annotations

import torch

from mimkit.config import ConfigError
from mimkit.parts import RECIPES, BEiTv2Config
from mimkit.vit import make_blocks

from .base import Method, register_method


@register_method("beit")
class BEiT(Method):
    recipe = RECIPES["beit"]


@register_method("beitv2")
class BEiTv2(BEiT):
    Config = BEiTv2Config

    def __init__(self, cfg):
        super().__init__(cfg)
        a, m, enc = cfg.beitv2, cfg.model, self.encoder
        self.aux_layer = a.aux_layer or enc.depth // 2  # BEiT v2 ViT-B: early_layers = 6 of 12
        if not 1 <= self.aux_layer <= enc.depth:
            raise ConfigError(f"beitv2.aux_layer={a.aux_layer} must be in 1..{enc.depth} (the encoder's depth), "
                              f"or 0 for depth // 2")
        self.aux_blocks = make_blocks(enc.embed_dim, a.aux_depth, enc.num_heads, m.mlp_ratio, m.drop_path,
                                      m.layer_scale)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> dict:
        target, mask = self.target_and_mask(imgs, mask)
        tokens, layers = self.encoder(imgs, mask, mode="token", return_layers=(self.aux_layer - 1, -1))
        middle, last = layers[0], layers[-1]  # one tensor when aux_layer is the last block
        main = self.loss(self.head(tokens, mask), target, mask)
        # auxiliary head: final CLS (before the final norm) + the middle block's patch tokens, 2 extra blocks,
        # then the encoder's final norm and the same head (BEiT v2's shared_lm_head)
        x = torch.cat([last[:, :1], middle[:, 1:]], dim=1)
        for blk in self.aux_blocks:
            x = blk(x)
        aux = self.loss(self.head(self.encoder.norm(x), mask), target, mask)
        return {"loss": main["loss"] + aux["loss"], "acc": main["acc"], "main_loss": main["loss"].detach(),
                "aux_loss": aux["loss"].detach(), "aux_acc": aux["acc"]}
