//! A firewall policy (§7): addresses, ranges or subnets in canonical form (a subnet with
//! host bits set is an error; a full-length prefix is written as the bare address, a range
//! of one address likewise), ports 1..=65535 with start <= end, ports with only ICMP are
//! invalid, `VERDICT_UNSPECIFIED` is invalid, comments bounded and printable.

use std::net::IpAddr;

use gatehouse_proto::v1;
use ipnet::IpNet;

use crate::text::{canonical_printable, MAX_TEXT};
use crate::Rejections;

/// Rules in one policy at most.
pub const MAX_RULES: usize = 10_000;
/// Addresses (sources plus destinations) in one rule at most.
pub const MAX_ADDRESSES_PER_RULE: usize = 100_000;

/// A firewall address as the admin wrote it, in canonical form: `10.0.0.1`, `10.0.0.0/24`,
/// `10.0.0.1-10.0.0.9` (whitespace trimmed, one family, start < end).
pub fn normalize_address_spec(s: &str) -> Result<String, String> {
    let t = s.trim();
    let bad = || format!("not an address, CIDR or range: {s:?}");
    if let Some((a, b)) = t.split_once('-') {
        let a: IpAddr = a.trim().parse().map_err(|_| bad())?;
        let b: IpAddr = b.trim().parse().map_err(|_| bad())?;
        if a.is_ipv4() != b.is_ipv4() {
            return Err(format!("{s:?}: a range must be of one family"));
        }
        if a > b {
            return Err(format!("{s:?}: the range starts after it ends"));
        }
        return Ok(if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        });
    }
    if t.contains('/') {
        let net: IpNet = t.parse().map_err(|_| bad())?;
        if net.trunc() != net {
            return Err(format!(
                "{net} has host bits set (the prefix is {})",
                net.trunc()
            ));
        }
        if net.prefix_len() == net.max_prefix_len() {
            return Ok(net.addr().to_string());
        }
        return Ok(net.to_string());
    }
    t.parse::<IpAddr>()
        .map(|a| a.to_string())
        .map_err(|_| bad())
}

/// A firewall address on the wire: canonical only.
pub fn address_spec(s: &str) -> Result<(), String> {
    let canon = normalize_address_spec(s)?;
    if canon != s {
        return Err(format!("not in canonical form {canon:?}: {s:?}"));
    }
    Ok(())
}

/// A port range: 1..=65535, start <= end.
pub fn port_range(start: u32, end: u32) -> Result<(), String> {
    if start == 0 || end > 65535 || start > end {
        return Err(format!(
            "bad port range {start}-{end} (ports are 1..=65535, start <= end)"
        ));
    }
    Ok(())
}

/// Checks a policy as it travels, naming items under `at` (e.g. `firewall.`).
pub fn check_policy(fw: &v1::FirewallPolicy, at: &str, errs: &mut Rejections) {
    if fw.enabled && !is_verdict(fw.default_verdict) {
        errs.push(
            format!("{at}default_verdict"),
            format!("must be ACCEPT or DROP, got {}", fw.default_verdict),
        );
    }
    if fw.rules.len() > MAX_RULES {
        errs.push(
            format!("{at}rules"),
            format!("{} rules is more than {MAX_RULES}", fw.rules.len()),
        );
        return;
    }
    for (i, rule) in fw.rules.iter().enumerate() {
        check_rule(rule, &format!("{at}rules[{i}]."), errs);
    }
}

