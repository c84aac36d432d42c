//! Packs the plan's device and peer operations into as few `WG_CMD_SET_DEVICE` messages as
//! possible, writing the attributes straight into one reused message buffer. Pure:
//! operations in, whole netlink messages out (each handed to a sink as soon as it is full,
//! so the caller sends it before the next one is built); the socket code only fills in
//! the family and sequence number and sends.
//!
//! Rules (from the kernel's `uapi/linux/wireguard.h`):
//! - a configuration larger than one message is split across several, each one adding to
//!   the previous; `WGDEVICE_F_REPLACE_PEERS` is never used (applying is always a diff);
//! - a peer whose allowed IPs do not fit continues in the next message with only its public
//!   key and the remaining allowed IPs; `WGPEER_F_REPLACE_ALLOWEDIPS` appears only in its
//!   first piece, and only when its allowed IPs are new or changed;
//! - updates carry `WGPEER_F_UPDATE_ONLY` (an update never creates a peer) and only the
//!   attributes that changed; removals carry `WGPEER_F_REMOVE_ME`; a preshared key of 32
//!   zero bytes removes the preshared key.
//!
//! The bytes are those netlink-packet-wireguard emits for the same attributes (nests
//! flagged `NLA_F_NESTED`, peer and allowed-IP entries of type 0, lengths without the
//! trailing padding); a property test holds the two encoders to the same bytes.
//!
//! Size limit: see [`MESSAGE_LIMIT`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use netlink_packet_core::{NLA_F_NESTED, NLA_HEADER_SIZE};
use netlink_packet_wireguard::{WireguardAttribute, WireguardPeerAttribute};
use zeroize::Zeroize;

use crate::backend::kick::{kick_keepalive, recreated_peer, Kick};
use crate::model::PeerSpec;
use crate::plan::{DeviceChange, Op, PeerUpdate};

/// The largest `WG_CMD_SET_DEVICE` message we send, in bytes (netlink and generic netlink
/// headers included).
///
/// The hard ceiling is the 16-bit length of the nested `WGDEVICE_A_PEERS` attribute
/// (65,535 bytes: a larger nest cannot even be encoded, see [`MAX_MESSAGE_LIMIT`]); the
/// kernel also refuses messages larger than the socket's send buffer (`wmem_default`,
/// 212,992 bytes on stock kernels, but operators lower it). 32 KiB is half the ceiling,
/// far below any send buffer, holds about 400 single-address peers (10,000 peers in 25
/// messages: the per-message cost is one syscall and one ACK, small beside the kernel's
/// per-peer work) and bounds how long one message holds the device's configuration lock.
pub const MESSAGE_LIMIT: usize = 32 * 1024;

/// The smallest limit [`pack`] accepts (smaller values are raised to it): room for the
/// headers, every device attribute and one peer with every attribute and one IPv6 address.
pub const MIN_MESSAGE_LIMIT: usize = 512;

/// The largest limit [`pack`] accepts (larger values are lowered to it): the peers nest's
/// 16-bit length must hold everything after the headers and the interface name.
pub const MAX_MESSAGE_LIMIT: usize = u16::MAX as usize;

/// Netlink header (16 bytes) and generic netlink header (4 bytes).
pub const HEADERS_LEN: usize = 16 + 4;

/// `WG_CMD_SET_DEVICE`.
const WG_CMD_SET_DEVICE: u8 = 1;
/// `WG_GENL_VERSION`.
pub const WG_GENL_VERSION: u8 = 1;

// Attribute types of `uapi/linux/wireguard.h`.
const WGDEVICE_A_IFNAME: u16 = 2;
const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
const WGDEVICE_A_LISTEN_PORT: u16 = 6;
const WGDEVICE_A_FWMARK: u16 = 7;
const WGDEVICE_A_PEERS: u16 = 8;
const WGPEER_A_PUBLIC_KEY: u16 = 1;
const WGPEER_A_PRESHARED_KEY: u16 = 2;
const WGPEER_A_FLAGS: u16 = 3;
const WGPEER_A_ENDPOINT: u16 = 4;
const WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL: u16 = 5;
const WGPEER_A_ALLOWEDIPS: u16 = 9;
const WGALLOWEDIP_A_FAMILY: u16 = 1;
const WGALLOWEDIP_A_IPADDR: u16 = 2;
const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;
const WGPEER_F_REMOVE_ME: u32 = 1;
const WGPEER_F_REPLACE_ALLOWEDIPS: u32 = 2;
const WGPEER_F_UPDATE_ONLY: u32 = 4;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// A preshared key of zeros: "no preshared key".
const NO_KEY: [u8; 32] = [0; 32];

/// One whole `WG_CMD_SET_DEVICE` request: netlink header (its type, flags and sequence
/// number left for the socket to fill in), generic netlink header, attributes. The bytes
/// may hold secrets (a private or preshared key): those are zeroed once sent and on drop,
/// and never shown by `Debug`. Messages without a secret are not zeroed (zeroing is
/// byte by byte: a cold apply of 100,000 peers writes 8 MB).
#[derive(Clone)]
pub struct SetDevice {
    /// Its spare capacity never holds a secret: written bytes are zeroed before the
    /// buffer is truncated, so only `len` bytes need zeroing on drop.
    bytes: Vec<u8>,
    listen_port: Option<u16>,
    peers: usize,
    /// Whether the bytes hold a private or preshared key.
    secret: bool,
}

impl SetDevice {
    /// The whole message.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The whole message, for the socket to fill in the header's type, flags and
    /// sequence number.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// The encoded size of the whole request, headers included.
    pub fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    /// How many peer entries (whole peers and pieces of peers) this request holds.
    pub fn peer_entries(&self) -> usize {
        self.peers
    }

    /// The listen port this request sets, if any (to name it when the port is taken).
    pub fn listen_port(&self) -> Option<u16> {
        self.listen_port
    }
}

impl fmt::Debug for SetDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetDevice")
            .field("peers", &self.peers)
            .field("bytes", &self.encoded_len())
            .finish_non_exhaustive()
    }
}

impl Drop for SetDevice {
    fn drop(&mut self) {
        if self.secret {
            self.bytes.as_mut_slice().zeroize();
        }
    }
}

