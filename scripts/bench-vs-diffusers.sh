#!/usr/bin/env bash
# Our UNets and VAE against diffusers, same config, weights, dtype, batch and
# CPU threads, in one run; prints ours / diffusers ratios (see benches/RESULTS.md).
#
#   scripts/bench-vs-diffusers.sh [OUT_DIR] [-- extra args for both sides]
#   e.g. scripts/bench-vs-diffusers.sh /tmp/bvd -- --latent 32 --frames 8 --iters 3
#
# Python: $BENCH_PYTHON (default: python3) must import torch, diffusers and
# safetensors (benches/python/requirements.txt). Threads: $BENCH_THREADS
# (default 2) for both torch and candle (RAYON_NUM_THREADS).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-$(mktemp -d)}"
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
py="${BENCH_PYTHON:-python3}"
threads="${BENCH_THREADS:-2}"

if ! "$py" -c 'import torch, diffusers, safetensors' 2>/dev/null; then
  echo "error: $py cannot import torch/diffusers/safetensors;" \
    "install benches/python/requirements.txt in a venv and set BENCH_PYTHON" >&2
  exit 1
fi

cargo bench -p echomimic-benches --bench unet_vs_diffusers --no-run >&2

echo "[bench] diffusers baseline -> $out/diffusers.json" >&2
"$py" benches/python/diffusers_baseline.py --threads "$threads" --export "$out/weights" "$@" \
  >"$out/diffusers.json" 2>"$out/diffusers.log"

echo "[bench] echomimic-rs -> $out/ours.json" >&2
RAYON_NUM_THREADS="$threads" cargo bench -q -p echomimic-benches --bench unet_vs_diffusers -- \
  --weights "$out/weights" "$@" >"$out/ours.json" 2>"$out/ours.log"

"$py" benches/python/compare.py "$out/diffusers.json" "$out/ours.json" | tee "$out/ratios.txt"
