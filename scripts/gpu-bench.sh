#!/usr/bin/env bash
# GPU speed figures: our CUDA build against diffusers (PyTorch) on the same GPU,
# with the same configs, dtypes, batches and random weights' shapes, plus the
# full-size EchoMimic denoising UNet and one `generate` run of the whole path.
#
# Usage: scripts/gpu-bench.sh OUT_DIR
#
# Run on the GPU machine after scripts/gpu-check.sh, which unpacks the bundle of
# `scripts/build-cuda.sh --tests` (set GPU_BIN_DIR to an unpacked bundle
# otherwise). The baseline needs a python3 that imports torch and diffusers
# (benches/python/requirements.txt; the device machine has torch, carry the
# diffusers wheels). No Rust toolchain and no network are needed. Steps, each
# under a timeout, the whole run under GPU_BENCH_BUDGET seconds:
#
#   for each dtype in GPU_BENCH_DTYPES:
#     1. `full_size --parts acc,cfg`: the released denoising UNet3D (motion
#        modules, reference bank) at 64x64 latents (512x512 video), 12-frame
#        windows, acc (B=1) and CFG (B=2): seconds per call, per video-second,
#        TFLOP/s, peak GPU memory;
#     2. `benches/python/diffusers_baseline.py` and `unet_vs_diffusers` at the
#        released widths (UNet 320/640/1280/1280, 8 heads, audio width 384,
#        50 tokens; VAE 128/256/512/512): the plain UNet at B*F = 24 and 12
#        images, the reference UNet, VAE encode/decode of one 512x512 frame;
#        the ratios ours / diffusers (`benches/python/compare.py`);
#     3. `benches/benches/ops.rs` and `benches/python/ops_baseline.py`: the
#        UNet's hot operations one by one (convolutions, norms, linear,
#        attention, feed-forward) at the 64x64 level of a CFG window, ours
#        against torch: which operation makes a UNet call slower;
#   4. `echomimic-worker generate --device cuda` on the golden request (tiny
#      model, 16 frames), once per dtype: the whole path (face, audio, model,
#      encoding) runs on the GPU build.
#
# OUT_DIR receives bench-summary.txt (the ratios and headline figures),
# bench.log (everything, in order) and bench.tar.gz (every JSON and log): three
# files, so that they come back from the device tool. Exit status 0 when every
# step ran, 1 otherwise.
#
# Environment (all optional):
#   GPU_BIN_DIR        the unpacked bundle (default /tmp/echomimic-gpu-bin)
#   GPU_BENCH_DTYPES   default "f16 bf16"
#   GPU_BENCH_ITERS    timed calls per part, median reported (default 5)
#   GPU_BENCH_BUDGET   seconds for the whole run (default 300)
#   GPU_BENCH_PYTHON   the baseline's python (default python3)
#   GPU_BENCH_PARTS    which of full_size, diffusers, ops, generate to run
#                      (default: all four)
#   GPU_BENCH_DEVICE   default cuda; `cpu` with GPU_BENCH_SMALL=1 rehearses the script
#                      on a machine without a GPU (tiny sizes, one iteration)
set -uo pipefail

# shellcheck source=cuda/script-start.sh
. "$(dirname "${BASH_SOURCE[0]}")/cuda/script-start.sh" "$@"
WORK="$OUT_DIR/bench"
rm -rf "$WORK"
mkdir -p "$WORK"
SUMMARY="$OUT_DIR/bench-summary.txt"
LOG="$OUT_DIR/bench.log"
: >"$SUMMARY"
: >"$LOG"

BIN="${GPU_BIN_DIR:-/tmp/echomimic-gpu-bin}"
DTYPES="${GPU_BENCH_DTYPES:-f16 bf16}"
ITERS="${GPU_BENCH_ITERS:-5}"
BUDGET="${GPU_BENCH_BUDGET:-300}"
PY="${GPU_BENCH_PYTHON:-python3}"
BENCHES="$BIN/benches/echomimic-benches"
# The released widths (sd-image-variations unet/config.json, sd-vae-ft-mse).
SIZES=(--latent 64 --frames 12 --block-out-channels 320,640,1280,1280 --heads 8
  --audio-dim 384 --audio-tokens 50 --vae-block-out-channels 128,256,512,512 --iters "$ITERS")
