//! Source routes for takeover handshakes (design §12): the handshakes a gateway starts on
//! takeover must leave from the floating address (VIP), because a client behind a NAT only
//! accepts answers from the address it talks to: a reply from the host's primary address
//! matches no NAT mapping and is dropped. Whatever the firewall does, this is routing,
//! never NAT.
//!
//! For each endpoint whose family has a present VIP, gatehouse's own routing table gets a
//! host route to the endpoint with the next hop and device of the kernel's current answer
//! (an `RTM_GETROUTE` lookup) and preferred source = the VIP; one `ip rule` per family
//! looks that table up before `main` ([`RULE_PRIORITY`]). A packet whose socket chose no
//! source (a WireGuard endpoint set by the agent) then leaves from the VIP. Nothing else
//! is touched: [`SourceRoutes::clear`] removes only the routes of gatehouse's table and
//! the rules that point to it. Install them before kicking (the kernel drops cached routes
//! when a route or rule is added).
//!
//! The kernel keeps a route whose preferred source has left the host (seen on 6.18), and
//! would then send from an address another gateway now holds: [`SourceRoutes::install`]
//! first removes every route of gatehouse's table whose source is not among the VIPs it is
//! given, and the role's end calls [`SourceRoutes::clear`]. Routes are counted from the
//! kernel, never from memory. Deciding ([`plan_sources`]) is pure; the rest is thin
//! netlink on the socket of [`crate::backend::link`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use thiserror::Error;

use crate::backend::link::{Failure, Link};

/// The priority of gatehouse's rules: right before `main` (32766), after the rules an
/// operator adds with lower numbers.
pub const RULE_PRIORITY: u32 = 32765;

/// What installing or clearing source routes can fail with.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The table is one the kernel reserves (0 unspec, 253 default, 254 main, 255 local).
    #[error("routing table {0} is reserved by the kernel; choose another ha.route_table")]
    ReservedTable(u32),
    /// The rtnetlink socket could not be opened.
    #[error("open rtnetlink socket: {0}")]
    Socket(String),
    /// A netlink request failed.
    #[error("{op}: {message}")]
    Netlink { op: String, message: String },
}

/// The source each endpoint's route gets: the first VIP of the endpoint's family, for every
/// endpoint whose family has one (others are left out). One entry per endpoint address
/// (ports do not matter to routing); IPv4-mapped IPv6 endpoints count as IPv4.
pub fn plan_sources(vips: &[IpAddr], endpoints: &[SocketAddr]) -> BTreeMap<IpAddr, IpAddr> {
    let first = |v6: bool| vips.iter().copied().find(|v| v.is_ipv6() == v6);
    let (v4, v6) = (first(false), first(true));
    endpoints
        .iter()
        .map(|e| e.ip().to_canonical())
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
        .filter_map(|ip| {
            let vip = if ip.is_ipv6() { v6 } else { v4 }?;
            Some((ip, vip))
        })
        .collect()
}

/// Gatehouse's source routes in the calling thread's network namespace.
#[derive(Debug)]
pub struct SourceRoutes {
    table: u32,
    link: Option<Link>,
}

/// Where the kernel sends packets to an endpoint now.
#[derive(Debug)]
struct Lookup {
    table: u32,
    kind: RouteType,
    oif: Option<u32>,
    next_hop: Vec<RouteAttribute>,
}

impl SourceRoutes {
    /// Source routes in routing table `table` (the socket opens at the first use).
    pub fn new(table: u32) -> Self {
        SourceRoutes { table, link: None }
    }

    /// For each endpoint whose family has a present VIP, a host route in gatehouse's table
    /// through the next hop the kernel uses now, from that VIP, and the rule of its family.
    /// `vips` are the VIPs present now: routes of gatehouse's table from any other source
    /// are removed first. Idempotent (routes are replaced, rules added once). An endpoint
    /// the kernel cannot reach, or reaches on this host, gets no route. Returns the number
    /// of routes now in gatehouse's table.
    pub fn install(
        &mut self,
        vips: &[IpAddr],
        endpoints: &[SocketAddr],
    ) -> Result<usize, SourceError> {
        self.check_table()?;
        for stale in self
            .own_routes()?
            .into_iter()
            .filter(|r| route_source(r).is_none_or(|src| !vips.contains(&src)))
        {
            let op = "delete a source route from an address no longer here".to_string();
            match self
                .link()?
                .request(RouteNetlinkMessage::DelRoute(stale), NLM_F_ACK)
            {
                Ok(_) | Err(Failure::Errno(libc::ESRCH)) => {}
                Err(e) => return Err(netlink(op, e)),
            }
        }
        let wanted = plan_sources(vips, endpoints);
        let families: BTreeSet<bool> = wanted.keys().map(IpAddr::is_ipv6).collect();
        let existing = self.rule_families()?;
        for v6 in families.difference(&existing) {
            self.add_rule(*v6)?;
        }
        for (endpoint, vip) in &wanted {
            let mut found = self.lookup(*endpoint)?;
            if found.as_ref().is_some_and(|l| l.table == self.table) {
                // Our own route answered: look at what the host would do without it.
                self.delete_route(*endpoint)?;
                found = self.lookup(*endpoint)?;
            }
            match found {
                Some(l) if l.kind == RouteType::Unicast && l.oif.is_some() => {
                    self.add_route(*endpoint, *vip, &l)?;
                }
                other => {
                    tracing::debug!(endpoint = %endpoint, route = ?other, "no source route: the endpoint is not reached through a unicast route");
                }
            }
        }
        Ok(self.own_routes()?.len())
    }

