"""BEiT (microsoft/unilm beit) and BEiT v2 (beit2): masked patches are replaced by a mask token, every patch
goes through the encoder, and a linear head over the tokenizer's vocabulary predicts each masked patch's id
(cross-entropy on masked positions only).

- `beit`: ids from a dVAE (`mimkit tokenizer train` with kind=dvae), computed on the half-resolution copy of
  the encoder's view inside the tokenizer.
- `beitv2`: ids from VQ-KD, plus the auxiliary head of BEiT v2: the final CLS token concatenated with the patch
  tokens of a middle block goes through 2 extra blocks, the shared final norm and the shared head; loss =
  main CE + auxiliary CE.
The tokenizer is frozen (eval, no_grad) and sees the same augmented view as the encoder; it is not a
submodule, so it stays out of the optimizer and the checkpoint (`target.tokenizer` names its file)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.tokenizers.base import load_for_method, token_accuracy

from .config import ConfigError
from .data import denormalize
from .methods import Method, image_grid, register
from .targets import patchify, unpatchify
from .vit import make_blocks

BEIT_RECIPE = {
    "mask.kind": "block", "mask.ratio": 0.4,
    "model.layer_scale": 0.1, "model.drop_path": 0.1,
    # lr 1.5e-3 at batch 2048, AdamW (0.9, 0.98), wd 0.05, 10 warmup epochs, clip 3.0, crops 0.08-1 (BEiT)
    "optim.blr": 1.5e-3, "optim.lr_batch_ref": 2048, "optim.betas": [0.9, 0.98], "optim.weight_decay": 0.05,
    "optim.warmup_epochs": 10, "optim.clip_grad": 3.0, "data.crop_scale": [0.08, 1.0],
}


def hits_panel(imgs: torch.Tensor, mask: torch.Tensor, hits: torch.Tensor, p: int, data_name: str) -> torch.Tensor:
    """The panel of the discrete-target methods: rows original / masked / masked patches tinted green where the
    predicted id is the tokenizer's and red where it is not."""
    x = denormalize(imgs.float(), data_name)
    patches = patchify(x, p)
    green, red = (torch.tensor(c, device=x.device).repeat(p * p) for c in ([0.1, 0.9, 0.1], [0.9, 0.1, 0.1]))
    tint = torch.where(hits.unsqueeze(-1), green, red)
    m = mask.unsqueeze(-1)
    masked = torch.where(m, torch.zeros_like(patches), patches)
    tinted = torch.where(m, 0.5 * patches + 0.5 * tint, patches)
    return image_grid([x, unpatchify(masked, p, x.shape[1]), unpatchify(tinted, p, x.shape[1])])


@register("beit")
class BEiT(Method):
    recipe = BEIT_RECIPE
    encoder_mode = "token"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tokenizer = load_for_method(cfg, self.encoder.grid)
        self.head = nn.Linear(self.encoder.embed_dim, self.tokenizer.vocab_size)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # BEiT's lm_head init
        nn.init.zeros_(self.head.bias)

    def ce(self, tokens: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CE and accuracy of the head on the masked patch tokens (tokens [B, 1 + N, D], CLS first) against
        the masked positions' ids (`target`, [M] in the order of mask.nonzero())."""
        logits = self.head_logits(tokens, mask).float()
        return F.cross_entropy(logits, target), token_accuracy(logits, target)

    def head_logits(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The head over the masked patch tokens: logits [M, V] (tokens [B, 1 + N, D], CLS first)."""
        return self.head(tokens[:, 1:][mask])

    def masked_token_logits(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary at the masked positions [M, V] (as in the loss)."""
        return self.head_logits(self.encoder(imgs, mask, mode="token"), mask)

    def forward(self, imgs, mask):
        target = self.tokenizer(imgs)[mask]  # ids of the masked patches, frozen and without gradients
        loss, acc = self.ce(self.encoder(imgs, mask, mode="token"), target, mask)
        return {"loss": loss, "acc": acc}

    panel_name = "original_masked_hits"

    @torch.no_grad()
    def visualize(self, imgs, mask, data_name):
        pred = self.head(self.encoder(imgs, mask, mode="token")[:, 1:]).argmax(-1)
        return hits_panel(imgs, mask, pred == self.tokenizer(imgs), self.patch_size, data_name)


@register("beitv2")
class BEiTv2(BEiT):
    # BEiT v2 (ViT-B/16): lr 1.5e-3 at batch 2048 as BEiT, drop path 0.1, layer scale 0.1, clip 3.0, (0.9, 0.98)
    recipe = {**BEIT_RECIPE, "model.aux_depth": 2}

    def __init__(self, cfg):
        super().__init__(cfg)
        m, enc = cfg.model, self.encoder
        self.aux_layer = m.aux_layer or enc.depth // 2  # BEiT v2 ViT-B: early_layers = 6 of 12
        if not 1 <= self.aux_layer <= enc.depth:
            raise ConfigError(f"model.aux_layer={m.aux_layer} must be in 1..{enc.depth} (the encoder's depth), "
                              f"or 0 for depth // 2")
        self.aux_blocks = make_blocks(enc.embed_dim, m.aux_depth, enc.num_heads, m.mlp_ratio, m.drop_path,
                                      m.layer_scale)

    def forward(self, imgs, mask):
        target = self.tokenizer(imgs)[mask]
        tokens, layers = self.encoder(imgs, mask, mode="token", return_layers=(self.aux_layer - 1, -1))
        middle, last = layers[0], layers[-1]  # one tensor when aux_layer is the last block
        loss, acc = self.ce(tokens, target, mask)
        # auxiliary head: final CLS (before the final norm) + the middle block's patch tokens, 2 extra blocks,
        # then the encoder's final norm and the same head (BEiT v2's shared_lm_head)
        x = torch.cat([last[:, :1], middle[:, 1:]], dim=1)
        for blk in self.aux_blocks:
            x = blk(x)
        aux_loss, aux_acc = self.ce(self.encoder.norm(x), target, mask)
        return {"loss": loss + aux_loss, "acc": acc, "main_loss": loss.detach(), "aux_loss": aux_loss.detach(),
                "aux_acc": aux_acc}
