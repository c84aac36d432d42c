//! The kernel backend: a WireGuard interface of the Linux kernel, driven over netlink.
//!
//! The link (create, MTU, up, addresses) goes through [`super::link`] (rtnetlink); the
//! device and its peers through one generic netlink socket ([`genl`]) whose `wireguard`
//! family id is resolved once. Device and peer operations are packed into as few
//! `WG_CMD_SET_DEVICE` messages as fit ([`pack`]), each sent as soon as it is built (and
//! its ACK awaited before the next: the first refused message stops the apply, with the
//! messages before it applied); dumps are merged by [`dump`].
//!
//! The backend decides nothing: it executes the plan. Link operations run first (the plan
//! puts them first), then the device messages in plan order. An interface this backend
//! created during a failed `apply` is deleted again; an adopted one never is.

pub mod dump;
pub mod genl;
pub mod pack;
#[cfg(test)]
mod pack_nla;
mod shape;

use std::collections::BTreeSet;
use std::io;

use super::link::{check_interface_name, Link, LinkInfo};
use super::{Backend, BackendError, Kick, WriteCounters};
use crate::model::{Key, Observed};
use crate::plan::{KernelModel, Op, Plan};

use self::genl::WgSocket;
use self::pack::{pack_each, pack_kicks_each, SetDevice, MESSAGE_LIMIT};

/// The link kind of WireGuard interfaces.
const KIND: &str = "wireguard";

/// What to tell an operator whose kernel has no WireGuard.
fn unsupported(detail: &str) -> BackendError {
    BackendError::Unsupported(format!(
        "the kernel has no WireGuard support ({detail}); set backend = \"userspace\" to use \
         wireguard-go"
    ))
}

/// A kernel WireGuard interface.
pub struct KernelBackend {
    name: String,
    link: Link,
    wg: WgSocket,
    message_limit: usize,
    /// Where device messages are built, allocated once (see [`pack_each`]).
    message_buffer: Vec<u8>,
    device_writes: u64,
}

impl std::fmt::Debug for KernelBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelBackend")
            .field("interface", &self.name)
            .field("device_writes", &self.device_writes)
            .finish_non_exhaustive()
    }
}

