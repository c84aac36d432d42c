//! Packs the plan's device and peer operations into as few `WG_CMD_SET_DEVICE` messages as
//! possible. Pure: operations in, message payloads out; the socket code only sends them.
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
//! Size limit: see [`MESSAGE_LIMIT`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use netlink_packet_core::{Emitable, NLA_HEADER_SIZE};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use zeroize::Zeroize;

use crate::backend::kick::{kick_keepalive, recreated_peer, Kick};
use crate::model::PeerSpec;
use crate::plan::{DeviceChange, Op, PeerUpdate};

/// The largest `WG_CMD_SET_DEVICE` message we send, in bytes (netlink and generic netlink
/// headers included).
///
/// The hard ceiling is the 16-bit length of the nested `WGDEVICE_A_PEERS` attribute
/// (65,535 bytes: a larger nest cannot even be encoded); the kernel also refuses messages
/// larger than the socket's send buffer (`wmem_default`, 212,992 bytes on stock kernels,
/// but operators lower it). 32 KiB is half the ceiling, far below any send buffer, holds
/// about 400 single-address peers (10,000 peers in 25 messages: the per-message cost is
/// one syscall and one ACK, small beside the kernel's per-peer work) and bounds how long
/// one message holds the device's configuration lock.
pub const MESSAGE_LIMIT: usize = 32 * 1024;

/// The smallest limit [`pack`] accepts (smaller values are raised to it): room for the
/// headers, every device attribute and one peer with every attribute and one IPv6 address.
pub const MIN_MESSAGE_LIMIT: usize = 512;

/// Netlink header (16 bytes) and generic netlink header (4 bytes).
pub const HEADERS_LEN: usize = 16 + 4;

/// The attributes of one `WG_CMD_SET_DEVICE` request. Secrets inside are zeroed on drop
/// and never shown by `Debug`.
pub struct SetDevice {
    attributes: Vec<WireguardAttribute>,
}

impl SetDevice {
    /// The request's attributes, in the order they are sent.
    pub fn attributes(&self) -> &[WireguardAttribute] {
        &self.attributes
    }

    /// The encoded size of the whole request, headers included.
    pub fn encoded_len(&self) -> usize {
        HEADERS_LEN + self.attributes.as_slice().buffer_len()
    }

    /// The peer entries (whole peers and pieces of peers) in this request.
    pub fn peers(&self) -> &[WireguardPeer] {
        self.attributes
            .iter()
            .find_map(|a| match a {
                WireguardAttribute::Peers(p) => Some(p.as_slice()),
                _ => None,
            })
            .unwrap_or(&[])
    }

    /// The listen port this request sets, if any (to name it when the port is taken).
    pub fn listen_port(&self) -> Option<u16> {
        self.attributes.iter().find_map(|a| match a {
            WireguardAttribute::ListenPort(p) => Some(*p),
            _ => None,
        })
    }
}

impl fmt::Debug for SetDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetDevice")
            .field("attributes", &self.attributes.len())
            .field("peers", &self.peers().len())
            .field("bytes", &self.encoded_len())
            .finish_non_exhaustive()
    }
}

impl Drop for SetDevice {
    fn drop(&mut self) {
        zeroize_attributes(&mut self.attributes);
    }
}

/// Zeroes the private and preshared keys inside WireGuard attributes.
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
    pack_lazily(interface, ops.into_iter(), limit).collect()
}

/// The messages of [`pack`], each built when the caller takes the one before it is done
/// with: a cold apply's messages (about 500 bytes of attributes per peer) are never all in
/// memory at once.
pub fn pack_lazily<'a, I: Iterator<Item = &'a Op>>(
    interface: &str,
    ops: I,
    limit: usize,
) -> impl Iterator<Item = SetDevice> {
    Lazy {
        packer: Packer::new(interface, limit.max(MIN_MESSAGE_LIMIT)),
        ops,
        done: false,
    }
}

/// Packs operations as its messages are taken.
struct Lazy<I> {
    packer: Packer,
    ops: I,
    done: bool,
}

impl<'a, I: Iterator<Item = &'a Op>> Iterator for Lazy<I> {
    type Item = SetDevice;

