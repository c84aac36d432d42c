//! The location the agent holds (the last revision it accepted) and how Core messages
//! change it: a snapshot replaces it, a delta applies on top of it when its base is the
//! held revision. Pure: returns what to do, the event loop does it.
//!
//! A snapshot is validated whole (O(N log N)). A delta is checked and applied in place
//! against the held location's index ([`LocationIndex`]): O(changed × log N), so a one-peer
//! change costs the same at 1,000 and at 100,000 peers. Both follow the same rules.
//!
//! The location is held once, as the validated domain type ([`ValidLocation`]) with its
//! index; the form the state file stores is made on demand ([`Held::to_proto`]).
//!
//! A rejected revision still says which peers it lists: its removals (peers it deletes or
//! no longer lists) are applied all the same (design §3), see [`Held::keep_only`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use gatehouse_proto::v1;
use gatehouse_validate::index::{CheckedDelta, LocationIndex};

use crate::model::Key;
use crate::validate::{interface_spec, mfa_policy, peer_spec, Rejection, ValidLocation};

/// A revision of the location that passed validation. `Debug` shows no key material.
///
/// The index follows `valid` (and keeps the peers' order), so change it through
/// [`Held::new`], [`Held::keep_only`] and [`on_deltas`] only.
#[derive(Clone, PartialEq)]
pub struct Held {
    pub revision: u64,
    pub valid: ValidLocation,
    index: LocationIndex,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("revision", &self.revision)
            .field("location", &self.valid.name)
            .field("peers", &self.valid.desired.peers.len())
            .finish_non_exhaustive()
    }
}

/// What a Core update means for the held location.
#[derive(Debug)]
pub enum Update {
    /// A new valid revision to apply.
    Accept(Box<Held>),
    /// The held location was advanced in place to `revision` (valid deltas). `renewed`:
    /// held peers whose MFA session changed.
    Advanced { revision: u64, renewed: Vec<Key> },
    /// The delta does not apply on top of what is held: ask for a snapshot.
    Gap { held: u64, base: u64 },
    /// The revision is older than or equal to the held one: nothing to do.
    Stale { held: u64, got: u64 },
    /// Invalid content: report it, keep the last good state except for the peers the
    /// revision no longer lists.
    Reject {
        revision: u64,
        rejections: Vec<Rejection>,
        /// The public keys of the peers the rejected revision lists; None when it says
        /// nothing about its peers (nothing is removed then).
        listed: Option<BTreeSet<Key>>,
    },
}

impl Held {
    /// A revision whose `valid` is what [`validate_location`] made of `location` (of which
    /// only the order of the peer list is kept).
    pub fn new(revision: u64, location: v1::Location, valid: ValidLocation) -> Self {
        Self::of(revision, &location, valid)
    }

    /// [`Held::new`] without taking the location (nothing of it is kept but its order).
    fn of(revision: u64, location: &v1::Location, valid: ValidLocation) -> Self {
        let index = index_of(location, &valid);
        Held {
            revision,
            valid,
            index,
        }
    }

    /// Validates `location` into a held revision. Once checked, the message is dropped
    /// (its peer order and firewall policy kept) before the held form is built: the two
    /// are never held side by side. A rejected location comes back with its rejections.
    pub fn validate(
        revision: u64,
        mut location: v1::Location,
    ) -> Result<Held, (Vec<Rejection>, Box<v1::Location>)> {
        let checked = match gatehouse_validate::validate_location(&location) {
            Ok(checked) => checked,
            Err(rejections) => return Err((rejections, Box::new(location))),
        };
        let mfa = match mfa_policy(checked.mfa_enabled, checked.mfa_threshold_secs) {
            Ok(mfa) => mfa,
            Err(rejections) => return Err((rejections, Box::new(location))),
        };
        let order: Vec<Key> = location
            .peers
            .iter()
            .filter_map(|p| Key::from_slice(&p.public_key))
            .collect();
        let firewall = location.firewall.take();
        drop(location);
        let valid = ValidLocation::from_checked(checked, mfa, firewall);
        let index = index_in(order.into_iter(), &valid);
        Ok(Held {
            revision,
            valid,
            index,
        })
    }

