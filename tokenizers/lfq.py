"""Lookup-free quantization (LFQ; MAGVIT-v2, Yu et al. 2023; settings from TencentARC's Open-MAGVIT2).

Each of the d code-space dimensions is quantized to its sign (+1 / -1) with a straight-through gradient; the
code is the sign vector, the id its bits (first dimension most significant), so the vocabulary is 2^d and no
codebook is stored or searched. The loss adds a commitment term and an entropy penalty:

    commitment * mean ||z - sg(q)||^2 + entropy_weight * (sample_weight * mean_n H(p_n) - batch_weight * H(mean_n p_n))

with p_n = softmax over the codes c_k of 2 <z_n, c_k> / tau: confident assignments (low per-sample entropy)
spread over the whole vocabulary (high batch entropy). Open-MAGVIT2: tau = 0.01, entropy_weight = 0.1,
sample and batch weights 1, commitment = 0.25.

The entropies are computed per group of bits (`entropy_groups`, as Open-MAGVIT2 factorizes its 2^18 codes into
two 2^9 sub-codebooks), so nothing of size 2^d is built. Because the logits are a sum over dimensions, p_n is a
product of independent per-group distributions: the per-sample entropy is exactly the sum of the groups'; the
batch entropy becomes the sum of the groups' marginal batch entropies, an upper bound of the joint one that
equals it with one group.

Written here rather than imported from vector-quantize-pytorch: its LFQ builds all 2^d codes for the entropy
(memory grows with the vocabulary, which the 2^16+ codebooks LFQ exists for cannot afford).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mimkit.config import ConfigError, check_range
from mimkit.tokenizer_config import LFQConfig, TOKENIZER_RECIPES

from .base import register_tokenizer
from .quantized import QuantizedTokenizer, Quantizer

MAX_GROUP_BITS = 9  # entropy_groups=0: groups of at most 9 bits (Open-MAGVIT2: 2 x 9 for 2^18 codes)


def sign_codes(bits: int, device: torch.device | None = None) -> torch.Tensor:
    """All 2^bits codes [2^bits, bits] in {-1, +1}, row k = the bits of k (first dimension most significant)."""
    ids = torch.arange(2 ** bits, device=device)
    return ((ids.unsqueeze(1) >> torch.arange(bits - 1, -1, -1, device=device)) & 1).float() * 2 - 1


def group_count(dim: int, groups: int) -> int:
    return groups or math.ceil(dim / MAX_GROUP_BITS)


def lfq_entropies(z: torch.Tensor, tau: float, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_n H(p_n), H(mean_n p_n)) in nats of z [M, d] under p_n = softmax_k(2 <z_n, c_k> / tau), summed over
    `groups` groups of bits (exact per-sample entropy; with groups > 1 the batch term is the sum of the groups'
    marginal entropies)."""
    sample, batch = z.new_zeros(()), z.new_zeros(())
    for part in torch.tensor_split(z, groups, dim=1):
        logp = F.log_softmax(2 * part @ sign_codes(part.shape[1], z.device).T / tau, dim=-1)
        p = logp.exp()
        sample = sample - (p * logp).sum(-1).mean()
        avg = p.mean(0)
        # clamped inside the log: a code whose mean probability underflows to 0 would give 0 * log 0 = nan gradients
        batch = batch - (avg * avg.clamp_min(torch.finfo(avg.dtype).tiny).log()).sum()
    return sample, batch


class LFQuantizer(Quantizer):
    def __init__(self, dim: int, tau: float = 0.01, entropy_weight: float = 0.1, sample_weight: float = 1.0,
                 batch_weight: float = 1.0, commitment: float = 0.25, entropy_groups: int = 0):
        super().__init__()
        self.dim, self.vocab_size = dim, 2 ** dim
        self.tau, self.entropy_weight, self.commitment = tau, entropy_weight, commitment
        self.sample_weight, self.batch_weight = sample_weight, batch_weight
        self.groups = group_count(dim, entropy_groups)
        self.register_buffer("place", 2 ** torch.arange(dim - 1, -1, -1), persistent=False)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        return ((z > 0).long() * self.place).sum(-1)

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        return ((ids.unsqueeze(-1) // self.place) % 2).float() * 2 - 1

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
        commit = F.mse_loss(z, q.detach())
        sample, batch = lfq_entropies(z, self.tau, self.groups)
        loss = self.commitment * commit + self.entropy_weight * (self.sample_weight * sample - self.batch_weight * batch)
        stats = {"sample_entropy": sample.detach(), "batch_entropy": batch.detach(), "commit_loss": commit.detach()}
        return z + (q - z).detach(), self.indices(z.detach()), loss, stats


@register_tokenizer("lfq")
class LFQTokenizer(QuantizedTokenizer):
    paper = "MAGVIT-v2's LFQ"
    Config = LFQConfig
    recipe = TOKENIZER_RECIPES["lfq"]

    @classmethod
    def make_quantizer(cls, **args) -> LFQuantizer:
        return LFQuantizer(**args)

    @classmethod
    def quantizer_config(cls, cfg) -> dict:
        return {k: getattr(cfg.lfq, k) for k in ("dim", "tau", "entropy_weight", "sample_weight", "batch_weight",
                                                 "commitment", "entropy_groups")}

    @classmethod
    def derived_vocab(cls, cfg) -> tuple[int, str] | None:
        return 2 ** cfg.lfq.dim, f"lfq.dim={cfg.lfq.dim}"

    @classmethod
    def check_config(cls, cfg) -> None:
        check_range("lfq.dim", cfg.lfq.dim, 1, 30)
        check_range("lfq.tau", cfg.lfq.tau, 0, lo_open=True)
        check_range("lfq.entropy_groups", cfg.lfq.entropy_groups, 0, cfg.lfq.dim)
        bits = math.ceil(cfg.lfq.dim / group_count(cfg.lfq.dim, cfg.lfq.entropy_groups))
        if bits > 16:  # each group's 2^bits probabilities are built per token
            raise ConfigError(f"lfq.entropy_groups={cfg.lfq.entropy_groups} leaves groups of {bits} bits; use 0 (auto) "
                              f"or at least {math.ceil(cfg.lfq.dim / 16)}")
        super().check_config(cfg)
