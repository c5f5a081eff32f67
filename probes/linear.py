"""Linear probe (MAE protocol): frozen encoder, BatchNorm1d(affine=False, eps 1e-6) + linear head (init std
0.01), timm's LARS with MAE's grouping, lr = blr * batch / 256, warmup + half-cycle cosine, RandomResizedCrop +
flip only. `linear.mode=cached` trains the same head on cached features without augmentation (the fast variant).
`linear.random_init` / `linear.pixels` train the same head on the baselines too."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.optim import Lars
from torch import nn

from mimkit.data import build_dataset, pretrain_transform
from mimkit.encoders import random_encoder
from mimkit.loop import effective_lr

from .context import ProbeRun
from .features import RawPixels, encode
from .train import RESUME, Prefixed, epoch_batches, evaluate, fit, seeded_loader, summarize


def linear_head(dim: int, num_classes: int) -> nn.Sequential:
    """MAE's probe head: a parameter-free BatchNorm (feature whitening) then a linear classifier."""
    fc = nn.Linear(dim, num_classes)
    trunc_normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    return nn.Sequential(OrderedDict(bn=nn.BatchNorm1d(dim, affine=False, eps=1e-6), fc=fc))


def lars(module: nn.Module, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
         trust_coeff: float = 0.001) -> Lars:
    """timm's Lars grouped as MAE's (MoCo v3) LARS: weights (ndim > 1) get weight decay and the trust-ratio
    adaptation, even at weight decay 0 (timm adapts only when wd != 0 unless always_adapt); biases and norms
    get neither."""
    params = [p for p in module.parameters() if p.requires_grad]
    return Lars([{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "always_adapt": True},
                 {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False}],
                lr=lr, momentum=momentum, trust_coeff=trust_coeff)


def feature_batches(feats: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator | None,
                    drop_last: bool = False):
    """Mini-batches of cached features, shuffled by `generator` (None: in order)."""
    n = len(feats)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield feats[idx], labels[idx]


def _batches(run: ProbeRun, encoder: nn.Module | None) -> tuple[Callable, int, int]:
    """(batches(epoch), steps per epoch, training images) of `encoder`'s features (None: the checkpoint's)."""
    cfg, device = run.cfg, run.device
    if cfg.linear.mode == "cached":
        train_feats, train_labels = (t.to(device) for t in run.features("train", encoder))
        g = torch.Generator().manual_seed(cfg.seed)
        return (lambda epoch, skip: feature_batches(train_feats, train_labels, cfg.batch_size, g, drop_last=True),
                max(len(train_feats) // cfg.batch_size, 1), len(train_feats))
    # augmented: the frozen encoder sees fresh RandomResizedCrop + flip crops every step (seeded per sample)
    loader = seeded_loader(build_dataset(cfg.data, "train", cfg.data.limit), pretrain_transform(cfg.data), run)
    encoder = (run.encoder if encoder is None else encoder).to(device).eval().requires_grad_(False)
    layer = cfg.features.layer - 1 if cfg.features.layer else None

    def batches(epoch, skip):
        for imgs, y in epoch_batches(loader, epoch, skip, run):
            with torch.no_grad():  # (yielding inside the block would switch grad off for the head too)
                x = encode(encoder, imgs.to(device, non_blocking=True), cfg.features.pool, layer)
            yield x, y

    return batches, len(loader), len(loader.dataset)


def train_head(run: ProbeRun, encoder: nn.Module | None = None, name: str = "") -> tuple[nn.Module, list[dict], int]:
    """The probe head trained on `encoder`'s features (None: the checkpoint's encoder; `name`: the baseline's
    name): (head, history, images). The augmented mode checkpoints every epoch and resumes
    (mimkit.probes.train.fit); the cached one runs again from the cached features."""
    cfg, device = run.cfg, run.device
    test_feats, test_labels = run.features("test", encoder)
    head = linear_head(test_feats.shape[1], run.num_classes).to(device)
    batches, steps, n_train = _batches(run, encoder)
    base_lr = effective_lr(cfg)
    optimizer = lars(head, base_lr, cfg.optim.weight_decay, cfg.optim.momentum, cfg.optim.trust_coeff)
    run.log(f"linear probe ({cfg.linear.mode}): {n_train} images, {cfg.epochs} epochs, {steps} steps/epoch, "
            f"lr {base_lr:.3g}")
    history = fit(head, optimizer, batches, steps, lambda x, y: F.cross_entropy(head(x), y),
                  lambda: evaluate(head, feature_batches(test_feats, test_labels, cfg.batch_size, None), device,
                                   cfg.precision), run,
                  ckpt_name="" if cfg.linear.mode == "cached" else f"resume_{name}.pt" if name else RESUME)
    return head, history, n_train


def baselines(run: ProbeRun) -> dict[str, dict]:
    """The same head and schedule on the baselines asked for: a random-init encoder of the checkpoint's shape
    (linear.random_init) and the raw pixels (linear.pixels); each logs to TensorBoard under its own name."""
    lc, out = run.cfg.linear, {}
    encoders = {"random_init": lc.random_init and random_encoder(run.pretrain_cfg.model, run.cfg.data.img_size,
                                                                 run.pretrain_cfg.seed),
                "pixels": lc.pixels and RawPixels()}
    for name, encoder in encoders.items():
        if encoder:
            run.log(f"baseline: {name}")
            _, history, _ = train_head(replace(run, writer=Prefixed(run.writer, f"{name}/")),
                                       encoder.to(run.device), name)
            out[name] = {k: v for k, v in summarize(history).items() if k != "history"}
    return out


def run_linear(run: ProbeRun) -> dict:
    head, history, n_train = train_head(run)
    cfg = run.cfg
    run.save("last.pt", {"mimkit": "linear_probe", "head": head.state_dict(), **history[-1],
                         "features": {"pool": cfg.features.pool, "layer": cfg.features.layer}})
    base = baselines(run)
    return {"n_train": n_train, "n_test": len(run.features("test")[1]), "lr": effective_lr(cfg),
            **summarize(history), **base}
