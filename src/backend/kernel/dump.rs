//! Turns the parts of a `WG_CMD_GET_DEVICE` dump, as they arrive, into a read of the device
//! ([`DumpParser`], into any [`DeviceSink`]: the agent's model in place, or a
//! [`DeviceState`]). Pure.
//!
//! The kernel sends the device attributes in the first part only, then the peers; a peer
//! whose allowed IPs do not fit in one part is repeated at the start of the next part with
//! only its public key and the remaining allowed IPs. Pieces of a peer are merged here.
//! A preshared key of 32 zero bytes means "none"; a handshake time of zero means "never".

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use netlink_packet_wireguard::{
    WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute, WireguardMessage,
    WireguardPeer, WireguardPeerAttribute, WireguardTimeSpec,
};
use thiserror::Error;

use crate::model::{DeviceSink, DeviceState, Key, PeerSpec, PeerState, SecretKey};

/// A dump the kernel should never send.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DumpError {
    #[error("a peer in the device dump has no public key")]
    PeerWithoutKey,
    #[error("peer {peer}: invalid allowed IP in the device dump ({detail})")]
    BadAllowedIp { peer: Key, detail: String },
}

/// Merges the parts of one device dump, in the order received.
pub fn merge_dump(parts: &[WireguardMessage]) -> Result<DeviceState, DumpError> {
    let mut parser = DumpParser::new(DeviceState::default());
    for part in parts {
        parser.part(part);
    }
    parser.finish()
}

/// The parts of one device dump parsed as they arrive, each peer handed to the sink whole
/// once its last piece is in (a continued peer's pieces are consecutive), so that the dump
/// is never held beside what it fills.
pub struct DumpParser<S> {
    sink: S,
    private_key: Option<SecretKey>,
    listen_port: u16,
    fwmark: u32,
    /// The peer whose pieces are being read.
    peer: Option<PeerState>,
    /// The first error; later parts are skipped.
    error: Option<DumpError>,
}

impl<S: DeviceSink> DumpParser<S> {
    pub fn new(sink: S) -> Self {
        DumpParser {
            sink,
            private_key: None,
            listen_port: 0,
            fwmark: 0,
            peer: None,
            error: None,
        }
    }

