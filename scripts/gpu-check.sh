#!/usr/bin/env bash
# Runs the prebuilt CUDA binaries on a GPU machine and records the results.
#
# Usage: scripts/gpu-check.sh OUT_DIR
#
# Run from anywhere inside the repository, on the GPU machine (CUDA 13.0
# driver, a python3 with PyTorch cu130), after `scripts/build-cuda.sh --tests`
# made the bundle `.gpu-bin/gpu-bin.tar.xz` on the build machine. No Rust
# toolchain and no network are needed. Steps, each under a timeout:
#
#   1. nvidia-smi (GPU, driver, memory);
#   2. LD_LIBRARY_PATH from the `site-packages/nvidia/*/lib` folders of the
#      python3 that has torch (libcublas/libcudart/libcurand .so.13/.so.10),
#      and a check that every library the binaries need resolves;
#   3. unpack the bundle (verifying MANIFEST.txt checksums);
#   4. the probe `examples/cuda_probe --device cuda` (ops on CPU vs CUDA);
#   5. every test binary under tests/ (the golden parity tests that
#      `build-cuda.sh --tests` packs), once per dtype in $GPU_CHECK_DTYPES,
#      with ECHOMIMIC_DEVICE=cuda, ECHOMIMIC_DTYPE=<dtype> and
#      ECHOMIMIC_GOLDEN_DIR (default: <repo>/testdata/golden/public), run from
#      its package folder as `cargo test` would (tolerances per dtype:
#      docs/cuda.md, "Parity tolerances in half precision");
#   6. every benchmark binary under benches/ with ECHOMIMIC_DEVICE=cuda.
#
# OUT_DIR receives summary.txt (one PASS/FAIL line per step), gpu-check.log
# (everything, in order), nvidia-smi.txt and logs.tar.gz (one log per step):
# four files, so that all of it comes back from the device tool. Exit status:
# 0 when every step passed, 1 otherwise, 2 on a usage error.
#
# Environment (all optional):
#   GPU_BIN              the bundle folder (default <repo>/.gpu-bin); either
#                        holding gpu-bin.tar.xz or already unpacked
#   GPU_CHECK_DTYPES     test passes, space-separated (default "f32 f16 bf16")
#   GPU_CHECK_TEST_ARGS  libtest arguments (default "--test-threads=1 --nocapture",
#                        so each test's measured max-abs diff is in the log)
#   GPU_CHECK_BENCH_ARGS extra arguments for every benchmark binary
#   GPU_CHECK_BENCHES    the benchmark binaries of step 6, by name, space-separated
#                        (default: all; `none` skips the step; scripts/gpu-bench.sh
#                        runs the speed comparison with its own sizes)
#   GPU_CHECK_BUDGET     seconds for the whole run (default 480); steps that
#                        would start after it are recorded as FAIL (skipped)
#   GPU_CHECK_STEP_TIMEOUT  seconds per step (default 240; the probe gets 120)
set -uo pipefail

# shellcheck source=cuda/script-start.sh
. "$(dirname "${BASH_SOURCE[0]}")/cuda/script-start.sh" "$@"
LOGS="$OUT_DIR/logs"
rm -rf "$LOGS"
mkdir -p "$LOGS"
SUMMARY="$OUT_DIR/summary.txt"
MAIN_LOG="$OUT_DIR/gpu-check.log"
: >"$SUMMARY"
: >"$MAIN_LOG"

GPU_BIN="${GPU_BIN:-$ROOT/.gpu-bin}"
DTYPES="${GPU_CHECK_DTYPES:-f32 f16 bf16}"
TEST_ARGS="${GPU_CHECK_TEST_ARGS:---test-threads=1 --nocapture}"
BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:-}"
BUDGET="${GPU_CHECK_BUDGET:-480}"
STEP_TIMEOUT="${GPU_CHECK_STEP_TIMEOUT:-240}"
export ECHOMIMIC_GOLDEN_DIR="${ECHOMIMIC_GOLDEN_DIR:-$ROOT/testdata/golden/public}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

failures=0
say() { printf '[gpu-check %4ds] %s\n' "$(($(date +%s) - START))" "$*" | tee -a "$MAIN_LOG" >&2; }
record() { # STATUS NAME DETAIL
  printf '%-4s %-55s %s\n' "$1" "$2" "$3" >>"$SUMMARY"
  say "$1 $2 $3"
  [ "$1" = PASS ] || failures=$((failures + 1))
}
finish() {
  local elapsed=$(($(date +%s) - START))
  echo "# $(grep -c '^PASS' "$SUMMARY") passed, $failures failed, ${elapsed} s" >>"$SUMMARY"
  tar -C "$OUT_DIR" -czf "$OUT_DIR/logs.tar.gz" logs && rm -rf "$LOGS"
  say "summary ($SUMMARY):"
  tee -a "$MAIN_LOG" <"$SUMMARY" >&2
  [ "$failures" = 0 ] && exit 0 || exit 1
}

