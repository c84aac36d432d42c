//! Stored content checked against the shared rules at start: what the Core stored before the
//! rules tightened may be content every gateway now rejects, which would freeze the whole
//! location. Each failing item is reported (logged, and listed by `GET /api/v1/audit`) and
//! the location is served without it:
//!
//! - a name or firewall address stored in a form that is not canonical (surrounding
//!   whitespace, `10.0.0.1/32`, `a - b`) is served in canonical form;
//! - a failing peer is withheld: not in snapshots, its upserts left out of deltas (removals
//!   still go out), so gateways remove it and keep applying everything else;
//! - a failing interface address is left out, a failing MTU served as 0 (kernel default),
//!   a failing name served empty;
//! - a failing firewall policy is served fail-closed: enabled, default DROP, no rules (a
//!   policy that cannot be enforced as written must not open access);
//! - a failing private key, listen port or MFA threshold cannot be replaced by anything
//!   safe: the location is served as stored (gateways reject it and keep their last good
//!   state) and the finding names what to fix.
//!
//! A finding clears once an admin change fixes the item (the location is checked again after
//! each change while it has findings). Pure: the store loads, this decides.

use std::collections::{BTreeMap, BTreeSet};

use gatehouse_proto::v1 as pb;
use gatehouse_validate as rules;
use serde::{Deserialize, Serialize};

/// One stored item that the shared rules reject.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub location: u64,
    /// The peer concerned, if the item is a peer's.
    pub peer_id: Option<u64>,
    /// The item as a gateway names it (`interface.addresses[1]`), or the peer's field.
    pub item: String,
    pub reason: String,
    /// What is served instead.
    pub served: String,
}

/// What the audit decided for one location.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LocationAudit {
    pub findings: Vec<Finding>,
    withheld: BTreeSet<Vec<u8>>,
    dropped_addresses: BTreeSet<String>,
    mtu_default: bool,
    name_empty: bool,
    firewall_closed: bool,
    /// The canonical form served instead of a stored name or policy that was not.
    name_canonical: Option<String>,
    firewall_canonical: Option<pb::FirewallPolicy>,
}

/// Every location's audit: only those with findings are kept.
#[derive(Clone, Debug, Default)]
pub struct Audit {
    locations: BTreeMap<u64, LocationAudit>,
}

/// Checks one stored location. `location` lists every stored peer (MFA sessions or not),
/// `peer_ids[k]` is the id of `location.peers[k]`.
pub fn check(stored: &pb::Location, peer_ids: &[u64]) -> LocationAudit {
    let mut out = LocationAudit::default();
    let id = stored.id;
    let location = &canonical(stored, &mut out);
    let Err(list) = rules::validate_location(location) else {
        return out;
    };
    let valid = rules::valid_peer_keys(location);
    for (k, p) in location.peers.iter().enumerate() {
        if !valid.contains(p.public_key.as_slice()) {
            out.withheld.insert(p.public_key.clone());
            if !list
                .iter()
                .any(|r| r.item.starts_with(&format!("peers[{k}].")))
            {
                // A peer withheld for a conflict named on another item, or beyond the
                // listed rejections.
                out.findings.push(Finding {
                    location: id,
                    peer_id: peer_ids.get(k).copied(),
                    item: "peer".into(),
                    reason: "rejected by the shared rules".into(),
                    served: "withheld".into(),
                });
            }
        }
    }
    for r in list {
        let (peer_id, item, served) = match rules::location::peer_item(&r.item) {
            Some((k, field)) => (peer_ids.get(k).copied(), field, "withheld".to_string()),
            None => (
                None,
                r.item.clone(),
                serve_instead(&r.item, location, &mut out),
            ),
        };
        out.findings.push(Finding {
            location: id,
            peer_id,
            item,
            reason: r.reason,
            served,
        });
    }
    out
}

