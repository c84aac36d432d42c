//! The location's firewall policy as typed values: the validated proto policy converted
//! (pure) into address spans, port ranges and protocol sets, and the rule semantics of the
//! contract (§7) as a function [`Policy::decide`] over one flow. The renderer turns the
//! same values into nftables rules; conntrack flushing asks `decide` which existing flows
//! a new policy denies.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use gatehouse_proto::v1;
use ipnet::IpNet;

/// Why a proto policy cannot be converted (validation should have caught each of these).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("firewall.{item}: {reason}")]
    Invalid { item: String, reason: String },
}

fn invalid(item: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        item: item.into(),
        reason: reason.into(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Accept,
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The largest address of the family, as a number.
    pub fn max(self) -> u128 {
        match self {
            Family::V4 => u32::MAX as u128,
            Family::V6 => u128::MAX,
        }
    }
}

/// A policy protocol. ICMP means ICMP for IPv4 and ICMPv6 for IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    /// The IP protocol number within `family`.
    pub fn number(self, family: Family) -> u8 {
        match (self, family) {
            (Proto::Tcp, _) => 6,
            (Proto::Udp, _) => 17,
            (Proto::Icmp, Family::V4) => 1,
            (Proto::Icmp, Family::V6) => 58,
        }
    }
}

/// An inclusive range of addresses of one family, as numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span {
    pub family: Family,
    pub lo: u128,
    pub hi: u128,
}

impl Span {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (f, n) = number(ip);
        f == self.family && self.lo <= n && n <= self.hi
    }

    /// The address `n` of this span's family.
    pub fn addr(&self, n: u128) -> IpAddr {
        match self.family {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
        }
    }
}

/// An address as (family, number).
pub fn number(ip: IpAddr) -> (Family, u128) {
    match ip {
        IpAddr::V4(a) => (Family::V4, u32::from(a) as u128),
        IpAddr::V6(a) => (Family::V6, u128::from(a)),
    }
}

/// The span of a prefix (host bits ignored: `10.0.0.5/24` is `10.0.0.0/24`).
pub fn span_of_net(net: &IpNet) -> Span {
    let (family, lo) = number(net.network());
    let (_, hi) = number(net.broadcast());
    Span { family, lo, hi }
}

/// Parses a firewall address spec: an address, a CIDR or a range `a-b` of one family.
pub fn parse_spec(s: &str) -> Result<Span, String> {
    if let Some((a, b)) = s.split_once('-') {
        let parse = |x: &str| {
            x.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("not an address range: {s:?}"))
        };
        let ((fa, lo), (fb, hi)) = (number(parse(a)?), number(parse(b)?));
        if fa != fb || lo > hi {
            return Err(format!("not an address range: {s:?}"));
        }
        return Ok(Span { family: fa, lo, hi });
    }
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(span_of_net(&net));
    }
    match s.parse::<IpAddr>() {
        Ok(ip) => {
            let (family, n) = number(ip);
            Ok(Span {
                family,
                lo: n,
                hi: n,
            })
        }
        Err(_) => Err(format!("not an address, CIDR or range: {s:?}")),
    }
}

/// Sorts spans and merges overlapping and adjacent ones: the disjoint, non-touching
/// intervals an nftables interval set accepts.
pub fn merge(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for s in spans {
        match out.last_mut() {
            Some(last) if last.family == s.family && s.lo <= last.hi.saturating_add(1) => {
                last.hi = last.hi.max(s.hi);
            }
            _ => out.push(s),
        }
    }
    out
}

/// One rule, converted. Addresses are per family; an empty list means any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Its position in the Core's list (names its sets).
    pub index: usize,
    pub priority: u32,
    pub sources: Vec<Span>,
    pub destinations: Vec<Span>,
    /// Inclusive port ranges, merged; empty = any port.
    pub ports: Vec<(u16, u16)>,
    /// Empty = any protocol.
    pub protocols: BTreeSet<Proto>,
    pub verdict: Verdict,
}

/// What a rule matches within one family, or None when it cannot match that family
/// (e.g. IPv4 sources only: no IPv6 packet matches).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyMatch {
    /// None = any source.
    pub sources: Option<Vec<Span>>,
    pub destinations: Option<Vec<Span>>,
}

/// How a rule matches the transport: any packet, or one rule per protocol (with the
/// rule's ports for TCP and UDP; ports never apply to ICMP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoMatch {
    Any,
    Each(Vec<(Proto, bool)>),
}

impl Rule {
    pub fn family(&self, family: Family) -> Option<FamilyMatch> {
        let pick = |list: &[Span]| -> Option<Option<Vec<Span>>> {
            if list.is_empty() {
                return Some(None);
            }
            let of: Vec<Span> = list
                .iter()
                .filter(|s| s.family == family)
                .copied()
                .collect();
            if of.is_empty() {
                None
            } else {
                Some(Some(of))
            }
        };
        Some(FamilyMatch {
            sources: pick(&self.sources)?,
            destinations: pick(&self.destinations)?,
        })
    }

