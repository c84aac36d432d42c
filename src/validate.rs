//! Validation of everything the Core sends: a `Location` (from a snapshot, or the result of
//! a delta) becomes a [`ValidLocation`] or a list of [`Rejection`]s naming each bad item.
//! Nothing of a rejected revision is applied. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use gatehouse_proto::v1;
use ipnet::IpNet;

use crate::mfa::MfaPolicy;
use crate::model::{Desired, InterfaceSpec, Key, PeerSpec, SecretKey};

/// Rejections listed in one `Applied` (more are summarized by a count).
pub const MAX_REJECTIONS: usize = 100;

/// One rejected item: `item` is a path such as `peers[3].allowed_ips[1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub item: String,
    pub reason: String,
}

impl Rejection {
    pub fn new(item: impl Into<String>, reason: impl Into<String>) -> Self {
        Rejection {
            item: item.into(),
            reason: reason.into(),
        }
    }

    pub fn to_proto(&self) -> v1::Rejection {
        v1::Rejection {
            item: self.item.clone(),
            reason: self.reason.clone(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.item, self.reason)
    }
}

/// What the Core knows about a peer beyond its WireGuard settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerMeta {
    pub id: u64,
    pub mfa_session: u64,
}

/// A location that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidLocation {
    pub name: String,
    pub desired: Desired,
    pub meta: BTreeMap<Key, PeerMeta>,
    /// Whether and after how long inactive peers are removed.
    pub mfa: MfaPolicy,
}

/// Validates a whole location. All problems are reported, not just the first.
pub fn validate_location(loc: &v1::Location) -> Result<ValidLocation, Vec<Rejection>> {
    let mut errs = Errors::default();
    let interface = match &loc.interface {
        Some(iface) => validate_interface(iface, &mut errs),
        None => {
            errs.push("interface", "missing");
            None
        }
    };
    let own_public = interface.as_ref().map(|i| i.private_key.public_key());

    let mut peers = BTreeMap::new();
    let mut meta = BTreeMap::new();
    let mut owners: BTreeMap<IpNet, usize> = BTreeMap::new();
    for (i, p) in loc.peers.iter().enumerate() {
        let Some(spec) = validate_peer(i, p, &mut errs) else {
            continue;
        };
        if Some(spec.public_key) == own_public {
            errs.push(
                format!("peers[{i}].public_key"),
                "is the interface's own public key",
            );
            continue;
        }
        if peers.contains_key(&spec.public_key) {
            errs.push(
                format!("peers[{i}].public_key"),
                format!("duplicate public key {}", spec.public_key),
            );
            continue;
        }
        for ip in &spec.allowed_ips {
            if let Some(other) = owners.insert(*ip, i) {
                errs.push(
                    format!("peers[{i}].allowed_ips"),
                    format!("{ip} is already allowed for peers[{other}]"),
                );
            }
        }
        meta.insert(
            spec.public_key,
            PeerMeta {
                id: p.id,
                mfa_session: p.mfa_session,
            },
        );
        peers.insert(spec.public_key, spec);
    }

    let mfa = loc.mfa.unwrap_or_default();
    let mfa =
        MfaPolicy::from_settings(mfa.enabled, mfa.disconnect_threshold_secs).unwrap_or_else(|_| {
            errs.push(
                "mfa.disconnect_threshold_secs",
                "must be > 0 when MFA is enabled",
            );
            MfaPolicy::Disabled
        });
    if let Some(fw) = &loc.firewall {
        validate_firewall(fw, &mut errs);
    }

    match (errs.finish(), interface) {
        (Ok(()), Some(interface)) => Ok(ValidLocation {
            name: loc.name.clone(),
            desired: Desired { interface, peers },
            meta,
            mfa,
        }),
        (Err(list), _) => Err(list),
        (Ok(()), None) => Err(vec![Rejection::new("interface", "missing")]),
    }
}

