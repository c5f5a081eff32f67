"""Configuration of `mimkit tokenizer train`: the same layering as pretraining (dataclass defaults < the
kind's recipe < the dataset's scale preset < YAML files < dotted overrides) and the same ConfigErrors."""
from __future__ import annotations

from dataclasses import dataclass, field

from mimkit.config import (DEVICES, PRECISIONS, ConfigError, DataConfig, OptimConfig, build_config, check_range,
                           choices, validate_data)
from mimkit.data import DATA_PRESETS

KINDS = ("kmeans", "dvae", "vqkd")


@dataclass
class KMeansConfig:
    features: str = choices("pixels", "teacher", default="pixels")  # teacher: L2-normalized, spherical k-means
    norm_pix: bool = False  # pixels: standardize each patch by its own mean/var before clustering
    max_samples: int = 1_000_000  # patches sampled from the training set (spread evenly over images)
    niter: int = 20
    threads: int = 0  # FAISS / BLAS threads for the fit (0 = all cores; 1 can be faster on a busy shared machine)
    max_points_per_centroid: int = 1024  # FAISS fits on at most this many samples per center (its default 256
    # stalls at +1.7% over the converged inertia on CIFAR patches; 1024 reaches 1%, see benchmarks/kmeans.py)


@dataclass
class DVAEConfig:
    input_size: int = 112  # dVAE input side (BEiT: the half-resolution 112 px copy of a 224 view); 0 = data.img_size
    groups: int = 4  # resolution groups (DALL-E: 4); the input is downsampled by 2^(groups - 1)
    hidden: int = 256  # width of the first group (DALL-E n_hid)
    blocks_per_group: int = 2
    tau_start: float = 1.0  # Gumbel-softmax temperature, cosine-annealed to tau_end (DALL-E: 1 -> 1/16)
    tau_end: float = 0.0625
    tau_anneal: float = 0.8  # share of the training steps over which the temperature is annealed
    kl_weight: float = 0.1  # weight of KL(q || uniform) per token (MSE per pixel), warmed up linearly from 0
    kl_warmup: float = 0.1  # share of the training steps of the KL warmup
    dalle_encoder: str = ""  # optional: DALL-E's released encoder (state dict file) loaded into the encoder


@dataclass
class VQKDConfig:
    embed_dim: int = 768  # ViT encoder of the tokenizer (BEiT v2: ViT-B/16)
    depth: int = 12
    num_heads: int = 12
    code_dim: int = 32  # L2-normalized code space
    decoder_depth: int = 1  # shallow ViT decoder regressing the teacher features (BEiT v2: 1 or 3)
    decoder_embed_dim: int = 768
    decoder_num_heads: int = 12
    decay: float = 0.99  # EMA decay of the codebook
    beta: float = 1.0  # commitment loss weight (BEiT v2: 1.0)
    restart: float = 0.1  # restart codes whose EMA usage falls below restart x the mean usage (0 = never)


@dataclass
class TeacherConfig:
    name: str = ""  # timm:<model> | openclip:<model> | mimkit:<pretrain checkpoint>
    weights: str = ""  # local weights file (timm, openclip); nothing is downloaded
    img_size: int = 0  # timm: teacher input size (0 = the model's default)


@dataclass
class TokenizerConfig:
    kind: str = choices(*KINDS, default="kmeans")
    output_dir: str = ""  # default: runs/tokenizer_<kind>_<data.name>
    seed: int = 0
    device: str = choices(*DEVICES, default="auto")
    precision: str = choices(*PRECISIONS, default="auto")
    patch_size: int = 16  # the encoder's patch size: one token per patch, grid = data.img_size // patch_size
    vocab_size: int = 8192
    epochs: int = 100  # dvae, vqkd
    batch_size: int = 64
    accum_iter: int = 1
    resume: str = choices("auto", "none", default="auto")  # auto: continue from <output_dir>/checkpoints/last.pt
    overwrite: bool = False
    eval_limit: int = 0  # held-out images for usage/perplexity (0 = the whole test split)
    ckpt_every: int = 10  # epochs between checkpoints/last.pt
    vis_every: int = 10  # epochs between TensorBoard image panels (dvae)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    vqkd: VQKDConfig = field(default_factory=VQKDConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


