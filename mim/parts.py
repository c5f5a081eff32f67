"""What a command's config needs of the registered parts, without importing them (they import torch): each head's,
target kind's and method's config section, the teacher section, the losses' names and the methods' recipes, as
plain dataclasses and dicts. The parts' modules take their `Config` and `recipe` from here; registering a part
(`mimkit.registry.registrar`) records its section and recipe in the tables below, which list the library's own
parts in registration order before any is imported, so a part added out of tree joins them when it registers."""
from __future__ import annotations

from dataclasses import dataclass

from .config import choices

GRADIENTS = ("sobel", "central")  # HOG's (mimkit.hog)
SOURCES = ("timm", "openclip", "mimkit")  # teachers' (mimkit.teachers)
NORMS = ("none", "layernorm", "l2")  # per-patch normalization of teacher features (target.teacher.norm)
LOSS_NAMES = ("mse", "l1", "cosine", "smooth_l1", "ce")  # mimkit.losses.LOSSES


# ---------------------------------------------------------------------------------------------
# Heads (mimkit.heads)


@dataclass
class DecoderConfig:
    """MAE's decoder (the `decoder` section); MAE ViT-B: 8 blocks of width 512, 16 heads."""
    depth: int = 8
    embed_dim: int = 512
    num_heads: int = 16


@dataclass
class ConvDecoderConfig:
    """data2vec 2.0's image decoder (the `conv_decoder` section; fairseq Decoder2d): ViT-B 6 layers of width 768,
    kernel 3, 16 groups; masked slots start as Gaussian noise of std 0.01 (mask_noise_std)."""
    depth: int = 6
    embed_dim: int = 0  # 0: the encoder's width (768 at ViT-B)
    kernel: int = 3
    groups: int = 16
    noise_std: float = 0.01


@dataclass
class PredictorConfig:
    """I-JEPA's predictor (the `predictor` section); ViT-H/14: 12 blocks of width 384 (pred_depth, pred_emb_dim)."""
    depth: int = 12
    embed_dim: int = 384
    num_heads: int = 0  # 0: the encoder's number of heads (I-JEPA)


HEAD_SECTIONS: dict[str, type | None] = {"decoder": DecoderConfig, "linear": None, "masked_linear": None,
                                         "conv_decoder": ConvDecoderConfig, "predictor": PredictorConfig}


# ---------------------------------------------------------------------------------------------
# Target kinds (mimkit.targets) and teachers (mimkit.teachers)


@dataclass
class PixelsConfig:
    norm_pix: bool = False  # standardize each target patch by its own mean and variance (MAE: true)


@dataclass
class HOGConfig:
    bins: int = 9
    cells_per_patch: int = 2  # MaskFeat: 2x2 cells per patch (8-px cells at patch 16)
    gradient: str = choices(*GRADIENTS, default="sobel")
    gaussian: bool = False  # Gaussian window over each patch's gradient magnitudes


@dataclass
class TokensConfig:
    tokenizer: str = ""  # path of a tokenizer file (`mimkit tokenizer train`)
    vocab_size: int = 0  # 0 = the tokenizer's; when set, checked against it
    # a tokenizer that drops patches (lavit): ignore them in the loss, or label them with the kept token
    # that merged them
    dropped: str = choices("ignore", "merged", default="ignore")


@dataclass
class TeacherConfig:
    """The `teacher` section of every command that uses a teacher."""
    name: str = ""  # timm:<model> | openclip:<model> | mimkit:<pretrain checkpoint>
    weights: str = ""  # local weights file (timm, openclip); nothing is downloaded
    img_size: int = 0  # timm: teacher input size (0 = the model's default)
    # 0: the teacher's output features (after its final norm; OpenCLIP: after ln_post and the projection);
    # k: the raw tokens of block k (1-based), -1: of the last block (MaskDistill's target)
    layer: int = 0


@dataclass
class TeacherTargetConfig(TeacherConfig):
    # per patch over the features: LayerNorm without affine, (x - mean) / sqrt(var + 1e-6) (MaskDistill), or unit
    # length
    norm: str = choices(*NORMS, default="none")


@dataclass
class EMAConfig:
    momentum: float = 0.996  # at the first update
    momentum_end: float = 1.0
    anneal_end: float = 1.0  # share of the run's updates after which the momentum stays at momentum_end
    top_k: int = 0  # 0: the output tokens after the final norm; K: the mean of the last K blocks' FFN outputs
    instance_norm: bool = False  # each block's FFN output normalized over the patches per channel before the mean
    norm: str = choices("none", "layernorm", default="layernorm")  # per patch, LayerNorm without affine


TARGET_SECTIONS: dict[str, type | None] = {"pixels": PixelsConfig, "hog": HOGConfig, "tokens": TokensConfig,
                                           "teacher": TeacherTargetConfig, "ema": EMAConfig}


# ---------------------------------------------------------------------------------------------
# Methods (mimkit.methods): their sections and recipes


