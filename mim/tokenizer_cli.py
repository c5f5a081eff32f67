"""`mimkit tokenizer train --config configs/tokenizer/<kind>_*.yaml [key=value ...]`, `mimkit tokenizer info FILE`
and `mimkit tokenizer import --kind vqkd FILE OUT`.

Outside the mimkit.tokenizers package: importing any module of it registers every kind, which imports torch;
the parsers here import nothing until a command runs (the help lists the kinds from `registry_names`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .commands import Parser, add_config_args, registry_names

EXAMPLES = """examples:
  mimkit tokenizer train --config configs/tokenizer/kmeans_digits.yaml
  mimkit tokenizer train --config configs/tokenizer/dvae_digits.yaml epochs=20
  mimkit tokenizer train --config configs/tokenizer/vqkd_digits.yaml teacher.name=mimkit:runs/x/checkpoints/last.pt
  mimkit tokenizer info runs/tokenizer_kmeans_digits/tokenizer.pt
  mimkit tokenizer import --kind vqkd vqkd_encoder_base_decoder_3x768x12_clip.pth vqkd_clip.pt
then: mimkit pretrain --config configs/pretrain/clustermim_digits.yaml"""


def kinds_line() -> str:
    """The registered kinds with their papers, for the help text."""
    papers = registry_names()["tokenizers"]
    return "kinds: " + ", ".join(f"{kind} ({paper})" if paper else kind for kind, paper in papers)


def kinds() -> str:
    return ", ".join(kind for kind, _ in registry_names()["tokenizers"])


def cmd_train(args) -> int:
    from .tokenizer_config import build, validate_shared
    validate_shared(build(args.config, args.overrides))  # a mistake stops here, before torch and the kinds load
    from mimkit.tokenizers.config import tokenizer_config
    from mimkit.tokenizers.train import train_tokenizer
    m = train_tokenizer(tokenizer_config(args.config, args.overrides))
    print(f"{m['tokenizer']}: held-out codebook usage {100 * m['heldout_usage']:.1f}%, "
          f"perplexity {m['heldout_perplexity']:.1f} of {m['vocab_size']}")
    return 0


def cmd_info(args) -> int:
    from mimkit.checkpoint import load
    from mimkit.tokenizers import Tokenizer
    tok = Tokenizer.load(args.file)
    info = {"file": str(Path(args.file)), "kind": tok.kind, **tok.config()}
    held = dict(load(args.file, kind="tokenizer").get("heldout", {})) if Path(args.file).suffix == ".pt" else {}
    if "tokens_per_image_sq" in held:  # a tokenizer that drops patches: the spread from the mean square
        mean, sq = held["tokens_per_image"], held.pop("tokens_per_image_sq")
        info["tokens_per_image"] = {"mean": mean, "std": max(sq - mean * mean, 0.0) ** 0.5, "of": tok.num_tokens}
    print(json.dumps({**info, **({"heldout": held} if held else {})}, indent=2))
    return 0


def cmd_import(args) -> int:
    from mimkit.tokenizers.vqkd_official import import_vqkd
    tok = import_vqkd(args.file)
    tok.save(args.out, {"imported_from": str(Path(args.file))})
    print(f"{args.file}: BEiT v2 VQ-KD ({tok.vocab_size} x {tok.args['code_dim']} codebook, {tok.args['depth']}-block "
          f"encoder, {tok.args['decoder_depth']}-block decoder, {tok.grid}x{tok.grid} tokens at {tok.img_size}px) -> "
          f"{args.out}; use it with: mimkit pretrain method=beitv2 target.tokens.tokenizer={args.out}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help=lambda: f"train or inspect tokenizers ({kinds()})")
    sub = p.add_subparsers(dest="tokenizer_command", required=True, parser_class=Parser)
    t = sub.add_parser("train", help="train a tokenizer; writes <output_dir>/tokenizer.pt and metrics.json",
                       epilog=lambda: f"{kinds_line()}\n{EXAMPLES}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(t, "vocab_size=512")
    t.set_defaults(func=cmd_train)
    i = sub.add_parser("info", help="print a tokenizer file's kind, grid, vocabulary and settings")
    i.add_argument("file")
    i.set_defaults(func=cmd_info)
    m = sub.add_parser("import", help="turn an official tokenizer checkpoint into a mimkit tokenizer file "
                                      "(vqkd: BEiT v2's released VQ-KD)")
    m.add_argument("--kind", required=True, choices=("vqkd",), help="the official format (vqkd: microsoft/unilm beit2)")
    m.add_argument("file", metavar="FILE", help="the official checkpoint (local; nothing is downloaded)")
    m.add_argument("out", metavar="OUT", help="the mimkit tokenizer file to write (.pt)")
    m.set_defaults(func=cmd_import)
