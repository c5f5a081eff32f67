"""mimkit's MAE step against a peer, lightly's MAE (`pip install -r benchmarks/requirements.txt`), and against the
machine, in one run: the same encoder (ViT-Tiny 192 x 12, patch 4, 32 px), decoder (4 x 128), batch (256),
loss (MSE on norm_pix targets of the masked patches) and optimizer (mimkit's AdamW with its weight-decay
groups), timed in interleaved rounds together with 2048 x 2048 matmuls in fp32 and bf16.

Each side runs in fp32 and under bf16 autocast (`precision=bf16`; lightly in its own code under torch.autocast):
- speed: lightly's step time / mimkit's, per round, at equal precision and best against best (goal >= 1.5);
- machine: model FLOPs of one step (FlopCounterMode) / step time, over the same-precision matmul's FLOP/s, and for
  bf16 steps also over the fp32 matmul's (the issue's measure; goal >= 0.57).

The lightly model follows lightly's MAE example (examples/pytorch/mae.py with MaskedVisionTransformerTIMM and
MaskedVisionTransformerDecoderTIMM): it draws its masks inside the step, on the device, as its example does;
mimkit's masks come from the data loader, so they are drawn before the step."""
from __future__ import annotations

import argparse
import functools
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.dist import autocast
from mimkit.loop import build_optimizer

from .common import count_flops, matmul_fn, side_by_side, speedup, spread, write_result
from .step import PRESETS, build_step, device, method_config

GOAL_SPEEDUP, GOAL_MACHINE = 1.5, 0.57


