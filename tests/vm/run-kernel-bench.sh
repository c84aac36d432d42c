#!/bin/bash
# run-kernel-bench.sh - build benches/kernel.rs (optimized) on the host and run it in ONE
# VM with kernel WireGuard; prints a markdown table (see BENCHMARKS.md). The VM is
# TCG-emulated: absolute times are slow, read the ratios.
# `run-kernel-bench.sh restart` runs benches/restart.rs the same way (kernel row of the
# restart benchmark); `run-kernel-bench.sh change` runs benches/change.rs with the kernel
# backend (one-peer change latency through a Core and a real agent process).
# Sizes: GATEHOUSE_BENCH_PEERS (see each bench's doc). 100,000 peers need more guest
# memory and time than the defaults: WGVM_MEM=4096 WGVM_TIMEOUT=14400. The benches never
# delete a large interface (minutes under TCG): its namespace is dropped, the VM powered off.
bench=kernel
case ${1:-} in kernel|restart|change) bench=$1; shift ;; esac
[ "$bench" = change ] && export GATEHOUSE_BENCH_BACKEND=${GATEHOUSE_BENCH_BACKEND:-kernel}
# The kernel bench's defguard_wireguard_rs column: its helper, a package of its own
# (benches/defguard), built here; GATEHOUSE_BENCH_DEFGUARD=0 leaves the column out.
if [ "$bench" = kernel ] && [ "${GATEHOUSE_BENCH_DEFGUARD:-1}" != 0 ]; then
	root=$(cd "$(dirname "$0")/../.." && pwd)
	cargo build --release --locked --manifest-path "$root/benches/defguard/Cargo.toml" \
		--target-dir "$root/target/defguard" >&2
	export GATEHOUSE_BENCH_DEFGUARD=$root/target/defguard/release/gatehouse-bench-defguard
fi
exec "$(cd "$(dirname "$0")" && pwd)/run-kernel-tests.sh" --bench "$bench" "$@"
