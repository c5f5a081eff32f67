"""`python -m benchmarks [name ...]`: run the named benchmarks (default: all available) and print a summary."""
from __future__ import annotations

import argparse
import importlib
import json

ENTRIES = ["step", "hog", "kmeans"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("names", nargs="*", default=ENTRIES, help=f"any of {', '.join(ENTRIES)}")
    args = p.parse_args()
    summary = {}
    for name in args.names:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as e:
            print(f"[{name}] skipped: {e}")
            continue
        print(f"== {name}")
        summary[name] = module.run()
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if not isinstance(vv, (list, dict))}
                      for k, v in summary.items()}, indent=1))


if __name__ == "__main__":
    main()
