//! The former encoder of [`super::pack`], kept (test builds only) as the oracle of its
//! byte-for-byte property test: it builds netlink-packet-wireguard attribute trees per
//! peer, which the crate then serializes; the same splitting rules as `pack`.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use netlink_packet_core::{Emitable, NLA_HEADER_SIZE};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use zeroize::Zeroize;

use super::pack::{zeroize_attributes, HEADERS_LEN, MIN_MESSAGE_LIMIT};
use crate::backend::kick::{kick_keepalive, recreated_peer, Kick};
use crate::model::PeerSpec;
use crate::plan::{DeviceChange, Op, PeerUpdate};

/// The attributes of one `WG_CMD_SET_DEVICE` request. Secrets inside are zeroed on drop.
pub struct SetDevice {
    attributes: Vec<WireguardAttribute>,
}

impl SetDevice {
    /// The request's attributes, in the order they are sent.
    pub fn attributes(&self) -> &[WireguardAttribute] {
        &self.attributes
    }
}

impl Drop for SetDevice {
    fn drop(&mut self) {
        zeroize_attributes(&mut self.attributes);
    }
}

/// The former `pack::pack`.
pub fn pack<'a>(
    interface: &str,
    ops: impl IntoIterator<Item = &'a Op>,
    limit: usize,
) -> Vec<SetDevice> {
    let mut packer = Packer::new(interface, limit.max(MIN_MESSAGE_LIMIT));
    for op in ops {
        match op {
            Op::ConfigureDevice(change) => packer.device(change),
            Op::AddPeer(spec) => packer.peer(add_peer(spec)),
            Op::UpdatePeer(update) => packer.peer(update_peer(update)),
            Op::RemovePeer(key) => packer.peer(PeerWrite {
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
    packer.finish()
}

/// The former `pack::pack_kicks`.
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
