#!/usr/bin/env bash
# Real-browser test of the demo page: starts the local stack (daisi-dev-stack),
# opens the printed demo URL in headless Debian chromium driven by
# playwright-core, and checks ready, a published event, select_chat and its
# message, and a refused token's close code. Screenshots go to artifacts/.
# Installs chromium (apt) and playwright-core (npm) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/daisi-ws/target}"

bash scripts/ensure-deps.sh
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
apt_install() {
  echo "browser-test: installing $* (apt)" >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
[ -x /usr/bin/chromium ] || apt_install chromium
command -v npm >/dev/null 2>&1 || apt_install nodejs npm
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "browser-test: Node.js >= 20 is needed for playwright-core (found $(node --version))" >&2
  exit 1
fi
want="$(node -p 'require("./browser-test/package.json").dependencies["playwright-core"]')"
have="$(node -p 'try { require("./browser-test/node_modules/playwright-core/package.json").version } catch { "" }')"
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
DEMO_URL="$demo_url" ARTIFACTS_DIR="$PWD/artifacts" node browser-test/demo.test.mjs
rc=$?
set -e
stop_stack
trap - EXIT
if [ "$rc" -ne 0 ]; then
  echo "browser-test: failed; dev stack output in $stack_log" >&2
fi
exit "$rc"
