#!/usr/bin/env bash
# The README's main command: runs the whole EchoMimic worker service end to end on this machine.
#
#   1. makes sure Redis answers and ffmpeg is installed (scripts/ensure-deps.sh --only-runtime);
#   2. builds the worker, the temp-file server and the submit_and_follow example;
#   3. starts the temp-file server on a free loopback port (files in a temp folder, a random
#      access token for this run) and a worker on its own queue;
#   4. uploads the bundled photo and speech clip, submits a task, prints its progress, downloads
#      the MP4 into ./demo-output/ and prints its path;
#   5. stops everything it started (also on Ctrl-C or an error).
#
# Weights: ./pretrained_weights (official layout of the Hugging Face repo BadToBest/EchoMimic) when
# present — get them with
#     pip install -U "huggingface_hub[cli]"
#     huggingface-cli download BadToBest/EchoMimic --local-dir pretrained_weights
# — otherwise the tiny random-weight model of testdata/golden/public (128x128), whose video is
# noise: everything else (queue, face detection, audio, diffusion loop, encoding, upload) is real.
#
# Settings (environment): REDIS_HOST / REDIS_PORT / REDIS_DB (default 127.0.0.1 / 6379 / 0),
# GPU_ID (default 0), ECHOMIMIC_DEVICE (default auto), ECHOMIMIC_DEMO_PROFILE (cargo profile,
# default dev; `release` builds optimised binaries), ECHOMIMIC_DEMO_TIMEOUT (seconds, default 3600),
# ECHOMIMIC_DEMO_STEPS (denoising steps; default: the worker's default for the weights).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

log() { printf '\033[1m[demo]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

export REDIS_HOST="${REDIS_HOST:-127.0.0.1}" REDIS_PORT="${REDIS_PORT:-6379}" REDIS_DB="${REDIS_DB:-0}"
GPU_ID="${GPU_ID:-0}"
PROFILE="${ECHOMIMIC_DEMO_PROFILE:-dev}"
TIMEOUT="${ECHOMIMIC_DEMO_TIMEOUT:-3600}"

redis_ping() {
  { exec 3<>"/dev/tcp/$REDIS_HOST/$REDIS_PORT" && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG; } 2>/dev/null
}

# --- 1. dependencies ------------------------------------------------------------------------
redis_was_up=0
if redis_ping; then redis_was_up=1; fi
scripts/ensure-deps.sh --only-runtime

# --- cleanup of everything started below ------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/echomimic-demo.XXXXXX")"
pids=()
cleanup() {
  local code=$?
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ "$redis_was_up" = 0 ] && command -v redis-cli >/dev/null && redis_ping; then
    log "stopping the Redis server this demo started"
    redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  fi
  if [ "$code" != 0 ] && [ -f "$WORK/worker.log" ]; then
    log "last lines of the worker log:"; tail -n 20 "$WORK/worker.log" >&2 || true
  fi
  rm -rf "$WORK"
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 2. build ---------------------------------------------------------------------------------
log "building (cargo profile: $PROFILE)"
cargo build --profile "$PROFILE" --locked -p echomimic-worker -p echomimic-tempfile \
  -p echomimic-examples --bin echomimic-worker --bin echomimic-tempfile-server --example submit_and_follow
dir_of_profile() { if [ "$1" = dev ]; then echo debug; else echo "$1"; fi; }
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$(dir_of_profile "$PROFILE")"

# --- 3. temp-file server and worker -------------------------------------------------------------
# A random access token for this run, shared by the server, the worker and the client (all read
# TEMPFILE_TOKEN): the demo runs with the temp-file API's access control on.
TEMPFILE_TOKEN="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
export TEMPFILE_TOKEN
port_free() { ! { exec 4<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null; }
PORT=""
for _ in $(seq 1 50); do
  p=$(( 20000 + RANDOM % 40000 ))
  if port_free "$p"; then PORT=$p; break; fi
done
[ -n "$PORT" ] || die "no free loopback port found"
BASE_URL="http://127.0.0.1:$PORT"
"$BIN/echomimic-tempfile-server" --listen "127.0.0.1:$PORT" --dir "$WORK/files" >"$WORK/tempfile.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do port_free "$PORT" || break; sleep 0.1; done
port_free "$PORT" && die "the temp-file server did not start (see above)"
log "temp-file server on $BASE_URL (access token required; a random one for this run)"

model_args=()
if [ -d pretrained_weights ]; then
  model_args=(--weights pretrained_weights)
  if [ -f pretrained_weights/denoising_unet_acc.pth ]; then model_args+=(--variant acc); fi
  log "using the real weights in ./pretrained_weights (${model_args[*]})"
else
  model_args=(--config testdata/golden/public/configs/prompts/animation_tiny.yaml -W 128 -H 128)
  log "NOTE: no ./pretrained_weights folder: running the TINY RANDOM-WEIGHT model (128x128)."
  log "      Its video is NOISE (random weights cannot draw a face); everything else is real."
  log "      For real videos: huggingface-cli download BadToBest/EchoMimic --local-dir pretrained_weights"
fi

QUEUE="echomimic_demo_$$"
"$BIN/echomimic-worker" serve "${model_args[@]}" \
  --gpu-id "$GPU_ID" --queue "$QUEUE" --base-url "$BASE_URL" \
  --device "${ECHOMIMIC_DEVICE:-auto}" --temp-dir "$WORK/tasks" >"$WORK/worker.log" 2>&1 &
WORKER=$!
pids+=("$WORKER")
log "worker started (pid $WORKER, gpu id $GPU_ID, queue $QUEUE); log: $WORK/worker.log"

# --- 4. submit, follow, download ----------------------------------------------------------------
mkdir -p demo-output
OUT="$ROOT/demo-output/echomimic-demo-$(date +%Y%m%d-%H%M%S).mp4"
task_args=()
if [ -n "${ECHOMIMIC_DEMO_STEPS:-}" ]; then task_args+=(--steps "$ECHOMIMIC_DEMO_STEPS"); fi
"$BIN/examples/submit_and_follow" \
  --image testdata/golden/public/inputs/astronaut.png --audio testdata/golden/public/inputs/speech.wav \
  --gpu-id "$GPU_ID" --queue "$QUEUE" --base-url "$BASE_URL" \
  --timeout-secs "$TIMEOUT" --download "$OUT" "${task_args[@]}" &
CLIENT=$!
pids+=("$CLIENT")
# Follow the client, but stop at once if the worker dies (bad weights, lease held, ...).
while kill -0 "$CLIENT" 2>/dev/null; do
  if ! kill -0 "$WORKER" 2>/dev/null; then
    wait "$WORKER" || true
    die "the worker exited early; see its log below"
  fi
  sleep 0.5
done
if wait "$CLIENT"; then
  log "done: $OUT"
  if [ ! -d pretrained_weights ]; then
    log "(tiny random-weight model: the picture is noise; download the real weights for a real video)"
  fi
  printf '%s\n' "$OUT"
else
  die "the task did not complete"
fi
