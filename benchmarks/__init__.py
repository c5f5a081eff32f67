"""Speed benchmarks: `python -m benchmarks [name ...]`. Every figure that matters is a ratio measured side by
side in one run; results go to benchmarks/results/<name>.json with machine info."""
