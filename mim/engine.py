"""The pretraining loop shared by every method: AdamW, warmup + half-cycle cosine lr per step, gradient
accumulation, clipping, bf16 autocast (`precision`), atomic checkpoints with exact resume, TensorBoard, and a
k-NN probe of the result."""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint, dist, rundir
from .config import Config, ConfigError, to_dict, validate
from .data import (EpochSampler, MaskedImages, Transformed, build_dataset, eval_transform, make_loader,
                   pretrain_transform)
from .masking import build_mask_generator
from .methods import build_method
from .vit import use_fused_attention


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


def last_good(ckpt_path: Path, history: list) -> str:
    """How a non-finite-loss stop names the checkpoint a restart would resume from."""
    return f"{ckpt_path} (epoch {history[-1]['epoch']})" if ckpt_path.exists() and history else "none yet"


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at lr, times its lr_scale (timm's layer-wise decay groups carry one)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def backward_step(loss: torch.Tensor, it: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  accum_iter: int, clip_grad: float) -> bool:
    """Backward of loss / accum_iter; every accum_iter-th iteration clip (clip_grad > 0) and step.
    True when the optimizer stepped."""
    (loss / accum_iter).backward()
    if (it + 1) % accum_iter:
        return False
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True


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


def check_run_dir(cfg: Config) -> Path | None:
    return rundir.check(resolve_output_dir(cfg), cfg, cfg.resume, cfg.overwrite, RESUMABLE_CHANGES)


def write_run_dir(cfg: Config) -> Path:
    return rundir.write(resolve_output_dir(cfg), cfg, cfg.overwrite, rundir.RUN_FILES + ("reconstructions.png",))


def place_model(model: torch.nn.Module, device: torch.device, precision: str = "auto") -> torch.nn.Module:
    """The model on its device, with the attention kernel that trains fastest in its precision there."""
    model = model.to(device)
    if device.type == "cpu" and dist.uses_bf16(device, precision):
        # The fused attention kernel's bf16 backward is slow on CPU: 1.6 s of a 2.5 s MAE step on the CPU
        # preset, 10x its fp32 time. timm's plain path makes the bf16 step 2x faster than fp32 (measured).
        use_fused_attention(model, False)
    return model


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    # No weight decay on biases, norms, tokens and 1-D parameters (timm's grouping, as in MAE).
    groups = param_groups_weight_decay(model, cfg.optim.weight_decay)
    # fused on CUDA. On CPU the fused kernel is faster (benchmarks/README.md) but a run resumed after kill -9
    # then differed from an uninterrupted one (tests/test_faults.py), so CPU keeps the default loop, which is exact.
    return torch.optim.AdamW(groups, lr=effective_lr(cfg), betas=tuple(cfg.optim.betas),
                             fused=device.type == "cuda" or None)


def save_checkpoint(path: Path, model, optimizer, epoch: int, step: int, cfg: Config, history: list,
                    rng_ranks: list | None = None) -> None:
    """`rng_ranks`: every rank's generator states (ranks draw different drop paths), rank 0's by default."""
    rng_ranks = rng_ranks or [checkpoint.rng_state()]
    checkpoint.save({"mimkit": "pretrain", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": {}, "epoch": epoch, "step": step, "config": to_dict(cfg), "history": history,
                     "rng": rng_ranks[0], "rng_ranks": rng_ranks}, path)


def restore_rng(ckpt: dict, seed: int) -> None:
    """This rank's generators from a checkpoint; a rank the checkpoint has no state for (the world size
    changed) starts from rank 0's state reseeded per rank, so ranks still draw different drop paths."""
    states = ckpt.get("rng_ranks") or [ckpt["rng"]]
    checkpoint.set_rng_state(states[dist.rank()] if dist.rank() < len(states) else states[0])
    if dist.rank() >= len(states):
        torch.manual_seed(dist.rank_seed(seed) + ckpt["epoch"] + 1)


def train(cfg: Config) -> dict:
    validate(cfg)
    device = dist.init(cfg.device)
    resume_from = check_run_dir(cfg)
    torch.manual_seed(cfg.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
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

    model = place_model(build_method(cfg), device, cfg.precision)
    if dist.world_size() > 1:
        torch.manual_seed(dist.rank_seed(cfg.seed))  # but a different drop path on each rank
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
        restore_rng(ckpt, cfg.seed)
    out = write_run_dir(cfg)
    log = RunLog(out)
    if resume_from is not None:
        log(f"resumed from {resume_from} (epoch {start_epoch} done, step {step})")
    # find_unused_parameters: e.g. the encoder's mask token is unused by methods that drop masked patches
    ddp = DistributedDataParallel(model, find_unused_parameters=True) if dist.world_size() > 1 else None
    train_model = ddp or model
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
        t0, n_images, loss_sum, replaced, extra_sums = time.perf_counter(), 0, 0.0, 0, {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not dist.is_main(), leave=False,
                   file=sys.stderr, dynamic_ncols=True)
        optimizer.zero_grad(set_to_none=True)
        for it, (imgs, mask, _, rep) in enumerate(bar):
            if it % cfg.accum_iter == 0:
                lr = lr_at(epoch + it / steps_per_epoch, cfg, base_lr)
                set_lr(optimizer, lr)
            imgs = imgs.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True)
            # gradient accumulation: all-reduce the gradients once per optimizer step, not per micro-batch
            sync = ddp is None or (it + 1) % cfg.accum_iter == 0
            with (contextlib.nullcontext() if sync else ddp.no_sync()), dist.autocast(device, cfg.precision):
                outputs = train_model(imgs, mask)
            loss = outputs["loss"]
            # the mean over ranks: logged, and a NaN on any rank stops or skips the step on every rank
            loss_value = dist.all_reduce_mean(loss.item(), device)
            if not math.isfinite(loss_value):
                bad_steps += 1
                if bad_steps > cfg.optim.skip_nonfinite:
                    raise NonFiniteLossError(f"non-finite loss ({loss_value}) at step {step} (epoch {epoch + 1}, "
                                             f"iteration {it}); last good checkpoint: {last_good(ckpt_path, history)}")
                log(f"warning: skipped step {step} with loss {loss_value} "
                    f"({bad_steps}/{cfg.optim.skip_nonfinite} allowed by optim.skip_nonfinite)")
                optimizer.zero_grad(set_to_none=True)
                continue
            if backward_step(loss, it, model, optimizer, cfg.accum_iter, cfg.optim.clip_grad):
                step += 1
                if writer is not None:
                    writer.add_scalar("train/loss", loss_value, step)
                    writer.add_scalar("train/lr", lr, step)
            # Other scalars a method reports (e.g. token accuracy on masked patches) are averaged per epoch,
            # summed on the device: an .item() here would wait for the backward and optimizer step every step.
            for k, v in outputs.items():
                if k != "loss" and torch.is_tensor(v) and v.dim() == 0:
                    extra_sums[k] = extra_sums.get(k, 0.0) + v.detach().double()
            n_images += len(imgs)
            loss_sum += loss_value
            replaced += int(rep.sum())
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        seconds = time.perf_counter() - t0
        epoch_loss = loss_sum / max(steps_per_epoch, 1)  # of losses already averaged over ranks
        ips = dist.all_reduce_sum(n_images, device) / seconds
        replaced = int(dist.all_reduce_sum(replaced, device))
        extras = {k: dist.all_reduce_mean(v.item() / steps_per_epoch, device) for k, v in extra_sums.items()}
        history.append({"epoch": epoch + 1, "loss": epoch_loss, "images_per_s": ips, "seconds": seconds,
                        "replaced_images": replaced, **extras})
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {epoch_loss:.4f} lr {lr:.3g} {ips:.0f} img/s"
            + "".join(f" {k} {v:.4f}" for k, v in extras.items()))
        if writer is not None:
            for k, v in extras.items():
                writer.add_scalar(f"epoch/{k}", v, epoch + 1)
            writer.add_scalar("epoch/loss", epoch_loss, epoch + 1)
            writer.add_scalar("epoch/images_per_s", ips, epoch + 1)
            if (epoch + 1) % cfg.vis_every == 0 or epoch + 1 == cfg.epochs:
                model.eval()
                panel = model.visualize(vis_imgs, vis_mask, cfg.data.name)
                if panel is not None:
                    writer.add_image(f"{cfg.method}/{model.panel_name}", panel, epoch + 1)
        if (epoch + 1) % cfg.ckpt.every == 0 or epoch + 1 == cfg.epochs:
            rng_ranks = dist.all_gather_object(checkpoint.rng_state())  # collective: every rank takes part
            if dist.is_main():
                save_checkpoint(ckpt_path, model, optimizer, epoch, step, cfg, history, rng_ranks)
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
    base = {"epoch", "loss", "images_per_s", "seconds", "replaced_images"}
    return {"method": cfg.method, "dataset": cfg.data.name, "epochs": history[-1]["epoch"],
            "final_loss": history[-1]["loss"], "first_loss": history[0]["loss"],
            **{f"final_{k}": v for k, v in history[-1].items() if k not in base},
            "images_per_s": sum(h["images_per_s"] * h["seconds"] for h in history) / seconds,
            "train_seconds": seconds, "replaced_images": sum(h["replaced_images"] for h in history),
            "loss_history": [h["loss"] for h in history]}


def knn_probe(encoder, cfg: Config, device: torch.device, log) -> dict:
    """k-NN accuracy (DINO protocol, `mimkit probe knn`'s code) of the pretrained encoder and of a random-init
    encoder of the same shape; {"pretrained": {top1_k10, top5_k10, ...}, "random_init": {...}, "gain_points"}."""
    from mimkit.probes.features import random_encoder, split_features
    from mimkit.probes.knn import KNN_KS, knn_compare

    encoders = {"pretrained": encoder,  # random_init: the init this pretraining started from
                "random_init": random_encoder(cfg.model, cfg.data.img_size, cfg.seed).to(device)}
    return knn_compare(encoders, lambda enc, name, split: split_features(enc, cfg.data, split, device,
                                                                         limit=cfg.probe.limit, log=log),
                       KNN_KS, cfg.probe.knn_k, cfg.probe.knn_t, log=log)
