#!/usr/bin/env bash
# Builds the CUDA (candle `cuda` feature) binaries of echomimic-rs on a machine
# WITHOUT a GPU or a system CUDA toolkit, and packs them to carry to a GPU
# machine (CUDA 13.0 driver, e.g. 580 on an H100/H200).
#
# Usage: scripts/build-cuda.sh [--bin NAME]... [--example NAME]... [--tests]
#                              [--out DIR] [--setup-only] [-h|--help]
#
#   (no option)      the worker binary `echomimic-worker` and the probe example
#                    `cuda_probe` (matmul/conv/norm/softmax/attention on CPU vs CUDA)
#   --bin NAME       build this binary instead of the worker (repeatable; the
#                    package is looked up with `cargo metadata`)
#   --example NAME   build this example too (repeatable; `cuda_probe` is always built)
#   --tests          also build the golden parity test binaries of
#                    echomimic-pipeline named by $CUDA_TESTS (space-separated
#                    globs; default: audio, denoising UNet, face, pipeline and
#                    VAE parity, the ones that run on ECHOMIMIC_DEVICE in
#                    ECHOMIMIC_DTYPE and cover every network) and the bench
#                    targets of echomimic-benches named by $CUDA_BENCHES
#                    (default: full_size unet_vs_diffusers ops, what
#                    scripts/gpu-bench.sh runs), in the same invocation
#   --out DIR        where the bundle goes (default: <repo>/.gpu-bin)
#   --setup-only     install the toolchain and print the environment, build nothing
#
# Steps:
#  1. installs the CUDA 13.0.x PyPI wheels below (pinned: driver 580 = CUDA 13.0
#     rejects PTX from newer nvcc) with `pip --target` into $ECHOMIMIC_CUDA_HOME
#     (default ~/.cache/echomimic-cuda13), once;
#  2. makes the unversioned `lib*.so` links the linker needs (the wheels ship
#     only `lib*.so.13`) and a link-time `libcuda.so` stub (SONAME libcuda.so.1)
#     generated from the driver symbols of the locked cudarc (no wheel carries
#     the driver library);
#  3. runs ONE `cargo build --release --locked -p echomimic-worker
#     -p echomimic-pipeline -p echomimic-benches --features echomimic-pipeline/cuda
#     <targets>` (always the same packages: see the note at the cargo call)
#     with nvcc on PATH, CUDA_COMPUTE_CAP=90 (H100/H200, sm_90a),
#     CUDARC_CUDA_VERSION=13000 and a target dir of its own
#     ($CUDA_TARGET_DIR, default /work/target-cuda if /work exists, else
#     <repo>/target-cuda): the RUSTFLAGS differ from the normal build's, and a
#     shared target dir would be rebuilt from scratch each time;
#  4. strips the executables, prints their NEEDED libraries, and packs them
#     into DIR/gpu-bin.tar.xz (one solid xz stream with a 1 GiB window, so the
#     ~40 MiB of statically linked CUDA kernels and PTX that every binary
#     repeats are stored once: 15 binaries, 694 MB, packed to 16 MB in 47 s
#     here) plus DIR/MANIFEST.txt, and checks that the working tree plus the
#     bundle fit the device tool's 64 MiB. scripts/gpu-check.sh unpacks it on
#     the GPU machine.
#
# The first build takes about 15 minutes on 2 cores (candle-kernels compiles
# its GGUF/MoE kernels to SASS); later ones are incremental.
set -euo pipefail

