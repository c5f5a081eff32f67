"""`python -m benchmarks gpu [--dry-run] [--out DIR]`: the one-shot check for a CUDA machine, one command under
a hard time budget (`bash benchmarks/gpu_check.sh` installs mimkit without dependencies first, then runs this).

Parts, in order, each under its own budget (seconds, `BUDGETS`) and all of them under `TOTAL_S`:
  tests     `pytest -m cuda tests/test_cuda.py` in a child process (killed with its children past the budget)
  eager     ViT-B/16 at 224 px, bf16, batch 64: every method's training-step images/s and peak GPU memory; the
            bf16 matmul's FLOP/s and MAE's model FLOPs per step (for MAE's FLOP/s over the matmul's)
  compiled  the same steps with compile=true, MAE first (each compilation takes tens of seconds)
  loader    `benchmarks.loader` on this machine's cores (per core and with every core as a loader worker), and
            torchvision's decode_jpeg on the GPU
Each part records what it measured as it goes; a failure or an overrun is recorded with the part and the next
part runs. gpu.json and gpu.md (one markdown table per part) are rewritten after every part, in --out (default
$OUT, else benchmarks/results/gpu): a kill from outside leaves the parts done so far.

--dry-run runs the same code on the CPU in seconds: the tiny preset, a few steps, compile traced with dynamo's
"eager" backend (no code generation), a few small JPEGs (tests/test_benchmarks_smoke.py runs it)."""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

import torch

from mimkit.methods import METHODS

from .common import count_flops, machine_info, matmul_fn, results_dir, time_it
from .step import REPO, build_step, method_config

TOTAL_S = 470  # of the 8 minutes the issue allows; gpu_check.sh's install takes the rest
BUDGETS = {"tests": 120, "eager": 115, "compiled": 170, "loader": 55}
RESERVE_S = 5  # kept back from every part for writing the report
GOAL_MAE_COMPILED = 0.45  # MAE's model FLOP/s over the bf16 matmul's, compiled (issue 23)
# module -> what needs it here ("" when nothing in this check does)
OPTIONAL = {"faiss": "the FAISS GPU k-means test (a faiss with GPU support)", "open_clip": "",
            "submitit": ""}
DRY_RUN_METHODS = ("mae", "clustermim", "eva")
REQUIRED = ("torch", "torchvision", "timm", "numba", "sklearn", "skimage", "tensorboard", "tqdm", "yaml", "PIL")


class OutOfTime(BaseException):
    """A part ran past its budget (a BaseException, so a part's own `except Exception` lets it through)."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise OutOfTime in this (the main) thread after `seconds`."""
    def stop(signum, frame):
        raise OutOfTime(f"stopped at its budget of {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def packages() -> dict:
    """Version of each package the check uses, or None; what a missing optional one skips."""
    versions = {}
    for name in (*REQUIRED, *OPTIONAL):
        if importlib.util.find_spec(name) is None:
            versions[name] = None
            continue
        dist = {"sklearn": "scikit-learn", "skimage": "scikit-image", "yaml": "pyyaml", "PIL": "pillow",
                "open_clip": "open_clip_torch", "faiss": "faiss"}.get(name, name)
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # faiss-gpu-cu12, faiss-cpu, ...: present, version unknown
            versions[name] = "installed"
    skipped = {n: what or "nothing in this check" for n, what in OPTIONAL.items() if versions[n] is None}
    return {"versions": versions, "missing_optional_skips": skipped}


def gpu_info() -> dict | None:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2 ** 30, 1),
            "count": torch.cuda.device_count(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}


# ---------------------------------------------------------------------------------------------
# Parts: each fills its record as it goes


