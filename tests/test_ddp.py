"""DDP on CPU (gloo) under torchrun: 2 processes x batch b == 1 process x batch 2b, and exact resume under DDP.

One torchrun launch (2 processes) runs all the distributed trainings in a row, keeping its process group
(starting Python + torch costs far more than these tiny runs)."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import make_cfg
from mimkit.checkpoint import load
from mimkit.engine import train
from mimkit.methods import build_method

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

# 160 synthetic images, 2 epochs: 10 steps/epoch of 16 images, 20 optimizer steps. blr 1e-2: the weights move
# ~1e-2, so a mismatch (wrong data split, lr not scaled by the world size, ...) is far above the 1e-5 bound.
COMMON = ["data.synthetic_size=160", "optim.blr=1e-2", "ckpt.every=1"]

WORKER = textwrap.dedent("""
    import sys
    import torch
    from mimkit import data, dist, engine
    from mimkit.methods import pretrain_config

    base, common = sys.argv[1], sys.argv[2:]
    cfg = lambda name, *o: pretrain_config([], ["data.name=synthetic", f"output_dir={base}/{name}", *common, *o])
    dist.cleanup = lambda: None  # keep one process group for all the runs below

    engine.train(cfg("ddp", "epochs=2", "batch_size=8"))
    engine.train(cfg("full", "epochs=3", "batch_size=8", "model.drop_path=0.2"))

    class Preempted(Exception):
        pass

    real_set_epoch = data.EpochSampler.set_epoch
    def preempt_at_epoch_1(self, epoch):  # every rank stops right after the first epoch's checkpoint
        if epoch == 1:
            raise Preempted
        real_set_epoch(self, epoch)

    data.EpochSampler.set_epoch = preempt_at_epoch_1
    try:
        engine.train(cfg("resumed", "epochs=3", "batch_size=8", "model.drop_path=0.2"))
        raise SystemExit("the run was not interrupted")
    except Preempted:
        pass
    data.EpochSampler.set_epoch = real_set_epoch
    engine.train(cfg("resumed", "epochs=3", "batch_size=8", "model.drop_path=0.2"))
    torch.distributed.destroy_process_group()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    (base / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(base / "worker.py"), str(base), *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base


@pytest.fixture(autouse=True)
def one_thread():
    # like the torchrun workers (OMP_NUM_THREADS=1); two threads on two shared, busy cores run ~10x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def weights(run_dir):
    return load(run_dir / "checkpoints" / "last.pt")["model"]


def test_two_processes_match_one_process_with_twice_the_batch(ddp_runs, tmp_path):
    cfg = make_cfg(tmp_path, *COMMON, "epochs=2", "batch_size=16", f"output_dir={tmp_path / 'single'}")
    single = train(cfg)
    torch.manual_seed(cfg.seed)
    init = build_method(cfg).state_dict()
    a, b = weights(tmp_path / "single"), weights(ddp_runs / "ddp")
    ckpt = load(ddp_runs / "ddp" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 20 and load(tmp_path / "single" / "checkpoints" / "last.pt")["step"] == 20
    assert a.keys() == b.keys()
    moved = max((a[k].float() - init[k].float()).abs().max().item() for k in a)
    assert moved > 1e-3, moved  # the bound below is meaningful: training changed the weights by far more
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("qkv.bias"):
            # The key bias gets no gradient in exact arithmetic (softmax ignores a shift shared by all logits):
            # its updates are rounding noise scaled up by Adam, different for any summation order. Skip it.
            x, y = x.view(3, -1)[[0, 2]], y.view(3, -1)[[0, 2]]
        torch.testing.assert_close(y, x, rtol=0, atol=1e-5, msg=k)
    # the logged loss is the mean over both ranks, i.e. the loss of the whole 2b batch
    assert ckpt["history"][-1]["loss"] == pytest.approx(single["loss_history"][-1], abs=1e-5)
    assert "world 2" in (ddp_runs / "ddp" / "log.txt").read_text()


def test_resume_under_ddp_is_exact_with_per_rank_drop_path(ddp_runs):
    full, resumed = ddp_runs / "full", ddp_runs / "resumed"
    assert "resumed from" in (resumed / "log.txt").read_text()
    a, b = weights(full), weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca, cb = (load(d / "checkpoints" / "last.pt") for d in (full, resumed))
    assert [h["loss"] for h in ca["history"]] == [h["loss"] for h in cb["history"]]
    # each rank keeps its own generator (drop path differs per rank), all of them saved for the resume
    states = ca["rng_ranks"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
