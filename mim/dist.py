"""Process-group helpers: torchrun and SLURM (via submitit) set the environment; one process needs nothing.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT itself. A submitit job on SLURM
(or submitit's local executor) only has its scheduler's variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
SLURM_JOB_NODELIST); `export_submitit_env` turns them into torch's with submitit's own
TorchDistributedEnvironment (master = first host of the node list, port derived from the job id)."""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def rank_seed(seed: int) -> int:
    """Per-rank seed for the process-wide generator (drop path and other in-model randomness): distinct per
    rank, distinct from other runs' seeds, the same on every restart."""
    return (seed * 1_000_003 + rank()) % (2 ** 63 - 1)


def export_submitit_env() -> bool:
    """Inside a submitit job not launched by torchrun, set torch's env:// variables from the scheduler's.

    Returns True when it exported them. A no-op outside submitit or when RANK is already set (torchrun
    inside a submitit job keeps its own)."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return False
    from submitit.helpers import TorchDistributedEnvironment
    # Keep every GPU visible: init() selects cuda:LOCAL_RANK, as under torchrun.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if os.environ["SUBMITIT_EXECUTOR"] == "local":
        os.environ["MASTER_ADDR"] = "127.0.0.1"  # one machine: no need for its hostname to resolve
    return True


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory torch frees for the next tensors, instead of handing it back to the
    OS (buffers over 128 KB are mmap'd and unmapped one by one by default) and faulting fresh zeroed pages in
    on the next allocation. A CPU training step allocates the same buffers every time, so nothing grows past the
    first step's peak, and a step no longer spends kernel time faulting its activations back in page by page
    (benchmarks/README.md has the measurements). What PyTorch's CPU
    tuning guide gets by preloading jemalloc or tcmalloc, without either. Linux with glibc only; set
    MIMKIT_KEEP_FREED_MEMORY=0 to keep the defaults. Returns whether the setting was made."""
    if os.environ.get("MIMKIT_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl, ...)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def elastic_store() -> dist.Store | None:
    """Under torchrun (the agent serves the store: TORCHELASTIC_USE_AGENT_STORE), the agent's store with this
    attempt's keys kept apart from earlier attempts'; None elsewhere (env:// as usual). The agent keeps one store for
    every restart of the group and torch's env:// rendezvous does not separate attempts: a restarted rank that came
    up first read the address its killed predecessor had published and failed to connect to it (gloo's
    connectFullMesh: "Connection refused"), so a group restarted by --max-restarts failed or hung."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"mimkit/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init(device_name: str = "auto") -> torch.device:
    """Join the process group when launched with WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA); pick the device;
    on CPU, keep freed memory in the process (`keep_freed_memory`)."""
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        from .config import ConfigError
        raise ConfigError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    export_submitit_env()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not use_cuda:
        keep_freed_memory()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(device)
        # device_id binds NCCL to this GPU up front (barriers then never guess the device)
        store = elastic_store()
        where = {} if store is None else {"store": store, "rank": int(os.environ["RANK"]),
                                          "world_size": int(os.environ["WORLD_SIZE"])}
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None, **where)
    return device


def native_bf16_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively: AMX or AVX512-BF16 among its flags (True where the flags cannot
    be read: no warning without evidence)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return True
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.partition(":")[2].split()}
    return not flags or bool(flags & {"amx_bf16", "avx512_bf16"})


@functools.cache
def warn_slow_bf16() -> None:
    """Once per process (rank 0): precision=bf16 on a CPU without native bf16 is emulated, slower than fp32."""
    if is_main() and not native_bf16_cpu():
        sys.stderr.write("warning: precision=bf16 on a CPU without native bf16 (no AMX or AVX512-BF16 in "
                         "/proc/cpuinfo) runs slower than fp32; use precision=fp32 (what precision=auto is on CPU)\n")


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """precision "auto" is bf16 on CUDA and fp32 on CPU; "bf16" and "fp32" are that on any device (bf16 on a CPU
    that emulates it: `warn_slow_bf16`)."""
    if precision == "bf16" and device.type == "cpu":
        warn_slow_bf16()
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """The precision a forward runs in: bf16 autocast or fp32, as `uses_bf16` says."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


def _all_reduce(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def all_reduce_mean(value: float, device: torch.device) -> float:
    return value if world_size() == 1 else _all_reduce(value, device) / world_size()


def all_reduce_sum(value: float, device: torch.device) -> float:
    return value if world_size() == 1 else _all_reduce(value, device)


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (e.g. each rank's RNG state for a checkpoint)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
