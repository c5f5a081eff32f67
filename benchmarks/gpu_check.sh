#!/usr/bin/env bash
# The one-shot GPU check, one command for a CUDA machine without network (benchmarks/gpu.py has the parts):
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]      (report: DIR, else $OUT, else benchmarks/results/gpu)
# 1. installs mimkit without dependencies and without the package index (what the machine has is what it uses);
# 2. installs the wheels in wheels/ (git-ignored; e.g. `pip download --no-deps -d wheels faiss-gpu-cu12` on a
#    machine with network), also without dependencies;
# 3. runs `python -m benchmarks gpu "$@"`: every part under its own time budget, 470 s in all.
# Safe to run under `timeout 540`: each step has its own limit and the report is rewritten after every part.
set -u
cd "$(dirname "$0")/.."
log="$(mktemp)"
if timeout 120 python -m pip install --no-deps --no-index --no-build-isolation -q -e . >"$log" 2>&1; then
  install="mimkit installed (pip install --no-deps -e .)"
else
  # no setuptools or pip without network: the package layout (mimkit = mim/, mimkit.tokenizers = tokenizers/,
  # mimkit.probes = probes/) as links in a temp folder on PYTHONPATH
  install="pip install -e . failed ($(tail -n 1 "$log")); mimkit from linked sources"
  pkg="$(mktemp -d)/mimkit"
  mkdir -p "$pkg" && ln -s "$PWD"/mim/* "$pkg"/ && ln -s "$PWD/tokenizers" "$pkg/tokenizers" \
    && ln -s "$PWD/probes" "$pkg/probes"
  export PYTHONPATH="$(dirname "$pkg")${PYTHONPATH:+:$PYTHONPATH}"
fi
shopt -s nullglob
wheels=(wheels/*.whl)
if ((${#wheels[@]})); then
  if timeout 120 python -m pip install --no-deps --no-index -q "${wheels[@]}" >"$log" 2>&1; then
    install="$install; wheels: ${wheels[*]##*/}"
  else
    install="$install; wheels failed: $(tail -n 1 "$log")"
  fi
else
  install="$install; no wheels in wheels/"
fi
rm -f "$log"
echo "$install"
MIMKIT_GPU_CHECK_INSTALL="$install" exec timeout 500 python -m benchmarks gpu "$@"
