"""Ctrl-C and SIGTERM (a scheduler's preemption, `kill`, torchrun passing a signal on): the first one asks the
training loop to stop after the step it is running, write a checkpoint and exit 130 (SIGINT) or 143 (SIGTERM)
with one line saying how to resume; a second one exits at once, leaving the last checkpoint written intact.

Only while a training loop runs (`armed`): elsewhere (setup, a k-NN probe, the closing evaluation) SIGINT raises
KeyboardInterrupt and SIGTERM exits 143 at once, as without these handlers. Torch-free: the command line installs
the handlers around every command (`handled`), the training commands arm them, the loop reads `pending`."""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped by a signal after a step, with the checkpoint to resume from written (`checkpoint`)."""

    def __init__(self, signum: int, checkpoint: str, where: str, announce: bool = True):
        self.signum, self.checkpoint, self.where, self.announce = signum, checkpoint, where, announce
        super().__init__(f"{signal.Signals(signum).name} at {where}; checkpoint {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    signum = 0  # the first signal received, 0 when none
    armed = False  # a training loop runs: stop it after a step
    pid = 0  # the process that installed the handlers (forked loader workers inherit them and ignore signals)


def pending() -> int:
    """The signal that asked the run to stop (0: none)."""
    return _State.signum


def _handle(signum: int, frame) -> None:
    if os.getpid() != _State.pid:
        return  # a loader worker: the main process stops the run, and then the workers
    if not _State.armed:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)
    if _State.signum:
        sys.stderr.write(f"error: second {signal.Signals(signum).name}: stopped at once; the last checkpoint "
                         f"written is intact\n")
        sys.stderr.flush()
        os._exit(128 + signum)
    _State.signum = signum


@contextlib.contextmanager
def handled():
    """Within: SIGINT and SIGTERM are handled as above (only in the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    _State.signum, _State.pid = 0, os.getpid()
    for s in SIGNALS:
        signal.signal(s, _handle)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _State.signum, _State.armed = 0, False


@contextlib.contextmanager
def armed():
    """Within: a first signal asks the training loop to stop after its step (read by `pending`)."""
    before, _State.armed = _State.armed, True
    try:
        yield
    finally:
        _State.armed = before


def resume_command(argv: list[str]) -> str:
    """The command line that continues a run: `argv` without its overwrite= and resume= keys (resume=auto, the
    default, continues from the run's last checkpoint)."""
    keep = [a for a in argv if not a.startswith(("overwrite=", "resume="))]
    return "mimkit " + shlex.join(keep)


def report(e: Interrupted, argv: list[str]) -> int:
    """The one line of an interrupted run (on the rank that prints), and its exit status."""
    if e.announce:
        sys.stderr.write(f"stopped by {signal.Signals(e.signum).name} after {e.where}, checkpoint written to "
                         f"{e.checkpoint}; resume with: {resume_command(argv)}\n")
    return e.exit_code
