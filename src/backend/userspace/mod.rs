//! The userspace backend: a supervised `wireguard-go` spoken to over its UAPI socket, for
//! hosts and containers without the WireGuard kernel module.
//!
//! - The plan's `CreateLink` starts wireguard-go (or adopts one that already answers on
//!   the interface's socket). Link operations (MTU, up, addresses) go through
//!   [`crate::backend::link`] to the TUN device wireguard-go created; device and peer
//!   operations become UAPI `set` transactions (one `device_writes` each): a new private
//!   key first, the peer operations in transactions of at most [`SET_BATCH_PEERS`] peers
//!   (a cold apply of 50,000 peers is 98 of them, not one 20 MB request), then the listen
//!   port and fwmark ([`uapi::encode_transactions`]). wireguard-go answers a transaction
//!   when its work is done, so the wait for the answer is `uapi_timeout` plus an allowance
//!   per peer section and for a key change ([`set_answer_timeout`]; connecting and sending still
//!   give up after `uapi_timeout`): a slow host is not a
//!   failed apply.
//! - [`Backend::check`] restarts a wireguard-go that died and re-creates nothing else:
//!   the agent's next reconcile observes the empty device and re-applies everything.
//! - Dropping the backend leaves wireguard-go running, so the tunnel and its peers
//!   survive an agent restart; the next backend adopts it without churn. Only
//!   [`Backend::remove`] stops it (and only kills the process this backend started).
//!   Under systemd this needs `KillMode=process` (or `mixed`) in the agent's unit.

// Starts and stops wireguard-go: waits on its socket and its exit with deadlines.
#[allow(clippy::disallowed_methods)]
mod process;
mod socket;
pub mod uapi;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::link::{check_interface_name, Link};
use super::{Backend, BackendError, Kick, PeerLimit, WriteCounters};
use crate::model::Observed;
use crate::plan::{KernelModel, Op, Plan};
use process::{LogFollower, Process};
use uapi::UapiError;

/// Most peer operations in one UAPI `set` transaction (about 400 bytes of text each): the
/// request of a cold apply is built and sent in pieces of this size, so its text is never
/// whole in memory.
pub const SET_BATCH_PEERS: usize = 512;

/// How long wireguard-go may take per peer section of a `set` before its answer is late,
/// beyond `uapi_timeout`: it answers only when the whole transaction is done, and a slow
/// host (an emulated one: several ms per peer) needs more than a fixed wait.
pub const SET_ANSWER_PER_PEER: Duration = Duration::from_millis(10);

/// The wait for a private key change, beyond `uapi_timeout`: wireguard-go recomputes
/// every peer it holds (at most [`MAX_PEERS`]) before it answers. Bounded: the apply holds
/// the agent's loop while it waits.
pub const SET_ANSWER_REKEY: Duration = Duration::from_secs(20);

/// How long to wait for wireguard-go's answer to `request`: `base` (the configured
/// `uapi_timeout`) plus an allowance for the work the request asks of it.
pub fn set_answer_timeout(base: Duration, request: &uapi::SetRequest) -> Duration {
    let peers = u32::try_from(request.peers).unwrap_or(u32::MAX);
    let rekey = if request.rekeys {
        SET_ANSWER_REKEY
    } else {
        Duration::ZERO
    };
    base.saturating_add(SET_ANSWER_PER_PEER.saturating_mul(peers))
        .saturating_add(rekey)
}

/// Where wireguard-go puts its UAPI sockets (compiled into wireguard-go).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/wireguard";

/// wireguard-go refuses a peer beyond this many ("too many peers", its `MaxPeers`).
pub const MAX_PEERS: PeerLimit = PeerLimit {
    max: 1 << 16,
    backend: "wireguard-go (the userspace backend)",
};

/// Settings of the userspace backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserspaceConfig {
    /// The wireguard-go binary: a path, or a name looked up in `PATH`.
    pub binary: PathBuf,
    /// wireguard-go's socket directory; its log file `<interface>.log` goes there too.
    pub socket_dir: PathBuf,
    /// wireguard-go's `LOG_LEVEL`: `verbose`, `error` or `silent`.
    pub log_level: String,
    /// How long a start may take until the UAPI socket answers.
    pub start_timeout: Duration,
    /// Timeout of one UAPI transaction.
    pub uapi_timeout: Duration,
}