/// Zeroes the private and preshared keys inside WireGuard attributes (of a dump).
pub fn zeroize_attributes(attributes: &mut [WireguardAttribute]) {
    for attr in attributes {
        match attr {
            WireguardAttribute::PrivateKey(k) => k.zeroize(),
            WireguardAttribute::Peers(peers) => {
                for peer in peers {
                    for pa in &mut peer.0 {
                        if let WireguardPeerAttribute::PresharedKey(k) = pa {
                            k.zeroize();
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Turns the device and peer operations of `ops` (link operations are skipped) into
/// `WG_CMD_SET_DEVICE` requests for `interface`, in order, each at most `limit` bytes.
pub fn pack<'a>(
    interface: &str,
    ops: impl IntoIterator<Item = &'a Op>,
    limit: usize,
) -> Vec<SetDevice> {
    let mut out = Vec::new();
    pack_each(&mut Vec::new(), interface, ops, limit, |m| {
        out.push(m.clone())
    });
    out
}

/// [`pack`], building the requests in `buffer` and handing each to `sink` as soon as it is
/// complete (the buffer is reused once `sink` returns, zeroed first if it held a key).
/// `buffer` comes back empty, holding no secret, its capacity kept: a caller that packs
/// often allocates it once (a first large allocation after many small frees makes glibc's
/// malloc consolidate them, work in proportion to the frees, inside the apply).
pub fn pack_each<'a>(
    buffer: &mut Vec<u8>,
    interface: &str,
    ops: impl IntoIterator<Item = &'a Op>,
    limit: usize,
    sink: impl FnMut(&mut SetDevice),
) {
    let mut packer = Packer::new(buffer, interface, limit, sink);
    for op in ops {
        match op {
            Op::ConfigureDevice(change) => packer.device(change),
            Op::AddPeer(spec) => packer.peer(&add_peer(spec), spec.allowed_ips.iter().as_slice()),
            Op::UpdatePeer(update) => {
                let ips = update.allowed_ips.as_ref().map(|ips| ips.iter().as_slice());
                packer.peer(&update_peer(update), ips.unwrap_or_default());
            }
            Op::RemovePeer(key) => packer.peer(&Head::new(&key.0, WGPEER_F_REMOVE_ME), &[]),
            Op::CreateLink
            | Op::SetMtu(_)
            | Op::SetLinkUp
            | Op::AddAddress(_)
            | Op::RemoveAddress(_) => {}
        }
    }
    *buffer = packer.finish();
}

/// Turns takeover kicks into `WG_CMD_SET_DEVICE` requests for `interface`, in order, each
/// at most `limit` bytes. Per kick, in this order (the kernel's `set_peer` sends a
/// keepalive when the persistent keepalive goes from 0 to nonzero, and a keepalive with
/// no valid session starts a handshake):
/// - re-creation: `WGPEER_F_REMOVE_ME`, then the whole peer at the kick's endpoint with
///   the keepalive of [`kick_keepalive`] (a new peer's interval is 0: this sends);
/// - otherwise (`WGPEER_F_UPDATE_ONLY`, so an absent peer is skipped): the endpoint with
///   the keepalive 0, then the keepalive of [`kick_keepalive`];
/// - then, when the desired keepalive is 0, the keepalive 0 again.
///
/// A re-creation creates the peer even if it is absent: the caller leaves out the kicks
/// of absent peers.
pub fn pack_kicks<'a>(
    interface: &str,
    kicks: impl IntoIterator<Item = &'a Kick>,
    limit: usize,
) -> Vec<SetDevice> {
    let mut out = Vec::new();
    pack_kicks_each(&mut Vec::new(), interface, kicks, limit, |m| {
        out.push(m.clone())
    });
    out
}

/// [`pack_kicks`], building the requests in `buffer` as [`pack_each`] does.
pub fn pack_kicks_each<'a>(
    buffer: &mut Vec<u8>,
    interface: &str,
    kicks: impl IntoIterator<Item = &'a Kick>,
    limit: usize,
    sink: impl FnMut(&mut SetDevice),
) {
    let mut packer = Packer::new(buffer, interface, limit, sink);
    for kick in kicks {
        let key = &kick.peer.public_key.0;
        let keepalive = |value: u16, endpoint: Option<SocketAddr>| {
            let mut head = Head::new(key, WGPEER_F_UPDATE_ONLY);
            if let Some(endpoint) = endpoint {
                head.push(Attr::Endpoint(endpoint));
            }
            head.push(Attr::Keepalive(value));
            head
        };
        if kick.recreate {
            packer.peer(&Head::new(key, WGPEER_F_REMOVE_ME), &[]);
            let spec = recreated_peer(kick);
            packer.peer(&add_peer(&spec), spec.allowed_ips.iter().as_slice());
        } else {
            packer.peer(&keepalive(0, Some(kick.endpoint)), &[]);
            packer.peer(
                &keepalive(kick_keepalive(kick.peer.persistent_keepalive), None),
                &[],
            );
        }
        if kick.peer.persistent_keepalive == 0 {
            packer.peer(&keepalive(0, None), &[]);
        }
    }
    *buffer = packer.finish();
}

/// One attribute of a peer entry (keys borrowed: no copy of a secret to zero).
#[derive(Clone, Copy)]
enum Attr<'a> {
    PublicKey(&'a [u8; 32]),
    Flags(u32),
    PresharedKey(&'a [u8; 32]),
    Keepalive(u16),
    Endpoint(SocketAddr),
}

impl Attr<'_> {
    /// Encoded size, header and padding included.
    fn len(&self) -> usize {
        attr_len(match self {
            Attr::PublicKey(_) | Attr::PresharedKey(_) => 32,
            Attr::Flags(_) => 4,
            Attr::Keepalive(_) => 2,
            Attr::Endpoint(SocketAddr::V4(_)) => 16,
            Attr::Endpoint(SocketAddr::V6(_)) => 28,
        })
    }

    fn write(&self, buf: &mut Vec<u8>) {
        match self {
            Attr::PublicKey(k) => put(buf, WGPEER_A_PUBLIC_KEY, &k[..]),
            Attr::Flags(f) => put(buf, WGPEER_A_FLAGS, &f.to_ne_bytes()),
            Attr::PresharedKey(k) => put(buf, WGPEER_A_PRESHARED_KEY, &k[..]),
            Attr::Keepalive(k) => put(
                buf,
                WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
                &k.to_ne_bytes(),
            ),
            // `struct sockaddr_in` / `sockaddr_in6`: the port in network order.
            Attr::Endpoint(SocketAddr::V4(a)) => {
                let mut v = [0u8; 16];
                v[..2].copy_from_slice(&AF_INET.to_ne_bytes());
                v[2..4].copy_from_slice(&a.port().to_be_bytes());
                v[4..8].copy_from_slice(&a.ip().octets());
                put(buf, WGPEER_A_ENDPOINT, &v);
            }
            Attr::Endpoint(SocketAddr::V6(a)) => {
                let mut v = [0u8; 28];
                v[..2].copy_from_slice(&AF_INET6.to_ne_bytes());
                v[2..4].copy_from_slice(&a.port().to_be_bytes());
                v[4..8].copy_from_slice(&a.flowinfo().to_ne_bytes());
                v[8..24].copy_from_slice(&a.ip().octets());
                v[24..].copy_from_slice(&a.scope_id().to_ne_bytes());
                put(buf, WGPEER_A_ENDPOINT, &v);
            }
        }
    }
}

/// The attributes of a peer entry's first piece, in the order they are written: the
/// public key, the flags, then at most three more.
struct Head<'a> {
    key: &'a [u8; 32],
    attrs: [Attr<'a>; 5],
    len: usize,
}

impl<'a> Head<'a> {
    fn new(key: &'a [u8; 32], flags: u32) -> Self {
        Head {
            key,
            attrs: [Attr::Flags(flags); 5],
            len: 0,
        }
        .with(Attr::PublicKey(key))
        .with(Attr::Flags(flags))
    }

    fn with(mut self, attr: Attr<'a>) -> Self {
        self.push(attr);
        self
    }

    fn push(&mut self, attr: Attr<'a>) {
        self.attrs[self.len] = attr;
        self.len += 1;
    }

    fn attrs(&self) -> &[Attr<'a>] {
        &self.attrs[..self.len]
    }

    fn key(&self) -> &'a [u8; 32] {
        self.key
    }

    /// Encoded size of the attributes.
    fn attrs_len(&self) -> usize {
        self.attrs().iter().map(Attr::len).sum()
    }
}

fn add_peer(spec: &PeerSpec) -> Head<'_> {
    // The peer is new: whatever allowed IPs a same-keyed peer may have are replaced.
    let mut head = Head::new(&spec.public_key.0, WGPEER_F_REPLACE_ALLOWEDIPS);
    if let Some(psk) = &spec.preshared_key {
        head.push(Attr::PresharedKey(psk.expose()));
    }
    if spec.persistent_keepalive != 0 {
        head.push(Attr::Keepalive(spec.persistent_keepalive));
    }
    if let Some(endpoint) = spec.endpoint {
        head.push(Attr::Endpoint(endpoint));
    }
    head
}

fn update_peer(update: &PeerUpdate) -> Head<'_> {
    let mut flags = WGPEER_F_UPDATE_ONLY;
    if update.allowed_ips.is_some() {
        flags |= WGPEER_F_REPLACE_ALLOWEDIPS;
    }
    let mut head = Head::new(&update.public_key.0, flags);
    if let Some(psk) = &update.preshared_key {
        head.push(Attr::PresharedKey(match psk {
            Some(k) => k.expose(),
            None => &NO_KEY,
        }));
    }
    if let Some(keepalive) = update.persistent_keepalive {
        head.push(Attr::Keepalive(keepalive));
    }
    if let Some(endpoint) = update.endpoint {
        head.push(Attr::Endpoint(endpoint));
    }
    head
}

