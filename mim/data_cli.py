"""`mimkit data shard SRC OUT --shard-size N`: a dataset as tar shards in the WebDataset layout
(`<key>.<ext>` image + `<key>.cls` label per sample), for `data.name=webdataset` in pretraining and the probes.

The parser imports nothing until the command runs."""
from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Iterator

from .commands import Parser

EXAMPLES = """examples:
  mimkit data shard /data/imagenet /data/imagenet_shards --shard-size 5000
  mimkit data shard digits shards/digits --shard-size 500
then: mimkit pretrain data.name=webdataset data.urls=/data/imagenet_shards/train-{000000..000256}.tar \\
        data.test_urls=/data/imagenet_shards/test-{000000..000009}.tar"""


def encoded_samples(ds) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes, "cls": label}) per sample of a split, the key its index (which seeds its augmentation
    and mask as in the folder): files as they are on disk (no re-encoding), in-memory images as lossless PNG."""
    import torch
    from PIL import Image
    files = getattr(ds, "samples", None)  # an ImageFolder's (path, label)
    for i in range(len(ds)):
        if files is not None:
            path, label = files[i]
            ext = Path(path).suffix.lower().lstrip(".") or "jpg"
            data = Path(path).read_bytes()
        else:
            img, label = ds[i]
            pixels = img if img.dtype == torch.uint8 else (img.clamp(0, 1) * 255).round().to(torch.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            ext, data = "png", buf.getvalue()
        yield f"{i:08d}", {ext: data, "cls": str(int(label)).encode()}


def shard_dataset(src: str, out: Path, shard_size: int, name: str = "") -> dict[str, tuple[str, int]]:
    """Both splits of SRC (`digits`, `synthetic`, or a folder with train/ and val/ or test/ read as data.name
    `name`, imagefolder by default) as shards under OUT: split -> (its data.urls value, samples)."""
    from .config import ConfigError
    from .data import DATASETS, DataConfig, build_dataset
    from .shards import brace_pattern, write_shards
    if shard_size < 1:
        raise ConfigError(f"--shard-size={shard_size} is out of range; need shard-size >= 1")
    embedded = [n for n, (_, in_memory) in DATASETS.items() if in_memory]
    if src in embedded:
        cfg = DataConfig(name=src)
    elif Path(src).is_dir():
        cfg = DataConfig(name=name or "imagefolder", root=src)
    else:
        raise ConfigError(f"SRC {src!r} is neither a folder nor an embedded dataset ({', '.join(embedded)})")
    written = {}
    for split in ("train", "test"):
        ds = build_dataset(cfg, split)
        paths = write_shards(encoded_samples(ds), out, split, shard_size)
        written[split] = (brace_pattern(paths), len(ds))
    return written


def cmd_shard(args) -> int:
    written = shard_dataset(args.src, Path(args.out), args.shard_size, args.name)
    for split, (pattern, n) in written.items():
        key = "data.urls" if split == "train" else "data.test_urls"
        print(f"{split}: {n} samples -> {key}={pattern}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("data", help="dataset tools: shard (write WebDataset tar shards)")
    sub = p.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    s = sub.add_parser("shard", help="write a dataset's train and test splits as tar shards (WebDataset layout)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("src", metavar="SRC", help="digits, synthetic, or a folder with train/ and val/ or test/")
    s.add_argument("out", metavar="OUT", help="folder for train-000000.tar, ..., test-000000.tar, ...")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    s.add_argument("--name", default="", help="data.name the folder is read as (default imagefolder; cifar10)")
    s.set_defaults(func=cmd_shard)
