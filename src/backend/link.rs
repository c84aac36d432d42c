//! rtnetlink link operations shared by the kernel and userspace backends: read a link,
//! create a WireGuard link, set MTU and up, and read, add and remove addresses.
//!
//! One synchronous `NETLINK_ROUTE` socket is opened once and reused for every request.
//! Each request carries its own sequence number; replies are read until the request's ACK
//! (or error), or, for dumps, until `NLMSG_DONE`. Replies of other sequence numbers (left
//! over from an earlier request that failed half-way) are skipped. The part that turns
//! received datagrams into a result ([`absorb`]) is pure and unit-tested.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR,
    NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressMessage, AddressProtocol, AddressScope,
};
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::BackendError;
use crate::model::LinkState;

/// A link as rtnetlink reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub mtu: u32,
    /// The administrative state (`IFF_UP`).
    pub up: bool,
    /// `IFLA_INFO_KIND` (`"wireguard"`, `"tun"`, `"veth"`), when the link has one.
    pub kind: Option<String>,
}

/// One `NETLINK_ROUTE` socket, reused for every request.
pub struct Link {
    socket: Socket,
    seq: u32,
    writes: u64,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("seq", &self.seq)
            .field("writes", &self.writes)
            .finish_non_exhaustive()
    }
}