def run_tests(rec: dict, seconds: float, dry_run: bool) -> None:
    """`pytest -m cuda` on tests/test_cuda.py in its own process group (the NCCL test starts torchrun), killed
    past `seconds`; per test its outcome and first message line, from pytest's JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
               "tests/test_cuda.py"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=seconds - RESERVE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            rec["error"] = f"pytest killed at its budget of {seconds - RESERVE_S:.0f} s"
        finally:
            if proc.poll() is None:  # OutOfTime (or anything else) on the way out: no orphaned torchrun
                os.killpg(proc.pid, signal.SIGKILL)
        rec["returncode"] = proc.returncode
        rec["output_tail"] = out[-3000:]
        rec["tests"] = junit_outcomes(xml) if xml.exists() else {}
    counts = {}
    for t in rec["tests"].values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    rec["counts"] = counts
    if proc.returncode not in (0, 5) or "error" in rec:  # 5: nothing collected (cannot happen unless the marker breaks)
        raise RuntimeError(rec.get("error") or f"pytest exit status {proc.returncode}: {counts}")


def junit_outcomes(xml: Path) -> dict:
    tests = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
        tests[case.get("name")] = {"outcome": outcome, "message": message}
    return tests


def step_row(method: str, compiled: bool, dry_run: bool, tmp: Path, batch: int | None = None) -> dict:
    """One method's step: images/s (median of 3 timed rounds), compile + warmup seconds, peak GPU memory."""
    extra = [f"compile={str(compiled).lower()}", *([f"batch_size={batch}"] if batch else [])]
    cfg = method_config(method, "tiny" if dry_run else "vit_b", ("precision=bf16", *extra), tmp)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()  # each model compiles afresh (shared forward code would hit dynamo's recompile limit)
    step, model, imgs, mask = build_step(cfg, backend="eager" if dry_run else "inductor")
    t = time.perf_counter()
    for _ in range(1 if dry_run else 3):  # the first compiles, when compiled
        step()
    if cuda:
        torch.cuda.synchronize()
    row = {"method": method, "compiled": compiled, "batch": cfg.batch_size,
           "warmup_s": time.perf_counter() - t}
    steps = 1 if dry_run else 5
    seconds = time_it(lambda: [step() for _ in range(steps)], repeats=1 if dry_run else 3, warmup=0) / steps
    row.update(step_s=seconds, images_per_s=cfg.batch_size / seconds,
               peak_memory_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)
    if method == "mae" and not compiled:
        row["flops_per_step"] = count_flops(step)  # forward + backward, the model's FLOPs (the same compiled)
    return row


