"""Checkpoints: written atomically (temp file, fsync, rename), read with weights_only=True.

A checkpoint holds everything an exact resume needs: model, optimizer, scaler, epoch, step, config and the
random generators' states. Every file `save` writes (checkpoints, tokenizer files, feature caches) also records
the mimkit version that wrote it, its format number and a sha256 of its content, which `load` verifies: a flipped
byte or a truncated file is a CheckpointError naming the file. Files written before these fields are format 1
and load unchecked."""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__

FORMAT = 2  # 1: no version, format or checksum fields; 2: with them
READS = (1, 2)  # the formats this mimkit loads

class CheckpointError(RuntimeError):
    """A file that is missing, unreadable or not a mimkit checkpoint of the expected kind."""


class OtherKind(CheckpointError):
    """A readable file that is not a mimkit checkpoint of the kind asked for (a caller may try another kind)."""


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


def _feed(h, obj: Any) -> None:
    """Hash `obj`'s content: tensors by dtype, shape and bytes, containers item by item, the rest by repr (what
    torch.save and torch.load keep unchanged), so the digest does not depend on how the file is laid out."""
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"{%d" % len(obj))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%d" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def digest(obj: dict) -> str:
    """sha256 of a checkpoint's content, its own "sha256" field left out."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != "sha256"})
    return h.hexdigest()


class _Counter:
    """A file that only counts what is written to it: the size of a checkpoint that did not fit."""
    n = 0

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)

    def flush(self) -> None:
        pass


def _disk_was_full(e: BaseException | None) -> bool:
    """Whether ENOSPC is behind `e` (torch.save reports it as the context of its writer's RuntimeError)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    return False


def _disk_full(path: Path, obj: dict) -> CheckpointError:
    counter = _Counter()
    torch.save(obj, counter)
    free = shutil.disk_usage(path.parent).free
    return CheckpointError(f"no space left in {path.parent}: writing {path.name} needs {counter.n} bytes "
                           f"({free} free); the previous checkpoint is intact. Free space there and resume")


def _keep_previous(path: Path) -> None:
    """Hard-link (or copy) `path` as <stem>.prev<suffix>, atomically by rename: the last good checkpoint stays on
    disk until the next one has been written in full, and `path` itself always exists."""
    prev = path.with_name(f"{path.stem}.prev{path.suffix}")
    tmp = path.with_name(f".{prev.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # a filesystem without hard links: a copy
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def save(obj: dict, path: str | Path, keep_previous: bool = False) -> None:
    """Write `obj` with its version, format and checksum fields. `keep_previous`: the file it replaces stays as
    <stem>.prev<suffix> (what `load_resumable` falls back to)."""
    path = Path(path)
    obj = {**obj, "format": FORMAT, "mimkit_version": __version__}
    obj["sha256"] = digest(obj)

    def write(f):
        torch.save(obj, f)
        if keep_previous and path.exists():
            _keep_previous(path)
    try:
        atomic_write(path, write)
    except Exception as e:
        if _disk_was_full(e):
            raise _disk_full(path, obj) from None
        raise


def check_format(ckpt: dict, path: Path) -> None:
    """A format this mimkit reads, and content that matches its checksum."""
    fmt = ckpt.get("format", 1)
    if fmt not in READS:
        raise CheckpointError(f"{path} has checkpoint format {fmt} (written by mimkit "
                              f"{ckpt.get('mimkit_version', '?')}); this mimkit ({__version__}) reads formats "
                              f"{', '.join(map(str, READS))}: load it with mimkit {ckpt.get('mimkit_version', '?')} "
                              f"or newer")
    if "sha256" in ckpt and digest(ckpt) != ckpt["sha256"]:
        raise CheckpointError(f"{path} is damaged: its content does not match its checksum (a flipped or lost "
                              f"byte); use an intact copy")


def load(path: str | Path, kind: str = "pretrain") -> dict:
    """Load a mimkit checkpoint of `kind` safely (no pickled code), its format and checksum verified."""
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
                              f"{str(e).splitlines()[0][:200] if str(e) else 'truncated or damaged'})") from None
    if not isinstance(ckpt, dict) or ckpt.get("mimkit") != kind:
        raise OtherKind(f"{path} is not a mimkit {kind} checkpoint (no 'mimkit: {kind}' marker)")
    check_format(ckpt, path)
    return ckpt


def load_resumable(path: str | Path, kind: str, log, fallback: bool = True) -> tuple[dict, Path]:
    """(checkpoint, the file it came from): `path`, or, when `path` fails its checks and `fallback` (resume=auto),
    the previous good one saved next to it (`save(..., keep_previous=True)`), with one warning line."""
    path = Path(path)
    prev = path.with_name(f"{path.stem}.prev{path.suffix}")
    try:
        return load(path, kind), path
    except CheckpointError as e:
        if not fallback or not prev.is_file():
            raise
        log(f"warning: {e}; resuming from the previous checkpoint {prev}")
        return load(prev, kind), prev


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