/// Checks an interface name the way the kernel does (1 to 15 bytes, no `/`, no
/// whitespace, not `.` or `..`), so a bad name is a [`BackendError::Config`] up front
/// rather than an errno later.
pub fn check_interface_name(name: &str) -> Result<(), BackendError> {
    let bad = |why: &str| {
        Err(BackendError::Config(format!(
            "invalid interface name {name:?}: {why}"
        )))
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 15 {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("reserved");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return bad("contains '/', ':', whitespace or a control character");
    }
    Ok(())
}

impl Link {
    /// Opens the socket in the calling thread's network namespace.
    pub fn open() -> Result<Link, BackendError> {
        let mut socket =
            Socket::new(NETLINK_ROUTE).map_err(|e| BackendError::io("open rtnetlink socket", e))?;
        socket
            .bind_auto()
            .map_err(|e| BackendError::io("bind rtnetlink socket", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| BackendError::io("connect rtnetlink socket", e))?;
        set_receive_timeout(&socket, RECEIVE_TIMEOUT_SECS)
            .map_err(|e| BackendError::io("set rtnetlink receive timeout", e))?;
        Ok(Link {
            socket,
            seq: 0,
            writes: 0,
            buf: Vec::with_capacity(RECEIVE_BUFFER),
        })
    }

    /// Reads the link called `name`; `None` when there is none.
    pub fn get(&mut self, name: &str) -> Result<Option<LinkInfo>, BackendError> {
        check_interface_name(name)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        let op = || format!("read link {name}");
        let replies = match self.request(RouteNetlinkMessage::GetLink(msg), NLM_F_ACK) {
            Ok(replies) => replies,
            Err(Failure::Errno(code)) if code == libc::ENODEV => return Ok(None),
            Err(e) => return Err(e.into_error(op())),
        };
        replies
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link_info(&link)),
                _ => None,
            })
            .map(Some)
            .ok_or_else(|| BackendError::Operation {
                op: op(),
                message: "the kernel acknowledged without describing the link".into(),
            })
    }

    /// Creates a link of kind `wireguard` and returns its index.
    pub fn create_wireguard(&mut self, name: &str) -> Result<u32, BackendError> {
        check_interface_name(name)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes
            .push(LinkAttribute::LinkInfo(vec![NlLinkInfo::Kind(
                InfoKind::Wireguard,
            )]));
        let op = format!("create WireGuard link {name}");
        self.writes += 1;
        match self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => {}
            Err(Failure::Errno(code)) if code == libc::EOPNOTSUPP => {
                return Err(BackendError::Unsupported(format!(
                    "the kernel has no WireGuard support ({op}: {}); set backend = \"userspace\" \
                     to use wireguard-go",
                    errno_text(code)
                )))
            }
            Err(e) => return Err(e.into_error(op)),
        }
        match self.get(name)? {
            Some(info) => Ok(info.index),
            None => Err(BackendError::Operation {
                op,
                message: "the link vanished right after it was created".into(),
            }),
        }
    }

    /// Deletes the link with this index.
    pub fn delete(&mut self, index: u32) -> Result<(), BackendError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.write(
            RouteNetlinkMessage::DelLink(msg),
            0,
            format!("delete link {index}"),
        )
    }

    /// Sets the link's MTU.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), BackendError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        self.write(
            RouteNetlinkMessage::SetLink(msg),
            0,
            format!("set MTU of link {index} to {mtu}"),
        )
    }

    /// Brings the link up (administratively).
    pub fn set_up(&mut self, index: u32) -> Result<(), BackendError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.write(
            RouteNetlinkMessage::SetLink(msg),
            0,
            format!("set link {index} up"),
        )
    }

    /// The link as the reconciler sees it: MTU, administrative state and addresses.
    pub fn state(&mut self, info: &LinkInfo) -> Result<LinkState, BackendError> {
        Ok(LinkState {
            mtu: info.mtu,
            up: info.up,
            addresses: self.addresses(info.index)?,
        })
    }

    /// The link's IPv4 and IPv6 addresses with their prefix length (host bits kept).
    ///
    /// Addresses the kernel generates itself (IPv6 link-local and router-advertised
    /// ones) are left out, so that a reconciler neither removes them nor fights the
    /// kernel over them.
    pub fn addresses(&mut self, index: u32) -> Result<BTreeSet<IpNet>, BackendError> {
        let op = || format!("read addresses of link {index}");
        let replies = self
            .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
            .map_err(|e| e.into_error(op()))?;
        let mut out = BTreeSet::new();
        for reply in replies {
            if let RouteNetlinkMessage::NewAddress(addr) = reply {
                if addr.header.index != index {
                    continue;
                }
                if let Some(net) = address_of(&addr) {
                    out.insert(net);
                }
            }
        }
        Ok(out)
    }

    /// Adds an address; an address already present counts as added.
    pub fn add_address(&mut self, index: u32, addr: IpNet) -> Result<(), BackendError> {
        let msg = RouteNetlinkMessage::NewAddress(address_message(index, addr));
        match self.send_write(msg, NLM_F_CREATE | NLM_F_EXCL) {
            Err(Failure::Errno(code)) if code == libc::EEXIST => Ok(()),
            other => other.map_err(|e| e.into_error(format!("add address {addr} to link {index}"))),
        }
    }

    /// Removes an address; an address already gone counts as removed.
    pub fn remove_address(&mut self, index: u32, addr: IpNet) -> Result<(), BackendError> {
        let msg = RouteNetlinkMessage::DelAddress(address_message(index, addr));
        match self.send_write(msg, 0) {
            Err(Failure::Errno(code)) if code == libc::EADDRNOTAVAIL => Ok(()),
            other => {
                other.map_err(|e| e.into_error(format!("remove address {addr} from link {index}")))
            }
        }
    }

    /// Link write requests sent so far (create, delete, MTU, up, addresses).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Sends a request that changes something and waits for its ACK.
    fn write(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: String,
    ) -> Result<(), BackendError> {
        self.send_write(msg, flags).map_err(|e| e.into_error(op))
    }

    fn send_write(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), Failure> {
        self.writes += 1;
        self.request(msg, NLM_F_ACK | flags).map(|_| ())
    }

    /// A dump, retried when the kernel flags it as interrupted by a concurrent change.
    pub(crate) fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, Failure> {
        let mut attempt = 0;
        loop {
            match self.request(msg.clone(), NLM_F_DUMP) {
                Err(Failure::Interrupted) if attempt < DUMP_ATTEMPTS => attempt += 1,
                other => return other,
            }
        }
    }

    /// Sends one request and collects its replies.
    pub(crate) fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, Failure> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut packet = NetlinkMessage::from(msg);
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = seq;
        packet.finalize();
        let mut bytes = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut bytes);
        let sent = self.socket.send(&bytes, 0).map_err(Failure::Io)?;
        if sent != bytes.len() {
            return Err(Failure::Protocol(format!(
                "sent {sent} of {} bytes",
                bytes.len()
            )));
        }
        let mut reply = Reply::default();
        loop {
            self.buf.clear();
            let received = loop {
                match self.socket.recv(&mut self.buf, 0) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if is_timeout(&e) => {
                        return Err(Failure::Protocol(
                            "no answer from the kernel within the timeout".into(),
                        ))
                    }
                    Err(e) => return Err(Failure::Io(e)),
                }
            };
            if received > self.buf.len() {
                return Err(Failure::Protocol(format!(
                    "reply of {received} bytes truncated to {}",
                    self.buf.len()
                )));
            }
            if absorb(&self.buf, seq, &mut reply)? {
                return reply.finish();
            }
        }
    }
}

