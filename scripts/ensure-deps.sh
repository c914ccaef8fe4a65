#!/usr/bin/env bash
# Makes sure the programs and services the tests and the demo need are present
# on a fresh Debian/Ubuntu machine: cmake and nasm (building libjpeg-turbo), a Redis server answering on
# $REDIS_HOST:$REDIS_PORT (default 127.0.0.1:6379), ffmpeg/ffprobe (the
# production encoder path and the probes of the media tests), Chromium (the
# browser playback test), promtool (the metrics test) and cargo-nextest.
# Idempotent: only installs or starts what is missing. Set ECHOMIMIC_SKIP_APT=1 to never call apt-get.
set -euo pipefail

log() { printf '[ensure-deps] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

apt_updated=0
apt_install() {
  if [ "${ECHOMIMIC_SKIP_APT:-0}" = 1 ]; then
    log "missing $* and ECHOMIMIC_SKIP_APT=1: install it yourself"; return 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    log "missing $* and no apt-get on this machine: install it yourself"; return 1
  fi
  if [ "$apt_updated" = 0 ]; then
    $SUDO apt-get update -qq >/dev/null; apt_updated=1
  fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

want_redis=1 want_ffmpeg=1 want_chromium=1 want_nextest=1
for arg in "$@"; do
  case "$arg" in
    --no-chromium) want_chromium=0 ;;
    --no-nextest) want_nextest=0 ;;
    --only-runtime) want_chromium=0; want_nextest=0 ;;
    *) log "unknown option $arg"; exit 2 ;;
  esac
done

# cmake (and nasm, for its SIMD code) build libjpeg-turbo from source: the turbojpeg crate,
# OpenCV-exact JPEG pixels. Needed by every build, the demo's included.
if ! { command -v cmake >/dev/null && command -v nasm >/dev/null; }; then
  apt_install cmake nasm
fi

if [ "$want_ffmpeg" = 1 ] && ! { command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null; }; then
  apt_install ffmpeg
fi

# promtool (Debian's prometheus package) checks the worker's /metrics in the tests.
if [ "$want_nextest" = 1 ] && ! command -v promtool >/dev/null; then
  apt_install prometheus
fi

if [ "$want_chromium" = 1 ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  apt_install chromium
fi

if [ "$want_redis" = 1 ]; then
  host="${REDIS_HOST:-127.0.0.1}"; port="${REDIS_PORT:-6379}"
  ping() { { exec 3<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG; } 2>/dev/null; }
  if ! ping; then
    if ! command -v redis-server >/dev/null; then apt_install redis-server; fi
    log "no Redis answers on $host:$port: starting one"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
      --dir /tmp --logfile "/tmp/echomimic-redis-$port.log"
    for _ in $(seq 1 50); do ping && break; sleep 0.1; done
    ping || { log "Redis did not start (see /tmp/echomimic-redis-$port.log)"; exit 1; }
  fi
fi

if [ "$want_nextest" = 1 ] && ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest >/dev/null
fi
