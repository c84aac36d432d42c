#!/bin/bash
# systemd-host-test.sh - runs INSIDE the systemd VM (run-in-systemd-vm.sh) as root, in the
# repository: the packages as an operator uses them on a Debian host with kernel WireGuard.
#   1. install gatehouse-core and gatehouse (.deb, revision 1): users, config modes, units
#      enabled but not started (nothing runs on the shipped example), verify clean;
#   2. the Core under its unit; a location; the token written; `systemctl start gatehouse`:
#      `wg show` equals the Core's peers; a kernel WireGuard client in a namespace
#      handshakes and passes traffic;
#   3. `systemctl restart gatehouse` and installing revision 2 over it: zero peer writes
#      (the new agent's first reconcile applies nothing; the client's handshake survives);
#   4. two gatehouse@ instances serve two more locations side by side;
#   5. a gatehouse@ instance on the userspace backend (wireguard-go under the unit).
# Prints `systemd-analyze security` of the units. Exit status 0 = all held.
set -euo pipefail
PKG=${PKG_DIR:-target/packages}
say() { printf '\n== %s\n' "$*"; }
fail() {
	echo "systemd-host-test: FAILED: $*" >&2
	for u in gatehouse gatehouse-core 'gatehouse@*'; do journalctl -b --no-pager -n 25 -u "$u" >&2 || true; done
	exit 1
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
ADMIN=$(head -c 24 /dev/urandom | base64)
api() { # METHOD PATH [JSON]
	curl -sS --fail-with-body -X "$1" -H "Authorization: Bearer $ADMIN" \
		-H 'Content-Type: application/json' ${3:+-d "$3"} "http://127.0.0.1:8080/api/v1$2"
}
wait_http() { # URL [TRIES]
	local i
	for i in $(seq "${2:-150}"); do curl -sf -o /dev/null "$1" && return 0; sleep 0.2; done
	return 1
}
mode_of() { stat -c '%a %U:%G' "$1"; }
core_peers() { api GET "/locations/$1/peers" | json "'\n'.join(sorted(p['public_key'] for p in (d['peers'] if isinstance(d, dict) else d)))"; }
kernel_peers() { wg show "$1" peers | sort; }
status() { curl -sf "http://127.0.0.1:$1/status"; }

say "install (revision 1)"
command -v python3 >/dev/null || fail "python3 missing in the image"
dpkg -i "$PKG"/gatehouse-core_*-1_amd64.deb "$PKG"/gatehouse_*-1_amd64.deb
getent passwd gatehouse >/dev/null || fail "no gatehouse user"
getent passwd gatehouse-core >/dev/null || fail "no gatehouse-core user"
[ "$(mode_of /etc/gatehouse)" = "750 root:gatehouse" ] || fail "/etc/gatehouse is $(mode_of /etc/gatehouse)"
[ "$(mode_of /etc/gatehouse/gateway.toml)" = "640 root:gatehouse" ] || fail "gateway.toml is $(mode_of /etc/gatehouse/gateway.toml)"
[ "$(mode_of /etc/gatehouse-core/core.toml)" = "640 root:gatehouse-core" ] || fail "core.toml is $(mode_of /etc/gatehouse-core/core.toml)"
su -s /bin/sh gatehouse -c 'cat /etc/gatehouse/gateway.toml' >/dev/null || fail "the service user cannot read its config"
if su -s /bin/sh nobody -c 'cat /etc/gatehouse/gateway.toml' >/dev/null 2>&1; then fail "others can read the config"; fi
[ "$(systemctl is-enabled gatehouse.service)" = enabled ] || fail "gatehouse.service not enabled"
systemctl start gatehouse.service gatehouse-core.service   # conditions unmet: nothing runs
for u in gatehouse gatehouse-core; do
	[ "$(systemctl show -p ConditionResult --value $u)" = no ] || fail "$u: condition did not hold it back"
	systemctl is-active -q $u && fail "$u runs on the shipped example"
	systemctl is-failed -q $u && fail "$u failed instead of being skipped"
done
echo "installed; units enabled, held back by their conditions"

say "systemd-analyze verify and security"
out=$(systemd-analyze verify gatehouse.service gatehouse@a.service gatehouse-core.service 2>&1) || fail "verify: $out"
[ -z "$out" ] || fail "verify is not clean: $out"
echo "verify: clean"
for u in gatehouse.service gatehouse@a.service gatehouse-core.service; do
	echo "exposure $u: $(systemd-analyze security "$u" 2>/dev/null | awk '/Overall exposure level/ {print $(NF-2)}')"
done

say "the Core (gatehouse-core.service)"
printf '%s\n' "$ADMIN" > /etc/gatehouse-core/admin-token
systemctl start gatehouse-core.service
wait_http http://127.0.0.1:8080/readyz || fail "Core not ready"
[ "$(mode_of /var/lib/gatehouse-core/core.db)" = "600 gatehouse-core:gatehouse-core" ] ||
	echo "note: core.db is $(mode_of /var/lib/gatehouse-core/core.db)"
location() { # NAME PORT PREFIX -> id; one peer per client key in $CLIENT_PUBS
	local loc id
	loc=$(api POST /locations "{\"name\":\"$1\",\"listen_port\":$2,\"addresses\":[\"$3.1/24\"],\"mtu\":1420}")
	id=$(echo "$loc" | json "d['id']")
	echo "$loc" | json "d['public_key']" > "/run/loc-$id.pub"
	echo "$id"
}
add_peer() { api POST "/locations/$1/peers" "{\"public_key\":\"$2\",\"allowed_ips\":[\"$3/32\"]}" >/dev/null; }

say "gatehouse.service on the kernel backend"
CL_KEY=$(wg genkey); CL_PUB=$(echo "$CL_KEY" | wg pubkey)
A=$(location site-a 51820 10.79.0)
add_peer "$A" "$CL_PUB" 10.79.0.2
add_peer "$A" "$(wg genkey | wg pubkey)" 10.79.0.3
api POST "/locations/$A/tokens" | json "d['token']" > /etc/gatehouse/token
sed -i -e 's#^url = .*#url = "http://127.0.0.1:50055"#' /etc/gatehouse/gateway.toml
systemctl start gatehouse.service
wait_http http://127.0.0.1:9180/readyz || fail "gatehouse not ready"
[ "$(kernel_peers wg0)" = "$(core_peers "$A")" ] || fail "wg0 peers differ from the Core's"
echo "wg show wg0 peers = the Core's peers ($(kernel_peers wg0 | wc -l))"

# a kernel WireGuard client in namespace cl, over a veth pair
ip netns add cl
ip link add vh type veth peer name vc netns cl
ip addr add 192.0.2.1/24 dev vh; ip link set vh up
ip -n cl link set lo up; ip -n cl addr add 192.0.2.2/24 dev vc; ip -n cl link set vc up
ip -n cl link add wgcl type wireguard
echo "$CL_KEY" > /run/cl.key
ip netns exec cl wg set wgcl private-key /run/cl.key peer "$(cat "/run/loc-$A.pub")" \
	endpoint 192.0.2.1:51820 allowed-ips 10.79.0.0/24
ip -n cl addr add 10.79.0.2/24 dev wgcl; ip -n cl link set wgcl up
ip netns exec cl ping -c 2 -W 5 10.79.0.1 >/dev/null || fail "no traffic through the gateway"
hs() { wg show wg0 latest-handshakes | awk -v k="$CL_PUB" '$1 == k {print $2}'; }
hs0=$(hs); [ "${hs0:-0}" -gt 0 ] || fail "no handshake"
echo "client handshake at $hs0, traffic ok"

no_churn() { # WHAT: the restarted agent applied nothing, the session survived
	wait_http http://127.0.0.1:9180/readyz || fail "$1: not ready again"
	local s; s=$(status 9180)
	local ops dw; ops=$(echo "$s" | json "d['last_reconcile_ops']"); dw=$(echo "$s" | json "d['device_writes']")
	[ "$ops" = 0 ] && [ "$dw" = 0 ] || fail "$1: the new agent wrote (ops $ops, device writes $dw)"
	[ "$(hs)" = "$hs0" ] || [ "$(hs)" -gt "$hs0" ] || fail "$1: handshake reset ($(hs))"
	[ "$(hs)" != 0 ] || fail "$1: the peer was re-created"
	ip netns exec cl ping -c 1 -W 5 10.79.0.1 >/dev/null || fail "$1: traffic stopped"
	local n; n=$(ip netns exec cl wg show wgcl latest-handshakes | awk '{print $2}')
	echo "$1: 0 peer writes, handshake kept ($(hs)), client handshake $n"
}
pid0=$(systemctl show -p MainPID --value gatehouse)
systemctl restart gatehouse.service
[ "$(systemctl show -p MainPID --value gatehouse)" != "$pid0" ] || fail "restart did not restart"
no_churn "systemctl restart"

say "upgrade: installing revision 2 over it"
pid1=$(systemctl show -p MainPID --value gatehouse)
dpkg -i "$PKG"/gatehouse_*-2_amd64.deb
[ "$(dpkg-query -W -f '${Version}' gatehouse)" = "$(dpkg-deb -f "$(ls "$PKG"/gatehouse_*-2_amd64.deb)" Version)" ] || fail "not upgraded"
[ "$(systemctl show -p MainPID --value gatehouse)" != "$pid1" ] || fail "the upgrade did not try-restart the agent"
[ "$(mode_of /etc/gatehouse/gateway.toml)" = "640 root:gatehouse" ] || fail "after upgrade gateway.toml is $(mode_of /etc/gatehouse/gateway.toml)"
[ "$(mode_of /etc/gatehouse/token)" = "640 root:gatehouse" ] || fail "token is $(mode_of /etc/gatehouse/token)"
no_churn "upgrade"

say "two gatehouse@ instances, two more locations"
instance() { # NAME LOCATION INTERFACE HTTP_PORT BACKEND
	api POST "/locations/$2/tokens" | json "d['token']" > "/etc/gatehouse/$1.token"
	cat > "/etc/gatehouse/$1.toml" <<TOML
[core]
url = "http://127.0.0.1:50055"
[gateway]
name = "$1"
interface = "$3"
backend = "$5"
[http]
listen = "127.0.0.1:$4"
TOML
	chown root:gatehouse "/etc/gatehouse/$1.toml" "/etc/gatehouse/$1.token"
	chmod 0640 "/etc/gatehouse/$1.toml" "/etc/gatehouse/$1.token"
	systemctl start "gatehouse@$1.service"
}
B=$(location site-b 51821 10.79.1); add_peer "$B" "$(wg genkey | wg pubkey)" 10.79.1.2
C=$(location site-c 51822 10.79.2); add_peer "$C" "$(wg genkey | wg pubkey)" 10.79.2.2
add_peer "$C" "$(wg genkey | wg pubkey)" 10.79.2.3
instance site-b "$B" wg1 9181 kernel
instance site-c "$C" wg2 9182 kernel
for x in "1 $B 9181 site-b" "2 $C 9182 site-c"; do
	set -- $x
	wait_http "http://127.0.0.1:$3/readyz" || fail "gatehouse@$4 not ready"
	[ "$(kernel_peers "wg$1")" = "$(core_peers "$2")" ] || fail "wg$1 peers differ from location $2's"
	[ -s "/var/lib/gatehouse/$4/gateway-id" ] || ls -la "/var/lib/gatehouse/$4"
	echo "gatehouse@$4: wg$1 = location $2's peers, state in /var/lib/gatehouse/$4"
done
[ "$(kernel_peers wg0)" = "$(core_peers "$A")" ] || fail "wg0 changed"

say "gatehouse@ on the userspace backend (wireguard-go under the unit)"
U=$(location site-u 51823 10.79.3)
CU_KEY=$(wg genkey); CU_PUB=$(echo "$CU_KEY" | wg pubkey)
add_peer "$U" "$CU_PUB" 10.79.3.2
instance site-u "$U" wgus0 9183 userspace
wait_http http://127.0.0.1:9183/readyz || fail "gatehouse@site-u not ready"
[ -S /run/wireguard/wgus0.sock ] || fail "no wireguard-go socket"
[ "$(kernel_peers wgus0)" = "$(core_peers "$U")" ] || fail "wgus0 peers differ"
ip -n cl link add wgcl2 type wireguard
echo "$CU_KEY" > /run/cl2.key
ip netns exec cl wg set wgcl2 private-key /run/cl2.key peer "$(cat "/run/loc-$U.pub")" \
	endpoint 192.0.2.1:51823 allowed-ips 10.79.3.0/24
ip -n cl addr add 10.79.3.2/24 dev wgcl2; ip -n cl link set wgcl2 up
ip netns exec cl ping -c 2 -W 5 10.79.3.1 >/dev/null || fail "no traffic through the userspace gateway"
echo "userspace backend: wgus0 = the Core's peers, client traffic ok"
ps -o user,pid,comm -C wireguard-go | tail -n +2

say "all held"
systemctl --no-pager --plain list-units 'gatehouse*' | head -8
