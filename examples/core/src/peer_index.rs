//! The check across items of a peer change in O(change): per location, the shared
//! validator's [`LocationIndex`] (public keys, allowed-IP prefixes, the gateway's own key and
//! addresses), built from the database the first time the location is checked and kept in
//! step by [`Indexes::commit`] after each committed peer change.
//!
//! Rules:
//! - The index holds only what the check reads: the peers' keys and prefixes and the
//!   interface's key and addresses. A change to any of them other than a checked peer
//!   change (a location PATCH, a failed commit) drops the location's index
//!   ([`Indexes::forget`]); the next check rebuilds it. MFA sessions and the firewall do not
//!   enter the check and leave it alone.
//! - The index relies on the location it holds being valid. A stored location that the full
//!   validator rejects (an older database, stricter rules) is marked [`Held::Invalid`]: its
//!   peer changes are checked in full, as before, until the location changes.
//! - A change of several peers (a bulk add), or of a peer whose own prefixes nest, is
//!   answered by the full check: the index may name another peer or prefix first. The index
//!   still checks it, and follows it when it commits.
//! - The database is written by this Core's store only (one process, under its mutex).
//!
//! The admin result is the full check's ([`crate::validate::cross_check`]): the same first
//! rejection of the changed peers, named by the field inside the peer, with the same status
//! and message (property test in `tests` below), except for the other peer's place that a
//! message names (`overlaps peers[3]'s 10.0.0.3/32`): a place in the index's list (the
//! changed peer keeps its place; a removed one's is taken by the last) where the full check
//! lists the changed peer last. Neither is a peer id.

use std::collections::BTreeMap;

use gatehouse_proto::v1 as pb;
use gatehouse_validate as rules;
use ipnet::IpNet;
use rules::index::{CheckedDelta, LocationIndex};

use crate::validate::CrossCheck;

/// A location's index, or why there is none.
enum Held {
    Index(LocationIndex),
    /// The stored location fails the full validator: checked in full.
    Invalid,
}

/// The indexes of the locations checked since their last invalidating change.
#[derive(Default)]
pub struct Indexes {
    held: BTreeMap<u64, Held>,
}

/// What [`Indexes::check`] found.
pub enum Outcome {
    /// The changed peers' problems (none: the change may be committed, then `delta` given to
    /// [`Indexes::commit`]).
    Checked(CrossCheck, Option<CheckedDelta>),
    /// Check the whole location (no index held: the stored location is not valid; or a
    /// change the index may name otherwise); if it passes, commit with `delta` (the index's
    /// view of it; None: the index is dropped).
    Full(Option<CheckedDelta>),
}

impl Indexes {
    /// Drops the location's index (rebuilt at its next check).
    pub fn forget(&mut self, location: u64) {
        self.held.remove(&location);
    }

    /// Whether an index is held for the location (for tests).
    #[cfg(test)]
    pub fn holds(&self, location: u64) -> bool {
        matches!(self.held.get(&location), Some(Held::Index(_)))
    }

    /// Makes sure the location's index (or its mark) is held: `load` gives the stored
    /// location (interface and every peer) and is called only when none is held. Call it in
    /// the change's transaction before the change is written.
    pub fn prepare<E>(
        &mut self,
        location: u64,
        load: impl FnOnce() -> Result<(pb::Interface, Vec<pb::Peer>), E>,
    ) -> Result<(), E> {
        if let std::collections::btree_map::Entry::Vacant(e) = self.held.entry(location) {
            let (interface, peers) = load()?;
            e.insert(build(interface, peers));
        }
        Ok(())
    }

    /// Checks a change of peers against the location's index (see [`Indexes::prepare`]):
    /// `removed`, the public keys that leave (a PATCH of the key removes the old one), then
    /// `changed`, in request order, each as it will be stored.
    pub fn check(&self, location: u64, removed: &[Vec<u8>], changed: &[pb::Peer]) -> Outcome {
        let Some(Held::Index(index)) = self.held.get(&location) else {
            return Outcome::Full(None);
        };
        let changes: Vec<pb::Change> = removed
            .iter()
            .map(|k| pb::change::Kind::RemovePeer(k.clone()))
            .chain(
                changed
                    .iter()
                    .map(|p| pb::change::Kind::UpsertPeer(p.clone())),
            )
            .map(|kind| pb::Change { kind: Some(kind) })
            .collect();
        let checked = index.check(&changes);
        // Several changed peers may conflict among themselves, and the index may then name
        // another of them first than the full check does; so may a peer whose prefixes nest.
        if changed.len() != 1 || changed.iter().any(nests) {
            return Outcome::Full(checked.ok());
        }
        let list = match checked {
            Ok(delta) => return Outcome::Checked(CrossCheck::default(), Some(delta)),
            Err(list) => list,
        };
        // Every peer rejection is the one changed peer's (the index checks only it).
        let mut out = CrossCheck::default();
        for r in list {
            match rules::location::peer_item(&r.item) {
                Some((_, field)) => {
                    let ips = changed[0].allowed_ips.clone();
                    out.peers.push((0, field, r.reason, ips));
                }
                None => out.location.push(r),
            }
        }
        Outcome::Checked(out, None)
    }

