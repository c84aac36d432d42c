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
)
missing=()
for p in "${PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "setup: installing ${missing[*]}" >&2
	SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
	$SUDO apt-get update -q
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The fuzz targets (scripts/fuzz.sh) are built with cargo-fuzz.
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
cargo build --workspace --bins
