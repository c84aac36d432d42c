//! Tombstones: a peer removed for MFA inactivity is not re-added for the same session.
//!
//! The session is the peer's `mfa_session` when nonzero, else its preshared key (an MFA
//! session rotates it), else "none". While the Core has not processed the removal event
//! (it is away, or it answers with a location built before the event) it still sends the
//! peer with the old session; [`Tombstones::filter`] takes such peers out of the desired
//! state. A tombstone ends when the Core sends the peer with a different session (the user
//! authenticated again) or no longer sends the peer at all (it processed the event).
//!
//! Preshared keys are not stored: a session by preshared key is kept as a SHA-256
//! fingerprint (domain-separated), which identifies it without revealing it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::model::{Desired, Key, PeerSpec, SecretKey};
use crate::state::codec::{self, unix_ms};

/// What authorized a peer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Session {
    /// The Core's MFA session id (nonzero).
    Mfa(u64),
    /// SHA-256 fingerprint (hex) of the preshared key, for Cores that send no session id.
    Psk(String),
    /// Neither: the tombstone holds until the Core stops sending the peer.
    Unknown,
}

impl Session {
    /// The session of a peer from its `mfa_session` and preshared key.
    pub fn of(mfa_session: u64, preshared_key: Option<&SecretKey>) -> Self {
        match (mfa_session, preshared_key) {
            (0, Some(psk)) => Session::Psk(psk_fingerprint(psk)),
            (0, None) => Session::Unknown,
            (id, _) => Session::Mfa(id),
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Session::Mfa(id) => write!(f, "Mfa({id})"),
            // A fingerprint is not secret, but a short prefix is all a human needs.
            Session::Psk(fp) => write!(f, "Psk({}..)", fp.get(..12).unwrap_or(fp)),
            Session::Unknown => f.write_str("Unknown"),
        }
    }
}

/// One removed peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub session: Session,
    pub removed_at_unix_ms: i64,
}

/// Tombstones by public key (one per key: the latest removal).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tombstones {
    #[serde(with = "codec::key_map")]
    by_key: BTreeMap<Key, Tombstone>,
}

impl Tombstones {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `key`, authorized by `session`, was removed at `at`.
    pub fn bury(&mut self, key: Key, session: Session, at: SystemTime) {
        self.by_key.insert(
            key,
            Tombstone {
                session,
                removed_at_unix_ms: unix_ms(at),
            },
        );
    }

    /// Removes from `desired` every peer the Core still sends with a buried session, and
    /// returns their keys. Ends tombstones the Core has moved past: the peer is absent from
    /// `core_sessions`, or present with another session.
    ///
    /// `core_sessions` holds EVERY peer of the Core's location (the last snapshot with
    /// deltas applied, before any filtering) with its `mfa_session` (0 when none);
    /// `desired` is built from that same location. Filtering twice is harmless.
    pub fn filter(
        &mut self,
        desired: &mut Desired,
        core_sessions: &BTreeMap<Key, u64>,
    ) -> Vec<Key> {
        let mut blocked = Vec::new();
        self.by_key.retain(|key, stone| {
            let Some(&mfa_session) = core_sessions.get(key) else {
                return false; // The Core processed the removal.
            };
            let core_session = match (mfa_session, desired.peers.get(key)) {
                (0, Some(peer)) => Session::of(0, peer.preshared_key.as_ref()),
                (0, None) => return true, // Already filtered out: still blocked.
                (id, _) => Session::Mfa(id),
            };
            if core_session != stone.session {
                return false; // Authorized again with a new session.
            }
            if desired.peers.remove(key).is_some() {
                blocked.push(*key);
            }
            true
        });
        blocked
    }

    /// Whether [`Tombstones::filter`] keeps `key` out of the desired peers, for one peer
    /// (`mfa_session`: the Core's session of the peer, `peer`: its desired spec; None when
    /// the Core no longer lists it). Pure: stones are pruned by `filter` only.
    pub fn blocks(&self, key: &Key, mfa_session: Option<u64>, peer: Option<&PeerSpec>) -> bool {
        let (Some(stone), Some(mfa_session)) = (self.by_key.get(key), mfa_session) else {
            return false;
        };
        let core_session = match (mfa_session, peer) {
            (0, Some(peer)) => Session::of(0, peer.preshared_key.as_ref()),
            (0, None) => return true,
            (id, _) => Session::Mfa(id),
        };
        core_session == stone.session
    }

