"""`mimkit analyze tokens --tokenizer TOK [--tokenizer TOK2 ...] [--config FILE] [key=value ...] --out DIR` and
`mimkit analyze predictions --checkpoint CKPT [--tokenizer TOK] [key=value ...] [--out DIR]`."""
from __future__ import annotations

import argparse

from mimkit.commands import Parser

EPILOG = """keys: data.name (digits|cifar10|imagefolder|synthetic), data.root, data.img_size, split (train|test), data.limit / data.test_limit (images of the split),
batch_size, device, seed, overwrite, metric_samples, figures.gallery_tokens, figures.gallery_patches,
figures.context, figures.map_images, figures.heatmap_tokens
examples:
  mimkit analyze tokens --tokenizer runs/tokenizer_kmeans_digits/tokenizer.pt --out runs/analyze_digits
  mimkit analyze tokens --tokenizer kmeans=runs/km/tokenizer.pt --tokenizer dvae=runs/dvae/tokenizer.pt \\
      data.name=cifar10 data.root=/data/cifar10 --out runs/analyze_cifar10
  mimkit analyze predictions --checkpoint runs/clustermim_digits/checkpoints/last.pt"""


def check_config(args, sources: bool = True) -> None:
    """Build and check the config from the command line before torch loads: a mistake is one line at once.
    `sources`: also where the data is (predictions take data.root from the checkpoint, read later)."""
    from .analyze_config import analyze_config, validate
    validate(analyze_config(args.config, args.overrides), sources)


def cmd_tokens(args) -> int:
    check_config(args)
    from .semantics import analyze_tokens, build_analyze_config
    cfg, _ = build_analyze_config(args.config, args.overrides, tokenizers=args.tokenizer, out=args.out)
    m = analyze_tokens(cfg)
    best = m["table"][0]
    print(f"{len(m['table'])} tokenizer(s) on {m['images']} images; lowest TCAS: {best['tokenizer']} "
          f"{best['tcas']:.3f} (NMI {best['nmi']:.3f}) -> {cfg.output_dir}/table.md")
    return 0


def cmd_predictions(args) -> int:
    check_config(args, sources=False)
    from .semantics import analyze_predictions, build_analyze_config
    cfg, ckpt = build_analyze_config(args.config, args.overrides, tokenizers=args.tokenizer,
                                     checkpoint_path=args.checkpoint, out=args.out)
    m = analyze_predictions(cfg, ckpt)
    print(f"{m['method']}: masked-patch token accuracy {m['accuracy']:.2%} (top-5 {m['top5_accuracy']:.2%}, "
          f"most frequent id {m['majority_baseline']:.2%}) -> {cfg.output_dir}/metrics.json")
    return 0


def intermixed(parser_class: type[argparse.ArgumentParser]) -> type[argparse.ArgumentParser]:
    """A parser class that accepts options between key=value overrides (`a=1 --out DIR b=2`): plain argparse
    stops filling a nargs='*' positional at the first option."""
    class Intermixed(parser_class):
        def parse_known_args(self, args=None, namespace=None):
            if getattr(self, "_intermixing", False):  # parse_known_intermixed_args calls back in here
                return super().parse_known_args(args, namespace)
            self._intermixing = True
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._intermixing = False
    return Intermixed


def add_commands(sub) -> None:
    p = sub.add_parser("analyze", help="token semantics: tokenizer metrics and figures, predicted-token accuracy")
    commands = p.add_subparsers(dest="analyze_command", required=True, parser_class=intermixed(Parser))
    t = commands.add_parser("tokens", help="codebook usage, TCAS, NMI, purity and figures of tokenizers on labeled data",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--tokenizer", action="append", required=True, metavar="[NAME=]FILE",
                   help="a tokenizer file; repeat it to compare tokenizers side by side")
    q = commands.add_parser("predictions", help="accuracy of a beit/beitv2/clustermim model's predicted tokens on "
                            "masked patches", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--checkpoint", required=True, metavar="CKPT", help="a beit, beitv2 or clustermim checkpoint")
    q.add_argument("--tokenizer", action="append", default=[], metavar="FILE",
                   help="the model's target tokenizer (default: the checkpoint's target.tokens.tokenizer)")
    for c, func in ((t, cmd_tokens), (q, cmd_predictions)):
        c.add_argument("--config", action="append", default=[], metavar="FILE.yaml", help="YAML config file(s), in order")
        c.add_argument("--out", default="", metavar="DIR", help="output directory (the run-directory contract)")
        c.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.name=cifar10")
        c.set_defaults(func=func)