impl Default for UserspaceConfig {
    fn default() -> Self {
        UserspaceConfig {
            binary: PathBuf::from("wireguard-go"),
            socket_dir: PathBuf::from(DEFAULT_SOCKET_DIR),
            log_level: "error".into(),
            start_timeout: Duration::from_secs(10),
            uapi_timeout: Duration::from_secs(5),
        }
    }
}

/// A WireGuard interface run by wireguard-go.
#[derive(Debug)]
pub struct UserspaceBackend {
    interface: String,
    config: UserspaceConfig,
    link: Link,
    /// The network namespace the backend was created in; wireguard-go starts there
    /// whichever thread starts it.
    netns: File,
    /// The wireguard-go we started, if any.
    process: Option<Process>,
    /// The interface should exist: it was created or adopted and not removed since.
    wanted: bool,
    _log: Option<LogFollower>,
    device_writes: u64,
    starts: u64,
}

impl UserspaceBackend {
    /// Sends one UAPI `set` transaction and maps wireguard-go's answer.
    fn set(&mut self, request: &uapi::SetRequest) -> Result<(), BackendError> {
        self.device_writes += 1;
        let answer_wait = set_answer_timeout(self.config.uapi_timeout, request);
        let answer = self.uapi(request.as_bytes(), answer_wait)?;
        let op = || format!("configure WireGuard device {}", self.interface);
        match uapi::parse_errno(&answer) {
            Ok(()) => Ok(()),
            Err(UapiError::Errno(code)) if code == libc::EADDRINUSE => {
                Err(BackendError::Operation {
                    op: op(),
                    message: match request.listen_port {
                        Some(port) => format!(
                            "listen port {port} is already in use (wireguard-go answered \
                             errno={code})"
                        ),
                        None => UapiError::Errno(code).to_string(),
                    },
                })
            }
            Err(e) => Err(BackendError::Operation {
                op: op(),
                message: format!(
                    "{e}; wireguard-go log: {}",
                    process::last_lines(&self.log_path(), 3)
                ),
            }),
        }
    }

    /// A backend for `interface` in the calling thread's network namespace. Adopts a
    /// wireguard-go that already answers on the interface's socket; starts nothing
    /// otherwise (the plan's `CreateLink` does).
    pub fn new(
        interface: impl Into<String>,
        config: UserspaceConfig,
    ) -> Result<UserspaceBackend, BackendError> {
        let interface = interface.into();
        check_interface_name(&interface)?;
        let netns = File::open("/proc/thread-self/ns/net")
            .map_err(|e| BackendError::io("open this thread's network namespace", e))?;
        let link = Link::open()?;
        let mut backend = UserspaceBackend {
            interface,
            config,
            link,
            netns,
            process: None,
            wanted: false,
            _log: None,
            device_writes: 0,
            starts: 0,
        };
        if socket::answers(&backend.socket_path(), backend.config.uapi_timeout) {
            tracing::info!(
                interface = %backend.interface,
                "adopting the wireguard-go that already runs for this interface"
            );
            backend.wanted = true;
            backend._log = Some(LogFollower::new(
                backend.log_path(),
                backend.interface.clone(),
                false,
            ));
        } else {
            // Fail early on a missing binary rather than at the first apply.
            find_binary(&backend.config.binary)?;
        }
        Ok(backend)
    }

