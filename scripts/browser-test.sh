#!/usr/bin/env bash
# Real-browser test of the demo page: starts the local stack (daisi-dev-stack),
# opens the printed demo URL in headless Debian chromium driven by
# playwright-core, and checks ready, a published event, select_chat and its
# message, and a refused token's close code. Screenshots go to artifacts/.
# Installs what it needs when missing, from Debian's own packages: chromium,
# nodejs (Debian 12 ships Node 18) and npm; then the pinned playwright-core
# (npm registry; 1.61.x, the last line that runs on Node 18). NODE=/path/to/node
# picks another Node binary.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/daisi-ws/target}"

NODE="${NODE:-node}"
export NODE
bash scripts/ensure-deps.sh --browser
# The pinned playwright-core states the Node it needs (">=18"); say so plainly
# instead of failing inside it.
need_major="$(sed -n 's/.*"node": ">=\([0-9]*\).*/\1/p' browser-test/package-lock.json | head -n1)"
node_major="$("$NODE" -p 'process.versions.node.split(".")[0]')"
if [ -n "$need_major" ] && [ "$node_major" -lt "$need_major" ]; then
  echo "browser-test: playwright-core needs Node.js >= $need_major, found $("$NODE" --version) ($NODE)" >&2
  exit 1
fi
want="$("$NODE" -p 'require("./browser-test/package.json").dependencies["playwright-core"]')"
have="$("$NODE" -p 'try { require("./browser-test/node_modules/playwright-core/package.json").version } catch { "" }')"
if [ "$have" != "$want" ]; then
  echo "browser-test: installing playwright-core $want (npm)" >&2
  (cd browser-test && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "browser-test: building daisi-edge, daisi-router and daisi-dev-stack"
cargo build -q --bins -p daisi-edge -p daisi-router -p daisi-dev-stack
mkdir -p artifacts
stack_log=artifacts/browser-test-stack.log
"$CARGO_TARGET_DIR/debug/daisi-dev-stack" --publish-interval-ms 500 >"$stack_log" 2>&1 &
stack_pid=$!
stop_stack() {
  if kill -0 "$stack_pid" 2>/dev/null; then
    kill -TERM "$stack_pid" 2>/dev/null || true
    wait "$stack_pid" 2>/dev/null || true
  fi
}
trap stop_stack EXIT

demo_url=""
for _ in $(seq 1 600); do
  demo_url="$(sed -n 's/^DEMO_URL=//p' "$stack_log")"
  [ -n "$demo_url" ] && break
  if ! kill -0 "$stack_pid" 2>/dev/null; then
    echo "browser-test: the dev stack exited before printing DEMO_URL; its output:" >&2
    cat "$stack_log" >&2
    echo "browser: 0 passed, 1 failed"
    exit 1
  fi
  sleep 0.2
done
if [ -z "$demo_url" ]; then
  echo "browser-test: no DEMO_URL within 120 s; stack output:" >&2
  cat "$stack_log" >&2
  echo "browser: 0 passed, 1 failed"
  exit 1
fi

set +e
DEMO_URL="$demo_url" ARTIFACTS_DIR="$PWD/artifacts" "$NODE" browser-test/demo.test.mjs
rc=$?
set -e
stop_stack
trap - EXIT
if [ "$rc" -ne 0 ]; then
  echo "browser-test: failed; dev stack output in $stack_log" >&2
fi
# The JS client's resume tests start a stack of their own (they kill and
# restart edges), from the binaries built above.
set +e
ARTIFACTS_DIR="$PWD/artifacts" DAISI_BIN_DIR="$CARGO_TARGET_DIR/debug" "$NODE" browser-test/resume.test.mjs
rc2=$?
set -e
[ "$rc" -ne 0 ] || rc=$rc2
exit "$rc"
