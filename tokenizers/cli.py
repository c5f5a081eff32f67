"""`mimkit tokenizer train --config configs/tokenizer/<kind>_*.yaml [key=value ...]` and
`mimkit tokenizer info FILE`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mimkit.commands import Parser, add_config_args

from .base import TOKENIZERS, Tokenizer
from .config import tokenizer_config
from .train import train_tokenizer

EXAMPLES = """examples:
  mimkit tokenizer train --config configs/tokenizer/kmeans_digits.yaml
  mimkit tokenizer train --config configs/tokenizer/dvae_digits.yaml epochs=20
  mimkit tokenizer train --config configs/tokenizer/vqkd_digits.yaml teacher.name=mimkit:runs/x/checkpoints/last.pt
  mimkit tokenizer info runs/tokenizer_kmeans_digits/tokenizer.pt
then: mimkit pretrain --config configs/pretrain/clustermim_digits.yaml"""


def kinds_line() -> str:
    """The registered kinds, for the help text."""
    return "kinds: " + ", ".join(f"{kind} ({cls.paper})" if cls.paper else kind for kind, cls in TOKENIZERS.items())


def cmd_train(args) -> int:
    m = train_tokenizer(tokenizer_config(args.config, args.overrides))
    print(f"{m['tokenizer']}: held-out codebook usage {100 * m['heldout_usage']:.1f}%, "
          f"perplexity {m['heldout_perplexity']:.1f} of {m['vocab_size']}")
    return 0


def cmd_info(args) -> int:
    tok = Tokenizer.load(args.file)
    print(json.dumps({"file": str(Path(args.file)), "kind": tok.kind, **tok.config()}, indent=2))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help=f"train or inspect tokenizers ({', '.join(TOKENIZERS)})")
    sub = p.add_subparsers(dest="tokenizer_command", required=True, parser_class=Parser)
    t = sub.add_parser("train", help="train a tokenizer; writes <output_dir>/tokenizer.pt and metrics.json",
                       epilog=f"{kinds_line()}\n{EXAMPLES}", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(t, "vocab_size=512")
    t.set_defaults(func=cmd_train)
    i = sub.add_parser("info", help="print a tokenizer file's kind, grid, vocabulary and settings")
    i.add_argument("file")
    i.set_defaults(func=cmd_info)