    /// The pid of the wireguard-go this backend started (`None` when adopted or none).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// The UAPI socket path, `<socket_dir>/<interface>.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.config
            .socket_dir
            .join(format!("{}.sock", self.interface))
    }

    fn log_path(&self) -> PathBuf {
        self.config
            .socket_dir
            .join(format!("{}.log", self.interface))
    }

    /// Starts wireguard-go unless one answers already (adopting it then).
    fn ensure_running(&mut self) -> Result<(), BackendError> {
        self.wanted = true;
        if let Some(p) = self.process.as_mut() {
            if p.exited()?.is_none() {
                return Ok(());
            }
            self.process = None;
        }
        if socket::answers(&self.socket_path(), self.config.uapi_timeout) {
            return Ok(());
        }
        std::fs::create_dir_all(&self.config.socket_dir).map_err(|e| {
            BackendError::io(format!("create {}", self.config.socket_dir.display()), e)
        })?;
        let process = Process::start(
            &self.config.binary,
            &self.interface,
            &self.config.log_level,
            &self.netns,
            &self.log_path(),
            &self.socket_path(),
            self.config.start_timeout,
        )?;
        self.starts += 1;
        self.process = Some(process);
        self._log = Some(LogFollower::new(
            self.log_path(),
            self.interface.clone(),
            true,
        ));
        Ok(())
    }

    /// The live process's death, as an error for `observe`/`apply`.
    fn dead_process(&mut self) -> Result<(), BackendError> {
        if let Some(p) = self.process.as_mut() {
            if let Some(status) = p.exited()? {
                return Err(BackendError::Unavailable(format!(
                    "wireguard-go for {} exited ({status}); check() restarts it",
                    self.interface
                )));
            }
        }
        Ok(())
    }

    fn link_index(&mut self) -> Result<u32, BackendError> {
        match self.link.get(&self.interface)? {
            Some(info) => Ok(info.index),
            None => Err(BackendError::Unavailable(format!(
                "wireguard-go answers but its TUN device {} is missing",
                self.interface
            ))),
        }
    }

    /// A UAPI transaction: connecting and sending give up after `uapi_timeout`, the
    /// answer is waited for up to `answer_wait`.
    fn uapi(
        &self,
        request: &[u8],
        answer_wait: Duration,
    ) -> Result<zeroize::Zeroizing<String>, BackendError> {
        socket::transact_waiting(
            &self.socket_path(),
            request,
            self.config.uapi_timeout,
            answer_wait,
        )
        .map_err(|e| {
            BackendError::Unavailable(format!("UAPI socket {}: {e}", self.socket_path().display()))
        })
    }
}

impl Backend for UserspaceBackend {
    fn interface(&self) -> &str {
        &self.interface
    }

    /// The read as [`Backend::observe_into`] makes it, into an empty model.
    fn observe(&mut self) -> Result<Observed, BackendError> {
        let mut model = KernelModel::default();
        self.observe_into(&mut model)?;
        Ok(model.into_observed())
    }

    /// Each peer goes into the model as its lines arrive.
    fn observe_into(&mut self, model: &mut KernelModel) -> Result<(), BackendError> {
        self.dead_process()?;
        let mut parser = uapi::GetParser::new(model.refresh());
        let read = socket::transact_lines(
            &self.socket_path(),
            b"get=1\n\n",
            self.config.uapi_timeout,
            |line| parser.line(line),
        );
        match read {
            Ok(()) => {}
            Err(e) if self.process.is_none() && !self.wanted && is_absent(&e) => {
                drop(parser);
                model.refresh().missing();
                return Ok(());
            }
            Err(e) => {
                return Err(BackendError::Unavailable(format!(
                    "wireguard-go for {} does not answer on {}: {e}",
                    self.interface,
                    self.socket_path().display()
                )))
            }
        }
        let mut refresh = parser.finish().map_err(|e| BackendError::Operation {
            op: format!("read WireGuard device {}", self.interface),
            message: e.to_string(),
        })?;
        let info = match self.link.get(&self.interface)? {
            Some(info) => info,
            None => {
                return Err(BackendError::Unavailable(format!(
                    "wireguard-go answers but its TUN device {} is missing",
                    self.interface
                )))
            }
        };
        refresh.link(Some(self.link.state(&info)?));
        refresh.finish();
        self.wanted = true;
        Ok(())
    }

    fn apply(&mut self, plan: &Plan) -> Result<(), BackendError> {
        self.dead_process()?;
        let mut index = None;
        for step in &plan.steps {
            match &step.op {
                Op::CreateLink => self.ensure_running()?,
                Op::SetMtu(mtu) => {
                    let i = cached(&mut index, || self.link_index())?;
                    self.link.set_mtu(i, *mtu)?;
                }
                Op::SetLinkUp => {
                    let i = cached(&mut index, || self.link_index())?;
                    self.link.set_up(i)?;
                }
                Op::AddAddress(addr) => {
                    let i = cached(&mut index, || self.link_index())?;
                    self.link.add_address(i, *addr)?;
                }
                Op::RemoveAddress(addr) => {
                    let i = cached(&mut index, || self.link_index())?;
                    self.link.remove_address(i, *addr)?;
                }
                Op::ConfigureDevice(_) | Op::AddPeer(_) | Op::UpdatePeer(_) | Op::RemovePeer(_) => {
                }
            }
        }
        // The key, the peers in batches, then the port and fwmark
        // (`uapi::encode_transactions`); the first failing transaction stops the rest, as
        // wireguard-go stops one transaction at its first error.
        let ops: Vec<&Op> = plan.steps.iter().map(|s| &s.op).collect();
        for request in uapi::encode_transactions(&ops, SET_BATCH_PEERS) {
            self.set(&request)?;
        }
        Ok(())
    }

