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
//! - The database is written by this Core's store only (one process, under its mutex).
//!
//! The admin result is the full check's ([`crate::validate::cross_check`]): the same first
//! rejection of the changed peers, named by the field inside the peer (property test in
//! `tests` below).

use std::collections::BTreeMap;

use gatehouse_proto::v1 as pb;
use gatehouse_validate as rules;
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
    /// No usable index (the stored location is not valid): check the whole location.
    Full,
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
        if !self.held.contains_key(&location) {
            let (interface, peers) = load()?;
            self.held.insert(location, build(interface, peers));
        }
        Ok(())
    }

    /// Checks a change of peers against the location's index (see [`Indexes::prepare`]):
    /// `removed`, the public keys that leave (a PATCH of the key removes the old one), then
    /// `changed`, in request order, each as it will be stored.
    pub fn check(&self, location: u64, removed: &[Vec<u8>], changed: &[pb::Peer]) -> Outcome {
        let Some(Held::Index(index)) = self.held.get(&location) else {
            return Outcome::Full;
        };
        let base = index.len();
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
        let list = match index.check(&changes) {
            Ok(delta) => return Outcome::Checked(CrossCheck::default(), Some(delta)),
            Err(list) => list,
        };
        // A held peer changed keeps its place; new peers follow the held ones in order. A
        // change names one held peer at most (a PATCH), so any other place is a new one.
        let position = |at: usize| {
            if changed.len() == 1 {
                Some(0)
            } else {
                at.checked_sub(base).filter(|k| *k < changed.len())
            }
        };
        let mut out = CrossCheck::default();
        for r in list {
            match rules::location::peer_item(&r.item) {
                Some((at, field)) => match position(at) {
                    Some(k) => {
                        let ips = changed[k].allowed_ips.clone();
                        out.peers.push((k, field, r.reason, ips));
                    }
                    None => out.unchanged.push((at, field, r.reason)),
                },
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
        checked.peers.get(&k).map(|p| (k, &p.allowed_ips))
    });
    Held::Index(LocationIndex::new(
        checked.interface.public_key,
        &checked.interface.addresses,
        listed,
    ))
}
