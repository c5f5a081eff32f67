"""`probe finetune` and `probe linear` (augmented mode) stop on Ctrl-C / SIGTERM like pretraining: the first signal
ends the step, writes checkpoints/resume.pt (mid-epoch if need be) and exits 130 / 143 with one line naming the
command that resumes; that command ends bitwise equal to an uninterrupted run (weights, history and metrics).

The signal is sent from inside the run at a chosen optimizer step (a hook on mimkit.loop.backward_step). Tiny runs on
digits: 64 images, batches of 16 (4 steps per epoch), 2 epochs, from a random-init digits MAE."""
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimkit import checkpoint
from mimkit.cli import main

DRIVER = '''
import os, signal, sys
from mimkit import loop
from mimkit.cli import main

name, n = os.environ["SIGNAL_AT"].split(":")  # "SIGINT:6": sent to this process during its 6th backward
real, calls = loop.backward_step, [0]

def hooked(*a, **k):
    calls[0] += 1
    if calls[0] == int(n):
        os.kill(os.getpid(), getattr(signal, name))
    return real(*a, **k)
loop.backward_step = hooked
sys.exit(main(sys.argv[1:]))
'''

TINY = ["data.limit=64", "data.test_limit=32", "batch_size=16", "epochs=2"]
# every generator the fine-tune draws from: drop path (torch), mixup / cutmix (NumPy), RandAugment and erasing
# (Python and NumPy, seeded per sample)
FINETUNE = [*TINY, "finetune.mixup=0.8", "finetune.cutmix=1.0", "finetune.auto_augment=rand-m9-mstd0.5-inc1",
            "finetune.reprob=0.25", "finetune.drop_path=0.1"]
LINEAR = [*TINY, "linear.mode=augmented"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A random-init digits MAE checkpoint."""
    from mimkit.config import to_dict
    from mimkit.methods import MAE, pretrain_config
    path = tmp_path_factory.mktemp("enc") / "mae.pt"
    cfg = pretrain_config([], ["data.name=digits"])
    torch.manual_seed(0)
    checkpoint.save({"mimkit": "pretrain", "model": MAE(cfg).state_dict(), "config": to_dict(cfg)}, path)
    return path


def launch(tmp_path: Path, argv: list[str], signal_at: str = "") -> tuple[int, str]:
    """`mimkit argv` in a subprocess with this process's thread count (the reference runs here: the same sums)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER if signal_at else "import sys\nfrom mimkit.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "SIGNAL_AT": signal_at}
    p = subprocess.run([sys.executable, str(driver), *argv], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=600)
    return p.returncode, p.stderr


def same_result(a: Path, b: Path, name: str, kind: str, key: str) -> None:
    """The two runs' checkpoints/<name> weights (`key`) and metrics (wall times aside) are equal, bitwise."""
    x, y = (checkpoint.load(d / "checkpoints" / name, kind) for d in (a, b))
    assert x[key].keys() == y[key].keys() and all(torch.equal(x[key][k], y[key][k]) for k in x[key])
    ma, mb = ({k: v for k, v in json.loads((d / "metrics.json").read_text()).items() if "seconds" not in k}
              for d in (a, b))
    assert ma == mb


def stopped_then_resumed(tmp_path: Path, argv: list[str], signal_at: str, code: int, where: str) -> Path:
    """Run `argv` stopped by `signal_at`: exit `code`, the one line naming `where` and the command that resumes;
    then that command, which finishes. Returns the run directory."""
    out = tmp_path / "stopped"
    rc, err = launch(tmp_path, [*argv, f"output_dir={out}"], signal_at)
    assert rc == code, err
    line, = err.strip().splitlines()
    assert line.startswith(f"stopped by {signal_at.split(':')[0]} after {where}, checkpoint written to "
                           f"{out / 'checkpoints' / 'resume.pt'}; resume with: mimkit {argv[0]} {argv[1]} "), line
    checkpoint.load(out / "checkpoints" / "resume.pt", "probe_train")  # passes its checksum
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[0] == "mimkit"
    rc, err = launch(tmp_path, command[1:])
    assert rc == 0, err
    assert "resumed from" in (out / "log.txt").read_text()
    return out


def test_ctrl_c_stops_finetune_mid_epoch_and_the_resume_line_continues_it_bitwise(encoder, tmp_path):
    argv = ["probe", "finetune", "--checkpoint", str(encoder), *FINETUNE]
    ref = tmp_path / "ref"
    assert main([*argv, f"output_dir={ref}"]) == 0
    # SIGINT in step 6's backward, read before step 7's: step 7 (epoch 2, iteration 3) ends, resume.pt holds the
    # epoch's progress
    out = stopped_then_resumed(tmp_path, argv, "SIGINT:6", 130, "step 7 (epoch 2, iteration 3)")
    same_result(ref, out, "last.pt", "finetune", "model")
    same_result(ref, out, "best.pt", "finetune", "model")


def test_sigterm_stops_the_augmented_linear_probe_at_an_epoch_end_and_it_resumes_bitwise(encoder, tmp_path):
    argv = ["probe", "linear", "--checkpoint", str(encoder), *LINEAR]
    ref = tmp_path / "ref"
    assert main([*argv, f"output_dir={ref}"]) == 0
    out = stopped_then_resumed(tmp_path, argv, "SIGTERM:3", 143, "step 4 (end of epoch 1)")
    same_result(ref, out, "last.pt", "linear_probe", "head")


def test_resume_none_starts_afresh_and_cached_mode_keeps_no_training_checkpoint(encoder, tmp_path):
    out = tmp_path / "run"
    argv = ["probe", "linear", "--checkpoint", str(encoder), *LINEAR, "epochs=1", f"output_dir={out}"]
    assert main(argv) == 0
    first = checkpoint.load(out / "checkpoints" / "resume.pt", "probe_train")
    assert first["epoch"] == 0 and first["step"] == 4
    assert main([*argv, "resume=none"]) == 0
    assert "resumed from" not in (out / "log.txt").read_text()  # the log was started afresh too
    assert main([*argv, "linear.mode=cached", "overwrite=true"]) == 0
    assert not (out / "checkpoints" / "resume.pt").exists() and (out / "checkpoints" / "last.pt").exists()