    fn next(&mut self) -> Option<SetDevice> {
        loop {
            if !self.packer.out.is_empty() {
                return Some(self.packer.out.remove(0));
            }
            if self.done {
                return None;
            }
            match self.ops.next() {
                Some(op) => self.packer.op(op),
                None => {
                    self.done = true;
                    self.packer.flush();
                }
            }
        }
    }
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
    let mut packer = Packer::new(interface, limit.max(MIN_MESSAGE_LIMIT));
    for kick in kicks {
        let key = kick.peer.public_key.0;
        let keepalive = |value: u16, endpoint: Option<SocketAddr>| {
            let mut head = vec![
                WireguardPeerAttribute::PublicKey(key),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::UpdateOnly),
            ];
            if let Some(endpoint) = endpoint {
                head.push(WireguardPeerAttribute::Endpoint(endpoint));
            }
            head.push(WireguardPeerAttribute::PersistentKeepalive(value));
            PeerWrite {
                head,
                continuation: Vec::new(),
                allowed_ips: Vec::new(),
            }
        };
        if kick.recreate {
            packer.peer(PeerWrite {
                head: vec![
                    WireguardPeerAttribute::PublicKey(key),
                    WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
                ],
                continuation: Vec::new(),
                allowed_ips: Vec::new(),
            });
            packer.peer(add_peer(&recreated_peer(kick)));
        } else {
            packer.peer(keepalive(0, Some(kick.endpoint)));
            packer.peer(keepalive(
                kick_keepalive(kick.peer.persistent_keepalive),
                None,
            ));
        }
        if kick.peer.persistent_keepalive == 0 {
            packer.peer(keepalive(0, None));
        }
    }
    packer.finish()
}

/// One peer to write: the attributes of its first piece, of its continuation pieces, and
/// its allowed IPs (spread over the pieces).
struct PeerWrite {
    head: Vec<WireguardPeerAttribute>,
    continuation: Vec<WireguardPeerAttribute>,
    allowed_ips: Vec<WireguardAllowedIp>,
}

impl Drop for PeerWrite {
    fn drop(&mut self) {
        for attr in &mut self.head {
            if let WireguardPeerAttribute::PresharedKey(k) = attr {
                k.zeroize();
            }
        }
    }
}

fn add_peer(spec: &PeerSpec) -> PeerWrite {
    let mut head = vec![
        WireguardPeerAttribute::PublicKey(spec.public_key.0),
        // The peer is new: whatever allowed IPs a same-keyed peer may have are replaced.
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
    ];
    if let Some(psk) = &spec.preshared_key {
        head.push(WireguardPeerAttribute::PresharedKey(*psk.expose()));
    }
    if spec.persistent_keepalive != 0 {
        head.push(WireguardPeerAttribute::PersistentKeepalive(
            spec.persistent_keepalive,
        ));
    }
    if let Some(endpoint) = spec.endpoint {
        head.push(WireguardPeerAttribute::Endpoint(endpoint));
    }
    PeerWrite {
        head,
        continuation: continuation(&spec.public_key.0),
        allowed_ips: spec.allowed_ips.iter().map(allowed_ip).collect(),
    }
}

fn update_peer(update: &PeerUpdate) -> PeerWrite {
    let mut flags = WireguardPeerFlags::UpdateOnly;
    if update.allowed_ips.is_some() {
        flags |= WireguardPeerFlags::ReplaceAllowedIps;
    }
    let mut head = vec![
        WireguardPeerAttribute::PublicKey(update.public_key.0),
        WireguardPeerAttribute::Flags(flags),
    ];
    if let Some(psk) = &update.preshared_key {
        head.push(WireguardPeerAttribute::PresharedKey(match psk {
            Some(k) => *k.expose(),
            None => [0; 32],
        }));
    }
    if let Some(keepalive) = update.persistent_keepalive {
        head.push(WireguardPeerAttribute::PersistentKeepalive(keepalive));
    }
    if let Some(endpoint) = update.endpoint {
        head.push(WireguardPeerAttribute::Endpoint(endpoint));
    }
    PeerWrite {
        head,
        continuation: continuation(&update.public_key.0),
        allowed_ips: update
            .allowed_ips
            .iter()
            .flatten()
            .map(allowed_ip)
            .collect(),
    }
}

