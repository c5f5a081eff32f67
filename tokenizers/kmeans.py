"""ClusterMIM's tokenizer: k-means centers of patch features, ids by the nearest center.

Features are a patch's pixels (optionally standardized per patch, like MAE's norm_pix) with Euclidean
k-means, or a frozen teacher's patch features, L2-normalized, with spherical k-means (inner product).
Centers are fitted with FAISS (a GPU index when FAISS sees a GPU) on patches sampled from the training set;
`encode` assigns with the same metric as the fit, in float32, on the images' device.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mimkit import progress
from mimkit.config import ConfigError, check_range
from mimkit.data import Transformed, eval_transform, make_loader
from mimkit.dist import autocast
from mimkit.images import pixel_target, resize
from mimkit.teachers import Teacher
from mimkit.tokenizer_config import KMeansConfig, TOKENIZER_RECIPES

from .base import FitTraining, TrainableTokenizer, register_tokenizer, run_args


@register_tokenizer("kmeans")
class KMeansTokenizer(TrainableTokenizer):
    paper = "ClusterMIM"
    Config = KMeansConfig
    recipe = TOKENIZER_RECIPES["kmeans"]

    def __init__(self, img_size: int, grid: int, vocab_size: int, mean: list[float], std: list[float], dim: int,
                 norm_pix: bool = False, teacher: dict | None = None):
        super().__init__(img_size, grid, vocab_size, mean, std)
        self.dim, self.norm_pix = dim, norm_pix
        self.teacher = Teacher(teacher) if teacher else None
        self.register_buffer("centroids", torch.zeros(vocab_size, dim))

    @property
    def spherical(self) -> bool:
        return self.teacher is not None

    def hparams(self) -> dict:
        return {"dim": self.dim, "norm_pix": self.norm_pix, "teacher": self.teacher.spec if self.teacher else None}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features [B, N, dim] of images at img_size: pixels, or L2-normalized teacher features."""
        if self.teacher is None:
            return pixel_target(images.float(), self.img_size // self.grid, self.norm_pix)
        return F.normalize(self.teacher(images, (self.mean, self.std), self.grid), dim=-1)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.features(images)
        return assign(feats.flatten(0, 1), self.centroids, self.spherical).view(feats.shape[:2])

    @classmethod
    def check_config(cls, cfg) -> None:
        check_range("kmeans.max_samples", cfg.kmeans.max_samples, cfg.vocab_size)
        check_range("kmeans.niter", cfg.kmeans.niter, 1)
        if cfg.kmeans.features == "teacher" and not cfg.teacher.name:
            raise ConfigError("kmeans.features=teacher needs teacher.name (timm:<model>, openclip:<model> or "
                              "mimkit:<checkpoint>)")

    @classmethod
    def needs_teacher(cls, cfg) -> bool:
        return cfg.kmeans.features == "teacher"

    @classmethod
    def build(cls, cfg, teacher: Teacher | None, device: torch.device) -> "KMeansTokenizer":
        """Zero centers for pixel or teacher features; a teacher's weights become part of the tokenizer."""
        dim = teacher.feature_dim() if teacher is not None else cfg.patch_size * cfg.patch_size * 3
        tok = cls(**run_args(cfg), dim=dim, norm_pix=cfg.kmeans.norm_pix)
        tok.teacher = teacher
        return tok.to(device).eval()

    def trainer(self, cfg, teacher: Teacher | None) -> "KMeansTraining":
        return KMeansTraining(self, cfg)


def assign(x: torch.Tensor, centroids: torch.Tensor, spherical: bool, chunk: int = 8192) -> torch.Tensor:
    """Nearest center of each row of x [M, D]: largest inner product (spherical) or smallest squared L2
    distance (||c||^2 - 2 x.c; ||x||^2 is the same for every center). float32, autocast off, row chunks."""
    with torch.autocast(x.device.type, enabled=False):
        c = centroids.float()
        c_sq = None if spherical else (c * c).sum(1)
        out = []
        for rows in x.float().split(chunk):
            scores = rows @ c.T
            out.append(scores.argmax(1) if spherical else (c_sq - 2 * scores).argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def inertia(x: torch.Tensor, centroids: torch.Tensor, spherical: bool = False) -> float:
    """k-means objective with the given metric: sum of squared distances to the nearest center (Euclidean)
    or sum of 1 - cosine (spherical)."""
    ids = assign(x, centroids, spherical)
    c = centroids.float()[ids]
    if spherical:
        return float((1 - (x.float() * c).sum(1)).sum())
    return float(((x.float() - c) ** 2).sum())


def faiss_gpus() -> int:
    """GPUs FAISS can use (0 with a CPU-only build)."""
    import faiss
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def fit_kmeans(x: np.ndarray, k: int, niter: int = 20, spherical: bool = False, seed: int = 0,
               init: np.ndarray | None = None, max_points_per_centroid: int = 1024, gpu: bool | None = None,
               threads: int = 0, verbose: bool = False) -> np.ndarray:
    """FAISS k-means on rows of x [n, d] (float32) -> centers [k, d].

    FAISS fits on a random subsample of max_points_per_centroid * k rows: far faster than Lloyd on all points,
    and with enough rows per center (FAISS's default of 256 is too few on image patches, benchmarks/kmeans.py)
    close to its converged objective.
    `init` fixes the initial centers (tests, benchmarks); `gpu=None` uses a GPU index when FAISS sees one;
    `threads` > 0 caps FAISS's OpenMP and BLAS threads (0 keeps their defaults, all cores): on a loaded machine
    threads that spin waiting for each other can make more threads slower than one (benchmarks/kmeans.py)."""
    import faiss
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) < k:
        raise ValueError(f"k-means needs at least k={k} samples, got {len(x)}")
    use_gpu = faiss_gpus() > 0 if gpu is None else gpu
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=spherical, seed=seed, verbose=verbose,
                      max_points_per_centroid=max_points_per_centroid, gpu=bool(use_gpu))
    if init is not None:
        init = np.ascontiguousarray(init, dtype=np.float32)
    with faiss_threads(threads):
        km.train(x, init_centroids=init)
    return km.centroids


