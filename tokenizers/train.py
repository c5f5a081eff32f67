"""`mimkit tokenizer train`: build the kind named by `kind` (mimkit.tokenizers.TOKENIZERS) and train it with its
training step: through the shared gradient loop (mimkit.loop) or its own fit (k-means), in the run-directory
contract.

<output_dir>/tokenizer.pt (the file methods load with target.tokens.tokenizer=...), config.yaml, log.txt, tb/,
metrics.json (codebook usage and perplexity on the held-out split, losses, time) and, for the kinds trained by
gradient steps, checkpoints/last.pt from which resume=auto continues.
"""
from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from mimkit import checkpoint, dist, interrupts, rundir
from mimkit.config import ConfigError, to_dict
from mimkit.data import (EpochSampler, MaskedImages, Transformed, build_dataset, eval_transform, make_loader,
                         pretrain_transform)
from mimkit.dist import autocast
from mimkit.loop import Loop, RunLog, SkipSampler, build_optimizer, quiet_iter, train_one_epoch, write_metrics
from mimkit.teachers import Teacher, load_teacher

from .base import GradientTraining, Tokenizer, Training, codebook_stats, tokenizer_class
from .config import validate

# keys that may change when a run is resumed
RESUMABLE_CHANGES = ("epochs", "resume", "overwrite", "output_dir", "device", "data.num_workers", "data.root",
                     "data.test_limit", "vis_every", "ckpt.every")


def resolve_output_dir(cfg) -> Path:
    if not cfg.output_dir:
        cfg.output_dir = f"runs/tokenizer_{cfg.kind}_{cfg.data.name}"
    return Path(cfg.output_dir)


def check_run_dir(cfg) -> Path | None:
    """The shared run-directory checks (mimkit.rundir), plus: a finished k-means / imported run (a tokenizer
    and no training checkpoint) is never redone silently. Returns the checkpoint to resume from."""
    out = resolve_output_dir(cfg)
    if (out / "tokenizer.pt").exists() and not (out / "checkpoints" / "last.pt").exists() and not cfg.overwrite:
        raise ConfigError(f"output_dir {out} already holds a tokenizer; use overwrite=true to start afresh "
                          f"or another output_dir")
    return rundir.check(out, cfg, cfg.resume, cfg.overwrite, RESUMABLE_CHANGES)


def load_cfg_teacher(cfg) -> Teacher | None:
    """The frozen teacher of `teacher.*` when the kind needs one with this config (None otherwise)."""
    if not tokenizer_class(cfg.kind).needs_teacher(cfg):
        return None
    t = cfg.teacher
    return load_teacher(t.name, t.weights, t.img_size, t.layer)


@dataclass
class TokenizerRun:
    """What training and the final evaluation need, made by `setup`."""
    cfg: Any
    device: torch.device
    out: Path
    log: RunLog
    writer: Any  # TensorBoard SummaryWriter
    training: Training  # the kind's training step; training.tok is the tokenizer
    train_set: Dataset
    test_loader: DataLoader
    resume_from: Path | None

    @property
    def tok(self) -> Tokenizer:
        return self.training.tok


def setup(cfg) -> TokenizerRun:
    """Checks, data, teacher and tokenizer first (a bad input leaves no files behind), then the run directory."""
    validate(cfg)
    device = dist.init(cfg.device)
    out = resolve_output_dir(cfg)
    resume_from = check_run_dir(cfg)
    train_set = build_dataset(cfg.data, "train", cfg.data.limit)
    test_set = Transformed(build_dataset(cfg.data, "test", cfg.data.test_limit), eval_transform(cfg.data))
    teacher = load_cfg_teacher(cfg)
    torch.manual_seed(cfg.seed)
    tok = tokenizer_class(cfg.kind).build(cfg, teacher, device)
    training = tok.trainer(cfg, teacher)
    rundir.write(out, cfg, cfg.overwrite, rundir.RUN_FILES + ("tokenizer.pt",))
    from torch.utils.tensorboard import SummaryWriter  # slow to import: only when a run starts
    return TokenizerRun(cfg, device, out, RunLog(out), SummaryWriter(str(out / "tb")), training, train_set,
                        make_loader(test_set, 256, cfg.data), resume_from)


@torch.no_grad()
def evaluate(training: Training, loader: DataLoader, device: torch.device, precision: str = "auto") -> dict:
    """Codebook usage / perplexity of the ids of the held-out split, plus the kind's own held-out metrics."""
    tok = training.tok
    was_training = tok.training
    tok.eval()
    ids, sums, n = [], defaultdict(float), 0
    for imgs, _ in loader:
        imgs = imgs.to(device, non_blocking=True)
        with autocast(device, precision):
            batch_ids, m = training.evaluate(imgs)
        ids.append(batch_ids.cpu())
        for key, v in m.items():
            sums[key] += v * len(imgs)
        n += len(imgs)
    tok.train(was_training)
    return {**codebook_stats(torch.cat(ids), tok.vocab_size), **{k: v / n for k, v in sums.items()}}


def _no_mask(generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.bool)


