#!/usr/bin/env bash
# echomimic-worker generate against the official PyTorch EchoMimic v1 pipeline
# (BadToBest/EchoMimic @ 76cdab1), same weights, same inputs, CPU, f32, the
# same thread count on both sides, run back to back; prints ours, reference
# and ours/reference per request and per part (issue 12; benches/RESULTS.md).
#
#   scripts/bench-vs-reference.sh [OUT_DIR]
#
# Requests (BENCH_REQUESTS): "golden" = testdata/golden/public (128², 16 frames, 3 steps,
# cfg 2.5, windows 8/3, seed 420, the tiny random weights); "real" = a
# photo and a speech file from the reference repository's own assets
# (default assets/test_imgs/d.png, 884x880, and assets/test_audios/
# echomimic_en.wav, 5.2 s at 24 kHz), 128², windows 12/3, 3 steps, cfg 2.5,
# the same tiny weights; "components" = the parts alone against the
# reference's own code (facenet-pytorch MTCNN on a 512², an 884x880 and a
# 1342² photo; the vendored Whisper's log-mel and a Whisper-tiny-sized encoder
# with random weights on 30 s), best of BENCH_ITERS calls in one process.
#
# Environment (all optional):
#   ECHOMIMIC_REFERENCE_DIR  a local copy of the reference code at 76cdab1
#                            (default: git clone into OUT_DIR/EchoMimic)
#   REFERENCE_PYTHON         a Python with the reference's packages (default:
#                            the venv REFERENCE_VENV, created on first use
#                            from benches/python/reference-requirements.txt)
#   REFERENCE_VENV           default target/venv-reference
#   BENCH_RUNS               runs per side and request, best of them (3)
#   BENCH_THREADS            CPU threads on both sides (2)
#   BENCH_REQUESTS           which requests, space-separated
#                            ("golden real components")
#   BENCH_ITERS              calls per component, best of them (5)
#   REAL_IMAGE, REAL_AUDIO   the "real" request's photo and speech (paths;
#                            relative ones are taken inside the reference)
#   OURS_BIN                 an echomimic-worker binary (default: built
#                            here with `cargo build --release`)
#   REFERENCE_AUDIO_TRACK    1 (default): the reference ends as the official
#                            infer_audio2vid.py does, adding the speech to its
#                            silent MP4 with moviepy, so both sides deliver an
#                            MP4 with sound; 0: it stops at the silent MP4
#
# The reference runs its own copy of the code with the two CPU patches of
# testdata/golden/public/README.md applied (P1: the reference-attention hooks'
# default device cuda -> cpu; P2: Whisper feature windows reshaped to the
# encoder's width instead of a hard-coded 384), both behaviour-neutral.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

REFERENCE_COMMIT=76cdab1a08cf5f10d9f9fa88957b976e4ea863f8
REFERENCE_URL=https://github.com/BadToBest/EchoMimic

out="${1:-$(mktemp -d)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
runs="${BENCH_RUNS:-3}"
threads="${BENCH_THREADS:-2}"
requests="${BENCH_REQUESTS:-golden real components}"
iters="${BENCH_ITERS:-5}"
case "${REFERENCE_AUDIO_TRACK:-1}" in
  1) ref_audio=() ;;
  0) ref_audio=(--no-audio-track) ;;
  *) echo "error: REFERENCE_AUDIO_TRACK must be 0 or 1" >&2 && exit 1 ;;
esac
golden="$repo/testdata/golden/public"

die() {
  echo "error: $*" >&2
  exit 1
}
log() { echo "[bench] $*" >&2; }

[ -f "$golden/configs/prompts/animation_tiny.yaml" ] || die "$golden is missing (run from a full clone)"
case "$runs" in '' | *[!0-9]* | 0) die "BENCH_RUNS must be a positive integer, not '$runs'" ;; esac

