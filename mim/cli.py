"""`mimkit <command>`: pretrain (same arguments as `python run_pretrain.py`), and the commands other
modules add. User mistakes end with one line `error: ...` on stderr and exit status 2 (`--debug` shows the
traceback)."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from . import progress
from .commands import Parser, add_config_args, registry_names, run

# Modules that contribute sub-commands through `add_commands(subparsers)`; none imports torch until it runs.
COMMAND_MODULES: list[str] = ["mimkit.probes.cli", "mimkit.tokenizer_cli", "mimkit.submit", "mimkit.probes.analyze_cli",
                              "mimkit.study_cli", "mimkit.data_cli", "mimkit.probes.weights_cli"]
REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def presets() -> list[str]:
    """Config files shipped in configs/pretrain (in the source tree or the current directory)."""
    found = set()
    for base in (REPO_CONFIGS, Path("configs")):
        found.update(str(p.relative_to(base.parent)) for p in (base / "pretrain").glob("*.yaml"))
    return sorted(found)


def pretrain_epilog() -> str:
    """The registries' parts, presets and examples, for `mimkit pretrain --help`."""
    names = {k: ", ".join(v) for k, v in registry_names().items() if k != "tokenizers"}
    lines = ["methods: " + names["methods"],
             f"parts (named by each method's recipe): head ({names['heads']}), target.kind ({names['targets']}), "
             f"loss ({names['losses']}), mask.kind ({names['mask_kinds']})",
             "datasets: " + names["datasets"] + " (digits: embedded; synthetic: tests)",
             "presets: " + (", ".join(presets()) or "(none found)"),
             "examples:", "  python run_pretrain.py                       # MAE on digits, then a k-NN probe",
             "  python run_pretrain.py --config configs/pretrain/mae_vit_tiny_cifar10.yaml data.root=/data/cifar10",
             "  python run_pretrain.py method=mae epochs=10 optim.blr=3e-4 output_dir=runs/try"]
    return "\n".join(lines)


def cmd_pretrain(args) -> int:
    from .pretrain_config import pretrain_config, validate
    cfg = pretrain_config(args.config, args.overrides)
    validate(cfg)  # a mistake stops here, before torch, the engine and the probes load
    from mimkit.probes.knn import closing_probe  # the CLI layer: the engine never imports the probes

    from .engine import train
    metrics = train(cfg, after=closing_probe)
    knn = metrics.get("knn")
    if knn:
        print(f"k-NN top-1 (k=20): pretrained {knn['pretrained']['top1_k20']:.1f}% vs random init "
              f"{knn['random_init']['top1_k20']:.1f}% (+{knn['gain_points']:.1f} points)")
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="mimkit", description="Masked image modeling toolkit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or progress lines, no per-epoch lines (log.txt still has them)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("pretrain", help="pretrain a ViT with a MIM method", epilog=pretrain_epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, "optim.blr=1.5e-4")
    p.set_defaults(func=cmd_pretrain)
    for module in COMMAND_MODULES:  # each adds its sub-commands: add_commands(subparsers)
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug, quiet = "--debug" in argv, "--quiet" in argv
    argv = [a for a in argv if a not in ("--debug", "--quiet")]  # accepted anywhere on the line
    args = build_parser().parse_args(argv)
    args.debug, args.argv = debug, argv  # argv: the line an interrupted run prints to resume
    # what `mimkit submit` checks a job's command line with and runs (mimkit.submit never imports this module)
    args.entry, args.build_parser = main, build_parser
    with progress.quiet(quiet):
        return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