impl KernelBackend {
    /// Opens the netlink sockets for `interface` in the calling thread's network namespace.
    ///
    /// `Config` for an invalid interface name; `Unsupported` when the kernel has no
    /// WireGuard (the `wireguard` generic netlink family is missing after the kernel
    /// tried to load the module).
    pub fn new(interface: &str) -> Result<Self, BackendError> {
        check_interface_name(interface)?;
        let wg = WgSocket::open().map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => unsupported("generic netlink family \"wireguard\" not found"),
            _ => BackendError::io("open the WireGuard generic netlink socket", e),
        })?;
        let link = Link::open()?;
        Ok(KernelBackend {
            name: interface.to_owned(),
            link,
            wg,
            message_limit: MESSAGE_LIMIT,
            message_buffer: Vec::with_capacity(MESSAGE_LIMIT),
            device_writes: 0,
        })
    }

    /// Changes the size limit of `WG_CMD_SET_DEVICE` messages (default [`MESSAGE_LIMIT`];
    /// for benchmarks and tests).
    pub fn with_message_limit(mut self, limit: usize) -> Self {
        self.message_limit = limit;
        self
    }

    /// Reads the link, refusing one that is not a WireGuard interface.
    fn wireguard_link(&mut self) -> Result<Option<LinkInfo>, BackendError> {
        match self.link.get(&self.name)? {
            Some(info) if info.kind.as_deref() != Some(KIND) => Err(BackendError::Config(format!(
                "interface {} exists but is a {} link, not WireGuard; choose another \
                     interface name",
                self.name,
                info.kind.as_deref().unwrap_or("plain")
            ))),
            other => Ok(other),
        }
    }

    fn apply_steps(&mut self, plan: &Plan, created: &mut Option<u32>) -> Result<(), BackendError> {
        let mut index = None;
        for step in &plan.steps {
            match &step.op {
                Op::CreateLink => {
                    // A kernel without WireGuard fails here with `Unsupported`.
                    let i = self.link.create_wireguard(&self.name)?;
                    *created = Some(i);
                    index = Some(i);
                }
                Op::SetMtu(mtu) => {
                    let i = self.index(&mut index)?;
                    self.link.set_mtu(i, *mtu)?;
                }
                Op::SetLinkUp => {
                    let i = self.index(&mut index)?;
                    self.link.set_up(i)?;
                }
                Op::AddAddress(addr) => {
                    let i = self.index(&mut index)?;
                    self.link.add_address(i, *addr)?;
                }
                Op::RemoveAddress(addr) => {
                    let i = self.index(&mut index)?;
                    self.link.remove_address(i, *addr)?;
                }
                Op::ConfigureDevice(_) | Op::AddPeer(_) | Op::UpdatePeer(_) | Op::RemovePeer(_) => {
                }
            }
        }
        let total = self.send_packed(|buffer, interface, limit, sink| {
            pack_each(
                buffer,
                interface,
                plan.steps.iter().map(|s| &s.op),
                limit,
                sink,
            )
        })?;
        if total > 0 {
            tracing::debug!(interface = %self.name, messages = total, "WireGuard device configured");
        }
        Ok(())
    }

    /// The public keys of the device's peers (one dump).
    fn peer_keys(&mut self) -> Result<BTreeSet<Key>, BackendError> {
        let op = || format!("read WireGuard device {}", self.name);
        let mut parts = self
            .wg
            .get_device(&self.name)
            .map_err(|e| BackendError::io(op(), e))?;
        let device = dump::merge_dump(&parts);
        for part in &mut parts {
            pack::zeroize_attributes(&mut part.attributes);
        }
        let device = device.map_err(|e| BackendError::Operation {
            op: op(),
            message: e.to_string(),
        })?;
        Ok(device.peers.into_keys().collect())
    }

    /// Sends the device messages `pack` builds, each as soon as it is built, counting each;
    /// stops sending at the first refused one. Returns how many messages there were. After
    /// a refusal the rest is still packed (not sent), only to count the messages for the
    /// error ("message n of total").
    fn send_packed(
        &mut self,
        pack: impl FnOnce(&mut Vec<u8>, &str, usize, &mut dyn FnMut(&mut SetDevice)),
    ) -> Result<usize, BackendError> {
        let KernelBackend {
            name,
            wg,
            message_limit,
            device_writes,
            message_buffer,
            ..
        } = self;
        let mut total = 0;
        let mut refused = None;
        pack(message_buffer, name, *message_limit, &mut |message| {
            let n = total;
            total += 1;
            if refused.is_some() {
                return;
            }
            *device_writes += 1;
            if let Err(e) = wg.set_device(message.bytes_mut()) {
                refused = Some((e, n, message.listen_port()));
            }
        });
        match refused {
            Some((e, n, port)) => Err(device_error(name, e, port, n, total)),
            None => Ok(total),
        }
    }

    /// The link's index, read once per apply when no step created it.
    fn index(&mut self, cached: &mut Option<u32>) -> Result<u32, BackendError> {
        if let Some(i) = *cached {
            return Ok(i);
        }
        match self.wireguard_link()? {
            Some(info) => {
                *cached = Some(info.index);
                Ok(info.index)
            }
            None => Err(BackendError::Operation {
                op: format!("configure interface {}", self.name),
                message: "the interface does not exist (removed while applying?)".into(),
            }),
        }
    }
}

/// The error of message `n` (from 0) of `total`, refused with `e`; `port` is the listen
/// port that message sets, if any.
fn device_error(
    name: &str,
    e: io::Error,
    port: Option<u16>,
    n: usize,
    total: usize,
) -> BackendError {
    let op = format!(
        "configure WireGuard device {name} (message {} of {total})",
        n + 1
    );
    match (e.raw_os_error(), port) {
        (Some(libc::EADDRINUSE), Some(port)) => BackendError::Operation {
            op,
            message: format!(
                "listen port {port} is already in use on this host (another WireGuard \
                     interface or program holds UDP port {port}); free it or choose another \
                     listen_port"
            ),
        },
        (Some(libc::EOPNOTSUPP), _) => {
            BackendError::Config(format!("interface {name} is not a WireGuard interface"))
        }
        (Some(libc::ENODEV), _) => BackendError::Operation {
            op,
            message: "the interface does not exist (removed while applying?)".into(),
        },
        _ => BackendError::Operation {
            op,
            message: e.to_string(),
        },
    }
}

