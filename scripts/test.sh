#!/usr/bin/env bash
# The test command of the README: every unit and integration test of the
# workspace, against real nats-server and redis-server processes that the
# tests start themselves on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/daisi-ws/target}"
if command -v cargo-nextest >/dev/null 2>&1; then
  exec cargo nextest run --workspace --no-fail-fast "$@"
else
  exec cargo test --workspace --no-fail-fast "$@"
fi
