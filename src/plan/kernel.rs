//! The kernel's model of one WireGuard interface: what applying a plan does to it. The
//! in-memory backend runs on it, the agent's state machine keeps its model of the interface
//! with it, and the plan's property tests check against it.
//!
//! The rule that makes it more than field updates: each allowed IP belongs to one peer, and
//! giving it to a peer (added or updated) takes it from whoever held it. The model keeps an
//! index of who holds each allowed IP beside the interface, built once per read
//! ([`KernelModel::new`]) and kept by each apply, so an apply of k peer changes costs
//! O(k log N): a cold apply of 100,000 peers is not quadratic, and a one-peer change costs
//! the same at 1,000 and at 100,000 peers.
//!
//! A read holds each allowed IP on at most one peer (the kernel's rule). For a hand-made state
//! that breaks it, the index names the last holder in key order.
//!
//! A read is applied to the model in place ([`KernelModel::refresh`], `refresh.rs`): the
//! agent holds one copy of the interface, also while it reads it.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::sync::Arc;

use ipnet::IpNet;

mod refresh;

pub use refresh::Refresh;

use super::{update_config, Op, Plan};
use crate::btree::compact;
use crate::model::{AllowedIps, Desired, DeviceState, Key, LinkState, Marks, Observed, PeerState};

/// Who holds each allowed IP.
type Owners = BTreeMap<IpNet, Key>;

/// An interface with the owners of its allowed IPs. Read it as an [`Observed`] (`Deref`);
/// change it with [`KernelModel::apply`] (or [`KernelModel::modify`], which re-indexes).
#[derive(Clone, Debug, Default)]
pub struct KernelModel {
    observed: Observed,
    owners: Owners,
    /// The number of the last refresh (see [`Refresh`]); bookkeeping, not compared.
    reads: u32,
}

/// The same interface (the refresh count is bookkeeping).
impl PartialEq for KernelModel {
    fn eq(&self, other: &Self) -> bool {
        self.observed == other.observed && self.owners == other.owners
    }
}

impl Eq for KernelModel {}

impl KernelModel {
    /// The model of a read of the interface (O(N log N)).
    pub fn new(observed: Observed) -> Self {
        let owners = index(&observed.device);
        KernelModel {
            observed,
            owners,
            reads: 0,
        }
    }

    /// Lets `note` update the marks of the peer `key` (if the model holds it); nothing
    /// else of its entry changes here.
    pub fn note_peer(&mut self, key: &Key, note: impl FnOnce(&PeerState, &mut Marks)) {
        if let Some(peer) = self.observed.device.peers.get_mut(key) {
            let mut marks = peer.marks;
            note(peer, &mut marks);
            peer.marks = marks;
        }
    }

    /// Lets `note` update each peer's marks (in key order); nothing else of an entry
    /// changes here.
    pub fn note(&mut self, mut note: impl FnMut(&Key, &PeerState, &mut Marks)) {
        for (key, peer) in &mut self.observed.device.peers {
            let mut marks = peer.marks;
            note(key, peer, &mut marks);
            peer.marks = marks;
        }
    }

    /// Applies `plan` as the interface would: O(k log N) for k peer operations.
    pub fn apply(&mut self, plan: &Plan) {
        let mut added = 0;
        for step in &plan.steps {
            added += usize::from(matches!(step.op, Op::AddPeer(_)));
            self.apply_op(&step.op);
        }
        self.compact_after(added);
    }

