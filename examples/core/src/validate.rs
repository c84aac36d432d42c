//! Pure validation of admin input: keys, CIDRs, ports, MTU, endpoints, firewall specs.
//! Each failure names the offending field (e.g. `allowed_ips[1]`).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ipnet::IpNet;

use crate::api;
use crate::error::CoreError;

type Result<T> = std::result::Result<T, CoreError>;

/// A 32-byte key in base64.
pub fn key(field: &str, s: &str) -> Result<[u8; 32]> {
    let bytes = B64
        .decode(s.trim())
        .map_err(|_| CoreError::invalid(field, "not base64"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| CoreError::invalid(field, "a key must be 32 bytes in base64"))
}

/// Allowed IPs, normalized as WireGuard stores them (host bits cleared; a bare address
/// is a /32 or /128), without repeats. Each keeps the index it had in the input, so a
/// later conflict can name the field the user wrote.
pub fn allowed_ips(field: &str, items: &[String]) -> Result<Vec<(usize, String)>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (i, s) in items.iter().enumerate() {
        let net = cidr(s).ok_or_else(|| {
            CoreError::invalid(format!("{field}[{i}]"), format!("not a CIDR: {s:?}"))
        })?;
        let net = net.trunc();
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

/// Interface addresses: CIDR with host bits kept (they are the gateway's own addresses).
pub fn addresses(field: &str, items: &[String]) -> Result<Vec<String>> {
    let mut out = BTreeSet::new();
    for (i, s) in items.iter().enumerate() {
        let net = cidr(s).ok_or_else(|| {
            CoreError::invalid(format!("{field}[{i}]"), format!("not a CIDR: {s:?}"))
        })?;
        out.insert(net);
    }
    Ok(out.into_iter().map(|n| n.to_string()).collect())
}

fn cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if s.contains('/') {
        s.parse().ok()
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    }
}

/// 0 (the kernel chooses) ..= 65535.
pub fn listen_port(v: u64) -> Result<u16> {
    u16::try_from(v).map_err(|_| CoreError::invalid("listen_port", "must be 0..=65535"))
}

/// 0 (kernel default) or 1280..=9000.
pub fn mtu(v: u64) -> Result<u32> {
    if v == 0 || (1280..=9000).contains(&v) {
        Ok(v as u32)
    } else {
        Err(CoreError::invalid("mtu", "must be 0 or 1280..=9000"))
    }
}

pub fn fwmark(v: u64) -> Result<u32> {
    u32::try_from(v).map_err(|_| CoreError::invalid("fwmark", "must fit in 32 bits"))
}

/// Seconds, 0 = off, at most 65535.
pub fn keepalive(v: u64) -> Result<u16> {
    u16::try_from(v).map_err(|_| CoreError::invalid("persistent_keepalive", "must be 0..=65535"))
}

/// The MFA threshold: must be > 0 when MFA is on.
pub fn threshold(mfa: bool, v: u64) -> Result<u32> {
    let t = u32::try_from(v)
        .map_err(|_| CoreError::invalid("disconnect_threshold_secs", "must fit in 32 bits"))?;
    if mfa && t == 0 {
        return Err(CoreError::invalid(
            "disconnect_threshold_secs",
            "must be > 0 when mfa is enabled",
        ));
    }
    Ok(t)
}

/// "ip:port" / "[ip6]:port", in canonical form; empty = none.
pub fn endpoint(s: &str) -> Result<Option<String>> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = s
        .trim()
        .parse()
        .map_err(|_| CoreError::invalid("endpoint", "not ip:port or [ip6]:port"))?;
    Ok(Some(addr.to_string()))
}

/// A firewall address spec: an address, a CIDR or a range `a-b` of one family, a <= b.
pub fn address_spec(field: &str, s: &str) -> Result<()> {
    let bad = || CoreError::invalid(field, format!("not an address, CIDR or range: {s:?}"));
    if let Some((a, b)) = s.split_once('-') {
        let a: IpAddr = a.trim().parse().map_err(|_| bad())?;
        let b: IpAddr = b.trim().parse().map_err(|_| bad())?;
        if a.is_ipv4() != b.is_ipv4() || a > b {
            return Err(bad());
        }
        Ok(())
    } else {
        cidr(s).map(|_| ()).ok_or_else(bad)
    }
}

