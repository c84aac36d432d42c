//! The location the agent holds (the last revision it accepted) and how Core messages
//! change it: a snapshot replaces it, a delta applies on top of it when its base is the
//! held revision. Pure: returns what to do, the event loop does it.
//!
//! A rejected revision still says which peers it lists: its removals (peers it deletes or
//! no longer lists) are applied all the same (design §3), see [`Held::keep_only`].

use std::collections::{BTreeSet, HashMap};

use gatehouse_proto::v1;

use crate::model::Key;
use crate::validate::{validate_location, Rejection, ValidLocation};

/// A revision of the location that passed validation. `Debug` shows no key material.
#[derive(Clone, PartialEq)]
pub struct Held {
    pub revision: u64,
    pub location: v1::Location,
    pub valid: ValidLocation,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("revision", &self.revision)
            .field("location", &self.location.name)
            .field("peers", &self.location.peers.len())
            .finish_non_exhaustive()
    }
}

/// What a Core update means for the held location.
#[derive(Debug)]
pub enum Update {
    /// A new valid revision to apply.
    Accept(Box<Held>),
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
        self.valid.desired.peers.retain(|k, _| listed.contains(k));
        self.valid.meta.retain(|k, _| listed.contains(k));
        self.location
            .peers
            .retain(|p| Key::from_slice(&p.public_key).is_some_and(|k| listed.contains(&k)));
        gone
    }
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

/// Accepts or rejects a snapshot.
pub fn on_snapshot(snapshot: &v1::Snapshot) -> Update {
    let Some(location) = &snapshot.location else {
        return Update::Reject {
            revision: snapshot.revision,
            rejections: vec![Rejection::new("location", "missing")],
            listed: None,
        };
    };
    accept(snapshot.revision, location.clone())
}

/// Applies a delta on top of the held revision, or says why it cannot.
pub fn on_delta(held: Option<&Held>, delta: &v1::Delta) -> Update {
    on_deltas(held, std::slice::from_ref(delta)).0
}

/// Applies a run of deltas on top of the held revision and validates only the result, so a
/// burst of deltas costs one validation (and the agent one apply) of the newest state.
/// Returns the update and how many deltas it used (at least one): the run stops before a
/// delta that does not follow the one before it or holds an unknown change, which the
/// next call then judges on its own.
pub fn on_deltas(held: Option<&Held>, deltas: &[v1::Delta]) -> (Update, usize) {
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
        let mut listed = listed_keys(&held.location);
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
    let mut run = Run::new(&held.location);
    let mut revision = held.revision;
    let mut used = 0;
    for delta in deltas {
        let next = delta.base_revision == revision
            && delta.revision > delta.base_revision
            && check_changes(&delta.changes).is_ok();
        if !next {
            break;
        }
        run.apply(&delta.changes);
        revision = delta.revision;
        used += 1;
    }
    (accept(revision, run.finish()), used)
}

