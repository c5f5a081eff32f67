"""Ctrl-C and SIGTERM, really sent: the first signal ends the step, writes a checkpoint (mid-epoch if need be) and
exits 130 / 143 with one line naming the command that resumes; the resumed run ends bitwise equal to an
uninterrupted one. A second signal exits at once, the last checkpoint intact. With loader workers (the signal sent
to the whole process group, as a terminal's Ctrl-C is) and on every rank of a torchrun group.

The signal is sent from inside the run at a chosen optimizer step (a hook on mimkit.loop.backward_step): the same
moment on any machine, however slow."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import REPO
from mimkit.checkpoint import load
from mimkit.data import make_loader
from mimkit.loop import quiet_iter

DRIVER = '''
import os, signal, sys
from mimkit import loop
from mimkit.cli import main

# SIGNAL_AT="SIGINT:5[:times[:group]]": during the 5th backward, send SIGINT `times` times to this process (group:
# to its process group, as a terminal's Ctrl-C; RANK: only on that rank)
at = os.environ.get("SIGNAL_AT")
if at and os.environ.get("SIGNAL_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
    name, n, times, group = (at.split(":") + ["", "", ""])[:4]
    times = times or "1"
    real, calls = loop.backward_step, [0]

    def hooked(*a, **k):
        calls[0] += 1
        if calls[0] == int(n):
            for _ in range(int(times)):
                if group:
                    os.killpg(os.getpgid(0), getattr(signal, name))
                else:
                    os.kill(os.getpid(), getattr(signal, name))
        return real(*a, **k)
    loop.backward_step = hooked
sys.exit(main(sys.argv[1:]))
'''

# 64 images, batches of 16: 4 steps per epoch
PRETRAIN = ["pretrain", "data.name=synthetic", "data.synthetic_size=64", "batch_size=16", "epochs=3",
            "deterministic=true", "model.drop_path=0.1", "probe.enabled=false"]


def run(tmp_path: Path, args: list[str], signal_at: str = "", session: bool = False) -> tuple[int, str]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIGNAL_AT": signal_at}
    p = subprocess.run([sys.executable, str(driver), *args], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=300, start_new_session=session)
    return p.returncode, p.stderr


def same_weights(a: Path, b: Path) -> None:
    x, y = load(a), load(b)
    assert x["step"] == y["step"] and x["epoch"] == y["epoch"]
    assert x["model"].keys() == y["model"].keys()
    for k in x["model"]:
        assert torch.equal(x["model"][k], y["model"][k]), k
    assert [h["loss"] for h in x["history"]] == [h["loss"] for h in y["history"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_quiet_iter_leaves_the_global_generator_where_it_was(workers):
    """A resumed epoch's loader is made where an uninterrupted run made none: its draw of the workers' base seed
    must not move the global generator (drop path, the dVAE's Gumbel noise), or the resumed run's next steps
    differ. The draw happens when torch's iterator is made: iter(loader) must make it."""
    loader = make_loader(TensorDataset(torch.arange(8.0)), 4, SimpleNamespace(num_workers=workers))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    batches = quiet_iter(loader)
    assert torch.equal(torch.get_rng_state(), before)
    assert [b[0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert torch.equal(torch.get_rng_state(), before)


def test_ctrl_c_with_loader_workers_stops_after_the_step_and_resumes_bitwise(tmp_path):
    args = [*PRETRAIN, "data.num_workers=2"]
    ref, out = tmp_path / "ref", tmp_path / "stopped"
    assert run(tmp_path, [*args, f"output_dir={ref}"])[0] == 0
    # Ctrl-C reaches the main process and its two loader workers during step 6 (epoch 2, iteration 2)
    code, err = run(tmp_path, [*args, f"output_dir={out}", "overwrite=true"], "SIGINT:6:1:group", session=True)
    assert code == 130, err
    line, = err.strip().splitlines()
    assert line.startswith("stopped by SIGINT after step 7 (epoch 2, iteration 3)")
    assert line.endswith(f"resume with: mimkit {' '.join(args)} output_dir={out}")  # overwrite=true dropped
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["step"] == 7 and ckpt["partial"]["it"] == 3
    assert run(tmp_path, [*args, f"output_dir={out}"])[0] == 0
    same_weights(ref / "checkpoints" / "last.pt", out / "checkpoints" / "last.pt")


def test_sigterm_at_an_epoch_end_then_a_second_signal_exits_at_once(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "stopped"
    assert run(tmp_path, [*PRETRAIN, f"output_dir={ref}"])[0] == 0
    # SIGTERM during the 3rd step: the 4th, the epoch's last, ends it; an epoch checkpoint, no partial epoch
    code, err = run(tmp_path, [*PRETRAIN, f"output_dir={out}"], "SIGTERM:3")
    assert code == 143 and "stopped by SIGTERM after step 4 (end of epoch 1)" in err, err
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 0 and "partial" not in ckpt
    # two SIGINTs during step 6: the second ends the process there, before a checkpoint is written
    code, err = run(tmp_path, [*PRETRAIN, f"output_dir={out}"], "SIGINT:2:2")
    assert code == 130 and err.strip().splitlines() == ["error: second SIGINT: stopped at once; the last "
                                                        "checkpoint written is intact"], err
    assert load(out / "checkpoints" / "last.pt")["step"] == 4  # still the epoch-1 checkpoint, intact
    assert run(tmp_path, [*PRETRAIN, f"output_dir={out}"])[0] == 0
    same_weights(ref / "checkpoints" / "last.pt", out / "checkpoints" / "last.pt")


def test_tokenizer_training_stopped_mid_epoch_resumes_bitwise(tmp_path):
    args = ["tokenizer", "train", "--config", str(REPO / "configs" / "tokenizer" / "dvae_digits.yaml"), "data.limit=64",
            "data.test_limit=16", "batch_size=16", "epochs=2", "dvae.hidden=8"]
    ref, out = tmp_path / "ref", tmp_path / "stopped"
    assert run(tmp_path, [*args, f"output_dir={ref}"])[0] == 0
    code, err = run(tmp_path, [*args, f"output_dir={out}"], "SIGTERM:1")
    assert code == 143 and "stopped by SIGTERM after step 2 (epoch 1, iteration 2)" in err, err
    assert load(out / "checkpoints" / "last.pt", "tokenizer_train")["partial"]["it"] == 2
    assert run(tmp_path, [*args, f"output_dir={out}"])[0] == 0
    a, b = (load(d / "tokenizer.pt", "tokenizer") for d in (ref, out))
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert a["format"] == 2 and a["mimkit_version"]  # tokenizer files record their format and mimkit version


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, args: list[str], signal_at: str = "") -> tuple[int, str]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIGNAL_AT": signal_at, "SIGNAL_RANK": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(driver), *args]
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=240)
    return p.returncode, p.stderr


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    args = [*PRETRAIN, "epochs=2", "data.synthetic_size=128", "batch_size=8"]  # 2 ranks x 8: 8 steps per epoch
    ref, out = tmp_path / "ref", tmp_path / "stopped"
    assert torchrun(tmp_path, [*args, f"output_dir={ref}"])[0] == 0
    code, err = torchrun(tmp_path, [*args, f"output_dir={out}"], "SIGTERM:10")  # rank 1 only
    assert code != 0 and err.count("stopped by SIGTERM after step 11 (epoch 2, iteration 3)") == 1, err
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 11 and ckpt["partial"]["it"] == 3 and len(ckpt["rng_ranks"]) == 2
    assert torchrun(tmp_path, [*args, f"output_dir={out}"])[0] == 0
    same_weights(ref / "checkpoints" / "last.pt", out / "checkpoints" / "last.pt")