    /// The location as the Core sent it (the same content; peers in the held order): what
    /// the state file stores. O(N): not for the change path.
    pub fn to_proto(&self) -> v1::Location {
        self.valid
            .to_proto(self.index.order().iter().map(|k| Key(*k)))
    }

    /// The prost encoding of [`Held::to_proto`], piece by piece (see
    /// [`ValidLocation::encode_proto`]): the state file is written without a copy of the
    /// location.
    pub fn encode_proto<E>(&self, out: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        self.valid
            .encode_proto(self.index.order().iter().map(|k| Key(*k)), out)
    }

    /// The firewall policy of the held revision.
    pub fn firewall(&self) -> Option<&v1::FirewallPolicy> {
        self.valid.firewall.as_ref()
    }

    /// Applies a checked delta in place and moves to `revision`; returns the held peers
    /// whose MFA session changed. O(changed × log N).
    fn commit(
        &mut self,
        revision: u64,
        delta: &CheckedDelta,
        mfa: Option<crate::mfa::MfaPolicy>,
    ) -> Vec<Key> {
        self.index.commit(delta);
        let valid = &mut self.valid;
        for key in &delta.removed {
            valid.desired.peers.remove(&Key(*key));
            valid.meta.remove(&Key(*key));
        }
        let mut renewed = Vec::new();
        for p in &delta.upserted {
            let (spec, meta) = peer_spec(p);
            let key = spec.public_key;
            if let Some(old) = valid.meta.insert(key, meta) {
                if old.mfa_session != meta.mfa_session {
                    renewed.push(key);
                }
            }
            valid.desired.peers.insert(key, Arc::new(spec));
        }
        if let Some(iface) = &delta.interface {
            valid.desired.interface = interface_spec(iface);
        }
        if let Some(fw) = &delta.firewall {
            valid.firewall = Some(fw.clone());
        }
        if let Some(mfa) = mfa {
            valid.mfa = mfa;
        }
        self.revision = revision;
        renewed
    }

    /// Removes the held peers that are not in `listed`; returns their keys. The held
    /// location then no longer equals the Core's revision `self.revision`.
    pub fn keep_only(&mut self, listed: &BTreeSet<Key>) -> Vec<Key> {
        let gone: Vec<Key> = self
            .valid
            .desired
            .peers
            .keys()
            .filter(|k| !listed.contains(k))
            .copied()
            .collect();
        if gone.is_empty() {
            return gone;
        }
        for key in &gone {
            self.valid.desired.peers.remove(key);
            self.valid.meta.remove(key);
            self.index.remove(&key.0);
        }
        gone
    }
}

/// The index of a valid location (O(N log N)).
fn index_of(location: &v1::Location, valid: &ValidLocation) -> LocationIndex {
    let order = location
        .peers
        .iter()
        .filter_map(|p| Key::from_slice(&p.public_key));
    index_in(order, valid)
}

/// The index of a valid location whose peers are listed in `order`.
fn index_in(order: impl Iterator<Item = Key>, valid: &ValidLocation) -> LocationIndex {
    let desired = &valid.desired;
    let peers = order.filter_map(|key| Some((key.0, &desired.peers.get(&key)?.allowed_ips)));
    LocationIndex::new(
        desired.interface.private_key.public_key().0,
        &desired.interface.addresses,
        peers,
    )
}

/// The public keys of the peers a location lists (malformed keys are left out: no held
/// peer has one).
pub fn listed_keys(location: &v1::Location) -> BTreeSet<Key> {
    location
        .peers
        .iter()
        .filter_map(|p| Key::from_slice(&p.public_key))
        .collect()
}

/// Accepts or rejects a snapshot (taken, so that it is dropped as soon as it is checked).
pub fn on_snapshot(snapshot: v1::Snapshot) -> Update {
    let Some(location) = snapshot.location else {
        return Update::Reject {
            revision: snapshot.revision,
            rejections: vec![Rejection::new("location", "missing")],
            listed: None,
        };
    };
    accept(snapshot.revision, location)
}