/// Whether `delta` applies on the held revision: the held one, or the update that says
/// why not.
fn follows<'a>(held: Option<&'a Held>, delta: &v1::Delta) -> Result<&'a Held, Update> {
    let held_rev = held.map_or(0, |h| h.revision);
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
    match validate_location(&location) {
        Ok(valid) => Update::Accept(Box::new(Held {
            revision,
            location,
            valid,
        })),
        Err(rejections) => Update::Reject {
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
        match on_snapshot(&v1::Snapshot {
            revision: rev,
            location: Some(base()),
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
        let h = held(5);
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
        let Update::Accept(next) = on_delta(Some(&h), &d) else {
            panic!()
        };
        assert_eq!(next.revision, 6);
        let keys: Vec<Key> = next.valid.desired.peers.keys().copied().collect();
        assert_eq!(keys, vec![Key([3; 32]), Key([4; 32])]);
        assert_eq!(next.location.peers[0].allowed_ips, vec!["10.0.0.33/32"]);
        assert!(next.valid.mfa.threshold().is_some());
    }

    #[test]
    fn delta_with_another_base_is_a_gap_and_old_ones_are_stale() {
        let h = held(5);
        let gap = v1::Delta {
            revision: 8,
            base_revision: 7,
            changes: vec![],
        };
        assert!(matches!(
            on_delta(Some(&h), &gap),
            Update::Gap { held: 5, base: 7 }
        ));
        assert!(matches!(on_delta(None, &gap), Update::Gap { held: 0, .. }));
        let old = v1::Delta {
            revision: 5,
            base_revision: 4,
            changes: vec![],
        };
        assert!(matches!(on_delta(Some(&h), &old), Update::Stale { .. }));
    }

    #[test]
    fn invalid_delta_is_rejected_whole() {
        let h = held(5);
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
        } = on_delta(Some(&h), &d)
        else {
            panic!()
        };
        assert_eq!(revision, 6);
        assert_eq!(rejections[0].item, "peers[3].allowed_ips[0]");
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
        let Update::Reject { listed, .. } = on_delta(Some(&h), &d) else {
            panic!()
        };
        let listed = listed.unwrap();
        assert!(!listed.contains(&Key([2; 32])) && listed.contains(&Key([3; 32])));
        assert_eq!(h.keep_only(&listed), vec![Key([2; 32])]);
        let keys: Vec<Key> = h.valid.desired.peers.keys().copied().collect();
        assert_eq!(keys, vec![Key([3; 32])]);
        assert_eq!(h.location.peers.len(), 1);
        assert!(!h.valid.meta.contains_key(&Key([2; 32])));

        // An unknown change: the delta's removals still count.
        let h = held(5);
        let d = v1::Delta {
            revision: 6,
            base_revision: 5,
            changes: vec![
                change(Kind::RemovePeer(vec![3; 32])),
                v1::Change { kind: None },
            ],
        };
        let Update::Reject { listed, .. } = on_delta(Some(&h), &d) else {
            panic!()
        };
        assert_eq!(
            listed.unwrap().into_iter().collect::<Vec<_>>(),
            vec![Key([2; 32])]
        );

        // A snapshot with invalid content lists its peers; one without a location, none.
        let mut bad = base();
        bad.peers = vec![peer(3, "10.0.0.3/32"), peer(9, "0.0.0.300/32")];
        let Update::Reject { listed, .. } = on_snapshot(&v1::Snapshot {
            revision: 6,
            location: Some(bad),
        }) else {
            panic!()
        };
        assert_eq!(
            listed.unwrap().into_iter().collect::<Vec<_>>(),
            vec![Key([3; 32]), Key([9; 32])]
        );
        let Update::Reject { listed, .. } = on_snapshot(&v1::Snapshot {
            revision: 6,
            location: None,
        }) else {
            panic!()
        };
        assert!(listed.is_none());
    }

    #[test]
    fn a_run_of_deltas_is_one_update_and_stops_at_a_gap() {
        let h = held(5);
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
        let (update, used) = on_deltas(Some(&h), &run);
        assert_eq!(used, 3);
        let Update::Accept(next) = update else {
            panic!("{update:?}")
        };
        assert_eq!(next.revision, 8);
        let keys: Vec<Key> = next.valid.desired.peers.keys().copied().collect();
        assert_eq!(keys, vec![Key([3; 32]), Key([4; 32]), Key([5; 32])]);
        let (update, used) = on_deltas(Some(&next), &run[3..]);
        assert_eq!(used, 1);
        assert!(matches!(update, Update::Gap { held: 8, base: 9 }));
    }

    #[test]
    fn empty_change_is_rejected() {
        let h = held(5);
        let d = v1::Delta {
            revision: 6,
            base_revision: 5,
            changes: vec![v1::Change { kind: None }],
        };
        assert!(matches!(on_delta(Some(&h), &d), Update::Reject { .. }));
    }
}
