//! Admin input checked with the shared rules (`gatehouse-validate`, the code every gateway
//! validates with): each failure names the offending field (e.g. `allowed_ips[1]`), and what
//! passes is returned in the canonical form the Core stores (whitespace trimmed, a bare
//! address written as a /32 or /128, endpoints as `ip:port`). Checks across items (overlaps,
//! the location's own key) run on the whole location in [`cross_check`].

use std::collections::BTreeSet;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use gatehouse_proto::v1 as pb;
use gatehouse_validate as rules;
use ipnet::IpNet;

use crate::api;
use crate::error::CoreError;

type Result<T> = std::result::Result<T, CoreError>;

fn decode32(field: &str, s: &str) -> Result<Vec<u8>> {
    B64.decode(s.trim())
        .map_err(|_| CoreError::invalid(field, "not base64"))
}

/// A peer's public key in base64: 32 bytes, not of low order.
pub fn public_key(field: &str, s: &str) -> Result<[u8; 32]> {
    rules::keys::public_key(&decode32(field, s)?).map_err(|e| CoreError::invalid(field, e))
}

/// A private key in base64: 32 bytes, not all zero.
pub fn private_key(field: &str, s: &str) -> Result<[u8; 32]> {
    rules::keys::private_key(&decode32(field, s)?).map_err(|e| CoreError::invalid(field, e))
}

/// A preshared key in base64: 32 bytes, not all zero.
pub fn preshared_key(field: &str, s: &str) -> Result<[u8; 32]> {
    let bytes = decode32(field, s)?;
    match rules::keys::preshared_key(&bytes) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(CoreError::invalid(field, "must be 32 bytes")),
        Err(e) => Err(CoreError::invalid(field, e)),
    }
}