/// Applies a delta on top of the held revision, or says why it cannot.
pub fn on_delta(held: Option<&mut Held>, delta: &v1::Delta) -> Update {
    on_deltas(held, std::slice::from_ref(delta)).0
}

/// Applies a run of deltas on top of the held revision, in place, checking only what they
/// change against the held location's index: O(changed × log N). The run is judged as
/// one (an intermediate state may be invalid), so a burst costs one check and the agent
/// one apply of the newest state. An invalid run leaves `held` as it was (and lists the
/// keys the run would have left, O(N): the rejection path is not the fast one).
///
/// Returns the update and how many deltas it used (at least one): the run stops before a
/// delta that does not follow the one before it or holds an unknown change, which the
/// next call then judges on its own.
pub fn on_deltas(held: Option<&mut Held>, deltas: &[v1::Delta]) -> (Update, usize) {
    let Some(first) = deltas.first() else {
        let rev = held.map_or(0, |h| h.revision);
        return (
            Update::Stale {
                held: rev,
                got: rev,
            },
            0,
        );
    };
    let held = match follows(held, first) {
        Ok(held) => held,
        Err(update) => return (update, 1),
    };
    if let Err(rejections) = check_changes(&first.changes) {
        // The changes do not all apply: the peers it removes are still removed.
        let mut listed = held_keys(held);
        for change in &first.changes {
            if let Some(v1::change::Kind::RemovePeer(key)) = &change.kind {
                if let Some(key) = Key::from_slice(key) {
                    listed.remove(&key);
                }
            }
        }
        let update = Update::Reject {
            revision: first.revision,
            rejections,
            listed: Some(listed),
        };
        return (update, 1);
    }
    let mut revision = held.revision;
    let mut used = 0;
    for delta in deltas {
        let next = delta.base_revision == revision
            && delta.revision > delta.base_revision
            && check_changes(&delta.changes).is_ok();
        if !next {
            break;
        }
        revision = delta.revision;
        used += 1;
    }
    let changes = || deltas[..used].iter().flat_map(|d| &d.changes);
    let checked = held.index.check(changes()).and_then(|delta| {
        let mfa = match &delta.mfa {
            Some((m, secs)) => Some(mfa_policy(m.enabled, *secs)?),
            None => None,
        };
        Ok((delta, mfa))
    });
    let update = match checked {
        Ok((delta, mfa)) => Update::Advanced {
            revision,
            renewed: held.commit(revision, &delta, mfa),
        },
        Err(rejections) => Update::Reject {
            revision,
            rejections,
            listed: Some(listed_after(held, changes())),
        },
    };
    (update, used)
}

/// The public keys of the held peers.
fn held_keys(held: &Held) -> BTreeSet<Key> {
    held.valid.desired.peers.keys().copied().collect()
}

/// The public keys the held location lists after `changes` (malformed keys left out).
fn listed_after<'a>(held: &Held, changes: impl Iterator<Item = &'a v1::Change>) -> BTreeSet<Key> {
    let mut listed = held_keys(held);
    for change in changes {
        match &change.kind {
            Some(v1::change::Kind::UpsertPeer(p)) => {
                listed.extend(Key::from_slice(&p.public_key));
            }
            Some(v1::change::Kind::RemovePeer(key)) => {
                if let Some(key) = Key::from_slice(key) {
                    listed.remove(&key);
                }
            }
            _ => {}
        }
    }
    listed
}

/// Whether `delta` applies on the held revision: the held one, or the update that says
/// why not.
fn follows<'a>(held: Option<&'a mut Held>, delta: &v1::Delta) -> Result<&'a mut Held, Update> {
    let held_rev = held.as_ref().map_or(0, |h| h.revision);
    let Some(held) = held.filter(|h| h.revision == delta.base_revision) else {
        if held_rev >= delta.revision && held_rev != 0 {
            return Err(Update::Stale {
                held: held_rev,
                got: delta.revision,
            });
        }
        return Err(Update::Gap {
            held: held_rev,
            base: delta.base_revision,
        });
    };
    if delta.revision <= delta.base_revision {
        return Err(Update::Reject {
            revision: delta.revision,
            rejections: vec![Rejection::new(
                "revision",
                format!(
                    "{} is not after base_revision {}",
                    delta.revision, delta.base_revision
                ),
            )],
            listed: None,
        });
    }
    Ok(held)
}