/// The stored name and firewall addresses and comments in canonical form (where they have
/// one), each change recorded as a finding served in canonical form.
fn canonical(stored: &pb::Location, out: &mut LocationAudit) -> pb::Location {
    let mut loc = stored.clone();
    let trimmed = loc.name.trim();
    if trimmed != loc.name {
        loc.name = trimmed.to_owned();
        out.name_canonical = Some(loc.name.clone());
        out.findings.push(Finding {
            location: loc.id,
            peer_id: None,
            item: "name".into(),
            reason: "surrounding whitespace".into(),
            served: format!("in canonical form {:?}", loc.name),
        });
    }
    if let Some(fw) = &mut loc.firewall {
        let before = fw.clone();
        for rule in &mut fw.rules {
            for spec in rule.sources.iter_mut().chain(rule.destinations.iter_mut()) {
                if let Ok(c) = rules::firewall::normalize_address_spec(spec) {
                    *spec = c;
                }
            }
            rule.comment = rule.comment.trim().to_owned();
        }
        if *fw != before {
            out.firewall_canonical = Some(fw.clone());
            out.findings.push(Finding {
                location: loc.id,
                peer_id: None,
                item: "firewall".into(),
                reason: "addresses or comments not in canonical form".into(),
                served: "in canonical form".into(),
            });
        }
    }
    loc
}

