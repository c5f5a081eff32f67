"""The shared config sections every command builds on: the data (`data`, with the datasets' names, normalization
stats and per-dataset presets), the encoder (`model`, with the architectures) and the masks (`mask`). Plain
dataclasses and dicts that import no torch, so a command's config, and its mistakes, come before the modules that
run it (mimkit.data, mimkit.vit and mimkit.masking use them and re-export them)."""
from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError, check_range, choices

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
DIGITS_STATS = ((0.3052,) * 3, (0.3815,) * 3)  # mean/std of load_digits pixels / 16 (train split)

# name -> (normalization stats, held in memory). Folder datasets (cifar10, imagefolder) read data.root; cifar10 also
# reads torchvision's layout (the pickled batches in data.root/cifar-10-batches-py), held in memory once read.
DATASETS: dict[str, tuple[tuple, bool]] = {
    "digits": (DIGITS_STATS, True), "cifar10": (CIFAR10_STATS, False), "imagefolder": (IMAGENET_STATS, False),
    "synthetic": (((0.5,) * 3, (0.25,) * 3), True), "webdataset": (IMAGENET_STATS, False),
}
FOLDERS = ("cifar10", "imagefolder")


@dataclass
class DataConfig:
    name: str = choices(*DATASETS, default="digits")
    root: str = ""  # folder with train/ and val/ or test/ (cifar10, imagefolder)
    limit: int = 0  # use only N training images, evenly spread over the split (0 = all)
    test_limit: int = 0  # use only N test images (evaluations, held-out metrics), evenly spread (0 = all)
    img_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop scale for pretraining
    hflip: bool = True
    num_workers: int = -1  # -1: 0 for in-memory data, else min(8, cpus)
    skip_corrupt: bool = False  # replace unreadable images with another sample (counted) instead of failing
    read_retries: int = 3  # read an image that fails again up to N times (short backoff) before giving up on it
    download: bool = False  # cifar10: fetch torchvision's cifar-10-batches-py into data.root when it is not there
    synthetic_size: int = 512  # number of images of the synthetic dataset
    urls: str = ""  # webdataset: training shards, e.g. /data/shards/train-{000000..000127}.tar, or pipe:CMD
    test_urls: str = ""  # webdataset: test shards (probes, panels; panels fall back to the first training shard)
    shuffle_buffer: int = 1000  # webdataset: samples each loader worker shuffles through (0: shard order only)


def validate_data(data: DataConfig, sources: bool = True) -> None:
    """The checks of the `data` section every command shares (pretrain, tokenizer, probe, analyze). `sources`:
    also that a folder or shard dataset names where it is (False while a checkpoint may still supply it)."""
    check_range("data.limit", data.limit, 0)
    check_range("data.test_limit", data.test_limit, 0)
    check_range("data.img_size", data.img_size, 1)
    check_range("data.read_retries", data.read_retries, 0)
    lo, hi = data.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale={list(data.crop_scale)} must satisfy 0 < min <= max <= 1")
    if sources and data.name in FOLDERS and not data.root:
        raise ConfigError(f"data.root is required for data.name={data.name}, e.g. data.root=/data/{data.name}")
    check_range("data.shuffle_buffer", data.shuffle_buffer, 0)
    if sources and data.name == "webdataset" and not data.urls:
        raise ConfigError("data.urls is required for data.name=webdataset, e.g. "
                          "data.urls=/data/shards/train-{000000..000127}.tar")


