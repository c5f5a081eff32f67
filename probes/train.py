"""The supervised epoch loop shared by the linear probe and fine-tuning: per-step warmup + cosine lr (times each
group's `lr_scale`, for layer-wise decay), gradient accumulation and clipping, bf16 autocast as `precision` says,
validation with top-1 / top-5, TensorBoard and log lines."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import torch
from timm.utils import accuracy
from torch import nn

from mimkit.dist import autocast
from mimkit.engine import NonFiniteLossError, backward_step, effective_lr, lr_at, set_lr

if TYPE_CHECKING:
    from .run import ProbeRun


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
        loss_fn: Callable, validate: Callable[[], dict], run: "ProbeRun", eval_every: int = 1,
        on_eval: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train `model` on `batches(epoch)` of (inputs, labels) with loss_fn(inputs, labels) for run.cfg.epochs;
    validate every `eval_every` epochs and at the end, calling on_eval(epoch, accuracies). Returns the history."""
    cfg, device = run.cfg, run.device
    base_lr, history, step, lr = effective_lr(cfg), [], 0, 0.0
    for epoch in range(cfg.epochs):
        model.train()
        loss_sum, n = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        for it, (x, y) in enumerate(batches(epoch)):
            if it % cfg.accum_iter == 0:
                lr = lr_at(epoch + it / steps_per_epoch, cfg, base_lr)
                set_lr(optimizer, lr)
            with autocast(device, cfg.precision):
                loss = loss_fn(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            if not torch.isfinite(loss):  # before the step: the weights (and any best.pt) stay finite
                raise NonFiniteLossError(f"non-finite probe loss ({loss.item()}) at step {step} (epoch {epoch + 1}); "
                                         f"lower optim.blr or set optim.clip_grad")
            if backward_step(loss, it, model, optimizer, cfg.accum_iter, cfg.optim.clip_grad):
                step += 1
                run.writer.add_scalar("train/lr", lr, step)
            loss_sum, n = loss_sum + loss.item(), n + 1
        entry = {"epoch": epoch + 1, "loss": loss_sum / max(n, 1)}
        run.writer.add_scalar("train/loss", entry["loss"], epoch + 1)
        if (epoch + 1) % eval_every == 0 or epoch + 1 == cfg.epochs:
            entry.update(validate())
            run.writer.add_scalar("test/top1", entry["top1"], epoch + 1)
            run.writer.add_scalar("test/top5", entry["top5"], epoch + 1)
            if on_eval is not None:
                on_eval(epoch + 1, entry)
        history.append(entry)
        if "top1" in entry and ((epoch + 1) % max(eval_every, 10) == 0 or epoch + 1 == cfg.epochs or cfg.epochs <= 10):
            run.log(f"epoch {epoch + 1}/{cfg.epochs} loss {entry['loss']:.4f} lr {lr:.3g} "
                    f"top-1 {entry['top1']:.2f}% top-5 {entry['top5']:.2f}%")
    return history


def summarize(history: list[dict]) -> dict:
    """Final and best validation accuracy of a history."""
    evals = [h for h in history if "top1" in h]
    best = max(evals, key=lambda h: h["top1"])
    return {"top1": evals[-1]["top1"], "top5": evals[-1]["top5"], "best_top1": best["top1"],
            "best_top5": best["top5"], "best_epoch": best["epoch"], "history": history}
