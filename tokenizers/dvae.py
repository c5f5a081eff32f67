"""BEiT's tokenizer: a DALL-E style discrete VAE.

Conv encoder (DALL-E's: a 7x7 input conv, `groups` groups of bottleneck residual blocks with a 2x max-pool
between groups, ReLU + 1x1 conv to logits over the vocabulary), a Gumbel-softmax relaxation whose temperature
is cosine-annealed, a KL term to the uniform prior with a warmed-up weight, and a mirrored conv decoder
(nearest upsampling) trained with MSE on the normalized pixels. The encoder sees its own input size
(`input_size`, BEiT: the 112 px half-resolution copy of the 224 px view), so its token grid is the encoder's
patch grid: input_size / 2^(groups-1) = img_size / patch_size.

DALL-E's released encoder loads into the same architecture (`from_dalle`). Accepted format: a state dict
file readable with torch.load(weights_only=True) holding the keys of `dall_e.Encoder` (`blocks.input.w`,
`blocks.group_1.block_1.res_path.conv_1.w`, ..., `blocks.output.conv.b`; `.weight`/`.bias` names work too).
Make it once, where the `dall_e` package is installed, from OpenAI's pickled encoder.pkl:
`torch.save(dall_e.load_model("encoder.pkl").state_dict(), "dalle_encoder.pt")`. That encoder expects
pixels in [0, 1] mapped by DALL-E's map_pixels (x * 0.8 + 0.1), which the imported tokenizer applies itself.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.checkpoint import CheckpointError
from mimkit.config import ConfigError, check_range
from mimkit.images import image_grid, resize
from mimkit.loop import place_model
from mimkit.teachers import Teacher, read_state_dict
from mimkit.tokenizer_config import TOKENIZER_RECIPES, DVAEConfig

from .base import FitTraining, GradientTraining, Training, TrainableTokenizer, register_tokenizer, run_args

LOGIT_LAPLACE_EPS = 0.1  # DALL-E's map_pixels


def conv_input_size(cfg, section: str = "dvae") -> int:
    """The conv encoder's input side in a run config (<section>.input_size, 0 = data.img_size)."""
    return getattr(cfg, section).input_size or cfg.data.img_size


def check_grid(cfg, section: str = "dvae") -> None:
    """The conv layout's token grid, input_size / 2^(groups - 1), must be the encoder's patch grid (`section`:
    the kind's name)."""
    check_range(f"{section}.groups", getattr(cfg, section).groups, 1)
    groups = getattr(cfg, section).groups
    grid, size, factor = cfg.data.img_size // cfg.patch_size, conv_input_size(cfg, section), 2 ** (groups - 1)
    if size == grid * factor:
        return
    half = cfg.data.img_size // 2  # BEiT's layout: the half-resolution copy, patch / 2 pixels per token
    p = cfg.patch_size
    hint = (f"{section}.input_size={half} {section}.groups={(p // 2).bit_length()}" if p >= 2 and p & (p - 1) == 0
            else f"{section}.input_size={grid * factor}")
    raise ConfigError(f"{section}.input_size={size} with {section}.groups={groups} (downsampling {factor}) gives a "
                      f"{size // factor}x{size // factor} token grid, but data.img_size / patch_size = {grid}; "
                      f"set e.g. {hint}")


