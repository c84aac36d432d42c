//! A whole location as it travels (`v1::Location`, from a snapshot or the result of a delta)
//! checked item by item and across items: a [`CheckedLocation`], or every [`Rejection`]
//! naming its item. [`valid_peer_keys`] tells, for a rejected location, which listed peers are
//! valid on their own and against the others (what a gateway may keep), and
//! [`listed_peer_keys`] which public keys it lists at all (a peer not listed is removed).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use gatehouse_proto::v1;
use ipnet::IpNet;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::overlap::{find_overlaps, gateway_hosts, Holder};
use crate::text::{canonical_printable, MAX_TEXT};
use crate::{firewall, keys, net, Rejection, Rejections};

/// Interface addresses in one location at most.
pub const MAX_ADDRESSES: usize = 256;
/// Allowed IPs of one peer at most.
pub const MAX_ALLOWED_IPS: usize = 10_000;

/// A private or preshared key: zeroed on drop, never printed.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret(pub [u8; 32]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedInterface {
    pub private_key: Secret,
    /// Derived from the private key.
    pub public_key: [u8; 32],
    pub listen_port: u16,
    pub addresses: BTreeSet<IpNet>,
    /// None: the kernel's default.
    pub mtu: Option<u32>,
    pub fwmark: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedPeer {
    pub public_key: [u8; 32],
    pub preshared_key: Option<Secret>,
    /// Sorted, no duplicates: an exact-size slice (a set would allocate a whole tree node
    /// per peer for the usual one or two prefixes while a location is checked).
    pub allowed_ips: Box<[IpNet]>,
    pub persistent_keepalive: u16,
    pub endpoint: Option<SocketAddr>,
    pub id: u64,
    pub mfa_session: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedLocation {
    pub id: u64,
    pub name: String,
    pub interface: CheckedInterface,
    /// The peers, sorted by public key (each once): a vector, so that checking a large
    /// location holds each peer once and in exactly its size (see [`CheckedLocation::peer`]).
    pub peers: Vec<CheckedPeer>,
    pub mfa_enabled: bool,
    pub mfa_threshold_secs: u32,
}

impl CheckedLocation {
    /// The peer of `key` (O(log N)).
    pub fn peer(&self, key: &[u8; 32]) -> Option<&CheckedPeer> {
        self.peers
            .binary_search_by(|p| p.public_key.cmp(key))
            .ok()
            .map(|i| &self.peers[i])
    }
}

/// Validates a whole location; all problems are reported, not just the first.
pub fn validate_location(loc: &v1::Location) -> Result<CheckedLocation, Vec<Rejection>> {
    let mut c = check(loc);
    let mfa = loc.mfa.unwrap_or_default();
    let threshold = net::mfa_threshold(mfa.enabled, u64::from(mfa.disconnect_threshold_secs))
        .map_err(|e| c.errs.push("mfa.disconnect_threshold_secs", e))
        .ok();
    if let Err(e) = canonical_printable(&loc.name, MAX_TEXT) {
        c.errs.push("name", e);
    }
    if let Some(fw) = &loc.firewall {
        firewall::check_policy(fw, "firewall.", &mut c.errs);
    }
    let valid = c.valid_indices();
    c.errs.finish()?;
    let (Some(interface), Some(threshold)) = (c.interface, threshold) else {
        return Err(vec![Rejection::new("interface", "missing")]);
    };
    // Kept in their own vector (collected in place) and sorted in place (an unstable sort
    // takes no scratch memory). A valid location names each key once (a repeated key is
    // rejected), so the order among equal keys does not matter.
    let mut peers: Vec<CheckedPeer> = c
        .peers
        .into_iter()
        .enumerate()
        .filter_map(|(i, p)| p.filter(|_| valid.contains(&i)))
        .collect();
    peers.sort_unstable_by_key(|p| p.public_key);
    Ok(CheckedLocation {
        id: loc.id,
        name: loc.name.clone(),
        interface,
        peers,
        mfa_enabled: mfa.enabled,
        mfa_threshold_secs: threshold,
    })
}

/// The public keys of the peers that pass every rule on their own and against the others
/// (also when other items of the location are rejected).
pub fn valid_peer_keys(loc: &v1::Location) -> BTreeSet<[u8; 32]> {
    let c = check(loc);
    let valid = c.valid_indices();
    c.peers
        .into_iter()
        .enumerate()
        .filter(|(i, _)| valid.contains(i))
        .filter_map(|(_, p)| p.map(|p| p.public_key))
        .collect()
}

/// Every 32-byte public key the location lists, valid or not.
pub fn listed_peer_keys(loc: &v1::Location) -> BTreeSet<[u8; 32]> {
    loc.peers
        .iter()
        .filter_map(|p| keys::key32(&p.public_key).ok())
        .collect()
}

/// `peers[3].allowed_ips[0]` → (3, `allowed_ips[0]`): the peer a rejection names.
pub fn peer_item(item: &str) -> Option<(usize, String)> {
    let rest = item.strip_prefix("peers[")?;
    let (k, field) = rest.split_once("].")?;
    Some((k.parse().ok()?, field.to_owned()))
}

/// The interface and the peers, each checked on its own, then the peers against each other
/// and against the interface.
struct Checked {
    errs: Rejections,
    interface: Option<CheckedInterface>,
    peers: Vec<Option<CheckedPeer>>,
    /// Peers rejected for a conflict with another item.
    conflicted: BTreeSet<usize>,
}

impl Checked {
    fn valid_indices(&self) -> BTreeSet<usize> {
        (0..self.peers.len())
            .filter(|i| self.peers[*i].is_some() && !self.conflicted.contains(i))
            .collect()
    }
}

fn check(loc: &v1::Location) -> Checked {
    let mut errs = Rejections::default();
    let interface = match &loc.interface {
        Some(iface) => check_interface(iface, &mut errs),
        None => {
            errs.push("interface", "missing");
            None
        }
    };
    let peers: Vec<Option<CheckedPeer>> = loc
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| check_peer(i, p, &mut errs))
        .collect();
    let mut conflicted = BTreeSet::new();
    let own = interface.as_ref().map(|i| i.public_key);
    let mut seen: BTreeMap<[u8; 32], usize> = BTreeMap::new();
    for (i, p) in peers.iter().enumerate() {
        let Some(p) = p else { continue };
        if Some(p.public_key) == own {
            errs.push(
                format!("peers[{i}].public_key"),
                "is the location's own public key",
            );
            conflicted.insert(i);
        } else if let Some(first) = seen.insert(p.public_key, i) {
            seen.insert(p.public_key, first);
            errs.push(
                format!("peers[{i}].public_key"),
                format!("duplicate of peers[{first}].public_key"),
            );
            conflicted.insert(i);
        }
    }
    let mut entries: Vec<(IpNet, Holder<usize>)> = interface
        .as_ref()
        .map(|i| gateway_hosts(&i.addresses))
        .unwrap_or_default();
    for (i, p) in peers.iter().enumerate() {
        if let (Some(p), false) = (p, conflicted.contains(&i)) {
            entries.extend(p.allowed_ips.iter().map(|n| (*n, Holder::Peer(i))));
        }
    }
    let mut blamed: BTreeMap<(usize, IpNet), String> = BTreeMap::new();
    for o in find_overlaps(&entries) {
        if let Some(b) = o.blame() {
            let (i, net, other_net) = (b.peer, b.net, b.other_net);
            let whose = match b.other {
                Holder::Gateway => "the gateway's own address".to_string(),
                Holder::Peer(k) => format!("peers[{k}]'s {other_net}"),
            };
            blamed
                .entry((i, net))
                .or_insert_with(|| format!("{net} overlaps {whose} ({other_net})"));
        }
    }
    for ((i, net), reason) in blamed {
        let canon = net.to_string();
        let j = loc.peers[i]
            .allowed_ips
            .iter()
            .position(|s| *s == canon)
            .unwrap_or(0);
        errs.push(format!("peers[{i}].allowed_ips[{j}]"), reason);
        conflicted.insert(i);
    }
    Checked {
        errs,
        interface,
        peers,
        conflicted,
    }
}

