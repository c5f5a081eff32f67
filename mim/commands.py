"""What every `mimkit` sub-command shares: the argument parser whose mistakes are one line, the user errors
that end a command with one line and exit status 2, and the --config / key=value arguments.

Building the parsers and printing help imports no torch: the command functions import what they run; the
help texts that list registries (methods, heads, tokenizer kinds) are functions, called when that help is
printed (`Parser.format_help`), and read the registries' names from a cache file (`registry_names`)."""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from . import interrupts
from .config import ConfigError, one_line


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that are the user's mistakes (imported here: their modules import torch)."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .loop import NonFiniteLossError
    return ConfigError, DataError, CheckpointError, NonFiniteLossError


def source_key() -> str:
    """A hash of the names, sizes and modification times of mimkit's and its tokenizers' source files: what the
    registries are filled from."""
    roots = [Path(__file__).parent, Path(importlib.util.find_spec("mimkit.tokenizers").origin).parent]
    stats = [(str(p), p.stat().st_mtime_ns, p.stat().st_size) for root in roots for p in sorted(root.rglob("*.py"))]
    return hashlib.sha1(repr(stats).encode()).hexdigest()[:16]


def collect_registry_names() -> dict[str, list]:
    """The registered parts' names, in registration order (imports every registry, hence torch)."""
    from mimkit.tokenizers import TOKENIZERS

    from .data import DATASETS
    from .heads import HEADS
    from .losses import LOSSES
    from .masking import MASK_KINDS
    from .methods import METHODS
    from .targets import TARGETS
    return {"methods": list(METHODS), "heads": list(HEADS), "targets": list(TARGETS), "losses": list(LOSSES),
            "mask_kinds": list(MASK_KINDS), "datasets": list(DATASETS),
            "tokenizers": [[kind, cls.paper] for kind, cls in TOKENIZERS.items()]}


def registry_names() -> dict[str, list]:
    """`collect_registry_names()`, kept in $XDG_CACHE_HOME/mimkit (~/.cache/mimkit) per `source_key`: help that
    lists the registries prints without importing torch from the second time on (an unwritable cache: every
    time). Read live where the registries are imported already."""
    if any(m in sys.modules for m in ("mimkit.methods", "mimkit.targets", "mimkit.tokenizers")):
        return collect_registry_names()  # already imported: live, with any part this program registered itself
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mimkit"
    path = cache / f"registries-{source_key()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    names = collect_registry_names()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # another process may be writing the same file
        tmp.write_text(json.dumps(names))
        tmp.replace(path)
    except OSError:
        pass
    return names


class Parser(argparse.ArgumentParser):
    """argparse's parser with one-line mistakes, and an epilog or sub-command help that may be a function
    returning the text (called once, when the help is printed)."""

    def error(self, message: str):  # one line, exit 2 (argparse prints usage first by default)
        sys.stderr.write(f"error: {one_line(message)}\n")
        sys.exit(2)

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        for action in self._actions:
            for choice in getattr(action, "_choices_actions", ()):  # a sub-command's line in this help
                if callable(choice.help):
                    choice.help = choice.help()
        return super().format_help()


def add_config_args(p: argparse.ArgumentParser, example: str) -> None:
    """--config FILE (repeatable, applied in order) and the key=value overrides of a command."""
    p.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                   help="YAML config file(s), applied in order over the recipe and dataset preset")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")


def run(func, args) -> int:
    """Run a command; user errors become one line and exit status 2, a run stopped by SIGINT / SIGTERM one line
    saying how to resume and 130 / 143 (mimkit.interrupts)."""
    try:
        with interrupts.handled():
            return func(args) or 0
    except interrupts.Interrupted as e:
        return interrupts.report(e, getattr(args, "argv", sys.argv[1:]))
    except Exception as e:  # an error class's module is imported by the time one of them is raised
        if isinstance(e, RuntimeError) and "DataLoader worker" in str(e):  # torch's own error for a dead worker
            from .data import loader_died
            e = loader_died(e) or e
        if not isinstance(e, ConfigError) and not isinstance(e, user_errors()) or getattr(args, "debug", False):
            raise
        sys.stderr.write(f"error: {one_line(e)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