/// A continuation piece names the peer and only adds allowed IPs; `UPDATE_ONLY` keeps it
/// from creating a stray peer should the first piece's peer have vanished in between.
fn continuation(key: &[u8; 32]) -> Vec<WireguardPeerAttribute> {
    vec![
        WireguardPeerAttribute::PublicKey(*key),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::UpdateOnly),
    ]
}

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let (family, addr) = match net.network() {
        IpAddr::V4(a) => (WireguardAddressFamily::Ipv4, IpAddr::V4(a)),
        IpAddr::V6(a) => (WireguardAddressFamily::Ipv6, IpAddr::V6(a)),
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(addr),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

struct Packer {
    limit: usize,
    ifname: WireguardAttribute,
    out: Vec<SetDevice>,
    /// Attributes of the message being built, without its peers.
    attributes: Vec<WireguardAttribute>,
    peers: Vec<WireguardPeer>,
    /// Encoded size of the message being built (with the peers nest once it has peers).
    size: usize,
}

impl Packer {
    fn new(interface: &str, limit: usize) -> Self {
        let ifname = WireguardAttribute::IfName(interface.to_owned());
        let size = HEADERS_LEN + ifname.buffer_len();
        Packer {
            limit,
            attributes: vec![ifname.clone()],
            ifname,
            out: Vec::new(),
            peers: Vec::new(),
            size,
        }
    }

    /// Bytes still free in the message being built for one more peer entry.
    fn room(&self) -> usize {
        let nest = if self.peers.is_empty() {
            NLA_HEADER_SIZE
        } else {
            0
        };
        self.limit.saturating_sub(self.size + nest)
    }

    fn op(&mut self, op: &Op) {
        match op {
            Op::ConfigureDevice(change) => self.device(change),
            Op::AddPeer(spec) => self.peer(add_peer(spec)),
            Op::UpdatePeer(update) => self.peer(update_peer(update)),
            Op::RemovePeer(key) => self.peer(PeerWrite {
                head: vec![
                    WireguardPeerAttribute::PublicKey(key.0),
                    WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
                ],
                continuation: Vec::new(),
                allowed_ips: Vec::new(),
            }),
            Op::CreateLink
            | Op::SetMtu(_)
            | Op::SetLinkUp
            | Op::AddAddress(_)
            | Op::RemoveAddress(_) => {}
        }
    }

    fn device(&mut self, change: &DeviceChange) {
        let mut attrs = Vec::new();
        if let Some(key) = &change.private_key {
            attrs.push(WireguardAttribute::PrivateKey(*key.expose()));
        }
        if let Some(port) = change.listen_port {
            attrs.push(WireguardAttribute::ListenPort(port));
        }
        if let Some(mark) = change.fwmark {
            attrs.push(WireguardAttribute::Fwmark(mark));
        }
        let len = attrs.as_slice().buffer_len();
        if self.size + len > self.limit || !self.peers.is_empty() {
            // Device settings go before the peers of a message; a later change starts one.
            self.flush();
        }
        self.size += len;
        self.attributes.extend(attrs);
    }

    fn peer(&mut self, write: PeerWrite) {
        let mut rest = write.allowed_ips.as_slice();
        let mut head = write.head.as_slice();
        loop {
            let room = self.room();
            let head_len = NLA_HEADER_SIZE
                + head.buffer_len()
                + if rest.is_empty() { 0 } else { NLA_HEADER_SIZE };
            let mut used = head_len;
            let mut fit = 0;
            if used <= room {
                for ip in rest {
                    let len = ip.buffer_len();
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
            if fit == 0 && !self.peers.is_empty() {
                // Not even one address fits beside the others: start a new message.
                self.flush();
                continue;
            }
            // Split here: as many addresses as fit (at least one, so that a limit too small
            // for anything still makes progress; MIN_MESSAGE_LIMIT prevents that case).
            let take = fit.max(1).min(rest.len());
            self.push(head, &rest[..take]);
            rest = &rest[take..];
            head = write.continuation.as_slice();
            self.flush();
            if rest.is_empty() {
                return;
            }
        }
    }

    fn push(&mut self, head: &[WireguardPeerAttribute], ips: &[WireguardAllowedIp]) {
        let mut attrs = head.to_vec();
        if !ips.is_empty() {
            attrs.push(WireguardPeerAttribute::AllowedIps(ips.to_vec()));
        }
        let peer = WireguardPeer(attrs);
        if self.peers.is_empty() {
            self.size += NLA_HEADER_SIZE;
        }
        self.size += peer.buffer_len();
        self.peers.push(peer);
    }

    /// Closes the message being built (if it says anything) and starts the next one.
    fn flush(&mut self) {
        let mut attributes = std::mem::replace(&mut self.attributes, vec![self.ifname.clone()]);
        let peers = std::mem::take(&mut self.peers);
        self.size = HEADERS_LEN + self.ifname.buffer_len();
        if peers.is_empty() && attributes.len() <= 1 {
            return;
        }
        if !peers.is_empty() {
            attributes.push(WireguardAttribute::Peers(peers));
        }
        self.out.push(SetDevice { attributes });
    }

    fn finish(mut self) -> Vec<SetDevice> {
        self.flush();
        std::mem::take(&mut self.out)
    }
}

impl Drop for Packer {
    fn drop(&mut self) {
        zeroize_attributes(&mut self.attributes);
        let mut peers = vec![WireguardAttribute::Peers(std::mem::take(&mut self.peers))];
        zeroize_attributes(&mut peers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kernel::genl::encode;
    use crate::model::{Key, SecretKey};
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
    use netlink_packet_generic::GenlMessage;
    use netlink_packet_wireguard::{WireguardCmd, WireguardMessage};
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

    /// The lazy packer gives [`pack`]'s messages, the first before it has read most
    /// operations (a cold apply's messages are not all built first).
    #[test]
    fn messages_are_packed_as_they_are_taken() {
        let ops: Vec<Op> = (0..2_000).map(|n| Op::AddPeer(peer(n))).collect();
        let read = std::cell::Cell::new(0usize);
        let counted = ops.iter().inspect(|_| read.set(read.get() + 1));
        let mut lazy = pack_lazily("wg0", counted, 4096);
        let first = lazy.next().unwrap();
        assert!(
            read.get() < ops.len() / 4,
            "{} of {} read",
            read.get(),
            ops.len()
        );
        let mut all = vec![first];
        all.extend(lazy);
        let whole = pack("wg0", &ops, 4096);
        assert!(whole.len() > 4);
        assert_eq!(wire(&all), wire(&whole));
    }

    /// Serializes, measures and parses back every message, as the kernel would see it.
    fn wire(messages: &[SetDevice]) -> Vec<WireguardMessage> {
        messages
            .iter()
            .map(|m| {
                let bytes = encode(0x1d, WireguardCmd::SetDevice, 5, 7, m.attributes());
                assert_eq!(bytes.len(), m.encoded_len());
                let parsed =
                    NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(&bytes).unwrap();
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
            Op::AddPeer(peer(1)),
            Op::ConfigureDevice(DeviceChange {
                listen_port: Some(51820),
                ..Default::default()
            }),
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
        let ops: Vec<Op> = (0..10_000).map(|n| Op::AddPeer(peer(n))).collect();
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
            Op::AddPeer(peer(100)),
            Op::AddPeer(spec),
            Op::AddPeer(peer(101)),
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
            &[Op::UpdatePeer(only_keepalive)],
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
            &[Op::UpdatePeer(psk_removed_ips_changed)],
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
            &[Op::UpdatePeer(all_ips_removed)],
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
            Op::ConfigureDevice(DeviceChange {
                private_key: Some(SecretKey::new([4; 32])),
                listen_port: Some(51820),
                fwmark: Some(0),
            }),
            Op::RemovePeer(key(2)),
            Op::AddPeer(peer(3)),
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
        let mut ops: Vec<Op> = (10..200).map(|n| Op::AddPeer(peer(n))).collect();
        ops.insert(50, Op::AddPeer(spec.clone()));
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
    fn debug_output_shows_no_secret() {
        let mut spec = peer(1);
        spec.preshared_key = Some(SecretKey::new([0xab; 32]));
        let ops = vec![
            Op::ConfigureDevice(DeviceChange {
                private_key: Some(SecretKey::new([0xcd; 32])),
                ..DeviceChange::default()
            }),
            Op::AddPeer(spec),
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
            peer: spec,
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
        k.peer.preshared_key = Some(SecretKey::new([9; 32]));
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
}