/// Checks every part of a firewall policy.
pub fn firewall(p: &api::FirewallPolicy) -> Result<()> {
    for (r, rule) in p.rules.iter().enumerate() {
        for (i, s) in rule.sources.iter().enumerate() {
            address_spec(&format!("rules[{r}].sources[{i}]"), s)?;
        }
        for (i, s) in rule.destinations.iter().enumerate() {
            address_spec(&format!("rules[{r}].destinations[{i}]"), s)?;
        }
        for (i, pr) in rule.ports.iter().enumerate() {
            if pr.start == 0 || pr.end > 65535 || pr.start > pr.end {
                return Err(CoreError::invalid(
                    format!("rules[{r}].ports[{i}]"),
                    "ports must be 1..=65535 with start <= end",
                ));
            }
        }
        // Ports apply to TCP and UDP: ports with only ICMP would match nothing.
        if !rule.ports.is_empty()
            && !rule.protocols.is_empty()
            && rule.protocols.iter().all(|p| *p == api::Protocol::Icmp)
        {
            return Err(CoreError::invalid(
                format!("rules[{r}].ports"),
                "ports with only ICMP",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: CoreError) -> Option<String> {
        match e {
            CoreError::Invalid { field, .. } => field,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn keys_must_be_32_bytes_of_base64() {
        assert!(key("k", &B64.encode([7u8; 32])).is_ok());
        assert_eq!(
            field_of(key("public_key", &B64.encode([7u8; 31])).unwrap_err()),
            Some("public_key".into())
        );
        assert!(key("k", "not base64!").is_err());
    }

    #[test]
    fn allowed_ips_are_normalized_and_deduplicated() {
        let got = allowed_ips(
            "allowed_ips",
            &[
                "10.0.0.7/24".into(),
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
    fn bad_cidr_names_its_index() {
        let e = allowed_ips(
            "allowed_ips",
            &["10.0.0.0/24".into(), "10.0.0.300/32".into()],
        )
        .unwrap_err();
        assert_eq!(field_of(e), Some("allowed_ips[1]".into()));
        assert!(allowed_ips("a", &["10.0.0.0/33".into()]).is_err());
    }

    #[test]
    fn interface_addresses_keep_host_bits() {
        assert_eq!(
            addresses("addresses", &["10.0.0.1/24".into()]).unwrap(),
            vec!["10.0.0.1/24"]
        );
    }

    #[test]
    fn ranges() {
        assert!(listen_port(65535).is_ok());
        assert!(listen_port(65536).is_err());
        assert!(mtu(0).is_ok() && mtu(1280).is_ok() && mtu(9000).is_ok());
        assert!(mtu(1279).is_err() && mtu(9001).is_err());
        assert!(keepalive(70000).is_err());
        assert!(threshold(true, 0).is_err());
        assert!(threshold(false, 0).is_ok());
    }

    #[test]
    fn endpoints_are_canonical() {
        assert_eq!(
            endpoint("[fd00::1]:51820").unwrap(),
            Some("[fd00::1]:51820".into())
        );
        assert_eq!(endpoint("").unwrap(), None);
        assert!(endpoint("host:1").is_err());
    }

    #[test]
    fn firewall_specs() {
        assert!(address_spec("x", "10.0.0.5-10.0.0.9").is_ok());
        assert!(address_spec("x", "10.0.0.9-10.0.0.5").is_err());
        assert!(address_spec("x", "10.0.0.1-fd00::1").is_err());
        assert!(address_spec("x", "fd00::/64").is_ok());
        let p = api::FirewallPolicy {
            enabled: true,
            default_verdict: api::Verdict::Drop,
            rules: vec![api::FirewallRule {
                priority: 1,
                sources: vec!["10.0.0.0/8".into()],
                destinations: vec![],
                ports: vec![api::PortRange { start: 90, end: 80 }],
                protocols: vec![api::Protocol::Tcp],
                verdict: api::Verdict::Accept,
                comment: String::new(),
            }],
        };
        assert_eq!(
            field_of(firewall(&p).unwrap_err()),
            Some("rules[0].ports[0]".into())
        );
        let mut icmp = p.clone();
        icmp.rules[0].ports = vec![api::PortRange { start: 80, end: 80 }];
        icmp.rules[0].protocols = vec![api::Protocol::Icmp];
        assert_eq!(
            field_of(firewall(&icmp).unwrap_err()),
            Some("rules[0].ports".into())
        );
        icmp.rules[0].protocols.push(api::Protocol::Udp);
        assert!(firewall(&icmp).is_ok());
    }
}