    /// The protocols this rule matches, each with whether the port list applies.
    /// Ports without protocols mean TCP and UDP.
    pub fn transport(&self) -> ProtoMatch {
        let with_ports = !self.ports.is_empty();
        if self.protocols.is_empty() && !with_ports {
            return ProtoMatch::Any;
        }
        let protos: Vec<Proto> = if self.protocols.is_empty() {
            vec![Proto::Tcp, Proto::Udp]
        } else {
            self.protocols.iter().copied().collect()
        };
        ProtoMatch::Each(
            protos
                .into_iter()
                .map(|p| (p, with_ports && p != Proto::Icmp))
                .collect(),
        )
    }

    /// Whether this rule matches `flow` (the semantics the rendered rules implement).
    pub fn matches(&self, flow: &Flow) -> bool {
        let family = Family::of(flow.src);
        let Some(fm) = self.family(family) else {
            return false;
        };
        let within = |list: &Option<Vec<Span>>, ip: IpAddr| {
            list.as_ref()
                .is_none_or(|l| l.iter().any(|s| s.contains(ip)))
        };
        if !within(&fm.sources, flow.src) || !within(&fm.destinations, flow.dst) {
            return false;
        }
        match self.transport() {
            ProtoMatch::Any => true,
            ProtoMatch::Each(list) => list.iter().any(|(p, ports)| {
                p.number(family) == flow.protocol
                    && (!ports
                        || flow
                            .dport
                            .is_some_and(|d| self.ports.iter().any(|(a, b)| *a <= d && d <= *b)))
            }),
        }
    }
}

/// A connection's first packet as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub protocol: u8,
    /// Destination port for TCP and UDP.
    pub dport: Option<u16>,
}

/// An enabled policy: rules in evaluation order (ascending priority, equal priorities in
/// the order given), then the default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub default: Verdict,
    pub rules: Vec<Rule>,
}

impl Policy {
    /// First matching rule wins, else the default.
    pub fn decide(&self, flow: &Flow) -> Verdict {
        self.rules
            .iter()
            .find(|r| r.matches(flow))
            .map_or(self.default, |r| r.verdict)
    }

    /// Addresses and rules (for logs and status).
    pub fn size(&self) -> (usize, usize) {
        let addrs = self
            .rules
            .iter()
            .map(|r| r.sources.len() + r.destinations.len())
            .sum();
        (addrs, self.rules.len())
    }
}

fn verdict(v: i32, item: &str) -> Result<Verdict, PolicyError> {
    match v1::Verdict::try_from(v) {
        Ok(v1::Verdict::Accept) => Ok(Verdict::Accept),
        Ok(v1::Verdict::Drop) => Ok(Verdict::Drop),
        _ => Err(invalid(item, format!("verdict {v} is not accept or drop"))),
    }
}

/// Converts a proto policy. `Ok(None)`: no policy is enforced (disabled by the Core).
pub fn from_proto(p: &v1::FirewallPolicy) -> Result<Option<Policy>, PolicyError> {
    if !p.enabled {
        return Ok(None);
    }
    let default = verdict(p.default_verdict, "default_verdict")?;
    let mut rules = Vec::with_capacity(p.rules.len());
    for (index, r) in p.rules.iter().enumerate() {
        let item = |f: &str| format!("rules[{index}].{f}");
        let specs = |list: &[String], field: &str| -> Result<Vec<Span>, PolicyError> {
            let mut out = Vec::with_capacity(list.len());
            for (j, s) in list.iter().enumerate() {
                out.push(parse_spec(s).map_err(|e| invalid(item(&format!("{field}[{j}]")), e))?);
            }
            Ok(merge(out))
        };
        let mut ports = Vec::with_capacity(r.ports.len());
        for (j, pr) in r.ports.iter().enumerate() {
            if pr.start == 0 || pr.start > pr.end || pr.end > 65535 {
                return Err(invalid(
                    item(&format!("ports[{j}]")),
                    format!("bad port range {}-{}", pr.start, pr.end),
                ));
            }
            ports.push((pr.start as u16, pr.end as u16));
        }
        let mut protocols = BTreeSet::new();
        for (j, proto) in r.protocols.iter().enumerate() {
            protocols.insert(match v1::Protocol::try_from(*proto) {
                Ok(v1::Protocol::Tcp) => Proto::Tcp,
                Ok(v1::Protocol::Udp) => Proto::Udp,
                Ok(v1::Protocol::Icmp) => Proto::Icmp,
                _ => {
                    return Err(invalid(
                        item(&format!("protocols[{j}]")),
                        format!("unknown protocol {proto}"),
                    ))
                }
            });
        }
        if !ports.is_empty() && protocols.len() == 1 && protocols.contains(&Proto::Icmp) {
            return Err(invalid(item("ports"), "ports with only ICMP"));
        }
        rules.push(Rule {
            index,
            priority: r.priority,
            sources: specs(&r.sources, "sources")?,
            destinations: specs(&r.destinations, "destinations")?,
            ports: merge_ports(ports),
            protocols,
            verdict: verdict(r.verdict, &item("verdict"))?,
        });
    }
    // Stable: equal priorities keep the order given.
    rules.sort_by_key(|r| r.priority);
    Ok(Some(Policy { default, rules }))
}

/// Sorted, merged port ranges.
pub fn merge_ports(mut ports: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ports.sort();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(ports.len());
    for (a, b) in ports {
        match out.last_mut() {
            Some(last) if a as u32 <= last.1 as u32 + 1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

#[cfg(test)]
mod tests;
