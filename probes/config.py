"""Probe run configuration: dataclass defaults < checkpoint's data settings < protocol preset < dataset preset
< YAML file(s) < dotted overrides, built with `mimkit.config.build_config` so mistakes read like pretraining's."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mimkit.config import DEVICES, PRECISIONS, ConfigError, build_config, check_range, choices
from mimkit.sections import DataConfig, validate_data

KNN_KS = (10, 20, 100, 200)  # always reported (DINO)


@dataclass
class FeatureConfig:
    pool: str = choices("cls", "mean", default="cls")  # CLS after the final norm, or the mean of the normed patches
    layer: int = 0  # 0 = final tokens after the norm; k >= 1 = raw output of block k (middle-layer probes)
    cache: bool = True  # cache frozen-encoder features on disk (keyed by checkpoint, data, split, representation)
    cache_dir: str = ""  # default: <output_dir>/../feature_cache


@dataclass
class ProbeOptimConfig:
    blr: float = 0.1  # base lr; lr = blr * batch_size * accum_iter / lr_batch_ref
    lr_batch_ref: int = 256
    weight_decay: float = 0.0
    momentum: float = 0.9  # LARS (linear probe)
    trust_coeff: float = 0.001  # LARS trust coefficient (MAE / MoCo v3)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (fine-tune)
    warmup_epochs: float = 10.0
    min_lr: float = 0.0
    clip_grad: float = 0.0  # 0 = no clipping


@dataclass
class LinearConfig:
    # augmented: MAE protocol, the frozen encoder sees RandomResizedCrop + flip crops at every step;
    # cached: fast variant on cached features without augmentation (what CPU users run)
    mode: str = choices("augmented", "cached", default="augmented")
    random_init: bool = False  # also train the head on a random-init encoder of the same shape (a baseline)
    pixels: bool = False  # also train the head on the raw normalized pixels (a baseline)


@dataclass
class KnnConfig:
    k: int = 20  # headline k; 10, 20, 100 and 200 are always reported
    temperature: float = 0.07
    backend: str = choices("auto", "faiss", "torch", default="auto")  # auto: FAISS when importable
    random_init: bool = False  # also report a random-init encoder of the same shape (the baseline)
    pixels: bool = False  # also report the raw normalized pixels (a baseline)


@dataclass
class FinetuneConfig:
    layer_decay: float = 0.75  # lr scale decay^(L+1-layer_id); MAE: 0.65 for ViT-B, 0.75 for ViT-L
    drop_path: float = 0.1
    mixup: float = 0.8  # mixup alpha (0 = off)
    cutmix: float = 1.0  # cutmix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1  # label smoothing
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; "" = none
    reprob: float = 0.25  # random erasing probability
    eval_every: int = 1  # epochs between validations (best.pt is chosen among them)


@dataclass
class ProbeRunConfig:
    protocol: str = choices("linear", "knn", "finetune", default="linear")  # set by the sub-command
    checkpoint: str = ""  # a mimkit pretraining checkpoint (any method), an official one, or timm:/openclip:<model>
    weights: str = ""  # timm:/openclip: only: the model's local weights file (nothing is downloaded)
    encoder: str = choices("student", "ema", default="student")  # ema: the EMA teacher (data2vec2, ijepa runs)
    output_dir: str = ""  # default: <pretraining run>/probe_<protocol>_<data.name>
    seed: int = 0
    device: str = choices(*DEVICES, default="auto")
    precision: str = choices(*PRECISIONS, default="auto")
    epochs: int = 90
    batch_size: int = 256
    accum_iter: int = 1
    overwrite: bool = False  # replace the results of an earlier probe in output_dir
    # auto: an interrupted linear (augmented) or finetune probe continues from <output_dir>/checkpoints/resume.pt;
    # none: it starts afresh
    resume: str = choices("auto", "none", default="auto")
    data: DataConfig = field(default_factory=DataConfig)  # defaults: the checkpoint's data settings
    features: FeatureConfig = field(default_factory=FeatureConfig)
    optim: ProbeOptimConfig = field(default_factory=ProbeOptimConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# The papers' protocols (ViT-B/16, ImageNet): MAE linear probe and fine-tune, DINO k-NN.
PROTOCOL_PRESETS: dict[str, dict] = {
    "linear": {"epochs": 90, "batch_size": 256, "optim.blr": 0.1, "optim.weight_decay": 0.0,
               "optim.warmup_epochs": 10, "optim.min_lr": 0.0, "data.crop_scale": [0.08, 1.0]},
    "knn": {"batch_size": 256},
    "finetune": {"epochs": 100, "batch_size": 128, "optim.blr": 5e-4, "optim.weight_decay": 0.05,
                 "optim.warmup_epochs": 5, "optim.min_lr": 1e-6, "optim.betas": [0.9, 0.999],
                 "data.crop_scale": [0.08, 1.0]},
}

# CPU-sized defaults per dataset, over the protocol preset (files and overrides still win).
DATASET_PRESETS: dict[str, dict[str, dict]] = {
    "linear": {
        # blr 40: LARS steps are 0.001 * |w| / |g| * lr, and 1437 images give few steps (the best of 0.1-400)
        "digits": {"linear.mode": "cached", "epochs": 90, "batch_size": 256, "optim.blr": 40.0,
                   "optim.warmup_epochs": 5, "data.crop_scale": [0.6, 1.0]},
        "synthetic": {"linear.mode": "cached", "epochs": 30, "batch_size": 64, "optim.blr": 40.0,
                      "optim.warmup_epochs": 3},
        "cifar10": {"linear.mode": "cached", "optim.blr": 10.0},
    },
    "knn": {"digits": {"knn.random_init": True}, "synthetic": {"knn.random_init": True}},
    "finetune": {
        # 8x8 digits, 30 epochs: RandAugment's geometric ops and erasing destroy most of a digit, and mixup/cutmix
        # slow convergence (the default job's checkpoint fine-tunes better without them)
        "digits": {"epochs": 30, "batch_size": 64, "optim.blr": 5e-3, "optim.warmup_epochs": 3,
                   "data.crop_scale": [0.6, 1.0], "finetune.auto_augment": "", "finetune.reprob": 0.0,
                   "finetune.mixup": 0.0, "finetune.cutmix": 0.0},
        "synthetic": {"epochs": 3, "batch_size": 32, "optim.blr": 1e-3, "optim.warmup_epochs": 1,
                      "finetune.auto_augment": "", "finetune.reprob": 0.0},
        "cifar10": {"batch_size": 128, "optim.blr": 1e-3},
    },
}

# Pretraining data settings a probe inherits from the checkpoint; data.limit (a pretraining subset) is not one.
INHERITED_DATA = ("name", "root", "img_size", "crop_scale", "hflip", "num_workers", "skip_corrupt", "synthetic_size",
                  "urls", "test_urls")


def probe_config(protocol: str, files: list[str] = (), overrides: list[str] = (),
                 stored: dict | None = None) -> ProbeRunConfig:
    """Build a probe config; `stored` is the checkpoint's pretraining config (its data section supplies the
    data defaults)."""
    data = (stored or {}).get("data", {})
    inherited = {f"data.{k}": data[k] for k in INHERITED_DATA if k in data}
    return build_config(ProbeRunConfig, files, [f"protocol={protocol}", *overrides],
                        presets=[("protocol", {protocol: {**inherited, **PROTOCOL_PRESETS[protocol]}}),
                                 ("data.name", DATASET_PRESETS[protocol])])


def validate(cfg: ProbeRunConfig, depth: int) -> None:
    check_range("batch_size", cfg.batch_size, 1)
    check_range("accum_iter", cfg.accum_iter, 1)
    check_range("features.layer", cfg.features.layer, 0, depth)
    if cfg.protocol != "knn":
        check_range("epochs", cfg.epochs, 1)
        check_range("optim.blr", cfg.optim.blr, 0, lo_open=True)
        check_range("optim.weight_decay", cfg.optim.weight_decay, 0)
        check_range("optim.warmup_epochs", cfg.optim.warmup_epochs, 0)
        check_range("optim.min_lr", cfg.optim.min_lr, 0)
        check_range("optim.clip_grad", cfg.optim.clip_grad, 0)
    pixels = cfg.knn.pixels if cfg.protocol == "knn" else cfg.linear.pixels if cfg.protocol == "linear" else False
    if pixels and cfg.features.layer:
        raise ConfigError(f"{cfg.protocol}.pixels probes the raw pixels, which have no blocks: features.layer must "
                          f"be 0, got {cfg.features.layer}")
    check_range("knn.k", cfg.knn.k, 1)
    check_range("knn.temperature", cfg.knn.temperature, 0, lo_open=True)
    ft = cfg.finetune
    check_range("finetune.layer_decay", ft.layer_decay, 0, 1, lo_open=True)
    check_range("finetune.drop_path", ft.drop_path, 0, 1, hi_open=True)
    check_range("finetune.smoothing", ft.smoothing, 0, 1, hi_open=True)
    check_range("finetune.reprob", ft.reprob, 0, 1)
    check_range("finetune.eval_every", ft.eval_every, 1)
    validate_data(cfg.data)


def default_output_dir(cfg: ProbeRunConfig) -> Path:
    """Next to the pretraining run: runs/mae_digits/checkpoints/last.pt -> runs/mae_digits/probe_knn_digits."""
    ckpt = Path(cfg.checkpoint)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run / f"probe_{cfg.protocol}_{cfg.data.name}"
