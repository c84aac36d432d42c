# gatehouse: stop on erase only ($1 = 0), not on upgrade.
if [ "$1" = 0 ] && [ -d /run/systemd/system ]; then
	systemctl stop gatehouse.service || :
fi
