# gatehouse-core %post: the configuration readable by the service user only (at every
# install: an unmodified config file may have been replaced); an upgrade ($1 > 1) restarts a
# running Core (try-restart); its gateways reconnect and resume.
chown root:gatehouse-core /etc/gatehouse-core
chmod 0750 /etc/gatehouse-core
for f in /etc/gatehouse-core/core.toml /etc/gatehouse-core/admin-token; do
	[ -f "$f" ] || continue
	chown root:gatehouse-core "$f"
	chmod 0640 "$f"
done
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -eq 1 ]; then
		# Enabled by the preset policy, not started: the unit waits for an admin token.
		systemctl preset gatehouse-core.service >/dev/null 2>&1 || :
	else
		systemctl try-restart gatehouse-core.service >/dev/null 2>&1 || :
	fi
fi
exit 0