# Scale-dependent defaults per dataset, applied over the method's recipe (so `method=simmim` on digits gets
# SimMIM's loss and mask with digits-sized images, model and mask units).
DATA_PRESETS: dict[str, dict] = {
    # Native 8x8 with patch 2: upscaled digits make patches near-constant and per-patch normalized targets
    # amplified noise (worse than a random encoder, benchmarks/README.md), hence raw-pixel targets here.
    "digits": {
        "data.img_size": 8, "data.crop_scale": [0.6, 1.0], "data.hflip": False, "model.arch": "vit_mini",
        "model.depth": 4, "model.patch_size": 2, "decoder.depth": 1, "decoder.embed_dim": 128,
        "decoder.num_heads": 4, "mask.patch_px": 4, "mask.min_block": 2, "target.pixels.norm_pix": False,
        # A 4x4 patch grid: masking 75% leaves 4 patches, too few to infer a digit (k-NN barely above a random
        # encoder at 0.75, far above at 0.5 with blr 1e-3).
        "mask.ratio": 0.5, "optim.blr": 1e-3,
        # 35 epochs: the default job (pretraining + k-NN probe) aims at 150 s on 2 cores of the slowest CPU we run
        # on (an AVX2-only EPYC) with 10+ points of k-NN over a random encoder; 30 epochs fall short of those 10
        # points, 40 and more learn more but take longer there (benchmarks/README.md).
        "epochs": 35, "batch_size": 128, "optim.warmup_epochs": 5, "ckpt.every": 20,
    },
    "cifar10": {
        "data.img_size": 32, "model.arch": "vit_tiny", "model.patch_size": 4, "decoder.depth": 4,
        "decoder.embed_dim": 128, "decoder.num_heads": 4, "mask.patch_px": 8, "mask.min_block": 4,
        "epochs": 200, "batch_size": 256, "optim.warmup_epochs": 10, "ckpt.every": 10,
    },
    "synthetic": {
        "data.img_size": 16, "model.arch": "vit_mini", "model.depth": 2, "model.embed_dim": 64,
        "model.num_heads": 4, "model.patch_size": 4, "decoder.depth": 1, "decoder.embed_dim": 64,
        "decoder.num_heads": 4, "mask.patch_px": 8, "mask.min_block": 2, "target.pixels.norm_pix": False,
        "epochs": 5, "batch_size": 32, "optim.warmup_epochs": 1, "optim.blr": 1e-3, "ckpt.every": 1,
        "probe.enabled": False,
    },
}


ARCHS: dict[str, dict[str, int]] = {
    "vit_mini": dict(embed_dim=128, depth=6, num_heads=4),  # CPU preset for the embedded digits
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


@dataclass
class ModelConfig:
    """The encoder (the `model` section)."""
    arch: str = choices(*ARCHS, default="vit_base")
    patch_size: int = 16
    # 0 = take the value from `arch`
    depth: int = 0
    embed_dim: int = 0
    num_heads: int = 0
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    layer_scale: float = 0.0  # LayerScale init value (BEiT: 0.1); 0 = off
    # start from this pretraining checkpoint's model weights (mimkit, or an official MAE file converted on load)
    # with a fresh optimizer and schedule; a resumed run's weights are its own checkpoint's
    init_from: str = ""

    def resolved(self) -> dict[str, int]:
        """embed_dim/depth/num_heads after applying the arch preset to the zero fields."""
        base = ARCHS[self.arch]
        return {k: (getattr(self, k) or base[k]) for k in base}


MASK_KINDS = ("random", "grid", "block", "inverse_block", "multiblock")


@dataclass
class MaskConfig:
    kind: str = choices(*MASK_KINDS, default="")  # named by each method's recipe
    ratio: float = 0.75
    patch_px: int = 32  # SimMIM: side of a mask unit in pixels (grid masks)
    min_block: int = 16  # BEiT: smallest block in patches at 14x14; scaled with the grid
    min_aspect: float = 0.3  # BEiT: block aspect ratio in [min_aspect, 1/min_aspect]
    exact: bool = True  # block masks: fill or trim to exactly ratio * N patches
    # inverse_block (data2vec 2.0 image config): mask.ratio is the masked share (0.8)
    block_len: int = 3  # side of a square of visible patches at 14x14; scale it with the grid
    prob_adjust: float = 0.07  # mask_prob_adjust: extra visible squares before trimming to the exact count
    clones: int = 1  # masks per image (clone_batch: 16); the teacher runs once for all of them
    # multiblock (I-JEPA, configs/in1k_vith14_ep300.yaml)
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)  # share of the grid per target block
    target_aspect: tuple[float, float] = (0.75, 1.5)  # target block height / width
    context_scale: tuple[float, float] = (0.85, 1.0)  # the context block (square) before the targets are cut out
    min_keep: int = 10  # a block (and the context after the cut) keeps more than this many patches
    # a tokenizer that drops patches (lavit): move masked dropped patches onto unmasked kept ones (prefer_kept)
    prefer_kept: bool = False