@contextlib.contextmanager
def faiss_threads(threads: int) -> Iterator[None]:
    """Cap FAISS's OpenMP threads and the BLAS under its distance step (an sgemm) at `threads` inside the block;
    0 leaves both at their defaults."""
    if threads <= 0:
        yield
        return
    import faiss
    from threadpoolctl import threadpool_limits
    default_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        faiss.omp_set_num_threads(default_threads)


@torch.no_grad()
def sample_features(tok: KMeansTokenizer, loader, max_samples: int, num_images: int, device: torch.device,
                    seed: int = 0) -> torch.Tensor:
    """Patch features [n, dim] sampled uniformly across the loader's images: ceil(max_samples / num_images)
    random patches per image (all when fewer), until max_samples. Progress as `mimkit.progress.bar` shows it."""
    per_image = min(tok.num_tokens, max(1, math.ceil(max_samples / max(num_images, 1))))
    g = torch.Generator().manual_seed(seed)
    out, total = [], 0
    bar = progress.bar(loader, f"sampling patch features ({per_image}/image)")
    for batch in bar:
        imgs = batch[0].to(device, non_blocking=True)
        with autocast(device):
            feats = tok.features(resize(imgs, tok.img_size)).float().cpu()
        idx = torch.rand(len(feats), tok.num_tokens, generator=g).argsort(1)[:, :per_image]
        picked = torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1])).flatten(0, 1)
        out.append(picked[: max_samples - total])
        total += len(out[-1])
        bar.set_postfix(samples=total)
        if total >= max_samples:
            break
    return torch.cat(out)


def fit_tokenizer(tok: KMeansTokenizer, feats: torch.Tensor, niter: int, seed: int,
                  max_points_per_centroid: int, threads: int = 0, log: Callable[[str], None] = print) -> dict:
    """Fit the centers on sampled features; returns the fit's statistics."""
    x = feats.float()
    if tok.spherical:
        x = F.normalize(x, dim=-1)
    centers = fit_kmeans(x.numpy(), tok.vocab_size, niter=niter, spherical=tok.spherical, seed=seed,
                         max_points_per_centroid=max_points_per_centroid, threads=threads)
    tok.centroids.copy_(torch.from_numpy(centers))
    obj = inertia(x, torch.from_numpy(centers), tok.spherical)
    log(f"k-means: {len(x)} samples x {x.shape[1]} dims, K={tok.vocab_size}, "
        f"{'spherical' if tok.spherical else 'euclidean'}, mean objective {obj / len(x):.4f}")
    return {"samples": len(x), "dim": int(x.shape[1]), "mean_inertia": obj / len(x)}


class KMeansTraining(FitTraining):
    """ClusterMIM's fit: features of patches sampled across the training set, then FAISS k-means."""

    def __init__(self, tok: KMeansTokenizer, cfg):
        super().__init__(tok)
        self.cfg = cfg

    def fit(self, train_set, device: torch.device, log: Callable[[str], None]) -> dict:
        cfg, k = self.cfg, self.cfg.kmeans
        # ClusterMIM samples patches of resized, center-cropped training images (no augmentation)
        loader = make_loader(Transformed(train_set, eval_transform(cfg.data)), cfg.batch_size, cfg.data, shuffle=True)
        feats = sample_features(self.tok, loader, k.max_samples, len(train_set), device, cfg.seed)
        return fit_tokenizer(self.tok, feats, k.niter, cfg.seed, k.max_points_per_centroid, k.threads, log)