    /// Points each of `keys` that the model holds with the desired settings at the desired
    /// peer itself, so that a peer matching its location is held once. An apply shares the
    /// peers it adds; an update changes the model's own copy, which this gives up.
    /// O(k log N).
    pub fn share<'a>(&mut self, desired: &Desired, keys: impl IntoIterator<Item = &'a Key>) {
        for key in keys {
            let (Some(held), Some(want)) = (
                self.observed.device.peers.get_mut(key),
                desired.peers.get(key),
            ) else {
                continue;
            };
            if !Arc::ptr_eq(&held.config, want) && held.config == *want {
                held.config = Arc::clone(want);
            }
        }
    }

    /// After `added` insertions: when they made most of the model (a cold apply, a first
    /// read), its maps are rebuilt with full nodes. Peers inserted in key order leave each
    /// B-tree node about half full (and the allowed IPs, inserted in no order, two thirds):
    /// rebuilt, the model of 50,000 peers holds about a third less. O(N), once.
    fn compact_after(&mut self, added: usize) {
        if added > 0 && added * 2 >= self.observed.device.peers.len() {
            compact(&mut self.observed.device.peers);
            compact(&mut self.owners);
        }
    }

    /// The interface, without its index.
    pub fn into_observed(self) -> Observed {
        self.observed
    }

    /// Changes the interface outside a plan (drift, traffic, a test's hand-made state),
    /// then rebuilds the index (O(N log N)).
    pub fn modify<R>(&mut self, f: impl FnOnce(&mut Observed) -> R) -> R {
        let out = f(&mut self.observed);
        self.owners = index(&self.observed.device);
        out
    }

    fn apply_op(&mut self, op: &Op) {
        let observed = &mut self.observed;
        match op {
            Op::CreateLink => {
                observed.link = Some(LinkState {
                    mtu: 1420,
                    up: false,
                    addresses: BTreeSet::new(),
                });
                observed.device = DeviceState::default();
                self.owners.clear();
            }
            Op::SetMtu(mtu) => link_mut(observed).mtu = *mtu,
            Op::SetLinkUp => link_mut(observed).up = true,
            Op::AddAddress(a) => {
                link_mut(observed).addresses.insert(*a);
            }
            Op::RemoveAddress(a) => {
                link_mut(observed).addresses.remove(a);
            }
            Op::ConfigureDevice(change) => {
                let dev = &mut observed.device;
                if let Some(k) = &change.private_key {
                    dev.private_key = Some(k.clone());
                }
                if let Some(p) = change.listen_port {
                    dev.listen_port = p;
                }
                if let Some(m) = change.fwmark {
                    dev.fwmark = m;
                }
            }
            Op::AddPeer(spec) => {
                // A re-added key replaces the old entry: its old IPs are released first.
                if let Some(old) = observed.device.peers.remove(&spec.public_key) {
                    release(&mut self.owners, &spec.public_key, &old.config.allowed_ips);
                }
                claim(
                    &mut self.owners,
                    &mut observed.device,
                    Some(&spec.public_key),
                    &spec.allowed_ips,
                );
                observed
                    .device
                    .peers
                    .insert(spec.public_key, PeerState::fresh(spec.clone()));
            }
            Op::UpdatePeer(update) => {
                let key = &update.public_key;
                let held = observed.device.peers.contains_key(key);
                if let Some(ips) = &update.allowed_ips {
                    // An update of a peer the interface does not hold still takes its IPs
                    // from the others (and gives them to nobody).
                    claim(
                        &mut self.owners,
                        &mut observed.device,
                        held.then_some(key),
                        ips,
                    );
                    if let Some(peer) = observed.device.peers.get(key) {
                        let dropped: AllowedIps =
                            peer.config.allowed_ips.difference(ips).copied().collect();
                        release(&mut self.owners, key, &dropped);
                    }
                }
                if let Some(peer) = observed.device.peers.get_mut(key) {
                    update_config(Arc::make_mut(&mut peer.config), update);
                }
            }
            Op::RemovePeer(key) => {
                if let Some(old) = observed.device.peers.remove(key) {
                    release(&mut self.owners, key, &old.config.allowed_ips);
                }
            }
        }
    }
}

impl Deref for KernelModel {
    type Target = Observed;

    fn deref(&self) -> &Observed {
        &self.observed
    }
}

/// Applies a plan to an observed state as a WireGuard interface would (see the module doc).
/// O(N log N) for the index; hold a [`KernelModel`] to apply plan after plan.
pub fn simulate(observed: &mut Observed, plan: &Plan) {
    let mut model = KernelModel::new(std::mem::take(observed));
    model.apply(plan);
    *observed = model.into_observed();
}

fn index(device: &DeviceState) -> Owners {
    device
        .peers
        .iter()
        .flat_map(|(k, p)| p.config.allowed_ips.iter().map(move |ip| (*ip, *k)))
        .collect()
}

/// Gives `ips` to `owner` (to nobody if None), taking them from whoever held them.
fn claim(owners: &mut Owners, device: &mut DeviceState, owner: Option<&Key>, ips: &AllowedIps) {
    for ip in ips {
        let prev = match owner {
            Some(owner) => owners.insert(*ip, *owner),
            None => owners.remove(ip),
        };
        if let Some(prev) = prev.filter(|prev| Some(prev) != owner) {
            if let Some(p) = device.peers.get_mut(&prev) {
                Arc::make_mut(&mut p.config).allowed_ips.remove(ip);
            }
        }
    }
}

/// Forgets `ips` as held by `key` (where it still holds them).
fn release(owners: &mut Owners, key: &Key, ips: &AllowedIps) {
    for ip in ips {
        if owners.get(ip) == Some(key) {
            owners.remove(ip);
        }
    }
}

fn link_mut(observed: &mut Observed) -> &mut LinkState {
    observed.link.get_or_insert_with(LinkState::default)
}

#[cfg(test)]
mod tests;
