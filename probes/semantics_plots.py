"""Figures of the token analysis: per-token galleries, token maps over images, the class x token heat map, the
code-usage plot, tokens per image (tokenizers that drop patches) and per-class prediction accuracy. matplotlib's
object API with the Agg canvas (no pyplot, no global backend switch); each figure is written as PNG atomically
and, given a writer, to TensorBoard."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mimkit.checkpoint import atomic_write
from mimkit.images import image_grid


def save_figure(fig: Figure, path: str | Path, writer=None, tag: str = "") -> np.ndarray:
    """Render `fig` once, write it as PNG to `path` (atomically) and, with a SummaryWriter, as image `tag`;
    returns the rendered RGB array [H, W, 3]."""
    from PIL import Image
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="png")
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    if writer is not None:
        writer.add_image(tag, rgb, 0, dataformats="HWC")
    return rgb


def token_colors(vocab_size: int) -> np.ndarray:
    """One RGB colour per token id [V, 3]: evenly spaced hues visited in a fixed shuffled order, so that
    neighbouring ids (often similar codes) get distinct colours."""
    from matplotlib.colors import hsv_to_rgb
    order = np.random.default_rng(0).permutation(vocab_size)
    hue = order / vocab_size
    sat = 0.55 + 0.45 * (np.arange(vocab_size) % 3) / 2  # vary saturation and value too: large vocabularies
    val = 0.75 + 0.25 * (np.arange(vocab_size) % 2)
    return hsv_to_rgb(np.stack([hue, sat, val], 1))


def _show(fig: Figure, grid: torch.Tensor, height: float) -> Axes:
    """One axes showing a [3, H, W] image grid at its aspect ratio, `height` inches tall."""
    h, w = grid.shape[-2:]
    fig.set_size_inches(max(3.0, height * w / h), height)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def gallery_figure(crops: torch.Tensor, captions: list[str], context: int) -> Figure:
    """crops [T, K, 3, s, s]: one row per token, each patch framed in red in the middle of its `context`
    neighbours; one mosaic (a grid of axes is ~10x slower to draw)."""
    from torchvision.utils import make_grid
    t, k, _, side, _ = crops.shape
    scale = max(1, 64 // side)  # tiny patches (digits, CIFAR) blown up for legibility
    x = torch.nn.functional.interpolate(crops.flatten(0, 1), scale_factor=scale, mode="nearest")
    cell = side * scale // (2 * context + 1)
    w = max(1, cell // 8)  # frame width; drawn on the context around the patch, inside it without context
    a, b = (context * cell - w, (context + 1) * cell + w) if context else (0, cell)
    frame = torch.zeros(x.shape[-2:], dtype=torch.bool)
    frame[a:b, a:b] = True
    frame[a + w:b - w, a + w:b - w] = False
    x[:, :, frame] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1)
    grid = make_grid(x, nrow=k, padding=2, pad_value=1.0)
    fig = Figure()
    ax = _show(fig, grid, 0.75 * t)
    fig.set_size_inches(fig.get_size_inches()[0] + 1.3, fig.get_size_inches()[1] + 0.3)
    ax.set_position((1.3 / fig.get_size_inches()[0], 0, 1 - 1.3 / fig.get_size_inches()[0],
                     1 - 0.3 / fig.get_size_inches()[1]))
    row = grid.shape[1] / t
    ax.set_yticks([(r + 0.5) * row for r in range(t)], captions, fontsize=7)
    ax.tick_params(length=0)
    ax.set_title("most frequent tokens: sample patches (red) with context", fontsize=9)
    return fig


def token_map_figure(images: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> Figure:
    """images [n, 3, H, W] in [0, 1] and their ids [n, g, g]: the images, then each blended with a colour per
    token id; a patch a LaVIT tokenizer dropped (id -1) is shown in grey."""
    dropped = ids < 0
    colors = torch.from_numpy(token_colors(vocab_size)).float()[ids.clamp_min(0)]  # [n, g, g, 3]
    colors = torch.nn.functional.interpolate(colors.permute(0, 3, 1, 2), size=images.shape[-2:], mode="nearest")
    blend = 0.35 * images.cpu() + 0.65 * colors
    if dropped.any():
        grey = 0.5 + 0.25 * (images.cpu().mean(1, keepdim=True) - 0.5)  # faint luminance, no token colour
        off = torch.nn.functional.interpolate(dropped[:, None].float(), size=images.shape[-2:], mode="nearest") > 0
        blend = torch.where(off, grey.expand_as(blend), blend)
    grid = image_grid([images.cpu(), blend])
    fig = Figure()
    ax = _show(fig, grid, 2.6)
    ax.set_position((0.0, 0.0, 1.0, 0.9))
    g = ids.shape[-1]
    kept = " (grey: dropped patches)" if dropped.any() else ""
    ax.set_title(f"images and their {g}x{g} token ids (one colour per id){kept}", fontsize=9)
    return fig


def tokens_per_image_figure(counts: np.ndarray, num_tokens: int, name: str) -> Figure:
    """Histogram of the number of tokens per image of a tokenizer that drops patches (of num_tokens per grid)."""
    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.subplots()
    ax.hist(counts, bins=np.arange(-0.5, num_tokens + 1.5), color="tab:blue")
    ax.axvline(counts.mean(), color="black", linewidth=1, label=f"mean {counts.mean():.1f}")
    ax.set_xlim(-0.5, num_tokens + 0.5)
    ax.set_xlabel(f"tokens per image (of {num_tokens} patches)")
    ax.set_ylabel("images")
    ax.set_title(f"{name}: tokens per image, mean {counts.mean():.1f} +- {counts.std():.1f}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def heatmap_figure(counts: np.ndarray, classes: list[str], tokens: np.ndarray) -> Figure:
    """M[c, s] (share of class-c patches assigned token s) for `tokens`, columns grouped by majority class."""
    rows = counts.sum(1, keepdims=True)
    m = counts / np.maximum(rows, 1)
    sub = m[:, tokens]
    major = counts[:, tokens].argmax(0)
    order = np.lexsort((-counts[:, tokens].sum(0), major))  # by majority class, then frequency
    fig = Figure(figsize=(min(16, 2.5 + 0.14 * len(tokens)), 1.2 + 0.3 * len(classes)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(sub[:, order], aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    step = max(1, len(tokens) // 32)
    ax.set_xticks(range(0, len(tokens), step), [str(t) for t in tokens[order][::step]], fontsize=6, rotation=90)
    ax.set_xlabel(f"the {len(tokens)} most frequent tokens, grouped by majority class")
    ax.set_title("share of each class's patches per token", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return fig


def usage_figure(token_counts: np.ndarray, name: str, usage: float, perplexity: float) -> Figure:
    """Patches per code, codes sorted by frequency (log scale), titled with usage and perplexity."""
    counts = np.sort(token_counts)[::-1]
    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.subplots()
    # a filled step curve: one bar per code is slow and aliased at 8192 codes
    ax.fill_between(np.arange(len(counts)), np.maximum(counts, 0.5), 0.5, step="mid", color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlim(-0.5, len(counts) - 0.5)
    ax.set_ylim(bottom=0.5)
    ax.set_xlabel("code (sorted by frequency)")
    ax.set_ylabel("patches")
    ax.set_title(f"{name}: {int((counts > 0).sum())}/{len(counts)} codes used ({usage:.1%}), "
                 f"perplexity {perplexity:.1f}", fontsize=9)
    return fig


def accuracy_figure(per_class: dict[str, float], overall: float, baseline: float) -> Figure:
    """Masked-patch token accuracy per class, with the overall accuracy and the most-frequent-id baseline."""
    names = list(per_class)
    fig = Figure(figsize=(max(4, 0.5 * len(names) + 1.5), 3), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(names)), [100 * per_class[n] for n in names], color="tab:green")
    ax.axhline(100 * overall, color="black", linewidth=1, label=f"overall {overall:.1%}")
    ax.axhline(100 * baseline, color="gray", linestyle="--", linewidth=1, label=f"most frequent id {baseline:.1%}")
    ax.set_xticks(range(len(names)), names, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("masked-patch token accuracy (%)")
    ax.set_ylim(0, min(100, 130 * max([overall, baseline, *per_class.values()]) + 1))  # room for the legend
    ax.legend(fontsize=7, loc="upper right")
    return fig
