//! The activity book: per peer, when it was last active anywhere (seen here, or relayed
//! by the Core from another gateway of the location) and where it was then (its
//! endpoint). A gateway that takes over initiates the handshake towards these endpoints.
//!
//! Rules:
//! - A newer sign of life replaces the older one with its endpoint; a sign without an
//!   endpoint keeps the endpoint known before.
//! - Seen here: a handshake completed (its time), or bytes received since the last read
//!   (the read's time; the model's refresh marks the peers whose count grew), with the
//!   endpoint the interface reports.
//! - Bounded to the held location's peers: a peer that leaves it leaves the book.
//! - Kept in the state file, so a gateway that restarts before the Core is back still
//!   knows where its clients are.
//!
//! Pure: times are passed in.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::model::{Key, PeerState};
use crate::state::codec::{self, from_unix_ms, unix_ms};

/// Where a sign of life was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// This gateway's own interface.
    Here,
    /// Another gateway, relayed by the Core (`PeerActivity`).
    Relayed,
}

/// The latest sign of life of one peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub last_active_unix_ms: i64,
    /// Where the peer was last seen; None when no gateway reported an endpoint.
    pub endpoint: Option<SocketAddr>,
    pub source: Source,
}

impl Seen {
    pub fn last_active(&self) -> SystemTime {
        from_unix_ms(self.last_active_unix_ms)
    }
}

/// The book (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Stored")]
pub struct ActivityBook {
    #[serde(with = "codec::key_map")]
    peers: BTreeMap<Key, Seen>,
    /// How many of `peers` have an endpoint: kept by every change of `peers` (an endpoint
    /// is never taken back, only the peer), so the status reads it in O(1).
    #[serde(skip)]
    endpoints: usize,
}

/// The book as the state file holds it; the count is rebuilt on load.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Stored {
    #[serde(with = "codec::key_map")]
    peers: BTreeMap<Key, Seen>,
}

impl From<Stored> for ActivityBook {
    fn from(stored: Stored) -> Self {
        let endpoints = stored
            .peers
            .values()
            .filter(|s| s.endpoint.is_some())
            .count();
        ActivityBook {
            peers: stored.peers,
            endpoints,
        }
    }
}

