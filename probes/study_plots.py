"""The study's figures (matplotlib's object API, as the token analysis draws them): accuracy per probe per cell
with the baselines (random init, raw pixels) as lines, TCAS/(C-1) against probe accuracy for the token cells (ClusterMIM's
claim: lower TCAS, better encoder), probe accuracy against pretraining wall time, and the loss curves."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .semantics_plots import save_figure

PROBES = ("knn", "linear", "finetune")


def _best_probe(rows: list[dict]) -> str | None:
    """The probe the figures plot against: linear when any cell has it, else k-NN, else fine-tune."""
    return next((p for p in ("linear", "knn", "finetune") if any(r.get(p) is not None for r in rows)), None)


def accuracy_bars(rows: list[dict], base: dict) -> Figure:
    fig = Figure(figsize=(max(5.0, 1.1 * len(rows)), 3.6))
    ax = fig.add_subplot()
    probes = [p for p in PROBES if any(r.get(p) is not None for r in rows)]
    width = 0.8 / max(len(probes), 1)
    for i, p in enumerate(probes):
        ax.bar([j + i * width for j in range(len(rows))], [r.get(p) or 0 for r in rows], width, label=p)
    for (key, value), color in zip(base.items(), ("k", "0.4", "tab:red", "tab:purple")):
        if value is not None:
            name, protocol = key.rsplit("_", 1)
            ax.axhline(value, color=color, ls="--" if protocol == "knn" else ":", lw=1,
                       label=f"{protocol}, {name.replace('_', ' ')}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["cell"] for r in rows], rotation=30)
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def scatter(rows: list[dict], x: str, y: str, xlabel: str, ylabel: str) -> Figure:
    fig = Figure(figsize=(5.5, 3.6))  # wide enough for the TCAS axis label
    ax = fig.add_subplot()
    for r in rows:
        if r.get(x) is not None and r.get(y) is not None:
            ax.scatter(r[x], r[y])
            ax.annotate(r["cell"], (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.margins(x=0.15)  # room for the labels of the outermost points
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def loss_curves(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(4.5, 3.6))
    ax = fig.add_subplot()
    for r in rows:
        if r.get("loss_history"):
            ax.plot(range(1, len(r["loss_history"]) + 1), r["loss_history"], label=r["cell"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("pretraining loss (each target's own)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_figures(rows: list[dict], base: dict, root: Path) -> list[Path]:
    """figures/*.png under the study's output_dir and the same images in TensorBoard (<root>/tb)."""
    from torch.utils.tensorboard import SummaryWriter
    probe = _best_probe(rows)
    figures = {"accuracy": accuracy_bars(rows, base), "loss_curves": loss_curves(rows)}
    if probe:
        label = f"{probe} top-1 (%)"
        figures["tcas_vs_accuracy"] = scatter([r for r in rows if r["discrete"]], "tcas_norm", probe,
                                              "TCAS/(C-1) of the target's tokens (lower: more class-aligned)", label)
        figures["accuracy_vs_time"] = scatter(rows, "train_seconds", probe, "pretraining wall time (s)", label)
    (root / "figures").mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(root / "tb"))
    try:
        paths = []
        for name, fig in figures.items():
            paths.append(root / "figures" / f"{name}.png")
            save_figure(fig, paths[-1], writer, f"study/{name}")
    finally:
        writer.close()
    return paths
