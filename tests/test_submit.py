"""`mimkit submit` with submitit's local executor: a real job completes, and a job preempted mid-run requeues
itself and finishes with the same weights as the uninterrupted one. Both jobs run side by side."""
import argparse
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from mimkit import submit
from mimkit.checkpoint import load
from mimkit.cli import build_parser, main
from mimkit.config import ConfigError

EPOCHS = 4  # 8 steps/epoch of a tiny ViT: the preempted job still has epochs to run when USR2 arrives
RUN = ["data.name=synthetic", "data.synthetic_size=256", f"epochs={EPOCHS}", "model.drop_path=0.1"]


def parse(*argv: str) -> tuple[argparse.Namespace, list[str]]:
    return submit.split_args(build_parser().parse_args(["submit", *argv]))


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("needs /proc/<pid>/task/<pid>/children to find the job's task process")
    base = tmp_path_factory.mktemp("submit")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the jobs inherit it: two jobs share two cores
    try:
        opts, argv = parse("pretrain", "--executor", "local", "--gpus-per-node", "0", *RUN, f"output_dir={base / 'full'}")
        full, _ = submit.submit(argv, opts, build_parser(), main)
        opts, argv = parse("--executor", "local", "pretrain", *RUN, f"output_dir={base / 'preempted'}",
                           "--gpus-per-node", "0")
        preempted, _ = submit.submit(argv, opts, build_parser(), main)
    finally:
        os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.update(OMP_NUM_THREADS=old)
    try:
        # preempt after the first checkpoint, as SLURM would: USR2 to the task (the controller's child)
        wait_for((base / "preempted" / "checkpoints" / "last.pt").exists, 300, "the first checkpoint")
        task = children(preempted._process.pid)
        assert len(task) == 1
        os.kill(task[0], signal.SIGUSR2)
        results = full.results(), preempted.results()
    finally:
        for job in (full, preempted):
            if not job.done():
                job.cancel()
    return base, full, preempted, results


def test_local_job_completes_and_records_itself(jobs):
    base, full, _, (results, _) = jobs
    out = base / "full"
    assert results[0]["epochs"] == EPOCHS  # the job returns metrics.json
    assert load(out / "checkpoints" / "last.pt")["epoch"] == EPOCHS - 1
    record = json.loads((out / "jobs.json").read_text())
    assert [r["job_id"] for r in record] == [full.job_id] and record[0]["executor"] == "local"
    assert "resume=auto" in record[0]["command"] and Path(record[0]["stdout"]).exists()
    assert "mae on synthetic" in Path(record[0]["stdout"]).read_text()  # the job's output is in the run dir
    assert (out / "config.yaml").exists() and (out / "log.txt").exists()


def test_preempted_job_requeues_and_ends_with_the_same_weights(jobs):
    base, _, preempted, _ = jobs
    log = (base / "preempted" / "log.txt").read_text()
    assert log.count("mae on synthetic") == 2 and "resumed from" in log  # two attempts, the second resumed
    assert "Requeued" in Path(preempted.paths.stdout).read_text()  # by Job.checkpoint, from submitit's handler
    a, b = (load(base / name / "checkpoints" / "last.pt") for name in ("full", "preempted"))
    assert a["epoch"] == b["epoch"] == EPOCHS - 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_checkpoint_requeues_with_resume_auto(tmp_path):
    job = submit.Job(["pretrain"], ["resume=none", "overwrite=true", "epochs=3"], [], str(tmp_path), main)
    again = job.checkpoint().function  # no last.pt yet: start again as the first attempt did
    assert again.argv == ["pretrain", "resume=none", "epochs=3", "overwrite=false"]
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    again = job.checkpoint().function
    assert isinstance(again, submit.Job) and again.argv[-2:] == ["overwrite=false", "resume=auto"]
    probe = submit.Job(["probe", "linear", "--checkpoint", "c.pt"], ["epochs=1"], ["/x.yaml"], str(tmp_path), main)
    assert probe.checkpoint().function.argv == ["probe", "linear", "--checkpoint", "c.pt", "epochs=1",
                                                "overwrite=true", "--config", "/x.yaml"]


def test_options_after_the_command_and_config_paths(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\n")
    opts, argv = parse("--nodes", "2", "pretrain", "--config", str(cfg), "--gpus-per-node", "8", "data.name=synthetic",
                       "--partition", "gpu")
    assert (opts.nodes, opts.gpus_per_node, opts.partition, opts.executor) == (2, 8, "gpu", "slurm")
    assert argv == ["pretrain", "--config", str(cfg), "data.name=synthetic"]
    monkeypatch.chdir(tmp_path)
    job, prepare = submit.make_job(["pretrain", "--config", "c.yaml", "data.name=synthetic"], build_parser(), main)
    out = tmp_path.resolve() / "runs" / "mae_synthetic"
    assert job.configs == [str(cfg.resolve())] and f"output_dir={out}" in job.overrides  # absolute paths
    prepare()
    assert (out / "config.yaml").exists()  # the resolved config, written at submission


def test_slurm_executor_parameters(tmp_path, monkeypatch):
    import submitit.slurm.slurm as slurm
    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # pretend srun exists
    opts, _ = parse("pretrain", "--nodes", "8", "--gpus-per-node", "8", "--partition", "learn", "--account", "vision",
                    "--timeout", "600", "--mem", "400", "--cpus-per-task", "10")
    ex = submit.build_executor(opts, tmp_path / "submitit", "pretrain")
    script = ex._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--partition=learn",
                 "--account=vision", "--time=600", "--mem=400GB", "--signal=USR2@120", "--requeue"):
        assert f"#SBATCH {line}" in script, line


def test_user_mistakes_are_one_line_errors(tmp_path, monkeypatch, capsys):
    import submitit.slurm.slurm as slurm
    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", staticmethod(lambda: -1))  # no SLURM here
    out = tmp_path / "r"
    assert main(["submit", "pretrain", "data.name=synthetic", f"output_dir={out}"]) == 2
    assert "error: --executor slurm" in capsys.readouterr().err
    assert main(["submit", "pretrain", "--executor", "local", "--nodes", "2", "data.name=synthetic",
                 f"output_dir={out}"]) == 2
    assert "--executor local runs on this machine only" in capsys.readouterr().err
    assert not out.exists()  # nothing written for a job that was not submitted
    with pytest.raises(ConfigError, match="optim.bllr"):
        submit.make_job(["pretrain", "data.name=synthetic", "optim.bllr=1", f"output_dir={out}"], build_parser(), main)
