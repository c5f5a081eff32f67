"""Tokenizers made of an autoencoder layout and a swappable quantizer (FSQ, LFQ, PeCo's codebook).

The layouts are those of the learned-codebook kinds, so a comparison changes the quantizer and nothing else
(`<kind>.objective`):
- `teacher`: VQ-KD's (mimkit.tokenizers.vqkd): ViT encoder -> MLP to the code space -> quantizer -> shallow ViT
  decoder over the code grid regressing the frozen teacher's patch features with 1 - cosine;
- `pixels`: the dVAE's (mimkit.tokenizers.dvae): DALL-E's conv encoder at `input_size` to code-space channels
  -> quantizer -> mirrored conv decoder, MSE on the normalized pixels.

A quantizer maps vectors z [M, dim] to codes, ids and its own loss terms; a kind is its quantizer, its config
section and its recipe.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mimkit.images import image_grid, resize
from mimkit.loop import place_model
from mimkit.teachers import Teacher

from .base import GradientTraining, TrainableTokenizer, run_args
from .dvae import Decoder, Encoder, check_grid, conv_input_size, pixel_metrics, to01
from .vqkd import check_vit_layout, cosine_loss, placed_teacher, vit_decoder, vit_encoder, vit_layout_args



class Quantizer(nn.Module, ABC):
    """Vectors z [M, dim] -> codes of a fixed vocabulary."""

    dim: int
    vocab_size: int
    # whether the codes depend on the scale of z (rounding, signs): then the projection into the code space is
    # standardized on the first training batch (`QuantizedTokenizer.standardize`)
    scale_sensitive: bool = True

    @abstractmethod
    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """ids LongTensor[M] of z [M, dim]."""

    @abstractmethod
    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        """The code vectors [M, dim] of ids [M]."""

    @abstractmethod
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(quantized z [M, dim] with straight-through gradients, ids [M], the quantizer's loss (a scalar, 0 when
        it has none), its scalars to log)."""


class QuantizedTokenizer(TrainableTokenizer, ABC):
    """A layout (`layout`: objective and its sizes, plain values) around the kind's quantizer (`quantizer`: the
    kind's `make_quantizer` arguments)."""

    def __init__(self, img_size: int, grid: int, vocab_size: int, mean: list[float], std: list[float],
                 layout: dict, quantizer: dict):
        super().__init__(img_size, grid, vocab_size, mean, std)
        self.layout, self.quantizer_args = dict(layout), dict(quantizer)
        self.quantizer = self.make_quantizer(**quantizer)
        if self.quantizer.vocab_size != vocab_size:
            raise ValueError(f"{self.kind}: the quantizer has {self.quantizer.vocab_size} codes, not {vocab_size}")
        dim = self.quantizer.dim
        if layout["objective"] == "teacher":
            self.encoder, self.encode_task = vit_encoder(img_size, grid, dim, **layout)
            self.decoder, self.decode_task = vit_decoder(grid, dim, **layout)
        else:
            if layout["input_size"] != grid * 2 ** (layout["groups"] - 1):
                raise ValueError(f"{self.kind}: input_size {layout['input_size']} with {layout['groups']} groups does "
                                 f"not give a {grid}x{grid} grid")
            sizes = (layout["hidden"], layout["groups"], layout["blocks_per_group"])
            self.encoder, self.decoder = Encoder(dim, *sizes), Decoder(dim, *sizes)
        self.register_buffer("standardized", torch.tensor(not self.quantizer.scale_sensitive))

    @classmethod
    @abstractmethod
    def make_quantizer(cls, **args) -> Quantizer:
        """The kind's quantizer from its stored arguments."""

    @classmethod
    @abstractmethod
    def quantizer_config(cls, cfg) -> dict:
        """The `make_quantizer` arguments of a run config (plain values)."""

    def hparams(self) -> dict:
        return {"layout": dict(self.layout), "quantizer": dict(self.quantizer_args)}

    @property
    def objective(self) -> str:
        return self.layout["objective"]

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """What the encoder sees of images at img_size: themselves, or the conv layout's input_size copy."""
        return images if self.objective == "teacher" else resize(images, self.layout["input_size"])

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Code-space vectors [B, N, dim] of the encoder's view x (see `view`)."""
        if self.objective == "pixels":
            return self.encoder(x).flatten(2).transpose(1, 2)
        h = self.encoder(x)[:, 1:]
        with torch.autocast(h.device.type, enabled=False):  # quantizers round and compare in float32
            return self.encode_task(h.float())

    @torch.no_grad()
    def standardize(self, x: torch.Tensor) -> None:
        """Rescale the last projection into the code space so that the latents of x (the encoder's view of a
        batch) have mean 0 and std 1 per dimension. FSQ and LFQ have no codebook to initialize from data (VQ-KD
        runs k-means on its first batch); at the layouts' small initial weights every latent would round to the
        same code, so the codes are spread over the levels from the first step instead."""
        z = self.latents(x).flatten(0, 1).float()
        mean, std = z.mean(0), z.std(0).clamp_min(1e-6)
        proj = self.encode_task[-1] if self.objective == "teacher" else self.encoder.blocks.output.conv
        shape = (-1,) + (1,) * (proj.weight.dim() - 1)  # a Linear's rows or a 1x1 conv's output channels
        proj.weight.div_(std.view(shape).to(proj.weight.dtype))
        proj.bias.sub_(mean.to(proj.bias.dtype)).div_(std.to(proj.bias.dtype))
        if dist.is_available() and dist.is_initialized():  # every rank starts from rank 0's scaling
            dist.broadcast(proj.weight, 0)
            dist.broadcast(proj.bias, 0)
        self.standardized.fill_(True)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.latents(self.view(images))
        return self.quantizer.indices(z.flatten(0, 1).float()).view(z.shape[:2])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """The encoder's view x -> (decoded: teacher features [B, N, teacher_dim] or pixels like x, ids [B, N], the
        quantizer's loss, its scalars)."""
        z = self.latents(x)
        B, N, C = z.shape
        q, ids, loss, stats = self.quantizer(z.flatten(0, 1).float())
        grid_codes = q.view(B, self.grid, self.grid, C).permute(0, 3, 1, 2)
        out = self.decoder(grid_codes)
        return (out if self.objective == "pixels" else self.decode_task(out[:, 1:])), ids.view(B, N), loss, stats

    @classmethod
    def layout_config(cls, cfg, teacher: Teacher | None) -> dict:
        """The layout arguments of a run config (the teacher's width sizes the teacher objective's output)."""
        section = getattr(cfg, cls.kind)
        if getattr(section, "objective", "pixels") == "teacher":
            return {"objective": "teacher", "teacher_dim": teacher.feature_dim(), **vit_layout_args(section)}
        return {"objective": "pixels", "input_size": conv_input_size(cfg, cls.kind), "groups": section.groups,
                "hidden": section.hidden, "blocks_per_group": section.blocks_per_group}

    @classmethod
    def check_config(cls, cfg) -> None:
        if getattr(cfg, cls.kind).objective == "teacher":
            check_vit_layout(cfg, cls.kind, f", or set {cls.kind}.objective=pixels")
        else:
            check_grid(cfg, cls.kind)

    @classmethod
    def needs_teacher(cls, cfg) -> bool:
        return getattr(cfg, cls.kind).objective == "teacher"

    @classmethod
    def build(cls, cfg, teacher: Teacher | None, device: torch.device) -> "QuantizedTokenizer":
        tok = cls(**run_args(cfg), layout=cls.layout_config(cfg, teacher),
                  quantizer=cls.quantizer_config(cfg))
        return place_model(tok, device, cfg.precision)

    def trainer(self, cfg, teacher: Teacher | None) -> "QuantizedTraining":
        return QuantizedTraining(self, placed_teacher(teacher, self) if self.objective == "teacher" else None)


