//! WireGuard backends: the thin code that reads an interface and executes a [`Plan`].
//!
//! Three implementations share one trait: `kernel` (rtnetlink + WireGuard generic netlink,
//! the default), `userspace` (a supervised `wireguard-go` spoken to over its UAPI socket)
//! and `memory` (a simulated interface for tests). Backends decide nothing: the plan says
//! what to do; a backend only does it, counting the write messages it sends.

pub mod kernel;
pub mod kick;
pub mod link;
pub mod memory;
pub mod userspace;

use thiserror::Error;

pub use kick::Kick;

use crate::model::Observed;
use crate::plan::{KernelModel, Plan};

/// Which backend to run (the `gateway.backend` key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Kernel,
    Userspace,
    Memory,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Kernel => "kernel",
            BackendKind::Userspace => "userspace",
            BackendKind::Memory => "memory",
        })
    }
}

/// What a backend can fail with. The agent decides from the variant whether to retry
/// (most) or to stop (`Unsupported`, `Config`).
#[derive(Debug, Error)]
pub enum BackendError {
    /// This host cannot run this backend at all (e.g. no WireGuard in the kernel).
    #[error("{0}")]
    Unsupported(String),
    /// The local configuration cannot work (bad interface name, missing binary).
    #[error("{0}")]
    Config(String),
    /// An operation failed; the interface may be partly changed (the next reconcile
    /// observes and repairs it).
    #[error("{op}: {message}")]
    Operation { op: String, message: String },
    /// The backend's process or socket went away (userspace); it may come back.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl BackendError {
    /// True when retrying cannot help without an operator's change.
    pub fn is_fatal(&self) -> bool {
        matches!(self, BackendError::Unsupported(_) | BackendError::Config(_))
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BackendError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The most peers a backend's device holds, and who sets that limit (for the error that
/// names it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerLimit {
    pub max: usize,
    pub backend: &'static str,
}

/// Write messages sent so far (netlink requests or UAPI `set` transactions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteCounters {
    /// Messages that change the WireGuard device (set device / peers).
    pub device_writes: u64,
    /// Messages that change the link (create, MTU, up, addresses).
    pub link_writes: u64,
}

/// A WireGuard interface the agent can read and change.
///
/// Calls are synchronous and short (one netlink round trip per message); the agent's
/// event loop owns the backend and calls it directly.
pub trait Backend: Send {
    /// The interface this backend manages.
    fn interface(&self) -> &str;

    /// Reads the link and the WireGuard device. A missing interface is
    /// `Observed { link: None, .. }`, not an error.
    fn observe(&mut self) -> Result<Observed, BackendError>;

    /// Reads the interface into `model` in place ([`KernelModel::refresh`]): the agent's
    /// one copy of the interface, also during the read. On success the model is the read's
    /// (a missing interface: empty); on error it may hold part of the read, keeps every
    /// peer the read did not reach, and its index stays in step. Backends that can parse
    /// as they read do; the default reads whole first.
    fn observe_into(&mut self, model: &mut KernelModel) -> Result<(), BackendError> {
        let observed = self.observe()?;
        model.refresh_with(observed);
        Ok(())
    }

    /// Executes the plan in order. On error, operations before the failing one stay done.
    fn apply(&mut self, plan: &Plan) -> Result<(), BackendError>;

    /// Write messages sent since the backend was created.
    fn counters(&self) -> WriteCounters;

    /// The most peers the device can hold (None: no limit of its own). The agent cuts the
    /// desired peers to it ([`crate::peer_limit`]).
    fn peer_limit(&self) -> Option<PeerLimit> {
        None
    }

    /// Checks the backend's own health and repairs what it can (the userspace backend
    /// restarts a dead `wireguard-go` here). Returns a description of what it repaired.
    fn check(&mut self) -> Result<Option<String>, BackendError> {
        Ok(None)
    }

    /// Deletes the interface (only on an explicit operator request).
    fn remove(&mut self) -> Result<(), BackendError>;

    /// Sets each peer's endpoint and makes the device send a handshake initiation to it now
    /// (a keepalive with no valid session starts a handshake; the persistent keepalive is
    /// switched 0 -> nonzero to send it, then restored to the desired value). Peers not in the
    /// device are skipped. Few messages: many kicks per netlink message / UAPI transaction.
    fn kick(&mut self, kicks: &[Kick]) -> Result<(), BackendError>;
}