/// Seconds to wait for the kernel's answer before giving up on a request.
const RECEIVE_TIMEOUT_SECS: i64 = 5;
/// Larger than any datagram the kernel sends on a dump (it uses at most 32 KiB).
const RECEIVE_BUFFER: usize = 64 * 1024;
/// How often an interrupted dump is retried.
const DUMP_ATTEMPTS: u32 = 5;

/// Why a request failed, before it is turned into a [`BackendError`] with its operation.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The kernel answered with this (positive) errno.
    Errno(i32),
    /// A dump was interrupted by a concurrent change (`NLM_F_DUMP_INTR`).
    Interrupted,
    /// The answer could not be understood.
    Protocol(String),
    /// The socket failed.
    Io(io::Error),
}

impl Failure {
    pub(crate) fn into_error(self, op: String) -> BackendError {
        match self {
            Failure::Errno(code) => BackendError::Operation {
                op,
                message: errno_text(code),
            },
            Failure::Interrupted => BackendError::Operation {
                op,
                message: "the dump kept being interrupted by concurrent changes".into(),
            },
            Failure::Protocol(message) => BackendError::Operation { op, message },
            Failure::Io(source) => BackendError::Io {
                context: op,
                source,
            },
        }
    }
}

/// Replies collected so far for one request.
#[derive(Debug, Default)]
struct Reply {
    messages: Vec<RouteNetlinkMessage>,
    interrupted: bool,
    error: Option<Failure>,
}

impl Reply {
    fn finish(self) -> Result<Vec<RouteNetlinkMessage>, Failure> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if self.interrupted {
            return Err(Failure::Interrupted);
        }
        Ok(self.messages)
    }
}

/// Reads the netlink messages of one datagram into `reply`, keeping only those of
/// sequence number `seq`. Returns true when the request is complete: its ACK or error
/// arrived, or its dump's `NLMSG_DONE`.
fn absorb(datagram: &[u8], seq: u32, reply: &mut Reply) -> Result<bool, Failure> {
    let mut offset = 0;
    while offset + NLMSG_HEADER_LEN <= datagram.len() {
        let rest = &datagram[offset..];
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HEADER_LEN || len > rest.len() {
            return Err(Failure::Protocol(format!(
                "malformed netlink message length {len} at offset {offset}"
            )));
        }
        offset += (len + 3) & !3;
        let message = &rest[..len];
        let msg_seq = u32::from_ne_bytes([message[8], message[9], message[10], message[11]]);
        if msg_seq != seq {
            continue;
        }
        let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(message);
        let parsed = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                // Keep reading to the end of the request so that nothing of it is left
                // on the socket; report the first undecodable message.
                reply
                    .error
                    .get_or_insert(Failure::Protocol(format!("undecodable reply: {e}")));
                continue;
            }
        };
        if parsed.header.flags & NLM_F_DUMP_INTR != 0 {
            reply.interrupted = true;
        }
        match parsed.payload {
            NetlinkPayload::InnerMessage(inner) => reply.messages.push(inner),
            NetlinkPayload::Error(err) => {
                if let Some(code) = err.code {
                    reply.error.get_or_insert(Failure::Errno(code.get().abs()));
                }
                return Ok(true);
            }
            NetlinkPayload::Done(done) => {
                if done.code != 0 {
                    reply.error.get_or_insert(Failure::Errno(done.code.abs()));
                }
                return Ok(true);
            }
            NetlinkPayload::Overrun(_) => {
                reply
                    .error
                    .get_or_insert(Failure::Protocol("netlink overrun".into()));
                return Ok(true);
            }
            _ => {}
        }
    }
    Ok(false)
}

const NLMSG_HEADER_LEN: usize = 16;

fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        kind: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let NlLinkInfo::Kind(kind) = i {
                        info.kind = Some(kind.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// The interface's own address in an address message: IFA_LOCAL where present (on
/// point-to-point IPv4 links IFA_ADDRESS is the peer's), else IFA_ADDRESS (IPv6 usually
/// sends that one only).
pub(crate) fn own_ip(msg: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address
}

/// The address an `RTM_NEWADDR` describes, or `None` for kernel-generated ones.
fn address_of(msg: &AddressMessage) -> Option<IpNet> {
    let ip = own_ip(msg)?;
    let protocol = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Protocol(p) => Some(*p),
        _ => None,
    });
    let kernel_made = match protocol {
        Some(AddressProtocol::LinkLocal | AddressProtocol::RouterAnnouncement) => true,
        Some(_) => false,
        // Kernels before 5.18 do not say who made the address.
        None => {
            matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
                && msg.header.scope == AddressScope::Link
        }
    };
    if kernel_made {
        return None;
    }
    IpNet::new(ip, msg.header.prefix_len).ok()
}

fn address_message(index: u32, addr: IpNet) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.index = index;
    msg.header.prefix_len = addr.prefix_len();
    msg.header.family = match addr {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    // As iproute2 does: IFA_LOCAL and IFA_ADDRESS both carry the address.
    msg.attributes.push(AddressAttribute::Local(addr.addr()));
    msg.attributes.push(AddressAttribute::Address(addr.addr()));
    msg
}

