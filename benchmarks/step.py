"""Pretraining step throughput (forward + backward + AdamW step, images/s) on the CPU preset:
ViT-Tiny (width 192, depth 12), patch 4, 32 px, batch 256, MAE decoder 4 x 128."""
from __future__ import annotations

import argparse

import torch

from mimkit.cli import pretrain_config
from mimkit.engine import build_optimizer
from mimkit.masking import build_mask_generator
from mimkit.methods import build_method

from .common import time_it, write_result

PRESET = ["data.name=cifar10", "data.root=unused", "model.arch=vit_tiny", "model.patch_size=4", "data.img_size=32",
          "model.decoder_depth=4", "model.decoder_embed_dim=128", "model.decoder_num_heads=4"]


def step_throughput(method: str, batch: int = 256, repeats: int = 5, extra: tuple[str, ...] = ()) -> dict:
    cfg = pretrain_config([], [f"method={method}", *PRESET, f"batch_size={batch}", *extra])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_method(cfg).to(device).train()
    opt = build_optimizer(model, cfg, device)
    grid = cfg.data.img_size // cfg.model.patch_size
    gen = build_mask_generator(cfg.mask, grid, cfg.model.patch_size)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, cfg.data.img_size, cfg.data.img_size, device=device)
    mask = torch.stack([gen(g) for _ in range(batch)]).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(imgs, mask)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = time_it(step, repeats=repeats)
    return {"method": method, "batch": batch, "step_seconds": seconds, "images_per_s": batch / seconds}


def run(methods: tuple[str, ...] = ("mae",), repeats: int = 5) -> dict:
    rows = [step_throughput(m, repeats=repeats) for m in methods]
    for r in rows:
        print(f"step {r['method']:>10}: {r['images_per_s']:8.1f} img/s ({r['step_seconds'] * 1000:.0f} ms/step, "
              f"batch {r['batch']})")
    result = {"preset": PRESET, "rows": rows}
    write_result("step", result)
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=["mae"])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    run(tuple(a.methods), a.repeats)
