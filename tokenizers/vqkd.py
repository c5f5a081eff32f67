"""BEiT v2's tokenizer: vector-quantized knowledge distillation (microsoft/unilm beit2).

ViT encoder -> MLP (Linear, Tanh, Linear) to a 32-d code space, L2-normalized; a codebook of L2-normalized
codes, nearest code by cosine; the codebook follows the encoder by EMA (decay 0.99): each used code moves to
l2norm(decay * code + (1 - decay) * l2norm(mean of its assigned vectors)); it is initialized by spherical
k-means on the first batch, and codes whose EMA usage falls below `restart` x the mean usage are restarted on
random encoder outputs (BEiT v2 watches for collapse; this makes it recover). Straight-through estimator
with a commitment loss beta * ||sg(q) - z||^2; a shallow ViT decoder on the code grid regresses the teacher's
patch features with 1 - cosine similarity.
"""
from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mimkit.config import ConfigError, check_range
from mimkit.images import resize
from mimkit.loop import place_model
from mimkit.teachers import Teacher
from mimkit.vit import ViT
from mimkit.tokenizer_config import ViTLayoutConfig, VQKDConfig, TOKENIZER_RECIPES

from .base import GradientTraining, TrainableTokenizer, register_tokenizer, run_args
from .kmeans import assign, fit_kmeans


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class NormEMAQuantizer(nn.Module):
    def __init__(self, vocab_size: int, dim: int, decay: float = 0.99, beta: float = 1.0, restart: float = 0.0):
        super().__init__()
        self.vocab_size, self.dim, self.decay, self.beta, self.restart = vocab_size, dim, decay, beta, restart
        self.register_buffer("codebook", F.normalize(torch.randn(vocab_size, dim), dim=-1))
        self.register_buffer("usage", torch.zeros(vocab_size))  # EMA of assignments per step
        self.register_buffer("initialized", torch.tensor(False))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """ids of the nearest codes by cosine (z and codes are unit vectors)."""
        return assign(z, self.codebook, spherical=True)

    @torch.no_grad()
    def init_codebook(self, z: torch.Tensor) -> None:
        """Spherical k-means on the first batch (with fewer vectors than codes: random vectors of the batch)."""
        if len(z) >= 4 * self.vocab_size:
            centers = torch.from_numpy(fit_kmeans(z.float().cpu().numpy(), self.vocab_size, niter=10, spherical=True))
        else:
            centers = z[torch.randint(len(z), (self.vocab_size,), device=z.device)].float().cpu()
        self.codebook.copy_(F.normalize(centers.to(z.device), dim=-1))
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.codebook, 0)
        self.usage.fill_(len(z) / self.vocab_size)
        self.initialized.fill_(True)

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        counts = _all_reduce(torch.bincount(ids, minlength=self.vocab_size).float())
        sums = _all_reduce(torch.zeros_like(self.codebook).index_add_(0, ids, z.float()))
        used = (counts > 0).unsqueeze(1)
        means = F.normalize(sums / counts.clamp_min(1).unsqueeze(1), dim=-1)
        target = torch.where(used, means, self.codebook)  # unused codes keep their place
        self.codebook.copy_(F.normalize(self.decay * self.codebook + (1 - self.decay) * target, dim=-1))
        self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.restart > 0:
            dead = self.usage < self.restart * self.usage.mean()
            n = int(dead.sum())
            if n:
                self.codebook[dead] = z[torch.randint(len(z), (n,), device=z.device)].float()
                self.usage[dead] = self.usage.mean()
                if dist.is_available() and dist.is_initialized():
                    dist.broadcast(self.codebook, 0)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [M, dim] (L2-normalized) -> (straight-through quantized z [M, dim], ids [M], commitment loss)."""
        if self.training and not bool(self.initialized):
            self.init_codebook(z.detach())
        ids = self.nearest(z.detach())
        q = self.codebook[ids].clone()  # before this step's EMA update, as in BEiT v2
        if self.training:
            self.ema_update(z.detach(), ids)
        commit = self.beta * F.mse_loss(z.float(), q)  # pulls the encoder to its code; codes move by EMA only
        return z + (q - z).detach(), ids, commit


def check_vit_layout(cfg, section: str, alternative: str = "") -> None:
    """This layout needs a teacher, and widths its heads divide (`section`: the kind's name; `alternative`: the
    setting that does without a teacher, for the error)."""
    if not cfg.teacher.name:
        raise ConfigError(f"kind={cfg.kind} needs teacher.name (timm:<model>, openclip:<model> or mimkit:<checkpoint>)"
                          f": its decoder regresses the teacher's features{alternative}")
    v = getattr(cfg, section)
    if v.embed_dim % v.num_heads or v.decoder_embed_dim % v.decoder_num_heads:
        raise ConfigError(f"{section}.embed_dim / decoder_embed_dim must be divisible by their num_heads")


def vit_layout_args(v: ViTLayoutConfig) -> dict:
    return {k: getattr(v, k) for k in ("embed_dim", "depth", "num_heads", "decoder_depth", "decoder_embed_dim",
                                       "decoder_num_heads")}


def vit_encoder(img_size: int, grid: int, code_dim: int, embed_dim: int, depth: int, num_heads: int,
                **_) -> tuple[ViT, nn.Sequential]:
    """The ViT encoder on images (one token per code) and the MLP from its width to the code space."""
    return ViT(img_size, img_size // grid, 3, embed_dim, depth, num_heads), task_mlp(embed_dim, code_dim)


def vit_decoder(grid: int, code_dim: int, teacher_dim: int, decoder_embed_dim: int, decoder_depth: int,
                decoder_num_heads: int, **_) -> tuple[ViT, nn.Sequential]:
    """A ViT over the code grid (patch size 1: one "pixel" = one code) and the MLP to the teacher's width."""
    return (ViT(grid, 1, code_dim, decoder_embed_dim, decoder_depth, decoder_num_heads),
            task_mlp(decoder_embed_dim, teacher_dim))