/// Every change is one this agent knows.
fn check_changes(changes: &[v1::Change]) -> Result<(), Vec<Rejection>> {
    match changes.iter().position(|c| c.kind.is_none()) {
        Some(i) => Err(vec![Rejection::new(
            format!("changes[{i}]"),
            "unknown or empty change (newer protocol?)",
        )]),
        None => Ok(()),
    }
}

/// Applies delta changes to a location, in order.
pub fn apply_changes(
    base: &v1::Location,
    changes: &[v1::Change],
) -> Result<v1::Location, Vec<Rejection>> {
    check_changes(changes)?;
    let mut run = Run::new(base);
    run.apply(changes);
    Ok(run.finish())
}

/// A location being changed by deltas, with an index of its peers by key.
struct Run {
    loc: v1::Location,
    index: HashMap<Vec<u8>, usize>,
    removed: bool,
}

impl Run {
    fn new(base: &v1::Location) -> Self {
        let loc = base.clone();
        let index = loc
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.public_key.clone(), i))
            .collect();
        Run {
            loc,
            index,
            removed: false,
        }
    }

    /// Applies checked changes (see [`check_changes`]) in order.
    fn apply(&mut self, changes: &[v1::Change]) {
        use v1::change::Kind;
        for change in changes {
            match &change.kind {
                Some(Kind::UpsertPeer(peer)) => match self.index.get(&peer.public_key) {
                    Some(&at) => self.loc.peers[at] = peer.clone(),
                    None => {
                        self.index
                            .insert(peer.public_key.clone(), self.loc.peers.len());
                        self.loc.peers.push(peer.clone());
                    }
                },
                Some(Kind::RemovePeer(key)) => {
                    if let Some(at) = self.index.remove(key) {
                        // Mark and compact once at the end: removal stays O(1) per change.
                        self.loc.peers[at].public_key.clear();
                        self.removed = true;
                    }
                }
                Some(Kind::SetInterface(iface)) => self.loc.interface = Some(iface.clone()),
                Some(Kind::SetFirewall(fw)) => self.loc.firewall = Some(fw.clone()),
                Some(Kind::SetMfa(mfa)) => self.loc.mfa = Some(*mfa),
                None => {}
            }
        }
    }

    fn finish(mut self) -> v1::Location {
        if self.removed {
            self.loc.peers.retain(|p| !p.public_key.is_empty());
        }
        self.loc
    }
}

