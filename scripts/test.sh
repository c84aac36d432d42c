#!/usr/bin/env bash
# Every test of the project, on a fresh Debian 12 machine (run as root):
#   1. setup: Debian packages and the build (scripts/setup.sh)
#   2. unit and in-process integration tests (no root): cargo test --workspace; the lint rule
#      of clippy.toml refuses each banned call in the deciding crate (scripts/lint-bites.sh)
#   3. root end-to-end tests in network namespaces with real wireguard-go clients, and the
#      benchmark harnesses at CI size (tests/bench/smoke.sh)
#   4. kernel WireGuard tests inside a QEMU VM (tests/vm)
#   5. packages: deb and rpm built (scripts/package.sh), lintian, rpmlint, rpm -qp checks
#   6. the packages on a systemd host: a VM booting Debian with systemd (tests/vm)
#   7. containers: both images built offline, docker-compose with a Core and two gateways
#   8. fuzz targets, each for a short fixed time, and their regression inputs (scripts/fuzz.sh)
# Each stage runs even when an earlier one failed; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

failed=()
stage() { # NAME COMMAND...
	local name=$1; shift
	printf '\n\033[1m===== %s\033[0m\n' "$name"
	local start=$SECONDS
	if "$@"; then
		echo "===== $name: ok ($((SECONDS - start)) s)"
	else
		echo "===== $name: FAILED ($((SECONDS - start)) s)"
		failed+=("$name")
	fi
}

stage setup scripts/setup.sh || exit 1
[ ${#failed[@]} -eq 0 ] || { echo "setup failed" >&2; exit 1; }
stage "cargo test (workspace, no root)" cargo test --workspace
stage "clock, randomness and ordering rule bites (clippy)" scripts/lint-bites.sh
if [ "$(id -u)" = 0 ]; then
	stage "root tests in network namespaces" tests/netns/run-root-tests.sh \
		userspace_link userspace $(for t in tests/e2e_*.rs; do [ -e "$t" ] && basename "$t" .rs; done)
	stage "benchmark harnesses at CI size (issue 11)" tests/bench/smoke.sh
	for t in tests/vm_*.rs tests/kernel.rs; do
		[ -e "$t" ] || continue
		stage "kernel WireGuard in the VM: $(basename "$t" .rs)" tests/vm/run-kernel-tests.sh --test "$(basename "$t" .rs)"
	done
	stage "packages (deb, rpm, lintian, rpmlint, rpm -qp)" \
		sh -c 'scripts/package.sh && cargo test --test packaging -- --ignored'
	stage "packages on a systemd host (VM)" tests/vm/run-systemd-tests.sh
	# After the namespace tests: the engine, even started with --iptables=false, is the
	# last thing to touch the host's network.
	stage "containers (images, docker-compose)" tests/containers/compose-test.sh --no-build
else
	echo "not root: skipping the namespace and VM tests (run as root for the full suite)" >&2
	failed+=("root tests skipped")
fi

stage "fuzz targets (30 s each) and regression inputs" scripts/fuzz.sh

echo
if [ ${#failed[@]} -gt 0 ]; then
	echo "FAILED: ${failed[*]}"
	exit 1
fi
echo "all tests passed"