    /// After a change of peers committed: its checked delta applied to the index, or, for
    /// a change checked in full (`None`), the mark dropped (the location may be valid now).
    pub fn committed(&mut self, location: u64, delta: Option<&CheckedDelta>) {
        match (self.held.get_mut(&location), delta) {
            (Some(Held::Index(index)), Some(delta)) => index.commit(delta),
            _ => self.forget(location),
        }
    }

    /// A committed removal of a peer (valid locations stay valid without it).
    pub fn remove(&mut self, location: u64, public_key: &[u8]) {
        match self.held.get_mut(&location) {
            Some(Held::Index(index)) => match rules::keys::key32(public_key) {
                Ok(k) => index.remove(&k),
                Err(_) => self.forget(location),
            },
            // An invalid location may become valid: rebuilt at the next check.
            Some(Held::Invalid) => self.forget(location),
            None => {}
        }
    }
}

/// Whether one of the peer's prefixes lies inside another of its own (`10.0.0.0/24` and
/// `10.0.0.0/25`): the index may then name another conflicting prefix in its message than
/// the full validator does, so such a (redundant, rare) change is checked in full.
fn nests(p: &pb::Peer) -> bool {
    let mut nets: Vec<IpNet> = p
        .allowed_ips
        .iter()
        .filter_map(|s| s.parse::<IpNet>().ok())
        .map(|n| n.trunc())
        .collect();
    nets.sort();
    // Sorted by address then length: a prefix containing others comes right before the
    // first of them.
    nets.windows(2).any(|w| w[0].contains(&w[1]))
}

