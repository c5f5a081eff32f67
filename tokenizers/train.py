"""`mimkit tokenizer train`: fit a k-means tokenizer or train a dVAE / VQ-KD, in the run-directory contract.

<output_dir>/tokenizer.pt (the file methods load with target.tokenizer=...), config.yaml, log.txt, tb/,
metrics.json (codebook usage and perplexity on the held-out split, losses, time) and, for the trained
kinds, checkpoints/last.pt from which resume=auto continues.
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from mimkit import checkpoint, dist, rundir
from mimkit.config import ConfigError, to_dict
from mimkit.dist import autocast
from mimkit.data import (EpochSampler, MaskedImages, Transformed, build_dataset, dataset_stats, eval_transform,
                         make_loader, pretrain_transform)
from mimkit.engine import (NonFiniteLossError, RunLog, backward_step, build_optimizer, effective_lr, last_good, lr_at,
                           place_model, set_lr)

from .base import Tokenizer, codebook_stats
from .config import TokenizerConfig, dvae_input_size, validate
from .dvae import DVAE, DVAETraining, from_dalle
from .kmeans import KMeansTokenizer, fit_tokenizer, sample_features
from .teachers import load_teacher
from .vqkd import VQKD, VQKDTraining

# keys that may change when a run is resumed
RESUMABLE_CHANGES = ("epochs", "resume", "overwrite", "output_dir", "device", "data.num_workers", "data.root",
                     "vis_every", "ckpt_every", "eval_limit")


def resolve_output_dir(cfg: TokenizerConfig) -> Path:
    if not cfg.output_dir:
        cfg.output_dir = f"runs/tokenizer_{cfg.kind}_{cfg.data.name}"
    return Path(cfg.output_dir)


def check_run_dir(cfg: TokenizerConfig) -> Path | None:
    """The shared run-directory checks (mimkit.rundir), plus: a finished k-means / imported run (a tokenizer
    and no training checkpoint) is never redone silently. Returns the checkpoint to resume from."""
    out = resolve_output_dir(cfg)
    if (out / "tokenizer.pt").exists() and not (out / "checkpoints" / "last.pt").exists() and not cfg.overwrite:
        raise ConfigError(f"output_dir {out} already holds a tokenizer; use overwrite=true to start afresh "
                          f"or another output_dir")
    return rundir.check(out, cfg, cfg.resume, cfg.overwrite, RESUMABLE_CHANGES)


def load_cfg_teacher(cfg: TokenizerConfig):
    """The frozen teacher of a vqkd run or a teacher-feature k-means run (None otherwise)."""
    t = cfg.teacher
    if cfg.kind == "vqkd" or (cfg.kind == "kmeans" and cfg.kmeans.features == "teacher"):
        return load_teacher(t.name, t.weights, t.img_size)
    return None


def build_trainable(cfg: TokenizerConfig, stats: tuple, grid: int, teacher, device: torch.device):
    """(tokenizer, its training helper) for kind dvae / vqkd."""
    mean, std = (list(v) for v in stats)
    img = cfg.data.img_size
    if cfg.kind == "dvae":
        d = cfg.dvae
        if d.dalle_encoder:
            tok = from_dalle(d.dalle_encoder, img, grid)
        else:
            tok = DVAE(img, grid, cfg.vocab_size, mean, std, dvae_input_size(cfg), d.groups, d.hidden,
                       d.blocks_per_group)
        return place_model(tok, device, cfg.precision), DVAETraining(tok, d)
    v = cfg.vqkd
    teacher = teacher.to(device)
    tok = VQKD(img, grid, cfg.vocab_size, mean, std, teacher.feature_dim(), v.embed_dim, v.depth, v.num_heads,
               v.code_dim, v.decoder_depth, v.decoder_embed_dim, v.decoder_num_heads, v.decay, v.beta, v.restart)
    return place_model(tok, device, cfg.precision), VQKDTraining(tok, teacher)


def fit_kmeans_tokenizer(cfg: TokenizerConfig, train_set, stats: tuple, grid: int, teacher, device: torch.device,
                         log) -> tuple:
    k, p = cfg.kmeans, cfg.patch_size
    dim = teacher.feature_dim() if teacher is not None else p * p * 3
    tok = KMeansTokenizer(cfg.data.img_size, grid, cfg.vocab_size, list(stats[0]), list(stats[1]), dim, k.norm_pix)
    tok.teacher = teacher
    tok.to(device).eval()
    # ClusterMIM samples patches of resized, center-cropped training images (no augmentation)
    loader = make_loader(Transformed(train_set, eval_transform(cfg.data)), cfg.batch_size, cfg.data, shuffle=True)
    feats = sample_features(tok, loader, k.max_samples, len(train_set), device, cfg.seed)
    info = fit_tokenizer(tok, feats, k.niter, cfg.seed, k.max_points_per_centroid, k.threads, log)
    return tok, info


@torch.no_grad()
def evaluate(tok: Tokenizer, training, loader, device: torch.device, precision: str = "auto") -> dict:
    """Codebook usage / perplexity of the ids of the held-out split, plus the kind's own held-out metrics."""
    was_training = tok.training
    tok.eval()
    ids, sums, n = [], defaultdict(float), 0
    for imgs, _ in loader:
        imgs = imgs.to(device, non_blocking=True)
        with autocast(device, precision):
            batch_ids, m = training.evaluate(imgs) if training is not None else (tok.encode(imgs), {})
        ids.append(batch_ids.cpu())
        for key, v in m.items():
            sums[key] += v * len(imgs)
        n += len(imgs)
    tok.train(was_training)
    return {**codebook_stats(torch.cat(ids), tok.vocab_size), **{k: v / n for k, v in sums.items()}}


