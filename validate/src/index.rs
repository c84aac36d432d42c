//! Incremental validation: an index of a valid location (its public keys, its allowed-IP
//! prefixes with their holders, the gateway's own addresses) that checks a delta in
//! O(changed × log N) and applies it in place, so a one-peer change on a location of
//! 100,000 peers does not re-validate the other 99,999.
//!
//! The rules are the full validator's ([`crate::validate_location`]): a delta is accepted
//! exactly when the full validator accepts the location that results from it (checked by a
//! property test). What the index relies on: the location it holds is valid, so two peers
//! that the delta does not touch cannot conflict with each other, nor with the interface
//! unless the delta changes it. Only the changed items are checked, each against the index.
//!
//! Items are named as the full validator names them (`peers[i].allowed_ips[j]`), with `i` the
//! peer's place in the held list (a new peer: after the held ones, in the order the delta
//! names them); an overlap between a changed and an unchanged peer is blamed on the changed
//! one. (Where a changed peer's prefix lies inside another of its own, both may be named
//! where the full validator names the outer one only.) The property tests are in the
//! agent's `tests/validate_incremental.rs`.
//!
//! The index keeps the peers' order itself (the held list): applying keeps it, except that
//! a removed peer's place is taken by the last peer (O(1) removal). It needs no copy of the
//! location as sent: a held peer's allowed IPs are named by their place in its canonical
//! (sorted) prefix set, the order in which the holder re-encodes them.

use std::collections::{BTreeMap, BTreeSet};

use gatehouse_proto::v1;
use ipnet::IpNet;

use crate::location::{check_interface, check_peer, CheckedInterface, CheckedPeer};
use crate::overlap::{find_overlaps, gateway_hosts, Holder};
use crate::{firewall, keys, net, Rejection, Rejections};

/// A valid location's keys and prefixes, kept in step with its peer list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocationIndex {
    own_key: [u8; 32],
    /// The gateway's own host prefixes (/32, /128).
    hosts: BTreeSet<IpNet>,
    peers: BTreeMap<[u8; 32], Slot>,
    /// The peers' public keys in list order (`Slot::at` is the place here).
    order: Vec<[u8; 32]>,
    /// Every peer prefix and the place of the peer holding it (one holder each in a valid
    /// location): the place, not the key, so that a prefix costs its own bytes and four.
    prefixes: BTreeMap<IpNet, u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    /// Where the peer sits in the location's peer list.
    at: u32,
    /// Sorted, no duplicates: a boxed slice (one allocation of exactly its size) rather
    /// than a set (a whole tree node for the usual one or two prefixes).
    prefixes: Box<[IpNet]>,
}

/// The net effect of a run of changes, every changed item checked: what
/// [`LocationIndex::commit`] applies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckedDelta {
    /// Held peers that leave the location.
    pub removed: Vec<[u8; 32]>,
    /// Peers added or replaced (held ones first, new ones in the order first named), as
    /// checked.
    pub upserted: Vec<CheckedPeer>,
    pub interface: Option<CheckedInterface>,
    pub firewall: Option<v1::FirewallPolicy>,
    /// The MFA settings and the checked threshold.
    pub mfa: Option<(v1::MfaSettings, u32)>,
}

impl CheckedDelta {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty()
            && self.upserted.is_empty()
            && self.interface.is_none()
            && self.firewall.is_none()
            && self.mfa.is_none()
    }
}

/// The last change of each peer a run names.
struct NetPeers<'a> {
    /// Raw public key → (order first named, final content or None for removed).
    last: BTreeMap<&'a [u8], (usize, Option<&'a v1::Peer>)>,
}

impl LocationIndex {
    /// The index of a valid location: `own_key` is the interface's public key, `peers` the
    /// peers in the order of the location's list with their allowed IPs (canonical).
    pub fn new<'a, N: IntoIterator<Item = &'a IpNet> + Copy>(
        own_key: [u8; 32],
        addresses: impl IntoIterator<Item = &'a IpNet>,
        peers: impl IntoIterator<Item = ([u8; 32], N)>,
    ) -> Self {
        let mut index = LocationIndex {
            own_key,
            hosts: BTreeSet::new(),
            peers: BTreeMap::new(),
            order: Vec::new(),
            prefixes: BTreeMap::new(),
        };
        index.set_hosts(addresses);
        // Collected rather than inserted one by one: a map built from an iterator has full
        // nodes (about half the memory). On a duplicate, the last one wins, as with insert.
        let mut slots = Vec::new();
        let mut prefixes = Vec::new();
        for (at, (key, nets)) in peers.into_iter().enumerate() {
            let at = place(at);
            prefixes.extend(nets.into_iter().map(|n| (n.trunc(), at)));
            slots.push((
                key,
                Slot {
                    at,
                    prefixes: sorted(nets),
                },
            ));
            index.order.push(key);
        }
        index.peers = slots.into_iter().collect();
        index.prefixes = prefixes.into_iter().collect();
        index
    }