    fn counters(&self) -> WriteCounters {
        WriteCounters {
            device_writes: self.device_writes,
            link_writes: self.link.writes() + self.starts,
        }
    }

    fn peer_limit(&self) -> Option<PeerLimit> {
        Some(MAX_PEERS)
    }

    fn check(&mut self) -> Result<Option<String>, BackendError> {
        if !self.wanted {
            return Ok(None);
        }
        let socket_path = self.socket_path();
        let timeout = self.config.uapi_timeout;
        let what = match self.process.as_mut() {
            Some(p) => match p.exited()? {
                Some(status) => format!("wireguard-go for {} exited ({status})", self.interface),
                None if socket::answers(&socket_path, timeout) => return Ok(None),
                None => {
                    // Dying (its socket closes before it can be reaped) or hung.
                    match p.wait_exit(Duration::from_secs(1))? {
                        Some(status) => {
                            format!("wireguard-go for {} exited ({status})", self.interface)
                        }
                        None if socket::answers(&socket_path, timeout) => return Ok(None),
                        None => {
                            p.stop(Duration::from_secs(1));
                            format!(
                                "wireguard-go for {} stopped answering on its UAPI socket \
                                 and was killed",
                                self.interface
                            )
                        }
                    }
                }
            },
            None => {
                if socket::answers(&self.socket_path(), self.config.uapi_timeout) {
                    return Ok(None);
                }
                format!(
                    "the adopted wireguard-go for {} no longer answers",
                    self.interface
                )
            }
        };
        self.process = None;
        tracing::warn!(interface = %self.interface, "{what}; restarting it");
        self.ensure_running()?;
        let pid = self.pid().map_or_else(|| "?".into(), |p| p.to_string());
        Ok(Some(format!(
            "{what}; restarted it (pid {pid}); the next reconcile restores its configuration"
        )))
    }

    /// One UAPI transaction ([`uapi::encode_kicks`]). A re-creation would create an
    /// absent peer, so when there is one the device is read first and the kicks of absent
    /// peers are left out (an update-only kick skips itself).
    fn kick(&mut self, kicks: &[Kick]) -> Result<(), BackendError> {
        if kicks.is_empty() {
            return Ok(());
        }
        let present = if kicks.iter().any(|k| k.recreate) {
            Some(
                self.observe()?
                    .device
                    .peers
                    .into_keys()
                    .collect::<std::collections::BTreeSet<_>>(),
            )
        } else {
            None
        };
        let wanted = kicks.iter().filter(|k| {
            !k.recreate
                || present
                    .as_ref()
                    .is_some_and(|p| p.contains(&k.peer.public_key))
        });
        if let Some(request) = uapi::encode_kicks(wanted) {
            self.set(&request)?;
        }
        tracing::debug!(interface = %self.interface, kicks = kicks.len(), "takeover handshakes started");
        Ok(())
    }

    fn remove(&mut self) -> Result<(), BackendError> {
        self.wanted = false;
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(3));
        }
        self._log = None;
        let _ = std::fs::remove_file(self.log_path());
        // An adopted wireguard-go (not ours to kill) exits when its TUN device goes.
        if let Some(info) = self.link.get(&self.interface)? {
            self.link.delete(info.index)?;
        }
        Ok(())
    }
}

/// A value computed once per apply.
fn cached(
    slot: &mut Option<u32>,
    f: impl FnOnce() -> Result<u32, BackendError>,
) -> Result<u32, BackendError> {
    match slot {
        Some(v) => Ok(*v),
        None => {
            let v = f()?;
            *slot = Some(v);
            Ok(v)
        }
    }
}

