#!/usr/bin/env bash
# Every benchmark of docs/BENCHMARKS.md, in order: builds the release
# binaries, then runs each scenario against a stack the harness starts
# itself (and against the nats-server WebSocket peer where it applies).
# Results: one JSON report and SVG plot per run in $OUT.
#
#   loadtest/run-benchmarks.sh            # everything (~10 minutes)
#   loadtest/run-benchmarks.sh fanout     # only the runs whose name contains "fanout"
#   BIN_DIR=/some/dir loadtest/run-benchmarks.sh   # prebuilt binaries, no build
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/daisi-ws/target}"
# BIN_DIR=folder with prebuilt daisi-edge, daisi-router and daisi-loadtest skips the build.
if [[ -z "${BIN_DIR:-}" ]]; then
  cargo build --release -p daisi-edge -p daisi-router -p daisi-loadtest
  BIN_DIR="$CARGO_TARGET_DIR/release"
fi
LT="$BIN_DIR/daisi-loadtest"
OUT="${OUT:-$CARGO_TARGET_DIR/benchmarks}"
mkdir -p "$OUT"
ONLY="${1:-}"

run() {
  local name=$1
  shift
  [[ -z "$ONLY" || "$name" == *"$ONLY"* ]] || return 0
  echo "### $name: daisi-loadtest $*" | tee -a "$OUT/summary.txt"
  uptime | tee -a "$OUT/summary.txt"
  "$LT" "$@" --no-progress --out "$OUT/$name.json" --plot "$OUT/$name.svg" 2>&1 | tee -a "$OUT/summary.txt"
}

run idle-19000        idle --sockets 19000 --hold 20 --peer nats-ws
run idle-19000-deflate idle --sockets 19000 --hold 20 --offer-deflate
run fanout-100x1000   fanout --sockets 100 --subjects 1 --rate 1000 --duration 10 --peer nats-ws
run fanout-100x500    fanout --sockets 100 --subjects 1 --rate 500 --duration 10
run fanout-100x4000   fanout --sockets 100 --subjects 1 --rate 4000 --duration 8 --peer nats-ws
run fanout-100x8000   fanout --sockets 100 --subjects 1 --rate 8000 --duration 8 --peer nats-ws
# The same with two load-client processes: one client process is the bottleneck at 8,000/s.
run fanout-100x8000-2w fanout --sockets 100 --subjects 1 --rate 8000 --duration 8 --workers 2 --peer nats-ws
run broadcast-19000   fanout --sockets 19000 --subjects 1 --rate 1 --duration 30 --peer nats-ws
run broadcast-2x9500  fanout --sockets 19000 --subjects 1 --rate 1 --duration 30 --stack-edges 2
run routed-30000      routed --users 10000 --rate 30000 --duration 10
run routed-10000      routed --users 10000 --rate 10000 --duration 10
run routed-5000       routed --users 10000 --rate 5000 --duration 10
# The same routed load on a NATS JetStream cluster of three (stream replicas 3)
# and a Redis Cluster of 3 masters + 3 replicas, right after the standalone runs.
run routed-10000-cluster routed --users 10000 --rate 10000 --duration 10 --cluster
run routed-5000-cluster  routed --users 10000 --rate 5000 --duration 10 --cluster
run migration-2000    migration --users 2000 --rounds 3 --concurrency 32
run resume-9500       resume --sockets 9500 --stack-edges 2
run resume-plain-9500 resume --plain --sockets 9500 --stack-edges 2
echo "results in $OUT"
