"""The rules every gradient loop shares (pretraining, tokenizer training, probes): the learning-rate schedule,
accumulation and clipping, the optimizer and where the model runs, and one epoch loop with one policy for a
NaN/Inf loss, one host sync per step (the loss, needed for that policy and the log; every other scalar is
summed on the device and read once per epoch), one way to write metrics.json, and one way to stop on SIGINT /
SIGTERM (mimkit.interrupts): after the step that is running, on every rank at the same step, with the epoch's
progress kept (`Loop.partial`) for a checkpoint from which the epoch continues exactly (`Loop.resume_at`)."""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.utils.data import Sampler

from . import checkpoint, dist, interrupts, progress
from .vit import use_fused_attention


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


def lr_at(epoch: float, cfg, base_lr: float) -> float:
    """Linear warmup from optim.warmup_start_lr (0: MAE; I-JEPA's start_lr), then half-cycle cosine to min_lr
    (MAE's per-step schedule; `epoch` is fractional)."""
    warm = cfg.optim.warmup_epochs
    if epoch < warm:
        start = getattr(cfg.optim, "warmup_start_lr", 0.0)  # the probes' optim section has no such key
        return start + (base_lr - start) * epoch / warm
    progress = (epoch - warm) / max(cfg.epochs - warm, 1e-8)
    return cfg.optim.min_lr + (base_lr - cfg.optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def effective_lr(cfg) -> float:
    return cfg.optim.blr * cfg.batch_size * cfg.accum_iter * dist.world_size() / cfg.optim.lr_batch_ref


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at lr, times its lr_scale (timm's layer-wise decay groups carry one)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def weight_decay_at(epoch: float, cfg) -> float | None:
    """With optim.weight_decay_end >= 0, half-cycle cosine from optim.weight_decay to it over the whole run, warmup
    included (I-JEPA's CosineWDSchedule: 0.04 -> 0.4); None (the default, weight_decay_end < 0): the weight decay
    stays as the optimizer was built."""
    end = getattr(cfg.optim, "weight_decay_end", -1.0)
    if end < 0:
        return None
    progress = min(epoch / cfg.epochs, 1.0)
    return end + (cfg.optim.weight_decay - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_schedule(optimizer: torch.optim.Optimizer, epoch: float, cfg, base_lr: float) -> float:
    """The lr of `epoch` (fractional) on every group (set_lr), and the scheduled weight decay, if any, on the groups
    that decay (timm's grouping leaves biases, norms and tokens at 0, and they stay there); returns the lr."""
    lr = lr_at(epoch, cfg, base_lr)
    set_lr(optimizer, lr)
    wd = weight_decay_at(epoch, cfg)
    if wd is not None:
        for g in optimizer.param_groups:
            if g["weight_decay"] > 0:
                g["weight_decay"] = wd
    return lr


def backward_step(loss: torch.Tensor, it: int, model: nn.Module, optimizer: torch.optim.Optimizer,
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


def place_model(model: nn.Module, device: torch.device, precision: str = "auto") -> nn.Module:
    """The model on its device, with the attention kernel that trains fastest in its precision there."""
    model = model.to(device)
    if device.type == "cpu" and dist.uses_bf16(device, precision):
        # The fused attention kernel's bf16 backward is slow on CPU (benchmarks/README.md); timm's plain path
        # is the same function.
        use_fused_attention(model, False)
    return model


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    # No weight decay on biases, norms, tokens and 1-D parameters (timm's grouping, as in MAE).
    groups = param_groups_weight_decay(model, cfg.optim.weight_decay)
    # fused on CUDA. On CPU a run resumed after kill -9 with the fused kernel differed from an uninterrupted one
    # (tests/test_faults.py), so CPU keeps the default loop, which is exact.
    return torch.optim.AdamW(groups, lr=effective_lr(cfg), betas=tuple(cfg.optim.betas),
                             fused=device.type == "cuda" or None)


class RunLog:
    """Prints on rank 0 and appends to <output_dir>/log.txt."""

    def __init__(self, out: Path):
        self.path = out / "log.txt"

    def __call__(self, msg: str) -> None:
        if dist.is_main():
            progress.write(msg)
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def write_metrics(out: Path, metrics: dict, log: Callable[[str], None]) -> None:
    checkpoint.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    log(f"metrics written to {out / 'metrics.json'}")


@dataclass
class Loop:
    """One gradient loop's state: `cfg` has epochs, accum_iter, precision and optim.* (blr, warmup_epochs,
    min_lr, clip_grad, and optionally skip_nonfinite: NaN/Inf steps to skip before stopping)."""
    cfg: Any
    model: nn.Module  # the parameters that are clipped
    optimizer: torch.optim.Optimizer
    device: torch.device
    steps_per_epoch: int
    log: Callable[[str], None]
    writer: Any = None  # TensorBoard SummaryWriter (rank 0) or None
    ddp: Any = None  # DistributedDataParallel wrapper: gradients are all-reduced once per optimizer step
    ckpt_path: Path | None = None  # named by a non-finite-loss stop; None: the loop keeps no checkpoint
    hint: str = ""  # appended to a non-finite-loss stop
    step: int = 0
    history: list = field(default_factory=list)
    bad_steps: int = 0
    lr: float = 0.0  # the last learning rate set
    on_step: Callable[[], None] | None = None  # after every optimizer step (pretraining: the EMA teacher's update)
    resume_at: dict | None = None  # an interrupted epoch's progress, from a checkpoint: that epoch continues from it
    partial: dict | None = None  # this epoch's progress when a signal stopped it (None: not stopped mid-epoch)
    stopped: int = 0  # the signal that stopped the run after a step (0: none)

    @property
    def base_lr(self) -> float:
        return effective_lr(self.cfg)

    def last_good(self) -> str:
        """The checkpoint a restart would resume from."""
        if self.ckpt_path is not None and self.ckpt_path.exists() and self.history:
            return f"{self.ckpt_path} (epoch {self.history[-1]['epoch']})"
        return "none yet"

    def restore(self, ckpt: dict) -> int:
        """Continue from a training checkpoint whose weights are loaded: the optimizer, step, history and an
        interrupted epoch's progress; returns the first epoch still to train."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.history, self.resume_at = ckpt["step"], ckpt.get("history", []), ckpt.get("partial")
        return ckpt["epoch"] + 1

    def resume(self, path: str | Path, kind: str, fallback: bool = True) -> int:
        """Load a `kind` training checkpoint into the model, RNG and loop; returns the first epoch still to train
        (a damaged file gives way to its .prev copy with a warning when `fallback`, i.e. resume=auto)."""
        ckpt, path = checkpoint.load_resumable(path, kind, self.log, fallback)
        self.model.load_state_dict(ckpt["model"])
        checkpoint.set_rng_state(ckpt["rng"])
        self.log(f"resumed from {path} (epoch {ckpt['epoch'] + 1} done, step {ckpt['step']})")
        return self.restore(ckpt)

    def start_of(self, epoch: int) -> int:
        """The iterations of `epoch` trained before an interruption: its batches start after them."""
        return self.resume_at["it"] if self.resume_at and self.resume_at["epoch"] == epoch else 0

    def nonfinite(self, value: float, epoch: int, it: int) -> None:
        """Stop with the step and the last good checkpoint, or skip the step while optim.skip_nonfinite allows."""
        self.bad_steps += 1
        allowed = getattr(self.cfg.optim, "skip_nonfinite", 0)
        if self.bad_steps > allowed:
            where = f"; last good checkpoint: {self.last_good()}" if self.ckpt_path is not None else ""
            raise NonFiniteLossError(f"non-finite loss ({value}) at step {self.step} (epoch {epoch + 1}, iteration "
                                     f"{it}){where}{self.hint}")
        self.log(f"warning: skipped step {self.step} with loss {value} "
                 f"({self.bad_steps}/{allowed} allowed by optim.skip_nonfinite)")
        self.optimizer.zero_grad(set_to_none=True)


def add_scalars(sums: dict, outputs: dict) -> None:
    """Add a step's scalars (0-d tensors on the device, or floats) other than the loss to `sums`."""
    for k, v in outputs.items():
        if k == "loss" or (torch.is_tensor(v) and v.dim() != 0):
            continue
        sums[k] = sums.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else float(v))


class SkipSampler(Sampler):
    """`inner`'s indices after its first `n`: the rest of an interrupted epoch (the samplers here draw each epoch's
    order from the seed and the epoch, and the data seeds each sample by its key, so the rest is the same)."""

    def __init__(self, inner: Sampler, n: int):
        self.inner, self.n = inner, n

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.n, None)

    def __len__(self) -> int:
        return max(len(self.inner) - self.n, 0)


def quiet_iter(loader: Iterable) -> Iterator:
    """iter(loader) without its draw from the global generator (a DataLoader's workers' base seed): where a run
    that was never interrupted draws nothing, so a resumed run's later draws (drop path) stay the same."""
    state = torch.get_rng_state()
    batches = iter(loader)
    torch.set_rng_state(state)
    return batches


def reduce_loss(loss: torch.Tensor, device: torch.device) -> tuple[float, int]:
    """(the loss's mean over ranks, the signal that stops the run on any rank, 0 if none): one collective."""
    signum = interrupts.pending()
    if dist.world_size() == 1:
        return loss.item(), signum
    t = torch.tensor([loss.item(), signum == signal.SIGINT, signum == signal.SIGTERM], dtype=torch.float64,
                     device=device)
    torch.distributed.all_reduce(t)
    stop = signal.SIGTERM if t[2] > 0 else signal.SIGINT if t[1] > 0 else 0
    return t[0].item() / dist.world_size(), int(stop)


def train_one_epoch(loop: Loop, batches: Iterable, epoch: int, forward: Callable[[Any], dict]) -> dict | None:
    """One epoch of `forward(batch) -> {"loss": scalar, other scalars...}` (batch[0]: the inputs) with the
    schedule, accumulation, clipping and NaN policy above. Returns {"epoch", "loss", the other scalars'
    means, "images_per_s", "seconds"} (means over the epoch's steps and over ranks), or None when a signal
    stopped it after an optimizer step before the epoch's end (loop.partial, loop.stopped). An epoch with
    loop.resume_at continues from it: `batches` are the ones after its `it` iterations."""
    cfg, device, base_lr = loop.cfg, loop.device, loop.base_lr
    start = loop.start_of(epoch)
    state = loop.resume_at if start else {"loss_sum": 0.0, "sums": {}, "n_images": 0, "seconds": 0.0}
    loop.resume_at, loss_sum, n_images = None, state["loss_sum"], state["n_images"]
    sums = {k: v.to(device) if torch.is_tensor(v) else v for k, v in state["sums"].items()}
    t0, lr = time.perf_counter() - state["seconds"], 0.0
    bar = progress.bar(batches, f"epoch {epoch + 1}/{cfg.epochs}", enabled=dist.is_main())
    loop.optimizer.zero_grad(set_to_none=True)
    for it, batch in enumerate(bar, start):
        if it % cfg.accum_iter == 0:
            lr = set_schedule(loop.optimizer, epoch + it / loop.steps_per_epoch, cfg, base_lr)
        sync = loop.ddp is None or (it + 1) % cfg.accum_iter == 0
        with (contextlib.nullcontext() if sync else loop.ddp.no_sync()), dist.autocast(device, cfg.precision):
            outputs = forward(batch)
        loss = outputs["loss"]
        # the mean over ranks: logged, and a NaN on any rank stops or skips the step on every rank
        loss_value, stop = reduce_loss(loss, device)
        if not math.isfinite(loss_value):
            loop.nonfinite(loss_value, epoch, it)
            continue
        stepped = backward_step(loss, it, loop.model, loop.optimizer, cfg.accum_iter, cfg.optim.clip_grad)
        if stepped:
            loop.step += 1
            if loop.on_step is not None:
                loop.on_step()
            if loop.writer is not None:
                loop.writer.add_scalar("train/loss", loss_value, loop.step)
                loop.writer.add_scalar("train/lr", lr, loop.step)
        add_scalars(sums, outputs)
        n_images += len(batch[0])
        loss_sum += loss_value
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if stepped and stop:
            loop.stopped = stop
            if it + 1 < loop.steps_per_epoch:
                loop.partial = {"epoch": epoch, "it": it + 1, "loss_sum": loss_sum, "sums": sums,
                                "n_images": n_images, "seconds": time.perf_counter() - t0}
                return None
            break
    loop.lr = lr
    seconds = time.perf_counter() - t0
    steps = max(loop.steps_per_epoch, 1)
    means = {k: dist.all_reduce_mean(float(v) / steps, device) for k, v in sums.items()}
    return {"epoch": epoch + 1, "loss": loss_sum / steps, **means,
            "images_per_s": dist.all_reduce_sum(n_images, device) / seconds, "seconds": seconds}
