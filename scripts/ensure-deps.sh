#!/usr/bin/env bash
# Installs, from Debian's own packages (apt), what the scripts need and a
# fresh Debian 12 machine with Rust may lack; does nothing when all is there.
#
#   scripts/ensure-deps.sh            servers the stack and the tests start:
#                                     nats-server, redis-server, redis-cli; and a C
#                                     toolchain (gcc, libc6-dev: the linker
#                                     Rust uses, and `ring`'s C code)
#   scripts/ensure-deps.sh --ci       + python3 and python3-yaml (.ci/check-yaml.sh), git
#   scripts/ensure-deps.sh --browser  + chromium, nodejs and npm (scripts/browser-test.sh)
#
# Needs root or sudo only when something is missing; otherwise says what to install.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

need=()
have nats-server || need+=(nats-server)
have redis-server || need+=(redis-server)
# redis-cli joins the tests' Redis Clusters (`--cluster create`).
have redis-cli || need+=(redis-tools)
have cc || need+=(gcc libc6-dev)
for arg in "$@"; do
  case "$arg" in
    --ci)
      have python3 || need+=(python3)
      python3 -c 'import yaml' 2>/dev/null || need+=(python3-yaml)
      have git || need+=(git)
      ;;
    --browser)
      [ -x /usr/bin/chromium ] || need+=(chromium)
      have "${NODE:-node}" || need+=(nodejs)
      have npm || need+=(npm)
      ;;
    *)
      echo "ensure-deps: unknown argument $arg (known: --ci --browser)" >&2
      exit 2
      ;;
  esac
done

if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "missing ${need[*]}: install with 'apt-get install -y ${need[*]}'" >&2
      exit 1
    fi
    SUDO=sudo
  fi
  echo "installing ${need[*]} (apt)" >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