FULL_SIZE=(--latent 64 --frames 12 --iters "$ITERS")
DEVICE="${GPU_BENCH_DEVICE:-cuda}"
PARTS=" ${GPU_BENCH_PARTS:-full_size diffusers ops generate} "
want() { case "$PARTS" in *" $1 "*) return 0 ;; esac; return 1; }
OPS=()
if [ "${GPU_BENCH_SMALL:-0}" = 1 ]; then
  SIZES=(--latent 8 --frames 4 --block-out-channels 32,64 --heads 2 --audio-dim 32
    --audio-tokens 5 --vae-block-out-channels 32,32,32,32 --iters 1)
  FULL_SIZE=(--latent 8 --frames 12 --iters 1 --no-warmup)
  OPS=(--batch 2 --side 16 --iters 1)
fi

# The CUDA runtime libraries, as scripts/gpu-check.sh finds them.
libdirs="$("$ROOT/scripts/cuda/runtime-libs.sh")"
[ -z "$libdirs" ] || export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

failures=0
say() { printf '[gpu-bench %4ds] %s\n' "$(($(date +%s) - START))" "$*" | tee -a "$LOG" >&2; }
note() { printf '%s\n' "$*" >>"$SUMMARY"; }

# step NAME STDOUT_FILE TIMEOUT CMD... : runs CMD from the repository root under a
# timeout (stdout to STDOUT_FILE, stderr to STDOUT_FILE.log), records the outcome.
step() {
  local name="$1" out="$2" limit="$3"; shift 3
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -le 10 ]; then
    note "SKIP $name (the ${BUDGET} s budget is spent)"; say "SKIP $name"
    failures=$((failures + 1)); return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  say "-- $name (timeout ${limit} s)"
  local t0 rc
  t0=$(date +%s)
  (cd "$ROOT" && timeout --kill-after=10 "$limit" "$@") >"$out" 2>"$out.log"
  rc=$?
  { echo "### $name: $*"; cat "$out.log"; } >>"$LOG"
  local secs=$(($(date +%s) - t0))
  if [ "$rc" = 0 ]; then
    note "PASS $name (${secs} s)"
  else
    note "FAIL $name: exit $rc after ${secs} s; last lines:"
    tail -n 5 "$out.log" | sed 's/^/    /' >>"$SUMMARY"
    failures=$((failures + 1))
  fi
  say "$([ "$rc" = 0 ] && echo PASS || echo "FAIL ($rc)") $name (${secs} s)"
  return "$rc"
}

finish() {
  note "# $failures failed, $(($(date +%s) - START)) s"
  tar -C "$OUT_DIR" -czf "$OUT_DIR/bench.tar.gz" bench && rm -rf "$WORK"
  tee -a "$LOG" <"$SUMMARY" >&2
  [ "$failures" = 0 ]
  exit $?
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
  --format=csv,noheader >>"$SUMMARY" 2>&1
if [ ! -x "$BENCHES/full_size" ]; then
  note "FAIL no unpacked bundle at $BIN (run scripts/gpu-check.sh first, or set GPU_BIN_DIR)"
  failures=1
  finish
fi
"$PY" -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "cuda", torch.version.cuda)' \
  >>"$SUMMARY" 2>>"$LOG" || note "WARN $PY cannot import torch and diffusers: no baseline"

for dtype in $DTYPES; do
  export ECHOMIMIC_DEVICE="$DEVICE" ECHOMIMIC_DTYPE="$dtype"
  if want full_size && step "full_size $dtype" "$WORK/full_size-$dtype.json" 180 \
    "$BENCHES/full_size" --bench --parts ref,acc,cfg,vae "${FULL_SIZE[@]}"; then
    "$PY" - "$WORK/full_size-$dtype.json" >>"$SUMMARY" 2>>"$LOG" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