impl ActivityBook {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, key: &Key) -> Option<&Seen> {
        self.peers.get(key)
    }

    /// Peers in the book.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Peers whose endpoint is known.
    pub fn endpoints_known(&self) -> usize {
        self.endpoints
    }

    /// A sign of life another gateway saw at `at`, at `endpoint` (relayed by the Core).
    /// True when the book changed.
    pub fn relayed(&mut self, key: Key, at: SystemTime, endpoint: Option<SocketAddr>) -> bool {
        self.record(key, at, endpoint, Source::Relayed)
    }

    /// One read of this gateway's interface at `now` (the model it refreshed: its marks
    /// tell whose received bytes grew). True when the book changed.
    pub fn observe_here(&mut self, peers: &BTreeMap<Key, PeerState>, now: SystemTime) -> bool {
        let mut changed = false;
        for (key, peer) in peers {
            let endpoint = peer.config.endpoint;
            if let Some(handshake) = peer.last_handshake {
                changed |= self.record(*key, handshake, endpoint, Source::Here);
            }
            // A lower count (a re-created peer) is no sign of life by itself.
            if peer.marks.rx_grew {
                changed |= self.record(*key, now, endpoint, Source::Here);
            }
        }
        changed
    }

    /// Forgets one peer (it left the held location).
    pub fn forget(&mut self, key: &Key) {
        if self.peers.remove(key).is_some_and(|s| s.endpoint.is_some()) {
            self.endpoints -= 1;
        }
    }

    /// Keeps only the peers for which `keep` is true (the held location's).
    pub fn retain(&mut self, mut keep: impl FnMut(&Key) -> bool) {
        let endpoints = &mut self.endpoints;
        self.peers.retain(|k, s| {
            let kept = keep(k);
            if !kept && s.endpoint.is_some() {
                *endpoints -= 1;
            }
            kept
        });
    }

    fn record(
        &mut self,
        key: Key,
        at: SystemTime,
        endpoint: Option<SocketAddr>,
        source: Source,
    ) -> bool {
        let at_ms = unix_ms(at);
        let had_endpoint = self.peers.get(&key).is_some_and(|s| s.endpoint.is_some());
        let changed = self.update(key, at_ms, endpoint, source);
        if !had_endpoint && self.peers.get(&key).is_some_and(|s| s.endpoint.is_some()) {
            self.endpoints += 1;
        }
        changed
    }

    /// The rule of [`ActivityBook::record`] on the entry of `key`.
    fn update(
        &mut self,
        key: Key,
        at_ms: i64,
        endpoint: Option<SocketAddr>,
        source: Source,
    ) -> bool {
        match self.peers.get_mut(&key) {
            None => {
                self.peers.insert(
                    key,
                    Seen {
                        last_active_unix_ms: at_ms,
                        endpoint,
                        source,
                    },
                );
                true
            }
            Some(seen) if at_ms > seen.last_active_unix_ms => {
                seen.last_active_unix_ms = at_ms;
                seen.source = source;
                if endpoint.is_some() {
                    seen.endpoint = endpoint;
                }
                true
            }
            // Not newer: only fills in an endpoint nobody reported yet.
            Some(seen) if seen.endpoint.is_none() && endpoint.is_some() => {
                seen.endpoint = endpoint;
                true
            }
            Some(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{DeviceSink as _, DeviceState, Observed, PeerSpec};
    use crate::plan::KernelModel;

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn ep(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn peer(n: u8, rx: u64, handshake: Option<SystemTime>, endpoint: &str) -> (Key, PeerState) {
        let mut spec = PeerSpec::new(key(n), []);
        spec.endpoint = ep(endpoint);
        let mut p = PeerState::fresh(spec);
        p.rx_bytes = rx;
        p.last_handshake = handshake;
        (key(n), p)
    }

    #[test]
    fn the_newest_sign_of_life_wins_with_its_endpoint() {
        let mut b = ActivityBook::new();
        assert!(b.relayed(key(1), t(10), ep("198.51.100.1:5000")));
        // Older news changes nothing.
        assert!(!b.relayed(key(1), t(5), ep("198.51.100.9:9")));
        assert!(b.relayed(key(1), t(20), ep("198.51.100.2:6000")));
        // Newer news without an endpoint keeps the endpoint known.
        assert!(b.relayed(key(1), t(30), None));
        let seen = b.get(&key(1)).unwrap();
        assert_eq!(seen.endpoint, ep("198.51.100.2:6000"));
        assert_eq!(seen.last_active(), t(30));
        assert_eq!(seen.source, Source::Relayed);
    }

    /// The model after a read of `peers` (refreshed in place, as the agent reads).
    fn read(model: &mut KernelModel, peers: &[(Key, PeerState)]) {
        let mut device = DeviceState::default();
        for (_, p) in peers {
            device.peer(p.clone());
        }
        model.refresh_with(Observed { link: None, device });
    }

    #[test]
    fn own_handshakes_and_received_bytes_are_signs_of_life() {
        let mut b = ActivityBook::new();
        let mut model = KernelModel::default();
        // First read: the handshake counts; the byte count is only a baseline.
        let first = [
            peer(1, 100, Some(t(50)), "198.51.100.1:1"),
            peer(2, 100, None, "198.51.100.2:2"),
            peer(3, 100, None, "198.51.100.3:3"),
        ];
        read(&mut model, &first);
        b.observe_here(&model.device.peers, t(60));
        assert_eq!(b.get(&key(1)).unwrap().last_active(), t(50));
        assert_eq!(b.get(&key(1)).unwrap().source, Source::Here);
        assert!(b.get(&key(2)).is_none());
        // Bytes received since: active at the read's time. A lower count (re-created)
        // is not.
        let second = [
            peer(1, 100, Some(t(50)), "198.51.100.1:1"),
            peer(2, 150, None, "198.51.100.2:2"),
            peer(3, 10, None, "198.51.100.3:3"),
        ];
        read(&mut model, &second);
        assert!(b.observe_here(&model.device.peers, t(70)));
        assert_eq!(b.get(&key(2)).unwrap().last_active(), t(70));
        assert_eq!(b.get(&key(2)).unwrap().endpoint, ep("198.51.100.2:2"));
        assert!(b.get(&key(3)).is_none());
        // Nothing new: no change.
        read(&mut model, &second);
        assert!(!b.observe_here(&model.device.peers, t(80)));
        // Bytes again after a read that saw none: active again.
        let third = [
            peer(1, 100, Some(t(50)), "198.51.100.1:1"),
            peer(2, 170, None, "198.51.100.2:2"),
            peer(3, 10, None, "198.51.100.3:3"),
        ];
        read(&mut model, &third);
        assert!(b.observe_here(&model.device.peers, t(90)));
        assert_eq!(b.get(&key(2)).unwrap().last_active(), t(90));
    }

    /// The count kept by each change equals a count over the book, through every way a
    /// peer or an endpoint arrives and leaves, and after a load from the state file.
    #[test]
    fn the_endpoint_count_is_kept_by_every_change() {
        let counted = |b: &ActivityBook| b.peers.values().filter(|s| s.endpoint.is_some()).count();
        let mut b = ActivityBook::new();
        let check = |b: &ActivityBook, want: usize| {
            assert_eq!((b.endpoints_known(), counted(b)), (want, want));
        };
        b.relayed(key(1), t(1), None);
        check(&b, 0);
        b.relayed(key(1), t(0), ep("198.51.100.1:1")); // older, fills in the endpoint
        check(&b, 1);
        b.relayed(key(1), t(5), ep("198.51.100.1:2")); // newer, replaces it
        b.relayed(key(1), t(6), None); // newer without one: kept
        check(&b, 1);
        b.relayed(key(2), t(1), ep("198.51.100.2:2"));
        b.relayed(key(3), t(1), None);
        let here = BTreeMap::from([peer(4, 0, Some(t(9)), "198.51.100.4:4")]);
        b.observe_here(&here, t(10));
        check(&b, 3);
        b.forget(&key(3)); // no endpoint
        check(&b, 3);
        b.forget(&key(2));
        b.forget(&key(2)); // twice: nothing more
        check(&b, 2);
        b.retain(|k| *k != key(1));
        check(&b, 1);
        let back: ActivityBook = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        check(&back, 1);
    }

    #[test]
    fn the_book_is_bounded_to_held_peers_and_survives_serde() {
        let mut b = ActivityBook::new();
        b.relayed(key(1), t(1), ep("198.51.100.1:1"));
        b.relayed(key(2), t(1), ep("[2001:db8::2]:2"));
        b.relayed(key(3), t(1), None);
        assert_eq!(b.endpoints_known(), 2);
        b.retain(|k| *k != key(1));
        assert_eq!(b.len(), 2);
        let text = serde_json::to_string(&b).unwrap();
        let back: ActivityBook = serde_json::from_str(&text).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.get(&key(2)).unwrap().endpoint, ep("[2001:db8::2]:2"));
    }
}