fn validate_interface(iface: &v1::Interface, errs: &mut Errors) -> Option<InterfaceSpec> {
    // Clamped here: WireGuard stores and reports the clamped form.
    let private_key = SecretKey::from_slice(&iface.private_key).map(|k| k.clamped());
    if private_key.is_none() {
        errs.push(
            "interface.private_key",
            format!("must be 32 bytes, got {}", iface.private_key.len()),
        );
    }
    let listen_port = u16::try_from(iface.listen_port).ok();
    if listen_port.is_none() {
        errs.push(
            "interface.listen_port",
            format!("{} is out of range 0..=65535", iface.listen_port),
        );
    }
    let mtu = match iface.mtu {
        0 => Some(None),
        1280..=9000 => Some(Some(iface.mtu)),
        other => {
            errs.push(
                "interface.mtu",
                format!("{other} is out of range 1280..=9000 (0 = default)"),
            );
            None
        }
    };
    let mut addresses = BTreeSet::new();
    for (i, a) in iface.addresses.iter().enumerate() {
        match parse_cidr(a) {
            Ok(net) => {
                if !addresses.insert(net) {
                    errs.push(
                        format!("interface.addresses[{i}]"),
                        format!("duplicate {a}"),
                    );
                }
            }
            Err(e) => errs.push(format!("interface.addresses[{i}]"), e),
        }
    }
    Some(InterfaceSpec {
        private_key: private_key?,
        listen_port: listen_port?,
        addresses,
        mtu: mtu?,
        fwmark: iface.fwmark,
    })
}

fn validate_peer(i: usize, p: &v1::Peer, errs: &mut Errors) -> Option<PeerSpec> {
    let at = |field: &str| format!("peers[{i}].{field}");
    let public_key = Key::from_slice(&p.public_key);
    if public_key.is_none() {
        errs.push(
            at("public_key"),
            format!("must be 32 bytes, got {}", p.public_key.len()),
        );
    }
    let preshared_key = if p.preshared_key.is_empty() {
        Some(None)
    } else {
        match SecretKey::from_slice(&p.preshared_key) {
            Some(k) => Some(Some(k)),
            None => {
                errs.push(
                    at("preshared_key"),
                    format!("must be 32 bytes or empty, got {}", p.preshared_key.len()),
                );
                None
            }
        }
    };
    let keepalive = u16::try_from(p.persistent_keepalive).ok();
    if keepalive.is_none() {
        errs.push(
            at("persistent_keepalive"),
            format!("{} is out of range 0..=65535", p.persistent_keepalive),
        );
    }
    let endpoint = if p.endpoint.is_empty() {
        Some(None)
    } else {
        match p.endpoint.parse::<SocketAddr>() {
            Ok(e) if e.port() != 0 => Some(Some(e)),
            _ => {
                errs.push(
                    at("endpoint"),
                    format!("not ip:port or [ip6]:port: {:?}", p.endpoint),
                );
                None
            }
        }
    };
    let mut allowed_ips = BTreeSet::new();
    let mut ok = true;
    for (j, a) in p.allowed_ips.iter().enumerate() {
        match parse_cidr(a) {
            Ok(net) => {
                if !allowed_ips.insert(net.trunc()) {
                    errs.push(
                        format!("peers[{i}].allowed_ips[{j}]"),
                        format!("duplicate {a}"),
                    );
                    ok = false;
                }
            }
            Err(e) => {
                errs.push(format!("peers[{i}].allowed_ips[{j}]"), e);
                ok = false;
            }
        }
    }
    if !ok {
        return None;
    }
    Some(PeerSpec {
        public_key: public_key?,
        preshared_key: preshared_key?,
        allowed_ips,
        persistent_keepalive: keepalive?,
        endpoint: endpoint?,
    })
}

