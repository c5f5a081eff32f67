"""Progress output: a tqdm bar where someone watches it (stdout and stderr both terminals), otherwise a plain
line every `INTERVAL_S` seconds (SLURM logs, `| tee`: a bar's carriage returns would fill them with redrawn
lines); the per-epoch lines are the commands' own log lines (`write`). `mimkit --quiet` (`quiet`) silences the
bars, the progress lines and the log lines on the console (log.txt still gets the log lines)."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:
    from tqdm import tqdm

INTERVAL_S = 60.0  # at most one plain progress line per this many seconds
_quiet = False


@contextlib.contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """Within the block, no bars, progress lines or log lines on the console (`on=False`: all of them)."""
    global _quiet
    before, _quiet = _quiet, on
    try:
        yield
    finally:
        _quiet = before


def write(msg: str) -> None:
    """A log line on stdout, unless quiet (through tqdm: a running bar is redrawn below it)."""
    if not _quiet:
        from tqdm import tqdm  # here: `mimkit --help` imports this module
        tqdm.write(msg)


class Lines:
    """Iterates over `items`, writing `desc: n/total key=value ... (seconds)` when `INTERVAL_S` seconds have
    passed since the last line; set_postfix as tqdm's."""

    def __init__(self, items: Iterable, desc: str):
        self.items, self.desc, self.postfix = items, desc, {}
        self.total = len(items) if hasattr(items, "__len__") else None

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def line(self, n: int, seconds: float) -> str:
        done = f"{n}/{self.total}" if self.total is not None else str(n)
        return " ".join([f"{self.desc}: {done}", *(f"{k}={v}" for k, v in self.postfix.items()), f"({seconds:.0f} s)"])

    def __iter__(self) -> Iterator:
        start = last = time.monotonic()
        for n, item in enumerate(self.items, 1):
            yield item
            now = time.monotonic()
            if now - last >= INTERVAL_S:
                write(self.line(n, now - start))
                last = now


def bar(items: Iterable, desc: str, enabled: bool = True) -> tqdm | Lines:
    """`items` with progress on the console: a bar on stderr when stdout and stderr are terminals, else `Lines`;
    nothing when quiet or not `enabled` (DDP: ranks other than 0)."""
    if _quiet or not enabled or (sys.stdout.isatty() and sys.stderr.isatty()):
        from tqdm import tqdm
        return tqdm(items, desc=desc, disable=_quiet or not enabled, leave=False, file=sys.stderr, dynamic_ncols=True)
    return Lines(items, desc)