/// The C library's text for an errno, e.g. "Operation not supported (os error 95)".
fn errno_text(code: i32) -> String {
    io::Error::from_raw_os_error(code).to_string()
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Bounds how long a netlink answer is awaited (a kernel that never answers is an error,
/// not a hung agent). Shared by the rtnetlink and generic-netlink sockets.
pub(crate) fn set_receive_timeout(socket: &impl std::os::fd::AsRawFd, secs: i64) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: secs,
        tv_usec: 0,
    };
    // SAFETY: the fd is a valid socket owned by `socket`; `tv` lives across the call and
    // its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{DoneMessage, ErrorMessage, NetlinkHeader, NLM_F_MULTIPART};
    use std::num::NonZeroI32;

    fn encode(seq: u32, flags: u16, payload: NetlinkPayload<RouteNetlinkMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        header.flags = flags;
        let mut msg = NetlinkMessage::new(header, payload);
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    fn link(index: u32, mtu: u32) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        msg.attributes
            .push(LinkAttribute::LinkInfo(vec![NlLinkInfo::Kind(
                InfoKind::Tun,
            )]));
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(msg))
    }

    fn error(code: i32) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut e = ErrorMessage::default();
        e.code = NonZeroI32::new(code);
        e.header = vec![0; 16];
        NetlinkPayload::Error(e)
    }

    fn done(code: i32) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut d = DoneMessage::default();
        d.code = code;
        NetlinkPayload::Done(d)
    }

    #[test]
    fn reply_then_ack_completes_with_the_reply() {
        let mut datagram = encode(7, 0, link(3, 1420));
        datagram.extend(encode(7, 0, error(0)));
        let mut reply = Reply::default();
        assert!(absorb(&datagram, 7, &mut reply).unwrap());
        let messages = reply.finish().unwrap();
        assert_eq!(messages.len(), 1);
        let RouteNetlinkMessage::NewLink(l) = &messages[0] else {
            panic!("not a link: {messages:?}")
        };
        assert_eq!(
            link_info(l),
            LinkInfo {
                index: 3,
                mtu: 1420,
                up: true,
                kind: Some("tun".into())
            }
        );
    }

    #[test]
    fn negative_errno_becomes_a_positive_code() {
        let datagram = encode(2, 0, error(-libc::ENODEV));
        let mut reply = Reply::default();
        assert!(absorb(&datagram, 2, &mut reply).unwrap());
        assert!(matches!(reply.finish(), Err(Failure::Errno(c)) if c == libc::ENODEV));
    }

    #[test]
    fn multipart_dump_spans_datagrams_until_done() {
        let mut reply = Reply::default();
        let mut first = encode(5, NLM_F_MULTIPART, link(1, 1500));
        first.extend(encode(5, NLM_F_MULTIPART, link(2, 1400)));
        assert!(!absorb(&first, 5, &mut reply).unwrap());
        let mut second = encode(5, NLM_F_MULTIPART, link(3, 1300));
        second.extend(encode(5, NLM_F_MULTIPART, done(0)));
        assert!(absorb(&second, 5, &mut reply).unwrap());
        assert_eq!(reply.finish().unwrap().len(), 3);
    }

    #[test]
    fn stale_replies_of_other_requests_are_skipped() {
        let mut datagram = encode(4, 0, link(9, 9000));
        datagram.extend(encode(4, 0, error(-libc::EINVAL)));
        let mut reply = Reply::default();
        assert!(!absorb(&datagram, 5, &mut reply).unwrap());
        assert!(reply.finish().unwrap().is_empty());
    }

    #[test]
    fn interrupted_dump_is_reported_for_a_retry() {
        let mut datagram = encode(6, NLM_F_MULTIPART | NLM_F_DUMP_INTR, link(1, 1500));
        datagram.extend(encode(6, NLM_F_MULTIPART, done(0)));
        let mut reply = Reply::default();
        assert!(absorb(&datagram, 6, &mut reply).unwrap());
        assert!(matches!(reply.finish(), Err(Failure::Interrupted)));
    }

    #[test]
    fn dump_that_fails_in_done_is_an_error() {
        let datagram = encode(8, NLM_F_MULTIPART, done(-libc::EPERM));
        let mut reply = Reply::default();
        assert!(absorb(&datagram, 8, &mut reply).unwrap());
        assert!(matches!(reply.finish(), Err(Failure::Errno(c)) if c == libc::EPERM));
    }

    #[test]
    fn truncated_message_is_a_protocol_error_not_a_panic() {
        let mut datagram = encode(1, 0, link(1, 1500));
        datagram.truncate(datagram.len() - 4);
        let mut reply = Reply::default();
        assert!(matches!(
            absorb(&datagram, 1, &mut reply),
            Err(Failure::Protocol(_))
        ));
    }

    #[test]
    fn the_own_address_is_ifa_local_in_either_order_else_ifa_address() {
        let (local, peer) = ("10.1.2.3".parse().unwrap(), "10.9.9.9".parse().unwrap());
        let mut msg = AddressMessage::default();
        msg.attributes = vec![
            AddressAttribute::Address(peer),
            AddressAttribute::Local(local),
        ];
        assert_eq!(own_ip(&msg), Some(local));
        msg.attributes.reverse();
        assert_eq!(own_ip(&msg), Some(local));
        msg.attributes
            .retain(|a| matches!(a, AddressAttribute::Address(_)));
        assert_eq!(own_ip(&msg), Some(peer));
        msg.attributes.clear();
        assert_eq!(own_ip(&msg), None);
    }

    #[test]
    fn addresses_keep_host_bits_and_skip_kernel_link_local() {
        let mut v4 = address_message(3, "10.1.2.3/24".parse().unwrap());
        v4.attributes
            .retain(|a| matches!(a, AddressAttribute::Local(_)));
        assert_eq!(address_of(&v4), Some("10.1.2.3/24".parse().unwrap()));

        let mut ptp = address_message(3, "10.1.2.3/32".parse().unwrap());
        ptp.attributes = vec![
            AddressAttribute::Address("10.9.9.9".parse().unwrap()),
            AddressAttribute::Local("10.1.2.3".parse().unwrap()),
        ];
        assert_eq!(address_of(&ptp), Some("10.1.2.3/32".parse().unwrap()));

        let v6 = address_message(3, "fd00::1/64".parse().unwrap());
        assert_eq!(address_of(&v6), Some("fd00::1/64".parse().unwrap()));

        let mut ll = address_message(3, "fe80::1/64".parse().unwrap());
        ll.header.scope = AddressScope::Link;
        assert_eq!(address_of(&ll), None, "link-local without protocol");
        ll.attributes
            .push(AddressAttribute::Protocol(AddressProtocol::LinkLocal));
        assert_eq!(address_of(&ll), None, "kernel link-local");
        ll.attributes.pop();
        ll.attributes
            .push(AddressAttribute::Protocol(AddressProtocol::Other(4)));
        assert_eq!(
            address_of(&ll),
            Some("fe80::1/64".parse().unwrap()),
            "a link-local address someone configured"
        );
    }

    #[test]
    fn interface_names_are_checked_like_the_kernel_does() {
        for good in ["wg0", "gh-abc-123", "a", "fifteen-chars-x"] {
            assert!(check_interface_name(good).is_ok(), "{good}");
        }
        for bad in ["", "sixteen-chars-xx", "a/b", "a b", ".", "..", "wg0:1"] {
            assert!(
                matches!(check_interface_name(bad), Err(BackendError::Config(_))),
                "{bad:?}"
            );
        }
    }
}
