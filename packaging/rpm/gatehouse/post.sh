# gatehouse %post: the configuration readable by the service user only (at every install:
# an unmodified config file may have been replaced); an upgrade ($1 > 1) restarts running
# agents (try-restart), which adopt their interfaces without peer changes.
chown root:gatehouse /etc/gatehouse
chmod 0750 /etc/gatehouse
for f in /etc/gatehouse/*.toml /etc/gatehouse/token /etc/gatehouse/*.token; do
	[ -f "$f" ] || continue
	chown root:gatehouse "$f"
	chmod 0640 "$f"
done
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -eq 1 ]; then
		# Enabled by the preset policy, not started: the unit waits for a token.
		systemctl preset gatehouse.service >/dev/null 2>&1 || :
	else
		systemctl try-restart gatehouse.service 'gatehouse@*.service' >/dev/null 2>&1 || :
	fi
fi
exit 0