class QuantizedTraining(GradientTraining):
    """The reconstruction loss of the layout plus the quantizer's own terms; the teacher (teacher objective)
    stays outside the tokenizer."""

    def __init__(self, tok: QuantizedTokenizer, teacher: Teacher | None):
        super().__init__(tok)
        self.teacher = teacher

    def reconstruction(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict, tuple]:
        """(reconstruction loss, ids [B, N], quantizer loss, quantizer scalars, (view, decoded)) of images."""
        x = self.tok.view(resize(imgs, self.tok.img_size))
        if self.tok.training and not bool(self.tok.standardized):
            self.tok.standardize(x)
        out, ids, q_loss, stats = self.tok(x)
        if self.tok.objective == "teacher":
            target = self.teacher(imgs, (self.tok.mean, self.tok.std), self.tok.grid)
            return cosine_loss(out, target), ids, q_loss, stats, (x, out)
        return F.mse_loss(out.float(), x.float()), ids, q_loss, stats, (x, out)

    def loss(self, imgs: torch.Tensor, progress: float) -> dict:
        rec_loss, ids, q_loss, stats, _ = self.reconstruction(imgs)
        return {"loss": rec_loss + q_loss, "rec_loss": rec_loss.detach(), "quantizer_loss": q_loss.detach(),
                **{k: v.detach() if torch.is_tensor(v) else v for k, v in stats.items()}}

    @torch.no_grad()
    def evaluate(self, imgs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        rec_loss, ids, _, _, (x, out) = self.reconstruction(imgs)
        if self.tok.objective == "pixels":
            return ids, pixel_metrics(x, out, self.tok)
        return ids, {"rec_loss": rec_loss.item()}

    @torch.no_grad()
    def panel(self, imgs: torch.Tensor) -> torch.Tensor | None:
        """Pixels objective: rows of inputs and their reconstructions from the codes."""
        if self.tok.objective != "pixels":
            return None
        _, _, _, _, (x, out) = self.reconstruction(imgs)
        return image_grid([to01(x, self.tok.mean, self.tok.std), to01(out, self.tok.mean, self.tok.std)])