    /// The peers' public keys in list order.
    pub fn order(&self) -> &[[u8; 32]] {
        &self.order
    }

    /// Peers held.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    fn set_hosts<'a>(&mut self, addresses: impl IntoIterator<Item = &'a IpNet>) {
        self.hosts = gateway_hosts::<()>(addresses)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
    }

    /// Checks `changes` (in order, as one run) against the location this index holds.
    /// Every rejection is listed, as [`crate::validate_location`] would list it for the
    /// resulting location.
    pub fn check<'a>(
        &self,
        changes: impl IntoIterator<Item = &'a v1::Change>,
    ) -> Result<CheckedDelta, Vec<Rejection>> {
        use v1::change::Kind;
        let mut errs = Rejections::default();
        let mut net_peers = NetPeers {
            last: BTreeMap::new(),
        };
        let (mut iface, mut fw, mut mfa) = (None, None, None);
        for (n, change) in changes.into_iter().enumerate() {
            match &change.kind {
                Some(Kind::UpsertPeer(p)) => net_peers.set(n, &p.public_key, Some(p)),
                Some(Kind::RemovePeer(k)) => net_peers.set(n, k, None),
                Some(Kind::SetInterface(i)) => iface = Some(i),
                Some(Kind::SetFirewall(f)) => fw = Some(f),
                Some(Kind::SetMfa(m)) => mfa = Some(*m),
                None => errs.push(
                    format!("changes[{n}]"),
                    "unknown or empty change (newer protocol?)",
                ),
            }
        }
        let mut out = CheckedDelta::default();
        let (removed, upserts) = self.classify(&net_peers);
        out.removed = removed;
        let touched: BTreeSet<[u8; 32]> = out
            .removed
            .iter()
            .copied()
            .chain(upserts.iter().filter_map(|(_, p)| self.held_key(p)))
            .collect();

        let interface = iface.map(|i| (i, check_interface(i, &mut errs)));
        let (own, hosts) = match &interface {
            Some((_, Some(ci))) => (Some(ci.public_key), gateway_hosts(&ci.addresses)),
            Some((_, None)) => (None, Vec::new()),
            None => (
                Some(self.own_key),
                self.hosts.iter().map(|h| (*h, Holder::Gateway)).collect(),
            ),
        };
        if let Some(m) = mfa {
            match net::mfa_threshold(m.enabled, u64::from(m.disconnect_threshold_secs)) {
                Ok(t) => out.mfa = Some((m, t)),
                Err(e) => errs.push("mfa.disconnect_threshold_secs", e),
            }
        }
        if let Some(f) = fw {
            firewall::check_policy(f, "firewall.", &mut errs);
            out.firewall = Some(f.clone());
        }

        // The changed peers on their own and against the interface's key.
        let mut entries: Vec<(IpNet, Holder<usize>)> = hosts;
        let mut raw_at: BTreeMap<usize, &v1::Peer> = BTreeMap::new();
        for (at, p) in &upserts {
            let Some(cp) = check_peer(*at, p, &mut errs) else {
                continue;
            };
            if Some(cp.public_key) == own {
                errs.push(
                    format!("peers[{at}].public_key"),
                    "is the location's own public key",
                );
                continue;
            }
            entries.extend(cp.allowed_ips.iter().map(|n| (*n, Holder::Peer(*at))));
            raw_at.insert(*at, p);
            out.upserted.push(cp);
        }
        // A new interface key that an unchanged peer holds.
        if let (Some((_, Some(ci))), Some(slot)) =
            (&interface, own.and_then(|k| self.peers.get(&k)))
        {
            if !touched.contains(&ci.public_key) {
                errs.push(
                    format!("peers[{}].public_key", slot.at),
                    "is the location's own public key",
                );
            }
        }

        // Overlaps, one per blamed prefix. Like the full validator, each names the conflict
        // met first in prefix order: the prefix containing (or equal to) the blamed one,
        // else the first prefix inside it.
        let mut blamed = Blamed::default();
        // Changed peers and the interface among themselves ...
        for o in find_overlaps(&entries) {
            if let Some(b) = o.blame() {
                let whose = match b.other {
                    Holder::Gateway => "the gateway's own address".to_string(),
                    Holder::Peer(k) => format!("peers[{k}]'s {}", b.other_net),
                };
                blamed.offer(b.peer, b.net, o.narrow.0, || {
                    format!("{} overlaps {whose} ({})", b.net, b.other_net)
                });
            }
        }
        // ... each changed prefix against the unchanged peers ...
        for (net, holder) in &entries {
            let Holder::Peer(at) = holder else { continue };
            if let Some((other_net, other_at)) = self.overlapping(net, &touched) {
                let met_at = if other_net.contains(net) {
                    *net
                } else {
                    other_net
                };
                blamed.offer(*at, *net, met_at, || {
                    format!("{net} overlaps peers[{other_at}]'s {other_net} ({other_net})")
                });
            }
        }
        // ... and a new interface address against the unchanged peers.
        if let Some((_, Some(ci))) = &interface {
            for (host, _) in gateway_hosts::<()>(&ci.addresses) {
                if let Some((net, at)) = self.covering(&host, &touched) {
                    blamed.offer(at as usize, net, host, || {
                        format!("{net} overlaps the gateway's own address ({host})")
                    });
                }
            }
        }
        for ((at, net), (_, reason)) in blamed.0 {
            let j = match raw_at.get(&at) {
                Some(p) => {
                    let canon = net.to_string();
                    p.allowed_ips.iter().position(|s| *s == canon)
                }
                None => self
                    .order
                    .get(at)
                    .and_then(|k| self.peers.get(k))
                    .and_then(|s| s.prefixes.iter().position(|n| *n == net)),
            }
            .unwrap_or(0);
            errs.push(format!("peers[{at}].allowed_ips[{j}]"), reason);
        }
        if let Some((_, Some(ci))) = interface {
            out.interface = Some(ci);
        }
        errs.finish().map(|()| out)
    }

    /// Held peers removed, and the peers upserted with the place that names them.
    fn classify<'a>(
        &self,
        net_peers: &NetPeers<'a>,
    ) -> (Vec<[u8; 32]>, Vec<(usize, &'a v1::Peer)>) {
        let mut removed = Vec::new();
        let mut held = Vec::new();
        let mut new = Vec::new();
        for (raw, (order, last)) in &net_peers.last {
            let slot = keys::key32(raw)
                .ok()
                .and_then(|k| self.peers.get(&k).map(|s| (k, s)));
            match (last, slot) {
                (None, Some((k, _))) => removed.push(k),
                (None, None) => {}
                (Some(p), Some((_, s))) => held.push((s.at as usize, *p)),
                (Some(p), None) => new.push((*order, *p)),
            }
        }
        held.sort_by_key(|(at, _)| *at);
        new.sort_by_key(|(order, _)| *order);
        let base = self.peers.len();
        let upserts = held
            .into_iter()
            .chain(new.into_iter().enumerate().map(|(k, (_, p))| (base + k, p)))
            .collect();
        (removed, upserts)
    }

    fn held_key(&self, p: &v1::Peer) -> Option<[u8; 32]> {
        keys::key32(&p.public_key)
            .ok()
            .filter(|k| self.peers.contains_key(k))
    }

    /// A prefix of an unchanged peer (not in `touched`) that overlaps `net`, the one the
    /// full validator names, and the place of its holder: an equal one, else the innermost
    /// one containing it (one probe per shorter prefix length), else the first inside it (a
    /// range of the sorted prefixes).
    fn overlapping(&self, net: &IpNet, touched: &BTreeSet<[u8; 32]>) -> Option<(IpNet, u32)> {
        let net = net.trunc();
        if let Some(at) = self
            .prefixes
            .get(&net)
            .filter(|at| self.untouched(**at, touched))
        {
            return Some((net, *at));
        }
        if let Some(wide) = self.covering_shorter(&net, net.prefix_len(), touched) {
            return Some(wide);
        }
        let last = IpNet::new(net.broadcast(), net.max_prefix_len()).ok()?;
        self.prefixes
            .range(net..=last)
            .find(|(_, at)| self.untouched(**at, touched))
            .map(|(n, at)| (*n, *at))
    }

    /// Whether the peer at place `at` is not in `touched`.
    fn untouched(&self, at: u32, touched: &BTreeSet<[u8; 32]>) -> bool {
        self.order
            .get(at as usize)
            .is_some_and(|k| !touched.contains(k))
    }

    /// The innermost prefix of an unchanged peer that contains `host` (or equals it), and
    /// the place of its holder.
    fn covering(&self, host: &IpNet, touched: &BTreeSet<[u8; 32]>) -> Option<(IpNet, u32)> {
        self.covering_shorter(host, host.prefix_len() + 1, touched)
    }

    /// The innermost prefix of an unchanged peer containing `net` whose length is below
    /// `below`.
    fn covering_shorter(
        &self,
        net: &IpNet,
        below: u8,
        touched: &BTreeSet<[u8; 32]>,
    ) -> Option<(IpNet, u32)> {
        (0..below).rev().find_map(|len| {
            let wide = IpNet::new(net.addr(), len).ok()?.trunc();
            let at = *self.prefixes.get(&wide)?;
            self.untouched(at, touched).then_some((wide, at))
        })
    }

    /// Applies a checked delta to the index: a removed peer's place is taken by the last
    /// one, a replaced peer keeps its place, a new one is appended. O(changed × log N).
    pub fn commit(&mut self, delta: &CheckedDelta) {
        for key in &delta.removed {
            self.remove(key);
        }
        // Every replaced peer gives up its prefixes before any is taken (a prefix may move
        // from one peer to another within a delta).
        for p in &delta.upserted {
            if let Some(slot) = self.peers.get(&p.public_key) {
                let (at, old) = (slot.at, slot.prefixes.clone());
                self.forget_prefixes(at, &old);
            }
        }
        for p in &delta.upserted {
            let prefixes = sorted(&p.allowed_ips);
            let at = match self.peers.get_mut(&p.public_key) {
                Some(slot) => {
                    slot.prefixes = prefixes;
                    slot.at
                }
                None => {
                    let at = place(self.order.len());
                    self.order.push(p.public_key);
                    self.peers.insert(p.public_key, Slot { at, prefixes });
                    at
                }
            };
            for n in &p.allowed_ips {
                self.prefixes.insert(n.trunc(), at);
            }
        }
        if let Some(ci) = &delta.interface {
            self.own_key = ci.public_key;
            self.set_hosts(&ci.addresses);
        }
    }

    /// Drops a peer: the last one takes its place (its prefixes follow). O(log N).
    pub fn remove(&mut self, key: &[u8; 32]) {
        let Some(slot) = self.peers.remove(key) else {
            return;
        };
        self.forget_prefixes(slot.at, &slot.prefixes);
        let at = slot.at as usize;
        if at >= self.order.len() {
            return;
        }
        self.order.swap_remove(at);
        let last = place(self.order.len());
        let Some(moved) = self.order.get(at).and_then(|k| self.peers.get_mut(k)) else {
            return;
        };
        moved.at = slot.at;
        for n in moved.prefixes.iter() {
            if let Some(holder) = self.prefixes.get_mut(n).filter(|h| **h == last) {
                *holder = slot.at;
            }
        }
    }

    fn forget_prefixes(&mut self, at: u32, prefixes: &[IpNet]) {
        for n in prefixes {
            if self.prefixes.get(n) == Some(&at) {
                self.prefixes.remove(n);
            }
        }
    }
}

