"""The config of `mimkit tokenizer train` as plain dataclasses and dicts, without torch: the run keys and shared
sections, each kind's section (`Config`) and recipe, and the dataset presets. Registering a kind
(`mimkit.tokenizers.register_tokenizer`) records its section and recipe in the tables below, which list the
library's kinds in registration order before any is imported (a kind added out of tree joins them when it
registers); the kinds' modules take their `Config` and `recipe` from here. `mimkit tokenizer train` builds and
checks its config from them before torch loads; mimkit.tokenizers.config adds what only the kinds know (a
vocabulary their settings imply, their own checks)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import (DEVICES, PRECISIONS, CkptConfig, ConfigError, OptimConfig, build_config, check_range, choices,
                     get_key, make_config)
from .parts import TeacherConfig
from .sections import DATA_PRESETS, DataConfig, validate_data

DEFAULT_KIND = "kmeans"  # a run that names no kind
OBJECTIVES = ("teacher", "pixels")  # the quantizer kinds' layouts (mimkit.tokenizers.quantized)
# FSQ's level sets by bits of vocabulary (the FSQ paper's Table 1; mimkit.tokenizers.fsq)
FSQ_LEVELS = {8: [8, 6, 5], 10: [8, 5, 5, 5], 12: [7, 5, 5, 5, 5], 14: [8, 8, 8, 6, 5], 16: [8, 8, 8, 5, 5, 5]}


@dataclass
class TokenizerRunConfig:
    """The keys every kind shares; `config_class` adds `kind` and the kinds' sections."""
    output_dir: str = ""  # default: runs/tokenizer_<kind>_<data.name>
    seed: int = 0
    device: str = choices(*DEVICES, default="auto")
    precision: str = choices(*PRECISIONS, default="auto")
    patch_size: int = 16  # the encoder's patch size: one token per patch, grid = data.img_size // patch_size
    vocab_size: int = 0  # 0 = the kind's: its recipe's, or what its settings imply (fsq: the product of the levels)
    epochs: int = 100  # kinds trained by gradient steps
    batch_size: int = 64
    accum_iter: int = 1
    resume: str = choices("auto", "none", default="auto")  # auto: continue from <output_dir>/checkpoints/last.pt
    overwrite: bool = False
    vis_every: int = 10  # epochs between held-out evaluations and TensorBoard image panels
    data: DataConfig = field(default_factory=DataConfig)  # data.test_limit: held-out images (0 = the test split)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


# ---------------------------------------------------------------------------------------------
# The kinds' sections (mimkit.tokenizers.<kind>)


@dataclass
class KMeansConfig:
    features: str = choices("pixels", "teacher", default="pixels")  # teacher: L2-normalized, spherical k-means
    norm_pix: bool = False  # pixels: standardize each patch by its own mean/var before clustering
    max_samples: int = 1_000_000  # patches sampled from the training set (spread evenly over images)
    niter: int = 20
    threads: int = 0  # FAISS / BLAS threads for the fit (0 = all cores; 1 can be faster on a busy shared machine)
    # FAISS fits on at most this many samples per center: its default, 256, stops short of the converged
    # objective on image patches (benchmarks/kmeans.py)
    max_points_per_centroid: int = 1024


@dataclass
class ConvLayoutConfig:
    """DALL-E's conv autoencoder layout, shared by the kinds that reconstruct pixels from their codes."""
    input_size: int = 112  # input side (BEiT: the half-resolution 112 px copy of a 224 view); 0 = data.img_size
    groups: int = 4  # resolution groups (DALL-E: 4); the input is downsampled by 2^(groups - 1)
    hidden: int = 256  # width of the first group (DALL-E n_hid)
    blocks_per_group: int = 2


@dataclass
class DVAEConfig(ConvLayoutConfig):
    tau_start: float = 1.0  # Gumbel-softmax temperature, cosine-annealed to tau_end (DALL-E: 1 -> 1/16)
    tau_end: float = 0.0625
    tau_anneal: float = 0.8  # share of the training steps over which the temperature is annealed
    kl_weight: float = 0.1  # weight of KL(q || uniform) per token (MSE per pixel), warmed up linearly from 0
    kl_warmup: float = 0.1  # share of the training steps of the KL warmup
    dalle_encoder: str = ""  # optional: DALL-E's released encoder (state dict file) loaded into the encoder