log() { printf '[build-cuda] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# --- pinned toolchain -------------------------------------------------------
WHEELS=(
  nvidia-cuda-nvcc==13.0.88     # nvcc, ptxas, fatbinary
  nvidia-cuda-crt==13.0.88      # nvcc's crt/ headers
  nvidia-nvvm==13.0.88          # cicc (the device compiler nvcc drives)
  nvidia-cuda-runtime==13.0.96  # cuda_runtime.h, libcudart.so.13
  nvidia-cuda-cccl==13.0.85     # thrust/cub/libcu++ headers
  nvidia-cublas==13.0.2.14      # libcublas(Lt).so.13 (link)
  nvidia-curand==10.4.0.35      # libcurand.so.10 (link)
  nvidia-cuda-nvrtc==13.0.88    # libnvrtc.so.13 (link)
)
MAX_BYTES=$((64 * 1024 * 1024))
# What --tests adds (see --help).
CUDA_TESTS="${CUDA_TESTS:-audio_parity denoising_unet_parity face_parity pipeline_parity vae_parity}"
CUDA_BENCHES="${CUDA_BENCHES:-full_size unet_vs_diffusers ops}"

# --- arguments ---------------------------------------------------------------
bins=() examples=(cuda_probe) want_tests=0 setup_only=0 out="$ROOT/.gpu-bin"
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) [ $# -ge 2 ] || die "--bin needs a name"; bins+=("$2"); shift 2 ;;
    --example) [ $# -ge 2 ] || die "--example needs a name"; examples+=("$2"); shift 2 ;;
    --tests) want_tests=1; shift ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; out="$2"; shift 2 ;;
    --setup-only) setup_only=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ ${#bins[@]} -gt 0 ] || bins=(echomimic-worker)
mkdir -p "$out"
out="$(cd "$out" && pwd)"

command -v python3 >/dev/null || die "python3 is needed (pip and the helper scripts)"
command -v cc >/dev/null || die "a C compiler (cc) is needed for the libcuda stub and as nvcc's host compiler"

# --- 1. the CUDA 13.0 wheels -------------------------------------------------
CUDA_CACHE="${ECHOMIMIC_CUDA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/echomimic-cuda13}"
SITE="$CUDA_CACHE/site"
LINK="$CUDA_CACHE/link"
STAMP="$CUDA_CACHE/wheels.txt"
wanted="$(printf '%s\n' "${WHEELS[@]%% *}")"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ] && [ -x "$SITE/nvidia/cu13/bin/nvcc" ]; then
  log "CUDA 13.0 wheels already in $SITE"
else
  log "installing the CUDA 13.0 wheels into $SITE"
  rm -rf "$SITE.tmp"
  mkdir -p "$CUDA_CACHE"
  # shellcheck disable=SC2046
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --target "$SITE.tmp" $(printf '%s\n' "$wanted")
  rm -rf "$SITE"
  mv "$SITE.tmp" "$SITE"
  printf '%s\n' "$wanted" >"$STAMP"
fi
CU="$SITE/nvidia/cu13"
[ -x "$CU/bin/nvcc" ] || die "$CU/bin/nvcc missing: the nvidia-cuda-nvcc wheel layout changed"
"$CU/bin/nvcc" --version | grep -q 'release 13\.0' || die "nvcc in $CU is not CUDA 13.0"