def run_steps(rec: dict, compiled: bool, dry_run: bool) -> None:
    """Every method's step row (a failing method is recorded and the others run); MAE first, then MAE at batch
    256 (a GPU's throughput at batch 64 is bounded by kernel launches), then the rest."""
    rec["rows"] = []
    if not compiled:
        n = 256 if dry_run else 8192
        fn, flops = matmul_fn(n, "cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16)
        rec["matmul_bf16"] = {"n": n, "flops_per_s": flops / time_it(fn, repeats=10, warmup=3)}
    order = [("mae", None), ("mae", 4 if dry_run else 256)] + [(m, None) for m in METHODS if m != "mae"]
    if dry_run:  # the paths, not every method: a pixel, a tokenizer and a teacher target (all take a minute here)
        order = [o for o in order if o[0] in DRY_RUN_METHODS][:1 if compiled else None]
    with tempfile.TemporaryDirectory() as tmp:
        for method, batch in order:
            try:
                rec["rows"].append(step_row(method, compiled, dry_run, Path(tmp), batch))
            except Exception as e:  # one method that fails to build, compile or run does not stop the others
                rec["rows"].append({"method": method, "compiled": compiled, "batch": batch, "error": error_line(e),
                                    "traceback": traceback.format_exc()[-2000:]})
            finally:
                gc.collect()
            print(f"  {json.dumps({k: v for k, v in rec['rows'][-1].items() if k != 'traceback'})}", flush=True)


def run_loader(rec: dict, dry_run: bool) -> None:
    from .loader import gpu_decode, measure
    n = 16 if dry_run else 640
    with tempfile.TemporaryDirectory() as tmp:
        rec.update(measure(Path(tmp), n, repeats=1 if dry_run else 3, workers=1 if dry_run else os.cpu_count()))
        try:  # its own record: a torchvision built without nvjpeg keeps the measurements above
            rec["decode_jpeg"] = gpu_decode(Path(tmp), "cuda" if torch.cuda.is_available() else "cpu")
        except Exception as e:
            rec["decode_jpeg"] = {"error": error_line(e)}


# ---------------------------------------------------------------------------------------------
# The run and its report


def run_part(report: dict, name: str, fn: Callable[[dict, float], None], started: float, save: Callable) -> None:
    budget = min(BUDGETS[name], TOTAL_S - (time.perf_counter() - started)) - RESERVE_S
    rec = report["parts"][name] = {"status": "running", "budget_s": BUDGETS[name]}
    if budget <= 0:
        rec["status"] = "skipped: no time left"
        return
    print(f"== gpu check: {name} (budget {budget:.0f} s)", flush=True)
    t = time.perf_counter()
    try:
        with deadline(budget):
            fn(rec, budget)
        rec["status"] = "ok"
    except OutOfTime as e:
        rec["status"], rec["error"] = "out of time", str(e)
    except Exception as e:  # recorded with the part; the next part runs
        rec["status"], rec["error"] = "failed", error_line(e)
        rec["traceback"] = traceback.format_exc()[-3000:]
    rec["seconds"] = time.perf_counter() - t
    print(f"   {name}: {rec['status']} in {rec['seconds']:.0f} s {rec.get('error', '')}", flush=True)
    save(report)


def out_dir(out: str | None) -> Path:
    return Path(out or os.environ.get("OUT") or results_dir() / "gpu")


def run(dry_run: bool = False, out: str | None = None) -> dict:
    started = time.perf_counter()
    folder = out_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "gpu", "dry_run": dry_run, "machine": machine_info(), "gpu": gpu_info(),
              "install": os.environ.get("MIMKIT_GPU_CHECK_INSTALL", "not run (python -m benchmarks gpu)"),
              "packages": packages(), "budgets_s": {**BUDGETS, "total": TOTAL_S}, "parts": {}}
    if not dry_run and report["gpu"] is None:
        report["error"] = "no CUDA device: nothing to measure (--dry-run runs the code path on the CPU)"

    def save(r: dict) -> None:
        r["seconds"] = time.perf_counter() - started
        from mimkit.checkpoint import atomic_write_text
        atomic_write_text(folder / "gpu.json", json.dumps(r, indent=2, default=str))
        atomic_write_text(folder / "gpu.md", markdown(r))

    save(report)
    if "error" not in report:
        parts = {"tests": lambda rec, s: run_tests(rec, s, dry_run),
                 "eager": lambda rec, s: run_steps(rec, False, dry_run),
                 "compiled": lambda rec, s: run_steps(rec, True, dry_run),
                 "loader": lambda rec, s: run_loader(rec, dry_run)}
        for name, fn in parts.items():
            run_part(report, name, fn, started, save)
    report["mae_flops_fraction"] = mae_fractions(report)
    save(report)
    print(markdown(report))
    print(f"written to {folder / 'gpu.json'} and {folder / 'gpu.md'}")
    return report


def mae_fractions(report: dict) -> dict:
    """MAE's model FLOP/s (its eager step's FlopCounterMode count over each MAE row's step time) over the
    bf16 matmul's FLOP/s measured in the same run, per row."""
    eager = report["parts"].get("eager", {})
    rows = [r for p in ("eager", "compiled") for r in report["parts"].get(p, {}).get("rows", [])
            if r["method"] == "mae" and "step_s" in r]
    flops = {r["batch"]: r["flops_per_step"] for r in rows if "flops_per_step" in r}
    matmul = eager.get("matmul_bf16", {}).get("flops_per_s")
    if not matmul:
        return {}
    return {f"{'compiled' if r['compiled'] else 'eager'} batch {r['batch']}":
            {"fraction": flops[r["batch"]] / r["step_s"] / matmul, "model_tflops_per_s": flops[r["batch"]] / r["step_s"] / 1e12,
             "matmul_tflops_per_s": matmul / 1e12, "goal": GOAL_MAE_COMPILED if r["compiled"] else None}
            for r in rows if r["batch"] in flops}


