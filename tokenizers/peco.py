"""A PeCo-style perceptual codebook (Dong et al. 2021, "PeCo: Perceptual Codebook for BERT Pre-training of
Vision Transformers").

A VQ-VAE whose loss is pixel reconstruction plus a perceptual term: the squared distance between a frozen
teacher's features of the input and of the reconstruction at several depths,

    L = mean ||x - x_rec||^2 + perceptual_weight * sum_l mean ||f_l(x) - f_l(x_rec)||^2 + commitment,

each layer's distance averaged over its tokens and channels (the paper's 1 / (C_l H_l W_l) normalization), so
codes that keep what a network sees, not only the pixels.

From the paper: the perceptual term on intermediate features of a self-supervised ViT (MoCo v3 ViT-B, blocks
3, 6, 9 and 12: `peco.layers` defaults to four blocks spread evenly over any teacher's depth), the teacher
frozen, pixel reconstruction kept beside it. mimkit's choices: the dVAE's conv autoencoder (DALL-E's layout,
mimkit.tokenizers.dvae) instead of VQGAN's, no adversarial loss (PeCo keeps VQGAN's GAN term; it sharpens
images but is not what makes the codes perceptual), and VQ-KD's codebook (L2-normalized codes, EMA updates,
dead-code restarts, mimkit.tokenizers.vqkd) instead of VQGAN's learned codebook, for codebook usage.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from mimkit.config import ConfigError, check_range
from mimkit.teachers import Teacher
from mimkit.tokenizer_config import PeCoConfig, TOKENIZER_RECIPES

from .base import register_tokenizer
from .dvae import check_grid
from .quantized import QuantizedTokenizer, QuantizedTraining, Quantizer
from .vqkd import NormEMAQuantizer


class SphericalEMAQuantizer(Quantizer):
    """VQ-KD's EMA codebook (mimkit.tokenizers.vqkd.NormEMAQuantizer) on the L2-normalized vectors."""

    scale_sensitive = False  # z is L2-normalized; the codebook is initialized by k-means on the first batch

    def __init__(self, vocab_size: int, dim: int, decay: float, beta: float, restart: float):
        super().__init__()
        self.dim, self.vocab_size = dim, vocab_size
        self.vq = NormEMAQuantizer(vocab_size, dim, decay, beta, restart)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        return self.vq.nearest(F.normalize(z, dim=-1))

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        return self.vq.codebook[ids]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        q, ids, commit = self.vq(F.normalize(z, dim=-1))
        return q, ids, commit, {"commit_loss": commit.detach()}


def spread_layers(depth: int, n: int = 4) -> list[int]:
    """n blocks (1-based) spread evenly over `depth` blocks, the last included: 12 -> [3, 6, 9, 12]."""
    return sorted({max(1, round(depth * (k + 1) / n)) for k in range(n)})


def perceptual_loss(teacher: Teacher, x: torch.Tensor, rec: torch.Tensor, stats: tuple,
                    layers: list[int]) -> torch.Tensor:
    """sum over `layers` of the mean squared distance between the teacher's block tokens of x and of rec
    (images normalized with stats); gradients flow to rec through the frozen teacher."""
    with torch.no_grad():
        target = teacher.hooked_tokens(teacher.prepare(x, stats), layers)
    feats = teacher.hooked_tokens(teacher.prepare(rec, stats), layers)
    return sum(F.mse_loss(f.float(), t.float()) for f, t in zip(feats, target))


@register_tokenizer("peco")
class PeCo(QuantizedTokenizer):
    paper = "PeCo"
    Config = PeCoConfig
    recipe = TOKENIZER_RECIPES["peco"]

    @classmethod
    def make_quantizer(cls, **args) -> SphericalEMAQuantizer:
        return SphericalEMAQuantizer(**args)

    @classmethod
    def quantizer_config(cls, cfg) -> dict:
        p = cfg.peco
        return {"vocab_size": cfg.vocab_size, "dim": p.code_dim, "decay": p.decay, "beta": p.beta,
                "restart": p.restart}

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.teacher.name:
            raise ConfigError("kind=peco needs teacher.name (timm:<model>, openclip:<model> or mimkit:<checkpoint>): "
                              "the frozen network of its perceptual loss")
        check_range("peco.decay", cfg.peco.decay, 0, 1, hi_open=True)
        check_range("peco.perceptual_weight", cfg.peco.perceptual_weight, 0)
        check_grid(cfg, "peco")

    @classmethod
    def needs_teacher(cls, cfg) -> bool:
        return True

    def trainer(self, cfg, teacher: Teacher | None) -> "PeCoTraining":
        layers = list(cfg.peco.layers) or spread_layers(len(teacher.blocks()))
        for layer in layers:
            teacher.block_index(layer)  # out of range: a ConfigError naming the teacher's depth
        return PeCoTraining(self, teacher.to(next(self.parameters()).device), layers, cfg.peco.perceptual_weight)


class PeCoTraining(QuantizedTraining):
    """Pixel MSE + the perceptual term + the commitment loss (the codebook moves by EMA)."""

    def __init__(self, tok: PeCo, teacher: Teacher, layers: list[int], weight: float):
        super().__init__(tok, teacher)
        self.layers, self.weight = layers, weight

    def loss(self, imgs: torch.Tensor, progress: float) -> dict:
        rec_loss, ids, q_loss, stats, (x, out) = self.reconstruction(imgs)
        perceptual = perceptual_loss(self.teacher, x, out, (self.tok.mean, self.tok.std), self.layers)
        return {"loss": rec_loss + self.weight * perceptual + q_loss, "rec_loss": rec_loss.detach(),
                "perceptual_loss": perceptual.detach(), **stats}
