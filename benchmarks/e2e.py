"""End to end: the default job's wall time (`python run_pretrain.py output_dir=<tmp>`: MAE on the bundled digits,
then the k-NN probe; goal <= 180 s on the 2-core CPU) and the CIFAR-10 JPEG data loader's images/s (the
engine's pretraining pipeline: decode, RandomResizedCrop, flip, normalize, mask, default workers) against the
MAE step's images/s on the CPU preset, measured one after the other in the same run (the loader must not
limit the step: ratio > 1)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import SHARED_DATA, write_result
from .step import REPO, build_step, method_config

GOAL_DEFAULT_JOB_S = 180
CIFAR10 = SHARED_DATA / "cifar10"


def default_job(timeout: float = 1800, overrides: tuple[str, ...] = ()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(REPO / "run_pretrain.py"), f"output_dir={tmp}/run", *overrides]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - t
        if proc.returncode:
            return {"seconds": seconds, "error": proc.stderr.strip().splitlines()[-1:]}
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    knn = metrics.get("knn", {})
    return {"seconds": seconds, "train_seconds": metrics.get("train_seconds"), "final_loss": metrics.get("final_loss"),
            "knn_gain_points": knn.get("gain_points"), "goal_max_s": GOAL_DEFAULT_JOB_S}


def loader_throughput(batches: int = 20, batch: int = 256, workers: int = -1) -> dict:
    """images/s of the engine's CIFAR-10 pretraining loader over `batches` batches after the first."""
    from mimkit.data import EpochSampler, MaskedImages, build_dataset, make_loader, num_workers, pretrain_transform
    from mimkit.masking import build_mask_generator
    cfg = method_config("mae", "cpu", (f"data.root={CIFAR10}", f"data.num_workers={workers}"))
    ds = build_dataset(cfg.data, "train")
    gen = build_mask_generator(cfg.mask, cfg.data.img_size // cfg.model.patch_size, cfg.model.patch_size)
    sampler = EpochSampler(len(ds), seed=0, shuffle=True, drop_last=True)
    loader = make_loader(MaskedImages(ds, pretrain_transform(cfg.data), gen, 0), batch, cfg.data, sampler=sampler,
                         drop_last=True)
    it = iter(loader)
    next(it)  # workers start and fill their prefetch queues
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t
    return {"images_per_s": batches * batch / seconds, "batches": batches, "workers": num_workers(cfg.data)}


def run(repeats: int = 3, skip_job: bool = False) -> dict:
    result = {}
    if not skip_job:
        job = result["default_job"] = default_job()
        status = f"error {job['error']}" if "error" in job else (
            f"train {job['train_seconds']:.0f} s, k-NN gain {job['knn_gain_points']} points")
        print(f"default job (run_pretrain.py): {job['seconds']:.0f} s wall (goal <= {GOAL_DEFAULT_JOB_S} s; {status})")
    if not (CIFAR10 / "train").is_dir():
        result["loader_skipped"] = f"CIFAR-10 folders not found at {CIFAR10}"
        print(f"loader: skipped ({result['loader_skipped']})")
    else:
        loader = result["loader"] = loader_throughput()
        step_fn = build_step(method_config("mae", "cpu"))[0]
        step_fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            step_fn()
            times.append(time.perf_counter() - t)
        step_ips = 256 / sorted(times)[len(times) // 2]
        result["mae_step_images_per_s"] = step_ips
        result["loader_over_step"] = loader["images_per_s"] / step_ips
        print(f"CIFAR-10 loader: {loader['images_per_s']:.0f} img/s with {loader['workers']} workers vs MAE step "
              f"{step_ips:.1f} img/s: {result['loader_over_step']:.1f}x (> 1: the loader keeps up)")
    print(f"written to {write_result('e2e', result)}")
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-job", action="store_true", help="e2e: skip the default job's wall time")