# --- 2. unversioned links and the libcuda stub ----------------------------------
CARGO_FLAGS=(--release --locked)
cudarc_dir="$(cargo metadata --locked --format-version 1 --features echomimic-pipeline/cuda | python3 -c '
import json, sys, os
m = json.load(sys.stdin)
dirs = [os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"]
if len(dirs) != 1:
    sys.exit(f"expected one cudarc in the lock file, found {len(dirs)}")
print(dirs[0])')"
[ -f "$cudarc_dir/src/driver/sys/mod.rs" ] || cargo fetch --locked >/dev/null
mkdir -p "$LINK"
for lib in cublas cublasLt cudart nvrtc curand; do
  versioned="$(cd "$CU/lib" && ls "lib$lib.so."* 2>/dev/null | sort -V | head -n1)"
  [ -n "$versioned" ] || die "lib$lib.so.* not found in $CU/lib"
  ln -sfn "$CU/lib/$versioned" "$LINK/lib$lib.so"
done
stub_src="$LINK/libcuda-stub.c"
python3 "$ROOT/scripts/cuda/gen-libcuda-stub.py" "$cudarc_dir" "$stub_src.new"
if ! cmp -s "$stub_src.new" "$stub_src" || [ ! -f "$LINK/libcuda.so.1" ]; then
  mv "$stub_src.new" "$stub_src"
  cc -shared -fPIC -O1 -w -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so.1" "$stub_src"
else
  rm -f "$stub_src.new"
fi
ln -sfn libcuda.so.1 "$LINK/libcuda.so"

# --- 3. environment -----------------------------------------------------------
caller_target_dir="${CARGO_TARGET_DIR:-}"
unset CUDA_HOME CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB CARGO_ENCODED_RUSTFLAGS
[ -z "${RUSTFLAGS:-}" ] || log "ignoring RUSTFLAGS='$RUSTFLAGS' (the CUDA target dir is built with its own)"
export PATH="$CU/bin:$PATH"
export NVCC="$CU/bin/nvcc"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="-L native=$LINK"
if [ -n "${CUDA_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="$CUDA_TARGET_DIR"
elif [ -d /work ] && [ -w /work ]; then
  export CARGO_TARGET_DIR=/work/target-cuda
else
  export CARGO_TARGET_DIR="$ROOT/target-cuda"
fi
for normal in "$ROOT/target" "${caller_target_dir:-$ROOT/target}" /work/main/target; do
  if [ "$(realpath -m "$CARGO_TARGET_DIR")" = "$(realpath -m "$normal")" ]; then
    die "CARGO_TARGET_DIR=$CARGO_TARGET_DIR is a normal (CPU) build's target dir; set CUDA_TARGET_DIR to another"
  fi
done

log "nvcc:      $NVCC ($("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"
log "link dir:  $LINK"
log "target:    $CARGO_TARGET_DIR (compute capability $CUDA_COMPUTE_CAP)"
if [ "$setup_only" = 1 ]; then
  printf 'export PATH=%q NVCC=%q CUDA_COMPUTE_CAP=%q CUDARC_CUDA_VERSION=%q RUSTFLAGS=%q CARGO_TARGET_DIR=%q\n' \
    "$PATH" "$NVCC" "$CUDA_COMPUTE_CAP" "$CUDARC_CUDA_VERSION" "$RUSTFLAGS" "$CARGO_TARGET_DIR"
  exit 0
fi

# --- 4. build -------------------------------------------------------------------
artifacts="$(mktemp)"
trap 'rm -f "$artifacts"' EXIT
cargo_json() {
  # Runs cargo with JSON messages; appends "kind pkg target path" lines to $artifacts.
  local sub="$1"; shift
  log "cargo $sub $*"
  cargo "$sub" "${CARGO_FLAGS[@]}" --message-format=json-render-diagnostics "$@" |
    python3 "$ROOT/scripts/cuda/artifacts.py" >>"$artifacts"
}
package_of() {
  # The workspace package that owns target $2 of kind $1 (bin/example).
  cargo metadata --locked --format-version 1 --no-deps | python3 -c '
import json, sys
kind, name = sys.argv[1], sys.argv[2]
m = json.load(sys.stdin)
owners = [p["name"] for p in m["packages"] for t in p["targets"] if kind in t["kind"] and t["name"] == name]
if len(owners) != 1:
    sys.exit(f"{kind} `{name}`: found in {len(owners)} workspace packages")
print(owners[0])' "$1" "$2"
}

# ONE cargo invocation over a FIXED package selection. Cargo unifies the
# features of host dependencies (build scripts, proc-macros) over the selected
# packages; another selection changes e.g. serde's and thiserror's features,
# hence the hash of candle-kernels' build script, and that re-runs nvcc on every
# kernel (about 10 minutes, seen here). Only the target filter varies per run.
packages=(echomimic-worker echomimic-pipeline echomimic-benches)
TEST_PACKAGES=(echomimic-pipeline)   # the golden parity tests; the worker's need Redis
add_package() { local p; for p in "${packages[@]}"; do [ "$p" = "$1" ] && return; done; packages+=("$1"); }
targets=()
for b in "${bins[@]}"; do
  owner="$(package_of bin "$b")" || die "no workspace package has a binary named $b"
  add_package "$owner"; targets+=(--bin "$b")
done
for e in "${examples[@]}"; do
  owner="$(package_of example "$e")" || die "no workspace package has an example named $e"
  add_package "$owner"; targets+=(--example "$e")
done
if [ "$want_tests" = 1 ]; then
  # The pipeline's test targets matching $CUDA_TESTS, by name. The others
  # check CPU-side code that is the same on every machine (decoding, muxing),
  # need ffmpeg or the build machine's paths (the lib unit tests find
  # testdata through CARGO_MANIFEST_DIR), and each would add ~40 MiB to pack.
  # `--test NAME` needs dev-dependencies like `--tests`, so the resolved
  # features, and with them candle-kernels' build hash, do not change.
  n_tests=0
  while read -r name; do
    targets+=(--test "$name"); n_tests=$((n_tests + 1))
  done < <(cargo metadata --locked --format-version 1 --no-deps | python3 -c '
import fnmatch, json, sys
globs = sys.argv[1].split()
for p in json.load(sys.stdin)["packages"]:
    if p["name"] in sys.argv[2:]:
        for t in p["targets"]:
            if "test" in t["kind"] and any(fnmatch.fnmatchcase(t["name"], g) for g in globs):
                print(t["name"])' "$CUDA_TESTS" "${TEST_PACKAGES[@]}")
  [ "$n_tests" -gt 0 ] || die "no test target of ${TEST_PACKAGES[*]} matches CUDA_TESTS='$CUDA_TESTS'"
  log "test targets ($CUDA_TESTS): $n_tests"
  # The bin and [[bench]] targets of the benches crate named in CUDA_BENCHES
  # (`--benches` would also build each library as a second, bench-mode test
  # harness, and every bench binary adds to the bundle).
  n_benches=0
  while read -r kind name; do
    targets+=("--$kind" "$name"); n_benches=$((n_benches + 1))
  done < <(cargo metadata --locked --format-version 1 --no-deps | python3 -c '
import fnmatch, json, sys
globs = sys.argv[1].split()
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "echomimic-benches":
        for t in p["targets"]:
            for k in ("bin", "bench"):
                if k in t["kind"] and any(fnmatch.fnmatchcase(t["name"], g) for g in globs):
                    print(k, t["name"])' "$CUDA_BENCHES")
  [ "$n_benches" -gt 0 ] || die "no bench target of echomimic-benches matches CUDA_BENCHES='$CUDA_BENCHES'"
fi
pkg_args=()
for p in "${packages[@]}"; do pkg_args+=(-p "$p"); done
start=$(date +%s)
cargo_json build "${pkg_args[@]}" --features echomimic-pipeline/cuda "${targets[@]}"
log "cargo finished in $(($(date +%s) - start)) s"

# --- 5. strip, check, pack ---------------------------------------------------------
stage="$CARGO_TARGET_DIR/gpu-bin"
rm -rf "$stage"
mkdir -p "$stage"
fail=0
declare -A seen=()
while IFS=$'\t' read -r kind pkg name path; do
  case "$kind" in
    bin) if [ "$pkg" = echomimic-benches ]; then dest="$stage/benches/$pkg/$name"; else dest="$stage/bin/$name"; fi ;;
    example) dest="$stage/examples/$name" ;;
    test)
      # Only the parity tests travel (see TEST_PACKAGES).
      case " ${TEST_PACKAGES[*]} " in *" $pkg "*) ;; *) continue ;; esac
      dest="$stage/tests/$pkg/$name" ;;
    bench) dest="$stage/benches/$pkg/$name" ;;
    *) die "unexpected artifact kind $kind" ;;
  esac
  if [ -n "${seen[$dest]:-}" ]; then continue; fi
  seen[$dest]=1
  mkdir -p "$(dirname "$dest")"
  cp "$path" "$dest"
  strip --strip-all "$dest"
  # A libtest benchmark harness wants `--bench` (cargo bench passes it).
  if [ "$kind" = bench ]; then echo "--bench" >"$dest.args"; fi
  raw=$(stat -c %s "$path") stripped=$(stat -c %s "$dest")
  printf '%-8s %-60s %6s MiB -> %6s MiB stripped\n' "$kind" "${dest#"$stage"/}" \
    "$(mib "$raw")" "$(mib "$stripped")" >&2