pub(crate) fn check_interface(
    iface: &v1::Interface,
    errs: &mut Rejections,
) -> Option<CheckedInterface> {
    let private_key = keys::private_key(&iface.private_key)
        .map_err(|e| errs.push("interface.private_key", e))
        .ok();
    let listen_port = net::listen_port(u64::from(iface.listen_port))
        .map_err(|e| errs.push("interface.listen_port", e))
        .ok();
    let mtu = net::mtu(u64::from(iface.mtu))
        .map_err(|e| errs.push("interface.mtu", e))
        .ok();
    let mut addresses = BTreeSet::new();
    let mut ok = true;
    if iface.addresses.len() > MAX_ADDRESSES {
        errs.push(
            "interface.addresses",
            format!("more than {MAX_ADDRESSES} addresses"),
        );
        return None;
    }
    for (i, a) in iface.addresses.iter().enumerate() {
        match net::interface_address(a) {
            Ok(n) if addresses.insert(n) => {}
            Ok(_) => {
                errs.push(
                    format!("interface.addresses[{i}]"),
                    format!("duplicate {a}"),
                );
                ok = false;
            }
            Err(e) => {
                errs.push(format!("interface.addresses[{i}]"), e);
                ok = false;
            }
        }
    }
    let private_key = private_key?;
    let public_key = keys::public_of(&private_key);
    // WireGuard stores and reports the clamped form.
    let mut clamped = private_key;
    clamped[0] &= 248;
    clamped[31] &= 127;
    clamped[31] |= 64;
    (ok).then_some(())?;
    Some(CheckedInterface {
        private_key: Secret(clamped),
        public_key,
        listen_port: listen_port?,
        addresses,
        mtu: mtu?,
        fwmark: iface.fwmark,
    })
}

