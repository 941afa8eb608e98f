#!/usr/bin/env bash
# The test command of the README: every unit and integration test of the
# workspace, against real nats-server and redis-server processes that the
# tests start themselves on free ports (Redis standalone); then the tests
# whose stacks use Redis again, each with a Redis Cluster
# (DWS_TEST_REDIS=cluster: three masters, three replicas per test; decision 0031).
#
#   scripts/test.sh [ARGS]   ARGS go to both runs (e.g. a test name filter; an -E
#                            expression widens the cluster pass, nextest joins them)
#
#   DWS_TEST_REDIS_MODES="standalone cluster"   both passes (the default);
#                                               "standalone" or "cluster" runs only that pass
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/daisi-ws/target}"

# The cluster pass: every integration test of the edge and the router (their
# stacks get their Redis from testkit's TestRedis), the edge's own tests that
# start a stack, and the loadtest self-test. Left out: tests that start no
# Redis (the edge's property tests), and the tests that always run on a Redis
# Cluster of their own (router/tests/redis_cluster.rs and the ACL cluster test
# and the TLS cluster test of router/tests/secured_deps.rs: they ran in the first pass). Tests about one
# redis-server of their own (ACL, TLS) print why they skip in this pass.
cluster_filter='(package(daisi-edge) | package(daisi-router) | binary_id(daisi-loadtest::selftest))
  & !binary_id(daisi-edge::properties) & !binary_id(daisi-router::redis_cluster)
  & !(binary_id(daisi-router::secured_deps) & (test(=a_redis_cluster_with_an_acl_user_delivers_takes_over_and_hides_the_password)
       | test(=rediss_to_a_redis_cluster_with_a_ca_file)))'

modes="${DWS_TEST_REDIS_MODES:-standalone cluster}"
failed=()
for mode in $modes; do
  case "$mode" in
    standalone)
      echo "test: every test, Redis standalone"
      if command -v cargo-nextest >/dev/null 2>&1; then
        DWS_TEST_REDIS=standalone cargo nextest run --workspace --no-fail-fast "$@" || failed+=(standalone)
      else
        DWS_TEST_REDIS=standalone cargo test --workspace --no-fail-fast "$@" || failed+=(standalone)
      fi
      ;;
    cluster)
      echo "test: the tests whose stacks use Redis, on a Redis Cluster (DWS_TEST_REDIS=cluster)"
      start=$SECONDS
      if command -v cargo-nextest >/dev/null 2>&1; then
        DWS_TEST_REDIS=cluster cargo nextest run --workspace --no-fail-fast -E "$cluster_filter" "$@" \
          || failed+=(cluster)
      else
        DWS_TEST_REDIS=cluster cargo test -p daisi-edge -p daisi-router -p daisi-loadtest --no-fail-fast "$@" \
          || failed+=(cluster)
      fi
      echo "test: the cluster pass took $((SECONDS - start)) s"
      ;;
    *)
      echo "test: unknown mode $mode in DWS_TEST_REDIS_MODES (known: standalone cluster)" >&2
      exit 2
      ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "test: failures in: ${failed[*]}" >&2
  exit 1
fi