@dataclass
class BEiTv2Config:
    aux_layer: int = 0  # block (1-based) whose patch tokens feed the auxiliary head; 0 = depth // 2
    aux_depth: int = 2  # blocks of the auxiliary head


@dataclass
class Data2Vec2Config:
    cls_loss: float = 0.01  # weight of the CLS regression to the image's mean target; 0 = off


_BEIT = {
    "head": "masked_linear", "target.kind": "tokens", "loss": "ce", "mask.kind": "block", "mask.ratio": 0.4,
    "model.layer_scale": 0.1, "model.drop_path": 0.1,
    # lr 1.5e-3 at batch 2048, AdamW (0.9, 0.98), wd 0.05, 10 warmup epochs, clip 3.0, crops 0.08-1 (BEiT;
    # BEiT v2 ViT-B/16 the same)
    "optim.blr": 1.5e-3, "optim.lr_batch_ref": 2048, "optim.betas": [0.9, 0.98], "optim.warmup_epochs": 10,
    "optim.clip_grad": 3.0, "data.crop_scale": [0.08, 1.0],
}

# Each method's parts and the values where its paper's recipe differs from the defaults (the sources are in
# each method's module docstring).
RECIPES: dict[str, dict] = {
    "mae": {"head": "decoder", "target.kind": "pixels", "loss": "mse", "mask.kind": "random",
            "target.pixels.norm_pix": True},
    "simmim": {
        "head": "linear", "target.kind": "pixels", "loss": "l1", "mask.kind": "grid", "mask.ratio": 0.6,
        # ViT-B: lr 1e-4 per 512 images, AdamW (0.9, 0.999), wd 0.05,
        # 10 warmup epochs, clip 5.0, crops 0.67-1
        "optim.blr": 1e-4, "optim.lr_batch_ref": 512, "optim.betas": [0.9, 0.999], "optim.warmup_epochs": 10,
        "optim.clip_grad": 5.0, "data.crop_scale": [0.67, 1.0],
    },
    "maskfeat": {
        "head": "linear", "target.kind": "hog", "loss": "mse", "mask.kind": "block", "mask.ratio": 0.4,
        # mmpretrain's ViT-B: lr 2e-4 per 256 images, AdamW (0.9, 0.999), wd 0.05, 30 warmup epochs, clip 0.02
        "optim.blr": 2e-4, "optim.betas": [0.9, 0.999], "optim.warmup_epochs": 30, "optim.clip_grad": 0.02,
        "data.crop_scale": [0.5, 1.0],
    },
    "beit": _BEIT,
    "beitv2": _BEIT,
    "clustermim": {"head": "decoder", "target.kind": "tokens", "loss": "ce", "mask.kind": "random"},
    "eva": {
        "head": "masked_linear", "target.kind": "teacher", "loss": "cosine", "mask.kind": "block", "mask.ratio": 0.4,
        "model.drop_path": 0.1, "optim.blr": 1e-3, "optim.lr_batch_ref": 4096, "optim.betas": [0.9, 0.98],
        "optim.warmup_epochs": 2, "optim.min_lr": 1e-5, "optim.clip_grad": 3.0,
    },
    "maskdistill": {**_BEIT, "target.kind": "teacher", "loss": "smooth_l1", "target.teacher.layer": -1,
                    "target.teacher.norm": "layernorm"},
    "milan": {"head": "decoder", "target.kind": "teacher", "loss": "cosine", "mask.kind": "random"},
    "data2vec2": {
        "head": "conv_decoder", "target.kind": "ema", "loss": "mse",
        "mask.kind": "inverse_block", "mask.ratio": 0.8, "mask.clones": 16,
        "target.ema.momentum": 0.9998, "target.ema.momentum_end": 0.99999, "target.ema.anneal_end": 100000 / 375300,
        "target.ema.top_k": 10, "target.ema.instance_norm": True, "target.ema.norm": "layernorm",
        "optim.blr": 1e-3, "optim.lr_batch_ref": 256, "optim.betas": [0.9, 0.95], "optim.weight_decay": 0.05,
        "optim.warmup_epochs": 10, "optim.clip_grad": 4.0,
    },
    "ijepa": {
        "head": "predictor", "target.kind": "ema", "loss": "smooth_l1", "mask.kind": "multiblock",
        "target.ema.momentum": 0.996, "target.ema.momentum_end": 1.0, "target.ema.top_k": 0,
        "target.ema.norm": "layernorm",
        "optim.blr": 1e-3, "optim.lr_batch_ref": 2048, "optim.betas": [0.9, 0.999], "optim.weight_decay": 0.04,
        "optim.weight_decay_end": 0.4, "optim.warmup_epochs": 40, "optim.warmup_start_lr": 2e-4, "optim.min_lr": 1e-6,
        "data.crop_scale": [0.3, 1.0], "data.hflip": False,
    },
}
METHOD_SECTIONS: dict[str, type | None] = {name: None for name in RECIPES} | {"beitv2": BEiTv2Config,
                                                                              "data2vec2": Data2Vec2Config}
