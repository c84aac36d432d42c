//! The VPN's addresses as the firewall step sees them (the peers' allowed IPs as spans),
//! and how one change of peers moves them (pure).
//!
//! The table itself is made from the interface, the listen port, the policy and the
//! masquerade setting only ([`super::render::Inputs`]): no set of it holds a peer's
//! address, so a change of peers adds and removes no element. What a change of peers does
//! move is the VPN's address list the step keeps between runs: a removed peer's addresses
//! have their tracked flows cut, and a flow with an end in the list is a VPN flow that a
//! new policy judges.

use std::collections::BTreeSet;

use ipnet::IpNet;

use super::policy::{span_of_net, Span};

/// The VPN addresses a change of peers adds and removes (each sorted, no duplicates).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VpnChange {
    pub added: Vec<Span>,
    pub removed: Vec<Span>,
}

impl VpnChange {
    /// The change from the touched peers' allowed IPs before (`old`) to after (`new`).
    ///
    /// Exact when no untouched peer holds one of these spans: a valid location gives an
    /// allowed IP to one peer only, so the spans of the peers a change names are theirs.
    pub fn between(
        old: impl IntoIterator<Item = IpNet>,
        new: impl IntoIterator<Item = IpNet>,
    ) -> VpnChange {
        let old: BTreeSet<Span> = old.into_iter().map(|n| span_of_net(&n)).collect();
        let new: BTreeSet<Span> = new.into_iter().map(|n| span_of_net(&n)).collect();
        VpnChange {
            added: new.difference(&old).copied().collect(),
            removed: old.difference(&new).copied().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }

    /// Applies the change to a kept address list.
    pub fn apply(&self, to: &mut BTreeSet<Span>) {
        for s in &self.removed {
            to.remove(s);
        }
        to.extend(self.added.iter().copied());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn a_change_names_the_spans_gained_and_lost() {
        let c = VpnChange::between(
            nets(&["10.0.0.1/32", "10.0.1.0/24"]),
            nets(&["10.0.1.0/24", "fd00::2/128"]),
        );
        assert_eq!(c.added, vec![span_of_net(&"fd00::2/128".parse().unwrap())]);
        assert_eq!(
            c.removed,
            vec![span_of_net(&"10.0.0.1/32".parse().unwrap())]
        );
        let mut kept: BTreeSet<Span> = nets(&["10.0.0.1/32", "10.0.1.0/24", "10.9.0.0/16"])
            .iter()
            .map(span_of_net)
            .collect();
        c.apply(&mut kept);
        let want: BTreeSet<Span> = nets(&["10.0.1.0/24", "10.9.0.0/16", "fd00::2/128"])
            .iter()
            .map(span_of_net)
            .collect();
        assert_eq!(kept, want);
        assert!(VpnChange::between(nets(&["10.0.0.1/32"]), nets(&["10.0.0.1/32"])).is_empty());
    }
}