@dataclass
class ViTLayoutConfig:
    """VQ-KD's layout, shared by the kinds that regress a teacher's features through their codes."""
    embed_dim: int = 768  # ViT encoder of the tokenizer (BEiT v2: ViT-B/16)
    depth: int = 12
    num_heads: int = 12
    decoder_depth: int = 1  # shallow ViT decoder regressing the teacher features (BEiT v2: 1 or 3)
    decoder_embed_dim: int = 768
    decoder_num_heads: int = 12


@dataclass
class VQKDConfig(ViTLayoutConfig):
    code_dim: int = 32  # L2-normalized code space
    decay: float = 0.99  # EMA decay of the codebook
    beta: float = 1.0  # commitment loss weight (BEiT v2: 1.0)
    restart: float = 0.1  # restart codes whose EMA usage falls below restart x the mean usage (0 = never)


@dataclass
class QuantizedConfig(ConvLayoutConfig, ViTLayoutConfig):
    """The layout keys of both objectives (only the chosen objective's are used)."""
    objective: str = choices(*OBJECTIVES, default="teacher")  # teacher: VQ-KD's layout; pixels: the dVAE's


@dataclass
class FSQConfig(QuantizedConfig):
    levels: list[int] = field(default_factory=lambda: list(FSQ_LEVELS[10]))  # vocab_size = their product


@dataclass
class LFQConfig(QuantizedConfig):
    dim: int = 13  # bits: vocab_size = 2^dim (13: VQ-KD's 8192 codes; MAGVIT-v2 uses 18)
    tau: float = 0.01  # temperature of the code distribution in the entropy penalty
    entropy_weight: float = 0.1
    sample_weight: float = 1.0  # weight of the per-sample entropy (minimized)
    batch_weight: float = 1.0  # weight of the batch (codebook) entropy (maximized)
    commitment: float = 0.25
    entropy_groups: int = 0  # bit groups the entropy is factorized over; 0 = as few as keep each <= 9 bits


@dataclass
class PeCoConfig(ConvLayoutConfig):
    code_dim: int = 32  # L2-normalized code space (VQ-KD's)
    decay: float = 0.99  # EMA decay of the codebook
    beta: float = 0.25  # commitment weight (VQ-VAE's)
    restart: float = 0.1  # restart codes whose EMA usage falls below restart x the mean usage (0 = never)
    layers: list[int] = field(default_factory=list)  # teacher blocks (1-based); [] = four spread over its depth
    perceptual_weight: float = 1.0


@dataclass
class LaVITConfig:
    keep_ratio: float = 0.36  # target share of kept patches (LaVIT keeps ~36% of a 16x16 grid on average)
    ratio_weight: float = 2.0  # weight of the keep-ratio loss (DynamicViT's)
    ratio_scope: str = choices("batch", "image", default="batch")  # batch: the batch's kept share (variable length)
    tau: float = 1.0  # Gumbel-softmax temperature (LaVIT's F.gumbel_softmax default)
    embed_dim: int = 768  # merger width (LaVIT: the teacher's, 1408 for EVA-CLIP ViT-g)
    depth: int = 12  # merger blocks (LaVIT: 12)
    num_heads: int = 12  # LaVIT: 16
    mlp_ratio: float = 4.0  # LaVIT: 4.3637 (EVA's)
    code_dim: int = 32  # L2-normalized code space (LaVIT: 32)
    decoder_depth: int = 1
    decoder_embed_dim: int = 768
    decoder_num_heads: int = 12
    decay: float = 0.99  # EMA decay of the codebook
    beta: float = 1.0  # commitment loss weight
    restart: float = 0.1  # restart codes whose EMA usage falls below restart x the mean usage (0 = never)


