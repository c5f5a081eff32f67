"""The supervised training of the linear probe and fine-tuning: the shared loop (mimkit.loop: warmup + cosine lr
per step times each group's `lr_scale` for layer-wise decay, accumulation, clipping, autocast as `precision`
says, the NaN/Inf policy), validation with top-1 / top-5, TensorBoard and log lines."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from timm.utils import accuracy
from torch import nn

from mimkit.dist import autocast
from mimkit.loop import Loop, train_one_epoch

from .context import ProbeRun


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


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Callable[[int], Iterable], steps_per_epoch: int,
        loss_fn: Callable, validate: Callable[[], dict], run: ProbeRun, eval_every: int = 1,
        on_eval: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train `model` on `batches(epoch)` of (inputs, labels) with loss_fn(inputs, labels) for run.cfg.epochs in the
    shared loop (mimkit.loop); validate every `eval_every` epochs and at the end, calling on_eval(epoch,
    accuracies). Returns the history."""
    cfg, device = run.cfg, run.device
    # no checkpoint to resume from: a non-finite loss stops before the step, the weights (and best.pt) stay finite
    loop = Loop(cfg, model, optimizer, device, steps_per_epoch, run.log, writer=run.writer,
                hint="; lower optim.blr or set optim.clip_grad")

    def forward(batch):
        x, y = batch
        return {"loss": loss_fn(x.to(device, non_blocking=True), y.to(device, non_blocking=True))}

    for epoch in range(cfg.epochs):
        model.train()
        record = train_one_epoch(loop, batches(epoch), epoch, forward)
        entry = {"epoch": epoch + 1, "loss": record["loss"]}
        run.writer.add_scalar("epoch/loss", entry["loss"], epoch + 1)
        if (epoch + 1) % eval_every == 0 or epoch + 1 == cfg.epochs:
            entry.update(validate())
            run.writer.add_scalar("test/top1", entry["top1"], epoch + 1)
            run.writer.add_scalar("test/top5", entry["top5"], epoch + 1)
            if on_eval is not None:
                on_eval(epoch + 1, entry)
        loop.history.append(entry)
        if "top1" in entry and ((epoch + 1) % max(eval_every, 10) == 0 or epoch + 1 == cfg.epochs or cfg.epochs <= 10):
            run.log(f"epoch {epoch + 1}/{cfg.epochs} loss {entry['loss']:.4f} lr {loop.lr:.3g} "
                    f"top-1 {entry['top1']:.2f}% top-5 {entry['top5']:.2f}%")
    return loop.history


def summarize(history: list[dict]) -> dict:
    """Final and best validation accuracy of a history."""
    evals = [h for h in history if "top1" in h]
    best = max(evals, key=lambda h: h["top1"])
    return {"top1": evals[-1]["top1"], "top5": evals[-1]["top5"], "best_top1": best["top1"],
            "best_top5": best["top5"], "best_epoch": best["epoch"], "history": history}
