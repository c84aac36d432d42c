#!/bin/bash
# run-kernel-bench.sh - build benches/kernel.rs (optimized) on the host and run it in ONE
# VM with kernel WireGuard; prints a markdown table (see BENCHMARKS.md). The VM is
# TCG-emulated: absolute times are slow, read the ratios.
# `run-kernel-bench.sh restart` runs benches/restart.rs the same way (kernel row of the
# restart benchmark).
bench=kernel
case ${1:-} in kernel|restart) bench=$1; shift ;; esac
exec "$(cd "$(dirname "$0")" && pwd)/run-kernel-tests.sh" --bench "$bench" "$@"
