"""Discrete-target methods vs MAE on the same encoder (CPU preset: ViT-Tiny/4, 32 px, batch 256): the training
step time of clustermim (k-means, K=50 pixels), beit (dVAE, 1024 codes on the 16 px half-resolution copy) and
beitv2 (VQ-KD, ViT-Tiny depth 6 encoder, 1024 codes), and the share of it spent computing the targets (the
frozen tokenizer's encode on the batch). Tokenizers are random-init with the shapes of configs/tokenizer/*
(the cost does not depend on their weights)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from mimkit.data import CIFAR10_STATS
from mimkit.tokenizers.dvae import DVAE
from mimkit.tokenizers.kmeans import KMeansTokenizer
from mimkit.tokenizers.vqkd import VQKD

from .common import time_it, write_result
from .step import step_throughput


def make_tokenizers(out: Path) -> dict[str, Path]:
    """Tokenizer files for the 8x8 grid of the CPU preset, shaped like the CIFAR-10 configs."""
    mean, std = (list(v) for v in CIFAR10_STATS)
    torch.manual_seed(0)
    toks = {
        "clustermim": KMeansTokenizer(32, 8, 50, mean, std, dim=48),
        "beit": DVAE(32, 8, 1024, mean, std, input_size=16, groups=2, hidden=128, blocks_per_group=2),
        "beitv2": VQKD(32, 8, 1024, mean, std, teacher_dim=192, embed_dim=192, depth=6, num_heads=3,
                       decoder_depth=1, decoder_embed_dim=192, decoder_num_heads=3),
    }
    toks["clustermim"].centroids.normal_()
    paths = {}
    for method, tok in toks.items():
        paths[method] = out / f"{method}.pt"
        tok.save(paths[method])
    return paths


def run(batch: int = 256, repeats: int = 3) -> dict:
    from mimkit.tokenizers.base import Tokenizer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tokenizers(Path(tmp))
        rows = [step_throughput("mae", batch, repeats)]
        imgs = torch.randn(batch, 3, 32, 32, device=device)
        for method, path in paths.items():
            row = step_throughput(method, batch, repeats, extra=(f"target.tokenizer={path}",))
            tok = Tokenizer.load(path).to(device)

            def encode(tok=tok):
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    tok.encode(imgs)

            row["tokenizer_seconds"] = time_it(encode, repeats=repeats)
            row["tokenizer_share"] = row["tokenizer_seconds"] / row["step_seconds"]
            rows.append(row)
    mae = rows[0]["step_seconds"]
    for r in rows:
        r["step_vs_mae"] = r["step_seconds"] / mae
        extra = (f", targets {1000 * r['tokenizer_seconds']:.0f} ms ({100 * r['tokenizer_share']:.0f}% of the step)"
                 if "tokenizer_seconds" in r else "")
        print(f"{r['method']:>10}: {1000 * r['step_seconds']:7.0f} ms/step, {r['step_vs_mae']:.2f}x MAE{extra}")
    result = {"device": device.type, "batch": batch, "rows": rows}
    write_result("tokenizers", result)
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    run(a.batch, a.repeats)