    /// Whether `key` is buried.
    pub fn contains(&self, key: &Key) -> bool {
        self.by_key.contains_key(key)
    }

    pub fn get(&self, key: &Key) -> Option<&Tombstone> {
        self.by_key.get(key)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

fn psk_fingerprint(psk: &SecretKey) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"gatehouse tombstone psk v1\0");
    ctx.update(psk.expose());
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::{InterfaceSpec, PeerSpec};

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    fn psk(n: u8) -> SecretKey {
        SecretKey::new([n; 32])
    }

    fn peer(n: u8, preshared: Option<SecretKey>) -> PeerSpec {
        let mut p = PeerSpec::new(key(n), [format!("10.0.0.{n}/32").parse().unwrap()]);
        p.preshared_key = preshared;
        p
    }

    fn desired(peers: Vec<PeerSpec>) -> Desired {
        Desired {
            interface: InterfaceSpec {
                private_key: SecretKey::new([9; 32]),
                listen_port: 51820,
                addresses: BTreeSet::new(),
                mtu: None,
                fwmark: 0,
            },
            peers: peers
                .into_iter()
                .map(|p| (p.public_key, p.into()))
                .collect(),
        }
    }

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn same_mfa_session_is_blocked_new_one_allowed() {
        let mut t = Tombstones::new();
        t.bury(key(1), Session::of(7, Some(&psk(1))), at());
        let sessions = BTreeMap::from([(key(1), 7), (key(2), 8)]);
        let mut d = desired(vec![peer(1, Some(psk(1))), peer(2, Some(psk(2)))]);
        assert_eq!(t.filter(&mut d, &sessions), vec![key(1)]);
        assert_eq!(d.peers.keys().copied().collect::<Vec<_>>(), vec![key(2)]);
        assert!(t.contains(&key(1)));

        // Filtering again (the peer is already out) keeps the tombstone and the block.
        assert!(t.filter(&mut d, &sessions).is_empty());
        assert!(t.contains(&key(1)));

        // The user authenticates again: session 9.
        let sessions = BTreeMap::from([(key(1), 9), (key(2), 8)]);
        let mut d = desired(vec![peer(1, Some(psk(3))), peer(2, Some(psk(2)))]);
        assert!(t.filter(&mut d, &sessions).is_empty());
        assert!(d.peers.contains_key(&key(1)));
        assert!(t.is_empty());
    }

    #[test]
    fn preshared_key_is_the_session_without_an_id() {
        let mut t = Tombstones::new();
        t.bury(key(1), Session::of(0, Some(&psk(1))), at());
        let sessions = BTreeMap::from([(key(1), 0)]);

        let mut d = desired(vec![peer(1, Some(psk(1)))]);
        assert_eq!(t.filter(&mut d, &sessions), vec![key(1)]);
        assert!(d.peers.is_empty());
        // Same input again: still blocked, tombstone kept.
        let mut d = desired(vec![peer(1, Some(psk(1)))]);
        assert_eq!(t.filter(&mut d, &sessions), vec![key(1)]);

        // A rotated preshared key is a new session.
        let mut d = desired(vec![peer(1, Some(psk(2)))]);
        assert!(t.filter(&mut d, &sessions).is_empty());
        assert_eq!(d.peers.len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn dropped_when_core_no_longer_sends_the_peer() {
        let mut t = Tombstones::new();
        t.bury(key(1), Session::Mfa(7), at());
        t.bury(key(2), Session::Unknown, at());
        let mut d = desired(vec![peer(2, None)]);
        let sessions = BTreeMap::from([(key(2), 0)]);
        assert_eq!(t.filter(&mut d, &sessions), vec![key(2)]);
        assert!(!t.contains(&key(1)));
        assert!(t.contains(&key(2)));
        // Later the peer comes back in the same session (a Core that ignored the event):
        // still blocked, because the tombstone of key 2 was kept.
        let mut d = desired(vec![peer(2, None)]);
        assert_eq!(t.filter(&mut d, &sessions), vec![key(2)]);
    }

    #[test]
    fn fingerprint_hides_the_key_and_serde_round_trips() {
        let mut t = Tombstones::new();
        t.bury(key(1), Session::of(0, Some(&psk(0xab))), at());
        t.bury(key(2), Session::Mfa(3), at());
        let json = serde_json::to_string(&t).unwrap();
        assert!(!json.contains(&psk(0xab).expose_base64()));
        assert!(!json.contains(&"ab".repeat(32)));
        let back: Tombstones = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.get(&key(2)).unwrap().session, Session::Mfa(3));
    }
}