/// A place in the peer list as the index keeps it: four bytes (a location of 2³² peers
/// would need hundreds of gigabytes of memory before its index did).
fn place(at: usize) -> u32 {
    u32::try_from(at).unwrap_or(u32::MAX)
}

/// A peer's prefixes, truncated, sorted and without duplicates.
fn sorted<'a>(prefixes: impl IntoIterator<Item = &'a IpNet>) -> Box<[IpNet]> {
    let mut v: Vec<IpNet> = prefixes.into_iter().map(IpNet::trunc).collect();
    v.sort_unstable();
    v.dedup();
    v.into_boxed_slice()
}

/// The conflict named for each blamed prefix `(peer, prefix)`: the one met first, at the
/// narrower prefix of the two.
#[derive(Default)]
struct Blamed(BTreeMap<(usize, IpNet), (IpNet, String)>);

impl Blamed {
    fn offer(&mut self, at: usize, net: IpNet, met_at: IpNet, reason: impl FnOnce() -> String) {
        match self.0.get(&(at, net)) {
            Some((first, _)) if *first <= met_at => {}
            _ => {
                self.0.insert((at, net), (met_at, reason()));
            }
        }
    }
}

impl<'a> NetPeers<'a> {
    fn set(&mut self, order: usize, key: &'a [u8], last: Option<&'a v1::Peer>) {
        self.last
            .entry(key)
            .and_modify(|e| e.1 = last)
            .or_insert((order, last));
    }
}
