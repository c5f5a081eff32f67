"""The supervised training of the linear probe and fine-tuning: the shared loop (mimkit.loop: warmup + cosine lr
per step times each group's `lr_scale` for layer-wise decay, accumulation, clipping, autocast as `precision`
says, the NaN/Inf policy), validation with top-1 / top-5, TensorBoard and log lines; the training data seeded per
sample and epoch, and checkpoints/resume.pt, from which an interrupted run continues exactly (resume=auto)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from timm.utils import accuracy
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mimkit import checkpoint, interrupts
from mimkit.config import ConfigError, to_dict
from mimkit.data import EpochSampler, MaskedImages, make_loader
from mimkit.dist import autocast
from mimkit.loop import Loop, SkipSampler, quiet_iter, train_one_epoch

from .context import ProbeRun


RESUME = "resume.pt"  # the training checkpoint of the probe's own head or model (a baseline's: resume_<name>.pt)


class Prefixed:
    """A TensorBoard writer whose tags carry a prefix (a baseline's curves beside the probe's own)."""

    def __init__(self, writer, prefix: str):
        self.writer, self.prefix = writer, prefix

    def add_scalar(self, tag: str, *args, **kwargs) -> None:
        self.writer.add_scalar(self.prefix + tag, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.writer, name)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, precision: str = "auto") -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of `model` over (inputs, labels) batches."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        with autocast(device, precision):
            logits.append(model(x.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    model.train(was_training)
    logits, labels = torch.cat(logits), torch.cat(labels)
    top1, top5 = accuracy(logits, labels, topk=(1, min(5, logits.shape[1])))
    return {"top1": top1.item(), "top5": top5.item()}


def save_state(loop: Loop, run: ProbeRun, epoch: int, partial: dict | None = None) -> None:
    """loop.ckpt_path after epoch `epoch` (and `partial`: the next epoch's progress when a signal stopped it) with
    what an exact resume needs: weights, optimizer, step, history, generators (the lr schedule is a function of the
    step); the file it replaces stays as <name>.prev.pt."""
    checkpoint.save({"mimkit": "probe_train", "model": loop.model.state_dict(),
                     "optimizer": loop.optimizer.state_dict(), "epoch": epoch, "step": loop.step,
                     "history": loop.history, "config": to_dict(run.cfg), "rng": checkpoint.rng_state(),
                     **({"partial": partial} if partial else {})}, loop.ckpt_path, keep_previous=True)


def resume(loop: Loop, run: ProbeRun) -> int:
    """The first epoch still to train: 0, or the one after loop.ckpt_path's when the run left it (the run
    directory keeps it only with resume=auto; a damaged file gives way to its .prev copy, with a warning)."""
    if loop.ckpt_path is None or not loop.ckpt_path.is_file():
        return 0
    return loop.resume(loop.ckpt_path, "probe_train")


def stop(loop: Loop, where: str) -> None:
    """End a run a signal stopped (its checkpoint written): mimkit.interrupts prints how to resume."""
    raise interrupts.Interrupted(loop.stopped, str(loop.ckpt_path), where)


def epoch_batches(loader: DataLoader, epoch: int, skip: int, run: ProbeRun) -> Iterable:
    """The (inputs, labels) of a loader over EpochSampler-keyed samples (per-sample seeded views,
    mimkit.data.MaskedImages) at `epoch`: all of them, or those after the first `skip` batches of an epoch a
    signal interrupted, drawing from the global generator only where an uninterrupted run draws
    (mimkit.engine.epoch_batches)."""
    loader.sampler.set_epoch(epoch)
    if skip:
        loader = make_loader(loader.dataset, run.cfg.batch_size, run.cfg.data, drop_last=True,
                             sampler=SkipSampler(loader.sampler, skip * run.cfg.batch_size),
                             pin_memory=run.device.type == "cuda")
    batches = quiet_iter(loader) if skip or (loader.num_workers > 0 and epoch > 0) else loader
    return ((b[0], b[2]) for b in batches)


def seeded_loader(dataset: Dataset, transform, run: ProbeRun) -> DataLoader:
    """Training views of `dataset` through `transform`, seeded per (seed, epoch, index), reshuffled per epoch,
    full batches (an epoch continues exactly after a resume: `epoch_batches`)."""
    cfg = run.cfg
    views = MaskedImages(dataset, transform, no_mask, cfg.seed, cfg.data.skip_corrupt)
    sampler = EpochSampler(len(views), 1, 0, cfg.seed, shuffle=True, drop_last=True)
    loader = make_loader(views, cfg.batch_size, cfg.data, sampler=sampler, drop_last=True,
                         pin_memory=run.device.type == "cuda")
    if len(loader) == 0:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(views)} training images; lower batch_size")
    return loader


def no_mask(generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.bool)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Callable[[int, int], Iterable],
        steps_per_epoch: int, loss_fn: Callable, validate: Callable[[], dict], run: ProbeRun, eval_every: int = 1,
        on_eval: Callable[[int, dict, list], None] | None = None, ckpt_name: str = "") -> list[dict]:
    """Train `model` on `batches(epoch, skip)` of (inputs, labels) (skip: the batches of the epoch already
    trained) with loss_fn(inputs, labels) for run.cfg.epochs in the shared loop (mimkit.loop); validate every
    `eval_every` epochs and at the end, calling on_eval(epoch, accuracies, history so far). With `ckpt_name`:
    checkpoints/<ckpt_name> after every epoch, resumed from when present, and SIGINT / SIGTERM stop after a step
    with a checkpoint (mimkit.interrupts). Returns the history."""
    cfg, device = run.cfg, run.device
    loop = Loop(cfg, model, optimizer, device, steps_per_epoch, run.log, writer=run.writer,
                ckpt_path=run.out / "checkpoints" / ckpt_name if ckpt_name else None,
                hint="; lower optim.blr or set optim.clip_grad")

    def forward(batch):
        x, y = batch
        return {"loss": loss_fn(x.to(device, non_blocking=True), y.to(device, non_blocking=True))}

    start = resume(loop, run)
    with interrupts.armed() if ckpt_name else contextlib.nullcontext():
        for epoch in range(start, cfg.epochs):
            model.train()
            record = train_one_epoch(loop, batches(epoch, loop.start_of(epoch)), epoch, forward)
            if record is None:
                save_state(loop, run, epoch - 1, loop.partial)
                stop(loop, f"step {loop.step} (epoch {epoch + 1}, iteration {loop.partial['it']})")
            end_epoch(loop, run, epoch, record["loss"], validate, eval_every, on_eval)
            if ckpt_name:
                save_state(loop, run, epoch)
            if loop.stopped and epoch + 1 < cfg.epochs:
                stop(loop, f"step {loop.step} (end of epoch {epoch + 1})")
    return loop.history


def end_epoch(loop: Loop, run: ProbeRun, epoch: int, loss: float, validate: Callable[[], dict], eval_every: int,
              on_eval: Callable[[int, dict, list], None] | None) -> None:
    """The epoch's entry in loop.history: its loss, and every `eval_every` epochs (and at the end) the
    validation accuracy, logged and handed to on_eval."""
    cfg = run.cfg
    entry = {"epoch": epoch + 1, "loss": loss}
    run.writer.add_scalar("epoch/loss", entry["loss"], epoch + 1)
    if (epoch + 1) % eval_every == 0 or epoch + 1 == cfg.epochs:
        entry.update(validate())
        run.writer.add_scalar("test/top1", entry["top1"], epoch + 1)
        run.writer.add_scalar("test/top5", entry["top5"], epoch + 1)
        if on_eval is not None:
            on_eval(epoch + 1, entry, loop.history)
    loop.history.append(entry)
    if "top1" in entry and ((epoch + 1) % max(eval_every, 10) == 0 or epoch + 1 == cfg.epochs or cfg.epochs <= 10):
        run.log(f"epoch {epoch + 1}/{cfg.epochs} loss {entry['loss']:.4f} lr {loop.lr:.3g} "
                f"top-1 {entry['top1']:.2f}% top-5 {entry['top5']:.2f}%")


def summarize(history: list[dict]) -> dict:
    """Final and best validation accuracy of a history."""
    evals = [h for h in history if "top1" in h]
    best = max(evals, key=lambda h: h["top1"])
    return {"top1": evals[-1]["top1"], "top5": evals[-1]["top5"], "best_top1": best["top1"],
            "best_top5": best["top5"], "best_epoch": best["epoch"], "history": history}
