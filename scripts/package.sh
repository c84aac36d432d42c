#!/usr/bin/env bash
# Builds the packages into target/packages/: gatehouse and gatehouse-core, each as .deb
# (cargo deb) and .rpm (cargo generate-rpm), from one release build.
#
#   scripts/package.sh               build, then package
#   scripts/package.sh --no-build    package the binaries already in target/release
#   PACKAGE_REVISION=2 scripts/package.sh   the Debian revision / rpm release (default 1),
#                                    e.g. to test an upgrade over an installed package
#
# Needs cargo-deb and cargo-generate-rpm (scripts/setup.sh installs both). Layout, users
# and maintainer scripts: packaging/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
[ "${1:-}" = --no-build ] && build=0
rev=${PACKAGE_REVISION:-1}
out=target/packages

for tool in cargo-deb cargo-generate-rpm; do
	command -v "$tool" >/dev/null || { echo "package: $tool missing (run scripts/setup.sh)" >&2; exit 1; }
done
if [ "$build" = 1 ]; then
	cargo build --release --locked --bins -p gatehouse -p gatehouse-core
fi
# The rpm takes the binaries as they are: strip them once for both formats.
strip target/release/gatehouse target/release/gatehouse-core
mkdir -p "$out"
rm -f "$out"/gatehouse{,-core}_*-"$rev"_*.deb "$out"/gatehouse{,-core}-*-"$rev".*.rpm

for pkg in gatehouse gatehouse-core; do
	cargo deb --no-build --no-strip -p "$pkg" --deb-revision "$rev" -o "$out/" >/dev/null
done
cargo generate-rpm -p . --set-metadata "release = \"$rev\"" -o "$out/"
cargo generate-rpm -p examples/core --set-metadata "release = \"$rev\"" -o "$out/"
ls -l "$out"/gatehouse*.deb "$out"/gatehouse*.rpm