def train_loader(run: TokenizerRun) -> tuple[EpochSampler, DataLoader]:
    """Augmented training views (the pretraining transform, no masks), reshuffled per epoch, full batches."""
    cfg = run.cfg
    dataset = MaskedImages(run.train_set, pretrain_transform(cfg.data), _no_mask, cfg.seed, cfg.data.skip_corrupt)
    sampler = EpochSampler(len(dataset), 1, 0, cfg.seed, shuffle=True, drop_last=True)
    loader = make_loader(dataset, cfg.batch_size, cfg.data, sampler=sampler, drop_last=True,
                         pin_memory=run.device.type == "cuda")
    if len(loader) == 0:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(dataset)} training images; lower batch_size")
    return sampler, loader


def resume(run: TokenizerRun, loop: Loop) -> int:
    """Load run.resume_from into the tokenizer, optimizer and loop; returns the first epoch still to train (an
    epoch a signal interrupted continues where it stopped; resume=auto falls back to last.prev.pt when last.pt is
    damaged)."""
    if run.resume_from is None:
        return 0
    return loop.resume(run.resume_from, "tokenizer_train", run.cfg.resume == "auto")


def train_epoch(run: TokenizerRun, loop: Loop, loader: DataLoader, epoch: int) -> dict | None:
    """One epoch of the kind's loss through the shared loop (or the rest of one a signal interrupted); the loss
    sees the share of training done. None: a signal stopped it (mimkit.loop.train_one_epoch)."""
    cfg, steps, skip = run.cfg, loop.steps_per_epoch, loop.start_of(epoch)
    run.tok.train()
    its = itertools.count(skip)
    if skip:
        loader = make_loader(loader.dataset, cfg.batch_size, cfg.data, drop_last=True,
                             sampler=SkipSampler(loader.sampler, skip * cfg.batch_size),
                             pin_memory=run.device.type == "cuda")
    # the loader's draw from the global generator where an uninterrupted run draws (mimkit.engine.epoch_batches)
    batches = quiet_iter(loader) if skip or (loader.num_workers > 0 and epoch > 0) else loader

    def forward(batch) -> dict:
        progress = (epoch * steps + next(its)) / (cfg.epochs * steps)
        return run.training.loss(batch[0].to(run.device, non_blocking=True), progress)

    return train_one_epoch(loop, batches, epoch, forward)


def evaluate_and_draw(run: TokenizerRun, epoch: int, vis_imgs: torch.Tensor) -> dict:
    """Held-out metrics (as val_<name>) and the kind's panel of `vis_imgs`, both to TensorBoard."""
    held = evaluate(run.training, run.test_loader, run.device, run.cfg.precision)
    for k, v in held.items():
        run.writer.add_scalar(f"val/{k}", v, epoch + 1)
    run.tok.eval()
    panel = run.training.panel(vis_imgs)
    if panel is not None:
        run.writer.add_image(f"{run.cfg.kind}/original_reconstruction", panel, epoch + 1)
    return {f"val_{k}": v for k, v in held.items()}


def check_restart_window(cfg, steps: int, log: Callable[[str], None]) -> None:
    """Warn when an EMA codebook marks a code dead too late for this run: a code unused from some step on falls
    below `restart` x the mean usage after ln(restart) / ln(decay) steps (69 at restart 0.5, decay 0.99), and a
    codebook that collapses in a run shorter than that never recovers (LaVIT's in the CIFAR-10 study did: see
    README). The suggested decay puts the window at a tenth of the run."""
    section = getattr(cfg, cfg.kind, None)
    restart, decay = getattr(section, "restart", 0.0), getattr(section, "decay", 0.0)
    if not 0 < restart < 1 or not 0 < decay < 1:
        return
    window = math.log(restart) / math.log(decay)
    if window > steps / 2:
        suggest = max(0.5, math.floor(100 * restart ** (10 / steps)) / 100)
        log(f"warning: {cfg.kind}.decay={decay} restarts a code only after {window:.0f} unused steps, more than "
            f"half of this run's {steps}: a collapsing codebook will not recover; for a run this short set "
            f"{cfg.kind}.decay={suggest}")


def log_epoch(run: TokenizerRun, loop: Loop, record: dict) -> None:
    """The epoch's log line and its per-epoch TensorBoard scalars (epoch/<name>)."""
    skip = ("epoch", "seconds", "images_per_s", "val_codes_used")
    run.log(f"epoch {record['epoch']}/{run.cfg.epochs} "
            + " ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in skip)
            + f" lr {loop.lr:.3g} {record['images_per_s']:.0f} img/s")
    for k, v in record.items():
        if k not in ("epoch", "seconds") and not k.startswith("val_"):
            run.writer.add_scalar(f"epoch/{k}", v, record["epoch"])


def save_checkpoint(run: TokenizerRun, loop: Loop, epoch: int, partial: dict | None = None) -> None:
    """checkpoints/last.pt after epoch `epoch` (and `partial`: the next epoch's progress when a signal stopped
    it); the file it replaces stays as last.prev.pt."""
    checkpoint.save({"mimkit": "tokenizer_train", "model": run.tok.state_dict(),
                     "optimizer": loop.optimizer.state_dict(), "epoch": epoch, "step": loop.step,
                     "history": loop.history, "config": to_dict(run.cfg), "rng": checkpoint.rng_state(),
                     **({"partial": partial} if partial else {})}, loop.ckpt_path, keep_previous=True)


