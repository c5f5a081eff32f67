"""The tokenizer interface shared by dVAE, VQ-KD and k-means, its file format, and the frozen wrapper that
methods use to compute their discrete targets.

A tokenizer maps images [B, 3, img_size, img_size], normalized with its own `mean`/`std`, to ids
LongTensor[B, grid * grid] in row-major order: one id per encoder patch. A tokenizer file is one torch file
{"mimkit": "tokenizer", "kind", "config", "state"} whose config holds only plain values, so it loads with
weights_only=True and rebuilds without the training code or its config.
"""
from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mimkit import checkpoint
from mimkit.config import ConfigError

def tokenizer_classes() -> dict[str, type["Tokenizer"]]:
    """kind -> class of every tokenizer a file can hold (imported here: the kinds import this module)."""
    from .dvae import DVAE
    from .kmeans import KMeansTokenizer
    from .vqkd import VQKD
    return {cls.kind: cls for cls in (KMeansTokenizer, DVAE, VQKD)}


class Tokenizer(nn.Module, ABC):
    """Base class. Subclasses implement `_encode(images at img_size) -> ids [B, N]` and list their extra
    constructor arguments in `hparams()` (plain values) so that `save`/`load` can rebuild them."""

    kind: str = ""

    def __init__(self, img_size: int, grid: int, vocab_size: int, mean: list[float], std: list[float]):
        super().__init__()
        if img_size % grid:
            raise ConfigError(f"tokenizer img_size={img_size} is not divisible by its grid={grid}")
        self.img_size, self.grid, self.vocab_size = img_size, grid, vocab_size
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def hparams(self) -> dict:
        return {}

    def config(self) -> dict:
        return {"img_size": self.img_size, "grid": self.grid, "vocab_size": self.vocab_size, "mean": self.mean,
                "std": self.std, **self.hparams()}

    @abstractmethod
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """ids [B, grid * grid] of images already at img_size (each kind's own assignment rule)."""

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """ids LongTensor[B, grid * grid] for images normalized with (mean, std); resized to img_size first."""
        return self._encode(resize(images, self.img_size)).long()

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        checkpoint.save({"mimkit": "tokenizer", "kind": self.kind, "config": self.config(), "state": state,
                         **(extra or {})}, path)

    @staticmethod
    def load(path: str | Path) -> "Tokenizer":
        """Rebuild a tokenizer from its file (weights_only=True: no pickled code runs)."""
        ckpt = checkpoint.load(path, kind="tokenizer")
        kind, classes = ckpt.get("kind"), tokenizer_classes()
        if kind not in classes:
            raise checkpoint.CheckpointError(f"{path}: unknown tokenizer kind {kind!r} "
                                             f"(known: {', '.join(classes)})")
        tok = classes[kind](**ckpt["config"])
        try:
            tok.load_state_dict(ckpt["state"])
        except RuntimeError as e:
            raise checkpoint.CheckpointError(f"{path} does not fit a {kind} tokenizer with its own config "
                                             f"({str(e).splitlines()[0]})") from None
        return tok.eval()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize to size x size (a no-op at that size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def renormalize(images: torch.Tensor, src: tuple, dst: tuple) -> torch.Tensor:
    """Images normalized with src=(mean, std) -> the same images normalized with dst=(mean, std)."""
    (m0, s0), (m1, s1) = src, dst
    if list(m0) == list(m1) and list(s0) == list(s1):
        return images
    view = lambda v: torch.tensor(v, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)  # noqa: E731
    return (images * view(s0) + view(m0) - view(m1)) / view(s1)


def codebook_stats(ids: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Share of the vocabulary used by `ids` and the perplexity exp(H) of their empirical distribution
    (= vocab_size when every code is equally used)."""
    return count_stats(torch.bincount(ids.flatten().cpu(), minlength=vocab_size))


def count_stats(counts: torch.Tensor) -> dict[str, float]:
    """`codebook_stats` from per-code counts [vocab_size] (a tensor or a numpy array)."""
    counts = torch.as_tensor(counts).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"usage": (counts > 0).double().mean().item(), "perplexity": math.exp(entropy),
            "codes_used": int((counts > 0).sum())}


def token_accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of positions whose arg-max prediction is the target id (a detached scalar)."""
    return (logits.detach().argmax(-1) == target).float().mean()


class FrozenTokenizer:
    """A tokenizer as a method's target: frozen, eval mode, no_grad, moved to the images' device on first use.

    Deliberately not an nn.Module attribute of the method: its weights stay out of the optimizer, the
    pretraining checkpoint and DDP's gradient buckets, and `method.train()` cannot flip it to train mode."""

    def __init__(self, tokenizer: Tokenizer, data_stats: tuple):
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.data_stats = data_stats
        self.own_stats = (tokenizer.mean, tokenizer.std)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def grid(self) -> int:
        return self.tokenizer.grid

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        tok = self.tokenizer
        first = next(itertools.chain(tok.parameters(), tok.buffers()), None)
        if first is not None and first.device != images.device:
            tok.to(images.device)
        return tok.encode(renormalize(images, self.data_stats, self.own_stats))


def load_for_method(cfg, grid: int) -> FrozenTokenizer:
    """The tokenizer named by `target.tokenizer`, checked against the method's patch grid and (when set)
    `target.vocab_size`; mistakes are ConfigErrors raised before training starts."""
    from mimkit.data import dataset_stats
    path = cfg.target.tokenizer
    if not path:
        raise ConfigError(f"target.tokenizer is required for method={cfg.method}: the path of a tokenizer file "
                          f"(train one with `mimkit tokenizer train --config configs/tokenizer/<kind>_*.yaml`)")
    if not Path(path).is_file():
        raise ConfigError(f"target.tokenizer={path!r}: no such file")
    tok = Tokenizer.load(path)
    if tok.grid != grid:
        raise ConfigError(f"target.tokenizer {path} has a {tok.grid}x{tok.grid} token grid but the encoder has "
                          f"{grid}x{grid} patches (data.img_size={cfg.data.img_size} / model.patch_size="
                          f"{cfg.model.patch_size}); train the tokenizer for this grid")
    if cfg.target.vocab_size and cfg.target.vocab_size != tok.vocab_size:
        raise ConfigError(f"target.vocab_size={cfg.target.vocab_size} does not match target.tokenizer {path} "
                          f"(vocab_size {tok.vocab_size}); set target.vocab_size={tok.vocab_size} or 0")
    return FrozenTokenizer(tok, dataset_stats(cfg.data.name))
