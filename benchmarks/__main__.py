"""`python -m benchmarks [name ...]`: run the named benchmarks (default: all but `gpu`), each printing its own table
and writing benchmarks/results/<name>.json, then a summary table of the headline ratios against their goals
(benchmarks/results/summary.json). Every ratio is measured side by side in one run: absolute times on a shared
CPU vary several-fold between runs."""
from __future__ import annotations

import argparse
import importlib
import inspect
import json

from mimkit.config import ConfigError
from mimkit.dist import keep_freed_memory

from . import common
from .common import results_dir, write_result

ENTRIES = ["step", "peer", "machine", "hog", "kmeans", "e2e", "loader"]
# run by name only: the one-shot check for a CUDA machine (benchmarks/gpu.py); the hour-long training of
# mimkit's and lightly's MAE side by side (benchmarks/quality.py)
ON_REQUEST = ["gpu", "quality"]


def headlines(name: str, r: dict) -> list[tuple[str, str, str]]:
    """(what, measured, goal) rows of one entry's result."""
    if name == "step":
        rows = [(f"{x['method']} step img/s (x MAE)", f"{x['images_per_s']:.1f} "
                 f"({x['speed_vs_mae']['median']:.2f}x)" if "speed_vs_mae" in x else f"{x['images_per_s']:.1f}", "")
                for x in r["rows"]]
        rows += [(f"{x['method']} {x['target_overhead']['target']} overhead",
                  f"{100 * x['target_overhead']['median']:.0f}% "
                  f"[{100 * x['target_overhead']['min']:.0f}-{100 * x['target_overhead']['max']:.0f}]",
                  f"<= {100 * x['target_overhead']['goal_max']:.0f}%")
                 for x in r["rows"] if "target_overhead" in x]
        return rows + [(f"{m} step", "skipped", why) for m, why in r["skipped"].items()]
    if name == "peer":
        from .peer import speedup_rows
        rows = [(what, f"{v['median']:.2f}x [{v['min']:.2f}-{v['max']:.2f}]", goal)
                for what, v, goal in speedup_rows(r)]
        return rows or [("mimkit vs lightly", "skipped", r["lightly_missing"])]
    if name == "machine":
        return [(f"{n} FLOP/s / matmul FLOP/s", f"{f['median']:.2f} [{f['min']:.2f}-{f['max']:.2f}]",
                 ">= 0.57" if n.startswith("mimkit") and "+bf16" not in n else "")
                for n, f in r["fractions"].items()] + [
                (f"{n} FLOP/s / fp32 matmul FLOP/s", f"{f['median']:.2f} [{f['min']:.2f}-{f['max']:.2f}]",
                 ">= 0.57" if n.startswith("mimkit") else "") for n, f in r.get("fractions_fp32_matmul", {}).items()
                if "+bf16" in n]
    if name == "hog":
        rounds = f"; per round {r['speedup_rounds_median_min']:.0f}x" if "speedup_rounds_median_min" in r else ""
        return [("batched HOG vs skimage (slowest setting)",
                 f"{r['speedup_min']:.0f}x (1 thread {r['speedup_1thread_min']:.0f}x{rounds})", ">= 50x")]
    if name == "kmeans":
        return [("fastest k-means to within 1%", str(r["fastest"]), "faiss"),
                ("FAISS vs Lloyd / MiniBatchKMeans",
                 f"{r['faiss_speedup_vs_lloyd']:.1f}x / {r['faiss_speedup_vs_minibatch']:.1f}x", "> 1")]
    if name == "e2e":
        rows = []
        if "default_job" in r:
            job = r["default_job"]
            rows.append(("default job wall time", f"{job['seconds']:.0f} s" + (" (failed)" if "error" in job else ""),
                         "<= 180 s"))
        rows.append(("CIFAR-10 loader / MAE step img/s",
                     f"{r['loader_over_step']:.1f}x" if "loader_over_step" in r else "skipped", "> 1x"))
        return rows
    if name == "loader":
        pc, cl = r["per_core"], r["closeness"]
        return [("loader img/s per core, mimkit / MAE",
                 f"{pc['speedup']['median']:.2f}x [{pc['speedup']['min']:.2f}-{pc['speedup']['max']:.2f}]",
                 f">= {pc['goal']:.0f}x"),
                ("loader vs MAE, 8-bit levels (mean, max)", f"{cl['mean_levels']:.3f}, {cl['max_levels']:.0f}",
                 f"<= {cl['tolerance_levels']['mean']}, {cl['tolerance_levels']['max']:.0f}")]
    if name == "quality":
        f = r["final_knn"]
        return [("k-NN cls/mean after training, mimkit", f"{f['mimkit']['cls']:.1f} / {f['mimkit']['mean']:.1f}",
                 ">= lightly's"), ("k-NN cls/mean after training, lightly",
                                   f"{f['lightly']['cls']:.1f} / {f['lightly']['mean']:.1f}", ""),
                ("wall time lightly / mimkit", f"{r['wall_time_ratio_lightly_over_mimkit']:.2f}x", "> 1x")]
    if name == "gpu":
        return [(f"gpu check: {part}", p["status"], "ok") for part, p in r["parts"].items()] or [
            ("gpu check", r.get("error", "nothing ran"), "")]
    return []


