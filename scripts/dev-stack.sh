#!/usr/bin/env bash
# README command 1: the whole local stack on 127.0.0.1 — nats-server -js,
# redis-server, one daisi-router, two daisi-edge, fresh dev secrets, a demo URL
# and a sample publisher. Ctrl-C stops everything. Options: --help.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/daisi-ws/target}"
cargo build --bins -p daisi-edge -p daisi-router -p daisi-dev-stack
exec "$CARGO_TARGET_DIR/debug/daisi-dev-stack" "$@"
