"""The tokenizer interface shared by every kind, its registry and its file format.

A tokenizer maps images [B, 3, img_size, img_size], normalized with its own `mean`/`std`, to ids
LongTensor[B, grid * grid] in row-major order: one id per encoder patch. A tokenizer file is one torch file
{"mimkit": "tokenizer", "kind", "config", "state"} whose config holds only plain values, so it loads with
weights_only=True and rebuilds without the training code or its config.

A kind is one module: a `Tokenizer` subclass registered with `@register_tokenizer(kind)` that brings its config
section (`Config`, the section `<kind>` of `mimkit tokenizer train`), its recipe, its checks, whether it needs a
teacher, how it is built from a run config and its training step (a `Training`). The package's `__init__`
imports the kind modules, as timm registers models; the file loader, the run config, its checks and the CLI
help all read `TOKENIZERS`, so adding a kind touches its module and its configs only.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mimkit import checkpoint
from mimkit.config import ConfigError
from mimkit.data import dataset_stats
from mimkit.images import resize
from mimkit.registry import registrar
from mimkit.teachers import Teacher
from mimkit.tokenizer_config import TOKENIZER_RECIPES, TOKENIZER_SECTIONS
from mimkit.weights import read_tokenizer_safetensors

TOKENIZERS: dict[str, type["Tokenizer"]] = {}
# a file's `kind` and the config's kind=<kind> name it; its Config and recipe go to the plain tables
register_tokenizer = registrar(TOKENIZERS, attr="kind", sections=TOKENIZER_SECTIONS, recipes=TOKENIZER_RECIPES)


def tokenizer_class(kind: str, where: str = "kind") -> type["TrainableTokenizer"]:
    """The registered class of `kind`; an unknown kind is a ConfigError naming the valid ones."""
    if kind not in TOKENIZERS:
        raise ConfigError(f"{where}={kind!r} is not a tokenizer kind; choose one of: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind]


class Training:
    """A kind's training step for `mimkit tokenizer train`: what every kind shares (held-out evaluation, the
    panel). A kind trains either through the shared gradient loop (`GradientTraining`) or in one call
    (`FitTraining`: k-means, an imported tokenizer)."""

    def __init__(self, tok: "Tokenizer"):
        self.tok = tok

    @torch.no_grad()
    def evaluate(self, imgs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """ids [B, N] of held-out images and the kind's own per-batch metrics (means over the batch)."""
        return self.tok.encode(imgs), {}

    @torch.no_grad()
    def panel(self, imgs: torch.Tensor) -> torch.Tensor | None:
        """An image [3, H, W] in [0, 1] for TensorBoard, or None when the kind has nothing to draw."""
        return None


class GradientTraining(Training, ABC):
    """Trained by the shared gradient loop (mimkit.loop) on `loss`."""

    @abstractmethod
    def loss(self, imgs: torch.Tensor, progress: float) -> dict[str, Any]:
        """{"loss": scalar tensor, other scalars (0-d tensors on the device, or floats)} for training images
        [B, 3, H, W]; `progress` in [0, 1) is the share of training done (for schedules)."""


class FitTraining(Training, ABC):
    """Trained in one call, without the gradient loop."""

    @abstractmethod
    def fit(self, train_set, device: torch.device, log: Callable[[str], None]) -> dict:
        """Train on the training set; returns statistics for metrics.json."""


class Tokenizer(nn.Module, ABC):
    """Base class. Subclasses implement `_encode(images at img_size) -> ids [B, N]` and list their extra
    constructor arguments in `hparams()` (plain values) so that `save`/`load` can rebuild them. A kind that
    `mimkit tokenizer train` trains is a `TrainableTokenizer` and may set `Config`, `recipe`, `check_config` and
    `needs_teacher`."""

    kind: str = ""
    paper: str = ""  # where the kind comes from (CLI help)
    Config: type | None = None  # the kind's section `<kind>` of the run config; None: no settings
    recipe: dict = {}  # paper defaults (dotted keys), applied under the dataset preset and the user's layers

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

    @classmethod
    def check_config(cls, cfg) -> None:
        """ConfigErrors for mistakes in the kind's part of a run config (the shared keys are checked already)."""

    @classmethod
    def derived_vocab(cls, cfg) -> tuple[int, str] | None:
        """(vocabulary size, the settings that imply it) when the kind's settings fix it (FSQ: the product of its
        levels), None when `vocab_size` is free."""
        return None

    @classmethod
    def needs_teacher(cls, cfg) -> bool:
        """Whether a run with this config loads the frozen teacher of `teacher.name`."""
        return False

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        checkpoint.save({"mimkit": "tokenizer", "kind": self.kind, "config": self.config(), "state": state,
                         **(extra or {})}, path)

    @staticmethod
    def load(path: str | Path) -> "Tokenizer":
        """Rebuild a tokenizer from its file (weights_only=True: no pickled code runs)."""
        # an export (`mimkit export --format safetensors`) carries its kind and config as metadata
        ckpt = (read_tokenizer_safetensors(path) if Path(path).suffix == ".safetensors"
                else checkpoint.load(path, kind="tokenizer"))
        cls = tokenizer_class(ckpt.get("kind"), f"{path}: stored kind")
        tok = cls(**ckpt["config"])
        try:
            tok.load_state_dict(ckpt["state"])
        except RuntimeError as e:
            raise checkpoint.CheckpointError(f"{path} does not fit a {cls.kind} tokenizer with its own config "
                                             f"({str(e).splitlines()[0]})") from None
        return tok.eval()


class TrainableTokenizer(Tokenizer, ABC):
    """A tokenizer kind `mimkit tokenizer train` builds and trains (every registered kind)."""

    @classmethod
    @abstractmethod
    def build(cls, cfg, teacher: Teacher | None, device: torch.device) -> "TrainableTokenizer":
        """The untrained tokenizer of a run config, on `device`."""

    @abstractmethod
    def trainer(self, cfg, teacher: Teacher | None) -> Training:
        """This tokenizer's training step for a run config."""


def run_args(cfg) -> dict:
    """The constructor arguments every kind takes, from a run config: the data's image size and
    normalization, the encoder's patch grid (data.img_size // patch_size) and the vocabulary."""
    mean, std = dataset_stats(cfg.data.name)
    return {"img_size": cfg.data.img_size, "grid": cfg.data.img_size // cfg.patch_size,
            "vocab_size": cfg.vocab_size, "mean": list(mean), "std": list(std)}


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
