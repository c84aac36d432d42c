#!/bin/bash
# run-systemd-tests.sh - the packages on a real systemd host: builds a newer revision of the
# packages next to the ones scripts/package.sh made (PACKAGE_REVISION=2, for the upgrade
# test), then boots the systemd VM (run-in-systemd-vm.sh) and runs systemd-host-test.sh in
# it. Needs root; the image is built once (minutes), each run boots in about 1-2 minutes
# under emulation and the test itself takes a few more.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
ls target/packages/gatehouse_*-1_amd64.deb target/packages/gatehouse-core_*-1_amd64.deb >/dev/null ||
	{ echo "run-systemd-tests: run scripts/package.sh first" >&2; exit 125; }
PACKAGE_REVISION=2 scripts/package.sh --no-build >/dev/null
exec "$here/run-in-systemd-vm.sh" -t "${SDVM_TIMEOUT:-1500}" -- tests/vm/systemd-host-test.sh