fn validate_firewall(fw: &v1::FirewallPolicy, errs: &mut Errors) {
    for (i, rule) in fw.rules.iter().enumerate() {
        let specs = rule
            .sources
            .iter()
            .map(|s| ("sources", s))
            .chain(rule.destinations.iter().map(|s| ("destinations", s)));
        for (j, (field, spec)) in specs.enumerate() {
            if let Err(e) = parse_address_spec(spec) {
                let k = if field == "sources" {
                    j
                } else {
                    j - rule.sources.len()
                };
                errs.push(format!("firewall.rules[{i}].{field}[{k}]"), e);
            }
        }
        for (j, r) in rule.ports.iter().enumerate() {
            if r.start == 0 || r.start > r.end || r.end > 65535 {
                errs.push(
                    format!("firewall.rules[{i}].ports[{j}]"),
                    format!("bad port range {}-{}", r.start, r.end),
                );
            }
        }
        if !matches!(
            v1::Verdict::try_from(rule.verdict),
            Ok(v1::Verdict::Accept | v1::Verdict::Drop)
        ) {
            errs.push(
                format!("firewall.rules[{i}].verdict"),
                format!("verdict {} is not accept or drop", rule.verdict),
            );
        }
        for (j, p) in rule.protocols.iter().enumerate() {
            if !matches!(
                v1::Protocol::try_from(*p),
                Ok(v1::Protocol::Tcp | v1::Protocol::Udp | v1::Protocol::Icmp)
            ) {
                errs.push(
                    format!("firewall.rules[{i}].protocols[{j}]"),
                    format!("unknown protocol {p}"),
                );
            }
        }
        // Ports apply to TCP and UDP; a rule with ports and only ICMP could match nothing.
        if !rule.ports.is_empty()
            && !rule.protocols.is_empty()
            && rule
                .protocols
                .iter()
                .all(|p| *p == v1::Protocol::Icmp as i32)
        {
            errs.push(format!("firewall.rules[{i}].ports"), "ports with only ICMP");
        }
    }
    // A disabled policy is not enforced; an enabled one needs its default.
    if fw.enabled
        && !matches!(
            v1::Verdict::try_from(fw.default_verdict),
            Ok(v1::Verdict::Accept | v1::Verdict::Drop)
        )
    {
        errs.push(
            "firewall.default_verdict",
            format!("verdict {} is not accept or drop", fw.default_verdict),
        );
    }
}

/// Parses `10.0.0.0/24`, `fd00::/64`, or a bare address (a /32 or /128). Host bits are kept.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    match s.parse::<IpAddr>() {
        Ok(ip) => Ok(IpNet::from(ip)),
        Err(_) => Err(format!("not a CIDR: {s:?}")),
    }
}

/// A firewall address: a CIDR, a bare address or a range `a-b` of the same family.
pub fn parse_address_spec(s: &str) -> Result<(), String> {
    if let Some((a, b)) = s.split_once('-') {
        let (a, b) = (a.trim().parse::<IpAddr>(), b.trim().parse::<IpAddr>());
        return match (a, b) {
            (Ok(a), Ok(b)) if a.is_ipv4() == b.is_ipv4() && a <= b => Ok(()),
            _ => Err(format!("not an address range: {s:?}")),
        };
    }
    parse_cidr(s).map(|_| ())
}

#[derive(Default)]
struct Errors {
    list: Vec<Rejection>,
    dropped: usize,
}

impl Errors {
    fn push(&mut self, item: impl Into<String>, reason: impl Into<String>) {
        if self.list.len() < MAX_REJECTIONS {
            self.list.push(Rejection::new(item, reason));
        } else {
            self.dropped += 1;
        }
    }

    fn finish(mut self) -> Result<(), Vec<Rejection>> {
        if self.dropped > 0 {
            self.list.push(Rejection::new(
                "...",
                format!("{} more rejected items not listed", self.dropped),
            ));
        }
        if self.list.is_empty() {
            Ok(())
        } else {
            Err(self.list)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn location(peers: Vec<v1::Peer>) -> v1::Location {
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
            public_key: vec![k; 32],
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

    #[test]
    fn valid_location_normalizes_allowed_ips() {
        let v = validate_location(&location(vec![peer(2, &["10.0.0.2", "10.1.2.3/16"])])).unwrap();
        let p = &v.desired.peers[&Key([2; 32])];
        let ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
        assert_eq!(ips, vec!["10.0.0.2/32", "10.1.0.0/16"]);
        assert_eq!(v.desired.interface.addresses.len(), 2);
        assert_eq!(v.mfa, MfaPolicy::Disabled);
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
                preshared_key: vec![1; 3],
                ..peer(6, &[])
            },
            v1::Peer {
                persistent_keepalive: 70000,
                ..peer(7, &[])
            },
        ]);
        let iface = loc.interface.as_mut().unwrap();
        iface.listen_port = 70000;
        iface.mtu = 100;
        iface.private_key = vec![0; 5];
        iface.addresses.push("nonsense".into());
        assert_eq!(
            items(&loc),
            vec![
                "interface.private_key",
                "interface.listen_port",
                "interface.mtu",
                "interface.addresses[2]",
                "peers[0].allowed_ips[0]",
                "peers[1].public_key",
                "peers[3].public_key",
                "peers[4].allowed_ips",
                "peers[5].preshared_key",
                "peers[6].persistent_keepalive",
            ]
        );
    }

