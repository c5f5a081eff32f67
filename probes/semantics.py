"""Token semantics: what do a tokenizer's discrete targets mean?

`mimkit analyze tokens` labels every patch with its image's class, streams a labeled dataset through one or
more tokenizers and reports, per tokenizer: codebook usage and perplexity, per-token class entropy, TCAS
(ClusterMIM; mimkit's definition: M[c, s] = share of class-c patches assigned token s;
TCAS = sum_{c != c'} (M M^T)_{cc'} / sum_c (M M^T)_{cc}; 0 when no token is shared across classes, C - 1 for a
tokenizer blind to class), purity,
and scikit-learn's NMI / AMI / homogeneity / completeness / V-measure between patch tokens and image labels.
A tokenizer that drops patches (LaVIT's: id -1) is measured over its kept patches, plus its tokens per image,
its keep ratio per class and the correlation of the keep ratio with image complexity (the mean gradient
magnitude of the grey image).
`mimkit analyze predictions` measures how often a pretrained beit / beitv2 / clustermim model predicts the
tokenizer's id of a masked patch, per class and overall.

Counts are exact over every patch (a class x token matrix, updated per batch); scikit-learn's scores run on a
deterministic subsample when there are more than `metric_samples` patches. Patches are picked by a hash of
their global index, so the subsample and the gallery patches do not depend on the batch size or the device.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from mimkit import checkpoint, dist, progress
from mimkit.checkpoint import CheckpointError
from mimkit.config import ConfigError, from_dict, set_key
from mimkit.data import (EpochSampler, MaskedImages, Transformed, build_dataset, dataset_stats, denormalize,
                         eval_transform, make_loader)
from mimkit.dist import autocast
from mimkit.images import resize
from mimkit.loop import RunLog, write_metrics
from mimkit.masking import build_mask_generator
from mimkit.methods import METHODS, Method, build_method, config_class
from mimkit.targets.tokens import TokenIds
from mimkit.tokenizers.base import Tokenizer, count_stats
from mimkit.tokenizers.lavit import LaVIT

from . import semantics_plots as plots
from .analyze_config import AnalyzeConfig, analyze_config, split_limit, validate
from .run import prepare_output_dir


RESULT_FILES = ("tb", "metrics.json", "log.txt", "table.md", "figures")  # replaced with overwrite=true


def parse_tokenizers(spec: str) -> dict[str, str]:
    """'a.pt,kmeans=runs/x/tokenizer.pt' -> {name: path}; unnamed files are named after their run directory
    (runs/tokenizer_kmeans_cifar10/tokenizer.pt -> tokenizer_kmeans_cifar10) or their stem."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or "/" in name:
            path = item
            p = Path(item)
            name = p.parent.name if p.stem == "tokenizer" and p.parent.name else p.stem
        base, i = name, 2
        while name in out:
            name, i = f"{base}_{i}", i + 1
        out[name] = path
    if not out:
        raise ConfigError("no tokenizer given; use --tokenizer FILE (repeat it to compare tokenizers)")
    return out


def require_tokenizer_file(path: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"--tokenizer {path}: no such file")


def load_tokenizer(path: str) -> Tokenizer:
    require_tokenizer_file(path)
    return Tokenizer.load(path)


# ---------------------------------------------------------------------------------------------
# Metrics of a class x token count matrix


def tcas(counts: np.ndarray) -> float:
    """Token-class alignment similarity of counts [C, V] (module docstring); classes without patches are left out."""
    counts = counts[counts.sum(1) > 0].astype(np.float64)
    m = counts / counts.sum(1, keepdims=True)
    g = m @ m.T
    diag = np.trace(g)
    return float((g.sum() - diag) / diag)


def token_class_entropy(counts: np.ndarray) -> tuple[float, float]:
    """Entropy (nats) of the class distribution of each used token: (mean over used tokens, weighted by token
    frequency = H(class | token))."""
    n_s = counts.sum(0)
    used = n_s > 0
    p = counts[:, used] / n_s[used]
    h = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(0)
    return float(h.mean()), float((h * n_s[used]).sum() / n_s.sum())


def purity(counts: np.ndarray) -> float:
    """Share of patches whose token's majority class is their class."""
    return float(counts.max(0).sum() / counts.sum())