/// The socket is missing or nobody listens: no wireguard-go runs for the interface.
fn is_absent(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

/// Resolves the binary like `execvp` does, for a clear error before the first start.
fn find_binary(binary: &Path) -> Result<PathBuf, BackendError> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if binary.components().count() > 1 || binary.is_absolute() {
        return if executable(binary) {
            Ok(binary.to_path_buf())
        } else {
            Err(BackendError::Config(format!(
                "wireguard-go not found at {} (or not executable)",
                binary.display()
            )))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| executable(p))
        .ok_or_else(|| {
            BackendError::Config(format!(
                "{} not found in PATH ({}); install wireguard-go or set the userspace \
                 backend's binary path",
                binary.display(),
                std::env::var("PATH").unwrap_or_default()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Key, PeerSpec};

    fn add_peers(n: u8) -> Vec<Op> {
        (0..n)
            .map(|i| Op::AddPeer(std::sync::Arc::new(PeerSpec::new(Key([i; 32]), []))))
            .collect()
    }

    #[test]
    fn the_wait_for_a_set_answer_grows_with_its_work() {
        let base = Duration::from_secs(5);
        let ops = add_peers(100);
        let request = uapi::encode_set(ops.iter()).unwrap();
        assert_eq!(request.peers, 100);
        assert_eq!(
            set_answer_timeout(base, &request),
            base + SET_ANSWER_PER_PEER * 100
        );
        let rekey = Op::ConfigureDevice(Box::new(crate::plan::DeviceChange {
            private_key: Some(crate::model::SecretKey::new([7; 32])),
            ..Default::default()
        }));
        let request = uapi::encode_set([&rekey]).unwrap();
        assert!(request.rekeys);
        assert_eq!(set_answer_timeout(base, &request), base + SET_ANSWER_REKEY);
    }

    /// wireguard-go answers a `set` only when its work is done: a transaction of many
    /// peers on a slow host answers after more than `uapi_timeout`, and is not a failure.
    #[test]
    #[allow(clippy::disallowed_methods)] // the fake wireguard-go takes its time
    fn a_set_answered_late_for_its_size_still_applies() {
        use std::io::{BufRead, BufReader, Write};
        let dir = tempfile::tempdir().unwrap();
        let config = UserspaceConfig {
            binary: PathBuf::from("sh"),
            socket_dir: dir.path().to_path_buf(),
            uapi_timeout: Duration::from_millis(100),
            ..UserspaceConfig::default()
        };
        let mut b = UserspaceBackend::new("ghslow0", config).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(b.socket_path()).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 0 && !line.ends_with("\n\n") {}
            // 100 peers at 5 ms each: longer than uapi_timeout, within the allowance.
            std::thread::sleep(Duration::from_millis(500));
            conn.write_all(b"errno=0\n\n").unwrap();
        });
        let ops = add_peers(100);
        let request = uapi::encode_set(ops.iter()).unwrap();
        b.set(&request).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn missing_binary_is_a_config_error() {
        let e = find_binary(Path::new("gatehouse-no-such-wireguard-go")).unwrap_err();
        assert!(matches!(&e, BackendError::Config(m) if m.contains("not found in PATH")));
        assert!(e.is_fatal());
        let e = find_binary(Path::new("/nonexistent/wireguard-go")).unwrap_err();
        assert!(matches!(e, BackendError::Config(_)));
        assert!(find_binary(Path::new("sh")).is_ok());
    }

    #[test]
    fn bad_interface_name_is_a_config_error() {
        let e = UserspaceBackend::new("bad/name", UserspaceConfig::default()).unwrap_err();
        assert!(matches!(e, BackendError::Config(_)));
    }

    #[test]
    fn backend_without_wireguard_go_observes_nothing_and_counts_no_writes() {
        let config = UserspaceConfig {
            binary: PathBuf::from("sh"),
            socket_dir: std::env::temp_dir().join(format!("gh-uapi-{}", std::process::id())),
            ..UserspaceConfig::default()
        };
        let mut b = UserspaceBackend::new("ghnone0", config).unwrap();
        assert_eq!(b.observe().unwrap(), Observed::default());
        assert_eq!(b.check().unwrap(), None);
        assert_eq!(b.counters(), WriteCounters::default());
        assert_eq!(b.pid(), None);
    }
}
