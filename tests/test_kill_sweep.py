"""kill -9 at 20 seeded moments over the long commands: pretraining of one method per family (pixels: mae, HOG:
maskfeat, token ids: clustermim, teacher features: eva, EMA latents: data2vec2) and tokenizer training of every
kind (dvae, vqkd, kmeans, fsq, lfq, peco, lavit). Each moment is an optimizer step (SIGKILL during its backward)
or the middle of a checkpoint write (half the bytes on disk, then SIGKILL), drawn from a seeded generator; after each kill
the run's last.pt still passes its checksum, and after `resume=auto` the final weights and metrics are bitwise
those of an uninterrupted run (the references run in this process, the killed runs in subprocesses). Then 7 more:
`probe linear` (augmented, with its random-init baseline) and `probe finetune` at two seeded moments each, and a
tiny `mimkit study` killed inside its cell's pretraining, between two of its steps and while writing study.json;
rerun, each ends with an uninterrupted run's weights and metrics (the study: its study.json rows).

Tiny configs on digits (64 images, batches of 16: 4 steps per epoch, 2 epochs)."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from mimkit import checkpoint
from mimkit.cli import main

pytestmark = pytest.mark.slow

DRIVER = '''
import io, os, signal, sys
from mimkit import checkpoint, loop
from mimkit.cli import main

step, write = int(os.environ.get("KILL_STEP", "0")), int(os.environ.get("KILL_WRITE", "0"))
suffix, between = os.environ.get("KILL_SUFFIX", ".pt"), int(os.environ.get("KILL_BETWEEN", "0"))
# under torchrun: only the rank KILL_RANK of the first attempt dies (the restarted group finishes)
if os.environ.get("RANK", "0") != os.environ.get("KILL_RANK", os.environ.get("RANK", "0")) or \
        os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
    step = write = 0
calls = {"step": 0, "write": 0, "started": 0}
if step:
    real_step = loop.backward_step

    def backward_step(*a, **k):
        calls["step"] += 1
        if calls["step"] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(*a, **k)
    loop.backward_step = backward_step
if write:
    real_write = checkpoint.atomic_write

    def atomic_write(path, fn):
        calls["write"] += str(path).endswith(suffix)
        if calls["write"] != write or not str(path).endswith(suffix):
            return real_write(path, fn)
        buf = io.BytesIO()
        fn(buf)

        def half_then_die(f):
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(path, half_then_die)
    checkpoint.atomic_write = atomic_write
if between:  # a study killed as its between-th step starts (the steps before it finished or skipped)
    from mimkit.probes import study
    real_execute = study.execute

    def execute(*a, **k):
        calls["started"] += 1
        if calls["started"] == between:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_execute(*a, **k)
    study.execute = execute
sys.exit(main(sys.argv[1:]))
'''

EPOCHS, STEPS = 2, 4  # per run: 2 epochs of 4 steps
TINY = ["data.limit=64", "data.test_limit=32", "batch_size=16", f"epochs={EPOCHS}", "ckpt.every=1"]
PRETRAIN = [*TINY, "probe.enabled=false", "deterministic=true", "model.drop_path=0.1"]


def cases(teacher: Path, kmeans: Path) -> dict[str, list[str]]:
    """{name: the command's arguments} (output_dir added per run)."""
    pre = lambda m: ["pretrain", "--config", str(REPO / "configs" / "pretrain" / f"{m}_digits.yaml"), *PRETRAIN]  # noqa
    tok = lambda k: ["tokenizer", "train", "--config", str(REPO / "configs" / "tokenizer" / f"{k}_digits.yaml"),  # noqa
                     *TINY, "vis_every=2"]
    small = [f"teacher.name=mimkit:{teacher}", "embed_dim=32", "depth=1", "decoder_embed_dim=32"]
    return {"mae": pre("mae"), "maskfeat": pre("maskfeat"),
            "clustermim": [*pre("clustermim"), f"target.tokens.tokenizer={kmeans}"],
            "eva": [*pre("eva"), f"target.teacher.name=mimkit:{teacher}"], "data2vec2": pre("data2vec2"),
            "dvae": [*tok("dvae"), "dvae.hidden=8"], "vqkd": [*tok("vqkd"), small[0], *(f"vqkd.{s}" for s in small[1:])],
            "fsq": [*tok("fsq"), "fsq.objective=pixels", "fsq.hidden=16"],
            "lfq": [*tok("lfq"), small[0], *(f"lfq.{s}" for s in small[1:])],
            "peco": [*tok("peco"), small[0], "peco.hidden=8"],
            "lavit": [*tok("lavit"), small[0], *(f"lavit.{s}" for s in small[1:]), "lavit.num_heads=2",
                      "lavit.decoder_num_heads=2"]}


def kill_points(names: list[str], total: int = 20, seed: int = 24) -> dict[str, list[tuple[str, int]]]:
    """`total` moments spread over the commands (two each to the first, one each to the rest), ("step", n): killed in
    the n-th backward of the process, or ("write", k): in its k-th checkpoint write. Drawn before any run: the
    n and k are taken modulo what is left of the run when the process starts."""
    rng = random.Random(seed)
    per = {n: 2 if i < total - len(names) else 1 for i, n in enumerate(names)}
    return {n: [(rng.choice(["step", "step", "write"]), rng.randrange(1, 1000)) for _ in range(k)]
            for n, k in per.items()}


def done(out: Path, kind: str) -> tuple[int, int]:
    """(optimizer steps, epochs) in the run's last.pt, which must pass its checksum; (0, 0) without one."""
    last = out / "checkpoints" / "last.pt"
    if not last.exists():
        return 0, 0
    ckpt = checkpoint.load(last, kind)
    return ckpt["step"], ckpt["epoch"] + 1


def killed_run(driver: Path, args: list[str], out: Path, point: tuple[str, int], kind: str) -> None:
    steps, epochs = done(out, kind)
    what, n = point
    left = EPOCHS * STEPS - steps if what == "step" else EPOCHS - epochs
    if left <= 0:
        return
    assert launch(driver, [*args, f"output_dir={out}"], {f"KILL_{what.upper()}": str(1 + n % left)}) == -signal.SIGKILL
    done(out, kind)  # what a kill leaves behind loads and passes its checksum


def launch(driver: Path, args: list[str], env: dict | None = None) -> int:
    """The driver in a subprocess with this process's thread count (the references run here: the same sums)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    p = subprocess.run([sys.executable, str(driver), *args], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=600)
    assert p.returncode in (0, -signal.SIGKILL), p.stderr[-2000:]
    return p.returncode


def result(out: Path, pretrain: bool) -> tuple[dict, dict]:
    """(weights, metrics without wall-clock times) of a finished run."""
    state = (checkpoint.load(out / "checkpoints" / "last.pt")["model"] if pretrain
             else checkpoint.load(out / "tokenizer.pt", "tokenizer")["state"])
    metrics = json.loads((out / "metrics.json").read_text())
    return state, {k: v for k, v in metrics.items() if "seconds" not in k and "per_s" not in k and k != "tokenizer"}


NAMES = ["mae", "maskfeat", "clustermim", "eva", "data2vec2", "dvae", "vqkd", "fsq", "lfq", "peco", "lavit", "kmeans"]
POINTS = kill_points(NAMES)


def test_the_sweep_kills_twenty_times():
    assert sum(len(p) for p in POINTS.values()) == 20 and len(POINTS["kmeans"]) == 1
    assert sum(len(p) for p in PROBE_POINTS.values()) == 4 and len(STUDY_POINTS) == 3  # 27 over 15 commands


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A random-init digits MAE as the teacher, the k-means tokenizer ClusterMIM predicts (also the k-means
    reference), and the cases' arguments."""
    from mimkit.config import to_dict
    from mimkit.methods import MAE, pretrain_config
    root = tmp_path_factory.mktemp("sweep")
    cfg = pretrain_config([], ["data.name=digits"])
    torch.manual_seed(0)
    checkpoint.save({"mimkit": "pretrain", "model": MAE(cfg).state_dict(), "config": to_dict(cfg)}, root / "t.pt")
    kmeans = ["tokenizer", "train", "--config", str(REPO / "configs" / "tokenizer" / "kmeans_digits.yaml"),
              "data.limit=64", "data.test_limit=32", "kmeans.max_samples=2000"]
    assert main([*kmeans, f"output_dir={root / 'kmeans'}"]) == 0
    return root, {**cases(root / "t.pt", root / "kmeans" / "tokenizer.pt"), "kmeans": kmeans}


@pytest.mark.parametrize("name", NAMES)
def test_kill9_at_seeded_moments_then_resume_is_bitwise_exact(inputs, name, tmp_path):
    root, table = inputs
    args, pretrain, out = table[name], table[name][0] == "pretrain", tmp_path / "killed"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ref = root / "kmeans"
    if name != "kmeans":
        ref = tmp_path / "ref"
        assert main([*args, f"output_dir={ref}"]) == 0
    # k-means has no steps or checkpoints: it is killed writing its tokenizer file
    for point in POINTS[name] if name != "kmeans" else [("write", 0)]:
        killed_run(driver, args, out, point, "pretrain" if pretrain else "tokenizer_train")
    assert launch(driver, [*args, f"output_dir={out}"]) == 0
    (a, ma), (b, mb) = result(ref, pretrain), result(out, pretrain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ma == mb


# `probe linear` (augmented, with its random-init baseline: two trainings) and `probe finetune`, two moments each
PROBE_POINTS = kill_points(["probe_linear", "probe_finetune"], total=4, seed=25)
PROBE_TRAININGS = {"probe_linear": 2, "probe_finetune": 1}


def probe_cases(encoder: Path) -> dict[str, list[str]]:
    tiny = ["--checkpoint", str(encoder), *TINY[:-1]]  # a probe checkpoints every epoch (no ckpt.every)
    return {"probe_linear": ["probe", "linear", *tiny, "linear.mode=augmented", "linear.random_init=true"],
            "probe_finetune": ["probe", "finetune", *tiny, "finetune.mixup=0.8", "finetune.cutmix=1.0",
                               "finetune.auto_augment=rand-m9-mstd0.5-inc1", "finetune.reprob=0.25"]}


def probe_done(out: Path) -> tuple[int, int]:
    """(optimizer steps, epochs) over the probe's training checkpoints (checkpoints/resume*.pt), which must pass
    their checksums."""
    ckpts = [checkpoint.load(p, "probe_train") for p in sorted(out.glob("checkpoints/resume*.pt"))
             if ".prev." not in p.name]
    return sum(c["step"] for c in ckpts), sum(c["epoch"] + 1 for c in ckpts)


@pytest.mark.parametrize("name", list(PROBE_POINTS))
def test_kill9_probes_at_seeded_moments_then_resume_is_bitwise_exact(inputs, name, tmp_path):
    root, _ = inputs
    args, ref, out = probe_cases(root / "t.pt")[name], tmp_path / "ref", tmp_path / "killed"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    assert main([*args, f"output_dir={ref}"]) == 0
    epochs = PROBE_TRAININGS[name] * EPOCHS
    for what, n in PROBE_POINTS[name]:  # n modulo the steps, or the epochs' checkpoint writes, left
        steps, done_epochs = probe_done(out)
        left = epochs * STEPS - steps if what == "step" else epochs - done_epochs
        kill = {f"KILL_{what.upper()}": str(1 + n % left)}
        assert launch(driver, [*args, f"output_dir={out}"], kill) == -signal.SIGKILL
    probe_done(out)
    assert launch(driver, [*args, f"output_dir={out}"]) == 0
    kind, key = ("finetune", "model") if name == "probe_finetune" else ("linear_probe", "head")
    for file in ("last.pt", "best.pt") if name == "probe_finetune" else ("last.pt",):
        a, b = (checkpoint.load(d / "checkpoints" / file, kind)[key] for d in (ref, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    ma, mb = ({k: v for k, v in json.loads((d / "metrics.json").read_text()).items() if k != "seconds"}
              for d in (ref, out))
    assert ma == mb


# `mimkit study`: one digits cell, its k-NN and augmented linear probes; killed in its cell's pretraining (a seeded
# step), as a seeded step of the plan starts (2: the k-NN probe, 3: the linear probe) and while writing study.json
_rng = random.Random(26)
STUDY_POINTS = [{"KILL_STEP": str(_rng.randrange(1, EPOCHS * STEPS + 1))}, {"KILL_BETWEEN": str(_rng.randrange(2, 4))},
                {"KILL_WRITE": "1", "KILL_SUFFIX": "study.json"}]
STUDY = {"data": {"name": "digits", "limit": 64, "test_limit": 32}, "budget": {"epochs": EPOCHS},
         "overrides": ["batch_size=16", "ckpt.every=1", "deterministic=true", "model.drop_path=0.1"],
         "cells": {"mae": {"method": "mae"}}, "probes": ["knn", "linear"],
         "probe": {"knn": {"overrides": ["data.limit=64", "data.test_limit=32"]},
                   "linear": {"overrides": ["linear.mode=augmented", "epochs=1", "batch_size=16", "data.limit=64",
                                            "data.test_limit=32"]}}}


def test_kill9_study_at_seeded_moments_then_rerun_ends_with_the_same_rows(tmp_path):
    import yaml
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = ["study", "--config", str(study)]
    assert main([*args, f"output_dir={tmp_path / 'ref'}"]) == 0
    for kill in STUDY_POINTS:
        assert launch(driver, [*args, f"output_dir={tmp_path / 'killed'}"], kill) == -signal.SIGKILL
    assert launch(driver, [*args, f"output_dir={tmp_path / 'killed'}"]) == 0
    a, b = (json.loads((tmp_path / d / "study.json").read_text()) for d in ("ref", "killed"))
    wall = ("train_seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in wall} for r in a["rows"]] == \
        [{k: v for k, v in r.items() if k not in wall} for r in b["rows"]]
    assert a["rows"][0]["knn"] is not None and a["rows"][0]["linear"] is not None and a["baselines"] == b["baselines"]


# The restarted rank 1 starts 3 s after rank 0: rank 0 looks up rank 1's address in the agent's store before the new
# rank 1 has published it, as a slower start does at random. Without mimkit.dist.elastic_store it read the killed
# rank's stale address and the restarted group failed to connect ("Connection refused").
LATE_RESTART = """if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and os.environ.get("RANK") == "1":
    import time
    time.sleep(3)
"""


def test_a_rank_killed_under_torchrun_restarts_the_group_from_last_pt_bitwise(tmp_path):
    """torchrun --max-restarts 1 (gloo, CPU): rank 1 killed with SIGKILL in its 11th step (epoch 2 of 8-step
    epochs); the agent restarts both ranks, which resume from last.pt (epoch 1) and end with an uninterrupted
    two-rank run's weights."""
    import socket
    driver = tmp_path / "driver.py"
    assert DRIVER.count("sys.exit(main(") == 1
    driver.write_text(DRIVER.replace("sys.exit(main(", LATE_RESTART + "sys.exit(main("))
    args = ["pretrain", "data.name=synthetic", "data.synthetic_size=128", "batch_size=8", "epochs=2", "ckpt.every=1",
            "deterministic=true", "model.drop_path=0.1", "probe.enabled=false"]

    def torchrun(out: Path, env: dict) -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(driver), *args, f"output_dir={out}"]
        p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-3000:]
        return (out / "log.txt").read_text().count("resumed from")

    assert torchrun(tmp_path / "ref", {}) == 0
    assert torchrun(tmp_path / "killed", {"KILL_STEP": "11", "KILL_RANK": "1"}) == 1  # the restarted group resumed
    a, b = (checkpoint.load(tmp_path / d / "checkpoints" / "last.pt") for d in ("ref", "killed"))
    assert a["step"] == b["step"] == 16 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