def fmt(x, spec: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def markdown(r: dict) -> str:
    """The report as markdown tables: machine, parts, steps, MAE's FLOP/s fraction, loader, tests."""
    m, g = r["machine"], r.get("gpu") or {}
    lines = [f"# GPU check{' (dry run)' if r['dry_run'] else ''}, {m['date']}", "",
             f"GPU: {g.get('name', 'none')} ({g.get('memory_gib', '-')} GiB, CUDA {g.get('cuda', '-')}, "
             f"NCCL {g.get('nccl', '-')}); CPU: {m['cpu']['model']} ({m['cpus']} cores, "
             f"{' '.join(m['cpu']['isa']) or 'no AVX2'}); torch {m['torch']}", "",
             f"install: {r['install']}; missing optional packages: "
             + (", ".join(f"{k} (skips {v})" for k, v in r["packages"]["missing_optional_skips"].items()) or "none"),
             ""]
    if "error" in r:
        lines += [f"**{r['error']}**", ""]
    lines += ["| part | status | seconds | budget |", "|---|---|---|---|"]
    lines += [f"| {n} | {p['status']}{': ' + p['error'] if 'error' in p else ''} | {fmt(p.get('seconds'), '.0f')} | "
              f"{p['budget_s']} |" for n, p in r["parts"].items()]
    steps = {(x["method"], x["batch"], x["compiled"]): x for n in ("eager", "compiled")
             for x in r["parts"].get(n, {}).get("rows", [])}
    if steps:
        lines += ["", "| method | batch | eager img/s | compiled img/s | peak GiB eager / compiled | compile s |",
                  "|---|---|---|---|---|---|"]
        for method, batch in dict.fromkeys((k[0], k[1]) for k in steps):
            e, c = steps.get((method, batch, False), {}), steps.get((method, batch, True), {})
            lines.append(f"| {method} | {e.get('batch') or c.get('batch') or batch} | "
                         f"{fmt(e.get('images_per_s')) if e else '-'}{' ' + e['error'] if 'error' in e else ''} | "
                         f"{fmt(c.get('images_per_s')) if c else '-'}{' ' + c['error'] if 'error' in c else ''} | "
                         f"{fmt(e.get('peak_memory_gib'), '.2f')} / {fmt(c.get('peak_memory_gib'), '.2f')} | "
                         f"{fmt(c.get('warmup_s'), '.0f')} |")
    if r.get("mae_flops_fraction"):
        lines += ["", "| MAE step | model TFLOP/s | bf16 matmul TFLOP/s | fraction | goal |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['model_tflops_per_s']:.1f} | {v['matmul_tflops_per_s']:.1f} | {v['fraction']:.2f} | "
                  f"{'>= ' + str(v['goal']) if v['goal'] else ''} |" for k, v in r["mae_flops_fraction"].items()]
    loader = r["parts"].get("loader", {})
    if "per_core" in loader:
        lines += ["", "| loader | images/s |", "|---|---|"]
        lines += [f"| {k} per core | {v:.0f} |" for k, v in loader["per_core"]["images_per_s"].items()]
        lines += [f"| mimkit / MAE per core | {loader['per_core']['speedup']['median']:.2f}x |"]
        lines += [f"| {k} | {v:.0f} |" for k, v in loader.get("workers", {}).get("images_per_s", {}).items()]
        d = loader.get("decode_jpeg", {})
        lines.append(f"| decode_jpeg on {d['device']} (batches of {d['batch']}) | {d['images_per_s']:.0f} |"
                     if "images_per_s" in d else f"| decode_jpeg | {d.get('error', 'not run')} |")
    tests = r["parts"].get("tests", {}).get("tests", {})
    if tests:
        lines += ["", "| test | outcome |", "|---|---|"]
        lines += [f"| {n} | {t['outcome']}{': ' + t['message'] if t['message'] else ''} |" for n, t in tests.items()]
    return "\n".join(lines) + "\n"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="gpu, quality: the same code path, tiny and fast")
    p.add_argument("--out", default=None, help="gpu: folder for gpu.json and gpu.md (default $OUT, else "
                   "benchmarks/results/gpu)")