# run_step NAME LOGFILE TIMEOUT DIR CMD... : runs CMD in DIR under a timeout, logs, records.
run_step() {
  local name="$1" log="$2" limit="$3" dir="$4"; shift 4
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -le 5 ]; then
    record FAIL "$name" "skipped: the ${BUDGET} s budget is spent"
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  say "-- $name (timeout ${limit} s) -> logs/$(basename "$log")"
  local t0 rc
  t0=$(date +%s)
  {
    echo "### $name"
    echo "### cwd: $dir"
    echo "### cmd: $*"
    echo "### env: ECHOMIMIC_DEVICE=${ECHOMIMIC_DEVICE:-} ECHOMIMIC_DTYPE=${ECHOMIMIC_DTYPE:-} ECHOMIMIC_GOLDEN_DIR=$ECHOMIMIC_GOLDEN_DIR"
  } >"$log"
  (cd "$dir" && timeout --kill-after=10 "$limit" "$@") >>"$log" 2>&1
  rc=$?
  cat "$log" >>"$MAIN_LOG"
  local secs=$(($(date +%s) - t0))
  case "$rc" in
    0) record PASS "$name" "${secs} s" ;;
    124|137) record FAIL "$name" "timed out after ${limit} s" ;;
    *) record FAIL "$name" "exit $rc after ${secs} s (see logs/$(basename "$log"))" ;;
  esac
  return "$rc"
}

# --- 1. the GPU --------------------------------------------------------------------
if command -v nvidia-smi >/dev/null; then
  timeout 30 nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv \
    >>"$OUT_DIR/nvidia-smi.txt" 2>&1
  cat "$OUT_DIR/nvidia-smi.txt" >>"$MAIN_LOG"
  if grep -q 'Driver Version' "$OUT_DIR/nvidia-smi.txt"; then
    record PASS nvidia-smi "$(tail -n1 "$OUT_DIR/nvidia-smi.txt")"
  else
    record FAIL nvidia-smi "no driver answered (see nvidia-smi.txt)"
  fi
else
  echo "nvidia-smi not found" >"$OUT_DIR/nvidia-smi.txt"
  record FAIL nvidia-smi "not installed: is this the GPU machine?"
fi

# --- 2. runtime libraries --------------------------------------------------------------
libdirs="$("$ROOT/scripts/cuda/runtime-libs.sh")"
[ -z "$libdirs" ] || say "CUDA libraries: $libdirs"
if [ -n "$libdirs" ]; then
  export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  say "no python3 with torch and site-packages/nvidia found: relying on the system library path"
fi

# --- 3. the binaries -----------------------------------------------------------------
if [ -f "$GPU_BIN/gpu-bin.tar.xz" ]; then
  BIN="${TMPDIR:-/tmp}/echomimic-gpu-bin"
  rm -rf "$BIN"
  mkdir -p "$BIN"
  if { command -v xz >/dev/null && tar -C "$BIN" -xJf "$GPU_BIN/gpu-bin.tar.xz"; } ||
     python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' \
       "$GPU_BIN/gpu-bin.tar.xz" "$BIN"; then
    if [ -f "$GPU_BIN/MANIFEST.txt" ] && ! (cd "$BIN" && grep -v '^#' "$GPU_BIN/MANIFEST.txt" | sha256sum -c --quiet) >>"$MAIN_LOG" 2>&1; then
      record FAIL unpack "checksums differ from MANIFEST.txt"
      finish
    fi
    record PASS unpack "$GPU_BIN/gpu-bin.tar.xz -> $BIN ($(du -sh "$BIN" | cut -f1))"
    [ -f "$GPU_BIN/MANIFEST.txt" ] && head -n2 "$GPU_BIN/MANIFEST.txt" >>"$MAIN_LOG"
  else
    record FAIL unpack "could not unpack $GPU_BIN/gpu-bin.tar.xz"
    finish
  fi
elif [ -d "$GPU_BIN" ]; then
  BIN="$GPU_BIN"
else
  record FAIL unpack "no bundle at $GPU_BIN (run scripts/build-cuda.sh --tests and carry .gpu-bin)"
  finish
fi
# Package name -> folder relative to the repository (written by build-cuda.sh).
declare -A pkgdir=()
if [ -f "$BIN/packages.tsv" ]; then
  while IFS=$'\t' read -r name rel; do pkgdir[$name]="$rel"; done <"$BIN/packages.tsv"
