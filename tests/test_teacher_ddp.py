"""A frozen teacher under DDP (2 processes, gloo, CPU, torchrun): for eva, maskdistill and milan (a mimkit teacher)
and data2vec2 (the EMA teacher), the DistributedDataParallel that `engine.train` builds holds only the student's
trainable parameters in its gradient buckets, none of the teacher's; after the run the teacher has no gradient,
the frozen teacher is bitwise the file it was loaded from, and every rank holds the same teacher.

One torchrun launch trains the four methods in a row (one optimizer step each per rank), keeping its process
group, as tests/test_ddp.py does."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mimkit import checkpoint
from mimkit.config import to_dict
from mimkit.methods import build_method, pretrain_config

from test_ddp import free_port

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

METHODS = ("eva", "maskdistill", "milan", "data2vec2")
COMMON = ["data.name=synthetic", "data.synthetic_size=32", "batch_size=8", "epochs=1", "probe.enabled=false",
          "mask.clones=2"]

WORKER = """
import json
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mimkit import dist, engine
from mimkit.methods import pretrain_config

base, teacher, methods, common = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
dist.cleanup = lambda: None  # one process group for every run
built = []


class Recording(engine.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        built.append(self)


engine.DistributedDataParallel = Recording
seen = {}


def before_step(optimizer, args, kwargs):  # the gradients as the optimizer steps (it zeroes them after)
    frozen = {id(p): p for p in built[-1].module.target.teacher.parameters()}
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    seen["teacher_grads"] = seen.get("teacher_grads", 0) + sum(p.grad is not None for p in frozen.values())
    seen["teacher_in_optimizer"] = seen.get("teacher_in_optimizer", 0) + sum(id(p) in frozen for p in stepped)
    seen["student_grads"] = seen.get("student_grads", 0) + sum(p.grad is not None for p in stepped)


register_optimizer_step_pre_hook(before_step)
report = {}
for method in methods:
    extra = ["target.ema.top_k=1"] if method == "data2vec2" else [f"target.teacher.name=mimkit:{teacher}"]
    engine.train(pretrain_config([], [f"method={method}", *common, f"output_dir={base}/{method}", *extra]))
    ddp = built[-1]
    frozen = list(ddp.module.target.teacher.parameters())
    ids = {id(p) for p in frozen}
    student = [p for p in ddp.module.parameters() if p.requires_grad and id(p) not in ids]
    logged = ddp._get_ddp_logging_data()
    flat = torch.cat([p.detach().flatten() for p in frozen])
    same = dist.all_gather_object(flat)
    report[method] = {
        "bucket_bytes": sum(int(b) for b in str(logged["bucket_sizes"]).split(",") if b.strip()),
        "ddp_tensors": logged["num_parameter_tensors"], "ddp_bytes": logged["total_parameter_size_bytes"],
        "student_tensors": len(student), "student_bytes": sum(p.numel() * p.element_size() for p in student),
        "teacher_tensors": len(frozen), "teacher_in_ddp": sum(id(p) in ids for p in ddp._module_parameters
                                                              if p.requires_grad),
        "teacher_requires_grad": sum(p.requires_grad for p in frozen),
        "teacher_grads_after": sum(p.grad is not None for p in frozen), **seen,
        "ranks_equal": all(torch.equal(same[0], s) for s in same),
    }
    seen.clear()
    if method != "data2vec2":
        torch.save(ddp.module.target.teacher.model.state_dict(), f"{base}/{method}/teacher_after.pt")
if dist.is_main():
    with open(f"{base}/report.json", "w") as f:
        json.dump(report, f)
torch.distributed.destroy_process_group()
sys.stdout.flush()
import os
os._exit(0)  # as tests/test_latent_targets.py: no interpreter teardown with gloo's threads alive
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("teacher_ddp")
    torch.manual_seed(0)  # a random mimkit encoder as the teacher, shaped like the synthetic preset's student
    teacher_cfg = pretrain_config([], ["method=mae", *COMMON])
    checkpoint.save({"mimkit": "pretrain", "model": build_method(teacher_cfg).state_dict(),
                     "config": to_dict(teacher_cfg)}, base / "teacher.pt")
    (base / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(base / "worker.py"), str(base), str(base / "teacher.pt"),
           ",".join(METHODS), *COMMON]
    proc = subprocess.run(cmd, cwd=base, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base, json.loads((base / "report.json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_teacher_is_in_no_ddp_bucket_and_gets_no_gradient(runs, method):
    r = runs[1][method]
    assert r["teacher_tensors"] > 0 and r["teacher_requires_grad"] == 0
    assert r["teacher_in_ddp"] == 0
    # the buckets hold exactly the student's trainable tensors: a teacher tensor in them would add its bytes
    assert r["ddp_tensors"] == r["student_tensors"]
    assert r["bucket_bytes"] == r["ddp_bytes"] == r["student_bytes"]
    # at every optimizer step: the student has gradients, the teacher none and is not among the stepped tensors
    assert r["student_grads"] > 0
    assert r["teacher_grads"] == r["teacher_in_optimizer"] == r["teacher_grads_after"] == 0
    assert r["ranks_equal"]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "data2vec2"])
def test_frozen_teacher_is_unchanged_by_training(runs, method):
    base = runs[0]
    stored = checkpoint.load(base / "teacher.pt")["model"]
    after = torch.load(base / method / "teacher_after.pt", weights_only=True)
    encoder = {k[len("encoder."):]: v for k, v in stored.items() if k.startswith("encoder.")}
    assert after.keys() == encoder.keys()
    for k, v in after.items():
        assert torch.equal(v, encoder[k]), k
