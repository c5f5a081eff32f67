"""Faults really injected: kill -9 at several points of a pretraining subprocess (one of them in the middle of
a checkpoint write), then resume=auto; the final weights must equal an uninterrupted run's bit for bit."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from mimkit.checkpoint import load

DRIVER = '''
import io, os, signal, sys
from mimkit import checkpoint
from mimkit.cli import main

kill_at = int(os.environ.get("KILL_AT_CKPT_WRITE", "0"))
if kill_at:
    real, calls = checkpoint.atomic_write, [0]

    def faulty(path, write):
        calls[0] += str(path).endswith(".pt")  # count checkpoint writes only (config.yaml goes this way too)
        if calls[0] != kill_at or not str(path).endswith(".pt"):
            return real(path, write)
        buf = io.BytesIO()
        write(buf)
        data = buf.getvalue()

        def half_then_die(f):  # half the bytes reach the disk, then the process is killed
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, half_then_die)

    checkpoint.atomic_write = faulty
sys.exit(main(["pretrain", *sys.argv[1:]]))
'''

ARGS = ["data.name=synthetic", "epochs=6", "ckpt.every=1", "deterministic=true", "model.drop_path=0.1",
        "data.synthetic_size=256"]


def run(driver: Path, out: Path, env_extra=None, kill_after: float | None = None, extra_args=()) -> int:
    """`extra_args` override ARGS (tests/test_latent_targets.py kills an EMA-teacher run this way)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    p = subprocess.Popen([sys.executable, str(driver), *ARGS, *extra_args, f"output_dir={out}"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        _, err = p.communicate(timeout=300)
        return p.returncode
    deadline = time.time() + kill_after
    while time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    return p.returncode


def epochs_done(out: Path) -> int:
    last = out / "checkpoints" / "last.pt"
    return load(last)["epoch"] + 1 if last.exists() else 0


def test_kill9_at_random_points_then_resume_is_bitwise_exact(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert run(driver, ref) == 0

    # 1) killed in the middle of the 2nd checkpoint write: last.pt must still be the 1st, intact
    assert run(driver, out, {"KILL_AT_CKPT_WRITE": "2"}) == -signal.SIGKILL
    assert epochs_done(out) == 1
    assert list((out / "checkpoints").glob(".last.pt.*.tmp"))  # the half-written temp file is left behind
    # 2-5) killed after various delays (before, during and between epochs), each time resuming
    for delay in (2.5, 4.0, 5.5, 3.0):
        before = epochs_done(out)
        code = run(driver, out, kill_after=delay)
        assert code in (0, -signal.SIGKILL)
        assert epochs_done(out) >= before  # a kill never loses a finished checkpoint
    assert run(driver, out) == 0  # finish
    a, b = load(ref / "checkpoints" / "last.pt"), load(out / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 5 and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
