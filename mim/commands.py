"""What every `mimkit` sub-command shares: the argument parser whose mistakes are one line, the user errors
that end a command with one line and exit status 2, and the --config / key=value arguments."""
from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError
from .loop import NonFiniteLossError

USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage first by default)
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def add_config_args(p: argparse.ArgumentParser, example: str) -> None:
    """--config FILE (repeatable, applied in order) and the key=value overrides of a command."""
    p.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                   help="YAML config file(s), applied in order over the recipe and dataset preset")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")


def run(func, args) -> int:
    """Run a command; user errors become one line and exit status 2."""
    try:
        return func(args) or 0
    except USER_ERRORS as e:
        if getattr(args, "debug", False):
            raise
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
