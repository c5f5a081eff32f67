"""The comparison a study writes: one row per cell (study.json, study.md) and the figures (figures/*.png and
TensorBoard under <output_dir>/tb): accuracy per probe per cell with the random-init baseline, TCAS/(C-1)
against probe accuracy for the token cells, and accuracy against pretraining wall time."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import yaml

from mimkit.checkpoint import atomic_write_text

FAMILIES = {"pixels": "pixels", "hog": "HOG", "tokens": "token ids", "teacher": "teacher features",
            "ema": "EMA latents"}
COLUMNS = ("cell", "method", "family", "discrete", "knn", "linear", "finetune", "tcas_norm", "nmi", "usage",
           "train_seconds", "images_per_s")


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def cell_row(study: dict, cell: str, root: Path, tokens: dict) -> dict[str, Any]:
    """The row of one cell from its run directories (missing results stay None: a job of a submitted study
    reports before the other cells have run)."""
    out = root / "cells" / cell
    saved = out / "config.yaml"
    m, cfg = _read(out / "metrics.json"), (yaml.safe_load(saved.read_text()) if saved.is_file() else None) or {}
    kind = cfg.get("target", {}).get("kind", "")
    spec = study["cells"][cell] or {}
    tok_name = spec.get("tokenizer")
    sem = tokens.get(tok_name, {}) if tok_name else {}
    row = {"cell": cell, "method": cfg.get("method", spec.get("method")), "family": FAMILIES.get(kind, kind),
           "discrete": kind == "tokens" if kind else None, "tokenizer": tok_name,
           "tcas_norm": sem.get("tcas_norm"), "nmi": sem.get("nmi"), "usage": sem.get("usage"),
           "train_seconds": m.get("train_seconds"), "images_per_s": m.get("images_per_s"),
           "loss_history": m.get("loss_history")}
    for protocol in ("knn", "linear", "finetune"):
        row[protocol] = _read(out / f"probe_{protocol}" / "metrics.json").get("top1")
    return row


def baselines(root: Path, cells: list[str]) -> dict[str, float]:
    """The baselines any cell's probes report: a random-init encoder of the same shape and the raw pixels, under
    k-NN and the linear probe ({"random_init_knn": ..., "pixels_linear": ...})."""
    out = {}
    for cell in cells:
        for protocol in ("knn", "linear"):
            m = _read(root / "cells" / cell / f"probe_{protocol}" / "metrics.json")
            key = f"top1_k{m.get('settings', {}).get('knn.k', 20)}" if protocol == "knn" else "top1"
            for name in ("random_init", "pixels"):
                if isinstance(m.get(name), dict):
                    out.setdefault(f"{name}_{protocol}", m[name].get(key))
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.3f}" if isinstance(v, float) and abs(v) < 1 else f"{v:.1f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], base: dict) -> str:
    """study.md: the table, best linear (else k-NN) first, and the baselines."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    lines += ["", *(f"- {k}: {_fmt(v)}" for k, v in base.items())]
    return "\n".join(lines) + "\n"


def _sort_key(row: dict) -> float:
    score = row.get("linear") if row.get("linear") is not None else row.get("knn")
    return -(score if score is not None else -1.0)


def write_report(study: dict, steps: list, status: dict, log: Callable[[str], None]) -> dict:
    """study.json, study.md and the figures from the steps' run directories; returns study.json's content."""
    root = Path(study.get("output_dir") or "runs/study")
    tokens = _read(root / "analyze_tokens" / "metrics.json").get("tokenizers", {})
    rows = sorted((cell_row(study, c, root, tokens) for c in study["cells"]), key=_sort_key)
    base = baselines(root, list(study["cells"]))
    report = {"rows": rows, "baselines": base, "steps": status}
    atomic_write_text(root / "study.json", json.dumps(report, indent=2))
    atomic_write_text(root / "study.md", markdown(rows, base))
    from .study_plots import write_figures
    figures = write_figures(rows, base, root)
    log(f"study: {len(rows)} cells -> {root / 'study.md'}; figures: {', '.join(p.name for p in figures)}")
    return report