def task_mlp(dim: int, out: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, out))
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return mlp


@register_tokenizer("vqkd")
class VQKD(TrainableTokenizer):
    paper = "BEiT v2"
    Config = VQKDConfig
    recipe = TOKENIZER_RECIPES["vqkd"]

    def __init__(self, img_size: int, grid: int, vocab_size: int, mean: list[float], std: list[float],
                 teacher_dim: int, embed_dim: int = 768, depth: int = 12, num_heads: int = 12, code_dim: int = 32,
                 decoder_depth: int = 1, decoder_embed_dim: int = 768, decoder_num_heads: int = 12,
                 decay: float = 0.99, beta: float = 1.0, restart: float = 0.0):
        super().__init__(img_size, grid, vocab_size, mean, std)
        self.args = dict(teacher_dim=teacher_dim, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         code_dim=code_dim, decoder_depth=decoder_depth, decoder_embed_dim=decoder_embed_dim,
                         decoder_num_heads=decoder_num_heads, decay=decay, beta=beta, restart=restart)
        self.encoder, self.encode_task = vit_encoder(img_size, grid, **self.args)
        self.quantizer = NormEMAQuantizer(vocab_size, code_dim, decay, beta, restart)
        self.decoder, self.decode_task = vit_decoder(grid, **self.args)

    def hparams(self) -> dict:
        return dict(self.args)

    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized code-space vectors [B, N, code_dim] of images at img_size."""
        x = self.encoder(images)[:, 1:]
        with torch.autocast(x.device.type, enabled=False):  # BEiT v2 runs the task layer and VQ in float32
            return F.normalize(self.encode_task(x.float()), dim=-1)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.codes(images)
        return self.quantizer.nearest(z.flatten(0, 1)).view(z.shape[:2])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images at img_size -> (predicted teacher features [B, N, teacher_dim], ids [B, N], commitment loss)."""
        z = self.codes(images)
        B, N, C = z.shape
        q, ids, commit = self.quantizer(z.flatten(0, 1))
        grid_codes = q.view(B, self.grid, self.grid, C).permute(0, 3, 1, 2)
        rec = self.decode_task(self.decoder(grid_codes)[:, 1:])
        return rec, ids.view(B, N), commit

    @classmethod
    def check_config(cls, cfg) -> None:
        check_vit_layout(cfg, "vqkd")
        check_range("vqkd.decay", cfg.vqkd.decay, 0, 1, hi_open=True)

    @classmethod
    def needs_teacher(cls, cfg) -> bool:
        return True

    @classmethod
    def build(cls, cfg, teacher: Teacher | None, device: torch.device) -> "VQKD":
        """A fresh VQ-KD whose decoder regresses `teacher`'s features (their width sizes its output); `trainer`
        moves the teacher to the tokenizer's device."""
        v = cfg.vqkd
        tok = cls(**run_args(cfg), teacher_dim=teacher.feature_dim(), **vit_layout_args(v), code_dim=v.code_dim,
                  decay=v.decay, beta=v.beta, restart=v.restart)
        return place_model(tok, device, cfg.precision)

    def trainer(self, cfg, teacher: Teacher | None) -> "VQKDTraining":
        """The training step with the teacher on the tokenizer's device."""
        return VQKDTraining(self, placed_teacher(teacher, self))


def placed_teacher(teacher: Teacher, tok: nn.Module) -> Teacher:
    """The teacher on the tokenizer's device, its patch grid checked against the tokenizer's on one blank image
    (a grid that does not divide the other is an error now, before the run directory is written, not at the
    first step)."""
    device = next(tok.parameters()).device
    teacher = teacher.to(device)
    teacher(torch.zeros(1, 3, tok.img_size, tok.img_size, device=device), (tok.mean, tok.std), tok.grid)
    return teacher


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(pred, target)."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def codes_used(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Number of distinct ids (a 0-d tensor on their device, computed without a host sync)."""
    return torch.zeros(vocab_size, dtype=torch.bool, device=ids.device).index_fill_(0, ids.flatten(), True).sum()


class VQKDTraining(GradientTraining):
    """Loss and evaluation for `mimkit tokenizer train` with kind=vqkd; the teacher stays outside the
    tokenizer (it is not needed to encode)."""

    def __init__(self, tok: VQKD, teacher: nn.Module):
        super().__init__(tok)
        self.teacher = teacher

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """The teacher's patch features [B, N, teacher_dim] on the tokenizer's grid."""
        return self.teacher(imgs, (self.tok.mean, self.tok.std), self.tok.grid)

    def loss(self, imgs: torch.Tensor, progress: float) -> dict:
        """1 - cosine to the teacher's features + the commitment loss (the codebook moves by EMA)."""
        target = self.targets(imgs)
        rec, ids, commit = self.tok(resize(imgs, self.tok.img_size))
        rec_loss = cosine_loss(rec, target)
        return {"loss": rec_loss + commit, "rec_loss": rec_loss.detach(), "commit_loss": commit.detach(),
                "batch_codes_used": codes_used(ids, self.tok.vocab_size)}

    @torch.no_grad()
    def evaluate(self, imgs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        rec, ids, commit = self.tok(resize(imgs, self.tok.img_size))  # eval mode: no EMA update
        return ids, {"rec_loss": cosine_loss(rec, self.targets(imgs)).item(), "commit_loss": commit.item()}
