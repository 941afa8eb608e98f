#!/usr/bin/env bash
# Where the CPU goes on one hot path: runs a loadtest scenario and, while it
# runs, samples one of the stack's processes with `perf` (Debian: linux-perf),
# then writes the top symbols by self time, and by inclusive time of the
# product's own functions, to $OUT/<name>.txt.
#
#   loadtest/profile.sh NAME PROCESS DELAY SECONDS -- LOADTEST-ARGS...
#
#   loadtest/profile.sh edge-per-delivery daisi-edge 3 6 -- fanout --sockets 100 --subjects 1 --rate 2000 --duration 10
#   loadtest/profile.sh router-per-event daisi-router 3 6 -- routed --users 10000 --rate 5000 --duration 10
#   loadtest/profile.sh edge-per-connect daisi-edge 2 4 -- migration --users 2000 --rounds 3 --concurrency 32
#
# PROCESS is the binary's name (the newest such process is sampled) and
# DELAY the seconds to wait after the scenario starts (the stack comes up and
# the load begins) before sampling for SECONDS. BIN_DIR as in
# run-benchmarks.sh (prebuilt release binaries); release builds keep line
# tables (`[profile.release] debug = 1`), so symbols resolve.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 5 && "$5" == "--" ]] || { sed -n '2,18p' "$0" >&2; exit 2; }
name=$1 process=$2 delay=$3 seconds=$4
shift 5
command -v perf >/dev/null || { echo "profile: perf is missing (apt-get install linux-perf)" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/daisi-ws/target}"
if [[ -z "${BIN_DIR:-}" ]]; then
  cargo build --release -p daisi-edge -p daisi-router -p daisi-loadtest
  BIN_DIR="$CARGO_TARGET_DIR/release"
fi
OUT="${OUT:-loadtest/results/profiles}"
mkdir -p "$OUT"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

PATH="$BIN_DIR:$PATH" "$BIN_DIR/daisi-loadtest" "$@" --no-progress --out "$work/report.json" >"$work/loadtest.log" 2>&1 &
lt=$!
sleep "$delay"
pid="$(pgrep -n -x "$process" || true)"
[[ -n "$pid" ]] || { echo "profile: no $process process is running" >&2; wait "$lt" || true; cat "$work/loadtest.log" >&2; exit 1; }
perf record -q -F 997 -g -p "$pid" -o "$work/perf.data" -- sleep "$seconds" 2>"$work/perf.log" || { cat "$work/perf.log" >&2; exit 1; }
wait "$lt" || true

{
  echo "# $name: perf samples of $process (pid $pid) for ${seconds}s, ${delay}s into:"
  echo "# daisi-loadtest $*"
  echo "# commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%dT%H:%MZ), load: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo "## Self time by symbol (top 40)"
  perf report -i "$work/perf.data" --no-children --stdio --sort symbol --percent-limit 0.5 -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]-]+$//' | head -40
  echo
  echo "## Self time by area"
  perf report -i "$work/perf.data" --no-children --stdio --sort symbol -g none 2>/dev/null | grep -v '^#' | awk '
    /%/ { pct = $1; sub("%", "", pct); line = $0
      if (line ~ /\[k\]/) area = "kernel (syscalls, TCP, scheduler)"
      else if (line ~ /daisi_/) area = "daisi (product code)"
      else if (line ~ /tokio::/) area = "tokio (runtime, I/O readiness)"
      else if (line ~ /metrics/) area = "metrics"
      else if (line ~ /flate|miniz|zlib|deflate|inflate/) area = "compression"
      else if (line ~ /serde|json/) area = "JSON"
      else if (line ~ /(mem(cpy|move|set)|malloc|free|realloc|_int_|alloc)/) area = "allocation and memcpy"
      else if (line ~ /redis|async_nats|tonic|h2::|hyper|prost/) area = "clients (redis, nats, gRPC)"
      else area = "other user space"
      sum[area] += pct }
    END { for (a in sum) printf "%6.1f%%  %s\n", sum[a], a }' | sort -rn
  echo
  echo "## Inclusive time of the product's own functions (top 40)"
  perf report -i "$work/perf.data" --children --stdio --sort symbol -g none 2>/dev/null \
    | grep -E 'daisi_(edge|router|common)::' | sed -E 's/[[:space:]-]+$//' | head -40
  echo
  echo "## Loadtest output"
  tail -n 30 "$work/loadtest.log"
} >"$OUT/$name.txt"
echo "profile: wrote $OUT/$name.txt"
