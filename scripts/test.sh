#!/usr/bin/env bash
# The test command of the README: installs/starts what the tests need (Redis,
# ffmpeg, Chromium, cargo-nextest), then runs every test of the workspace on
# the CPU: first the doc tests (nextest does not run them; `no_run` ones are only compiled),
# then every other test with nextest. Extra arguments go to `cargo nextest run` (e.g. a test
# filter).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
export ECHOMIMIC_REQUIRE_REDIS=1 ECHOMIMIC_REQUIRE_PROMTOOL=1
cargo test --doc --workspace --locked
exec cargo nextest run --workspace --locked --profile ci "$@"
