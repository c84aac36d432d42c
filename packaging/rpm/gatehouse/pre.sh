# gatehouse %pre: the service user exists before the files are installed, so the
# configuration can be given to its group.
getent group gatehouse >/dev/null || groupadd --system gatehouse
getent passwd gatehouse >/dev/null || useradd --system --gid gatehouse --home-dir / --no-create-home --shell /sbin/nologin --comment "gatehouse WireGuard gateway agent" gatehouse
exit 0