class LightlyMAE(nn.Module):
    """lightly's MAE on the same shapes as mimkit's MAE for `cfg`, with MAE's norm_pix target."""

    def __init__(self, cfg):
        super().__init__()
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
        from timm.models.vision_transformer import VisionTransformer
        m, d, dims = cfg.model, cfg.decoder, cfg.model.resolved()
        vit = VisionTransformer(img_size=cfg.data.img_size, patch_size=m.patch_size, num_classes=0,
                                embed_dim=dims["embed_dim"], depth=dims["depth"], num_heads=dims["num_heads"],
                                mlp_ratio=m.mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.mask_ratio, self.patch_size = cfg.mask.ratio, m.patch_size
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder_embed = nn.Linear(dims["embed_dim"], d.embed_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=d.embed_dim, depth=d.depth,
            num_heads=d.num_heads, num_prefix_tokens=vit.num_prefix_tokens, mlp_ratio=m.mlp_ratio)
        self.prediction_head = nn.Linear(d.embed_dim, m.patch_size ** 2 * 3)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        from lightly.models import utils
        idx_keep, idx_mask = utils.random_token_mask((images.shape[0], self.sequence_length), self.mask_ratio,
                                                     device=images.device)
        x = self.decoder_embed(self.backbone.encode(images=images, idx_keep=idx_keep))
        x_masked = utils.set_at_index(x.new_zeros(images.shape[0], self.sequence_length, x.shape[-1]), idx_keep, x)
        pred = self.prediction_head(utils.get_at_index(self.decoder(x_masked, idx_mask=idx_mask), idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)
        return {"loss": F.mse_loss(pred.float(), utils.normalize_mean_var(target))}


def lightly_step(cfg, dev: torch.device):
    torch.manual_seed(0)
    model = LightlyMAE(cfg).to(dev).train()
    opt = build_optimizer(model, cfg, dev)
    train_model = torch.compile(model) if cfg.compile else model
    imgs = torch.randn(cfg.batch_size, 3, cfg.data.img_size, cfg.data.img_size, device=dev)

    def step():
        with autocast(dev, cfg.precision):
            loss = train_model(imgs)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def lightly_missing() -> str | None:
    try:
        import lightly.models.modules  # noqa: F401
    except ImportError as e:
        return f"lightly is not installed ({e}); pip install -r benchmarks/requirements.txt"
    return None


VARIANTS = {"": (), "+bf16": ("precision=bf16",)}  # and "+compile" on request


@functools.cache
def measure(repeats: int = 3, compiled: bool = False, preset: str = "cpu") -> dict:
    """Side-by-side times and per-step FLOPs of mimkit's MAE, lightly's (when installed) and the matmuls, each
    step in every variant; cached, so the `peer` and `machine` entries share one measurement in one run."""
    dev = device()
    steps, flops = {}, {}
    missing = lightly_missing()
    variants = {**VARIANTS, **({"+compile": ("compile=true",)} if compiled else {})}
    for suffix, extra in variants.items():
        cfg = method_config("mae", preset, extra)
        steps[f"mimkit{suffix}"] = build_step(cfg, dev)[0]
        if missing is None:
            steps[f"lightly{suffix}"] = lightly_step(cfg, dev)
    for name in [n for n in steps if "+" not in n]:  # a variant computes the same FLOPs as its fp32 eager twin
        count = count_flops(steps[name])
        flops.update({f"{name}{suffix}": count for suffix in variants})
    n = 2048 if preset == "cpu" else 256
    steps["matmul"], flops["matmul"] = matmul_fn(n, dev)
    steps["matmul+bf16"], flops["matmul+bf16"] = matmul_fn(n, dev, torch.bfloat16)
    timed = side_by_side(steps, repeats=repeats, warmup=2 if compiled else 1)
    return {"batch": cfg.batch_size, "timed": timed, "flops": flops, "lightly_missing": missing}


def machine_fraction(m: dict, name: str, key: str = "times_s", reference: str = "") -> dict:
    """Per round: (step FLOPs / step time) / (matmul FLOPs / matmul time), against the matmul in the step's
    precision unless `reference` names one; key="cpu_s" uses CPU seconds."""
    t, f = m["timed"], m["flops"]
    ref = reference or ("matmul+bf16" if "+bf16" in name else "matmul")
    return spread([(f[name] / a) / (f[ref] / b) for a, b in zip(t[name][key], t[ref][key])])


def summary(m: dict) -> dict:
    t, batch = m["timed"], m["batch"]
    rows = {name: {"step_seconds": t[name]["median_s"], "images_per_s": batch / t[name]["median_s"],
                   "flops_per_step": m["flops"][name], "machine_fraction": machine_fraction(m, name),
                   "machine_fraction_cpu": machine_fraction(m, name, "cpu_s"),
                   "machine_fraction_fp32_matmul": machine_fraction(m, name, reference="matmul")}
            for name in t if not name.startswith("matmul")}
    out = {"batch": batch, "matmul_gflops_per_s": m["flops"]["matmul"] / t["matmul"]["median_s"] / 1e9,
           "matmul_bf16_gflops_per_s": m["flops"]["matmul+bf16"] / t["matmul+bf16"]["median_s"] / 1e9,
           "rows": rows, "lightly_missing": m["lightly_missing"], "timed": t}
    pairs = [(f"mimkit{v}", f"lightly{v}") for v in ("", "+bf16", "+compile")]
    fastest = {side: min((n for n in rows if n.startswith(side)), key=lambda n: t[n]["median_s"], default=None)
               for side in ("mimkit", "lightly")}
    pairs.append((fastest["mimkit"], fastest["lightly"]))  # each side at its fastest
    for ours, theirs in pairs:
        if ours in t and theirs in t and f"speedup_{ours}_vs_{theirs}" not in out:
            out[f"speedup_{ours}_vs_{theirs}"] = {**speedup(t, ours, theirs), "cpu": speedup(t, ours, theirs, "cpu_s")}
    if None not in fastest.values():
        out["fastest"] = fastest
    return out


def speedup_rows(s: dict) -> list[tuple[str, dict, str]]:
    """(what, speedup, goal) per pair; the goal applies to each side at its fastest."""
    best = "speedup_{mimkit}_vs_{lightly}".format(**s["fastest"]) if "fastest" in s else None
    return [(k[len("speedup_"):].replace("_vs_", " vs ") + (" (each at its fastest)" if k == best else ""), v,
             f">= {GOAL_SPEEDUP}x" if k == best else "") for k, v in s.items() if k.startswith("speedup_")]


def print_rows(s: dict) -> None:
    print(f"2048x2048 matmul: fp32 {s['matmul_gflops_per_s']:.1f}, bf16 {s['matmul_bf16_gflops_per_s']:.1f} GFLOP/s "
          f"(same run)")
    print(f"{'step':>16} {'img/s':>8} {'GFLOP/step':>11} {'of same-precision matmul: wall':>31} {'CPU time':>18} "
          f"{'of fp32 matmul':>15}")
    for name, r in s["rows"].items():
        f, c, f32 = r["machine_fraction"], r["machine_fraction_cpu"], r["machine_fraction_fp32_matmul"]
        print(f"{name:>16} {r['images_per_s']:8.1f} {r['flops_per_step'] / 1e9:11.1f} "
              f"{f['median']:>18.2f} [{f['min']:.2f}-{f['max']:.2f}] "
              f"{c['median']:>7.2f} [{c['min']:.2f}-{c['max']:.2f}] {f32['median']:>15.2f}")


def run(repeats: int = 3, compiled: bool = False, preset: str = "cpu") -> dict:
    s = summary(measure(repeats, compiled, preset))
    print_rows(s)
    if s["lightly_missing"]:
        print(f"peer skipped: {s['lightly_missing']}")
    for what, v, goal in speedup_rows(s):
        print(f"{what}: {v['median']:.2f}x [{v['min']:.2f}-{v['max']:.2f}] wall, "
              f"{v['cpu']['median']:.2f}x [{v['cpu']['min']:.2f}-{v['cpu']['max']:.2f}] CPU time"
              + (f" (goal {goal})" if goal else ""))
    result = {"preset": PRESETS[preset], "repeats": repeats, "goal_speedup": GOAL_SPEEDUP, **s}
    print(f"written to {write_result('peer', result)}")
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd steps (slow to warm up)")