fn accept(revision: u64, location: v1::Location) -> Update {
    match Held::validate(revision, location) {
        Ok(held) => Update::Accept(Box::new(held)),
        Err((rejections, location)) => Update::Reject {
            revision,
            listed: Some(listed_keys(&location)),
            rejections,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Key;
    use v1::change::Kind;

    fn base() -> v1::Location {
        v1::Location {
            id: 1,
            name: "l".into(),
            interface: Some(v1::Interface {
                private_key: vec![1; 32],
                listen_port: 51820,
                addresses: vec!["10.0.0.1/24".into()],
                mtu: 0,
                fwmark: 0,
            }),
            peers: vec![peer(2, "10.0.0.2/32"), peer(3, "10.0.0.3/32")],
            firewall: None,
            mfa: None,
        }
    }

    fn peer(k: u8, ip: &str) -> v1::Peer {
        v1::Peer {
            public_key: vec![k; 32],
            allowed_ips: vec![ip.into()],
            ..Default::default()
        }
    }

    fn held(rev: u64) -> Held {
        held_as(rev, base())
    }

    fn held_as(rev: u64, location: v1::Location) -> Held {
        match on_snapshot(v1::Snapshot {
            revision: rev,
            location: Some(location),
        }) {
            Update::Accept(h) => *h,
            other => panic!("{other:?}"),
        }
    }

    fn change(kind: Kind) -> v1::Change {
        v1::Change { kind: Some(kind) }
    }

    #[test]
    fn delta_on_held_revision_applies_in_order() {
        let mut h = held(5);
        let d = v1::Delta {
            revision: 6,
            base_revision: 5,
            changes: vec![
                change(Kind::RemovePeer(vec![2; 32])),
                change(Kind::UpsertPeer(peer(3, "10.0.0.33/32"))),
                change(Kind::UpsertPeer(peer(4, "10.0.0.2/32"))),
                change(Kind::SetMfa(v1::MfaSettings {
                    enabled: true,
                    disconnect_threshold_secs: 10,
                })),
            ],
        };
        let update = on_delta(Some(&mut h), &d);
        assert!(
            matches!(update, Update::Advanced { revision: 6, .. }),
            "{update:?}"
        );
        assert_eq!(h.revision, 6);
        let keys: Vec<Key> = h.valid.desired.peers.keys().copied().collect();
        assert_eq!(keys, vec![Key([3; 32]), Key([4; 32])]);
        assert_eq!(h.to_proto().peers[0].allowed_ips, vec!["10.0.0.33/32"]);
        assert!(h.valid.mfa.threshold().is_some());
        assert_eq!(h, held_as(6, h.to_proto()), "as if validated whole");
    }

    #[test]
    fn a_changed_mfa_session_is_reported_renewed() {
        let mut h = held(5);
        let with_session = |k: u8, session: u64| v1::Peer {
            mfa_session: session,
            ..peer(k, &format!("10.0.0.{k}/32"))
        };
        let d = v1::Delta {
            revision: 6,
            base_revision: 5,
            changes: vec![
                change(Kind::UpsertPeer(with_session(2, 7))),
                change(Kind::UpsertPeer(with_session(3, 0))),
                change(Kind::UpsertPeer(with_session(4, 1))),
            ],
        };
        let Update::Advanced { renewed, .. } = on_delta(Some(&mut h), &d) else {
            panic!()
        };
        assert_eq!(renewed, vec![Key([2; 32])], "a new peer is not renewed");
        assert_eq!(h.valid.meta[&Key([2; 32])].mfa_session, 7);
    }

    #[test]
    fn delta_with_another_base_is_a_gap_and_old_ones_are_stale() {
        let mut h = held(5);
        let gap = v1::Delta {
            revision: 8,
            base_revision: 7,
            changes: vec![],
        };
        assert!(matches!(
            on_delta(Some(&mut h), &gap),
            Update::Gap { held: 5, base: 7 }
        ));
        assert!(matches!(on_delta(None, &gap), Update::Gap { held: 0, .. }));
        let old = v1::Delta {
            revision: 5,
            base_revision: 4,
            changes: vec![],
        };
        assert!(matches!(on_delta(Some(&mut h), &old), Update::Stale { .. }));
    }

    #[test]
    fn invalid_delta_is_rejected_whole() {
        let mut h = held(5);
        let d = v1::Delta {
            revision: 6,
            base_revision: 5,
            changes: vec![
                change(Kind::UpsertPeer(peer(4, "10.0.0.9/32"))),
                change(Kind::UpsertPeer(peer(5, "10.0.0.2/32"))),
            ],
        };
        let Update::Reject {
            revision,
            rejections,
            listed,
        } = on_delta(Some(&mut h), &d)
        else {
            panic!()
        };
        assert_eq!(revision, 6);
        assert_eq!(
            h,
            held(5),
            "an invalid delta leaves the held location as it was"
        );
        assert_eq!(rejections[0].item, "peers[3].allowed_ips[0]");
        assert_eq!(
            rejections[0].reason,
            "10.0.0.2/32 overlaps peers[0]'s 10.0.0.2/32 (10.0.0.2/32)"
        );
        let listed: Vec<Key> = listed.unwrap().into_iter().collect();
        assert_eq!(
            listed,
            vec![Key([2; 32]), Key([3; 32]), Key([4; 32]), Key([5; 32])]
        );
    }

    #[test]
    fn a_rejected_revision_still_names_what_it_removes() {
        let mut h = held(5);
        // A removal next to an invalid upsert: peer 2 is no longer listed.
        let d = v1::Delta {
            revision: 6,
            base_revision: 5,
            changes: vec![
                change(Kind::RemovePeer(vec![2; 32])),
                change(Kind::UpsertPeer(peer(5, "10.0.0.3/32"))),
            ],
        };
        let Update::Reject { listed, .. } = on_delta(Some(&mut h), &d) else {
            panic!()
        };
        let listed = listed.unwrap();
        assert!(!listed.contains(&Key([2; 32])) && listed.contains(&Key([3; 32])));
        assert_eq!(h.keep_only(&listed), vec![Key([2; 32])]);
        let keys: Vec<Key> = h.valid.desired.peers.keys().copied().collect();
        assert_eq!(keys, vec![Key([3; 32])]);
        assert_eq!(h.to_proto().peers.len(), 1);
        assert_eq!(h, held_as(5, h.to_proto()), "the index follows");
        assert!(!h.valid.meta.contains_key(&Key([2; 32])));

        // An unknown change: the delta's removals still count.
        let mut h = held(5);
        let d = v1::Delta {
            revision: 6,
            base_revision: 5,
            changes: vec![
                change(Kind::RemovePeer(vec![3; 32])),
                v1::Change { kind: None },
            ],
        };
        let Update::Reject { listed, .. } = on_delta(Some(&mut h), &d) else {
            panic!()
        };
        assert_eq!(
            listed.unwrap().into_iter().collect::<Vec<_>>(),
            vec![Key([2; 32])]
        );

        // A snapshot with invalid content lists its peers; one without a location, none.
        let mut bad = base();
        bad.peers = vec![peer(3, "10.0.0.3/32"), peer(9, "0.0.0.300/32")];
        let Update::Reject { listed, .. } = on_snapshot(v1::Snapshot {
            revision: 6,
            location: Some(bad),
        }) else {
            panic!()
        };
        assert_eq!(
            listed.unwrap().into_iter().collect::<Vec<_>>(),
            vec![Key([3; 32]), Key([9; 32])]
        );
        let Update::Reject { listed, .. } = on_snapshot(v1::Snapshot {
            revision: 6,
            location: None,
        }) else {
            panic!()
        };
        assert!(listed.is_none());
    }

    #[test]
    fn a_run_of_deltas_is_one_update_and_stops_at_a_gap() {
        let mut h = held(5);
        let delta = |rev: u64, base: u64, kind: Kind| v1::Delta {
            revision: rev,
            base_revision: base,
            changes: vec![change(kind)],
        };
        let run = vec![
            // Peer 4 takes peer 2's address: invalid on its own, valid after the next.
            delta(6, 5, Kind::UpsertPeer(peer(4, "10.0.0.2/32"))),
            delta(7, 6, Kind::RemovePeer(vec![2; 32])),
            delta(8, 7, Kind::UpsertPeer(peer(5, "10.0.0.5/32"))),
            delta(10, 9, Kind::RemovePeer(vec![3; 32])),
        ];
        let (update, used) = on_deltas(Some(&mut h), &run);
        assert_eq!(used, 3);
        assert!(matches!(update, Update::Advanced { revision: 8, .. }));
        assert_eq!(h.revision, 8);
        assert_eq!(h, held_as(8, h.to_proto()), "as if validated whole");
        let keys: Vec<Key> = h.valid.desired.peers.keys().copied().collect();
        assert_eq!(keys, vec![Key([3; 32]), Key([4; 32]), Key([5; 32])]);
        let (update, used) = on_deltas(Some(&mut h), &run[3..]);
        assert_eq!(used, 1);
        assert!(matches!(update, Update::Gap { held: 8, base: 9 }));
    }

    #[test]
    fn empty_change_is_rejected() {
        let mut h = held(5);
        let d = v1::Delta {
            revision: 6,
            base_revision: 5,
            changes: vec![v1::Change { kind: None }],
        };
        assert!(matches!(on_delta(Some(&mut h), &d), Update::Reject { .. }));
    }
}
