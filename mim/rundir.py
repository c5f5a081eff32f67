"""The run-directory contract shared by every command: <output_dir>/config.yaml (resolved), checkpoints/,
tb/, log.txt, metrics.json. An existing run is never overwritten silently: resume=auto continues it when
its config matches (apart from keys that may change on resume), overwrite=true starts afresh, anything else
is an error. Checks come first and write nothing, so a bad input leaves no files behind."""
from __future__ import annotations

import shutil
from pathlib import Path

from . import checkpoint, dist
from .config import ConfigError, diff, dump_yaml, flatten, load_yaml, migrate

RUN_FILES = ("checkpoints", "tb", "metrics.json", "log.txt")


def check(out: Path, cfg, resume: str = "auto", overwrite: bool = False,
          resumable: tuple[str, ...] = ()) -> Path | None:
    """Refuse conflicts with an existing run; the checkpoint to resume from (None: start afresh)."""
    saved, last = out / "config.yaml", out / "checkpoints" / "last.pt"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"cannot write to output_dir {out}: it is a file")
    if saved.exists() and not overwrite:
        if resume == "none":
            raise ConfigError(f"output_dir {out} already holds a run; use resume=auto to continue it, "
                              f"overwrite=true to start afresh, or another output_dir")
        old = migrate(flatten(load_yaml(saved)))  # a tag or syntax error there is one line
        known = old  # keys a newer mimkit added are not a conflict
        changed = [k for k in diff(old, cfg) if k in known and not k.startswith(resumable)]
        if changed:
            raise ConfigError(f"output_dir {out} holds a run with a different config ({', '.join(changed)}); "
                              f"use another output_dir or overwrite=true")
    if resume not in ("auto", "none"):
        return Path(resume)
    return last if resume == "auto" and last.exists() and not overwrite else None


def write(out: Path, cfg, overwrite: bool = False, files: tuple[str, ...] = RUN_FILES) -> Path:
    """Create the run directory (clearing an old run's `files` when overwrite=true) and save config.yaml."""
    dist.barrier()  # every rank has checked the old run dir before rank 0 rewrites it
    if dist.is_main():
        try:
            if overwrite:
                for name in files:
                    p = out / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        except OSError as e:
            raise ConfigError(f"cannot write to output_dir {out}: {e.strerror}") from None
    dist.barrier()
    return out