def cluster_scores(labels: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """scikit-learn's clustering scores of patch tokens (clusters) against image labels (classes)."""
    from sklearn import metrics
    h, c, v = metrics.homogeneity_completeness_v_measure(labels, ids)
    return {"nmi": float(metrics.normalized_mutual_info_score(labels, ids)),
            "ami": float(metrics.adjusted_mutual_info_score(labels, ids)),
            "homogeneity": float(h), "completeness": float(c), "v_measure": float(v)}


def summarize_counts(counts: np.ndarray) -> dict[str, float]:
    """Every count-based metric of a class x token matrix [C, V]."""
    num_classes = int((counts.sum(1) > 0).sum())
    usage, perplexity = (count_stats(counts.sum(0))[k] for k in ("usage", "perplexity"))
    h_mean, h_weighted = token_class_entropy(counts)
    score = tcas(counts)
    return {"classes": num_classes, "patches": int(counts.sum()), "codes_used": int((counts.sum(0) > 0).sum()),
            "usage": usage, "perplexity": perplexity, "class_entropy_mean": h_mean,
            "class_entropy_weighted": h_weighted, "class_entropy_max": math.log(max(num_classes, 1)),
            "tcas": score, "tcas_norm": score / (num_classes - 1) if num_classes > 1 else float("nan"),
            "purity": purity(counts)}


# ---------------------------------------------------------------------------------------------
# Streaming


def patch_priority(index: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per global patch index (splitmix64 of index and seed): the same patches are
    sampled whatever the batch size, order of batches or device."""
    with np.errstate(over="ignore"):
        x = index.astype(np.uint64) + np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


class TokenStats:
    """One tokenizer's statistics over a stream of labeled images: the class x token counts of every patch,
    a subsample of (label, token) pairs for scikit-learn, and for every token the `gallery` patches of lowest
    priority (a deterministic sample) as global patch indices (image index * N + position)."""

    def __init__(self, num_classes: int, vocab_size: int, num_tokens: int, sample_rate: float, gallery: int,
                 seed: int = 0, dynamic: bool = False):
        self.vocab_size, self.num_tokens, self.sample_rate, self.seed = vocab_size, num_tokens, sample_rate, seed
        self.dynamic = dynamic  # drops patches (id -1): per-image token counts, per class and against complexity
        self.kept: list[np.ndarray] = []  # tokens per image
        self.image_labels: list[np.ndarray] = []
        self.complexity: list[np.ndarray] = []
        self.counts = np.zeros((num_classes, vocab_size), np.int64)
        self.sample_labels: list[np.ndarray] = []
        self.sample_ids: list[np.ndarray] = []
        self.best_priority = np.full((vocab_size, gallery), np.inf)
        self.best_ref = np.full((vocab_size, gallery), -1, np.int64)

    def update(self, ids: torch.Tensor, labels: torch.Tensor, first_image: int,
               complexity: torch.Tensor | None = None) -> None:
        """ids [B, N] of images first_image .. first_image + B - 1 with their labels [B] (and, for a tokenizer
        that drops patches, their complexity [B]); dropped patches (-1) are left out of every count."""
        ids = ids.cpu().numpy().astype(np.int64)
        if ids.size and (ids.min() < (-1 if self.dynamic else 0) or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids outside [0, {self.vocab_size}): {ids.min()}..{ids.max()}")
        self.kept.append((ids >= 0).sum(1))
        self.image_labels.append(np.asarray(labels, np.int64))
        if complexity is not None:
            self.complexity.append(complexity.cpu().numpy().astype(np.float64))
        ids = ids.ravel()
        labels = np.repeat(np.asarray(labels, np.int64), self.num_tokens)
        ref = first_image * self.num_tokens + np.arange(ids.size, dtype=np.int64)
        valid = ids >= 0
        ids, labels, ref = ids[valid], labels[valid], ref[valid]
        c, v = self.counts.shape
        self.counts += np.bincount(labels * v + ids, minlength=c * v).reshape(c, v)
        priority = patch_priority(ref, self.seed)
        keep = priority < self.sample_rate
        self.sample_labels.append(labels[keep])
        self.sample_ids.append(ids[keep])
        better = priority < self.best_priority[ids, -1]
        if better.any():
            self._merge(ids[better], priority[better], ref[better])

    def _merge(self, ids: np.ndarray, priority: np.ndarray, ref: np.ndarray) -> None:
        v, k = self.best_priority.shape
        tok = np.concatenate([np.repeat(np.arange(v), k), ids])
        pri = np.concatenate([self.best_priority.ravel(), priority])
        refs = np.concatenate([self.best_ref.ravel(), ref])
        order = np.lexsort((pri, tok))  # by token, then priority
        tok = tok[order]
        rank = np.arange(len(tok)) - np.searchsorted(tok, tok)  # position within the token's group
        first = rank < k  # every token has >= k entries: exactly k kept each, in token order
        self.best_priority = pri[order][first].reshape(v, k)
        self.best_ref = refs[order][first].reshape(v, k)

    def metrics(self) -> dict:
        out = summarize_counts(self.counts)
        labels, ids = np.concatenate(self.sample_labels), np.concatenate(self.sample_ids)
        kept = np.concatenate(self.kept).astype(np.float64)
        out.update(tokens_per_image=float(kept.mean()), tokens_per_image_std=float(kept.std()))
        if self.dynamic:
            out.update(keep_metrics(kept / self.num_tokens, np.concatenate(self.image_labels),
                                    np.concatenate(self.complexity), len(self.counts)))
        return {**out, **cluster_scores(labels, ids), "metric_samples": int(len(ids))}


def keep_metrics(ratio: np.ndarray, labels: np.ndarray, complexity: np.ndarray, num_classes: int) -> dict:
    """Keep ratio per image [n]: its mean, its mean per class (NaN for a class without images), and its Pearson
    and Spearman correlations with the images' complexity [n] (NaN when either is constant)."""
    from scipy import stats
    per_class = [float(ratio[labels == c].mean()) if (labels == c).any() else float("nan")
                 for c in range(num_classes)]
    varied = len(ratio) > 1 and ratio.std() > 0 and complexity.std() > 0
    return {"keep_ratio": float(ratio.mean()), "keep_ratio_per_class": per_class,
            "keep_complexity_pearson": float(np.corrcoef(ratio, complexity)[0, 1]) if varied else float("nan"),
            "keep_complexity_spearman": float(stats.spearmanr(ratio, complexity)[0]) if varied else float("nan")}


def image_complexity(images: torch.Tensor) -> torch.Tensor:
    """Mean gradient magnitude [B] of images [B, 3, H, W] in [0, 1]: forward differences of the grey image."""
    grey = images.float().mean(1)
    gx, gy = grey[:, :-1, 1:] - grey[:, :-1, :-1], grey[:, 1:, :-1] - grey[:, :-1, :-1]
    return (gx * gx + gy * gy).sqrt().flatten(1).mean(1)


def stream_tokens(tokenizers: dict[str, Tokenizer], dataset, data_name: str, num_classes: int, cfg: AnalyzeConfig,
                  device: torch.device) -> tuple[dict[str, TokenStats], torch.Tensor, dict[str, torch.Tensor]]:
    """One pass over `dataset` (normalized images with `data_name`'s statistics, labels) encoding every batch
    with every tokenizer. Returns the statistics, `figures.map_images` images spread evenly over the dataset
    (folders are sorted by class: the first images would all be one class), in [0, 1], and their ids per
    tokenizer."""
    stats_of = dataset_stats(data_name)
    frozen = {name: TokenIds(tok, stats_of) for name, tok in tokenizers.items()}
    total = len(dataset)
    stats = {name: TokenStats(num_classes, tok.vocab_size, tok.num_tokens,
                              min(1.0, cfg.metric_samples / max(1, total * tok.num_tokens)),
                              cfg.figures.gallery_patches, cfg.seed, isinstance(tok, LaVIT))
             for name, tok in tokenizers.items()}
    dynamic = any(st.dynamic for st in stats.values())
    loader = make_loader(dataset, cfg.batch_size, cfg.data, pin_memory=device.type == "cuda")
    shown = torch.from_numpy(np.unique(np.linspace(0, total - 1, min(cfg.figures.map_images, total)).round())).long()
    map_imgs, map_ids, seen = [], {name: [] for name in tokenizers}, 0
    for imgs, labels in progress.bar(loader, "tokens"):
        imgs = imgs.to(device, non_blocking=True)
        labels = torch.as_tensor(labels)
        rows = (shown[(shown >= seen) & (shown < seen + len(imgs))] - seen).to(device)
        map_imgs.append(denormalize(imgs[rows].float(), data_name).cpu())
        complexity = image_complexity(denormalize(imgs.float(), data_name)) if dynamic else None
        with autocast(device):
            for name, tok in frozen.items():
                ids = tok(imgs)
                stats[name].update(ids, labels, seen, complexity if stats[name].dynamic else None)
                map_ids[name].append(ids[rows].cpu())
        seen += len(imgs)
    return stats, torch.cat(map_imgs), {k: torch.cat(v) for k, v in map_ids.items()}


# ---------------------------------------------------------------------------------------------
# `mimkit analyze tokens`

TABLE_COLUMNS = [("tokenizer", "tokenizer", "{}"), ("kind", "kind", "{}"), ("vocab_size", "vocab", "{}"),
                 ("usage", "usage", "{:.1%}"), ("perplexity", "perplexity", "{:.1f}"),
                 ("class_entropy_weighted", "class entropy", "{:.3f}"), ("tcas", "TCAS", "{:.3f}"),
                 ("tcas_norm", "TCAS/(C-1)", "{:.3f}"), ("nmi", "NMI", "{:.3f}"), ("ami", "AMI", "{:.3f}"),
                 ("purity", "purity", "{:.3f}"), ("v_measure", "V-measure", "{:.3f}"),
                 ("tokens_per_image", "tokens/image", "{:.1f}")]


def markdown_table(rows: list[dict]) -> str:
    head = [title for _, title, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def gallery_crops(dataset, refs: np.ndarray, tok: Tokenizer, data_name: str, context: int) -> torch.Tensor:
    """Patches (global indices `refs` [T, K], -1 = none) with `context` patches around them, from the images at
    the tokenizer's resolution: [T, K, 3, s, s] in [0, 1] (blank where refs is -1)."""
    cell = tok.img_size // tok.grid
    side = cell * (2 * context + 1)
    out = torch.ones(*refs.shape, 3, side, side)
    cache: dict[int, torch.Tensor] = {}
    for (t, k), ref in np.ndenumerate(refs):
        if ref < 0:
            continue
        i, pos = divmod(int(ref), tok.num_tokens)
        if i not in cache:
            img = denormalize(dataset[i][0].unsqueeze(0).float(), data_name)
            pad = context * cell
            cache[i] = torch.nn.functional.pad(resize(img, tok.img_size)[0], (pad,) * 4, value=1.0)
        r, c = divmod(pos, tok.grid)
        out[t, k] = cache[i][:, r * cell:r * cell + side, c * cell:c * cell + side]
    return out


def tokenizer_figures(name: str, tok: Tokenizer, st: TokenStats, dataset, classes: list[str], map_imgs, map_ids,
                      cfg: AnalyzeConfig, out: Path, writer) -> list[str]:
    """The figures of one tokenizer (PNG under out/figures/<name>/ and TensorBoard; a histogram of tokens per image
    for a tokenizer that drops patches); returns the paths."""
    fc, folder = cfg.figures, out / "figures" / name
    counts = st.counts
    freq = counts.sum(0)
    top = np.argsort(-freq, kind="stable")
    top = top[freq[top] > 0]
    rows = top[:fc.gallery_tokens]
    crops = gallery_crops(dataset, st.best_ref[rows], tok, cfg.data.name, fc.context)
    captions = []
    for s in rows:
        c = int(counts[:, s].argmax())
        captions.append(f"token {s}\nn={freq[s]}\n{classes[c]} {counts[c, s] / freq[s]:.0%}")
    figs = {
        "gallery": plots.gallery_figure(crops, captions, fc.context),
        "token_maps": plots.token_map_figure(map_imgs, map_ids.view(-1, tok.grid, tok.grid), tok.vocab_size),
        "class_token_heatmap": plots.heatmap_figure(counts, classes, top[:fc.heatmap_tokens]),
        "code_usage": plots.usage_figure(freq, name, *(count_stats(freq)[k] for k in ("usage", "perplexity"))),
    }
    if st.dynamic:
        figs["tokens_per_image"] = plots.tokens_per_image_figure(np.concatenate(st.kept), tok.num_tokens, name)
    paths = []
    for fig_name, fig in figs.items():
        path = folder / f"{fig_name}.png"
        plots.save_figure(fig, path, writer, f"{name}/{fig_name}")
        paths.append(str(path))
    return paths


def analyze_tokens(cfg: AnalyzeConfig) -> dict:
    """Run the token analysis of cfg.tokenizers on cfg.data; writes the run directory and returns metrics."""
    validate(cfg)
    files = parse_tokenizers(cfg.tokenizers)
    tokenizers = {name: load_tokenizer(path) for name, path in files.items()}
    device = dist.init(cfg.device)
    base = build_dataset(cfg.data, cfg.split, split_limit(cfg))
    classes = list(base.classes)
    dataset = Transformed(base, eval_transform(cfg.data))
    out = prepare_output_dir(cfg, Path("runs") / f"analyze_tokens_{cfg.data.name}", "an analysis", RESULT_FILES)
    log = RunLog(out)
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(out / "tb"))
    t0 = time.perf_counter()
    log(f"token analysis of {', '.join(files)} on {cfg.data.name} {cfg.split} ({len(dataset)} images, "
        f"{len(classes)} classes, {cfg.data.img_size}px), device {device}")
    for name, tok in tokenizers.items():
        tok.to(device)
        log(f"  {name}: {tok.kind}, vocabulary {tok.vocab_size}, {tok.grid}x{tok.grid} tokens at {tok.img_size}px "
            f"({files[name]})")
    try:
        stats, map_imgs, map_ids = stream_tokens(tokenizers, dataset, cfg.data.name, len(classes), cfg, device)
        results = {}
        for name, tok in tokenizers.items():
            m = {"tokenizer": name, "file": files[name], "kind": tok.kind, "vocab_size": tok.vocab_size,
                 "grid": tok.grid, "img_size": tok.img_size, **stats[name].metrics()}
            if "keep_ratio_per_class" in m:
                m["keep_ratio_per_class"] = dict(zip(classes, m["keep_ratio_per_class"]))
            m["figures"] = tokenizer_figures(name, tok, stats[name], dataset, classes, map_imgs, map_ids[name], cfg,
                                             out, writer)
            for key in ("usage", "perplexity", "class_entropy_weighted", "tcas", "tcas_norm", "nmi", "ami", "purity",
                        "v_measure", "tokens_per_image", "keep_ratio", "keep_complexity_pearson",
                        "keep_complexity_spearman"):
                if key in m:
                    writer.add_scalar(f"{name}/{key}", m[key], 0)
            if "keep_ratio" in m:
                log(f"  {name}: {m['tokens_per_image']:.1f} +- {m['tokens_per_image_std']:.1f} tokens per image (keep "
                    f"ratio {m['keep_ratio']:.1%}), correlation of the keep ratio with image complexity: Pearson "
                    f"{m['keep_complexity_pearson']:.3f}, Spearman {m['keep_complexity_spearman']:.3f}")
            results[name] = m
        table = sorted(({k: results[n][k] for k, _, _ in TABLE_COLUMNS} for n in results), key=lambda r: r["tcas"])
        md = markdown_table(table)
        writer.add_text("table", md, 0)
    finally:
        writer.close()
    checkpoint.atomic_write_text(out / "table.md", md)
    metrics = {"dataset": cfg.data.name, "split": cfg.split, "images": len(dataset), "classes": classes,
               "table": table, "tokenizers": results, "seconds": time.perf_counter() - t0}
    log("\n" + md + f"\nfigures under {out / 'figures'}")
    write_metrics(out, metrics, log)
    return metrics


# ---------------------------------------------------------------------------------------------
# `mimkit analyze predictions`


def load_method(ckpt: dict, path: str, cfg: AnalyzeConfig, tokenizer: str) -> tuple[Method, object]:
    """Rebuild the method of a pretraining checkpoint from its stored config with `tokenizer` as its target
    (default: the stored target.tokens.tokenizer) and the analysis' data settings, and load its weights; returns
    the model and its config."""
    stored = ckpt.get("config")
    if not isinstance(stored, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' and 'config' entries; is it a mimkit pretraining checkpoint?")
    if stored.get("method") not in METHODS:
        raise CheckpointError(f"{path}: unknown method {stored.get('method')!r} (known: {', '.join(METHODS)})")
    try:
        mcfg = from_dict(config_class(), stored)
    except ConfigError as e:
        raise CheckpointError(f"{path}: stored config is not readable ({e})") from None
    if cfg.data.img_size != mcfg.data.img_size:
        raise ConfigError(f"data.img_size={cfg.data.img_size} differs from the checkpoint's {mcfg.data.img_size}; "
                          f"the model predicts tokens at the size it was trained at")
    mcfg.data = cfg.data
    if mcfg.target.kind != "tokens":
        raise ConfigError(f"{path} is a {mcfg.method} checkpoint, whose targets are not tokens; `analyze predictions` "
                          f"needs a checkpoint of a method with target.kind=tokens (beit, beitv2, clustermim)")
    tok = mcfg.target.tokens
    tok.tokenizer = tokenizer or tok.tokenizer
    if tok.tokenizer:
        require_tokenizer_file(tok.tokenizer)  # named as --tokenizer; build_method then loads it once
    model = build_method(mcfg)
    own = model.state_dict()
    for k, v in ckpt["model"].items():  # e.g. a head sized for another vocabulary: say which, not just "mismatch"
        if k in own and torch.is_tensor(v) and own[k].shape != v.shape:
            raise CheckpointError(f"{path} does not fit method {mcfg.method} with tokenizer {tok.tokenizer} "
                                  f"(vocabulary {model.target.out_dim}): {k} is {list(v.shape)} in the "
                                  f"checkpoint, {list(own[k].shape)} here; pass the tokenizer it was trained with")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit method {mcfg.method} with tokenizer {tok.tokenizer} "
                              f"({str(e).splitlines()[0][:200]})") from None
    return model.eval(), mcfg


@torch.no_grad()
def count_hits(model: Method, loader, device: torch.device, num_classes: int) -> dict[str, np.ndarray]:
    """Per class: masked patches whose arg-max (and top-5) predicted id is the target's, and all masked patches;
    and the count of every target id. Patches a LaVIT tokenizer dropped (id -1) are left out."""
    vocab = model.target.out_dim
    counts = {k: np.zeros(num_classes, np.int64) for k in ("correct", "correct5", "total")}
    counts["targets"] = np.zeros(vocab, np.int64)
    for imgs, mask, labels, _ in progress.bar(loader, "predictions"):
        imgs, mask = imgs.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        with autocast(device):
            target = model.target(imgs)[mask]
            logits = model.masked_logits(imgs, mask).float()
        valid = target >= 0
        target, logits = target[valid], logits[valid]
        hit = (logits.argmax(-1) == target).cpu().numpy()
        hit5 = (logits.topk(min(5, vocab), -1).indices == target[:, None]).any(-1).cpu().numpy()
        patch_class = torch.as_tensor(labels).to(device)[:, None].expand_as(mask)[mask][valid].cpu().numpy()
        counts["correct"] += np.bincount(patch_class, weights=hit, minlength=num_classes).astype(np.int64)
        counts["correct5"] += np.bincount(patch_class, weights=hit5, minlength=num_classes).astype(np.int64)
        counts["total"] += np.bincount(patch_class, minlength=num_classes)
        counts["targets"] += np.bincount(target.cpu().numpy(), minlength=vocab)
    return counts


def predictions_figure(metrics: dict, out: Path) -> list[str]:
    """TensorBoard scalars and the per-class accuracy figure of `analyze predictions`; returns the figure paths."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(out / "tb"))
    try:
        for key in ("accuracy", "top5_accuracy", "mean_class_accuracy", "majority_baseline"):
            writer.add_scalar(f"predictions/{key}", metrics[key], 0)
        path = out / "figures" / "accuracy_per_class.png"
        plots.save_figure(plots.accuracy_figure(metrics["per_class_accuracy"], metrics["accuracy"],
                                                metrics["majority_baseline"]), path, writer,
                          "predictions/accuracy_per_class")
    finally:
        writer.close()
    return [str(path)]


def analyze_predictions(cfg: AnalyzeConfig, ckpt: dict | None = None) -> dict:
    """Accuracy of a pretrained model's predicted ids on masked patches (its own mask generator, seeded per
    image), overall, top-5 and per class; the baseline predicts the most frequent target id. The target is
    cfg.tokenizers (one file) or the checkpoint's target.tokens.tokenizer. `ckpt`: cfg.checkpoint's content, if
    loaded."""
    validate(cfg)
    if not cfg.checkpoint:
        raise ConfigError("a checkpoint is required: --checkpoint runs/<run>/checkpoints/last.pt")
    ckpt = ckpt or checkpoint.load(cfg.checkpoint, "pretrain")
    tokenizers = list(parse_tokenizers(cfg.tokenizers).values()) if cfg.tokenizers else [""]
    if len(tokenizers) > 1:
        raise ConfigError(f"analyze predictions takes one tokenizer (the model's target), got {len(tokenizers)}")
    model, mcfg = load_method(ckpt, cfg.checkpoint, cfg, tokenizers[0])
    device = dist.init(cfg.device)
    model.to(device)
    base = build_dataset(cfg.data, cfg.split, split_limit(cfg))
    classes = list(base.classes)
    mask_gen = build_mask_generator(mcfg.mask, cfg.data.img_size // mcfg.model.patch_size, mcfg.model.patch_size)
    dataset = MaskedImages(base, eval_transform(cfg.data), mask_gen, cfg.seed)
    loader = make_loader(dataset, cfg.batch_size, cfg.data, sampler=EpochSampler(len(dataset), shuffle=False),
                         pin_memory=device.type == "cuda")
    ckpt_path = Path(cfg.checkpoint)
    run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    out = prepare_output_dir(cfg, run / f"analyze_predictions_{cfg.data.name}", "an analysis", RESULT_FILES)
    log = RunLog(out)
    log(f"token predictions of {cfg.checkpoint} ({mcfg.method}, tokenizer {mcfg.target.tokens.tokenizer}) on "
        f"{cfg.data.name} {cfg.split} ({len(dataset)} images), mask {mcfg.mask.kind} {mcfg.mask.ratio}, device {device}")
    t0 = time.perf_counter()
    c = count_hits(model, loader, device, len(classes))
    n = int(c["total"].sum())
    if n == 0:
        raise ConfigError("no masked patches were analyzed; check data.test_limit / data.limit and the checkpoint's mask settings")
    per_class = {name: float(c["correct"][i] / c["total"][i]) for i, name in enumerate(classes) if c["total"][i]}
    metrics = {"checkpoint": cfg.checkpoint, "method": mcfg.method, "tokenizer": mcfg.target.tokens.tokenizer,
               "vocab_size": model.target.out_dim, "dataset": cfg.data.name, "split": cfg.split,
               "images": len(dataset), "masked_patches": n, "accuracy": float(c["correct"].sum() / n),
               "top5_accuracy": float(c["correct5"].sum() / n),
               "mean_class_accuracy": float(np.mean(list(per_class.values()))),
               "majority_baseline": float(c["targets"].max() / n), "per_class_accuracy": per_class,
               "seconds": time.perf_counter() - t0}
    metrics["figures"] = predictions_figure(metrics, out)
    log(f"masked-patch token accuracy {metrics['accuracy']:.2%} (top-5 {metrics['top5_accuracy']:.2%}, most frequent "
        f"id {metrics['majority_baseline']:.2%}) over {n} patches")
    write_metrics(out, metrics, log)
    return metrics


def build_analyze_config(files: list[str], overrides: list[str], tokenizers: list[str] = (), checkpoint_path: str = "",
                         out: str = "") -> tuple[AnalyzeConfig, dict | None]:
    """The analysis config from the command line (the checkpoint's data settings as defaults, for predictions)
    and the loaded checkpoint, if any."""
    ckpt = checkpoint.load(checkpoint_path, "pretrain") if checkpoint_path else None
    stored = ckpt.get("config") if ckpt else None
    cfg = analyze_config(files, overrides, stored if isinstance(stored, dict) else None)
    for key, value in (("tokenizers", ",".join(tokenizers)), ("checkpoint", checkpoint_path), ("output_dir", out)):
        if value:  # set directly: paths are not parsed as YAML
            set_key(cfg, key, value, "command line")
    return cfg, ckpt
