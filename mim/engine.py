"""The pretraining loop shared by every method: AdamW, warmup + half-cycle cosine lr per step, gradient
accumulation, clipping, bf16 autocast on CUDA, atomic checkpoints with exact resume, TensorBoard, and a
k-NN probe of the result."""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint, dist
from .config import Config, ConfigError, diff, dump_yaml, from_dict, to_dict, validate
from .data import (EpochSampler, MaskedImages, Transformed, build_dataset, eval_transform, make_loader,
                   pretrain_transform)
from .masking import build_mask_generator
from .methods import build_method


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


# Keys that may change when a run is resumed (they do not change what has been trained so far).
RESUMABLE_CHANGES = ("epochs", "resume", "overwrite", "output_dir", "device", "data.num_workers", "data.root",
                     "vis_every", "ckpt.every", "probe.")


def lr_at(epoch: float, cfg: Config, base_lr: float) -> float:
    """Linear warmup, then half-cycle cosine to min_lr (MAE's per-step schedule; `epoch` is fractional)."""
    warm = cfg.optim.warmup_epochs
    if epoch < warm:
        return base_lr * epoch / warm
    progress = (epoch - warm) / max(cfg.epochs - warm, 1e-8)
    return cfg.optim.min_lr + (base_lr - cfg.optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def effective_lr(cfg: Config) -> float:
    return cfg.optim.blr * cfg.batch_size * cfg.accum_iter * dist.world_size() / cfg.optim.lr_batch_ref


class RunLog:
    """Prints on rank 0 and appends to <output_dir>/log.txt."""

    def __init__(self, out: Path):
        self.path = out / "log.txt"

    def __call__(self, msg: str) -> None:
        if dist.is_main():
            tqdm.write(msg)
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def resolve_output_dir(cfg: Config) -> Path:
    if not cfg.output_dir:
        cfg.output_dir = f"runs/{cfg.method}_{cfg.data.name}"
    return Path(cfg.output_dir)


def prepare_run_dir(cfg: Config) -> Path | None:
    """Create or check the run directory; returns the checkpoint to resume from, if any.

    An existing run is never overwritten silently: resume=auto continues it if its config matches (apart
    from RESUMABLE_CHANGES), overwrite=true starts afresh, anything else is an error."""
    out = resolve_output_dir(cfg)
    saved = out / "config.yaml"
    last = out / "checkpoints" / "last.pt"
    if cfg.resume not in ("auto", "none"):
        return Path(cfg.resume)
    if saved.exists() and not cfg.overwrite:
        if cfg.resume == "none":
            raise ConfigError(f"output_dir {out} already holds a run; use resume=auto to continue it, "
                              f"overwrite=true to start afresh, or another output_dir")
        import yaml
        old = from_dict(Config, yaml.safe_load(saved.read_text()))
        changed = [k for k in diff(old, cfg) if not k.startswith(RESUMABLE_CHANGES)]
        if changed:
            raise ConfigError(f"output_dir {out} holds a run with a different config ({', '.join(changed)}); "
                              f"use another output_dir or overwrite=true")
    if cfg.overwrite and dist.is_main():
        for name in ("checkpoints", "tb", "metrics.json", "log.txt", "reconstructions.png"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if dist.is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write_text(saved, dump_yaml(cfg))
        except OSError as e:
            raise ConfigError(f"cannot write to output_dir {out}: {e.strerror}") from None
    dist.barrier()
    return last if cfg.resume == "auto" and last.exists() else None


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    # No weight decay on biases, norms, tokens and 1-D parameters (timm's grouping, as in MAE).
    groups = param_groups_weight_decay(model, cfg.optim.weight_decay)
    return torch.optim.AdamW(groups, lr=effective_lr(cfg), betas=tuple(cfg.optim.betas),
                             fused=device.type == "cuda")


def save_checkpoint(path: Path, model, optimizer, epoch: int, step: int, cfg: Config, history: list) -> None:
    checkpoint.save({"mimkit": "pretrain", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": {}, "epoch": epoch, "step": step, "config": to_dict(cfg), "history": history,
                     "rng": checkpoint.rng_state()}, path)


def train(cfg: Config) -> dict:
    validate(cfg)
    device = dist.init(cfg.device)
    out = resolve_output_dir(cfg)
    resume_from = prepare_run_dir(cfg)
    log = RunLog(out)
    torch.manual_seed(cfg.seed + dist.rank())
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)

    train_set = build_dataset(cfg.data, "train", cfg.data.limit)
    encoder_grid = cfg.data.img_size // cfg.model.patch_size
    mask_gen = build_mask_generator(cfg.mask, encoder_grid, cfg.model.patch_size)
    dataset = MaskedImages(train_set, pretrain_transform(cfg.data), mask_gen, cfg.seed, cfg.data.skip_corrupt)
    sampler = EpochSampler(len(dataset), dist.world_size(), dist.rank(), cfg.seed, shuffle=True, drop_last=True)
    loader = make_loader(dataset, cfg.batch_size, cfg.data, sampler=sampler, drop_last=True,
                         pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(sampler)} training images per process; "
                          f"lower batch_size or raise data.limit")

    model = build_method(cfg).to(device)
    optimizer = build_optimizer(model, cfg, device)
    start_epoch, step, history = 0, 0, []
    if resume_from is not None:
        ckpt = checkpoint.load(resume_from)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise checkpoint.CheckpointError(f"{resume_from} does not fit this model ({str(e).splitlines()[0]}); "
                                             f"was it trained with another architecture or method?") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step, history = ckpt["epoch"] + 1, ckpt["step"], ckpt.get("history", [])
        checkpoint.set_rng_state(ckpt["rng"])
        log(f"resumed from {resume_from} (epoch {ckpt['epoch'] + 1} done, step {step})")
    train_model = DistributedDataParallel(model) if dist.world_size() > 1 else model
    if cfg.compile:
        train_model = torch.compile(train_model)

    writer = None
    if dist.is_main():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"))
    vis_set = Transformed(build_dataset(cfg.data, "test"), _vis_transform(cfg))
    vis_imgs = torch.stack([vis_set[i][0] for i in range(min(8, len(vis_set)))]).to(device)
    vis_mask = torch.stack([mask_gen(torch.Generator().manual_seed(cfg.seed + i)) for i in range(len(vis_imgs))])
    vis_mask = vis_mask.to(device)

    base_lr = effective_lr(cfg)
    steps_per_epoch = len(loader)
    ckpt_path = out / "checkpoints" / "last.pt"
    bad_steps = 0
    log(f"{cfg.method} on {cfg.data.name}: {len(train_set)} images, {steps_per_epoch} steps/epoch, "
        f"epochs {start_epoch}->{cfg.epochs}, lr {base_lr:.3g}, device {device}, world {dist.world_size()}")
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        train_model.train()
        t0, n_images, loss_sum, replaced = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not dist.is_main(), leave=False,
                   file=sys.stderr, dynamic_ncols=True)
        optimizer.zero_grad(set_to_none=True)
        for it, (imgs, mask, _, rep) in enumerate(bar):
            if it % cfg.accum_iter == 0:
                lr = lr_at(epoch + it / steps_per_epoch, cfg, base_lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr
            imgs = imgs.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = train_model(imgs, mask)["loss"]
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                bad_steps += 1
                if bad_steps > cfg.optim.skip_nonfinite:
                    good = f"{ckpt_path} (epoch {history[-1]['epoch']})" if ckpt_path.exists() and history else "none yet"
                    raise NonFiniteLossError(f"non-finite loss ({loss_value}) at step {step} (epoch {epoch + 1}, "
                                             f"iteration {it}); last good checkpoint: {good}")
                log(f"warning: skipped step {step} with loss {loss_value} "
                    f"({bad_steps}/{cfg.optim.skip_nonfinite} allowed by optim.skip_nonfinite)")
                optimizer.zero_grad(set_to_none=True)
                continue
            (loss / cfg.accum_iter).backward()
            if (it + 1) % cfg.accum_iter == 0:
                if cfg.optim.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if writer is not None:
                    writer.add_scalar("train/loss", loss_value, step)
                    writer.add_scalar("train/lr", lr, step)
            n_images += len(imgs)
            loss_sum += loss_value
            replaced += int(rep.sum())
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        seconds = time.perf_counter() - t0
        epoch_loss = dist.all_reduce_mean(loss_sum / max(steps_per_epoch, 1), device)
        ips = n_images * dist.world_size() / seconds
        history.append({"epoch": epoch + 1, "loss": epoch_loss, "images_per_s": ips, "seconds": seconds,
                        "replaced_images": replaced})
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {epoch_loss:.4f} lr {lr:.3g} {ips:.0f} img/s")
        if writer is not None:
            writer.add_scalar("epoch/loss", epoch_loss, epoch + 1)
            writer.add_scalar("epoch/images_per_s", ips, epoch + 1)
            if (epoch + 1) % cfg.vis_every == 0 or epoch + 1 == cfg.epochs:
                model.eval()
                panel = model.visualize(vis_imgs, vis_mask, cfg.data.name)
                if panel is not None:
                    writer.add_image(f"{cfg.method}/{model.panel_name}", panel, epoch + 1)
        if dist.is_main() and ((epoch + 1) % cfg.ckpt.every == 0 or epoch + 1 == cfg.epochs):
            save_checkpoint(ckpt_path, model, optimizer, epoch, step, cfg, history)
        dist.barrier()

    metrics = summarize(history, cfg)
    if dist.is_main():
        model.eval()
        panel = model.visualize(vis_imgs, vis_mask, cfg.data.name)
        if panel is not None:
            from torchvision.utils import save_image
            save_image(panel, out / "reconstructions.png")
        if cfg.probe.enabled:
            metrics["knn"] = knn_probe(model.encoder, cfg, device, log)
        checkpoint.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        log(f"metrics written to {out / 'metrics.json'}")
        writer.close()
    dist.cleanup()
    return metrics


def _vis_transform(cfg: Config):
    return eval_transform(cfg.data)


def summarize(history: list[dict], cfg: Config) -> dict:
    if not history:
        return {"method": cfg.method, "epochs": 0}
    seconds = sum(h["seconds"] for h in history)
    return {"method": cfg.method, "dataset": cfg.data.name, "epochs": history[-1]["epoch"],
            "final_loss": history[-1]["loss"], "first_loss": history[0]["loss"],
            "images_per_s": sum(h["images_per_s"] * h["seconds"] for h in history) / seconds,
            "train_seconds": seconds, "replaced_images": sum(h["replaced_images"] for h in history),
            "loss_history": [h["loss"] for h in history]}


def knn_probe(encoder, cfg: Config, device: torch.device, log) -> dict:
    """k-NN accuracy of the pretrained encoder and of a random-init encoder of the same shape."""
    from mimkit.probes.features import extract
    from mimkit.probes.knn import knn_accuracy

    from .data import make_loader as loader_for
    from .vit import build_encoder
    tf = eval_transform(cfg.data)
    loaders = [loader_for(Transformed(build_dataset(cfg.data, split, cfg.probe.limit), tf), 256, cfg.data)
               for split in ("train", "test")]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the same init the pretraining started from
        random_encoder = build_encoder(cfg.model, cfg.data.img_size).to(device)
    result = {}
    for name, enc in (("pretrained", encoder), ("random_init", random_encoder)):
        (xtr, ytr), (xte, yte) = (extract(enc, ld, device) for ld in loaders)
        result[name] = knn_accuracy(xtr, ytr, xte, yte, ks=(10, 20, 100, 200), T=cfg.probe.knn_t)
        log(f"k-NN ({name}): " + ", ".join(f"{k} {v:.1f}%" for k, v in result[name].items()))
    k = f"top1_k{cfg.probe.knn_k}"
    result["gain_points"] = result["pretrained"].get(k, 0.0) - result["random_init"].get(k, 0.0)
    return result