def _no_mask(generator=None) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.bool)


def fit_trainable(cfg: TokenizerConfig, tok: Tokenizer, training, train_set, test_loader, vis_imgs, device, log,
                  writer, resume_from: Path | None, out: Path) -> list[dict]:
    """The gradient loop of dvae / vqkd: AdamW, warmup + cosine lr per step, clipping, per-epoch history,
    held-out evaluation and panels every vis_every epochs, checkpoints/last.pt every ckpt_every epochs."""
    dataset = MaskedImages(train_set, pretrain_transform(cfg.data), _no_mask, cfg.seed, cfg.data.skip_corrupt)
    sampler = EpochSampler(len(dataset), 1, 0, cfg.seed, shuffle=True, drop_last=True)
    loader = make_loader(dataset, cfg.batch_size, cfg.data, sampler=sampler, drop_last=True,
                         pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(dataset)} training images; lower batch_size")
    optimizer = build_optimizer(tok, cfg, device)
    start, step, history = 0, 0, []
    ckpt_path = out / "checkpoints" / "last.pt"
    if resume_from is not None:
        ckpt = checkpoint.load(resume_from, kind="tokenizer_train")
        tok.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, step, history = ckpt["epoch"] + 1, ckpt["step"], ckpt["history"]
        checkpoint.set_rng_state(ckpt["rng"])
        log(f"resumed from {resume_from} (epoch {start} done)")
    base_lr, steps = effective_lr(cfg), len(loader)
    log(f"{cfg.kind} tokenizer on {cfg.data.name}: {len(train_set)} images, {steps} steps/epoch, lr {base_lr:.3g}, "
        f"{sum(p.numel() for p in tok.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters")
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)
        tok.train()
        t0, sums = time.perf_counter(), defaultdict(float)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr, dynamic_ncols=True)
        for it, (imgs, *_rest) in enumerate(bar):
            if it % cfg.accum_iter == 0:
                lr = lr_at(epoch + it / steps, cfg, base_lr)
                set_lr(optimizer, lr)
            imgs = imgs.to(device, non_blocking=True)
            with autocast(device, cfg.precision):
                outputs = training.loss(imgs, (epoch * steps + it) / (cfg.epochs * steps))
            loss = outputs["loss"]
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"non-finite tokenizer loss ({loss.item()}) at step {step} "
                                         f"(epoch {epoch + 1}); last good checkpoint: {last_good(ckpt_path, history)}")
            if backward_step(loss, it, tok, optimizer, cfg.accum_iter, cfg.optim.clip_grad):
                step += 1
            scalars = {k: v.item() if torch.is_tensor(v) else float(v) for k, v in outputs.items()}
            for k, v in scalars.items():
                sums[k] += v
                writer.add_scalar(f"train/{k}", v, step)
            writer.add_scalar("train/lr", lr, step)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}")
        record = {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}, "seconds": time.perf_counter() - t0}
        if (epoch + 1) % cfg.vis_every == 0 or epoch + 1 == cfg.epochs:
            held = evaluate(tok, training, test_loader, device, cfg.precision)
            record.update({f"val_{k}": v for k, v in held.items()})
            for k, v in held.items():
                writer.add_scalar(f"val/{k}", v, epoch + 1)
            tok.eval()
            panel = training.panel(vis_imgs)
            if panel is not None:
                writer.add_image(f"{cfg.kind}/original_reconstruction", panel, epoch + 1)
        history.append(record)
        log(f"epoch {epoch + 1}/{cfg.epochs} " + " ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                          if k not in ("epoch", "seconds", "val_codes_used")))
        if (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs:
            checkpoint.save({"mimkit": "tokenizer_train", "model": tok.state_dict(),
                             "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "history": history,
                             "config": to_dict(cfg), "rng": checkpoint.rng_state()}, ckpt_path)
    return history


def train_tokenizer(cfg: TokenizerConfig) -> dict:
    validate(cfg)
    device = dist.init(cfg.device)
    out = resolve_output_dir(cfg)
    resume_from = check_run_dir(cfg)  # checks, data and teacher first: a bad input leaves no files behind
    train_set = build_dataset(cfg.data, "train", cfg.data.limit)
    test_set = Transformed(build_dataset(cfg.data, "test", cfg.eval_limit), eval_transform(cfg.data))
    teacher = load_cfg_teacher(cfg)
    stats = dataset_stats(cfg.data.name)
    grid = cfg.data.img_size // cfg.patch_size
    torch.manual_seed(cfg.seed)
    tok, training = (None, None) if cfg.kind == "kmeans" else build_trainable(cfg, stats, grid, teacher, device)
    rundir.write(out, cfg, cfg.overwrite, rundir.RUN_FILES + ("tokenizer.pt",))
    log = RunLog(out)
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(out / "tb"))
    test_loader = make_loader(test_set, 256, cfg.data)
    t0 = time.perf_counter()
    history, fit = [], {}
    if cfg.kind == "kmeans":
        tok, fit = fit_kmeans_tokenizer(cfg, train_set, stats, grid, teacher, device, log)
    else:
        if cfg.kind == "dvae" and cfg.dvae.dalle_encoder:
            log(f"imported DALL-E's encoder from {cfg.dvae.dalle_encoder} (no training)")
        else:
            vis_imgs = torch.stack([test_set[i][0] for i in range(min(8, len(test_set)))]).to(device)
            history = fit_trainable(cfg, tok, training, train_set, test_loader, vis_imgs, device, log, writer,
                                    resume_from, out)
    last = history[-1] if history else {}
    if last.get("epoch") == cfg.epochs and "val_usage" in last:  # the last epoch was just evaluated: reuse it
        held = {k[len("val_"):]: v for k, v in last.items() if k.startswith("val_")}
    else:
        held = evaluate(tok, training, test_loader, device, cfg.precision)
    tok.save(out / "tokenizer.pt")
    metrics = {"kind": cfg.kind, "dataset": cfg.data.name, "vocab_size": tok.vocab_size, "grid": tok.grid,
               "heldout_images": len(test_set), **{f"heldout_{k}": v for k, v in held.items()}, **fit,
               "seconds": time.perf_counter() - t0, "tokenizer": str(out / "tokenizer.pt")}
    if history:
        metrics.update(first_loss=history[0]["loss"], final_loss=history[-1]["loss"],
                       loss_history=[h["loss"] for h in history])
    for k, v in held.items():
        writer.add_scalar(f"heldout/{k}", v, 0)
    writer.close()
    checkpoint.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    log(f"{cfg.kind} tokenizer written to {out / 'tokenizer.pt'}: held-out codebook usage "
        f"{100 * held['usage']:.1f}% ({held['codes_used']}/{tok.vocab_size}), perplexity {held['perplexity']:.1f}")
    return metrics