res, pv = r["results"], r["per_video_second"]
for k in ("ref", "acc", "cfg", "vae"):
    if k in res and res[k].get("seconds") is not None:
        e = res[k]
        mem = e.get("memory") or {}
        peak = mem.get("peak_bytes")
        what = {"ref": "reference UNet call", "vae": "VAE frame"}.get(k, "12-frame call")
        print(f"    {k}: {e['seconds']:.3f} s per {what}, {e.get('tflops_per_s', float('nan')):.2f} TFLOP/s"
              + (f", peak memory {peak / 2**30:.2f} GiB ({mem.get('kind')})" if peak else ""))
for k in ("acc", "normal"):
    v = pv[k]
    if v.get("seconds") is not None:
        print(f"    {k} ({v['steps']} steps): {v['seconds']:.2f} s of compute per video-second"
              f" (UNet calls, VAE frames, reference UNet)")
EOF
  fi
  if want ops && step "ops $dtype (ours)" "$WORK/ops-ours-$dtype.json" 120 \
    "$BENCHES/ops" --bench "${OPS[@]}"; then
    step "ops $dtype (torch)" "$WORK/ops-torch-$dtype.json" 120 \
      "$PY" benches/python/ops_baseline.py --device "$DEVICE" --dtype "$dtype" "${OPS[@]}" &&
      "$PY" - "$WORK/ops-ours-$dtype.json" "$WORK/ops-torch-$dtype.json" >>"$SUMMARY" 2>>"$LOG" <<'EOF'
import json, sys
ours, torch = (json.load(open(p))["results"] for p in sys.argv[1:3])
print(f"    {'operation':<24} {'ours ms':>9} {'torch ms':>9} {'ratio':>6}")
for k, v in ours.items():
    t = torch.get(k, {}).get("seconds")
    r = f"{v['seconds'] / t:6.2f}" if t else "     ?"
    print(f"    {k:<24} {v['seconds'] * 1e3:9.3f} {(t or float('nan')) * 1e3:9.3f} {r}")
EOF
  fi
  if want diffusers && "$PY" -c 'import diffusers' 2>/dev/null; then
    step "diffusers $dtype (unet, ref, vae)" "$WORK/diffusers-$dtype.json" 180 \
      "$PY" benches/python/diffusers_baseline.py --device "$DEVICE" --dtype "$dtype" --threads 8 \
      --parts unet,ref,vae "${SIZES[@]}"
    step "unet_vs_diffusers $dtype (unet, ref, vae)" "$WORK/ours-$dtype.json" 180 \
      "$BENCHES/unet_vs_diffusers" --bench --parts unet,ref,vae "${SIZES[@]}"
    if [ -s "$WORK/diffusers-$dtype.json" ] && [ -s "$WORK/ours-$dtype.json" ]; then
      "$PY" benches/python/compare.py "$WORK/diffusers-$dtype.json" "$WORK/ours-$dtype.json" \
        >"$WORK/ratios-$dtype.txt" 2>>"$LOG" && sed 's/^/    /' "$WORK/ratios-$dtype.txt" >>"$SUMMARY"
    fi
  fi
done
unset ECHOMIMIC_DEVICE ECHOMIMIC_DTYPE

# The whole path on the golden request (the golden CLI test's flags), per dtype.
golden="$ROOT/testdata/golden/public"
for dtype in $DTYPES; do
  want generate || break
  step "generate $DEVICE $dtype (golden request)" "$WORK/generate-$dtype.txt" 120 \
    sh -c 'cd "$1" && shift && exec "$@"' _ "$golden" \
    "$BIN/bin/echomimic-worker" generate --config configs/prompts/animation_tiny.yaml \
    --image inputs/astronaut.png --audio inputs/speech.wav --output "$WORK/golden-$dtype.mp4" \
    -W 128 -H 128 -L 16 --steps 3 --cfg 2.5 --seed 420 --fps 24 --context-frames 8 \
    --context-overlap 3 --device "$DEVICE" --dtype "$dtype" &&
    grep -E '^time: ' "$WORK/generate-$dtype.txt.log" | sed 's/^/    /' >>"$SUMMARY"
  rm -f "$WORK/golden-$dtype.mp4"
done

finish