# Paper defaults per kind (official ViT-B/16 scale), applied under the dataset presets and the user's layers.
RECIPES: dict[str, dict] = {
    "kmeans": {"vocab_size": 512},
    # DALL-E: AdamW, lr 1e-3 -> cosine; no weight decay on the code path matters little at this scale
    "dvae": {"vocab_size": 8192, "epochs": 100, "batch_size": 64, "optim.blr": 1e-3, "optim.lr_batch_ref": 256,
             "optim.betas": [0.9, 0.999], "optim.weight_decay": 1e-4, "optim.warmup_epochs": 1,
             "data.crop_scale": [0.08, 1.0]},
    # BEiT v2 VQ-KD: lr 5e-5 per 128 images, betas (0.9, 0.99), wd 1e-4, min lr 1e-5, crop scale 0.08-1
    "vqkd": {"vocab_size": 8192, "epochs": 100, "batch_size": 64, "optim.blr": 5e-5, "optim.lr_batch_ref": 128,
             "optim.betas": [0.9, 0.99], "optim.weight_decay": 1e-4, "optim.warmup_epochs": 5,
             "optim.min_lr": 1e-5, "data.crop_scale": [0.08, 1.0]},
}


def _data_presets() -> dict[str, dict]:
    """The pretraining dataset presets reduced to what a tokenizer needs: data keys and the patch size."""
    out = {}
    for name, preset in DATA_PRESETS.items():
        keys = {k: v for k, v in preset.items() if k.startswith("data.")}
        if "model.patch_size" in preset:
            keys["patch_size"] = preset["model.patch_size"]
        out[name] = keys
    return out


def tokenizer_config(files: list[str] = (), overrides: list[str] = ()) -> TokenizerConfig:
    return build_config(TokenizerConfig, files, overrides, presets=[("kind", RECIPES), ("data.name", _data_presets())])


def dvae_input_size(cfg: TokenizerConfig) -> int:
    return cfg.dvae.input_size or cfg.data.img_size


def validate(cfg: TokenizerConfig) -> None:
    check_range("patch_size", cfg.patch_size, 1)
    check_range("vocab_size", cfg.vocab_size, 2)
    check_range("epochs", cfg.epochs, 0)
    check_range("batch_size", cfg.batch_size, 1)
    check_range("accum_iter", cfg.accum_iter, 1)
    validate_data(cfg.data)
    check_range("optim.blr", cfg.optim.blr, 0, lo_open=True)
    if cfg.data.img_size % cfg.patch_size:
        raise ConfigError(f"data.img_size={cfg.data.img_size} is not divisible by patch_size={cfg.patch_size}")
    grid = cfg.data.img_size // cfg.patch_size
    if cfg.kind == "kmeans":
        check_range("kmeans.max_samples", cfg.kmeans.max_samples, cfg.vocab_size)
        check_range("kmeans.niter", cfg.kmeans.niter, 1)
        if cfg.kmeans.features == "teacher" and not cfg.teacher.name:
            raise ConfigError("kmeans.features=teacher needs teacher.name (timm:<model>, openclip:<model> or "
                              "mimkit:<checkpoint>)")
    if cfg.kind == "dvae":
        size, factor = dvae_input_size(cfg), 2 ** (cfg.dvae.groups - 1)
        check_range("dvae.groups", cfg.dvae.groups, 1)
        if size != grid * factor:
            half = cfg.data.img_size // 2  # BEiT's layout: the half-resolution copy, patch / 2 pixels per token
            hint = (f"dvae.input_size={half} dvae.groups={(cfg.patch_size // 2).bit_length()}"
                    if cfg.patch_size >= 2 and cfg.patch_size & (cfg.patch_size - 1) == 0 else
                    f"dvae.input_size={grid * factor}")
            raise ConfigError(f"dvae.input_size={size} with dvae.groups={cfg.dvae.groups} (downsampling {factor}) "
                              f"gives a {size // factor}x{size // factor} token grid, but data.img_size / patch_size "
                              f"= {grid}; set e.g. {hint}")
        if not 0 < cfg.dvae.tau_end <= cfg.dvae.tau_start:
            raise ConfigError(f"dvae.tau_end={cfg.dvae.tau_end} must satisfy 0 < tau_end <= "
                              f"tau_start={cfg.dvae.tau_start}")
    if cfg.kind == "vqkd":
        if not cfg.teacher.name:
            raise ConfigError("kind=vqkd needs teacher.name (timm:<model>, openclip:<model> or mimkit:<checkpoint>)")
        if cfg.vqkd.embed_dim % cfg.vqkd.num_heads or cfg.vqkd.decoder_embed_dim % cfg.vqkd.decoder_num_heads:
            raise ConfigError("vqkd.embed_dim / decoder_embed_dim must be divisible by their num_heads")
        check_range("vqkd.decay", cfg.vqkd.decay, 0, 1, hi_open=True)