done <"$artifacts"
[ -n "$(ls -A "$stage")" ] || die "cargo produced no executable"
# Package name -> folder in the repository, so that gpu-check.sh runs each test
# from its package root as `cargo test` does.
cargo metadata --locked --format-version 1 --no-deps | python3 -c '
import json, os, sys
m = json.load(sys.stdin)
for p in m["packages"]:
    print(p["name"], os.path.relpath(os.path.dirname(p["manifest_path"]), m["workspace_root"]), sep="\t")
' >"$stage/packages.tsv"

for f in "$stage"/bin/* "$stage"/examples/*; do
  [ -f "$f" ] || continue
  log "NEEDED by ${f#"$stage"/}: $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
done

log "packing $out/gpu-bin.tar.xz (one xz stream, 1 GiB window)"
pack_start=$(date +%s)
rm -f "$out/gpu-bin.tar.xz" "$out/MANIFEST.txt"
# Same-kind binaries next to each other, so the repeated kernels are in the window.
(cd "$stage" && find . -type f | sort) >"$artifacts.list"
tar -C "$stage" --owner=0 --group=0 -cf - -T "$artifacts.list" |
  xz -T1 --lzma2=preset=3,dict=1024MiB >"$out/gpu-bin.tar.xz.tmp"
mv "$out/gpu-bin.tar.xz.tmp" "$out/gpu-bin.tar.xz"
{
  echo "# echomimic-rs CUDA bundle; built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || echo '+dirty')"
  echo "# CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION nvcc 13.0; unpack: scripts/gpu-check.sh does it"
  (cd "$stage" && sha256sum $(cat "$artifacts.list"))
} >"$out/MANIFEST.txt"
rm -f "$artifacts.list"
bundle=$(stat -c %s "$out/gpu-bin.tar.xz")
log "bundle: $(mib "$bundle") MiB (packed in $(($(date +%s) - pack_start)) s)"

# What the device tool would carry: tracked + untracked-not-ignored files, plus this bundle.
tree_bytes=$(cd "$ROOT" && { git ls-files -z; git ls-files -z -o --exclude-standard; } |
  xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
total=$((tree_bytes + bundle))
log "working tree $(mib "$tree_bytes") MiB + bundle = $(mib "$total") MiB (device limit 64 MiB)"
if [ "$total" -ge "$MAX_BYTES" ]; then
  log "error: the working tree and the bundle together are over 64 MiB"; fail=1
fi
[ "$fail" = 0 ] || exit 1
log "done: carry '${out#"$ROOT"/}' (scripts/gpu-check.sh unpacks it)"
