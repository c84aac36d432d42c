#!/usr/bin/env bash
# compose-test.sh - the container deployment, for real: both images built offline
# (scripts/images.sh), docker-compose.yml brought up with docker-compose (Debian's 1.29),
# a Core and two gateways of one location, one token each; then:
#   - both gateways and the Core report healthy (their HEALTHCHECK on /readyz);
#   - each gateway container runs as a non-root user whose only capability is NET_ADMIN;
#   - a real WireGuard client (wireguard-go in a namespace of this host) passes traffic
#     through gateway A, then, A stopped, through gateway B;
#   - after `docker-compose down` and `up` the gateways come back with the same ids (their
#     state volumes) and apply the same revision.
# Everything it starts (dockerd when none ran, the compose project and its volumes, the
# client namespace and its wireguard-go) is removed at the end, by pid / by name it chose.
#
#   tests/containers/compose-test.sh [--no-build]
#
# Needs root, docker.io, docker-compose, debootstrap, wireguard-go, wireguard-tools, curl.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
. tests/containers/engine.sh

build_flag=()
[ "${1:-}" = --no-build ] && build_flag=(--no-build)
PROJECT=ghctest
NS=gh-ctest-cl
IF_CL=ghctestcl0
ADMIN_PORT=18480 PORT_A=51920 PORT_B=51921
HOST_IP=198.18.77.1 CL_IP=198.18.77.2
T=$(mktemp -d /tmp/gatehouse-ctest.XXXXXX)
CLIENT_PID=
TUN_MODE=
COMPOSE=(docker-compose -p "$PROJECT" -f "$T/docker-compose.yml")
export GATEHOUSE_ADMIN_PORT=$ADMIN_PORT GATEHOUSE_GATEWAY_A_PORT=$PORT_A GATEHOUSE_GATEWAY_B_PORT=$PORT_B

