#!/bin/bash
# Runs the root-only (#[ignore]d) integration tests that use network namespaces.
#
#   tests/netns/run-root-tests.sh                  # the default list below
#   tests/netns/run-root-tests.sh userspace kernel # these test binaries (tests/<name>.rs)
#   GATEHOUSE_WIREGUARD_GO=/path/to/wireguard-go tests/netns/run-root-tests.sh userspace
#
# Needs root, iproute2, and for the userspace tests wireguard-go and wg in PATH.
# Extra arguments after `--` go to the test harness (e.g. a test name filter).
set -eu
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
    echo "run-root-tests.sh: needs root (network namespaces, TUN)" >&2
    exit 1
fi

tests=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    tests="$tests $1"
    shift
done
[ "${1:-}" = "--" ] && shift
[ -n "$tests" ] || tests="userspace_link userspace"

# Namespaces that existed before (another run on this host): not ours to report.
before=$(ip netns list | awk '{print $1}' | grep '^gh-' | sort || true)
status=0
for t in $tests; do
    echo "== root tests: $t"
    # Two test threads per binary keep small machines responsive; tests use unique
    # names, so more threads (or binaries in parallel) work as well.
    cargo test -p gatehouse --test "$t" -- --include-ignored --test-threads=2 "$@" || status=1
done

after=$(ip netns list | awk '{print $1}' | grep '^gh-' | sort || true)
leftover=$(comm -13 <(echo "$before") <(echo "$after") | grep . || true)
if [ -n "$leftover" ]; then
    echo "run-root-tests.sh: namespaces left behind:" >&2
    echo "$leftover" >&2
    status=1
fi
exit $status