# 1. the reference code at the pinned commit
src="${ECHOMIMIC_REFERENCE_DIR:-}"
if [ -z "$src" ]; then
  src="$out/EchoMimic"
  if [ ! -d "$src/.git" ]; then
    command -v git >/dev/null || die "git is needed to clone $REFERENCE_URL (or set ECHOMIMIC_REFERENCE_DIR)"
    log "cloning $REFERENCE_URL -> $src"
    git clone --quiet "$REFERENCE_URL" "$src" || die "cannot clone $REFERENCE_URL; set ECHOMIMIC_REFERENCE_DIR to a local copy at $REFERENCE_COMMIT"
  fi
  git -C "$src" checkout --quiet "$REFERENCE_COMMIT" || die "cannot check out $REFERENCE_COMMIT in $src"
fi
[ -f "$src/src/pipelines/pipeline_echo_mimic.py" ] ||
  die "ECHOMIMIC_REFERENCE_DIR=$src does not hold the EchoMimic code (no src/pipelines/pipeline_echo_mimic.py)"
if git -C "$src" rev-parse HEAD >/dev/null 2>&1; then
  head="$(git -C "$src" rev-parse HEAD)"
  [ "$head" = "$REFERENCE_COMMIT" ] || log "warning: $src is at $head, not the pinned $REFERENCE_COMMIT"
fi

# 2. our patched copy (P1, P2), fresh every run
ref="$out/reference"
rm -rf "$ref"
mkdir -p "$ref"
cp -r "$src/src" "$ref/src"
p1="$ref/src/models/mutual_self_attention.py"
p2="$ref/src/models/whisper/audio2feature.py"
sed -i 's/device=torch\.device("cuda"),/device=torch.device("cpu"),/' "$p1"
sed -i 's/reshape(-1, 384)/reshape(-1, feature_array.shape[-1])/' "$p2"
grep -q 'device=torch.device("cpu"),' "$p1" || die "patch P1 did not apply to $p1"
! grep -q 'reshape(-1, 384)' "$p2" && grep -q 'reshape(-1, feature_array.shape\[-1\])' "$p2" ||
  die "patch P2 did not apply to $p2"

# 3. the reference's Python
py="${REFERENCE_PYTHON:-}"
if [ -z "$py" ]; then
  venv="${REFERENCE_VENV:-$repo/target/venv-reference}"
  if [ ! -x "$venv/bin/python" ]; then
    base_py="$(command -v python3.11 || command -v python3 || true)"
    [ -n "$base_py" ] || die "no python3 to create $venv (set REFERENCE_PYTHON to a ready interpreter)"
    log "creating $venv with $base_py (several GB of downloads)"
    "$base_py" -m venv "$venv" || die "cannot create the venv $venv"
    "$venv/bin/pip" install --quiet -r benches/python/reference-requirements.txt ||
      die "pip could not install benches/python/reference-requirements.txt into $venv"
    "$venv/bin/pip" install --quiet --no-deps facenet-pytorch==2.5.0 ||
      die "pip could not install facenet-pytorch 2.5.0 into $venv"
  fi
  py="$venv/bin/python"
fi
"$py" - <<'EOF' || die "$py lacks the reference's packages (benches/python/reference-requirements.txt, facenet-pytorch --no-deps)"
import torch, diffusers, transformers, facenet_pytorch, cv2, av, omegaconf, einops, numpy, PIL, moviepy
for name, have, want in (("torch", torch.__version__, "2.2.2"),
                         ("diffusers", diffusers.__version__, "0.24.0")):
    if not have.startswith(want):
        print(f"[bench] warning: {name} {have}, the reference pins {want}", flush=True)
EOF

# 4. our binary
bin="${OURS_BIN:-}"
if [ -z "$bin" ]; then
  log "building echomimic-worker (release)"
  cargo build --quiet --release --locked -p echomimic-worker >&2 || die "cargo build failed"
  bin="$repo/target/release/echomimic-worker"
fi
[ -x "$bin" ] || die "OURS_BIN=$bin is not an executable"