# DALL-E: AdamW, lr 1e-3 -> cosine; no weight decay on the code path matters little at this scale
_DVAE = {"vocab_size": 8192, "epochs": 100, "batch_size": 64, "optim.blr": 1e-3, "optim.lr_batch_ref": 256,
         "optim.betas": [0.9, 0.999], "optim.weight_decay": 1e-4, "optim.warmup_epochs": 1,
         "data.crop_scale": [0.08, 1.0]}
# BEiT v2 VQ-KD: lr 5e-5 per 128 images, betas (0.9, 0.99), wd 1e-4, min lr 1e-5, crop scale 0.08-1
_VQKD = {"vocab_size": 8192, "epochs": 100, "batch_size": 64, "optim.blr": 5e-5, "optim.lr_batch_ref": 128,
         "optim.betas": [0.9, 0.99], "optim.weight_decay": 1e-4, "optim.warmup_epochs": 5,
         "optim.min_lr": 1e-5, "data.crop_scale": [0.08, 1.0]}
# The recipe of the quantizer kinds whose vocabulary their settings fix (fsq, lfq): VQ-KD's optimizer and
# schedule, so that they and VQ-KD under one teacher differ in the quantizer only
VQKD_TRAINING = {k: v for k, v in _VQKD.items() if k != "vocab_size"}

TOKENIZER_RECIPES: dict[str, dict] = {
    "kmeans": {"vocab_size": 512},
    "dvae": _DVAE,
    "vqkd": _VQKD,
    "fsq": VQKD_TRAINING,
    "lfq": VQKD_TRAINING,
    # the dVAE's optimizer and schedule (PeCo trains its VQGAN with Adam at a similar 4.5e-6 x batch), over
    # PeCo's vocabulary of 8192 codes
    "peco": dict(_DVAE),
    # VQ-KD's optimizer and schedule (LaVIT's tokenizer training recipe is not released), LaVIT's 16384 codes
    "lavit": {**VQKD_TRAINING, "vocab_size": 16384},
}
TOKENIZER_SECTIONS: dict[str, type | None] = {
    "kmeans": KMeansConfig, "dvae": DVAEConfig, "vqkd": VQKDConfig, "fsq": FSQConfig, "lfq": LFQConfig,
    "peco": PeCoConfig, "lavit": LaVITConfig}


def config_class() -> type:
    """TokenizerRunConfig with `kind` and the section of every registered kind that has settings, as they are
    now."""
    sections = {kind: cls for kind, cls in TOKENIZER_SECTIONS.items() if cls is not None}
    return make_config("TokenizerConfig", TokenizerRunConfig, sections, kinds=tuple(TOKENIZER_SECTIONS),
                       default_kind=DEFAULT_KIND)


def data_presets() -> dict[str, dict]:
    """The pretraining dataset presets reduced to what a tokenizer needs: data keys and the patch size."""
    out = {}
    for name, preset in DATA_PRESETS.items():
        keys = {k: v for k, v in preset.items() if k.startswith("data.")}
        if "model.patch_size" in preset:
            keys["patch_size"] = preset["model.patch_size"]
        out[name] = keys
    return out


def build(files: list[str] = (), overrides: list[str] = ()):
    """The config of `mimkit tokenizer train --config FILE... key=value...` before the kinds' own additions:
    keys, types, choices and the kind checked (ConfigError)."""
    return build_config(config_class(), files, overrides,
                        presets=[("kind", TOKENIZER_RECIPES), ("data.name", data_presets())])


def validate_shared(cfg) -> None:
    """The checks of the keys every kind shares (vocab_size 0: the kind's settings fix it, checked by the kind)."""
    for key, lo in (("patch_size", 1), ("epochs", 0), ("batch_size", 1), ("accum_iter", 1), ("vis_every", 1),
                    ("ckpt.every", 1)):
        check_range(key, get_key(cfg, key), lo)
    if cfg.vocab_size:
        check_range("vocab_size", cfg.vocab_size, 2)
    validate_data(cfg.data)
    check_range("optim.blr", cfg.optim.blr, 0, lo_open=True)
    if cfg.data.img_size % cfg.patch_size:
        raise ConfigError(f"data.img_size={cfg.data.img_size} is not divisible by patch_size={cfg.patch_size}")
