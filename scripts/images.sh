#!/usr/bin/env bash
# Builds the container images offline: gatehouse:latest (the gateway) and
# gatehouse-core:latest, from packaging/container/Dockerfile with binaries built on this
# host and a base image imported from debootstrap (no registry needed).
#
#   scripts/images.sh              release build, then both images
#   scripts/images.sh --no-build   use the binaries already in target/release
#   IMAGES_PROFILE=debug scripts/images.sh --no-build   the debug binaries (quick checks)
#
# Starts dockerd when none runs (and stops it again at the end, unless
# GATEHOUSE_KEEP_ENGINE=1); see tests/containers/engine.sh for how it leaves the host's
# netfilter alone. Needs root, docker.io and debootstrap (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/containers/engine.sh

build=1
[ "${1:-}" = --no-build ] && build=0
BASE=gatehouse-base:bookworm
profile=${IMAGES_PROFILE:-release}

if [ "$build" = 1 ]; then
	cargo build --release --locked --bins -p gatehouse -p gatehouse-core
fi
CTX=$(mktemp -d /tmp/gatehouse-images.XXXXXX)
cleanup() {
	rm -rf "$CTX"
	[ "${GATEHOUSE_KEEP_ENGINE:-0}" = 1 ] || engine_stop
}
trap cleanup EXIT
install -D -m 0755 "target/$profile/gatehouse" "$CTX/bin/gatehouse"
install -D -m 0755 "target/$profile/gatehouse-core" "$CTX/bin/gatehouse-core"
strip "$CTX/bin/gatehouse" "$CTX/bin/gatehouse-core"
install -D -m 0644 config/gateway.toml "$CTX/config/gateway.toml"

engine_start
base_image "$BASE"
for target in gateway core; do
	tag=gatehouse:latest
	[ "$target" = core ] && tag=gatehouse-core:latest
	DOCKER_BUILDKIT=1 "$DOCKER" build -q --network host \
		--build-arg BINARIES=host --build-arg BASE="$BASE" \
		-f packaging/container/Dockerfile --target "$target" -t "$tag" "$CTX" >/dev/null
	echo "images: $tag $("$DOCKER" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f MB", $1/1e6}')"
done
