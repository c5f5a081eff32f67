"""Pretraining step throughput (forward + backward + AdamW step, images/s) of every registered method on the CPU
preset: ViT-Tiny (width 192, depth 12), patch 4, 32 px, batch 256, MAE decoder 4 x 128. The methods are timed
side by side in interleaved rounds; each one's speed relative to MAE is the per-round ratio.

Discrete-target methods get a small randomly initialized tokenizer built in-process (its speed, not its ids,
matters here), shaped by configs/tokenizer/<kind>_cifar10.yaml when that file exists; teacher-target methods
(eva, maskdistill, milan) get a randomly initialized mimkit encoder of the student's shape as teacher (ViT-Tiny on
the CPU preset). The time the frozen tokenizer or teacher takes on the batch is reported as its overhead over the
rest of the step (goals: tokenizer <= 25%, ViT-Tiny teacher <= 35%)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable

import torch

from mimkit import checkpoint
from mimkit.config import ConfigError, to_dict
from mimkit.data import dataset_stats
from mimkit.dist import autocast
from mimkit.loop import build_optimizer, place_model
from mimkit.masking import build_mask_generator
from mimkit.methods import METHODS, build_method, pretrain_config

from .common import side_by_side, speedup, spread, write_result

REPO = Path(__file__).resolve().parent.parent
PRESETS = {
    "cpu": ["data.name=cifar10", "data.root=unused", "model.arch=vit_tiny", "model.patch_size=4", "data.img_size=32",
            "decoder.depth=4", "decoder.embed_dim=128", "decoder.num_heads=4", "batch_size=256"],
    "tiny": ["data.name=synthetic", "batch_size=8"],  # smoke tests: seconds, not a measurement
    # the GPU check (benchmarks/gpu.py): the methods' ViT-B/16 recipes at 224 px, bf16, batch 64 per GPU
    "vit_b": ["data.name=imagefolder", "data.root=unused", "batch_size=64", "precision=bf16"],
}
TOKENIZER_KIND = {"beit": "dvae", "beitv2": "vqkd", "clustermim": "kmeans"}
OVERHEAD_GOAL = {"tokens": 0.25, "teacher": 0.35}  # the frozen network's time over the rest of the step
# Used when configs/tokenizer/<kind>_cifar10.yaml is absent: BEiT's vocabulary and half-resolution dVAE input,
# a VQ-KD tokenizer of the encoder's size (BEiT v2 pairs a ViT-B tokenizer with a ViT-B student), and
# ClusterMIM's pixel k-means with the recipe's K.
TOKENIZER_FALLBACK = {"dvae": ["vocab_size=8192", "dvae.groups=2", "dvae.hidden=64", "dvae.blocks_per_group=1"],
                      "vqkd": ["vocab_size=8192", "vqkd.embed_dim=192", "vqkd.depth=12", "vqkd.num_heads=3",
                               "vqkd.decoder_embed_dim=192", "vqkd.decoder_num_heads=3"],
                      "kmeans": []}
# The 224 px ViT-B tokenizers are shaped by their ImageNet configs (the dvae's 112 px input, a ViT-B VQ-KD, K=50).
TOKENIZER_CONFIG = {("imagefolder", "dvae"): "dvae_vit_base_imagenet", ("imagefolder", "vqkd"): "vqkd_vit_base_imagenet",
                    ("imagefolder", "kmeans"): "kmeans_pixels_vit_base_imagenet"}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def small_tokenizer(kind: str, cfg, out_dir: Path) -> str:
    """Write a randomly initialized tokenizer for `cfg`'s data and patch grid to out_dir; returns its path."""
    from mimkit.tokenizers.config import tokenizer_config
    from mimkit.tokenizers.dvae import DVAE
    from mimkit.tokenizers.kmeans import KMeansTokenizer
    from mimkit.tokenizers.vqkd import VQKD
    name = TOKENIZER_CONFIG.get((cfg.data.name, kind), f"{kind}_{cfg.data.name}")
    file = REPO / "configs" / "tokenizer" / f"{name}.yaml"
    size, p = cfg.data.img_size, cfg.model.patch_size
    grid = size // p
    half = max(1, size // 2 // grid)  # BEiT's dVAE sees a half-resolution copy: input = grid * 2^(groups - 1)
    fallback = [*TOKENIZER_FALLBACK[kind], f"dvae.input_size={grid * half}", f"dvae.groups={half.bit_length()}"]
    tcfg = tokenizer_config([str(file)] if file.exists() else [],
                            [f"kind={kind}", f"data.name={cfg.data.name}", f"data.img_size={size}", f"patch_size={p}",
                             *([] if file.exists() else fallback)])
    mean, std = (list(v) for v in dataset_stats(cfg.data.name))
    torch.manual_seed(0)
    if kind == "dvae":
        d = tcfg.dvae
        tok = DVAE(size, grid, tcfg.vocab_size, mean, std, d.input_size, d.groups, d.hidden, d.blocks_per_group,
                   decoder=False)
    elif kind == "vqkd":
        v = tcfg.vqkd
        tok = VQKD(size, grid, tcfg.vocab_size, mean, std, 512, v.embed_dim, v.depth, v.num_heads, v.code_dim,
                   v.decoder_depth, v.decoder_embed_dim, v.decoder_num_heads)
    else:
        tok = KMeansTokenizer(size, grid, tcfg.vocab_size, mean, std, dim=p * p * 3)
        tok.centroids.normal_()
    path = out_dir / f"{kind}.pt"
    tok.save(path)
    return str(path)


def method_config(method: str, preset: str = "cpu", extra: tuple[str, ...] = (), tmp: Path | None = None):
    """The pretraining config of `method` on a preset; discrete methods get a fresh small tokenizer in tmp,
    teacher-target methods a random encoder of the student's shape."""
    cfg = pretrain_config([], [f"method={method}", *PRESETS[preset], *extra])
    tmp = tmp or Path(tempfile.mkdtemp())
    if method in TOKENIZER_KIND and not cfg.target.tokens.tokenizer:
        path = small_tokenizer(TOKENIZER_KIND[method], cfg, tmp)
        cfg = pretrain_config([], [f"method={method}", *PRESETS[preset], *extra, f"target.tokens.tokenizer={path}"])
    elif cfg.target.kind == "teacher" and not cfg.target.teacher.name:
        path = tmp / "teacher.pt"
        teacher_cfg = pretrain_config([], ["method=mae", *PRESETS[preset], *extra])
        torch.manual_seed(0)
        checkpoint.save({"mimkit": "pretrain", "model": build_method(teacher_cfg).state_dict(),
                         "config": to_dict(teacher_cfg)}, path)
        cfg = pretrain_config([], [f"method={method}", *PRESETS[preset], *extra, f"target.teacher.name=mimkit:{path}"])
    return cfg


def build_step(cfg, dev: torch.device | None = None, backend: str = "inductor"):
    """(step, model, imgs, mask): one engine step (autocast as the engine, backward, AdamW, zero_grad) on a
    fixed random batch with masks from the method's generator; `cfg.compile` and `cfg.precision` as the engine
    (`backend` is torch.compile's: the GPU check's dry run traces with "eager", which skips code generation)."""
    dev = dev or device()
    torch.manual_seed(0)
    model = place_model(build_method(cfg), dev, cfg.precision).train()
    opt = build_optimizer(model, cfg, dev)
    train_model = torch.compile(model, backend=backend) if cfg.compile else model
    grid = cfg.data.img_size // cfg.model.patch_size
    gen = build_mask_generator(cfg.mask, grid, cfg.model.patch_size)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(cfg.batch_size, 3, cfg.data.img_size, cfg.data.img_size, device=dev)
    mask = torch.stack([gen(g) for _ in range(cfg.batch_size)]).to(dev)

    def step():
        with autocast(dev, cfg.precision):
            loss = train_model(imgs, mask)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model, imgs, mask


def frozen_target_call(target, imgs: torch.Tensor, precision: str) -> Callable[[], object]:
    """The frozen tokenizer's or teacher's work inside a step: its targets for the batch, in the step's
    precision."""
    def call():
        with autocast(imgs.device, precision):
            return target(imgs)
    return call


def run(methods: tuple[str, ...] = (), repeats: int = 3, preset: str = "cpu", extra: tuple[str, ...] = ()) -> dict:
    methods = tuple(methods) or tuple(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods {' '.join(unknown)}: unknown; choose from {', '.join(METHODS)}")
    pretrain_config([], [*PRESETS[preset], *extra])  # a wrong --set key stops here, once, not once per method
    fns: dict[str, Callable] = {}
    skipped, target_of = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            try:
                cfg = method_config(m, preset, extra, Path(tmp))
                fns[m], model, imgs, _ = build_step(cfg)
            except Exception as e:  # a method that cannot be built here is reported, not fatal
                skipped[m] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"step {m:>10}: skipped ({skipped[m]})")
                continue
            if cfg.target.kind in OVERHEAD_GOAL:
                fns[f"{m}:target"] = target_of[m] = frozen_target_call(model.target, imgs, cfg.precision)
        timed = side_by_side(fns, repeats=repeats)
    batch = int(next(o.split("=")[1] for o in reversed([*PRESETS[preset], *extra]) if o.startswith("batch_size=")))
    rows = []
    for m in methods:
        if m not in fns:
            continue
        t = timed[m]
        row = {"method": m, "batch": batch, "step_seconds": t["median_s"], "images_per_s": batch / t["median_s"],
               "images_per_s_range": [batch / t["max_s"], batch / t["min_s"]]}
        if "mae" in fns:
            row["speed_vs_mae"] = speedup(timed, m, "mae")  # < 1: slower than MAE
            row["speed_vs_mae_cpu"] = speedup(timed, m, "mae", "cpu_s")
        if m in target_of:
            kind = METHODS[m].recipe["target.kind"]
            tt = timed[f"{m}:target"]["times_s"]
            share = [k / (s - k) for k, s in zip(tt, t["times_s"])]
            row["target_seconds"] = timed[f"{m}:target"]["median_s"]
            row["target_overhead"] = {**spread(share), "goal_max": OVERHEAD_GOAL[kind], "target": kind}
        rows.append(row)
    print(f"{'method':>11} {'img/s':>8} {'range':>15} {'vs MAE: wall':>13} {'CPU time':>9} {'target overhead':>19}")
    for r in rows:
        lo, hi = r["images_per_s_range"]
        vs = (f"{r['speed_vs_mae']['median']:.2f}x {r['speed_vs_mae_cpu']['median']:8.2f}x" if "speed_vs_mae" in r
              else "-")
        tok = (f"{100 * r['target_overhead']['median']:.0f}% "
               f"[{100 * r['target_overhead']['min']:.0f}-{100 * r['target_overhead']['max']:.0f}]"
               if "target_overhead" in r else "-")
        print(f"{r['method']:>11} {r['images_per_s']:8.1f} {f'{lo:.1f}-{hi:.1f}':>15} {vs:>23} {tok:>19}")
    result = {"preset": preset, "overrides": [*PRESETS[preset], *extra], "repeats": repeats, "rows": rows,
              "skipped": skipped}
    print(f"written to {write_result('step', result)}")
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", default=[], help=f"default: all of {', '.join(METHODS)}")
    p.add_argument("--set", nargs="+", default=[], dest="extra", metavar="KEY=VALUE",
                   help="step: config overrides for every method, e.g. --set precision=bf16")
