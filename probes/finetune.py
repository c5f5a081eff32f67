"""End-to-end fine-tuning (MAE protocol) on timm's VisionTransformer loaded from the exported encoder: mean
pooling + fc_norm (the pretrained final norm is dropped, as in MAE), head init std 2e-5, AdamW with layer-wise lr
decay (timm's param_groups_layer_decay), drop path, timm Mixup/CutMix with label smoothing, RandAugment and random
erasing from timm's create_transform, warmup + cosine; checkpoints/best.pt keeps the best validation top-1."""
from __future__ import annotations

import random

import numpy as np
import torch
import torchvision.transforms.v2 as T
from timm.data import Mixup, auto_augment, create_transform
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay

from mimkit.config import ConfigError
from mimkit.data import Transformed, build_dataset, dataset_stats, eval_transform, make_loader
from mimkit.loop import effective_lr, place_model
from mimkit.teachers import ProbeEncoder
from mimkit.vit import ViT

from .context import ProbeRun
from .export import export_state_dict, timm_kwargs
from .finetune_model import Classifier, saved_model
from .train import RESUME, epoch_batches, evaluate, fit, seeded_loader, summarize


FRESH = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}


def finetune_model(encoder: ViT, num_classes: int, drop_path: float = 0.1) -> VisionTransformer:
    model = VisionTransformer(**timm_kwargs(encoder, num_classes=num_classes, global_pool="avg",
                                            drop_path_rate=drop_path))
    state = {k: v for k, v in export_state_dict(encoder).items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) == FRESH and not unexpected, (missing, unexpected)
    trunc_normal_(model.head.weight, std=2e-5)
    torch.nn.init.zeros_(model.head.bias)
    return model


def layer_decay_groups(model: VisionTransformer, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's groups: lr_scale = decay^(L+1-layer_id) with patch_embed/cls/pos = 0, block i = i+1, head = L+1;
    no weight decay on biases, norms, pos_embed and cls_token."""
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=layer_decay)


def _posterize(img, bits_to_keep: int, **kwargs):
    """timm's posterize, also at 0 bits: Pillow >= 13 rejects 0, older Pillow returned a black image, which
    timm's increasing-severity RandAugment ("inc1") asks for at magnitudes >= 7.5 (reachable with mstd)."""
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return _timm_posterize(img, bits_to_keep, **kwargs)


_timm_posterize = auto_augment.posterize
for _op in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_op] = _posterize  # read when an augmentation op is built


class Seeded(T.Compose):
    """A Compose whose Python and NumPy draws (timm's RandAugment and random erasing) are seeded from torch's
    generator, which mimkit.data.MaskedImages seeds per sample: a sample's view depends on (seed, epoch, index)
    only, whatever the loader workers and wherever a resumed run starts."""

    def forward(self, *inputs):
        seed = int(torch.randint(2 ** 31, (1,)))
        py, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return super().forward(*inputs)
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def train_transform(cfg) -> Seeded:
    """timm's training pipeline: RandomResizedCrop, flip, RandAugment, normalize, random erasing. In-memory
    tensor images (digits) go through PIL first, as timm's augmentations expect."""
    mean, std = dataset_stats(cfg.data.name)
    ft = cfg.finetune
    tf = create_transform(cfg.data.img_size, is_training=True, scale=tuple(cfg.data.crop_scale),
                          hflip=0.5 if cfg.data.hflip else 0.0, color_jitter=None,
                          auto_augment=ft.auto_augment or None, interpolation="bicubic", re_prob=ft.reprob,
                          re_mode="pixel", re_count=1, mean=mean, std=std)
    return Seeded([T.ToPILImage(), tf])


def run_finetune(run: ProbeRun) -> dict:
    cfg, device, ft = run.cfg, run.device, run.cfg.finetune
    num_classes = run.num_classes
    train_loader = seeded_loader(build_dataset(cfg.data, "train", cfg.data.limit), train_transform(cfg), run)
    train_set = train_loader.dataset
    test_set = Transformed(build_dataset(cfg.data, "test", cfg.data.test_limit), eval_transform(cfg.data))
    test_loader = make_loader(test_set, cfg.batch_size, cfg.data, pin_memory=device.type == "cuda")

    encoder = run.encoder.cpu()  # a timm / OpenCLIP model (ProbeEncoder) trains as itself, with a fresh head
    model = place_model(Classifier(encoder, num_classes, ft.drop_path) if isinstance(encoder, ProbeEncoder) else
                        finetune_model(encoder, num_classes, ft.drop_path), device, cfg.precision)
    base_lr = effective_lr(cfg)
    optimizer = torch.optim.AdamW(layer_decay_groups(model, cfg.optim.weight_decay, ft.layer_decay), lr=base_lr,
                                  betas=tuple(cfg.optim.betas))
    mixup = None
    np.random.seed(cfg.seed)  # timm's Mixup draws from NumPy's global generator: the same draws in every run
    if ft.mixup > 0 or ft.cutmix > 0:
        if cfg.batch_size % 2:
            raise ConfigError(f"batch_size={cfg.batch_size} must be even with mixup/cutmix (timm mixes a batch "
                              f"with its flip); or set finetune.mixup=0 finetune.cutmix=0")
        mixup = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, prob=ft.mixup_prob,
                      switch_prob=ft.mixup_switch_prob, mode="batch", label_smoothing=ft.smoothing,
                      num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif ft.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(ft.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    def loss_fn(x, y):
        if mixup is not None:
            x, y = mixup(x, y)
        return criterion(model(x), y)

    def keep_best(epoch: int, acc: dict, history: list) -> None:
        state = {"mimkit": "finetune", "model": model.state_dict(), "epoch": epoch, **acc,
                 **saved_model(run, model, num_classes)}
        if acc["top1"] > max((h["top1"] for h in history if "top1" in h), default=-1.0):
            run.save("best.pt", state)
        run.save("last.pt", state)

    run.log(f"fine-tune: {len(train_set)} images, {cfg.epochs} epochs, {len(train_loader)} steps/epoch, "
            f"lr {base_lr:.3g}, layer decay {ft.layer_decay}, mixup {ft.mixup} cutmix {ft.cutmix}, "
            f"RandAugment {ft.auto_augment or 'off'}, erasing {ft.reprob}")
    history = fit(model, optimizer, lambda epoch, skip: epoch_batches(train_loader, epoch, skip, run),
                  len(train_loader), loss_fn, lambda: evaluate(model, test_loader, device, cfg.precision), run,
                  ft.eval_every, keep_best, RESUME)
    summary = summarize(history)
    # the reported accuracy is the best checkpoint's (MAE reports the max over epochs)
    return {"n_train": len(train_set), "n_test": len(test_set), "lr": base_lr, **summary,
            "top1": summary["best_top1"], "top5": summary["best_top5"], "last_top1": summary["top1"],
            "last_top5": summary["top5"]}