cleanup() {
	local rc=$?
	set +e
	if [ "$rc" != 0 ]; then
		echo "--- compose logs (tail)" >&2
		"${COMPOSE[@]}" logs --no-color --tail 30 >&2 2>/dev/null
	fi
	[ -n "$CLIENT_PID" ] && kill "$CLIENT_PID" 2>/dev/null && wait "$CLIENT_PID" 2>/dev/null
	ip netns del "$NS" 2>/dev/null
	ip link del ghctest-h 2>/dev/null
	rm -f "/var/run/wireguard/$IF_CL.sock"
	"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1
	[ -n "$TUN_MODE" ] && chmod "$TUN_MODE" /dev/net/tun
	engine_stop
	rm -rf "$T"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
say() { printf '\n== %s\n' "$*"; }
fail() { echo "compose-test: FAILED: $*" >&2; exit 1; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
api() { # METHOD PATH [JSON]
	curl -sS --fail-with-body -X "$1" -H "Authorization: Bearer $(cat "$T/secrets/admin-token")" \
		-H 'Content-Type: application/json' ${3:+-d "$3"} "http://127.0.0.1:$ADMIN_PORT/api/v1$2"
}
cid() { "${COMPOSE[@]}" ps -q "$1"; }
wait_healthy() { # SERVICE...
	local s i state
	for s in "$@"; do
		for i in $(seq 120); do
			state=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$(cid "$s")" 2>/dev/null || true)
			[ "$state" = healthy ] && break
			sleep 0.5
		done
		[ "$state" = healthy ] || fail "$s is '$state', not healthy"
		echo "$s: healthy"
	done
}

# The gateway's non-root user opens the TUN device the host passes in, with the host's
# mode: 0666 wherever udev runs (Debian's default); hosts without udev may have 0600.
mode=$(stat -c %a /dev/net/tun)
if [ "$mode" != 666 ]; then
	TUN_MODE=$mode
	chmod 0666 /dev/net/tun
	echo "compose-test: /dev/net/tun was $mode, 0666 (udev's mode) for the test"
fi

say "engine and images"
engine_start
GATEHOUSE_KEEP_ENGINE=1 scripts/images.sh "${build_flag[@]}"

say "compose project $PROJECT in $T"
mkdir -p "$T/packaging/container" "$T/secrets"
cp docker-compose.yml "$T/"
cp packaging/container/core.toml "$T/packaging/container/"
head -c 32 /dev/urandom | base64 > "$T/secrets/admin-token"
chown 10002 "$T/secrets/admin-token"; chmod 0600 "$T/secrets/admin-token"
: > "$T/secrets/gateway-a-token"; : > "$T/secrets/gateway-b-token"
docker-compose version --short
"${COMPOSE[@]}" config -q
"${COMPOSE[@]}" up -d core
wait_healthy core

LOC=$(api POST /locations '{"name":"compose","listen_port":51820,"addresses":["10.78.0.1/24"],"mtu":1420}')
LOC_ID=$(echo "$LOC" | json "d['id']")
GW_PUB=$(echo "$LOC" | json "d['public_key']")
for g in a b; do
	api POST "/locations/$LOC_ID/tokens" | json "d['token']" > "$T/secrets/gateway-$g-token"
	chown 10001 "$T/secrets/gateway-$g-token"; chmod 0600 "$T/secrets/gateway-$g-token"
done
CL_KEY=$(wg genkey)
CL_PUB=$(echo "$CL_KEY" | wg pubkey)
api POST "/locations/$LOC_ID/peers" "{\"public_key\":\"$CL_PUB\",\"allowed_ips\":[\"10.78.0.2/32\"]}" >/dev/null
"${COMPOSE[@]}" up -d
wait_healthy gateway-a gateway-b

say "gateway containers: non-root, NET_ADMIN only"
for g in gateway-a gateway-b; do
	c=$(cid "$g")
	status=$("$DOCKER" exec "$c" cat /proc/1/status)
	uid=$(echo "$status" | awk '/^Uid:/ {print $3}')          # effective uid
	capeff=$(echo "$status" | awk '/^CapEff:/ {print $2}')
	capbnd=$(echo "$status" | awk '/^CapBnd:/ {print $2}')
	echo "$g: euid $uid, CapEff $capeff, CapBnd $capbnd"
	[ "$uid" != 0 ] || fail "$g runs as root"
	# CAP_NET_ADMIN is bit 12: 0x1000, and nothing else in the bounding set either.
	[ "$capeff" = 0000000000001000 ] || fail "$g effective capabilities $capeff"
	[ "$capbnd" = 0000000000001000 ] || fail "$g bounding set $capbnd"
	"$DOCKER" exec "$c" /usr/bin/gatehouse --version >/dev/null || fail "$g: gatehouse --version"
done
"$DOCKER" run --rm --cap-drop ALL --entrypoint /usr/bin/gatehouse gatehouse:latest --version ||
	fail "gatehouse --version without NET_ADMIN"

say "WireGuard client in namespace $NS"
ip netns add "$NS"
ip link add ghctest-h type veth peer name ghctest-c netns "$NS"
ip addr add "$HOST_IP/30" dev ghctest-h; ip link set ghctest-h up
ip -n "$NS" link set lo up
ip -n "$NS" addr add "$CL_IP/30" dev ghctest-c; ip -n "$NS" link set ghctest-c up
ip netns exec "$NS" wireguard-go -f "$IF_CL" >"$T/client.log" 2>&1 &
CLIENT_PID=$!
for _ in $(seq 50); do [ -S "/var/run/wireguard/$IF_CL.sock" ] && break; sleep 0.1; done
echo "$CL_KEY" > "$T/client.key"
ip netns exec "$NS" wg set "$IF_CL" private-key "$T/client.key"
ip -n "$NS" addr add 10.78.0.2/24 dev "$IF_CL"
ip -n "$NS" link set "$IF_CL" up
through() { # PORT NAME: a fresh session to the gateway behind PORT, then traffic
	ip netns exec "$NS" wg set "$IF_CL" peer "$GW_PUB" remove
	ip netns exec "$NS" wg set "$IF_CL" peer "$GW_PUB" endpoint "$HOST_IP:$1" \
		allowed-ips 10.78.0.0/24 persistent-keepalive 2
	ip netns exec "$NS" ping -c 3 -i 0.5 -W 5 10.78.0.1 || fail "no traffic through $2"
	local hs; hs=$(ip netns exec "$NS" wg show "$IF_CL" latest-handshakes | awk '{print $2}')
	[ "${hs:-0}" -gt 0 ] || fail "no handshake with $2"
	echo "traffic through $2 (udp $1): ok"
}
through "$PORT_A" gateway-a
"${COMPOSE[@]}" stop gateway-a
through "$PORT_B" gateway-b
"${COMPOSE[@]}" start gateway-a
wait_healthy gateway-a

say "down and up again: same gateway ids, same revision"
view() { api GET "/locations/$LOC_ID/gateways" | json "'\n'.join(sorted(g['name']+' '+g['gateway_id'] for g in d))"; }
revision() { api GET "/locations/$LOC_ID" | json "d['revision']"; }
applied() { api GET "/locations/$LOC_ID/gateways" | json "' '.join(sorted(g['name']+'='+str(g['applied_revision']) for g in d if g['connected']))"; }
before=$(view); rev=$(revision)
echo "$before"; echo "revision $rev"
"${COMPOSE[@]}" down
"${COMPOSE[@]}" up -d
wait_healthy core gateway-a gateway-b
after=$(view)
[ "$before" = "$after" ] || fail "gateway ids changed: '$before' -> '$after'"
want="gateway-a=$rev gateway-b=$rev"
for _ in $(seq 60); do [ "$(applied)" = "$want" ] && break; sleep 0.5; done
[ "$(applied)" = "$want" ] || fail "applied after up: '$(applied)', want '$want'"
echo "same ids, both applied revision $rev"
through "$PORT_A" gateway-a

say "image sizes"
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^gatehouse(-core)?:latest '
echo
echo "compose-test: OK"
