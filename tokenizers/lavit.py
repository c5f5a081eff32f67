"""LaVIT's dynamic visual tokenizer (Jin et al., ICLR 2024, "Unified Language-Vision Pretraining in LLM with
Dynamic Discrete Visual Tokenization"): a variable number of tokens per image, on a frozen teacher's patch
features.

- Selector (`Selector`, LaVIT/models/modeling_visual_tokenzier.py `TokenPredictor`, DynamicViT's PredictorLG):
  LayerNorm, Linear, GELU; half of the channels stay local, the other half is averaged over the image; an MLP
  (D -> D/2 -> D/4 -> 2) gives keep/drop log-probabilities per patch. Training samples a hard keep mask with
  Gumbel-softmax (tau 1, straight-through: the forward pass sees 0/1, gradients flow to the log-probabilities),
  as `tokenize_image` does. Inference is deterministic (the official inference samples): each image keeps its
  expected number of kept patches under that sampling, round(sum of p_keep) >= 1, the most likely ones, i.e. a
  per-image threshold on p_keep. A fixed 0.5 threshold disagrees with the trained count wherever probabilities
  sit near 0.5 (the ratio loss holds the *sampled* share at its target, which p_keep = 0.5 everywhere meets).
- Keep-ratio loss: ratio_weight * (kept share - keep_ratio)^2, DynamicViT's ratio loss (Rao et al. 2021),
  which LaVIT's paper uses to hold the share of kept tokens near a target; the released LaVIT code has no
  training loop, so the weight (2.0) is DynamicViT's. `ratio_scope=batch` (default) takes the share over the
  whole batch, so the *average* is held at keep_ratio and each image keeps as many tokens as its content asks
  (LaVIT's variable length: ~36% of the grid on average); `image` is DynamicViT's form, the mean over images of
  each image's squared deviation, which drives every image to the same count.
- Merger (`TokenMerger`, `CausalFuserBlock`): the teacher features, projected to `embed_dim` (a linear layer of
  mimkit's: LaVIT runs selector and merger at the teacher's own width, 1408), go through
  `depth` blocks of (causal self-attention in raster order over the kept tokens: a token reads the kept tokens
  before it and itself; cross-attention whose keys and values are the LayerNorm'ed input features of the
  dropped patches only; MLP), then a final LayerNorm. The attention masks are LaVIT's `softmax_with_policy`
  (weights multiply the exponentials, so gradients reach the keep mask) without its eps/N floor: a masked key
  gets exactly zero weight, and a query with no dropped patch to read gets a zero cross-attention output.
- Quantizer: LaVIT's `encode_task_layer` (Linear, Tanh, Linear to `code_dim`), L2-normalized, on the merged
  kept tokens only, with VQ-KD's EMA cosine codebook (mimkit.tokenizers.vqkd.NormEMAQuantizer: k-means init,
  EMA 0.99, dead-code restarts; LaVIT: 16384 x 32 L2-normalized codes).
- Decoder (mimkit's choice; LaVIT's paper reconstructs the teacher's features from the tokens, its decoder is
  not released): the quantized kept codes and a learned mask token at the dropped patches, with fixed 2-D
  sin-cos positions, through ViT blocks and VQ-KD's task MLP to the teacher's width; loss 1 - cosine to the
  teacher's features of *all* patches.

`encode` gives ids LongTensor[B, N] with -1 at the dropped patches (keep mask = ids >= 0); `dynamic` also gives
`merged`: each dropped patch labeled with the id of the kept token that attended to it most in the merger's
cross-attention (summed over blocks and heads). The teacher is part of the tokenizer file, as for k-means on
teacher features.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from mimkit.config import ConfigError, check_range
from mimkit.images import resize
from mimkit.loop import place_model
from mimkit.teachers import Teacher
from mimkit.vit import make_blocks, sincos_pos_embed
from mimkit.tokenizer_config import LaVITConfig, TOKENIZER_RECIPES

from .base import GradientTraining, TrainableTokenizer, register_tokenizer, run_args
from .vqkd import NormEMAQuantizer, codes_used, cosine_loss, placed_teacher, task_mlp


class Selector(nn.Module):
    """LaVIT's TokenPredictor: features [B, N, D] -> keep/drop log-probabilities [B, N, 2] (index 0 = keep)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim, eps=1e-5), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        local, glob = x.chunk(2, dim=-1)  # every patch is a candidate: the global half is the plain mean
        x = torch.cat([local, glob.mean(1, keepdim=True).expand_as(glob)], dim=-1)
        return F.log_softmax(self.out_conv(x).float(), dim=-1)


