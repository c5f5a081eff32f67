"""Pretraining, for every method: setup (data, model, optimizer, resume, DDP, logging), one epoch at a time
through the shared loop (mimkit.loop), the epoch's log, panels and atomic checkpoint, then the final panel and
metrics.json. Exact resume: checkpoints hold the model, optimizer, step, history and every rank's generators."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, dist, interrupts, rundir
from .config import ConfigError, to_dict
from .convert import init_from
from .data import (EpochSampler, MaskedImages, Transformed, build_dataset, dataset_stats, eval_transform, make_loader,
                   num_workers, pretrain_transform)
from .images import normalize_uint8
from .loop import (Loop, RunLog, SkipSampler, build_optimizer, place_model, quiet_iter, train_one_epoch,
                   write_metrics)
from .masking import build_mask_generator
from .methods import build_method, validate
from .writers import open_writers

# Keys that may change when a run is resumed (they do not change what has been trained so far).
RESUMABLE_CHANGES = ("epochs", "resume", "overwrite", "output_dir", "device", "data.num_workers", "data.root",
                     "data.test_limit", "vis_every", "ckpt.every", "probe.")

# What runs after pretraining on rank 0 (e.g. the CLI's closing k-NN probe): (model, cfg, device, log) -> metrics
# The per-epoch record's own keys; any other key is a scalar the method reported (an epoch mean).
RECORD_KEYS = ("epoch", "loss", "images_per_s", "seconds", "replaced_images")

AfterTraining = Callable[[torch.nn.Module, Any, torch.device, Callable[[str], None]], dict]


def resolve_output_dir(cfg) -> Path:
    if not cfg.output_dir:
        cfg.output_dir = f"runs/{cfg.method}_{cfg.data.name}"
    return Path(cfg.output_dir)


def check_run_dir(cfg) -> Path | None:
    return rundir.check(resolve_output_dir(cfg), cfg, cfg.resume, cfg.overwrite, RESUMABLE_CHANGES)


def write_run_dir(cfg) -> Path:
    return rundir.write(resolve_output_dir(cfg), cfg, cfg.overwrite, rundir.RUN_FILES + ("reconstructions.png",))


def save_checkpoint(path: Path, model, optimizer, epoch: int, step: int, cfg, history: list,
                    rng_ranks: list | None = None, partial: dict | None = None) -> None:
    """`rng_ranks`: every rank's generator states (ranks draw different drop paths), rank 0's by default.
    `partial`: the progress of epoch `epoch + 1`, stopped by a signal (mimkit.loop.Loop.partial). The file it
    replaces stays as last.prev.pt."""
    rng_ranks = rng_ranks or [checkpoint.rng_state()]
    checkpoint.save({"mimkit": "pretrain", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "epoch": epoch, "step": step, "config": to_dict(cfg), "history": history,
                     "rng": rng_ranks[0], "rng_ranks": rng_ranks, **({"partial": partial} if partial else {})},
                    path, keep_previous=True)


def restore_rng(ckpt: dict, seed: int) -> None:
    """This rank's generators from a checkpoint; a rank the checkpoint has no state for (the world size
    changed) starts from rank 0's state reseeded per rank, so ranks still draw different drop paths."""
    states = ckpt.get("rng_ranks") or [ckpt["rng"]]
    checkpoint.set_rng_state(states[dist.rank()] if dist.rank() < len(states) else states[0])
    if dist.rank() >= len(states):
        torch.manual_seed(dist.rank_seed(seed) + ckpt["epoch"] + 1)


@dataclass
class PretrainRun:
    """Everything `train_one_epoch` and `finalize` need, made by `setup`."""
    cfg: Any
    device: torch.device
    out: Path
    log: RunLog
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model, wrapped by DDP and torch.compile where asked
    sampler: EpochSampler
    loader: torch.utils.data.DataLoader
    loop: Loop
    vis: tuple[torch.Tensor, torch.Tensor]  # fixed images and masks of the panels
    start_epoch: int = 0


def build_data(cfg, device: torch.device):
    """(training images, sampler, loader, mask generator); per-sample seeded augmentation and masks. Images from
    files stay uint8 through the loader: `forward` normalizes them on the device."""
    mask_gen = build_mask_generator(cfg.mask, cfg.data.img_size // cfg.model.patch_size, cfg.model.patch_size)
    transform = pretrain_transform(cfg.data, normalize=False)
    if cfg.data.name == "webdataset":  # streamed shards: the loader is its own sampler (set_epoch)
        from .shards import shard_loader
        views = MaskedImages(None, transform, mask_gen, cfg.seed).views
        loader = shard_loader(cfg.data.urls, views, cfg.batch_size, dist.world_size(), dist.rank(),
                              num_workers(cfg.data), cfg.seed, cfg.data.shuffle_buffer, cfg.data.skip_corrupt,
                              cfg.data.limit, pin_memory=device.type == "cuda")
        images, sampler, per_process = sum(loader.counts), loader, loader.per_rank
    else:
        train_set = build_dataset(cfg.data, "train", cfg.data.limit)
        images = len(train_set)
        dataset = MaskedImages(train_set, transform, mask_gen, cfg.seed, cfg.data.skip_corrupt)
        sampler = EpochSampler(len(dataset), dist.world_size(), dist.rank(), cfg.seed, shuffle=True, drop_last=True)
        loader = make_loader(dataset, cfg.batch_size, cfg.data, sampler=sampler, drop_last=True,
                             pin_memory=device.type == "cuda")
        per_process = len(sampler)
    if len(loader) == 0:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {per_process} training images per process; "
                          f"lower batch_size or raise data.limit")
    return images, sampler, loader, mask_gen


