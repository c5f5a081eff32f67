"""Quality against a peer: mimkit's MAE and lightly's MAE (`pip install --no-deps -r benchmarks/requirements.txt`)
trained side by side on CIFAR-10 at one recipe, with a k-NN probe after every epoch.

Both sides: ViT-Tiny/4 (192 x 12) at 32 px, decoder 4 x 128, MSE on norm_pix targets of 75% random masks, batch
256, AdamW (mimkit's weight-decay groups) at blr 1.5e-4 per 256, 1 warmup epoch then cosine (MAE's per-step
schedule), fp32, the same augmented images in the same order (mimkit's loader: RandomResizedCrop(0.2-1) + flip,
seeded per sample); lightly draws its masks in its step, as its example does. Epochs alternate between the sides
so that the load of a shared machine falls on both. k-NN (k = 20, T = 0.07) from a fixed 10,000-image training
bank to the 10,000 test images, on CLS and on mean-pooled features, at random init and after every epoch.
Goals: mimkit's final k-NN >= lightly's (a bug in masking, targets or schedule shows here), and mimkit ahead in
wall time. `--dry-run`: the same code on the synthetic data with a tiny model (CI keeps it working)."""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from mimkit import engine
from mimkit.data import Transformed, build_dataset, eval_transform, make_loader
from mimkit.dist import autocast
from mimkit.loop import build_optimizer, effective_lr, lr_at, set_lr
from mimkit.methods import pretrain_config
from mimkit.probes.knn import knn_accuracy

from .common import SHARED_DATA, machine_info, write_result
from .peer import LightlyMAE, lightly_missing

RECIPE = ["method=mae", "data.name=cifar10", "model.arch=vit_tiny", "model.patch_size=4", "model.depth=12",
          "decoder.depth=4", "decoder.embed_dim=128", "decoder.num_heads=4", "batch_size=256", "optim.blr=1.5e-4",
          "optim.lr_batch_ref=256", "optim.warmup_epochs=1", "epochs=8", "precision=fp32", "probe.enabled=false",
          "vis_every=1000"]
DRY = ["data.name=synthetic", "data.limit=64", "data.test_limit=32", "model.depth=2", "decoder.depth=1",
       "batch_size=32", "epochs=2"]
BANK, TEST, K = 10_000, 10_000, 20


def eval_loaders(cfg, dry: bool) -> tuple:
    """The k-NN bank (training images, evenly spread) and the test images, without augmentation."""
    bank = build_dataset(cfg.data, "train", 32 if dry else BANK)
    test = build_dataset(cfg.data, "test", 32 if dry else TEST)
    return tuple(make_loader(Transformed(d, eval_transform(cfg.data)), 256, cfg.data) for d in (bank, test))


@torch.no_grad()
def knn(features, loaders, device: torch.device) -> dict[str, float]:
    """k-NN top-1 (%) on CLS and mean-pooled features; `features(imgs)` -> tokens [B, 1 + N, D]."""
    out = {}
    pooled = {"cls": [[], []], "mean": [[], []]}
    labels = [[], []]
    for i, loader in enumerate(loaders):
        for imgs, y in loader:
            tokens = features(imgs.to(device)).float()
            pooled["cls"][i].append(tokens[:, 0].cpu())
            pooled["mean"][i].append(tokens[:, 1:].mean(1).cpu())
            labels[i].append(torch.as_tensor(y))
    bank_y, test_y = (torch.cat(v) for v in labels)
    for pool, (bank, test) in pooled.items():
        acc = knn_accuracy(torch.cat(bank), bank_y, torch.cat(test), test_y, ks=(K,), T=0.07)
        out[pool] = acc[f"top1_k{K}"]
    return out


def lightly_side(cfg, loader, device: torch.device):
    """lightly's model, optimizer and one-epoch function on mimkit's loader, with MAE's per-step schedule."""
    torch.manual_seed(cfg.seed)
    model = LightlyMAE(cfg).to(device).train()
    opt = build_optimizer(model, cfg, device)
    base = effective_lr(cfg)

    def epoch_fn(epoch: int) -> float:
        model.train()
        losses = []
        for it, (imgs, _, _, _) in enumerate(loader):
            set_lr(opt, lr_at(epoch + it / len(loader), cfg, base))
            with autocast(device, cfg.precision):
                loss = model(imgs.to(device))["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return sum(losses) / len(losses)

    def features(imgs: torch.Tensor) -> torch.Tensor:
        model.eval()
        return model.backbone.encode(images=imgs)

    return epoch_fn, features


def run(dry_run: bool = False) -> dict:
    missing = lightly_missing()
    if missing:
        raise ModuleNotFoundError(missing)
    root = [] if dry_run else [f"data.root={SHARED_DATA / 'cifar10'}"]
    if not dry_run and not (SHARED_DATA / "cifar10" / "train").is_dir():
        raise FileNotFoundError(f"CIFAR-10 folders not found at {SHARED_DATA / 'cifar10'}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = pretrain_config([], [*RECIPE, *root, *(DRY if dry_run else []), f"output_dir={tmp}/mimkit"])
        mim = engine.setup(cfg)
        loaders = eval_loaders(cfg, dry_run)
        peer_epoch, peer_features = lightly_side(cfg, mim.loader, mim.device)
        curves = {"mimkit": [knn(lambda x: mim.model.encoder.eval()(x), loaders, mim.device)],
                  "lightly": [knn(peer_features, loaders, mim.device)]}
        seconds, losses = {"mimkit": 0.0, "lightly": 0.0}, {"mimkit": [], "lightly": []}
        for epoch in range(cfg.epochs):
            mim.sampler.set_epoch(epoch)  # both sides see this epoch's images in the same order
            t0 = time.perf_counter()
            losses["mimkit"].append(engine.run_epoch(mim, epoch)["loss"])
            seconds["mimkit"] += time.perf_counter() - t0
            curves["mimkit"].append(knn(lambda x: mim.model.encoder.eval()(x), loaders, mim.device))
            t0 = time.perf_counter()
            losses["lightly"].append(peer_epoch(epoch))
            seconds["lightly"] += time.perf_counter() - t0
            curves["lightly"].append(knn(peer_features, loaders, mim.device))
            print(f"epoch {epoch + 1}/{cfg.epochs}: k-NN cls/mean mimkit {curves['mimkit'][-1]} "
                  f"lightly {curves['lightly'][-1]}; seconds {seconds}")
    final = {side: curves[side][-1] for side in curves}
    result = {"recipe": RECIPE + (DRY if dry_run else []), "dry_run": dry_run, "knn_curves": curves,
              "loss_curves": losses, "train_seconds": seconds, "final_knn": final,
              "goal_knn_met": all(final["mimkit"][p] >= final["lightly"][p] for p in ("cls", "mean")),
              "wall_time_ratio_lightly_over_mimkit": seconds["lightly"] / seconds["mimkit"],
              "machine": machine_info()}
    if not dry_run:
        write_result("quality", result)
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    """Uses the shared --dry-run flag."""
