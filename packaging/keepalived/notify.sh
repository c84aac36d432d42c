#!/bin/sh
# keepalived notify script for gatehouse (design §12): tells the local agent its role when
# keepalived changes state. MASTER -> `gatehouse activate`; BACKUP, FAULT, STOP ->
# `gatehouse deactivate`. The agent also watches the floating addresses of `[ha] vip`
# itself (rtnetlink), so this script is a second signal, not the only one: a lost notify
# costs nothing, and activate/deactivate are idempotent.
#
# In keepalived.conf (on the vrrp_sync_group, or on a vrrp_instance):
#   notify "/usr/share/doc/gatehouse/keepalived/notify.sh --config /etc/gatehouse/gateway.toml"
# keepalived appends: TYPE (GROUP or INSTANCE), NAME, STATE, PRIORITY.
#
# Options (before keepalived's arguments):
#   --config FILE   the agent's configuration (its http.listen is used)
#   --http URL      the agent's HTTP server instead, e.g. http://127.0.0.1:9180
#   --bin PATH      the gatehouse binary (default: gatehouse in PATH)
# The answer (or the error) goes to syslog with the tag gatehouse-notify when `logger`
# exists, and to stderr. Exit status: gatehouse's.
set -u
bin=gatehouse
opt=
val=
while [ $# -gt 0 ]; do
	case "$1" in
	--config | --http)
		[ $# -ge 2 ] || { echo "notify.sh: $1 needs a value" >&2; exit 2; }
		opt=$1
		val=$2
		shift 2
		;;
	--bin)
		[ $# -ge 2 ] || { echo "notify.sh: --bin needs a value" >&2; exit 2; }
		bin=$2
		shift 2
		;;
	*) break ;;
	esac
done
if [ $# -lt 3 ]; then
	echo "usage: notify.sh [--config FILE | --http URL] [--bin PATH] TYPE NAME STATE [PRIORITY]" >&2
	exit 2
fi
state=$3
case "$state" in
MASTER) action=activate ;;
BACKUP | FAULT | STOP) action=deactivate ;;
*) exit 0 ;; # another state (e.g. DELETED): nothing to say
esac

answer=$("$bin" "$action" ${opt:+"$opt" "$val"} 2>&1)
status=$?
message="keepalived $1 $2 $state: gatehouse $action: $answer (exit $status)"
echo "$message" >&2
if command -v logger >/dev/null 2>&1; then
	logger -t gatehouse-notify -- "$message" || true
fi
exit $status
