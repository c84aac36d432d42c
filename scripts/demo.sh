#!/usr/bin/env bash
# The demo: a reference Core, a gatehouse agent and a real WireGuard client, each in
# network namespaces this script creates; traffic through the tunnel; the agent's status,
# the Core's view of the gateway and the peer's stats printed; everything cleaned up.
#
#   sudo scripts/demo.sh            (installs what it needs and builds first)
#
# The agent uses kernel WireGuard when this kernel has it, else the userspace backend
# (wireguard-go). Namespaces: gh-demo-gw (Core + agent), gh-demo-cl (client).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ "$(id -u)" = 0 ] || { echo "demo: needs root (network namespaces)" >&2; exit 1; }
[ "${GH_DEMO_SKIP_SETUP:-0}" = 1 ] || scripts/setup.sh
BIN=$ROOT/target/debug

NS_GW=gh-demo-gw NS_CL=gh-demo-cl
IF_GW=ghdemo0 IF_CL=ghdemocl0        # distinct: wireguard-go's UAPI socket is not per netns
ADMIN=demo-admin-token
T=$(mktemp -d /tmp/gatehouse-demo.XXXXXX)
PIDS=()
cleanup() {
	set +e
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
	sleep 0.5
	for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
	ip netns del $NS_GW 2>/dev/null
	ip netns del $NS_CL 2>/dev/null
	rm -f /var/run/wireguard/$IF_GW.sock /var/run/wireguard/$IF_CL.sock /var/run/wireguard/$IF_GW.log
	rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Background programs are started through these arrays, never through a shell function:
# `f & pid=$!` records the pid of the subshell running f, not of the program, and killing
# it leaves the program running. `ip netns exec` execs the program, so $! is its pid.
GW=(ip netns exec $NS_GW)
CL=(ip netns exec $NS_CL)
in_gw() { "${GW[@]}" "$@"; }
in_cl() { "${CL[@]}" "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
api() { # METHOD PATH [JSON]
	in_gw curl -sS --fail-with-body -X "$1" -H "Authorization: Bearer $ADMIN" \
		-H 'Content-Type: application/json' ${3:+-d "$3"} "http://127.0.0.1:8080/api/v1$2"
}
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

BACKEND=userspace
if [ -d /sys/module/wireguard ] || modprobe wireguard 2>/dev/null; then BACKEND=kernel; fi

say "namespaces: $NS_GW (Core + gateway) and $NS_CL (client), joined by a veth pair"
ip netns add $NS_GW
ip netns add $NS_CL
ip link add ghdemo-v0 netns $NS_GW type veth peer name ghdemo-v1 netns $NS_CL
in_gw ip link set lo up; in_cl ip link set lo up
in_gw ip addr add 192.0.2.1/24 dev ghdemo-v0; in_gw ip link set ghdemo-v0 up
in_cl ip addr add 192.0.2.2/24 dev ghdemo-v1; in_cl ip link set ghdemo-v1 up

say "reference Core"
cat > "$T/core.toml" <<TOML
grpc_listen = "127.0.0.1:50055"
http_listen = "127.0.0.1:8080"
database = "$T/core.db"
admin_token = "$ADMIN"
TOML
"${GW[@]}" "$BIN/gatehouse-core" --config "$T/core.toml" > "$T/core.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do in_gw curl -s -o /dev/null http://127.0.0.1:8080/ && break; sleep 0.1; done

LOC=$(api POST /locations '{"name":"demo","listen_port":51820,"addresses":["10.77.0.1/24","fd77::1/64"],"mtu":1420}')
LOC_ID=$(echo "$LOC" | json "['id']")
GW_PUB=$(echo "$LOC" | json "['public_key']")
TOKEN=$(api POST /locations/$LOC_ID/tokens | json "['token']")
CL_KEY=$(wg genkey)
CL_PUB=$(echo "$CL_KEY" | wg pubkey)
api POST /locations/$LOC_ID/peers "{\"public_key\":\"$CL_PUB\",\"allowed_ips\":[\"10.77.0.2/32\",\"fd77::2/128\"]}" >/dev/null
echo "location $LOC_ID 'demo' (gateway key $GW_PUB), client peer $CL_PUB"

say "gatehouse agent ($BACKEND backend)"
cat > "$T/gateway.toml" <<TOML
[core]
url = "http://127.0.0.1:50055"
token_file = "$T/token"
[gateway]
name = "demo-gateway"
interface = "$IF_GW"
backend = "$BACKEND"
state_dir = "$T/state"
stats_interval = "2s"
[http]
listen = "127.0.0.1:9180"
TOML
printf '%s' "$TOKEN" > "$T/token"; chmod 600 "$T/token"
"${GW[@]}" "$BIN/gatehouse" run --config "$T/gateway.toml" > "$T/agent.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do in_gw curl -sf http://127.0.0.1:9180/readyz >/dev/null && break; sleep 0.2; done
in_gw curl -sf http://127.0.0.1:9180/readyz || { echo "agent not ready"; cat "$T/agent.log"; exit 1; }

say "WireGuard client (wireguard-go + wg) in $NS_CL"
"${CL[@]}" wireguard-go -f $IF_CL > "$T/client.log" 2>&1 & PIDS+=($!)
for _ in $(seq 50); do [ -S /var/run/wireguard/$IF_CL.sock ] && break; sleep 0.1; done
echo "$CL_KEY" > "$T/client.key"
in_cl wg set $IF_CL private-key "$T/client.key" peer "$GW_PUB" endpoint 192.0.2.1:51820 \
	allowed-ips 10.77.0.0/24,fd77::/64 persistent-keepalive 5
in_cl ip addr add 10.77.0.2/24 dev $IF_CL
in_cl ip addr add fd77::2/64 dev $IF_CL
in_cl ip link set $IF_CL up

say "traffic through the tunnel"
in_cl ping -c 5 -i 0.3 -W 3 10.77.0.1
in_cl ping -6 -c 3 -i 0.3 -W 3 fd77::1
sleep 3

say "gatehouse status"
in_gw "$BIN/gatehouse" status --http http://127.0.0.1:9180
say "gatehouse diff (desired state vs the interface)"
in_gw "$BIN/gatehouse" diff --http http://127.0.0.1:9180 || echo "(the next reconcile applies these)"
say "the Core's view: gateways of location $LOC_ID"
api GET /locations/$LOC_ID/gateways | python3 -m json.tool
say "the Core's view: peer stats"
api GET /locations/$LOC_ID/stats | python3 -m json.tool
say "wg show on the gateway (independent observer)"
in_gw wg show $IF_GW
echo
echo "demo OK: traffic went through the tunnel; cleaning up"