fn serve_instead(item: &str, location: &pb::Location, out: &mut LocationAudit) -> String {
    if let Some(i) = item
        .strip_prefix("interface.addresses[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|i| i.parse::<usize>().ok())
    {
        if let Some(a) = location.interface.as_ref().and_then(|f| f.addresses.get(i)) {
            out.dropped_addresses.insert(a.clone());
            return "left out".into();
        }
    }
    if item == "interface.mtu" {
        out.mtu_default = true;
        return "0 (the kernel's default)".into();
    }
    if item == "name" {
        out.name_empty = true;
        return "empty".into();
    }
    if item.starts_with("firewall.") {
        out.firewall_closed = true;
        return "policy served fail-closed (default DROP, no rules)".into();
    }
    "as stored (gateways keep their last good state)".into()
}

impl LocationAudit {
    fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    fn serve_interface(&self, iface: &mut pb::Interface) {
        iface
            .addresses
            .retain(|a| !self.dropped_addresses.contains(a));
        if self.mtu_default {
            iface.mtu = 0;
        }
    }

    fn serve_firewall(&self, fw: &mut pb::FirewallPolicy) {
        if let Some(c) = &self.firewall_canonical {
            *fw = c.clone();
        }
        if self.firewall_closed {
            *fw = pb::FirewallPolicy {
                enabled: true,
                default_verdict: pb::Verdict::Drop as i32,
                rules: Vec::new(),
            };
        }
    }

    /// The location as served: the failing items left out or replaced.
    pub fn serve_location(&self, loc: &mut pb::Location) {
        loc.peers.retain(|p| !self.withheld.contains(&p.public_key));
        if let Some(iface) = &mut loc.interface {
            self.serve_interface(iface);
        }
        if let Some(fw) = &mut loc.firewall {
            self.serve_firewall(fw);
        }
        if let Some(name) = &self.name_canonical {
            loc.name.clone_from(name);
        }
        if self.name_empty {
            loc.name.clear();
        }
    }

    /// A delta as served: upserts of withheld peers left out, the rest replaced alike.
    pub fn serve_delta(&self, delta: &mut pb::Delta) {
        use pb::change::Kind;
        delta.changes.retain(|c| match &c.kind {
            Some(Kind::UpsertPeer(p)) => !self.withheld.contains(&p.public_key),
            _ => true,
        });
        for c in &mut delta.changes {
            match &mut c.kind {
                Some(Kind::SetInterface(i)) => self.serve_interface(i),
                // A policy in a delta is new (normalized by the admin API): served as sent
                // unless the location is still failing on its firewall.
                Some(Kind::SetFirewall(f)) if self.firewall_closed => self.serve_firewall(f),
                _ => {}
            }
        }
    }
}

impl Audit {
    /// Records a location's audit (replacing the previous one).
    pub fn set(&mut self, location: u64, audit: LocationAudit) {
        if audit.is_clean() {
            self.locations.remove(&location);
        } else {
            self.locations.insert(location, audit);
        }
    }

    /// Whether the location has findings (and must be checked again after a change).
    pub fn has_findings(&self, location: u64) -> bool {
        self.locations.contains_key(&location)
    }

    pub fn get(&self, location: u64) -> Option<&LocationAudit> {
        self.locations.get(&location)
    }

    /// Every finding, by location.
    pub fn findings(&self) -> Vec<Finding> {
        self.locations
            .values()
            .flat_map(|a| a.findings.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pk(seed: u8) -> Vec<u8> {
        rules::keys::public_of(&[seed; 32]).to_vec()
    }

    fn stored() -> pb::Location {
        pb::Location {
            id: 4,
            name: "office".into(),
            interface: Some(pb::Interface {
                private_key: vec![1; 32],
                listen_port: 51820,
                addresses: vec!["10.0.0.1/24".into(), "10.0.0.1/0".into()],
                mtu: 100,
                fwmark: 0,
            }),
            peers: vec![
                pb::Peer {
                    public_key: pk(2),
                    allowed_ips: vec!["10.0.0.2/32".into()],
                    ..Default::default()
                },
                pb::Peer {
                    public_key: pk(3),
                    allowed_ips: vec!["10.0.0.3/32".into()],
                    endpoint: "192.0.2.1:0".into(),
                    ..Default::default()
                },
                pb::Peer {
                    public_key: pk(4),
                    allowed_ips: vec!["10.0.0.0/24".into()],
                    ..Default::default()
                },
            ],
            firewall: Some(pb::FirewallPolicy {
                enabled: true,
                default_verdict: pb::Verdict::Accept as i32,
                rules: vec![
                    pb::FirewallRule {
                        sources: vec![" 10.0.0.2".into()],
                        verdict: pb::Verdict::Drop as i32,
                        ..Default::default()
                    },
                    pb::FirewallRule {
                        sources: vec!["10.0.0.2/24".into()],
                        verdict: pb::Verdict::Drop as i32,
                        ..Default::default()
                    },
                ],
            }),
            mfa: None,
        }
    }

    #[test]
    fn content_with_a_canonical_form_is_served_in_it() {
        let mut loc = stored();
        loc.name = " office ".into();
        loc.interface.as_mut().unwrap().addresses.truncate(1);
        loc.interface.as_mut().unwrap().mtu = 1420;
        loc.peers.truncate(1);
        loc.firewall.as_mut().unwrap().rules.truncate(1);
        let a = check(&loc, &[10]);
        let items: Vec<&str> = a.findings.iter().map(|f| f.item.as_str()).collect();
        assert_eq!(items, vec!["name", "firewall"]);
        let mut served = loc.clone();
        a.serve_location(&mut served);
        assert_eq!(served.name, "office");
        assert_eq!(
            served.firewall.as_ref().unwrap().rules[0].sources,
            vec!["10.0.0.2"]
        );
        assert!(rules::validate_location(&served).is_ok());
    }

    #[test]
    fn failing_items_are_reported_and_left_out() {
        let loc = stored();
        let a = check(&loc, &[10, 11, 12]);
        let items: Vec<(Option<u64>, &str)> = a
            .findings
            .iter()
            .map(|f| (f.peer_id, f.item.as_str()))
            .collect();
        assert_eq!(
            items,
            vec![
                (None, "firewall"),
                (None, "interface.mtu"),
                (None, "interface.addresses[1]"),
                (Some(11), "endpoint"),
                (Some(12), "allowed_ips[0]"),
                (None, "firewall.rules[1].sources[0]"),
            ]
        );
        let mut served = loc.clone();
        a.serve_location(&mut served);
        assert_eq!(served.peers.len(), 1, "the valid peer is still served");
        assert!(
            rules::validate_location(&served).is_ok(),
            "{:?}",
            rules::validate_location(&served)
        );
        let fw = served.firewall.clone().unwrap();
        assert_eq!(
            (fw.default_verdict, fw.rules.len()),
            (pb::Verdict::Drop as i32, 0)
        );

        let mut delta = pb::Delta {
            changes: vec![
                pb::Change {
                    kind: Some(pb::change::Kind::UpsertPeer(loc.peers[1].clone())),
                },
                pb::Change {
                    kind: Some(pb::change::Kind::RemovePeer(pk(3))),
                },
            ],
            ..Default::default()
        };
        a.serve_delta(&mut delta);
        assert_eq!(delta.changes.len(), 1, "the removal still goes out");

        let mut all = Audit::default();
        all.set(4, a);
        assert!(all.has_findings(4));
        assert_eq!(all.findings().len(), 6);
        all.set(4, check(&served, &[10]));
        assert!(!all.has_findings(4), "fixed content clears the findings");
    }
}
