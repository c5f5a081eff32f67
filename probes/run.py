"""Run a probe: config, encoder from the checkpoint, run directory (config.yaml, log.txt, tb/, checkpoints/,
metrics.json), then the protocol (linear, knn, finetune)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from mimkit import checkpoint, dist, rundir
from mimkit.config import ConfigError, flatten, to_dict
from mimkit.convert import load_pretrain
from mimkit.data import build_dataset, dataset_stats
from mimkit.encoders import EncoderSpec, load_encoder
from mimkit.teachers import ProbeEncoder, Teacher, load_finetuned, load_probe_encoder, load_teacher
from mimkit.loop import RunLog, write_metrics

from .config import ProbeRunConfig, default_output_dir, probe_config, validate
from .context import ProbeRun
from .features import checkpoint_id
from .finetune import run_finetune
from .knn import run_knn
from .linear import run_linear
from .train import RESUME

RESULT_FILES = rundir.RUN_FILES
# Keys that do not change an evaluation's result: a run differing only in these is the same run.
RERUNNABLE = ("output_dir", "overwrite", "resume", "device", "data.num_workers", "data.root", "features.cache")


def build_probe_config(protocol: str, checkpoint_path: str = "", files: list[str] = (),
                       overrides: list[str] = ()) -> tuple[ProbeRunConfig, dict]:
    """The probe config, with the checkpoint's data settings as defaults, and the loaded checkpoint."""
    first = probe_config(protocol, files, [*overrides, f"checkpoint={checkpoint_path}"] if checkpoint_path
                         else overrides)
    if not first.checkpoint:
        raise ConfigError("a checkpoint is required: --checkpoint runs/<run>/checkpoints/last.pt")
    if is_model_spec(first.checkpoint):
        if not first.weights:
            raise ConfigError(f"checkpoint={first.checkpoint} needs weights: --weights FILE, a local weights file "
                              f"(nothing is downloaded)")
        return model_config(protocol, files, overrides, first.checkpoint,
                            load_teacher(first.checkpoint, first.weights))
    if first.weights:
        raise ConfigError("weights is for --checkpoint timm:<model> or openclip:<model>; a mimkit or official "
                          "checkpoint file holds its own weights")
    try:
        ckpt = load_pretrain(first.checkpoint)  # a mimkit checkpoint, or an official one converted
    except checkpoint.OtherKind as e:  # a `probe finetune` output: the model it fine-tuned, rebuilt
        try:
            return model_config(protocol, files, overrides, first.checkpoint, load_finetuned(first.checkpoint))
        except checkpoint.OtherKind:
            raise e from None
    if not isinstance(ckpt.get("config"), dict):
        raise checkpoint.CheckpointError(f"{first.checkpoint} has no stored config; "
                                         f"is it a mimkit pretraining checkpoint?")
    return probe_config(protocol, files, [*overrides, f"checkpoint={first.checkpoint}"], ckpt["config"]), ckpt


def model_config(protocol: str, files: list[str], overrides: list[str], name: str,
                 teacher: Teacher) -> tuple[ProbeRunConfig, dict]:
    """The config of a probe of a timm / OpenCLIP model (its input size is the data's default img_size), and
    {"encoder": the model as a ProbeEncoder of the data's images}."""
    cfg = probe_config(protocol, files, [*overrides, f"checkpoint={name}"], {"data": {"img_size": teacher.input_size}})
    return cfg, {"encoder": ProbeEncoder(teacher, dataset_stats(cfg.data.name))}


def prepare_output_dir(cfg, default: Path, what: str = "a probe run", result_files=RESULT_FILES,
                       resumable: bool = False) -> Path:
    """Create cfg.output_dir (or `default`) under the run-directory contract (mimkit.rundir) and write
    config.yaml. A run with another config is refused unless overwrite=true; the same config starts again from
    scratch, e.g. a requeued SLURM job, unless `resumable` and the run left a training checkpoint
    (checkpoints/resume.pt, mimkit.probes.train): then its files stay and the training continues from it. Shared
    by the evaluation commands."""
    out = Path(cfg.output_dir or default)
    cfg.output_dir = str(out)
    try:
        rundir.check(out, cfg, "auto", cfg.overwrite, RERUNNABLE)
    except ConfigError as e:
        raise ConfigError(str(e).replace("holds a run", f"holds {what}")) from None
    keep = resumable and not cfg.overwrite and (out / "checkpoints" / RESUME).is_file()
    return rundir.write(out, cfg, overwrite=not keep, files=result_files)