    #[test]
    fn duplicate_key_and_shared_allowed_ip_are_explained() {
        let errs = validate_location(&location(vec![
            peer(4, &["10.0.0.4/32"]),
            peer(5, &["10.0.0.4"]),
        ]))
        .unwrap_err();
        assert_eq!(
            errs[0].reason,
            "10.0.0.4/32 is already allowed for peers[0]"
        );
    }

    #[test]
    fn own_public_key_as_peer_is_rejected() {
        let own = SecretKey::new([1; 32]).public_key();
        let loc = location(vec![v1::Peer {
            public_key: own.0.to_vec(),
            ..Default::default()
        }]);
        assert_eq!(items(&loc), vec!["peers[0].public_key"]);
    }

    #[test]
    fn private_key_is_clamped_like_wireguard_does() {
        let mut loc = location(vec![]);
        loc.interface.as_mut().unwrap().private_key = vec![0xff; 32];
        let v = validate_location(&loc).unwrap();
        let k = v.desired.interface.private_key.expose();
        assert_eq!((k[0], k[31]), (0xf8, 0x7f));
        assert_eq!(
            v.desired.interface.private_key.public_key(),
            SecretKey::new([0xff; 32]).public_key()
        );
    }

    #[test]
    fn mfa_needs_a_threshold() {
        let mut loc = location(vec![]);
        loc.mfa = Some(v1::MfaSettings {
            enabled: true,
            disconnect_threshold_secs: 0,
        });
        assert_eq!(items(&loc), vec!["mfa.disconnect_threshold_secs"]);
        loc.mfa = Some(v1::MfaSettings {
            enabled: true,
            disconnect_threshold_secs: 600,
        });
        assert_eq!(
            validate_location(&loc).unwrap().mfa.threshold(),
            Some(std::time::Duration::from_secs(600))
        );
    }

    #[test]
    fn missing_interface_and_bad_endpoint() {
        let mut loc = location(vec![v1::Peer {
            endpoint: "1.2.3.4".into(),
            ..peer(2, &[])
        }]);
        loc.interface = None;
        assert_eq!(items(&loc), vec!["interface", "peers[0].endpoint"]);
    }

    #[test]
    fn firewall_specs_are_checked() {
        let mut loc = location(vec![]);
        loc.firewall = Some(v1::FirewallPolicy {
            enabled: true,
            default_verdict: v1::Verdict::Drop as i32,
            rules: vec![v1::FirewallRule {
                sources: vec!["10.0.0.1-10.0.0.9".into(), "10.0.0.9-10.0.0.1".into()],
                destinations: vec!["fd00::/64".into(), "x".into()],
                ports: vec![v1::PortRange { start: 80, end: 79 }],
                verdict: v1::Verdict::Accept as i32,
                ..Default::default()
            }],
        });
        assert_eq!(
            items(&loc),
            vec![
                "firewall.rules[0].sources[1]",
                "firewall.rules[0].destinations[1]",
                "firewall.rules[0].ports[0]",
            ]
        );
    }

    #[test]
    fn firewall_verdicts_protocols_and_icmp_ports_are_checked() {
        let mut loc = location(vec![]);
        loc.firewall = Some(v1::FirewallPolicy {
            enabled: true,
            default_verdict: v1::Verdict::Unspecified as i32,
            rules: vec![
                v1::FirewallRule {
                    verdict: v1::Verdict::Unspecified as i32,
                    protocols: vec![9],
                    ..Default::default()
                },
                v1::FirewallRule {
                    ports: vec![v1::PortRange { start: 1, end: 2 }],
                    protocols: vec![v1::Protocol::Icmp as i32],
                    verdict: v1::Verdict::Drop as i32,
                    ..Default::default()
                },
            ],
        });
        assert_eq!(
            items(&loc),
            vec![
                "firewall.rules[0].verdict",
                "firewall.rules[0].protocols[0]",
                "firewall.rules[1].ports",
                "firewall.default_verdict",
            ]
        );
    }

    #[test]
    fn rejections_are_capped() {
        let peers = (0..300).map(|_| peer(9, &[])).collect();
        let errs = validate_location(&location(peers)).unwrap_err();
        assert_eq!(errs.len(), MAX_REJECTIONS + 1);
        assert!(errs.last().unwrap().reason.contains("more rejected"));
    }
}
