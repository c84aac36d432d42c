# engine.sh - sourced by the container scripts: a Docker engine for the duration of the
# caller, and the local base image.
#
#   engine_start        uses a running engine, or starts dockerd (recorded for engine_stop)
#   engine_stop         stops the dockerd engine_start started (by its pid), if any
#   base_image NAME     imports a debootstrap --variant=minbase bookworm tree as NAME, once
#
# The engine started here leaves the host's netfilter and forwarding as they were
# (--iptables=false --ip6tables=false --ip-forward=false): containers talk over their
# compose network, published ports are served by docker-proxy, builds use --network host.
# DOCKER: the client to use (default /usr/bin/docker from docker.io, whose builder needs
# no buildx plugin).

DOCKER=${DOCKER:-/usr/bin/docker}
ENGINE_PID=
ENGINE_DIR=

engine_start() {
	if "$DOCKER" info >/dev/null 2>&1; then
		return 0
	fi
	ENGINE_DIR=$(mktemp -d /tmp/gatehouse-dockerd.XXXXXX)
	/usr/sbin/dockerd --iptables=false --ip6tables=false --ip-forward=false \
		--ip-masq=false --pidfile "$ENGINE_DIR/dockerd.pid" \
		>"$ENGINE_DIR/dockerd.log" 2>&1 &
	ENGINE_PID=$!
	local i
	for i in $(seq 150); do
		"$DOCKER" info >/dev/null 2>&1 && return 0
		kill -0 "$ENGINE_PID" 2>/dev/null || break
		sleep 0.2
	done
	echo "engine: dockerd did not come up:" >&2
	tail -20 "$ENGINE_DIR/dockerd.log" >&2
	engine_stop
	return 1
}

engine_stop() {
	[ -n "$ENGINE_PID" ] || return 0
	kill "$ENGINE_PID" 2>/dev/null || true
	local i
	for i in $(seq 100); do
		kill -0 "$ENGINE_PID" 2>/dev/null || break
		sleep 0.2
	done
	kill -9 "$ENGINE_PID" 2>/dev/null || true
	wait "$ENGINE_PID" 2>/dev/null || true
	ENGINE_PID=
	rm -rf "$ENGINE_DIR"
}

base_image() { # NAME
	local name=$1
	"$DOCKER" image inspect "$name" >/dev/null 2>&1 && return 0
	local cache=${XDG_CACHE_HOME:-$HOME/.cache}/gatehouse-images
	local tar=$cache/minbase-bookworm.tar
	if [ ! -s "$tar" ]; then
		echo "engine: debootstrap --variant=minbase bookworm (one-off, about a minute)" >&2
		mkdir -p "$cache"
		local w; w=$(mktemp -d "$cache/build.XXXXXX")
		debootstrap --variant=minbase bookworm "$w/root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
			>"$w/debootstrap.log" 2>&1 || { tail -20 "$w/debootstrap.log" >&2; rm -rf "$w"; return 1; }
		rm -rf "$w/root/var/cache/apt/archives/"*.deb "$w/root/var/lib/apt/lists/"*
		tar -C "$w/root" -c . > "$w/root.tar"
		mv "$w/root.tar" "$tar"
		rm -rf "$w"
	fi
	"$DOCKER" import "$tar" "$name" >/dev/null
}