    /// Removes every route of gatehouse's table and every rule pointing to it (also after
    /// a crash: call it once at start).
    pub fn clear(&mut self) -> Result<(), SourceError> {
        self.check_table()?;
        for route in self.own_routes()? {
            let op = "delete a source route".to_string();
            match self
                .link()?
                .request(RouteNetlinkMessage::DelRoute(route), NLM_F_ACK)
            {
                Ok(_) | Err(Failure::Errno(libc::ESRCH)) => {}
                Err(e) => return Err(netlink(op, e)),
            }
        }
        let table = self.table;
        let rules = self.dump_rules()?;
        for rule in rules.into_iter().filter(|r| rule_table(r) == table) {
            let op = format!("delete the rule to table {table}");
            match self
                .link()?
                .request(RouteNetlinkMessage::DelRule(rule), NLM_F_ACK)
            {
                Ok(_) | Err(Failure::Errno(libc::ENOENT)) => {}
                Err(e) => return Err(netlink(op, e)),
            }
        }
        Ok(())
    }

    fn check_table(&self) -> Result<(), SourceError> {
        match self.table {
            0 | 253..=255 => Err(SourceError::ReservedTable(self.table)),
            _ => Ok(()),
        }
    }

    fn link(&mut self) -> Result<&mut Link, SourceError> {
        if self.link.is_none() {
            self.link = Some(Link::open().map_err(|e| SourceError::Socket(e.to_string()))?);
        }
        // Set just above.
        self.link
            .as_mut()
            .ok_or_else(|| SourceError::Socket("no socket".into()))
    }

    /// The families (`true` = IPv6) that have a rule to gatehouse's table.
    fn rule_families(&mut self) -> Result<BTreeSet<bool>, SourceError> {
        let table = self.table;
        Ok(self
            .dump_rules()?
            .iter()
            .filter(|r| rule_table(r) == table)
            .map(|r| r.header.family == AddressFamily::Inet6)
            .collect())
    }

    fn dump_rules(&mut self) -> Result<Vec<RuleMessage>, SourceError> {
        let replies = self
            .link()?
            .dump(RouteNetlinkMessage::GetRule(RuleMessage::default()))
            .map_err(|e| netlink("read the routing rules".into(), e))?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => Some(r),
                _ => None,
            })
            .collect())
    }

    fn add_rule(&mut self, v6: bool) -> Result<(), SourceError> {
        let mut rule = RuleMessage::default();
        rule.header.family = family(v6);
        rule.header.table = header_table(self.table);
        rule.header.action = RuleAction::ToTable;
        rule.attributes.push(RuleAttribute::Priority(RULE_PRIORITY));
        rule.attributes.push(RuleAttribute::Table(self.table));
        let op = format!(
            "add the IPv{} rule to table {}",
            if v6 { 6 } else { 4 },
            self.table
        );
        match self
            .link()?
            .request(RouteNetlinkMessage::NewRule(rule), NLM_F_ACK | NLM_F_CREATE)
        {
            Ok(_) | Err(Failure::Errno(libc::EEXIST)) => Ok(()),
            Err(e) => Err(netlink(op, e)),
        }
    }

    /// The kernel's route to `ip` now; `None` when it has none (unreachable).
    fn lookup(&mut self, ip: IpAddr) -> Result<Option<Lookup>, SourceError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(ip.is_ipv6());
        msg.header.destination_prefix_length = full_prefix(ip);
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(ip)));
        let replies = match self
            .link()?
            .request(RouteNetlinkMessage::GetRoute(msg), NLM_F_ACK)
        {
            Ok(replies) => replies,
            Err(Failure::Errno(
                libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EACCES | libc::EINVAL,
            )) => return Ok(None),
            Err(e) => return Err(netlink(format!("look up the route to {ip}"), e)),
        };
        Ok(replies.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => Some(Lookup {
                table: route_table(&r),
                kind: r.header.kind,
                oif: r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                }),
                next_hop: r
                    .attributes
                    .into_iter()
                    .filter(|a| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::Via(_)))
                    .collect(),
            }),
            _ => None,
        }))
    }

    fn add_route(&mut self, ip: IpAddr, vip: IpAddr, via: &Lookup) -> Result<(), SourceError> {
        let mut msg = self.route_message(ip);
        msg.header.scope = if via.next_hop.is_empty() {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        msg.attributes.extend(via.next_hop.iter().cloned());
        if let Some(oif) = via.oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        msg.attributes
            .push(RouteAttribute::PrefSource(RouteAddress::from(vip)));
        let op = format!("add the source route to {ip} from {vip}");
        self.link()?
            .request(
                RouteNetlinkMessage::NewRoute(msg),
                NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            )
            .map(|_| ())
            .map_err(|e| netlink(op, e))
    }

    fn delete_route(&mut self, ip: IpAddr) -> Result<(), SourceError> {
        let msg = self.route_message(ip);
        match self
            .link()?
            .request(RouteNetlinkMessage::DelRoute(msg), NLM_F_ACK)
        {
            Ok(_) | Err(Failure::Errno(libc::ESRCH)) => Ok(()),
            Err(e) => Err(netlink(format!("replace the source route to {ip}"), e)),
        }
    }

    /// A host route to `ip` in gatehouse's table, without next hop or source.
    fn route_message(&self, ip: IpAddr) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(ip.is_ipv6());
        msg.header.destination_prefix_length = full_prefix(ip);
        msg.header.table = header_table(self.table);
        msg.header.protocol = RouteProtocol::Static;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(ip)));
        msg.attributes.push(RouteAttribute::Table(self.table));
        msg
    }

    /// The routes of gatehouse's table, both families.
    fn own_routes(&mut self) -> Result<Vec<RouteMessage>, SourceError> {
        let table = self.table;
        let mut out = Vec::new();
        for v6 in [false, true] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family(v6);
            let replies = self
                .link()?
                .dump(RouteNetlinkMessage::GetRoute(msg))
                .map_err(|e| netlink("read the routes".into(), e))?;
            out.extend(replies.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) if route_table(&r) == table => Some(r),
                _ => None,
            }));
        }
        Ok(out)
    }
}