def conv(n_in: int, n_out: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, k, padding=(k - 1) // 2)


class ResBlock(nn.Module):
    """DALL-E's residual bottleneck: id_path (1x1 conv when the width changes) + post_gain * res_path, with
    post_gain = 1 / n_layers^2 so the sum of residuals stays small at init."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, first_kernel: int = 3):
        super().__init__()
        hid = max(n_out // 4, 1)
        self.post_gain = 1.0 / n_layers ** 2
        self.id_path = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", conv(n_in, hid, first_kernel)),
            ("relu_2", nn.ReLU()), ("conv_2", conv(hid, hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", conv(hid, hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", conv(hid, n_out, 1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _groups(widths: list[int], n_in: int, blocks: int, n_layers: int, resample: str, first_kernel: int) -> list:
    out = []
    for g, width in enumerate(widths):
        layers = []
        for b in range(blocks):
            layers.append((f"block_{b + 1}", ResBlock(n_in if b == 0 else width, width, n_layers, first_kernel)))
        if g < len(widths) - 1:
            layers.append(("pool", nn.MaxPool2d(2)) if resample == "pool" else
                          ("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
        out.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
        n_in = width
    return out


class Encoder(nn.Module):
    """DALL-E's encoder layout and parameter names (group widths hidden * 1, 2, 4, 8, ...)."""

    def __init__(self, vocab_size: int, hidden: int, groups: int, blocks_per_group: int, in_chans: int = 3):
        super().__init__()
        widths = [hidden * 2 ** g for g in range(groups)]
        self.blocks = nn.Sequential(OrderedDict([
            ("input", conv(in_chans, hidden, 7)),
            *_groups(widths, hidden, blocks_per_group, groups * blocks_per_group, "pool", 3),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", conv(widths[-1], vocab_size, 1))]))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """The mirror image: 1x1 conv from the (relaxed) one-hot codes, groups from widest to narrowest with 2x
    nearest upsampling between them, ReLU + 1x1 conv to pixels."""

    def __init__(self, vocab_size: int, hidden: int, groups: int, blocks_per_group: int, out_chans: int = 3):
        super().__init__()
        widths = [hidden * 2 ** g for g in reversed(range(groups))]
        self.blocks = nn.Sequential(OrderedDict([
            ("input", conv(vocab_size, hidden, 1)),
            *_groups(widths, hidden, blocks_per_group, groups * blocks_per_group, "upsample", 1),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", conv(widths[-1], out_chans, 1))]))),
        ]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


@register_tokenizer("dvae")
class DVAE(TrainableTokenizer):
    paper = "BEiT"
    Config = DVAEConfig
    recipe = TOKENIZER_RECIPES["dvae"]

    def __init__(self, img_size: int, grid: int, vocab_size: int, mean: list[float], std: list[float],
                 input_size: int, groups: int = 4, hidden: int = 256, blocks_per_group: int = 2,
                 pixel_map: str = "normalized", decoder: bool = True):
        super().__init__(img_size, grid, vocab_size, mean, std)
        if input_size != grid * 2 ** (groups - 1):
            raise ValueError(f"dVAE input_size {input_size} with {groups} groups does not give a {grid}x{grid} grid")
        self.input_size, self.groups, self.hidden, self.blocks_per_group = input_size, groups, hidden, blocks_per_group
        self.pixel_map = pixel_map  # "normalized": inputs as normalized; "dalle": [0, 1] -> map_pixels
        self.encoder = Encoder(vocab_size, hidden, groups, blocks_per_group)
        self.decoder = Decoder(vocab_size, hidden, groups, blocks_per_group) if decoder else None

    def hparams(self) -> dict:
        return {"input_size": self.input_size, "groups": self.groups, "hidden": self.hidden,
                "blocks_per_group": self.blocks_per_group, "pixel_map": self.pixel_map,
                "decoder": self.decoder is not None}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x at input_size (normalized with mean/std) -> logits [B, vocab, grid, grid]."""
        if self.pixel_map == "dalle":  # mean 0 / std 1: x is in [0, 1]
            x = (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(relaxed) one-hot codes [B, vocab, grid, grid] -> images at input_size (normalized)."""
        if self.decoder is None:
            raise RuntimeError("this dVAE has no decoder (an imported DALL-E encoder)")
        return self.decoder(z)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(resize(images, self.input_size)).argmax(1).flatten(1)

    @classmethod
    def check_config(cls, cfg) -> None:
        check_grid(cfg)
        if not 0 < cfg.dvae.tau_end <= cfg.dvae.tau_start:
            raise ConfigError(f"dvae.tau_end={cfg.dvae.tau_end} must satisfy 0 < tau_end <= "
                              f"tau_start={cfg.dvae.tau_start}")

    @classmethod
    def build(cls, cfg, teacher: Teacher | None, device: torch.device) -> "DVAE":
        """A fresh dVAE, or DALL-E's released encoder when dvae.dalle_encoder names it."""
        d, args = cfg.dvae, run_args(cfg)
        if d.dalle_encoder:
            tok = from_dalle(d.dalle_encoder, args["img_size"], args["grid"])
        else:
            tok = cls(**args, input_size=conv_input_size(cfg), groups=d.groups, hidden=d.hidden,
                      blocks_per_group=d.blocks_per_group)
        return place_model(tok, device, cfg.precision)

    def trainer(self, cfg, teacher: Teacher | None) -> Training:
        """The gradient loop's step, or nothing to train for an imported DALL-E encoder (it has no decoder)."""
        return DVAETraining(self, cfg.dvae) if self.decoder is not None else ImportedEncoder(self, cfg.dvae)


def temperature(progress: float, start: float, end: float, anneal: float) -> float:
    """Cosine from `start` to `end` over the first `anneal` share of training, then `end` (DALL-E)."""
    t = min(progress / anneal, 1.0) if anneal > 0 else 1.0
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def kl_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(q || uniform) = sum_k q_k log q_k + log K, q = softmax over dim 1."""
    logq = F.log_softmax(logits.float(), dim=1)
    return ((logq.exp() * logq).sum(1) + math.log(logits.shape[1])).mean()


def to01(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Images normalized with (mean, std) -> float pixels in [0, 1]."""
    mean_t, std_t = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    return (x.float() * std_t + mean_t).clamp(0, 1)


def psnr(mse01: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of a mean squared error on [0, 1] pixels."""
    return 10 * torch.log10(1.0 / mse01.clamp_min(1e-10))


class ImportedEncoder(FitTraining):
    """DALL-E's released encoder, loaded by `build`: nothing to train."""

    def __init__(self, tok: DVAE, dcfg: DVAEConfig):
        super().__init__(tok)
        self.path = dcfg.dalle_encoder

    def fit(self, train_set, device: torch.device, log: Callable[[str], None]) -> dict:
        log(f"imported DALL-E's encoder from {self.path} (no training)")
        return {}


class DVAETraining(GradientTraining):
    """Loss, evaluation and panels for `mimkit tokenizer train` with kind=dvae (`dcfg`: its DVAEConfig)."""

    def __init__(self, tok: DVAE, dcfg: DVAEConfig):
        super().__init__(tok)
        self.cfg = dcfg

    def loss(self, imgs: torch.Tensor, progress: float) -> dict:
        """MSE of the relaxed reconstruction + the warmed-up KL to the uniform prior; temperature and KL weight
        follow `progress`."""
        c, tok = self.cfg, self.tok
        x = resize(imgs, tok.input_size)
        logits = tok.logits(x)
        tau = temperature(progress, c.tau_start, c.tau_end, c.tau_anneal)
        z = F.gumbel_softmax(logits.float(), tau=tau, hard=False, dim=1)
        rec_loss = F.mse_loss(tok.decode(z).float(), x.float())
        kl = kl_uniform(logits)
        kl_w = c.kl_weight * (min(progress / c.kl_warmup, 1.0) if c.kl_warmup > 0 else 1.0)
        return {"loss": rec_loss + kl_w * kl, "rec_loss": rec_loss.detach(), "kl": kl.detach(),
                "temperature": tau, "kl_weight": kl_w}

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input at input_size, reconstruction from the hard codes, ids [B, N])."""
        x = resize(imgs, self.tok.input_size)
        ids = self.tok.logits(x).argmax(1)
        z = F.one_hot(ids, self.tok.vocab_size).permute(0, 3, 1, 2).to(x.dtype)
        return x, self.tok.decode(z), ids.flatten(1)

    @torch.no_grad()
    def evaluate(self, imgs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """ids and per-batch metrics of the discrete (hard-code) reconstruction."""
        x, rec, ids = self.reconstruct(imgs)
        return ids, pixel_metrics(x, rec, self.tok)

    @torch.no_grad()
    def panel(self, imgs: torch.Tensor) -> torch.Tensor | None:
        """Rows: the dVAE's inputs, their reconstructions from the hard codes."""
        x, rec, _ = self.reconstruct(imgs)
        return image_grid([to01(x, self.tok.mean, self.tok.std), to01(rec, self.tok.mean, self.tok.std)])


def pixel_metrics(x: torch.Tensor, rec: torch.Tensor, tok) -> dict[str, float]:
    """MSE on the normalized pixels and PSNR on [0, 1] pixels of a reconstruction `rec` of `x` (same shape)."""
    mse01 = F.mse_loss(to01(rec, tok.mean, tok.std), to01(x, tok.mean, tok.std))
    return {"rec_loss": F.mse_loss(rec.float(), x.float()).item(), "psnr": psnr(mse01).item()}


def from_dalle(path: str, img_size: int, grid: int) -> DVAE:
    """A dVAE tokenizer holding DALL-E's released encoder (format in the module docstring). Inputs are
    converted from the method's normalization to [0, 1] (mean 0, std 1) and mapped as DALL-E expects."""
    state = read_state_dict(path)
    state = {k[:-2] + ".weight" if k.endswith(".w") else k[:-2] + ".bias" if k.endswith(".b") else k: v
             for k, v in state.items()}
    try:
        hidden = state["blocks.input.weight"].shape[0]
        vocab = state["blocks.output.conv.weight"].shape[0]
    except KeyError:
        raise CheckpointError(f"{path} is not a DALL-E encoder state dict (no blocks.input / blocks.output.conv "
                              f"weights)") from None
    groups = len({k.split(".")[1] for k in state if k.startswith("blocks.group_")})
    blocks = len({k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")})
    tok = DVAE(img_size, grid, vocab, [0.0] * 3, [1.0] * 3, input_size=grid * 2 ** (groups - 1), groups=groups,
               hidden=hidden, blocks_per_group=blocks, pixel_map="dalle", decoder=False)
    try:
        tok.encoder.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit DALL-E's encoder layout ({str(e).splitlines()[0]})") from None
    return tok.eval()