def is_model_spec(name: str) -> bool:
    """`timm:<model>` / `openclip:<model>`: a model timm or open_clip builds, with its weights from a file."""
    return name.partition(":")[0] in ("timm", "openclip") and ":" in name


def probe_encoder(cfg: ProbeRunConfig, ckpt: dict | None) -> tuple:
    """(encoder, its EncoderSpec, checkpoint): a mimkit checkpoint's encoder, or a timm / OpenCLIP model (no
    checkpoint) loaded by the teachers' loader, seeing the probe's images in its own normalization and size."""
    if not is_model_spec(cfg.checkpoint) and not isinstance((ckpt or {}).get("encoder"), ProbeEncoder):
        return load_encoder(cfg.checkpoint, cfg.data.img_size, ckpt, cfg.encoder)
    if cfg.encoder != "student":
        raise ConfigError(f"encoder={cfg.encoder} needs a mimkit checkpoint; {cfg.checkpoint} has one encoder")
    encoder = (ckpt or {}).get("encoder") or load_probe_encoder(cfg.checkpoint, cfg.weights,
                                                                dataset_stats(cfg.data.name))
    return encoder, EncoderSpec(encoder, cfg.data, cfg.checkpoint, cfg.seed), {}


def run_probe(cfg: ProbeRunConfig, ckpt: dict | None = None) -> dict:
    """Run cfg.protocol and write <output_dir>/metrics.json; returns the metrics. `ckpt`: cfg.checkpoint's
    content, if already loaded (for a timm: / openclip: model, {"encoder": its ProbeEncoder})."""
    encoder, pretrain_cfg, ckpt = probe_encoder(cfg, ckpt)
    validate(cfg, encoder.depth)
    device = dist.init(cfg.device)
    num_classes = len(build_dataset(cfg.data, "test").classes)  # data errors before anything is written
    torch.manual_seed(cfg.seed)
    spec = is_model_spec(cfg.checkpoint)
    out = prepare_output_dir(cfg, default_output_dir(cfg) if not spec else Path(cfg.weights).parent /
                             f"probe_{cfg.protocol}_{cfg.data.name}_{cfg.checkpoint.replace(':', '_')}",
                             resumable=cfg.resume == "auto")
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(out / "tb"))
    ckpt_id = (checkpoint_id(cfg.checkpoint) if not spec else f"{cfg.checkpoint}+{checkpoint_id(cfg.weights)}") + (
        "" if cfg.encoder == "student" else f"+{cfg.encoder}")  # cache key
    run = ProbeRun(cfg, encoder.to(device), pretrain_cfg, device, out, RunLog(out), writer, ckpt_id, num_classes)
    rep = f"{cfg.features.pool} features{f' of block {cfg.features.layer}' if cfg.features.layer else ''}, "
    run.log(f"{cfg.protocol} probe of {cfg.checkpoint} ({pretrain_cfg.method or 'unknown method'}, epoch "
            f"{ckpt.get('epoch', -1) + 1}) on {cfg.data.name} at {cfg.data.img_size}px, "
            f"{rep if cfg.protocol != 'finetune' else ''}device {device}")
    t0 = time.perf_counter()
    try:
        result = {"linear": run_linear, "knn": run_knn, "finetune": run_finetune}[cfg.protocol](run)
    finally:
        writer.close()
    metrics = {"protocol": cfg.protocol, "checkpoint": cfg.checkpoint, "method": pretrain_cfg.method,
               "pretrain_epochs": ckpt.get("epoch", -1) + 1, "dataset": cfg.data.name, "img_size": cfg.data.img_size,
               "num_classes": run.num_classes, **result, "seconds": time.perf_counter() - t0,
               "settings": settings(cfg)}
    run.log(f"{cfg.protocol}: top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}%")
    write_metrics(out, metrics, run.log)
    return metrics


def settings(cfg: ProbeRunConfig) -> dict:
    """The config keys that shaped this protocol's result (the whole config is in config.yaml)."""
    keep = {"linear": ("optim.", "linear."), "knn": ("knn.",), "finetune": ("optim.", "finetune.")}[cfg.protocol]
    flat = flatten(to_dict(cfg))
    return {k: v for k, v in flat.items()
            if k.startswith(("features.pool", "features.layer", "data.", *keep)) or
            (k in ("epochs", "batch_size", "accum_iter", "seed") and cfg.protocol != "knn")}