pub(crate) fn check_peer(i: usize, p: &v1::Peer, errs: &mut Rejections) -> Option<CheckedPeer> {
    let at = |field: &str| format!("peers[{i}].{field}");
    let public_key = keys::public_key(&p.public_key)
        .map_err(|e| errs.push(at("public_key"), e))
        .ok();
    let preshared_key = keys::preshared_key(&p.preshared_key)
        .map_err(|e| errs.push(at("preshared_key"), e))
        .ok();
    let keepalive = net::keepalive(u64::from(p.persistent_keepalive))
        .map_err(|e| errs.push(at("persistent_keepalive"), e))
        .ok();
    let endpoint = net::endpoint(&p.endpoint)
        .map_err(|e| errs.push(at("endpoint"), e))
        .ok();
    if p.allowed_ips.len() > MAX_ALLOWED_IPS {
        errs.push(
            at("allowed_ips"),
            format!("more than {MAX_ALLOWED_IPS} allowed IPs"),
        );
        return None;
    }
    let parsed: Vec<Result<IpNet, String>> =
        p.allowed_ips.iter().map(|a| net::allowed_ip(a)).collect();
    // Each prefix with its place, sorted: a repeat is the later place of two equal ones.
    let mut placed: Vec<(IpNet, usize)> = parsed
        .iter()
        .enumerate()
        .filter_map(|(j, r)| r.as_ref().ok().map(|n| (*n, j)))
        .collect();
    placed.sort_unstable();
    let repeats: BTreeSet<usize> = placed
        .windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| w[1].1)
        .collect();
    let mut ok = true;
    for (j, (a, r)) in p.allowed_ips.iter().zip(&parsed).enumerate() {
        match r {
            Ok(_) if !repeats.contains(&j) => {}
            Ok(_) => {
                errs.push(at(&format!("allowed_ips[{j}]")), format!("duplicate {a}"));
                ok = false;
            }
            Err(e) => {
                errs.push(at(&format!("allowed_ips[{j}]")), e.clone());
                ok = false;
            }
        }
    }
    ok.then_some(())?;
    let allowed_ips: Box<[IpNet]> = placed.into_iter().map(|(n, _)| n).collect();
    Some(CheckedPeer {
        public_key: public_key?,
        preshared_key: preshared_key?.map(Secret),
        allowed_ips,
        persistent_keepalive: keepalive?,
        endpoint: endpoint?,
        id: p.id,
        mfa_session: p.mfa_session,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(peers: Vec<v1::Peer>) -> v1::Location {
        v1::Location {
            id: 1,
            name: "test".into(),
            interface: Some(v1::Interface {
                private_key: vec![1; 32],
                listen_port: 51820,
                addresses: vec!["10.0.0.1/24".into(), "fd00::1/64".into()],
                mtu: 1420,
                fwmark: 0,
            }),
            peers,
            firewall: None,
            mfa: None,
        }
    }

    fn peer(k: u8, ips: &[&str]) -> v1::Peer {
        v1::Peer {
            public_key: keys::public_of(&[k; 32]).to_vec(),
            allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn items(loc: &v1::Location) -> Vec<String> {
        validate_location(loc)
            .unwrap_err()
            .into_iter()
            .map(|r| r.item)
            .collect()
    }

    /// A repeated prefix is named at each later place; a peer's prefixes are kept sorted.
    #[test]
    fn repeated_allowed_ips_are_named_and_kept_ones_sorted() {
        let dup = location(vec![peer(
            2,
            &[
                "10.0.0.7/32",
                "10.0.0.5/32",
                "10.0.0.7/32",
                "bad",
                "10.0.0.7/32",
            ],
        )]);
        assert_eq!(
            items(&dup),
            [
                "peers[0].allowed_ips[2]",
                "peers[0].allowed_ips[3]",
                "peers[0].allowed_ips[4]"
            ]
        );
        let ok =
            validate_location(&location(vec![peer(2, &["10.0.0.7/32", "10.0.0.5/32"])])).unwrap();
        let ips: Vec<String> = ok
            .peers
            .first()
            .unwrap()
            .allowed_ips
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(ips, ["10.0.0.5/32", "10.0.0.7/32"]);
    }

    #[test]
    fn a_valid_location() {
        let v = validate_location(&location(vec![
            peer(2, &["10.0.0.2/32", "10.1.0.0/16"]),
            peer(3, &["10.0.0.3/32", "fd00::3/128"]),
        ]))
        .unwrap();
        assert_eq!(v.peers.len(), 2);
        assert_eq!(v.interface.addresses.len(), 2);
        assert_eq!(v.interface.public_key, keys::public_of(&[1; 32]));
        let k = &v.interface.private_key.0;
        assert_eq!((k[0], k[31]), (0, 0x41), "clamped");
    }

    #[test]
    fn each_bad_item_is_named() {
        let mut loc = location(vec![
            peer(2, &["10.0.0.300/32"]),
            v1::Peer {
                public_key: vec![3; 31],
                ..Default::default()
            },
            peer(4, &["10.0.0.4/32"]),
            peer(4, &["10.0.0.5/32"]),
            peer(5, &["10.0.0.4/32"]),
            v1::Peer {
                preshared_key: vec![0; 32],
                ..peer(6, &[])
            },
            v1::Peer {
                endpoint: "1.2.3.4:0".into(),
                ..peer(7, &[])
            },
            v1::Peer {
                public_key: vec![0; 32],
                ..Default::default()
            },
            peer(8, &["0.0.0.0/0"]),
            peer(9, &["10.0.0.0/30"]),
            peer(10, &["10.0.0.2"]),
        ]);
        let iface = loc.interface.as_mut().unwrap();
        iface.listen_port = 0;
        iface.mtu = 100;
        iface.addresses.push(" 10.0.9.1/24".into());
        loc.name = "bad\u{7}".into();
        assert_eq!(
            items(&loc),
            vec![
                "interface.listen_port",
                "interface.mtu",
                "interface.addresses[2]",
                "peers[0].allowed_ips[0]",
                "peers[1].public_key",
                "peers[5].preshared_key",
                "peers[6].endpoint",
                "peers[7].public_key",
                "peers[8].allowed_ips[0]",
                "peers[10].allowed_ips[0]",
                "peers[3].public_key",
                "peers[4].allowed_ips[0]",
                "name",
            ]
        );
    }

    #[test]
    fn overlaps_are_named_and_leave_the_other_peers_valid() {
        let loc = location(vec![
            peer(2, &["10.0.0.2/32"]),
            peer(3, &["10.0.0.0/30"]),
            peer(4, &["10.7.0.0/16"]),
            peer(5, &["10.7.1.0/24"]),
            peer(6, &["10.0.0.6/32"]),
        ]);
        let errs = validate_location(&loc).unwrap_err();
        let got: Vec<(String, String)> = errs.into_iter().map(|r| (r.item, r.reason)).collect();
        assert_eq!(
            got,
            vec![
                (
                    "peers[1].allowed_ips[0]".into(),
                    "10.0.0.0/30 overlaps the gateway's own address (10.0.0.1/32)".into()
                ),
                (
                    "peers[3].allowed_ips[0]".into(),
                    "10.7.1.0/24 overlaps peers[2]'s 10.7.0.0/16 (10.7.0.0/16)".into()
                ),
            ]
        );
        let valid = valid_peer_keys(&loc);
        let k = |s: u8| keys::public_of(&[s; 32]);
        assert_eq!(valid, [k(2), k(4), k(6)].into_iter().collect());
        assert_eq!(listed_peer_keys(&loc).len(), 5);
    }

    #[test]
    fn own_key_and_zero_private_key() {
        let own = keys::public_of(&[1; 32]);
        let loc = location(vec![v1::Peer {
            public_key: own.to_vec(),
            ..Default::default()
        }]);
        assert_eq!(items(&loc), vec!["peers[0].public_key"]);
        let mut loc = location(vec![]);
        loc.interface.as_mut().unwrap().private_key = vec![0; 32];
        assert_eq!(items(&loc), vec!["interface.private_key"]);
    }

    #[test]
    fn missing_interface_and_mfa() {
        let mut loc = location(vec![]);
        loc.interface = None;
        loc.mfa = Some(v1::MfaSettings {
            enabled: true,
            disconnect_threshold_secs: 0,
        });
        assert_eq!(
            items(&loc),
            vec!["interface", "mfa.disconnect_threshold_secs"]
        );
    }

    #[test]
    fn rejections_are_capped() {
        let peers = (0..300).map(|_| peer(9, &[])).collect();
        let errs = validate_location(&location(peers)).unwrap_err();
        assert_eq!(errs.len(), crate::MAX_REJECTIONS + 1);
        assert!(errs.last().unwrap().reason.contains("more rejected"));
    }
}