fn netlink(op: String, e: Failure) -> SourceError {
    match e.into_error(op.clone()) {
        crate::backend::BackendError::Operation { op, message } => {
            SourceError::Netlink { op, message }
        }
        other => SourceError::Netlink {
            op,
            message: other.to_string(),
        },
    }
}

fn family(v6: bool) -> AddressFamily {
    if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

fn full_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv6() {
        128
    } else {
        32
    }
}

/// The 8-bit table field of a header: the table itself when it fits, else "see the
/// attribute" (as iproute2 writes it).
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// A route's preferred source.
fn route_source(r: &RouteMessage) -> Option<IpAddr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::PrefSource(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

fn rule_table(r: &RuleMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_endpoint_gets_the_first_vip_of_its_family() {
        let vips = [ip("192.0.2.10"), ip("2001:db8::10"), ip("192.0.2.11")];
        let plan = plan_sources(
            &vips,
            &[
                ep("198.51.100.1:1000"),
                ep("198.51.100.1:2000"),
                ep("[2001:db8:1::5]:51820"),
                ep("[::ffff:203.0.113.9]:7"),
                ep("0.0.0.0:1"),
            ],
        );
        assert_eq!(
            plan,
            BTreeMap::from([
                (ip("198.51.100.1"), ip("192.0.2.10")),
                (ip("203.0.113.9"), ip("192.0.2.10")),
                (ip("2001:db8:1::5"), ip("2001:db8::10")),
            ])
        );
    }

    #[test]
    fn endpoints_of_a_family_without_vip_get_no_route() {
        let plan = plan_sources(
            &[ip("2001:db8::10")],
            &[ep("198.51.100.1:1"), ep("[2001:db8::5]:1")],
        );
        assert_eq!(plan.len(), 1);
        assert!(plan.contains_key(&ip("2001:db8::5")));
        assert!(plan_sources(&[], &[ep("198.51.100.1:1")]).is_empty());
    }

    #[test]
    fn reserved_tables_are_refused_before_any_netlink() {
        for table in [0, 253, 254, 255] {
            let mut routes = SourceRoutes::new(table);
            assert!(matches!(
                routes.install(&[], &[]),
                Err(SourceError::ReservedTable(t)) if t == table
            ));
            assert!(matches!(routes.clear(), Err(SourceError::ReservedTable(_))));
        }
    }

    #[test]
    fn large_tables_go_in_the_attribute() {
        assert_eq!(header_table(100), 100);
        assert_eq!(header_table(51820), 0);
        let mut r = RouteMessage::default();
        r.header.table = 0;
        r.attributes.push(RouteAttribute::Table(51820));
        assert_eq!(route_table(&r), 51820);
        r.attributes.clear();
        r.header.table = 254;
        assert_eq!(route_table(&r), 254);
    }
}