    /// Reads the next part.
    pub fn part(&mut self, part: &WireguardMessage) {
        if self.error.is_some() {
            return;
        }
        for attr in &part.attributes {
            match attr {
                WireguardAttribute::PrivateKey(k) => self.private_key = Some(SecretKey::new(*k)),
                WireguardAttribute::ListenPort(p) => self.listen_port = *p,
                WireguardAttribute::Fwmark(m) => self.fwmark = *m,
                WireguardAttribute::Peers(peers) => {
                    for peer in peers {
                        if let Err(e) = self.piece(peer) {
                            self.error = Some(e);
                            return;
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The sink, once every part is read: the last peer and the device's settings go in.
    pub fn finish(mut self) -> Result<S, DumpError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if let Some(peer) = self.peer.take() {
            self.sink.peer(peer);
        }
        self.sink
            .settings(self.private_key.take(), self.listen_port, self.fwmark);
        Ok(self.sink)
    }

    /// One peer entry: the next piece of the peer being read, or a new peer (the one
    /// before it is complete).
    fn piece(&mut self, entry: &WireguardPeer) -> Result<(), DumpError> {
        let key = entry
            .iter()
            .find_map(|a| match a {
                WireguardPeerAttribute::PublicKey(k) => Some(Key(*k)),
                _ => None,
            })
            .ok_or(DumpError::PeerWithoutKey)?;
        if self.peer.as_ref().map(|p| p.config.public_key) != Some(key) {
            if let Some(done) = self.peer.take() {
                self.sink.peer(done);
            }
        }
        let peer = self
            .peer
            .get_or_insert_with(|| PeerState::fresh(PeerSpec::new(key, [])));
        merge_piece(peer, entry)
    }
}

/// Adds one piece of a peer's entry to what is read of it.
fn merge_piece(peer: &mut PeerState, entry: &WireguardPeer) -> Result<(), DumpError> {
    let key = peer.config.public_key;
    // The peer being read is not shared yet: no copy.
    let config = Arc::make_mut(&mut peer.config);
    for attr in entry.iter() {
        match attr {
            WireguardPeerAttribute::PresharedKey(k) => {
                config.preshared_key = if k.iter().all(|b| *b == 0) {
                    None
                } else {
                    Some(SecretKey::new(*k))
                };
            }
            WireguardPeerAttribute::Endpoint(e) => config.endpoint = Some(*e),
            WireguardPeerAttribute::PersistentKeepalive(k) => config.persistent_keepalive = *k,
            WireguardPeerAttribute::LastHandshake(t) => peer.last_handshake = handshake_time(t),
            WireguardPeerAttribute::RxBytes(n) => peer.rx_bytes = *n,
            WireguardPeerAttribute::TxBytes(n) => peer.tx_bytes = *n,
            WireguardPeerAttribute::AllowedIps(ips) => {
                // One attribute's prefixes added at once (a set grown by one insert per
                // prefix would copy itself per prefix).
                let nets = ips
                    .iter()
                    .map(|ip| {
                        allowed_ip(ip)
                            .map_err(|detail| DumpError::BadAllowedIp { peer: key, detail })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                config.allowed_ips.extend(nets);
            }
            _ => {}
        }
    }
    Ok(())
}

fn handshake_time(t: &WireguardTimeSpec) -> Option<SystemTime> {
    if t.seconds <= 0 && t.nano_seconds <= 0 {
        return None;
    }
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nano_seconds).ok()?.min(999_999_999);
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

fn allowed_ip(ip: &WireguardAllowedIp) -> Result<IpNet, String> {
    let mut addr = None;
    let mut cidr = None;
    for attr in ip.iter() {
        match attr {
            WireguardAllowedIpAttr::IpAddr(a) => addr = Some(*a),
            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
            _ => {}
        }
    }
    match (addr, cidr) {
        (Some(a), Some(c)) => IpNet::new(a, c)
            .map(|n| n.trunc())
            .map_err(|e| format!("{a}/{c}: {e}")),
        _ => Err("address or prefix length missing".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_wireguard::{WireguardAddressFamily, WireguardCmd};
    use std::net::IpAddr;

    fn ip(s: &str) -> WireguardAllowedIp {
        let net: IpNet = s.parse().unwrap();
        WireguardAllowedIp(vec![
            WireguardAllowedIpAttr::Family(match net.addr() {
                IpAddr::V4(_) => WireguardAddressFamily::Ipv4,
                IpAddr::V6(_) => WireguardAddressFamily::Ipv6,
            }),
            WireguardAllowedIpAttr::IpAddr(net.addr()),
            WireguardAllowedIpAttr::Cidr(net.prefix_len()),
        ])
    }

    fn part(attributes: Vec<WireguardAttribute>) -> WireguardMessage {
        WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes,
        }
    }

    fn full_peer(key: u8, psk: [u8; 32], ips: &[&str]) -> WireguardPeer {
        WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey([key; 32]),
            WireguardPeerAttribute::PresharedKey(psk),
            WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                seconds: 1_700_000_000,
                nano_seconds: 5,
            }),
            WireguardPeerAttribute::PersistentKeepalive(25),
            WireguardPeerAttribute::Endpoint("192.0.2.1:51820".parse().unwrap()),
            WireguardPeerAttribute::RxBytes(100),
            WireguardPeerAttribute::TxBytes(200),
            WireguardPeerAttribute::ProtocolVersion(1),
            WireguardPeerAttribute::AllowedIps(ips.iter().map(|s| ip(s)).collect()),
        ])
    }

    /// Two parts: peers 1 and 2, then the rest of peer 2's allowed IPs and peer 3.
    fn split_dump() -> Vec<WireguardMessage> {
        vec![
            part(vec![
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::Fwmark(7),
                WireguardAttribute::IfIndex(4),
                WireguardAttribute::IfName("wg0".into()),
                WireguardAttribute::PrivateKey([9; 32]),
                WireguardAttribute::PublicKey([8; 32]),
                WireguardAttribute::Peers(vec![
                    full_peer(1, [0; 32], &["10.0.0.2/32"]),
                    full_peer(2, [6; 32], &["10.1.0.0/24", "fd00::/64"]),
                ]),
            ]),
            // The kernel continues peer 2: public key and the remaining allowed IPs only.
            part(vec![
                WireguardAttribute::IfIndex(4),
                WireguardAttribute::Peers(vec![
                    WireguardPeer(vec![
                        WireguardPeerAttribute::PublicKey([2; 32]),
                        WireguardPeerAttribute::AllowedIps(vec![ip("10.2.0.0/16")]),
                    ]),
                    full_peer(3, [0; 32], &[]),
                ]),
            ]),
        ]
    }

    #[test]
    fn a_peer_split_across_parts_is_merged_and_device_fields_read() {
        let parts = split_dump();
        let dev = merge_dump(&parts).unwrap();
        assert_eq!(dev.private_key, Some(SecretKey::new([9; 32])));
        assert_eq!(dev.listen_port, 51820);
        assert_eq!(dev.fwmark, 7);
        assert_eq!(dev.peers.len(), 3);
        let p1 = &dev.peers[&Key([1; 32])];
        assert_eq!(p1.config.preshared_key, None, "zero key means none");
        let p2 = &dev.peers[&Key([2; 32])];
        assert_eq!(p2.config.preshared_key, Some(SecretKey::new([6; 32])));
        let want: crate::model::AllowedIps = ["10.1.0.0/24", "fd00::/64", "10.2.0.0/16"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(p2.config.allowed_ips, want);
        // The continuation did not reset the counters or settings of the first piece.
        assert_eq!((p2.rx_bytes, p2.tx_bytes), (100, 200));
        assert_eq!(p2.config.persistent_keepalive, 25);
        assert_eq!(p2.config.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
        assert_eq!(
            p2.last_handshake,
            Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert!(dev.peers[&Key([3; 32])].config.allowed_ips.is_empty());
    }

    /// Read into a model in place, part by part, the dump gives the model of the merged
    /// dump: peer 2's pieces joined, a vanished peer gone, a changed peer's IPs re-owned.
    #[test]
    fn a_dump_read_into_a_model_in_place_is_the_model_of_the_merged_dump() {
        use crate::model::Observed;
        use crate::plan::KernelModel;
        let mut before = DeviceState::default();
        before.peer(PeerState::fresh(PeerSpec::new(
            Key([1; 32]),
            ["10.9.0.0/16".parse().unwrap()],
        )));
        before.peer(PeerState::fresh(PeerSpec::new(
            Key([4; 32]),
            ["10.0.0.2/32".parse().unwrap()],
        )));
        let mut model = KernelModel::new(Observed {
            link: None,
            device: before,
        });
        let parts = split_dump();
        let mut parser = DumpParser::new(model.refresh());
        for part in &parts {
            parser.part(part);
        }
        parser.finish().unwrap().finish();
        let want = KernelModel::new(Observed {
            link: None,
            device: merge_dump(&parts).unwrap(),
        });
        assert_eq!(model, want);
    }

    #[test]
    fn an_empty_device_and_a_peer_that_never_connected() {
        let mut peer = full_peer(1, [0; 32], &[]);
        peer.0[2] = WireguardPeerAttribute::LastHandshake(WireguardTimeSpec::default());
        let dev = merge_dump(&[part(vec![
            WireguardAttribute::ListenPort(0),
            WireguardAttribute::Peers(vec![peer]),
        ])])
        .unwrap();
        assert_eq!(dev.private_key, None);
        assert_eq!(dev.peers[&Key([1; 32])].last_handshake, None);
        assert_eq!(merge_dump(&[]).unwrap(), DeviceState::default());
    }

    #[test]
    fn malformed_dumps_are_errors_not_panics() {
        let no_key = part(vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
            WireguardPeerAttribute::RxBytes(1),
        ])])]);
        assert_eq!(merge_dump(&[no_key]), Err(DumpError::PeerWithoutKey));
        let bad_ip = part(vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey([1; 32]),
            WireguardPeerAttribute::AllowedIps(vec![WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::IpAddr("10.0.0.0".parse().unwrap()),
                WireguardAllowedIpAttr::Cidr(33),
            ])]),
        ])])]);
        assert!(matches!(
            merge_dump(&[bad_ip]),
            Err(DumpError::BadAllowedIp { .. })
        ));
    }
}
