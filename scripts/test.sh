#!/usr/bin/env bash
# The test command of the README: installs/starts what the tests need (Redis,
# ffmpeg, Chromium, cargo-nextest), then runs every test of the workspace on
# the CPU. Extra arguments go to `cargo nextest run` (e.g. a test filter).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
export ECHOMIMIC_REQUIRE_REDIS=1
exec cargo nextest run --workspace --locked --profile ci "$@"