def resume(path: Path, model, loop: Loop, seed: int, fallback: bool = False) -> int:
    """Load a checkpoint into the model and the loop (its optimizer too); returns the first epoch still to train (an epoch a
    signal interrupted continues where it stopped). `fallback` (resume=auto): a damaged last.pt gives way to
    last.prev.pt, with a warning."""
    ckpt, path = checkpoint.load_resumable(path, "pretrain", loop.log, fallback)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise checkpoint.CheckpointError(f"{path} does not fit this model ({str(e).splitlines()[0]}); "
                                         f"was it trained with another architecture or method?") from None
    restore_rng(ckpt, seed)
    return loop.restore(ckpt)


def panel_inputs(cfg, mask_gen, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 8 test images and masks seeded per image: the same panel at every epoch (shards without
    data.test_urls: the first training shard's)."""
    data = cfg.data
    if data.name == "webdataset" and not data.test_urls:
        from .shards import expand_urls
        data = dataclasses.replace(data, test_urls=expand_urls(data.urls)[0])
    vis_set = Transformed(build_dataset(data, "test"), eval_transform(data))
    imgs = torch.stack([vis_set[i][0] for i in range(min(8, len(vis_set)))]).to(device)
    masks = torch.stack([mask_gen(torch.Generator().manual_seed(cfg.seed + i)) for i in range(len(imgs))])
    return imgs, masks.to(device)


def setup(cfg) -> PretrainRun:
    """Checks first (a bad input leaves no files behind), then data, model, optimizer, resume, run directory."""
    validate(cfg)
    device = dist.init(cfg.device)
    resume_from = check_run_dir(cfg)
    torch.manual_seed(cfg.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    images, sampler, loader, mask_gen = build_data(cfg, device)
    model = place_model(build_method(cfg), device, cfg.precision)
    if dist.world_size() > 1:
        torch.manual_seed(dist.rank_seed(cfg.seed))  # but a different drop path on each rank
    optimizer = build_optimizer(model, cfg, device)
    out = resolve_output_dir(cfg)
    loop = Loop(cfg, model, optimizer, device, len(loader), log=RunLog(out), ckpt_path=out / "checkpoints" / "last.pt")
    start_epoch = 0 if resume_from is None else resume(resume_from, model, loop, cfg.seed, cfg.resume == "auto")
    if cfg.model.init_from and resume_from is None:
        init_from(model, cfg.model.init_from)
    updates = cfg.epochs * (len(loader) // cfg.accum_iter)
    loop.on_step = lambda: model.after_step((loop.step - 1) / updates)
    write_run_dir(cfg)
    log = loop.log
    if resume_from is not None:
        log(f"resumed from {resume_from} (epoch {start_epoch} done, step {loop.step})")
    # find_unused_parameters: e.g. the encoder's mask token is unused by methods that drop masked patches
    loop.ddp = DistributedDataParallel(model, find_unused_parameters=True) if dist.world_size() > 1 else None
    train_model = loop.ddp or model
    if cfg.compile:
        train_model = torch.compile(train_model)
    if dist.is_main():
        loop.writer = open_writers(cfg, out)
    log(f"{cfg.method} on {cfg.data.name}: {images} images, {len(loader)} steps/epoch, "
        f"epochs {start_epoch}->{cfg.epochs}, lr {loop.base_lr:.3g}, device {device}, world {dist.world_size()}")
    return PretrainRun(cfg, device, out, log, model, train_model, sampler, loader, loop,
                       panel_inputs(cfg, mask_gen, device), start_epoch)


def epoch_batches(run: PretrainRun, epoch: int):
    """The epoch's batches: all of them, or the rest of an epoch a signal interrupted. A DataLoader draws its
    workers' seed from the global generator when its iterator is made: once per epoch without workers, once per
    process with (persistent) workers; a resumed run draws where an uninterrupted one does, and only there."""
    skip = run.loop.start_of(epoch)
    if not isinstance(run.sampler, EpochSampler):  # a loader that is its own sampler: read past what was trained
        return itertools.islice(run.loader, skip, None) if skip else run.loader
    loader = run.loader if not skip else make_loader(
        run.loader.dataset, run.cfg.batch_size, run.cfg.data, drop_last=True,
        sampler=SkipSampler(run.sampler, skip * run.cfg.batch_size), pin_memory=run.device.type == "cuda")
    return quiet_iter(loader) if skip or (loader.num_workers > 0 and epoch > 0) else loader


def save_now(run: PretrainRun, epoch: int, partial: dict | None = None) -> None:
    """checkpoints/last.pt after epoch `epoch` (and `partial`, the next one's progress), written by rank 0."""
    rng_ranks = dist.all_gather_object(checkpoint.rng_state())  # collective: every rank takes part
    if dist.is_main():
        loop = run.loop
        save_checkpoint(loop.ckpt_path, run.model, loop.optimizer, epoch, loop.step, run.cfg, loop.history, rng_ranks,
                        partial)
    dist.barrier()


def stop(run: PretrainRun, where: str) -> None:
    """End a run a signal stopped (its checkpoint written): mimkit.interrupts prints how to resume."""
    if run.loop.writer is not None:
        run.loop.writer.close()
    raise interrupts.Interrupted(run.loop.stopped, str(run.loop.ckpt_path), where, dist.is_main())


def run_epoch(run: PretrainRun, epoch: int) -> dict:
    """Train one epoch; log it, draw the panel every vis_every epochs, checkpoint every ckpt.every epochs (and
    when a signal stops the run, mid-epoch if need be)."""
    cfg, loop = run.cfg, run.loop
    replaced = [torch.tensor(loop.resume_at.get("replaced", 0))] if loop.start_of(epoch) else []
    run.sampler.set_epoch(epoch)
    run.train_model.train()

    def forward(batch):
        imgs, mask, _, rep = batch
        replaced.append(rep)
        imgs = imgs.to(run.device, non_blocking=True)
        if imgs.dtype == torch.uint8:  # images from files: normalized after the copy (a quarter of the bytes)
            imgs = normalize_uint8(imgs, *dataset_stats(cfg.data.name))
        return run.train_model(imgs, mask.to(run.device, non_blocking=True))

    record = train_one_epoch(loop, epoch_batches(run, epoch), epoch, forward)
    if record is None:
        save_now(run, epoch - 1, {**loop.partial, "replaced": sum(int(r.sum()) for r in replaced)})
        stop(run, f"step {loop.step} (epoch {epoch + 1}, iteration {loop.partial['it']})")
    record["replaced_images"] = int(dist.all_reduce_sum(sum(int(r.sum()) for r in replaced), run.device))
    loop.history.append(record)
    extras = {k: v for k, v in record.items() if k not in RECORD_KEYS}
    run.log(f"epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.4f} lr {loop.lr:.3g} "
            f"{record['images_per_s']:.0f} img/s" + "".join(f" {k} {v:.4f}" for k, v in extras.items())
            + (f" replaced_images {record['replaced_images']}" if record["replaced_images"] else ""))
    if loop.writer is not None:
        for k in ("loss", "images_per_s", *extras):
            loop.writer.add_scalar(f"epoch/{k}", record[k], epoch + 1)
        if (epoch + 1) % cfg.vis_every == 0 or epoch + 1 == cfg.epochs:
            run.model.eval()
            panel = run.model.visualize(*run.vis)
            if panel is not None:
                loop.writer.add_image(f"{cfg.method}/{run.model.panel_name}", panel, epoch + 1)
    if (epoch + 1) % cfg.ckpt.every == 0 or epoch + 1 == cfg.epochs or loop.stopped:
        save_now(run, epoch)
    else:
        dist.barrier()
    if loop.stopped and epoch + 1 < cfg.epochs:
        stop(run, f"step {loop.step} (end of epoch {epoch + 1})")
    return record


def summarize(history: list[dict], cfg) -> dict:
    if not history:
        return {"method": cfg.method, "epochs": 0}
    seconds = sum(h["seconds"] for h in history)
    return {"method": cfg.method, "dataset": cfg.data.name, "epochs": history[-1]["epoch"],
            "final_loss": history[-1]["loss"], "first_loss": history[0]["loss"],
            **{f"final_{k}": v for k, v in history[-1].items() if k not in RECORD_KEYS},
            "images_per_s": sum(h["images_per_s"] * h["seconds"] for h in history) / seconds,
            "train_seconds": seconds, "replaced_images": sum(h["replaced_images"] for h in history),
            "loss_history": [h["loss"] for h in history]}


def finalize(run: PretrainRun, after: AfterTraining | None = None) -> dict:
    """The final panel (reconstructions.png), `after`'s metrics (rank 0) and metrics.json."""
    metrics = summarize(run.loop.history, run.cfg)
    if dist.is_main():
        run.model.eval()
        panel = run.model.visualize(*run.vis)
        if panel is not None:
            from torchvision.utils import save_image
            save_image(panel, run.out / "reconstructions.png")
        if after is not None:
            metrics.update(after(run.model, run.cfg, run.device, run.log))
        write_metrics(run.out, metrics, run.log)
        run.loop.writer.close()
    dist.cleanup()
    return metrics


def train(cfg, after: AfterTraining | None = None) -> dict:
    """Pretrain cfg.method as configured; `after` runs on the trained model before metrics.json is written."""
    run = setup(cfg)
    with interrupts.armed():
        for epoch in range(run.start_epoch, cfg.epochs):
            run_epoch(run, epoch)
    return finalize(run, after)
