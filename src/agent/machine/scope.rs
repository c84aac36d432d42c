//! The change path in O(changed): a revision reached by deltas is planned on the peers its
//! deltas name ([`crate::plan::plan_keys`]), with the MFA tombstones checked per peer, and
//! the firewall step is skipped when there is no policy and the last step without one
//! succeeded. With a policy, the firewall step of a scoped change is
//! [`super::Action::FirewallPeers`]: the touched peers' allowed IPs before the apply (from the
//! model) against after it, so neither the desired state nor the table is rebuilt.
//!
//! The rule that makes the scoped plan equal to the full one: the model held every earlier
//! revision (the last apply of the held revision succeeded, nothing failed since, no peer
//! was refused for the backend's limit, no step is failing, the offline policy is not removing peers), and the
//! held location is valid (no two peers share an allowed IP), so only the peers a delta
//! names can differ between the model and the new revision. Anything else (a snapshot, a
//! settings change, an unknown model) plans everything; the resync and the ticks always
//! plan everything (drift repair).

use std::collections::BTreeSet;

use gatehouse_proto::v1;
use tracing::debug;

use super::reconcile::Then;
use super::Machine;
use crate::firewall::vpn::VpnChange;
use crate::model::Key;
use crate::plan::{plan_keys, Scope};

/// The peers of a scoped change and their allowed IPs on the interface before its apply.
#[derive(Debug)]
pub(super) struct Touched {
    keys: BTreeSet<Key>,
    before: Vec<ipnet::IpNet>,
}

impl Machine {
    /// The touched peers' allowed IPs as the model holds them before the apply.
    pub(super) fn touched_before(&self, keys: BTreeSet<Key>) -> Option<Touched> {
        let model = self.model.as_ref()?;
        let before = allowed_ips(model, &keys);
        Some(Touched { keys, before })
    }

    /// The firewall's VPN addresses moved by a scoped change whose apply succeeded: the
    /// model then holds the touched peers as the kernel does. None when the model is
    /// unknown (a failed step): the full step runs instead.
    pub(super) fn vpn_change(&self, touched: Touched) -> Option<VpnChange> {
        let model = self.model.as_ref()?;
        let after = allowed_ips(model, &touched.keys);
        Some(VpnChange::between(touched.before, after))
    }

    /// Deltas were accepted: their peers join the scope of the next apply (a settings
    /// change makes it whole).
    pub(super) fn touched(&mut self, deltas: &[v1::Delta]) {
        if !self.unapplied {
            // The last apply covered everything before these deltas.
            self.scope = Some(BTreeSet::new());
        }
        let Some(scope) = self.scope.as_mut() else {
            return;
        };
        for change in deltas.iter().flat_map(|d| &d.changes) {
            use v1::change::Kind;
            let key = match &change.kind {
                Some(Kind::UpsertPeer(p)) => Key::from_slice(&p.public_key),
                Some(Kind::RemovePeer(k)) => Key::from_slice(k),
                // Interface, firewall, MFA settings: everything is planned.
                _ => None,
            };
            match key {
                Some(key) => {
                    scope.insert(key);
                }
                None => {
                    self.scope = None;
                    return;
                }
            }
        }
    }

    /// The scope of this reconcile, when it may be planned on the touched peers only.
    pub(super) fn take_scope(&mut self, then: &Then) -> Option<BTreeSet<Key>> {
        let scope = self.apply_scope.take()?;
        // A failed step is retried by a full plan (its peers are not in the scope).
        if !matches!(then, Then::ApplyHeld { .. })
            || self.offline_removed
            || self.refused_last
            || self.steps.summary().is_some()
        {
            return None;
        }
        let held = self.held.as_ref()?;
        let within = self
            .peer_limit
            .is_none_or(|l| held.valid.desired.peers.len() <= l.max);
        within.then_some(scope)
    }

    /// The plan of a scoped change: the touched peers against the model.
    pub(super) fn plan_scoped(&mut self, keys: &BTreeSet<Key>) -> Option<crate::plan::Plan> {
        let (held, model) = (self.held.as_ref()?, self.model.as_ref()?);
        let (desired, meta) = (&held.valid.desired, &held.valid.meta);
        let tombstones = &self.tombstones;
        let plan = plan_keys(
            desired,
            model,
            Scope {
                keys,
                settings: false,
            },
            |k| {
                tombstones.blocks(
                    k,
                    meta.get(k).map(|m| m.mfa_session),
                    desired.peers.get(k).map(|p| &**p),
                )
            },
        );
        // Buried peers are few; a stone the Core has ended is pruned by the next full plan.
        self.counts.desired_peers = desired.peers.len().saturating_sub(tombstones.len());
        debug!(peers = keys.len(), steps = plan.len(), "scoped plan");
        Some(plan)
    }

    /// Whether the firewall step has nothing to do: the firewall is off in the settings and
    /// its clean-up ran (no step builds a desired state for it then, full or scoped). With
    /// the firewall on, a scoped change always takes the scoped step, policy or not: it cuts
    /// the tracked flows of the addresses that left (O(change), no table read).
    pub(super) fn firewall_done_while_off(&self) -> bool {
        self.firewall_idle && !self.settings.firewall.enabled
    }
}

/// The allowed IPs of `keys` on the modelled interface.
fn allowed_ips(model: &crate::model::Observed, keys: &BTreeSet<Key>) -> Vec<ipnet::IpNet> {
    keys.iter()
        .filter_map(|k| model.device.peers.get(k))
        .flat_map(|p| p.config.allowed_ips.iter().copied())
        .collect()
}
