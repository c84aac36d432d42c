#!/usr/bin/env bash
# Installs what building, the demo and the tests need on a fresh Debian 12 machine, then
# builds the workspace. Idempotent: packages already present are not fetched again.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(
	pkg-config libnftnl-dev libmnl-dev            # build (nftnl)
	iproute2 iputils-ping nftables procps curl     # demo and end-to-end tests
	wireguard-tools wireguard-go                   # userspace backend, real clients, `wg` observer
	qemu-system-x86 busybox-static xz-utils        # the kernel-WireGuard VM (tests/vm)
	g++                                            # libFuzzer (scripts/fuzz.sh)
	qemu-utils e2fsprogs debootstrap               # the systemd VM image (tests/vm)
	lintian rpmlint rpm binutils                   # packages: checks, rpm -qp, strip
	docker.io docker-compose                       # container images and compose test
	python3                                        # JSON in the test scripts
	keepalived                                     # the HA drill (tests/e2e_ha.rs): VRRP
	prometheus                                     # scrapes /metrics, promtool (tests/e2e_prometheus.rs)
)
missing=()
for p in "${PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "setup: installing ${missing[*]}" >&2
	SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
	$SUDO apt-get update -q
	# No service starts during the install: a dockerd started by the package would rewrite
	# the host's netfilter (FORWARD policy DROP) under the namespace tests. The container
	# tests start their own engine, with --iptables=false (tests/containers/engine.sh).
	norc=
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
		$SUDO chmod 755 /usr/sbin/policy-rc.d
		norc=1
	fi
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" || rc=$?
	[ -z "$norc" ] || $SUDO rm -f /usr/sbin/policy-rc.d
	[ "${rc:-0}" = 0 ] || exit "$rc"
	# Installed here only for tests/e2e_prometheus.rs, which runs its own prometheus (own
	# config, storage and port): the packaged service (enabled at install, port 9090)
	# is not wanted on a test host.
	if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
		$SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
	fi
fi
# The fuzz targets (scripts/fuzz.sh) are built with cargo-fuzz.
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# Packaging tools, from crates.io (skipped when present).
for tool in cargo-deb cargo-generate-rpm; do
	command -v "$tool" >/dev/null || cargo install --locked "$tool"
done
cargo build --workspace --bins