impl Backend for KernelBackend {
    fn interface(&self) -> &str {
        &self.name
    }

    /// The read as [`Backend::observe_into`] makes it, into an empty model.
    fn observe(&mut self) -> Result<Observed, BackendError> {
        let mut model = KernelModel::default();
        self.observe_into(&mut model)?;
        Ok(model.into_observed())
    }

    /// Each part of the dump goes into the model as it arrives (its secrets zeroed right
    /// after); a dump interrupted by a concurrent change is read again from the start.
    fn observe_into(&mut self, model: &mut KernelModel) -> Result<(), BackendError> {
        let Some(info) = self.wireguard_link()? else {
            model.refresh().missing();
            return Ok(());
        };
        let link = self.link.state(&info)?;
        let op = |name: &str| format!("read WireGuard device {name}");
        let mut attempt = 0;
        loop {
            let mut refresh = model.refresh();
            refresh.link(Some(link.clone()));
            let mut parser = dump::DumpParser::new(refresh);
            let read = self.wg.get_device_each(&self.name, |mut part| {
                parser.part(&part);
                pack::zeroize_attributes(&mut part.attributes);
            });
            match read {
                Ok(()) => {
                    let refresh = parser.finish().map_err(|e| BackendError::Operation {
                        op: op(&self.name),
                        message: e.to_string(),
                    })?;
                    refresh.finish();
                    return Ok(());
                }
                // Removed between the two reads: it is missing now.
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                    drop(parser);
                    model.refresh().missing();
                    return Ok(());
                }
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted && attempt < genl::DUMP_RETRIES =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(BackendError::io(op(&self.name), e)),
            }
        }
    }

    fn apply(&mut self, plan: &Plan) -> Result<(), BackendError> {
        if plan.is_empty() {
            return Ok(());
        }
        let mut created = None;
        let result = self.apply_steps(plan, &mut created);
        if let (Err(e), Some(index)) = (&result, created) {
            // No half-configured interface left behind: the next apply starts over.
            tracing::warn!(interface = %self.name, error = %e, "deleting the interface created by the failed apply");
            if let Err(del) = self.link.delete(index) {
                tracing::warn!(interface = %self.name, error = %del, "could not delete the interface");
            }
        }
        result
    }

    fn counters(&self) -> WriteCounters {
        WriteCounters {
            device_writes: self.device_writes,
            link_writes: self.link.writes(),
        }
    }

    /// Kicks go out packed like plan operations ([`pack_kicks`]). A re-creation would
    /// create an absent peer, so when there is one the device's peers are read first and
    /// the kicks of absent peers are left out (an update-only kick skips itself).
    fn kick(&mut self, kicks: &[Kick]) -> Result<(), BackendError> {
        if kicks.is_empty() {
            return Ok(());
        }
        let present = if kicks.iter().any(|k| k.recreate) {
            Some(self.peer_keys()?)
        } else {
            None
        };
        let wanted = kicks.iter().filter(|k| {
            !k.recreate
                || present
                    .as_ref()
                    .is_some_and(|p| p.contains(&k.peer.public_key))
        });
        let messages = self.send_packed(|buffer, interface, limit, sink| {
            pack_kicks_each(buffer, interface, wanted, limit, sink)
        })?;
        tracing::debug!(
            interface = %self.name,
            kicks = kicks.len(),
            messages,
            "takeover handshakes started"
        );
        Ok(())
    }

    fn remove(&mut self) -> Result<(), BackendError> {
        match self.wireguard_link()? {
            Some(info) => self.link.delete(info.index),
            None => Ok(()),
        }
    }
}
