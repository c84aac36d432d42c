#!/bin/bash
# run-kernel-tests.sh - build a test binary on the host and run it, ignored tests
# included, inside ONE throw-away VM with kernel WireGuard (run-in-wg-vm.sh).
#
#   tests/vm/run-kernel-tests.sh                      # the kernel backend tests (tests/kernel.rs)
#   tests/vm/run-kernel-tests.sh --test agent_vm      # any other integration test binary
#   tests/vm/run-kernel-tests.sh -- some_test_name    # arguments after -- go to the harness
#   tests/vm/run-kernel-tests.sh --bench kernel       # a bench target (optimized), run once
#
# Exit status: the test binary's (0 = all passed); 124 = VM timed out; 125 = VM failure.
# Environment: WGVM_CACHE (default ~/.cache/wgvm, built once in ~10-20 s), WGVM_TIMEOUT
# (default 900 s here), WGVM_MEM, WGVM_CPUS; CARGO_PROFILE=release to test optimized code.
# Needs root and qemu-system-x86, busybox-static, wireguard-tools, iproute2, xz-utils.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."

test_name=kernel
kind=test
while [ $# -gt 0 ]; do
	case $1 in
	--test) kind=test; test_name=$2; shift 2 ;;
	--bench) kind=bench; test_name=$2; shift 2 ;;
	--) shift; break ;;
	*) break ;;
	esac
done

profile_args=()
[ "${CARGO_PROFILE:-dev}" = release ] && profile_args=(--release)

# The binary cargo builds for the test target, read from its JSON messages.
if [ "$kind" = bench ]; then
	build=(cargo bench -p gatehouse --bench "$test_name" --no-run --message-format=json)
else
	build=(cargo test -p gatehouse "${profile_args[@]}" --test "$test_name" --no-run --message-format=json)
fi
bin=$("${build[@]}" |
	python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and \
       m["target"]["name"] == name and m["profile"].get("test"):
        print(m["executable"])
' "$test_name" | tail -1)
[ -n "$bin" ] && [ -x "$bin" ] || { echo "run-kernel-tests: no binary for --$kind $test_name" >&2; exit 125; }
echo "run-kernel-tests: $bin" >&2

# The reference Core's binary next to the test's (tests that run it as a process find it
# through GATEHOUSE_CORE_BIN: no cargo inside the VM).
if [ "$kind" = test ]; then
	cargo build -q -p gatehouse-core --bin gatehouse-core "${profile_args[@]}"
	export GATEHOUSE_CORE_BIN
	GATEHOUSE_CORE_BIN="$(dirname "$(dirname "$bin")")/gatehouse-core"
	[ -x "$GATEHOUSE_CORE_BIN" ] || { echo "run-kernel-tests: no $GATEHOUSE_CORE_BIN" >&2; exit 125; }
fi

# The binary lives under target/ inside this directory, which the VM shares read-write.
export WGVM_TIMEOUT=${WGVM_TIMEOUT:-900}
if [ "$kind" = bench ]; then
	exec "$here/run-in-wg-vm.sh" -- "$bin" --bench "$@"
fi
exec "$here/run-in-wg-vm.sh" -- "$bin" --include-ignored --test-threads="${WGVM_CPUS:-2}" "$@"