def stop(run: TokenizerRun, loop: Loop, where: str) -> None:
    """End a run a signal stopped (its checkpoint written): mimkit.interrupts prints how to resume."""
    run.writer.close()
    raise interrupts.Interrupted(loop.stopped, str(loop.ckpt_path), where)


def end_epoch(run: TokenizerRun, loop: Loop, epoch: int, record: dict, vis_imgs: torch.Tensor) -> None:
    """Held-out evaluation and panels every vis_every epochs, the log, checkpoints/last.pt every ckpt.every."""
    cfg, last = run.cfg, epoch + 1 == run.cfg.epochs
    if (epoch + 1) % cfg.vis_every == 0 or last:
        record.update(evaluate_and_draw(run, epoch, vis_imgs))
    loop.history.append(record)
    log_epoch(run, loop, record)
    if (epoch + 1) % cfg.ckpt.every == 0 or last or loop.stopped:
        save_checkpoint(run, loop, epoch)


def train_gradient(run: TokenizerRun) -> list[dict]:
    """The kind's loss through the shared loop (AdamW, warmup + cosine lr per step, clipping, NaN policy),
    resumable from checkpoints/last.pt; returns the per-epoch history."""
    cfg, tok = run.cfg, run.tok
    test_set = run.test_loader.dataset
    vis_imgs = torch.stack([test_set[i][0] for i in range(min(8, len(test_set)))]).to(run.device)
    sampler, loader = train_loader(run)
    loop = Loop(cfg, tok, build_optimizer(tok, cfg, run.device), run.device, len(loader), run.log,
                writer=run.writer, ckpt_path=run.out / "checkpoints" / "last.pt")
    start = resume(run, loop)
    run.log(f"{cfg.kind} tokenizer on {cfg.data.name}: {len(run.train_set)} images, {len(loader)} steps/epoch, "
            f"lr {loop.base_lr:.3g}, {sum(p.numel() for p in tok.parameters() if p.requires_grad) / 1e6:.2f}M "
            f"trainable parameters")
    check_restart_window(cfg, cfg.epochs * len(loader), run.log)
    with interrupts.armed():
        for epoch in range(start, cfg.epochs):
            sampler.set_epoch(epoch)
            record = train_epoch(run, loop, loader, epoch)
            if record is None:
                save_checkpoint(run, loop, epoch - 1, loop.partial)
                stop(run, loop, f"step {loop.step} (epoch {epoch + 1}, iteration {loop.partial['it']})")
            end_epoch(run, loop, epoch, record, vis_imgs)
            if loop.stopped and epoch + 1 < cfg.epochs:
                stop(run, loop, f"step {loop.step} (end of epoch {epoch + 1})")
    return loop.history


def heldout(run: TokenizerRun, history: list[dict]) -> dict:
    """The final held-out metrics: those of the last epoch when it was just evaluated, else evaluated now."""
    last = history[-1] if history else {}
    if last.get("epoch") == run.cfg.epochs and "val_usage" in last:
        return {k[len("val_"):]: v for k, v in last.items() if k.startswith("val_")}
    return evaluate(run.training, run.test_loader, run.device, run.cfg.precision)


def finish(run: TokenizerRun, history: list[dict], fit: dict, t0: float) -> dict:
    """Save tokenizer.pt, write metrics.json and the held-out scalars; returns the metrics."""
    cfg, tok, path = run.cfg, run.tok, run.out / "tokenizer.pt"
    held = heldout(run, history)
    tok.save(path, {"heldout": held})  # `mimkit tokenizer info` shows them
    metrics = {"kind": cfg.kind, "dataset": cfg.data.name, "vocab_size": tok.vocab_size, "grid": tok.grid,
               "heldout_images": len(run.test_loader.dataset), **{f"heldout_{k}": v for k, v in held.items()},
               **fit, "seconds": time.perf_counter() - t0, "tokenizer": str(path)}
    if history:
        metrics.update(first_loss=history[0]["loss"], final_loss=history[-1]["loss"],
                       loss_history=[h["loss"] for h in history])
    for k, v in held.items():
        run.writer.add_scalar(f"heldout/{k}", v, 0)
    run.writer.close()
    write_metrics(run.out, metrics, run.log)
    run.log(f"{cfg.kind} tokenizer written to {path}: held-out codebook usage {100 * held['usage']:.1f}% "
            f"({held['codes_used']}/{tok.vocab_size}), perplexity {held['perplexity']:.1f}")
    return metrics


def train_tokenizer(cfg) -> dict:
    """Train the tokenizer of a resolved config (mimkit.tokenizers.config.tokenizer_config); returns metrics."""
    run = setup(cfg)
    t0 = time.perf_counter()
    if isinstance(run.training, GradientTraining):
        history, fit = train_gradient(run), {}
    else:
        history, fit = [], run.training.fit(run.train_set, run.device, run.log)
    return finish(run, history, fit, t0)
