"""Checkpoints: written atomically (temp file, fsync, rename), read with weights_only=True.

A checkpoint holds everything an exact resume needs: model, optimizer, scaler, epoch, step, config and the
random generators' states."""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A file that is missing, unreadable or not a mimkit checkpoint of the expected kind."""


def atomic_write(path: str | Path, write) -> None:
    """Call write(file_object) on a temp file next to `path`, fsync it, then rename over `path`: a crash
    leaves either the old file or the new one, never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save(obj: dict, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path: str | Path, kind: str = "pretrain") -> dict:
    """Load a mimkit checkpoint of `kind` safely (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError):  # not torch's advice (weights_only=False runs pickled code)
            raise CheckpointError(f"{path} is not a mimkit checkpoint: not a torch file that loads with "
                                  f"weights_only=True") from None
        raise CheckpointError(f"{path} is not a readable mimkit checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("mimkit") != kind:
        raise CheckpointError(f"{path} is not a mimkit {kind} checkpoint (no 'mimkit: {kind}' marker)")
    return ckpt


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()[1], "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