/// Size of an attribute with a value of `value` bytes: header, value, padding.
fn attr_len(value: usize) -> usize {
    NLA_HEADER_SIZE + value.next_multiple_of(4)
}

/// Size of one allowed-IP entry: its nest, the family, the address, the prefix length.
fn allowed_ip_len(net: &IpNet) -> usize {
    let addr = match net {
        IpNet::V4(_) => 4,
        IpNet::V6(_) => 16,
    };
    NLA_HEADER_SIZE + attr_len(2) + attr_len(addr) + attr_len(1)
}

/// Appends one attribute: length (without the padding), type, value, zero padding.
fn put(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = NLA_HEADER_SIZE + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Opens a nest of type `kind` (flagged nested); [`end_nest`] writes its length.
fn begin_nest(buf: &mut Vec<u8>, kind: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    at
}

fn end_nest(buf: &mut [u8], at: usize) {
    // The limit (at most MAX_MESSAGE_LIMIT) keeps every nest within 16 bits.
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

fn write_allowed_ip(buf: &mut Vec<u8>, net: &IpNet) {
    let entry = begin_nest(buf, 0);
    match net.network() {
        IpAddr::V4(a) => {
            put(buf, WGALLOWEDIP_A_FAMILY, &AF_INET.to_ne_bytes());
            put(buf, WGALLOWEDIP_A_IPADDR, &a.octets());
        }
        IpAddr::V6(a) => {
            put(buf, WGALLOWEDIP_A_FAMILY, &AF_INET6.to_ne_bytes());
            put(buf, WGALLOWEDIP_A_IPADDR, &a.octets());
        }
    }
    put(buf, WGALLOWEDIP_A_CIDR_MASK, &[net.prefix_len()]);
    end_nest(buf, entry);
}

/// Builds messages in one buffer and hands each to the sink when it is full.
struct Packer<F: FnMut(&mut SetDevice)> {
    limit: usize,
    /// Headers and the interface name: what every message starts with.
    base: usize,
    message: SetDevice,
    /// Where the peers nest of the message being built starts, once it has peers.
    peers_nest: Option<usize>,
    sink: F,
}

impl<F: FnMut(&mut SetDevice)> Packer<F> {
    fn new(buffer: &mut Vec<u8>, interface: &str, limit: usize, sink: F) -> Self {
        let limit = limit.clamp(MIN_MESSAGE_LIMIT, MAX_MESSAGE_LIMIT);
        let mut bytes = std::mem::take(buffer);
        bytes.clear();
        // Never grown while packing: a reallocation would leave a copy of a key behind.
        bytes.reserve(limit);
        bytes.resize(HEADERS_LEN, 0);
        bytes[16] = WG_CMD_SET_DEVICE;
        bytes[17] = WG_GENL_VERSION;
        let mut name = Vec::with_capacity(interface.len() + 1);
        name.extend_from_slice(interface.as_bytes());
        name.push(0);
        put(&mut bytes, WGDEVICE_A_IFNAME, &name);
        Packer {
            limit,
            base: bytes.len(),
            message: SetDevice {
                bytes,
                listen_port: None,
                peers: 0,
                secret: false,
            },
            peers_nest: None,
            sink,
        }
    }

    fn size(&self) -> usize {
        self.message.bytes.len()
    }

    /// Bytes still free in the message being built for one more peer entry.
    fn room(&self) -> usize {
        let nest = if self.peers_nest.is_none() {
            NLA_HEADER_SIZE
        } else {
            0
        };
        self.limit.saturating_sub(self.size() + nest)
    }

    fn device(&mut self, change: &DeviceChange) {
        let len = change.private_key.as_ref().map_or(0, |_| attr_len(32))
            + change.listen_port.map_or(0, |_| attr_len(2))
            + change.fwmark.map_or(0, |_| attr_len(4));
        if self.size() + len > self.limit || self.peers_nest.is_some() {
            // Device settings go before the peers of a message; a later change starts one.
            self.flush();
        }
        let buf = &mut self.message.bytes;
        if let Some(key) = &change.private_key {
            put(buf, WGDEVICE_A_PRIVATE_KEY, key.expose());
            self.message.secret = true;
        }
        if let Some(port) = change.listen_port {
            put(buf, WGDEVICE_A_LISTEN_PORT, &port.to_ne_bytes());
            self.message.listen_port = Some(port);
        }
        if let Some(mark) = change.fwmark {
            put(buf, WGDEVICE_A_FWMARK, &mark.to_ne_bytes());
        }
    }

    /// Writes one peer: `head` and as many of `ips` as fit, then continuation pieces (the
    /// key and `WGPEER_F_UPDATE_ONLY`) with the rest, in as many messages as it takes.
    fn peer(&mut self, head: &Head<'_>, ips: &[IpNet]) {
        let continuation = Head::new(head.key(), WGPEER_F_UPDATE_ONLY);
        let mut rest = ips;
        let mut head = head;
        loop {
            let room = self.room();
            let head_len = NLA_HEADER_SIZE
                + head.attrs_len()
                + if rest.is_empty() { 0 } else { NLA_HEADER_SIZE };
            let mut used = head_len;
            let mut fit = 0;
            if used <= room {
                for ip in rest {
                    let len = allowed_ip_len(ip);
                    if used + len > room {
                        break;
                    }
                    used += len;
                    fit += 1;
                }
            }
            if head_len <= room && fit == rest.len() {
                self.push(head, rest);
                return;
            }
            if fit == 0 && self.peers_nest.is_some() {
                // Not even one address fits beside the others: start a new message.
                self.flush();
                continue;
            }
            // Split here: as many addresses as fit (at least one, so that a limit too small
            // for anything still makes progress; MIN_MESSAGE_LIMIT prevents that case).
            let take = fit.max(1).min(rest.len());
            self.push(head, &rest[..take]);
            rest = &rest[take..];
            head = &continuation;
            self.flush();
            if rest.is_empty() {
                return;
            }
        }
    }

    fn push(&mut self, head: &Head<'_>, ips: &[IpNet]) {
        let buf = &mut self.message.bytes;
        if self.peers_nest.is_none() {
            self.peers_nest = Some(begin_nest(buf, WGDEVICE_A_PEERS));
        }
        let entry = begin_nest(buf, 0);
        for attr in head.attrs() {
            attr.write(buf);
            self.message.secret |= matches!(attr, Attr::PresharedKey(_));
        }
        if !ips.is_empty() {
            let list = begin_nest(buf, WGPEER_A_ALLOWEDIPS);
            for ip in ips {
                write_allowed_ip(buf, ip);
            }
            end_nest(buf, list);
        }
        end_nest(buf, entry);
        self.message.peers += 1;
    }

    /// Hands the message being built to the sink (if it says anything) and starts the
    /// next one in the same, zeroed, buffer.
    fn flush(&mut self) {
        if self.peers_nest.is_none() && self.size() == self.base {
            return;
        }
        let buf = &mut self.message.bytes;
        if let Some(at) = self.peers_nest.take() {
            end_nest(buf, at);
        }
        let len = buf.len() as u32;
        buf[..4].copy_from_slice(&len.to_ne_bytes());
        (self.sink)(&mut self.message);
        let base = self.base;
        let buf = &mut self.message.bytes;
        if self.message.secret {
            buf[base..].zeroize();
        }
        buf.truncate(base);
        buf[..16].fill(0);
        self.message.listen_port = None;
        self.message.peers = 0;
        self.message.secret = false;
    }

    /// Hands over the last message; gives the buffer back, empty.
    fn finish(mut self) -> Vec<u8> {
        self.flush();
        let mut bytes = std::mem::take(&mut self.message.bytes);
        bytes.clear();
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Key, SecretKey};
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
    use netlink_packet_generic::GenlMessage;
    use netlink_packet_wireguard::{
        WireguardAllowedIpAttr, WireguardMessage, WireguardPeer, WireguardPeerFlags,
    };
    use std::collections::BTreeSet;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn key(n: u32) -> Key {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&n.to_be_bytes());
        k[31] = 1;
        Key(k)
    }

    fn v4(n: u32, len: u8) -> IpNet {
        IpNet::new(Ipv4Addr::from(0x0a00_0000 + n).into(), len)
            .unwrap()
            .trunc()
    }

    fn peer(n: u32) -> PeerSpec {
        PeerSpec::new(key(n), [v4(n, 32)])
    }

    /// Serializes, measures and parses back every message, as the kernel would see it.
    fn wire(messages: &[SetDevice]) -> Vec<WireguardMessage> {
        messages
            .iter()
            .map(|m| {
                let bytes = m.bytes();
                let parsed =
                    NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(bytes).unwrap();
                assert_eq!(parsed.header.length as usize, bytes.len());
                match parsed.payload {
                    NetlinkPayload::InnerMessage(g) => g.payload,
                    other => panic!("unexpected payload {other:?}"),
                }
            })
            .collect()
    }

    fn peers_of(m: &WireguardMessage) -> Vec<WireguardPeer> {
        m.attributes
            .iter()
            .find_map(|a| match a {
                WireguardAttribute::Peers(p) => Some(p.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    fn flags(p: &WireguardPeer) -> Option<WireguardPeerFlags> {
        p.iter().find_map(|a| match a {
            WireguardPeerAttribute::Flags(f) => Some(*f),
            _ => None,
        })
    }

    fn ips(p: &WireguardPeer) -> Vec<IpNet> {
        p.iter()
            .filter_map(|a| match a {
                WireguardPeerAttribute::AllowedIps(ips) => Some(ips),
                _ => None,
            })
            .flatten()
            .map(|ip| {
                let mut addr = None;
                let mut cidr = None;
                for a in ip.iter() {
                    match a {
                        WireguardAllowedIpAttr::IpAddr(x) => addr = Some(*x),
                        WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
                        _ => {}
                    }
                }
                IpNet::new(addr.unwrap(), cidr.unwrap()).unwrap()
            })
            .collect()
    }

    #[test]
    fn device_settings_after_peers_go_in_their_own_last_message() {
        // The plan puts device settings last; a refused listen port then fails only the
        // last message, after every peer change went through.
        let ops = vec![
            Op::RemovePeer(key(9)),
            Op::AddPeer(std::sync::Arc::new(peer(1))),
            Op::ConfigureDevice(Box::new(DeviceChange {
                listen_port: Some(51820),
                ..Default::default()
            })),
        ];
        let msgs = wire(&pack("wg0", &ops, MESSAGE_LIMIT));
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert_eq!(peers_of(&msgs[0]).len(), 2);
        assert!(!msgs[0]
            .attributes
            .iter()
            .any(|a| matches!(a, WireguardAttribute::ListenPort(_))));
        assert!(peers_of(&msgs[1]).is_empty());
        assert!(msgs[1]
            .attributes
            .iter()
            .any(|a| matches!(a, WireguardAttribute::ListenPort(51820))));
    }

    #[test]
    fn ten_thousand_peers_go_out_in_few_full_messages() {
        let ops: Vec<Op> = (0..10_000)
            .map(|n| Op::AddPeer(std::sync::Arc::new(peer(n))))
            .collect();
        let messages = pack("wg0", &ops, MESSAGE_LIMIT);
        let parsed = wire(&messages);
        // One single-address IPv4 peer: 4 (nest) + 36 (key) + 8 (flags) + 4 (nest) + 28.
        let per_peer = 80;
        let per_message = (MESSAGE_LIMIT - HEADERS_LEN - 12 - 4) / per_peer;
        assert_eq!(messages.len(), 10_000usize.div_ceil(per_message));
        assert!(messages.len() <= 25, "{} messages", messages.len());
        for m in &messages {
            assert!(m.encoded_len() <= MESSAGE_LIMIT, "{m:?}");
        }
        for m in &messages[..messages.len() - 1] {
            assert!(
                m.encoded_len() > MESSAGE_LIMIT - per_peer,
                "not full: {m:?}"
            );
        }
        let keys: Vec<Key> = parsed
            .iter()
            .flat_map(peers_of)
            .map(|p| match &p[0] {
                WireguardPeerAttribute::PublicKey(k) => Key(*k),
                other => panic!("first attribute {other:?}"),
            })
            .collect();
        assert_eq!(keys, (0..10_000).map(key).collect::<Vec<_>>());
        for p in parsed.iter().flat_map(peers_of) {
            assert_eq!(flags(&p), Some(WireguardPeerFlags::ReplaceAllowedIps));
            assert_eq!(ips(&p).len(), 1);
        }
        for m in &parsed {
            assert!(!m
                .attributes
                .iter()
                .any(|a| matches!(a, WireguardAttribute::Flags(_))));
        }
    }

    #[test]
    fn a_huge_allowed_ip_list_is_split_with_the_replace_flag_only_first() {
        let big: BTreeSet<IpNet> = (0..4_000)
            .map(|n| v4(n << 8, 24))
            .chain((0..1_000u128).map(|n| {
                IpNet::new(Ipv6Addr::from((0xfd00u128 << 112) | (n << 64)).into(), 64).unwrap()
            }))
            .collect();
        assert_eq!(big.len(), 5_000);
        let mut spec = PeerSpec::new(key(1), big.iter().copied());
        spec.preshared_key = Some(SecretKey::new([3; 32]));
        spec.persistent_keepalive = 25;
        let ops = vec![
            Op::AddPeer(std::sync::Arc::new(peer(100))),
            Op::AddPeer(std::sync::Arc::new(spec)),
            Op::AddPeer(std::sync::Arc::new(peer(101))),
        ];
        let messages = pack("wg0", &ops, MESSAGE_LIMIT);
        let parsed = wire(&messages);
        for m in &messages {
            assert!(m.encoded_len() <= MESSAGE_LIMIT, "{m:?}");
        }
        // 4,000 * 28 + 1,000 * 40 bytes of addresses: 5 messages of 32 KiB.
        assert_eq!(messages.len(), 5);
        let pieces: Vec<WireguardPeer> = parsed
            .iter()
            .flat_map(peers_of)
            .filter(|p| p[0] == WireguardPeerAttribute::PublicKey(key(1).0))
            .collect();
        assert_eq!(pieces.len(), 5);
        assert_eq!(
            flags(&pieces[0]),
            Some(WireguardPeerFlags::ReplaceAllowedIps)
        );
        assert!(pieces[0]
            .iter()
            .any(|a| matches!(a, WireguardPeerAttribute::PresharedKey(_))));
        for p in &pieces[1..] {
            assert_eq!(flags(p), Some(WireguardPeerFlags::UpdateOnly));
            assert_eq!(
                p.len(),
                3,
                "continuation: key, flags, allowed IPs only: {p:?}"
            );
        }
        let sent: Vec<IpNet> = pieces.iter().flat_map(ips).collect();
        assert_eq!(sent, big.iter().copied().collect::<Vec<_>>());
        // The peer after the big one shares the last message.
        assert_eq!(peers_of(parsed.last().unwrap()).len(), 2);
    }

    #[test]
    fn an_update_carries_only_what_changed() {
        let only_keepalive = PeerUpdate {
            public_key: key(9),
            preshared_key: None,
            persistent_keepalive: Some(25),
            allowed_ips: None,
            endpoint: None,
        };
        let parsed = wire(&pack(
            "wg0",
            &[Op::UpdatePeer(Box::new(only_keepalive))],
            MESSAGE_LIMIT,
        ));
        assert_eq!(parsed.len(), 1);
        assert_eq!(
            peers_of(&parsed[0]),
            vec![WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(key(9).0),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::UpdateOnly),
                WireguardPeerAttribute::PersistentKeepalive(25),
            ])]
        );

        let psk_removed_ips_changed = PeerUpdate {
            public_key: key(9),
            preshared_key: Some(None),
            persistent_keepalive: None,
            allowed_ips: Some([v4(5, 32)].into()),
            endpoint: Some("[2001:db8::1]:51820".parse().unwrap()),
        };
        let parsed = wire(&pack(
            "wg0",
            &[Op::UpdatePeer(Box::new(psk_removed_ips_changed))],
            MESSAGE_LIMIT,
        ));
        let p = &peers_of(&parsed[0])[0];
        assert_eq!(
            flags(p),
            Some(WireguardPeerFlags::UpdateOnly | WireguardPeerFlags::ReplaceAllowedIps)
        );
        assert!(p.contains(&WireguardPeerAttribute::PresharedKey([0; 32])));
        assert!(p.contains(&WireguardPeerAttribute::Endpoint(
            "[2001:db8::1]:51820".parse().unwrap()
        )));
        assert!(!p
            .iter()
            .any(|a| matches!(a, WireguardPeerAttribute::PersistentKeepalive(_))));
        assert_eq!(ips(p), vec![v4(5, 32)]);

        let all_ips_removed = PeerUpdate {
            allowed_ips: Some(crate::model::AllowedIps::new()),
            ..PeerUpdate {
                public_key: key(9),
                preshared_key: None,
                persistent_keepalive: None,
                allowed_ips: None,
                endpoint: None,
            }
        };
        let parsed = wire(&pack(
            "wg0",
            &[Op::UpdatePeer(Box::new(all_ips_removed))],
            MESSAGE_LIMIT,
        ));
        let p = &peers_of(&parsed[0])[0];
        assert_eq!(
            flags(p),
            Some(WireguardPeerFlags::UpdateOnly | WireguardPeerFlags::ReplaceAllowedIps)
        );
        assert!(ips(p).is_empty());
    }

    #[test]
    fn device_settings_lead_the_first_message_and_removals_are_flagged() {
        let ops = vec![
            Op::CreateLink,
            Op::SetLinkUp,
            Op::ConfigureDevice(Box::new(DeviceChange {
                private_key: Some(SecretKey::new([4; 32])),
                listen_port: Some(51820),
                fwmark: Some(0),
            })),
            Op::RemovePeer(key(2)),
            Op::AddPeer(std::sync::Arc::new(peer(3))),
        ];
        let messages = pack("wg7", &ops, MESSAGE_LIMIT);
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].listen_port(), Some(51820));
        let parsed = wire(&messages);
        let a = &parsed[0].attributes;
        assert_eq!(a[0], WireguardAttribute::IfName("wg7".into()));
        assert_eq!(a[1], WireguardAttribute::PrivateKey([4; 32]));
        assert_eq!(a[2], WireguardAttribute::ListenPort(51820));
        assert_eq!(a[3], WireguardAttribute::Fwmark(0));
        let peers = peers_of(&parsed[0]);
        assert_eq!(
            peers[0],
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(key(2).0),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ])
        );
        assert_eq!(ips(&peers[1]), vec![v4(3, 32)]);
    }

    #[test]
    fn link_only_and_empty_plans_send_nothing() {
        assert!(pack("wg0", &[], MESSAGE_LIMIT).is_empty());
        assert!(pack("wg0", &[Op::SetLinkUp, Op::SetMtu(1400)], MESSAGE_LIMIT).is_empty());
    }

    #[test]
    fn small_limits_still_hold_and_lose_nothing() {
        let mut spec = PeerSpec::new(key(1), (0..300).map(|n| v4(n << 8, 24)));
        spec.endpoint = Some("[2001:db8::7]:1".parse().unwrap());
        spec.preshared_key = Some(SecretKey::new([1; 32]));
        let mut ops: Vec<Op> = (10..200)
            .map(|n| Op::AddPeer(std::sync::Arc::new(peer(n))))
            .collect();
        ops.insert(50, Op::AddPeer(std::sync::Arc::new(spec.clone())));
        for limit in [0, MIN_MESSAGE_LIMIT, 700, 4096] {
            let messages = pack("wg-long-name-15", &ops, limit);
            let parsed = wire(&messages);
            for m in &messages {
                assert!(
                    m.encoded_len() <= limit.max(MIN_MESSAGE_LIMIT),
                    "{limit}: {m:?}"
                );
            }
            let sent: crate::model::AllowedIps = parsed
                .iter()
                .flat_map(peers_of)
                .filter(|p| p[0] == WireguardPeerAttribute::PublicKey(key(1).0))
                .flat_map(|p| ips(&p))
                .collect();
            assert_eq!(sent, spec.allowed_ips, "limit {limit}");
            let peers: usize = parsed
                .iter()
                .flat_map(peers_of)
                .filter(|p| flags(p) == Some(WireguardPeerFlags::ReplaceAllowedIps))
                .count();
            assert_eq!(
                peers, 191,
                "limit {limit}: each peer has exactly one first piece"
            );
        }
    }

    #[test]
    fn a_limit_above_the_nest_ceiling_is_lowered_to_it() {
        // The peers nest has a 16-bit length: a larger message could not be encoded.
        let ops: Vec<Op> = (0..2_000)
            .map(|n| Op::AddPeer(std::sync::Arc::new(peer(n))))
            .collect();
        let messages = pack("wg0", &ops, 1 << 20);
        for m in &messages {
            assert!(m.encoded_len() <= MAX_MESSAGE_LIMIT, "{m:?}");
        }
        // 2,000 peers of 80 bytes, 818 to a message.
        assert_eq!(messages.len(), 3);
        assert_eq!(wire(&messages).iter().flat_map(peers_of).count(), 2_000);
    }

    #[test]
    fn only_messages_holding_a_key_are_zeroed() {
        let mut with_psk = peer(7);
        with_psk.preshared_key = Some(SecretKey::new([5; 32]));
        let plain = |n| Op::AddPeer(std::sync::Arc::new(peer(n)));
        // 1,200 peers in 3 messages, then the device's own: the first and the last hold a key.
        let mut ops: Vec<Op> = (0..1_200).map(plain).collect();
        ops[3] = Op::AddPeer(std::sync::Arc::new(with_psk));
        ops.push(Op::ConfigureDevice(Box::new(DeviceChange {
            private_key: Some(SecretKey::new([4; 32])),
            ..DeviceChange::default()
        })));
        let messages = pack("wg0", &ops, MESSAGE_LIMIT);
        let secret: Vec<bool> = messages.iter().map(|m| m.secret).collect();
        assert_eq!(secret, [true, false, false, true]);
        let removal = pack("wg0", &[Op::RemovePeer(key(1))], MESSAGE_LIMIT);
        assert!(!removal[0].secret);
    }

    #[test]
    fn the_buffer_comes_back_empty_and_is_reused() {
        let ops: Vec<Op> = (0..1_000)
            .map(|n| Op::AddPeer(std::sync::Arc::new(peer(n))))
            .collect();
        let mut buffer = Vec::new();
        let mut first = Vec::new();
        pack_each(&mut buffer, "wg0", &ops, MESSAGE_LIMIT, |m| {
            first.push(m.bytes().to_vec())
        });
        assert!(buffer.is_empty());
        assert!(buffer.capacity() >= MESSAGE_LIMIT);
        let at = buffer.as_ptr();
        let mut again = Vec::new();
        pack_each(&mut buffer, "wg0", &ops, MESSAGE_LIMIT, |m| {
            again.push(m.bytes().to_vec())
        });
        assert_eq!(buffer.as_ptr(), at, "the buffer was allocated again");
        assert_eq!(again, first);
        assert_eq!(first.len(), 3);
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let mut spec = peer(1);
        spec.preshared_key = Some(SecretKey::new([0xab; 32]));
        let ops = vec![
            Op::ConfigureDevice(Box::new(DeviceChange {
                private_key: Some(SecretKey::new([0xcd; 32])),
                ..DeviceChange::default()
            })),
            Op::AddPeer(std::sync::Arc::new(spec)),
        ];
        let text = format!("{:?}", pack("wg0", &ops, MESSAGE_LIMIT));
        assert!(
            !text.contains("171") && !text.contains("205") && !text.contains("ab"),
            "{text}"
        );
    }

    fn kick(n: u32, keepalive: u16, recreate: bool) -> Kick {
        let mut spec = peer(n);
        spec.persistent_keepalive = keepalive;
        Kick {
            peer: std::sync::Arc::new(spec),
            endpoint: format!("192.0.2.{}:4{n:04}", n % 250 + 1).parse().unwrap(),
            recreate,
        }
    }

    fn keepalive_of(p: &WireguardPeer) -> Option<u16> {
        p.iter().find_map(|a| match a {
            WireguardPeerAttribute::PersistentKeepalive(k) => Some(*k),
            _ => None,
        })
    }

    #[test]
    fn a_kick_toggles_the_keepalive_from_zero_and_restores_it() {
        let off = kick(1, 0, false);
        let on = kick(2, 25, false);
        let parsed = wire(&pack_kicks("wg0", [&off, &on], MESSAGE_LIMIT));
        assert_eq!(parsed.len(), 1);
        let peers = peers_of(&parsed[0]);
        let update = WireguardPeerAttribute::Flags(WireguardPeerFlags::UpdateOnly);
        assert_eq!(
            peers[0],
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(key(1).0),
                update.clone(),
                WireguardPeerAttribute::Endpoint(off.endpoint),
                WireguardPeerAttribute::PersistentKeepalive(0),
            ])
        );
        let keepalives: Vec<(Key, Option<u16>)> = peers
            .iter()
            .map(|p| match &p[0] {
                WireguardPeerAttribute::PublicKey(k) => (Key(*k), keepalive_of(p)),
                other => panic!("first attribute {other:?}"),
            })
            .collect();
        assert_eq!(
            keepalives,
            vec![
                (key(1), Some(0)),
                (key(1), Some(1)),
                (key(1), Some(0)),
                (key(2), Some(0)),
                (key(2), Some(25)),
            ]
        );
        for p in &peers {
            assert_eq!(flags(p), Some(WireguardPeerFlags::UpdateOnly), "{p:?}");
        }
    }

    #[test]
    fn a_recreating_kick_removes_then_adds_the_whole_peer_in_one_message() {
        let mut k = kick(3, 0, true);
        std::sync::Arc::make_mut(&mut k.peer).preshared_key = Some(SecretKey::new([9; 32]));
        let parsed = wire(&pack_kicks("wg0", [&k], MESSAGE_LIMIT));
        assert_eq!(parsed.len(), 1);
        let peers = peers_of(&parsed[0]);
        assert_eq!(peers.len(), 3, "{peers:?}");
        assert_eq!(
            peers[0],
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(key(3).0),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ])
        );
        let add = &peers[1];
        assert_eq!(flags(add), Some(WireguardPeerFlags::ReplaceAllowedIps));
        assert!(add.contains(&WireguardPeerAttribute::Endpoint(k.endpoint)));
        assert!(add.contains(&WireguardPeerAttribute::PresharedKey([9; 32])));
        assert_eq!(keepalive_of(add), Some(1));
        assert_eq!(ips(add), vec![v4(3, 32)]);
        assert_eq!(flags(&peers[2]), Some(WireguardPeerFlags::UpdateOnly));
        assert_eq!(keepalive_of(&peers[2]), Some(0));

        // A desired keepalive needs no restore: remove and add only.
        let parsed = wire(&pack_kicks("wg0", [&kick(4, 25, true)], MESSAGE_LIMIT));
        let peers = peers_of(&parsed[0]);
        assert_eq!(peers.len(), 2);
        assert_eq!(keepalive_of(&peers[1]), Some(25));
    }

    #[test]
    fn many_kicks_share_few_messages_and_keep_their_order() {
        let kicks: Vec<Kick> = (0..2_000).map(|n| kick(n, 0, n % 2 == 0)).collect();
        let messages = pack_kicks("wg0", &kicks, MESSAGE_LIMIT);
        for m in &messages {
            assert!(m.encoded_len() <= MESSAGE_LIMIT, "{m:?}");
        }
        assert!(messages.len() <= 20, "{} messages", messages.len());
        let order: Vec<Key> = wire(&messages)
            .iter()
            .flat_map(peers_of)
            .map(|p| match &p[0] {
                WireguardPeerAttribute::PublicKey(k) => Key(*k),
                other => panic!("first attribute {other:?}"),
            })
            .collect();
        let want: Vec<Key> = (0..2_000).flat_map(|n| [key(n); 3]).collect();
        assert_eq!(order, want);
        assert!(pack_kicks("wg0", &[], MESSAGE_LIMIT).is_empty());
    }

    mod same_bytes_as_the_nla_encoder {
        //! The encoder against the former one (netlink-packet-wireguard attribute trees,
        //! serialized by the crate): the same messages, byte for byte.

        use super::*;
        use crate::backend::kernel::genl::encode;
        use crate::backend::kernel::pack_nla;
        use netlink_packet_wireguard::WireguardCmd;
        use proptest::prelude::*;
        use std::net::{SocketAddrV4, SocketAddrV6};

        fn arb_key() -> impl Strategy<Value = [u8; 32]> {
            // Few distinct keys, so that updates and removals name added peers.
            (0u8..6, any::<u8>()).prop_map(|(k, fill)| {
                let mut b = [fill; 32];
                b[0] = k;
                b
            })
        }

        fn arb_net() -> impl Strategy<Value = IpNet> {
            prop_oneof![
                (any::<u32>(), 0u8..=32)
                    .prop_map(|(a, l)| IpNet::new(Ipv4Addr::from(a).into(), l).unwrap().trunc()),
                (any::<u128>(), 0u8..=128).prop_map(|(a, l)| IpNet::new(
                    Ipv6Addr::from(a).into(),
                    l
                )
                .unwrap()
                .trunc()),
            ]
        }

        fn arb_ips() -> impl Strategy<Value = crate::model::AllowedIps> {
            prop_oneof![
                3 => proptest::collection::vec(arb_net(), 0..4),
                1 => proptest::collection::vec(arb_net(), 0..120),
            ]
            .prop_map(|v| v.into_iter().collect())
        }

        fn arb_endpoint() -> impl Strategy<Value = SocketAddr> {
            prop_oneof![
                (any::<u32>(), any::<u16>())
                    .prop_map(|(a, p)| SocketAddrV4::new(a.into(), p).into()),
                (any::<u128>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
                    |(a, p, flow, scope)| SocketAddrV6::new(a.into(), p, flow, scope).into()
                ),
            ]
        }

        fn arb_spec() -> impl Strategy<Value = PeerSpec> {
            (
                arb_key(),
                proptest::option::of(any::<[u8; 32]>()),
                prop_oneof![Just(0u16), any::<u16>()],
                arb_ips(),
                proptest::option::of(arb_endpoint()),
            )
                .prop_map(|(key, psk, keepalive, ips, endpoint)| PeerSpec {
                    public_key: Key(key),
                    preshared_key: psk.map(SecretKey::new),
                    allowed_ips: ips,
                    persistent_keepalive: keepalive,
                    endpoint,
                })
        }

        fn arb_op() -> impl Strategy<Value = Op> {
            let update = (
                arb_key(),
                proptest::option::of(proptest::option::of(any::<[u8; 32]>())),
                proptest::option::of(any::<u16>()),
                proptest::option::of(arb_ips()),
                proptest::option::of(arb_endpoint()),
            )
                .prop_map(|(key, psk, keepalive, ips, endpoint)| {
                    Op::UpdatePeer(Box::new(PeerUpdate {
                        public_key: Key(key),
                        preshared_key: psk.map(|p| p.map(SecretKey::new)),
                        persistent_keepalive: keepalive,
                        allowed_ips: ips,
                        endpoint,
                    }))
                });
            let device = (
                proptest::option::of(any::<[u8; 32]>()),
                proptest::option::of(any::<u16>()),
                proptest::option::of(any::<u32>()),
            )
                .prop_map(|(key, port, mark)| {
                    Op::ConfigureDevice(Box::new(DeviceChange {
                        private_key: key.map(SecretKey::new),
                        listen_port: port,
                        fwmark: mark,
                    }))
                });
            prop_oneof![
                6 => arb_spec().prop_map(|s| Op::AddPeer(s.into())),
                3 => update,
                2 => arb_key().prop_map(|k| Op::RemovePeer(Key(k))),
                1 => device,
                1 => Just(Op::SetLinkUp),
            ]
        }

        fn arb_kick() -> impl Strategy<Value = Kick> {
            (arb_spec(), arb_endpoint(), any::<bool>()).prop_map(|(peer, endpoint, recreate)| {
                Kick {
                    peer: std::sync::Arc::new(peer),
                    endpoint,
                    recreate,
                }
            })
        }

        fn arb_limit() -> impl Strategy<Value = usize> {
            prop_oneof![
                Just(MESSAGE_LIMIT),
                0usize..2_000,
                0usize..=MAX_MESSAGE_LIMIT,
            ]
        }

        fn old_bytes(messages: &[pack_nla::SetDevice]) -> Vec<Vec<u8>> {
            messages
                .iter()
                .map(|m| encode(0, WireguardCmd::SetDevice, 0, 0, m.attributes()))
                .collect()
        }

        fn new_bytes(messages: &[SetDevice]) -> Vec<Vec<u8>> {
            messages.iter().map(|m| m.bytes().to_vec()).collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn plans(
                name in "[a-z0-9-]{1,15}",
                ops in proptest::collection::vec(arb_op(), 0..40),
                limit in arb_limit(),
            ) {
                let new = new_bytes(&pack(&name, &ops, limit));
                let old = old_bytes(&pack_nla::pack(&name, &ops, limit));
                prop_assert_eq!(new, old);
            }

            #[test]
            fn kicks(
                name in "[a-z0-9-]{1,15}",
                kicks in proptest::collection::vec(arb_kick(), 0..30),
                limit in arb_limit(),
            ) {
                let new = new_bytes(&pack_kicks(&name, &kicks, limit));
                let old = old_bytes(&pack_nla::pack_kicks(&name, &kicks, limit));
                prop_assert_eq!(new, old);
            }
        }

        #[test]
        fn ten_thousand_peers_and_one_with_five_thousand_ips() {
            let mut ops: Vec<Op> = (0..10_000)
                .map(|n| Op::AddPeer(std::sync::Arc::new(peer(n))))
                .collect();
            let big = PeerSpec::new(key(1), (0..5_000).map(|n| v4(n << 8, 24)));
            ops.insert(5_000, Op::AddPeer(std::sync::Arc::new(big)));
            let new = new_bytes(&pack("wg0", &ops, MESSAGE_LIMIT));
            let old = old_bytes(&pack_nla::pack("wg0", &ops, MESSAGE_LIMIT));
            assert_eq!(new.len(), old.len());
            assert!(new == old, "the encoders differ");
        }
    }
}