def policy_softmax(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Softmax of scores [B, H, Nq, Nk] over the keys, each key's exponential multiplied by weights [B, 1, Nq, Nk]
    in [0, 1]: a key of weight 0 gets exactly 0, a row without any weighted key is all zeros."""
    scores = scores.float()
    top = scores.detach().masked_fill(weights == 0, float("-inf")).amax(-1, keepdim=True)
    e = (scores - top.nan_to_num(0.0, posinf=0.0, neginf=0.0)).exp() * weights
    return e / e.sum(-1, keepdim=True).clamp_min(1e-12)


class PolicyAttention(nn.Module):
    """Multi-head attention of queries x [B, N, D] over keys and values ctx [B, N, D] with key weights."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q, self.kv = nn.Linear(dim, dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output [B, N, D], attention [B, H, N, N])."""
        B, N, D = x.shape
        q = self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(B, N, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = policy_softmax((q @ k.transpose(-2, -1)) * self.scale, weights)
        return self.proj((attn.to(v.dtype) @ v).transpose(1, 2).reshape(B, N, D)), attn


class MergerBlock(nn.Module):
    """LaVIT's CausalFuserBlock: causal self-attention over kept tokens, cross-attention to dropped ones, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm0, self.norm1, self.norm2 = (nn.LayerNorm(dim, eps=1e-5) for _ in range(3))
        self.causal, self.cross = PolicyAttention(dim, num_heads), PolicyAttention(dim, num_heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, origin: torch.Tensor, causal_w: torch.Tensor,
                cross_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm0(x)
        x = x + self.causal(h, h, causal_w)[0]
        out, attn = self.cross(self.norm1(x), origin, cross_w)
        x = x + out
        return x + self.mlp(self.norm2(x)), attn


def merger_weights(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LaVIT's attention policies of keep [B, N] (1 = kept; floats carry the straight-through gradient):
    causal [B, 1, N, N], query i reads key j <= i when j is kept or j = i; cross [B, 1, N, N], every query reads
    the dropped keys only."""
    N = keep.shape[1]
    eye = torch.eye(N, dtype=keep.dtype, device=keep.device)
    causal = torch.ones(N, N, dtype=torch.bool, device=keep.device).tril().to(keep.dtype)
    k = keep[:, None, None, :]
    return (k + (1 - k) * eye) * causal, (1 - k).expand(-1, 1, N, N)


class Merger(nn.Module):
    """LaVIT's TokenMerger over features [B, N, D] and keep [B, N]."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_vision = nn.LayerNorm(dim, eps=1e-5)  # the raw features the cross-attention reads
        self.blocks = nn.ModuleList([MergerBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(merged tokens [B, N, D], cross-attention [B, N, N] summed over blocks and heads: query, key)."""
        origin = self.ln_vision(x)
        causal_w, cross_w = merger_weights(keep.to(x.dtype))
        reads = x.new_zeros(x.shape[0], x.shape[1], x.shape[1], dtype=torch.float32)
        for blk in self.blocks:
            x, attn = blk(x, origin, causal_w, cross_w)
            reads = reads + attn.detach().float().sum(1)
        return self.norm(x), reads


@register_tokenizer("lavit")
class LaVIT(TrainableTokenizer):
    paper = "LaVIT"
    Config = LaVITConfig
    recipe = TOKENIZER_RECIPES["lavit"]

    def __init__(self, img_size: int, grid: int, vocab_size: int, mean: list[float], std: list[float],
                 teacher_dim: int, teacher: dict | None = None, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, code_dim: int = 32, decoder_depth: int = 1,
                 decoder_embed_dim: int = 768, decoder_num_heads: int = 12, tau: float = 1.0, decay: float = 0.99,
                 beta: float = 1.0, restart: float = 0.0):
        super().__init__(img_size, grid, vocab_size, mean, std)
        self.args = dict(teacher_dim=teacher_dim, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, code_dim=code_dim, decoder_depth=decoder_depth,
                         decoder_embed_dim=decoder_embed_dim, decoder_num_heads=decoder_num_heads, tau=tau,
                         decay=decay, beta=beta, restart=restart)
        self.teacher = Teacher(teacher) if teacher else None
        self.proj = nn.Linear(teacher_dim, embed_dim)  # LaVIT's merger runs at the teacher's width
        self.selector = Selector(embed_dim)
        self.merger = Merger(embed_dim, depth, num_heads, mlp_ratio)
        self.encode_task = task_mlp(embed_dim, code_dim)
        self.quantizer = NormEMAQuantizer(vocab_size, code_dim, decay, beta, restart)
        self.decoder_embed = nn.Linear(code_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid, decoder_embed_dim, cls_token=False),
                             persistent=False)
        self.decoder = make_blocks(decoder_embed_dim, decoder_depth, decoder_num_heads)
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decode_task = task_mlp(decoder_embed_dim, teacher_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def hparams(self) -> dict:
        return {**self.args, "teacher": self.teacher.spec if self.teacher is not None else None}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's patch features [B, N, teacher_dim] of images at img_size."""
        if self.teacher is None:
            raise ValueError("this lavit tokenizer has no teacher (build it with LaVIT.build or load its file)")
        return self.teacher(images, (self.mean, self.std), self.grid)

    def decide(self, logp: torch.Tensor) -> torch.Tensor:
        """Keep mask [B, N] (floats 0/1) from log-probabilities [B, N, 2]: a straight-through Gumbel-softmax
        sample in training; at inference the round(sum of p_keep) >= 1 most likely patches of each image."""
        if self.training:
            return F.gumbel_softmax(logp, tau=self.args["tau"], hard=True)[..., 0]
        p_keep = logp[..., 0].exp()
        count = p_keep.sum(1, keepdim=True).round().clamp_min(1)  # the expected number of kept patches
        rank = p_keep.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        return (rank < count).float()

    def codes(self, merged: torch.Tensor) -> torch.Tensor:
        """L2-normalized code-space vectors [B, N, code_dim] of merged tokens (float32, as VQ-KD)."""
        with torch.autocast(merged.device.type, enabled=False):
            return F.normalize(self.encode_task(merged.float()), dim=-1)

    def tokens(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pass up to the codes for images at img_size: teacher features, keep/drop log-probabilities, the
        keep mask (floats), merged tokens' codes [B, N, code_dim] and the merger's cross-attention."""
        feats = self.features(images)
        x = self.proj(feats)
        logp = self.selector(x)
        keep = self.decide(logp)
        merged, reads = self.merger(x, keep)
        return {"feats": feats, "logp": logp, "keep": keep, "z": self.codes(merged), "reads": reads}

    @torch.no_grad()
    def dynamic(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, N] with -1 at dropped patches, merged ids [B, N]: a dropped patch takes the id of the kept token
        that attended to it most in the merger) for images normalized with (mean, std)."""
        t = self.tokens(resize(images, self.img_size))
        keep = t["keep"] > 0.5
        z = t["z"]
        ids = self.quantizer.nearest(z.flatten(0, 1)).view(z.shape[:2])
        reads = t["reads"].masked_fill(~keep[:, :, None], float("-inf"))  # only kept tokens pass labels on
        reader = reads.argmax(1)  # [B, N]: per key patch, the kept query that read it most
        merged = torch.where(keep, ids, ids.gather(1, reader))
        return ids.masked_fill(~keep, -1), merged

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.dynamic(images)[0]

    def decode(self, q: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Teacher features [B, N, teacher_dim] of all patches from codes q [B, N, code_dim] (read at kept
        patches) and keep [B, N]: the mask token stands at dropped patches."""
        k = keep.unsqueeze(-1).to(q.dtype)
        x = k * self.decoder_embed(q) + (1 - k) * self.mask_token + self.pos_embed.to(q.dtype)
        for blk in self.decoder:
            x = blk(x)
        return self.decode_task(self.decoder_norm(x))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images at img_size -> the `tokens` entries plus rec [B, N, teacher_dim], ids [B, N] (-1 at dropped
        patches) and the commitment loss; the codebook follows the kept codes by EMA in training."""
        t = self.tokens(images)
        kept = t["keep"].detach() > 0.5
        z = t["z"]
        q_kept, ids_kept, commit = self.quantizer(z[kept])
        q = torch.zeros_like(z).index_put((kept,), q_kept)
        ids = torch.full(kept.shape, -1, dtype=torch.long, device=z.device).index_put((kept,), ids_kept)
        return {**t, "rec": self.decode(q, t["keep"]), "ids": ids, "commit": commit}

    @classmethod
    def check_config(cls, cfg) -> None:
        v = cfg.lavit
        if not cfg.teacher.name:
            raise ConfigError("kind=lavit needs teacher.name (timm:<model>, openclip:<model> or mimkit:<checkpoint>): "
                              "its selector and merger read the teacher's patch features")
        check_range("lavit.keep_ratio", v.keep_ratio, 0, 1, lo_open=True)
        check_range("lavit.ratio_weight", v.ratio_weight, 0)
        check_range("lavit.tau", v.tau, 0, lo_open=True)
        check_range("lavit.decay", v.decay, 0, 1, hi_open=True)
        for key in ("depth", "decoder_depth", "code_dim"):
            check_range(f"lavit.{key}", getattr(v, key), 1)
        if v.embed_dim % 4 or v.embed_dim % v.num_heads or v.decoder_embed_dim % v.decoder_num_heads:
            raise ConfigError(f"lavit.embed_dim={v.embed_dim} must be divisible by 4 (the selector's MLP) and by "
                              f"lavit.num_heads={v.num_heads}; lavit.decoder_embed_dim={v.decoder_embed_dim} by "
                              f"lavit.decoder_num_heads={v.decoder_num_heads}")

    @classmethod
    def needs_teacher(cls, cfg) -> bool:
        return True

    @classmethod
    def build(cls, cfg, teacher: Teacher | None, device: torch.device) -> "LaVIT":
        """A fresh tokenizer around `teacher` (frozen; its weights become part of the tokenizer file)."""
        v = cfg.lavit
        args = {k: getattr(v, k) for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "code_dim", "decoder_depth",
                                           "decoder_embed_dim", "decoder_num_heads", "tau", "decay", "beta",
                                           "restart")}
        tok = cls(**run_args(cfg), teacher_dim=teacher.feature_dim(), **args)
        tok.teacher = teacher
        return place_model(tok, device, cfg.precision)

    def trainer(self, cfg, teacher: Teacher | None) -> "LaVITTraining":
        placed_teacher(self.teacher, self)  # the teacher's grid checked against the tokenizer's, now
        return LaVITTraining(self, cfg.lavit.keep_ratio, cfg.lavit.ratio_weight, cfg.lavit.ratio_scope)


def ratio_loss(keep: torch.Tensor, keep_ratio: float, scope: str = "batch") -> torch.Tensor:
    """The keep-ratio loss for a keep mask [B, N]: (share of kept patches in the batch - keep_ratio)^2 (scope
    batch), or DynamicViT's mean over images of (the image's share - keep_ratio)^2 (scope image)."""
    share = keep.float().mean(1)
    if scope == "batch":
        return (share.mean() - keep_ratio) ** 2
    return ((share - keep_ratio) ** 2).mean()


class LaVITTraining(GradientTraining):
    """1 - cosine to the teacher's features of every patch + the weighted keep-ratio loss + the commitment loss."""

    def __init__(self, tok: LaVIT, keep_ratio: float, ratio_weight: float, ratio_scope: str = "batch"):
        super().__init__(tok)
        self.keep_ratio, self.ratio_weight, self.ratio_scope = keep_ratio, ratio_weight, ratio_scope

    def loss(self, imgs: torch.Tensor, progress: float) -> dict:
        out = self.tok(resize(imgs, self.tok.img_size))
        rec_loss = cosine_loss(out["rec"], out["feats"])
        ratio = ratio_loss(out["keep"], self.keep_ratio, self.ratio_scope)
        kept = out["ids"][out["ids"] >= 0]
        return {"loss": rec_loss + self.ratio_weight * ratio + out["commit"], "rec_loss": rec_loss.detach(),
                "ratio_loss": ratio.detach(), "commit_loss": out["commit"].detach(),
                "keep_ratio": out["keep"].detach().mean(), "batch_codes_used": codes_used(kept, self.tok.vocab_size)}

    @torch.no_grad()
    def evaluate(self, imgs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The kept ids (flat: usage counts kept patches only), reconstruction loss and tokens per image (its
        mean and the mean of its square, so that the spread of the whole split follows from the means)."""
        out = self.tok(resize(imgs, self.tok.img_size))  # eval mode: thresholded keep, no EMA update
        n = out["keep"].sum(1).double()
        return out["ids"][out["ids"] >= 0], {
            "rec_loss": cosine_loss(out["rec"], out["feats"]).item(), "keep_ratio": out["keep"].mean().item(),
            "tokens_per_image": n.mean().item(), "tokens_per_image_sq": (n * n).mean().item()}
