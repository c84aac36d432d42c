#!/bin/bash
# run-kernel-bench.sh - build benches/kernel.rs (optimized) on the host and run it in ONE
# VM with kernel WireGuard; prints a markdown table (see BENCHMARKS.md). The VM is
# TCG-emulated: absolute times are slow, read the ratios.
exec "$(cd "$(dirname "$0")" && pwd)/run-kernel-tests.sh" --bench kernel "$@"
