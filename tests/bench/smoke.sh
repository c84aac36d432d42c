#!/bin/bash
# smoke.sh - the issue-11 benchmark harnesses at CI size (root): each bench binary built
# in the debug profile and run once on a small location, so a harness that no longer works
# (an agent that never applies a change, a counter gone from the Core) fails CI. The
# figures printed here are not the record: BENCHMARKS.md has the commands for that.
#
#   tests/bench/smoke.sh          # about a minute after `cargo test --workspace`
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "smoke.sh: needs root (network namespaces)" >&2; exit 1; }
# One-peer change through a Core and a real agent (userspace backend, wireguard-go).
GATEHOUSE_BENCH_PEERS=200,1000 GATEHOUSE_BENCH_CHANGES=5 \
	nice cargo test -p gatehouse --bench change
# Stats cycle: one read per tick, only the changed peers sent (memory backend).
GATEHOUSE_BENCH_PEERS=2000 GATEHOUSE_BENCH_ROUNDS=2 GATEHOUSE_BENCH_STATS_MS=1000 \
	nice cargo test -p gatehouse --bench stats_cycle