/// Allowed IPs in canonical form (a bare address is a /32 or /128; host bits set and `/0`
/// are errors), without repeats. Each keeps the index it had in the input, so a later
/// conflict can name the field the user wrote.
pub fn allowed_ips(field: &str, items: &[String]) -> Result<Vec<(usize, String)>> {
    if items.len() > rules::location::MAX_ALLOWED_IPS {
        return Err(CoreError::invalid(field, "too many allowed IPs"));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (i, s) in items.iter().enumerate() {
        let net = rules::net::normalize_allowed_ip(s)
            .map_err(|e| CoreError::invalid(format!("{field}[{i}]"), e))?;
        if seen.insert(net) {
            out.push((i, net.to_string()));
        }
    }
    Ok(out)
}

/// The stored form of validated allowed IPs: sorted by network.
pub fn sorted_ips(ips: &[(usize, String)]) -> Vec<String> {
    let mut nets: Vec<IpNet> = ips.iter().filter_map(|(_, s)| s.parse().ok()).collect();
    nets.sort();
    nets.into_iter().map(|n| n.to_string()).collect()
}

/// Interface addresses: unicast, not `/0`, host bits kept (they are the gateway's own).
pub fn addresses(field: &str, items: &[String]) -> Result<Vec<String>> {
    if items.len() > rules::location::MAX_ADDRESSES {
        return Err(CoreError::invalid(field, "too many addresses"));
    }
    let mut out = BTreeSet::new();
    for (i, s) in items.iter().enumerate() {
        let net = rules::net::normalize_interface_address(s)
            .map_err(|e| CoreError::invalid(format!("{field}[{i}]"), e))?;
        out.insert(net);
    }
    Ok(out.into_iter().map(|n| n.to_string()).collect())
}

/// The location's name: trimmed, bounded, printable.
pub fn name(s: &str) -> Result<String> {
    rules::text::normalize_printable(s, rules::text::MAX_TEXT)
        .map_err(|e| CoreError::invalid("name", e))
}

/// 1..=65535: gateways behind one floating address share it.
pub fn listen_port(v: u64) -> Result<u16> {
    rules::net::listen_port(v).map_err(|e| CoreError::invalid("listen_port", e))
}

/// 0 (kernel default) or 1280..=9000.
pub fn mtu(v: u64) -> Result<u32> {
    rules::net::mtu(v)
        .map(|m| m.unwrap_or(0))
        .map_err(|e| CoreError::invalid("mtu", e))
}

pub fn fwmark(v: u64) -> Result<u32> {
    u32::try_from(v).map_err(|_| CoreError::invalid("fwmark", "must fit in 32 bits"))
}

/// Seconds, 0 = off, at most 65535.
pub fn keepalive(v: u64) -> Result<u16> {
    rules::net::keepalive(v).map_err(|e| CoreError::invalid("persistent_keepalive", e))
}

/// The MFA threshold: must be > 0 when MFA is on.
pub fn threshold(mfa: bool, v: u64) -> Result<u32> {
    rules::net::mfa_threshold(mfa, v)
        .map_err(|e| CoreError::invalid("disconnect_threshold_secs", e))
}

/// "ip:port" / "[ip6]:port" (port not 0), in canonical form; empty = none.
pub fn endpoint(s: &str) -> Result<Option<String>> {
    rules::net::normalize_endpoint(s)
        .map(|a| a.map(|a| a.to_string()))
        .map_err(|e| CoreError::invalid("endpoint", e))
}

/// Normalizes a firewall policy in place (address specs and comments in canonical form),
/// then checks it as a gateway will.
pub fn firewall(p: &mut api::FirewallPolicy) -> Result<()> {
    for (r, rule) in p.rules.iter_mut().enumerate() {
        for (field, list) in [
            ("sources", &mut rule.sources),
            ("destinations", &mut rule.destinations),
        ] {
            for (i, s) in list.iter_mut().enumerate() {
                *s = rules::firewall::normalize_address_spec(s)
                    .map_err(|e| CoreError::invalid(format!("rules[{r}].{field}[{i}]"), e))?;
            }
        }
        rule.comment = rules::text::normalize_printable(&rule.comment, rules::text::MAX_TEXT)
            .map_err(|e| CoreError::invalid(format!("rules[{r}].comment"), e))?;
    }
    let mut errs = rules::Rejections::default();
    rules::firewall::check_policy(&crate::store::firewall_pb(Some(p)), "", &mut errs);
    match errs.finish() {
        Ok(()) => Ok(()),
        Err(list) => Err(first_invalid(list)),
    }
}

fn first_invalid(list: Vec<rules::Rejection>) -> CoreError {
    match list.into_iter().next() {
        Some(r) => CoreError::invalid(r.item, r.reason),
        None => CoreError::Internal("empty rejection list".into()),
    }
}

/// A whole location checked across items as a gateway will, with the peers being changed
/// (`changed`) listed last so that a conflict between an unchanged and a changed peer is
/// blamed on the changed one. Returns the rejections of the changed peers (by their position
/// in `changed`, with the field inside the peer) and those of the location itself; those of
/// unchanged peers are the start-up audit's to report.
pub fn cross_check(
    interface: pb::Interface,
    unchanged: Vec<pb::Peer>,
    changed: Vec<pb::Peer>,
) -> CrossCheck {
    let first_changed = unchanged.len();
    let mut peers = unchanged;
    peers.extend(changed);
    let loc = pb::Location {
        interface: Some(interface),
        peers,
        ..Default::default()
    };
    let mut out = CrossCheck::default();
    let Err(list) = rules::validate_location(&loc) else {
        return out;
    };
    for r in list {
        match rules::location::peer_item(&r.item) {
            Some((k, field)) if k >= first_changed => {
                let allowed_ips = &loc.peers[k].allowed_ips;
                out.peers
                    .push((k - first_changed, field, r.reason, allowed_ips.clone()));
            }
            Some((k, field)) => out.unchanged.push((k, field, r.reason)),
            None => out.location.push(r),
        }
    }
    out
}

/// What [`cross_check`] found.
#[derive(Debug, Default)]
pub struct CrossCheck {
    /// (position among the changed peers, field inside the peer, reason, its stored allowed IPs).
    pub peers: Vec<(usize, String, String, Vec<String>)>,
    pub location: Vec<rules::Rejection>,
    /// Rejections of unchanged peers: (position, field, reason).
    pub unchanged: Vec<(usize, String, String)>,
}

impl CrossCheck {
    /// Only the changed peers' problems (a peer change is not refused for a location-level
    /// problem stored earlier: the start-up audit reports those).
    pub fn only_peers(mut self) -> Self {
        self.location.clear();
        self
    }

    /// The first problem as an admin error: `field_of(position, field, stored allowed IPs)`
    /// names the field as the request wrote it.
    pub fn into_result(self, field_of: impl Fn(usize, &str, &[String]) -> String) -> Result<()> {
        if let Some((k, field, reason, ips)) = self.peers.into_iter().next() {
            return Err(CoreError::conflict(field_of(k, &field, &ips), reason));
        }
        if let Some(r) = self.location.into_iter().next() {
            let field = r
                .item
                .strip_prefix("interface.")
                .unwrap_or(&r.item)
                .to_owned();
            return Err(CoreError::invalid(field, r.reason));
        }
        Ok(())
    }
}

/// Maps `allowed_ips[j]` of the stored (sorted) list back to the index the request used.
pub fn request_field(field: &str, stored: &[String], request: &[(usize, String)]) -> String {
    let Some(j) = field
        .strip_prefix("allowed_ips[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|j| j.parse::<usize>().ok())
    else {
        return field.to_owned();
    };
    let i = stored
        .get(j)
        .and_then(|s| request.iter().find(|(_, r)| r == s))
        .map_or(j, |(i, _)| *i);
    format!("allowed_ips[{i}]")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: CoreError) -> Option<String> {
        match e {
            CoreError::Invalid { field, .. } | CoreError::Conflict { field, .. } => field,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn pk(seed: u8) -> String {
        B64.encode(rules::keys::public_of(&[seed; 32]))
    }

    #[test]
    fn keys_are_checked_with_the_shared_rules() {
        assert!(public_key("k", &format!(" {} ", pk(7))).is_ok());
        assert_eq!(
            field_of(public_key("public_key", &B64.encode([7u8; 31])).unwrap_err()),
            Some("public_key".into())
        );
        assert!(public_key("k", "not base64!").is_err());
        assert!(
            public_key("k", &B64.encode([0u8; 32])).is_err(),
            "low order"
        );
        assert!(private_key("k", &B64.encode([0u8; 32])).is_err());
        assert!(preshared_key("k", &B64.encode([0u8; 32])).is_err());
        assert!(preshared_key("k", &B64.encode([5u8; 32])).is_ok());
    }

    #[test]
    fn allowed_ips_are_normalized_and_deduplicated() {
        let got = allowed_ips(
            "allowed_ips",
            &[
                " 10.0.0.0/24".into(),
                "10.0.0.0/24".into(),
                "fd00::1".into(),
                "192.168.1.1".into(),
            ],
        )
        .unwrap();
        let indices: Vec<usize> = got.iter().map(|(i, _)| *i).collect();
        assert_eq!(
            indices,
            vec![0, 2, 3],
            "the repeat is dropped, indices kept"
        );
        assert_eq!(
            sorted_ips(&got),
            vec!["10.0.0.0/24", "192.168.1.1/32", "fd00::1/128"]
        );
    }

    #[test]
    fn bad_prefixes_name_their_index() {
        for bad in ["10.0.0.300/32", "10.0.0.7/24", "0.0.0.0/0", "::/0"] {
            let e = allowed_ips("allowed_ips", &["10.0.0.0/24".into(), bad.into()]).unwrap_err();
            assert_eq!(field_of(e), Some("allowed_ips[1]".into()), "{bad}");
        }
    }

    #[test]
    fn interface_addresses_keep_host_bits() {
        assert_eq!(
            addresses("addresses", &[" 10.0.0.1/24".into()]).unwrap(),
            vec!["10.0.0.1/24"]
        );
        assert!(addresses("addresses", &["0.0.0.0/0".into()]).is_err());
        assert!(addresses("addresses", &["224.0.0.1/24".into()]).is_err());
    }

    #[test]
    fn ranges() {
        assert!(listen_port(65535).is_ok());
        assert!(listen_port(0).is_err());
        assert!(listen_port(65536).is_err());
        assert!(mtu(0).is_ok() && mtu(1280).is_ok() && mtu(9000).is_ok());
        assert!(mtu(1279).is_err() && mtu(9001).is_err());
        assert!(keepalive(70000).is_err());
        assert!(threshold(true, 0).is_err());
        assert!(threshold(false, 0).is_ok());
        assert_eq!(name("  office ").unwrap(), "office");
        assert!(name("a\nb").is_err());
    }

    #[test]
    fn endpoints_are_canonical() {
        assert_eq!(
            endpoint(" [fd00::1]:51820").unwrap(),
            Some("[fd00::1]:51820".into())
        );
        assert_eq!(endpoint("").unwrap(), None);
        assert!(endpoint("host:1").is_err());
        assert!(endpoint("1.2.3.4:0").is_err());
    }

    #[test]
    fn firewall_is_normalized_then_checked() {
        let mut p = api::FirewallPolicy {
            enabled: true,
            default_verdict: api::Verdict::Drop,
            rules: vec![api::FirewallRule {
                priority: 1,
                sources: vec![" 10.0.0.0/8".into(), "10.0.0.1/32".into()],
                destinations: vec!["10.0.0.5 - 10.0.0.9".into()],
                ports: vec![],
                protocols: vec![api::Protocol::Tcp],
                verdict: api::Verdict::Accept,
                comment: " ssh ".into(),
            }],
        };
        firewall(&mut p).unwrap();
        assert_eq!(p.rules[0].sources, vec!["10.0.0.0/8", "10.0.0.1"]);
        assert_eq!(p.rules[0].destinations, vec!["10.0.0.5-10.0.0.9"]);
        assert_eq!(p.rules[0].comment, "ssh");
        p.rules[0].ports = vec![api::PortRange { start: 90, end: 80 }];
        assert_eq!(
            field_of(firewall(&mut p).unwrap_err()),
            Some("rules[0].ports[0]".into())
        );
        p.rules[0].ports = vec![api::PortRange { start: 80, end: 80 }];
        p.rules[0].protocols = vec![api::Protocol::Icmp];
        assert_eq!(
            field_of(firewall(&mut p).unwrap_err()),
            Some("rules[0].ports".into())
        );
        p.rules[0].sources = vec!["10.0.0.1/24".into()];
        assert_eq!(
            field_of(firewall(&mut p).unwrap_err()),
            Some("rules[0].sources[0]".into())
        );
    }

    #[test]
    fn cross_check_blames_the_changed_peer() {
        let iface = pb::Interface {
            private_key: vec![1; 32],
            listen_port: 51820,
            addresses: vec!["10.0.0.1/24".into()],
            ..Default::default()
        };
        let peer = |seed: u8, ip: &str| pb::Peer {
            public_key: rules::keys::public_of(&[seed; 32]).to_vec(),
            allowed_ips: vec![ip.into()],
            ..Default::default()
        };
        let c = cross_check(
            iface.clone(),
            vec![peer(2, "10.0.0.2/32")],
            vec![peer(3, "10.0.0.0/30")],
        );
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].0, 0);
        assert_eq!(c.peers[0].1, "allowed_ips[0]");
        // The changed peer overlaps the unchanged one only: still the changed one is named.
        let c = cross_check(
            iface.clone(),
            vec![peer(2, "10.9.0.0/16")],
            vec![peer(3, "10.9.1.0/24")],
        );
        assert_eq!(c.peers.len(), 1);
        let c = cross_check(
            iface,
            vec![peer(2, "10.9.1.0/24")],
            vec![peer(3, "10.9.0.0/16")],
        );
        assert_eq!(c.peers.len(), 1, "{c:?}");
        assert!(c.location.is_empty());
        assert_eq!(
            request_field(
                "allowed_ips[1]",
                &["a".into(), "b".into()],
                &[(4, "b".into())]
            ),
            "allowed_ips[4]"
        );
    }
}
