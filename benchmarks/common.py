"""Shared helpers for the benchmarks: machine info, timing side by side, FLOPs, JSON results."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FREED_MEMORY_KEPT = False  # what `python -m benchmarks` got from mimkit.dist.keep_freed_memory(), for the JSON
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def cpu_description() -> dict:
    """The CPU's model, vendor and the vector extensions that decide how fast (and in which order) its BLAS
    kernels sum: figures are only compared between CPUs of one kind."""
    model = vendor = flags = ""
    path = Path("/proc/cpuinfo")
    for line in (path.read_text().splitlines() if path.exists() else []):
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and not model:
            model = value
        elif key == "vendor_id" and not vendor:
            vendor = value
        elif key == "flags" and not flags:
            flags = f" {value} "
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f} " in flags]
    return {"model": model or platform.processor() or platform.machine(), "vendor": vendor, "isa": isa}


def machine_info() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_description(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "keep_freed_memory": FREED_MEMORY_KEPT,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_it(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds after `warmup` untimed calls (synchronizing CUDA)."""
    return side_by_side({"fn": fn}, repeats, warmup)["fn"]["median_s"]


def side_by_side(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, dict]:
    """Time several contenders in interleaved rounds (A B C, A B C, ...) so that the machine's changing load
    hits all of them alike. Per name: median/min/max wall seconds, the raw per-round wall times (from which
    `speedup` forms ratios within each round) and this process's CPU seconds per call (`cpu_s`, all threads:
    less sensitive than wall time to other processes on a shared machine)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            t, c = time.perf_counter(), time.process_time()
            fn()
            _sync()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "times_s": ts,
                   "cpu_s": cpu[name]} for name, ts in times.items()}


def speedup(timed: dict[str, dict], fast: str, slow: str, key: str = "times_s") -> dict:
    """How many times faster `fast` ran than `slow`: time[slow] / time[fast] within each round, its median and
    spread (min, max) over the rounds; key="cpu_s" compares CPU seconds instead of wall seconds."""
    return spread([s / f for f, s in zip(timed[fast][key], timed[slow][key])])


def spread(values: list[float]) -> dict:
    """Median and range of per-round values (the rounds kept for the JSON)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (matmuls, convolutions, attention) counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_fn(n: int = 2048, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[Callable[[], object], int]:
    """(an n x n matmul, its 2n^3 FLOPs): the machine's reference FLOP/s in that dtype."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return (lambda: a @ b), 2 * n ** 3


def results_dir() -> Path:
    """benchmarks/results, or $MIMKIT_BENCH_RESULTS (the smoke test writes elsewhere)."""
    return Path(os.environ.get("MIMKIT_BENCH_RESULTS") or RESULTS)


def write_result(name: str, result: dict) -> Path:
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    from mimkit.checkpoint import atomic_write_text
    atomic_write_text(path, json.dumps({"benchmark": name, "machine": machine_info(), **result}, indent=2))
    return path
