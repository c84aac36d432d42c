# gatehouse-core %pre: the service user exists before the files are installed, so the
# configuration can be given to its group.
getent group gatehouse-core >/dev/null || groupadd --system gatehouse-core
getent passwd gatehouse-core >/dev/null || useradd --system --gid gatehouse-core --home-dir / --no-create-home --shell /sbin/nologin --comment "gatehouse reference Core" gatehouse-core
exit 0