/// The index of a stored location, when the full validator accepts it (O(N log N), once).
fn build(interface: pb::Interface, peers: Vec<pb::Peer>) -> Held {
    let order: Vec<Vec<u8>> = peers.iter().map(|p| p.public_key.clone()).collect();
    let loc = pb::Location {
        interface: Some(interface),
        peers,
        ..Default::default()
    };
    let Ok(checked) = rules::validate_location(&loc) else {
        return Held::Invalid;
    };
    let listed = order.iter().filter_map(|k| {
        let k = rules::keys::key32(k).ok()?;
        checked.peer(&k).map(|p| (k, &p.allowed_ips))
    });
    Held::Index(LocationIndex::new(
        checked.interface.public_key,
        &checked.interface.addresses,
        listed,
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::error::CoreError;
    use crate::validate;

    const OWN: u8 = 1;

    fn key(seed: u8) -> Vec<u8> {
        rules::keys::public_of(&[seed; 32]).to_vec()
    }

    fn interface(rng: &mut StdRng) -> pb::Interface {
        let host = rng.random_range(1..=20u8);
        pb::Interface {
            private_key: vec![OWN; 32],
            listen_port: 51820,
            addresses: vec![format!("10.0.0.{host}/24"), "fd00::1/120".into()],
            ..Default::default()
        }
    }

    /// A prefix in a small space, so that overlaps (and the gateway's own addresses) are met
    /// often.
    fn prefix(rng: &mut StdRng) -> IpNet {
        let net = if rng.random_bool(0.8) {
            let len = rng.random_range(26..=32u8);
            format!("10.0.0.{}/{len}", rng.random_range(0..=40u8))
        } else {
            let len = rng.random_range(122..=128u8);
            format!("fd00::{:x}/{len}", rng.random_range(0..=40u16))
        };
        net.parse::<IpNet>().unwrap().trunc()
    }

    /// As the store holds it: canonical prefixes, sorted, without repeats.
    fn peer(rng: &mut StdRng, seed: u8) -> pb::Peer {
        let n = rng.random_range(1..=3);
        let nets: BTreeSet<IpNet> = (0..n).map(|_| prefix(rng)).collect();
        pb::Peer {
            public_key: key(seed),
            allowed_ips: nets.iter().map(IpNet::to_string).collect(),
            id: u64::from(seed),
            ..Default::default()
        }
    }

    /// A valid location of up to `max` peers (candidates that conflict are left out).
    fn location(rng: &mut StdRng, max: usize) -> (pb::Interface, Vec<pb::Peer>) {
        let iface = interface(rng);
        let mut peers: Vec<pb::Peer> = Vec::new();
        for seed in 2..(2 + max as u8) {
            let p = peer(rng, seed);
            let c = validate::cross_check(iface.clone(), peers.clone(), vec![p.clone()]);
            if c.peers.is_empty() && c.location.is_empty() {
                peers.push(p);
            }
        }
        (iface, peers)
    }

    /// The admin result, with the field as `[k].field` (which of the changed peers). In the
    /// message, the other peer's place in the checked list (`peers[3]'s`) is left out: the
    /// full check lists the changed peer last, the index keeps it in its place.
    fn admin(found: CrossCheck) -> Result<(), String> {
        found
            .only_peers()
            .into_result(|k, field, _| format!("[{k}].{field}"))
            .map_err(|e| match e {
                CoreError::Conflict { msg, field } => format!("409 {field:?}: {}", unplaced(&msg)),
                CoreError::Invalid { msg, field } => format!("400 {field:?}: {}", unplaced(&msg)),
                other => format!("{other:?}"),
            })
    }

    /// `peers[12]'s` → `peers[_]'s`.
    fn unplaced(msg: &str) -> String {
        let mut out = String::new();
        let mut rest = msg;
        while let Some(at) = rest.find("peers[") {
            out.push_str(&rest[..at + 6]);
            rest = &rest[at + 6..];
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            out.push('_');
            rest = &rest[digits..];
        }
        out.push_str(rest);
        out
    }

    /// One random change: a PATCH of a held peer (new prefixes, maybe a new key, maybe the
    /// location's own) or an add of one to three new peers. Returns (removed keys, changed
    /// peers, the unchanged peers as the full check lists them).
    fn change(
        rng: &mut StdRng,
        peers: &[pb::Peer],
    ) -> (Vec<Vec<u8>>, Vec<pb::Peer>, Vec<pb::Peer>) {
        let fresh = |rng: &mut StdRng| loop {
            let seed = if rng.random_bool(0.1) {
                OWN
            } else {
                rng.random_range(100..=200u8)
            };
            if !peers.iter().any(|p| p.public_key == key(seed)) {
                return seed;
            }
        };
        if !peers.is_empty() && rng.random_bool(0.6) {
            let i = rng.random_range(0..peers.len());
            let old = &peers[i];
            let mut new = if rng.random_bool(0.7) {
                peer(rng, 0)
            } else {
                old.clone()
            };
            new.public_key.clone_from(&old.public_key);
            new.id = old.id;
            let mut removed = Vec::new();
            if rng.random_bool(0.3) {
                removed.push(old.public_key.clone());
                new.public_key = key(fresh(rng));
            }
            let mut unchanged = peers.to_vec();
            unchanged.remove(i);
            (removed, vec![new], unchanged)
        } else {
            let mut seeds = BTreeSet::new();
            for _ in 0..rng.random_range(1..=3) {
                seeds.insert(fresh(rng));
            }
            let added = seeds.into_iter().map(|s| peer(rng, s)).collect();
            (Vec::new(), added, peers.to_vec())
        }
    }

    /// Whether a prefix is held twice: the store's claim of each prefix (`peer_ips`)
    /// refuses such a change before the check.
    fn claimed_twice(unchanged: &[pb::Peer], changed: &[pb::Peer]) -> bool {
        let mut seen = BTreeSet::new();
        let all = unchanged.iter().chain(changed);
        !all.flat_map(|p| &p.allowed_ips).all(|ip| seen.insert(ip))
    }

    /// The indexed check gives the admin result of the full check (accepted, or the same
    /// first field, status and reason), over random changes of random small locations, also
    /// when the index is kept across a run of committed changes.
    #[test]
    fn indexed_check_answers_as_the_full_check() {
        let mut rng = StdRng::seed_from_u64(11);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..300 {
            let max = rng.random_range(0..=12);
            let (iface, mut peers) = location(&mut rng, max);
            let mut indexes = Indexes::default();
            indexes
                .prepare::<()>(7, || Ok((iface.clone(), peers.clone())))
                .unwrap();
            assert!(indexes.holds(7), "a valid location is indexed");
            for _ in 0..8 {
                let (removed, changed, unchanged) = change(&mut rng, &peers);
                if claimed_twice(&unchanged, &changed) {
                    continue;
                }
                let full = admin(validate::cross_check(
                    iface.clone(),
                    unchanged.clone(),
                    changed.clone(),
                ));
                let (found, delta) = match indexes.check(7, &removed, &changed) {
                    Outcome::Checked(found, delta) => (found, delta),
                    Outcome::Full(delta) => {
                        assert!(changed.len() > 1 || nests(&changed[0]), "no index held");
                        // As the store does: the full check's answer, the index's delta.
                        let found = validate::cross_check(
                            iface.clone(),
                            unchanged.clone(),
                            changed.clone(),
                        );
                        (found, delta.filter(|_| full.is_ok()))
                    }
                };
                let indexed = admin(found);
                assert_eq!(
                    indexed, full,
                    "peers {peers:?}\nremoved {removed:?}\nchanged {changed:?}"
                );
                assert_eq!(delta.is_some(), full.is_ok());
                if let Some(delta) = delta {
                    accepted += 1;
                    indexes.committed(7, Some(&delta));
                    peers = unchanged;
                    peers.extend(changed);
                } else {
                    refused += 1;
                }
            }
        }
        // Both answers are met often enough for the comparison to mean something.
        assert!(accepted > 300 && refused > 300, "{accepted} / {refused}");
    }

    /// A location the full validator rejects is not indexed: its changes are checked in full.
    #[test]
    fn an_invalid_stored_location_is_checked_in_full() {
        let mut rng = StdRng::seed_from_u64(3);
        let iface = interface(&mut rng);
        let mut a = peer(&mut rng, 2);
        a.allowed_ips = vec!["10.9.0.0/16".into()];
        let mut b = peer(&mut rng, 3);
        b.allowed_ips = vec!["10.9.1.0/24".into()];
        let mut indexes = Indexes::default();
        indexes
            .prepare::<()>(7, || Ok((iface.clone(), vec![a, b])))
            .unwrap();
        assert!(!indexes.holds(7));
        let c = peer(&mut rng, 4);
        assert!(matches!(indexes.check(7, &[], &[c]), Outcome::Full(None)));
    }

    fn refused_field(r: Result<impl std::fmt::Debug, CoreError>) -> String {
        match r {
            Err(CoreError::Conflict { field, msg }) => format!("{}: {msg}", field.unwrap()),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    /// Through the store: the index follows committed peer changes, keeps nothing of a
    /// refused one, and is rebuilt after a location change (a peer prefix covering the new
    /// gateway address is refused; one covering the old address is accepted).
    #[test]
    fn the_store_rebuilds_the_index_after_a_location_change() {
        use crate::api;
        use crate::store::Store;
        use base64::engine::general_purpose::STANDARD as B64;
        use base64::Engine as _;

        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("core.db")).unwrap();
        let loc = store
            .create_location(
                api::NewLocation {
                    name: "office".into(),
                    listen_port: 51820,
                    addresses: vec!["10.0.0.1/24".into()],
                    mtu: 0,
                    fwmark: 0,
                    mfa: false,
                    disconnect_threshold_secs: 0,
                    private_key: None,
                },
                0,
            )
            .unwrap()
            .id;
        let new_peer = |seed: u8, ip: &str| api::NewPeer {
            public_key: B64.encode(key(seed)),
            allowed_ips: vec![ip.into()],
            ..Default::default()
        };
        let ips = |ip: &str| api::PeerPatch {
            allowed_ips: Some(vec![ip.into()]),
            ..Default::default()
        };
        let (added, _) = store
            .add_peers(loc, vec![new_peer(2, "10.1.0.0/24")], 0, false)
            .unwrap();
        let a = added[0].id;
        store.patch_peer(loc, a, ips("10.1.1.0/24")).unwrap();
        // The index holds A's new prefix, not its old one.
        let refused =
            refused_field(store.add_peers(loc, vec![new_peer(3, "10.1.1.0/25")], 0, false));
        assert!(
            refused.starts_with("allowed_ips[0]: 10.1.1.0/25 overlaps"),
            "{refused}"
        );
        store
            .add_peers(loc, vec![new_peer(3, "10.1.0.0/25")], 0, false)
            .unwrap();
        // A refused change leaves nothing behind: its prefix is free again.
        refused_field(store.patch_peer(loc, a, ips("10.0.0.0/25")));
        store
            .add_peers(loc, vec![new_peer(4, "10.7.0.0/24")], 0, false)
            .unwrap();

        store
            .patch_location(
                loc,
                api::LocationPatch {
                    addresses: Some(vec!["10.2.0.1/24".into()]),
                    ..Default::default()
                },
            )
            .unwrap();
        let refused =
            refused_field(store.add_peers(loc, vec![new_peer(5, "10.2.0.0/25")], 0, false));
        assert!(refused.contains("the gateway's own address"), "{refused}");
        let refused = refused_field(store.patch_peer(loc, a, ips("10.2.0.0/30")));
        assert!(refused.contains("the gateway's own address"), "{refused}");
        // The old address is the gateway's no more.
        store.patch_peer(loc, a, ips("10.0.0.0/25")).unwrap();
        // A deleted peer's prefixes are free.
        store.delete_peer(loc, a).unwrap();
        store
            .add_peers(loc, vec![new_peer(6, "10.0.0.0/26")], 0, false)
            .unwrap();
    }
}