def rounds(text: str) -> int:
    """--repeats: a whole number of timing rounds, at least one (each ratio is a median over them)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("names", nargs="*", default=ENTRIES, help=f"any of {', '.join(ENTRIES + ON_REQUEST)}")
    p.add_argument("--repeats", type=rounds, default=3, help="interleaved timing rounds")
    p.add_argument("--preset", choices=["cpu", "tiny", "vit_b"], default="cpu", help="step/peer/machine/loader: tiny = smoke test; "
                   "step: vit_b = ViT-B/16 at 224 px, batch 64, bf16 (for a GPU)")
    for module in ("step", "peer", "e2e", "gpu"):
        importlib.import_module(f"benchmarks.{module}").add_args(p)
    args = p.parse_args(argv)
    # as every mimkit job on CPU does (dist.init); MIMKIT_KEEP_FREED_MEMORY=0 to compare
    common.FREED_MEMORY_KEPT = keep_freed_memory()
    given = {"repeats": args.repeats, "preset": args.preset, "methods": tuple(args.methods), "extra": tuple(args.extra),
             "compiled": args.compile, "skip_job": args.skip_job, "dry_run": args.dry_run, "out": args.out}
    summary = {}
    for name in args.names:
        if name not in ENTRIES + ON_REQUEST:
            p.error(f"unknown benchmark {name!r}; choose from {', '.join(ENTRIES + ON_REQUEST)}")
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as e:
            print(f"[{name}] skipped: {e}")
            summary[name] = [(name, "skipped", str(e))]
            continue
        print(f"== {name}")
        wanted = inspect.signature(module.run).parameters
        try:
            result = module.run(**{k: v for k, v in given.items() if k in wanted})
        except ConfigError as e:  # a wrong --set key or --methods name: one line, as every mimkit command
            p.exit(2, f"error: {e}\n")
        except FileNotFoundError as e:  # its data (../shared/data) is not there: the other entries still run
            print(f"[{name}] skipped: {e}")
            summary[name] = [(name, "skipped", str(e))]
            continue
        summary[name] = headlines(name, result)
    # entries not run now keep their latest result, dated: the summary always covers every entry
    for name in ENTRIES:
        path = results_dir() / f"{name}.json"
        if name not in summary and path.exists():
            r = json.loads(path.read_text())
            summary[name] = [(what, f"{measured} ({r.get('machine', {}).get('date', '?')})", goal)
                             for what, measured, goal in headlines(name, r)]
    print("\n== summary")
    print(f"{'benchmark':<10} {'what':<38} {'measured':<28} goal")
    for name in (n for n in ENTRIES + ON_REQUEST if n in summary):
        for what, measured, goal in summary[name]:
            print(f"{name:<10} {what:<38} {measured:<28} {goal}")
    write_result("summary", {"args": vars(args), "rows": {n: [list(r) for r in rows] for n, rows in summary.items()}})


if __name__ == "__main__":
    main()