# 5. requests: name, our args, reference args (the shared ones are the same)
real_image="${REAL_IMAGE:-assets/test_imgs/d.png}"
real_audio="${REAL_AUDIO:-assets/test_audios/echomimic_en.wav}"
case "$real_image" in /*) ;; *) real_image="$src/$real_image" ;; esac
case "$real_audio" in /*) ;; *) real_audio="$src/$real_audio" ;; esac

request_args() {
  case "$1" in
    golden) echo "--image $golden/inputs/astronaut.png --audio $golden/inputs/speech.wav -W 128 -H 128 -L 16 --steps 3 --cfg 2.5 --seed 420 --fps 24 --context-frames 8 --context-overlap 3" ;;
    real)
      [ -f "$real_image" ] || die "REAL_IMAGE $real_image does not exist"
      [ -f "$real_audio" ] || die "REAL_AUDIO $real_audio does not exist"
      echo "--image $real_image --audio $real_audio -W 128 -H 128 -L 1200 --steps 3 --cfg 2.5 --seed 420 --fps 24 --context-frames 12 --context-overlap 3"
      ;;
    components) ;;
    *) die "unknown request '$1' in BENCH_REQUESTS (golden, real, components)" ;;
  esac
}

now() { date +%s.%N; }
# wall time of the whole process, added to the part timings in $2
timed() {
  local json="$1" log="$2"
  shift 2
  local t0 t1
  t0="$(now)"
  "$@" >"$log" 2>&1 || {
    tail -n 20 "$log" >&2
    die "failed: $* (log: $log)"
  }
  t1="$(now)"
  "$py" -c 'import json, sys; p = sys.argv[1]; d = json.load(open(p)); d["whole"] = float(sys.argv[3]) - float(sys.argv[2]); json.dump(d, open(p, "w"), indent=1)' "$json" "$t0" "$t1"
}

log "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for req in $requests; do
  args="$(request_args "$req")"
  dir="$out/$req"
  mkdir -p "$dir"
  if [ "$req" = components ]; then
    photos=("512=$golden/inputs/astronaut.png" "884x880=$src/assets/test_imgs/d.png"
      "1342=$src/assets/test_imgs/a.png")
    photo_args=()
    for p in "${photos[@]}"; do
      [ -f "${p#*=}" ] || die "component photo ${p#*=} does not exist"
      photo_args+=(--photo "$p")
    done
    cargo bench --quiet --locked -p echomimic-benches --bench components --no-run >"$dir/build.log" 2>&1 ||
      die "cargo bench --bench components does not build (log: $dir/build.log)"
    log "components: ours"
    RAYON_NUM_THREADS="$threads" cargo bench --quiet --locked -p echomimic-benches --bench components -- \
      --speech "$golden/inputs/speech.wav" "${photo_args[@]}" --iters "$iters" \
      >"$dir/ours-1.json" 2>"$dir/ours-1.log" || die "our component bench failed (log: $dir/ours-1.log)"
    log "components: reference"
    OMP_NUM_THREADS="$threads" "$py" "$repo/benches/python/reference_components.py" --reference-dir "$ref" \
      --speech "$golden/inputs/speech.wav" "${photo_args[@]}" --iters "$iters" --threads "$threads" \
      >"$dir/ref-1.json" 2>"$dir/ref-1.log" || die "the reference component bench failed (log: $dir/ref-1.log)"
    continue
  fi
  for i in $(seq 1 "$runs"); do
    log "$req run $i/$runs: ours"
    # shellcheck disable=SC2086 # $args is a list of words without spaces
    (cd "$golden" && export RAYON_NUM_THREADS="$threads" && timed "$dir/ours-$i.json" "$dir/ours-$i.log" \
      "$bin" generate --config configs/prompts/animation_tiny.yaml $args --device cpu --dtype f32 \
      --output "$dir/ours-$i.mp4" --timings-json "$dir/ours-$i.json")
    log "$req run $i/$runs: reference"
    # shellcheck disable=SC2086
    (cd "$golden" && export OMP_NUM_THREADS="$threads" && timed "$dir/ref-$i.json" "$dir/ref-$i.log" \
      "$py" "$repo/benches/python/reference_runner.py" --reference-dir "$ref" \
      --config configs/prompts/animation_tiny.yaml $args --threads "$threads" \
      "${ref_audio[@]}" --output "$dir/ref-$i.mp4" --timings-json "$dir/ref-$i.json")
  done
done
log "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

# shellcheck disable=SC2086
"$py" "$repo/benches/python/reference_table.py" --runs "$runs" --threads "$threads" "$out" $requests |
  tee "$out/table.md"