fi
package_dir() { # PKG -> absolute folder to run in (cargo runs tests in the package root)
  local rel="${pkgdir[$1]:-$1}"
  if [ -d "$ROOT/$rel" ]; then echo "$ROOT/$rel"; else echo "$ROOT"; fi
}

mapfile -t all_exes < <(find "$BIN" -type f -perm -u+x ! -name '*.args' | sort)
missing="$(for f in "${all_exes[@]}"; do ldd "$f" 2>/dev/null | grep 'not found'; done | sort -u)"
if [ -n "$missing" ]; then
  record FAIL libraries "unresolved: $(echo "$missing" | awk '{print $1}' | paste -sd' ' -)"
else
  resolved="$(for f in "${all_exes[@]}"; do ldd "$f" 2>/dev/null; done |
    grep -E 'lib(cuda|cublas|cublasLt|cudart|curand|nvrtc)\.so' | awk '{print $1" => "$3}' | sort -u)"
  echo "$resolved" >>"$MAIN_LOG"
  driver="$(echo "$resolved" | awk '$1 == "libcuda.so.1" {print $3}')"
  if [ -n "$driver" ] && grep -q 'build-time stub of echomimic-rs' "$driver"; then
    record FAIL libraries "libcuda.so.1 resolves to the build-time stub $driver, not the driver"
  else
    record PASS libraries "all NEEDED libraries resolve: $(echo "$resolved" | awk '{print $3}' | paste -sd' ' -)"
  fi
fi

# --- 4. the probe --------------------------------------------------------------------
probe="$BIN/examples/cuda_probe"
if [ -x "$probe" ]; then
  probe_limit=120
  [ "$STEP_TIMEOUT" -ge "$probe_limit" ] || probe_limit=$STEP_TIMEOUT
  run_step "probe (cuda_probe --device cuda)" "$LOGS/probe.log" "$probe_limit" "$ROOT" "$probe" --device cuda
  grep -E 'FAIL|INFO|checks passed' "$LOGS/probe.log" | sed 's/^/    /' >>"$SUMMARY"
else
  record FAIL probe "examples/cuda_probe is not in the bundle"
fi

# --- 5. parity tests -------------------------------------------------------------------
mapfile -t tests < <(find "$BIN/tests" -type f -perm -u+x ! -name '*.args' 2>/dev/null | sort)
if [ "${#tests[@]}" = 0 ]; then
  record FAIL tests "no test binaries in the bundle (build with scripts/build-cuda.sh --tests)"
fi
for dtype in $DTYPES; do
  for t in "${tests[@]}"; do
    rel="${t#"$BIN/tests/"}"           # <package>/<target>
    pkg="${rel%%/*}"
    name="test $dtype ${rel}"
    # shellcheck disable=SC2086
    ECHOMIMIC_DEVICE=cuda ECHOMIMIC_DTYPE="$dtype" \
      run_step "$name" "$LOGS/test-$dtype-${rel//\//-}.log" "$STEP_TIMEOUT" "$(package_dir "$pkg")" "$t" $TEST_ARGS
    grep -E '^test result:|max \|ours - golden\||SKIP ' "$LOGS/test-$dtype-${rel//\//-}.log" | sed 's/^/    /' >>"$SUMMARY"
  done
done

# --- 6. benchmarks ---------------------------------------------------------------------
mapfile -t benches < <(find "$BIN/benches" -type f -perm -u+x ! -name '*.args' 2>/dev/null | sort)
if [ -n "${GPU_CHECK_BENCHES:-}" ]; then
  wanted=" $GPU_CHECK_BENCHES "
  kept=()
  for b in "${benches[@]}"; do
    case "$wanted" in *" $(basename "$b") "*) kept+=("$b") ;; esac
  done
  benches=("${kept[@]}")
fi
[ "${#benches[@]}" -gt 0 ] || say "no benchmark binaries selected (GPU_CHECK_BENCHES='${GPU_CHECK_BENCHES:-}')"
for b in "${benches[@]}"; do
  rel="${b#"$BIN/benches/"}"
  pkg="${rel%%/*}"
  extra=()
  [ -f "$b.args" ] && read -r -a extra <"$b.args"
  # shellcheck disable=SC2086
  ECHOMIMIC_DEVICE=cuda run_step "bench ${rel}" "$LOGS/bench-${rel//\//-}.log" "$STEP_TIMEOUT" \
    "$(package_dir "$pkg")" "$b" "${extra[@]}" $BENCH_ARGS
done

finish
