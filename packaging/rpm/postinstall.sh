# gatehouse: create the service user; an upgrade restarts the agent, which adopts the
# interface without peer changes.
getent passwd gatehouse >/dev/null || useradd --system --user-group --home-dir /var/lib/gatehouse --shell /sbin/nologin gatehouse
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || :
	[ "$1" -gt 1 ] && systemctl try-restart gatehouse.service || :
fi