fn check_rule(rule: &v1::FirewallRule, at: &str, errs: &mut Rejections) {
    if rule.sources.len() + rule.destinations.len() > MAX_ADDRESSES_PER_RULE {
        errs.push(
            format!("{at}sources"),
            format!("more than {MAX_ADDRESSES_PER_RULE} addresses"),
        );
        return;
    }
    for (field, list) in [
        ("sources", &rule.sources),
        ("destinations", &rule.destinations),
    ] {
        for (j, s) in list.iter().enumerate() {
            if let Err(e) = address_spec(s) {
                errs.push(format!("{at}{field}[{j}]"), e);
            }
        }
    }
    for (j, r) in rule.ports.iter().enumerate() {
        if let Err(e) = port_range(r.start, r.end) {
            errs.push(format!("{at}ports[{j}]"), e);
        }
    }
    let mut only_icmp = !rule.protocols.is_empty();
    for (j, p) in rule.protocols.iter().enumerate() {
        match v1::Protocol::try_from(*p) {
            Ok(v1::Protocol::Icmp) => {}
            Ok(v1::Protocol::Tcp | v1::Protocol::Udp) => only_icmp = false,
            _ => {
                only_icmp = false;
                errs.push(
                    format!("{at}protocols[{j}]"),
                    format!("unknown protocol {p}"),
                );
            }
        }
    }
    if only_icmp && !rule.ports.is_empty() {
        errs.push(format!("{at}ports"), "ports with only ICMP match nothing");
    }
    if !is_verdict(rule.verdict) {
        errs.push(
            format!("{at}verdict"),
            format!("must be ACCEPT or DROP, got {}", rule.verdict),
        );
    }
    if let Err(e) = canonical_printable(&rule.comment, MAX_TEXT) {
        errs.push(format!("{at}comment"), e);
    }
}

fn is_verdict(v: i32) -> bool {
    matches!(
        v1::Verdict::try_from(v),
        Ok(v1::Verdict::Accept | v1::Verdict::Drop)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_specs_are_canonical() {
        let n = |s: &str| normalize_address_spec(s);
        assert_eq!(n(" 10.0.0.1").unwrap(), "10.0.0.1");
        assert_eq!(n("10.0.0.1/32").unwrap(), "10.0.0.1");
        assert_eq!(n("10.0.0.0/24").unwrap(), "10.0.0.0/24");
        assert_eq!(n("10.0.0.1 - 10.0.0.9").unwrap(), "10.0.0.1-10.0.0.9");
        assert_eq!(n("10.0.0.1-10.0.0.1").unwrap(), "10.0.0.1");
        assert_eq!(n("fd00:0::1").unwrap(), "fd00::1");
        assert!(n("10.0.0.1/24").unwrap_err().contains("host bits"));
        assert!(n("10.0.0.9-10.0.0.1").is_err());
        assert!(n("10.0.0.1-fd00::1").is_err());
        assert!(n("x").is_err());
        assert!(address_spec(" 10.0.0.1").is_err());
        assert!(address_spec("10.0.0.1").is_ok());
        assert!(address_spec("10.0.0.1/32").is_err());
    }

    fn rule() -> v1::FirewallRule {
        v1::FirewallRule {
            verdict: v1::Verdict::Accept as i32,
            ..Default::default()
        }
    }

    fn items(fw: &v1::FirewallPolicy) -> Vec<String> {
        let mut errs = Rejections::default();
        check_policy(fw, "firewall.", &mut errs);
        errs.finish()
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.item)
            .collect()
    }

    #[test]
    fn rules_follow_the_semantics() {
        let fw = v1::FirewallPolicy {
            enabled: true,
            default_verdict: v1::Verdict::Unspecified as i32,
            rules: vec![
                v1::FirewallRule {
                    verdict: v1::Verdict::Unspecified as i32,
                    ..rule()
                },
                v1::FirewallRule {
                    ports: vec![v1::PortRange { start: 1, end: 2 }],
                    protocols: vec![v1::Protocol::Icmp as i32],
                    ..rule()
                },
                v1::FirewallRule {
                    sources: vec![" 10.0.0.1".into()],
                    destinations: vec!["10.0.0.1-10.0.0.9".into()],
                    ports: vec![v1::PortRange { start: 80, end: 79 }],
                    protocols: vec![v1::Protocol::Tcp as i32, 9],
                    comment: "a\nb".into(),
                    ..rule()
                },
                v1::FirewallRule {
                    ports: vec![v1::PortRange { start: 22, end: 22 }],
                    protocols: vec![v1::Protocol::Icmp as i32, v1::Protocol::Tcp as i32],
                    ..rule()
                },
            ],
        };
        assert_eq!(
            items(&fw),
            vec![
                "firewall.default_verdict",
                "firewall.rules[0].verdict",
                "firewall.rules[1].ports",
                "firewall.rules[2].sources[0]",
                "firewall.rules[2].ports[0]",
                "firewall.rules[2].protocols[1]",
                "firewall.rules[2].comment",
            ]
        );
    }
}
