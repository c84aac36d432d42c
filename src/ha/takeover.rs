//! The takeover planner and its pacer (design §12).
//!
//! On each transition to active, one round: the gateway initiates the handshake towards
//! every held peer that was active (here or on another gateway) within the takeover
//! window and whose endpoint is known, so clients switch in about one round trip instead
//! of waiting out WireGuard's own timers.
//!
//! Rules:
//! - The endpoint: the one the Core configured for the peer, if any; else where it was
//!   last seen ([`ActivityBook`]). Active within the window but no endpoint: skipped and
//!   counted.
//! - Re-create first when this gateway's own last handshake with the peer is less than
//!   [`RECREATE_WITHIN`] old: the session may still be valid here, a keepalive over it
//!   would not make the client switch back (the failback black hole).
//! - Order: by public key (deterministic). Pace: at most `rate` kicks per second, in
//!   batches every [`BATCH_PERIOD`] (the first at once).
//!
//! Pure: times are passed in; the caller executes each batch when [`Pacer::poll_timeout`]
//! is due.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::activity::ActivityBook;
use crate::backend::Kick;
use crate::model::{Key, PeerSpec};

/// WireGuard's REJECT_AFTER_TIME: a session older than this is no longer used.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// Own handshakes younger than this mean the peer may still hold a session here
/// (REJECT_AFTER_TIME plus a margin for clock differences and a read's age).
pub const RECREATE_WITHIN: Duration = Duration::from_secs(180 + 15);
/// How often a round sends a batch.
pub const BATCH_PERIOD: Duration = Duration::from_millis(100);

/// What the planner looks at.
#[derive(Clone, Copy, Debug)]
pub struct TakeoverInput<'a> {
    /// The held peers as desired (after local removals).
    pub peers: &'a BTreeMap<Key, Arc<PeerSpec>>,
    pub book: &'a ActivityBook,
    /// This gateway's own last handshake per peer, as its interface reports it now.
    pub handshakes_here: &'a BTreeMap<Key, SystemTime>,
    pub now: SystemTime,
    pub window: Duration,
}

/// One round's kicks, and what was left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TakeoverPlan {
    /// In key order.
    pub kicks: Vec<Kick>,
    /// Active within the window but no endpoint known.
    pub skipped_no_endpoint: usize,
}

impl TakeoverPlan {
    pub fn recreated(&self) -> usize {
        self.kicks.iter().filter(|k| k.recreate).count()
    }
}

/// Plans one takeover round (see the module doc).
pub fn plan_takeover(input: TakeoverInput<'_>) -> TakeoverPlan {
    let age = |t: SystemTime| input.now.duration_since(t).unwrap_or(Duration::ZERO);
    let mut plan = TakeoverPlan::default();
    for (key, spec) in input.peers {
        let seen = input.book.get(key);
        let here = input.handshakes_here.get(key).copied();
        let last_active = match (seen.map(|s| s.last_active()), here) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => match a.or(b) {
                Some(t) => t,
                None => continue,
            },
        };
        if age(last_active) > input.window {
            continue;
        }
        let Some(endpoint) = spec.endpoint.or(seen.and_then(|s| s.endpoint)) else {
            plan.skipped_no_endpoint += 1;
            continue;
        };
        plan.kicks.push(Kick {
            peer: spec.clone(),
            endpoint,
            recreate: here.is_some_and(|h| age(h) < RECREATE_WITHIN),
        });
    }
    plan
}

/// Sends a round's kicks at most `rate` per second.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pacer {
    queue: VecDeque<Kick>,
    batch: usize,
    interval: Duration,
    /// Monotonic time the next batch is due.
    next_at: Duration,
}

impl Pacer {
    /// A round starting at `now` (monotonic): the first batch is due at once. `rate` 0 is
    /// taken as 1.
    pub fn new(kicks: Vec<Kick>, rate: u32, now: Duration) -> Self {
        let rate = u64::from(rate.max(1));
        let per_period = rate * BATCH_PERIOD.as_millis() as u64 / 1000;
        let batch = per_period.max(1);
        Pacer {
            queue: kicks.into(),
            batch: batch as usize,
            // Rounded up: never more than `rate` in any second.
            interval: Duration::from_nanos((batch * 1_000_000_000).div_ceil(rate)),
            next_at: now,
        }
    }

    /// When the next batch is due; None when the round is over.
    pub fn poll_timeout(&self) -> Option<Duration> {
        (!self.queue.is_empty()).then_some(self.next_at)
    }

    /// The next batch if it is due at `now`.
    pub fn poll_batch(&mut self, now: Duration) -> Option<Vec<Kick>> {
        if self.queue.is_empty() || now < self.next_at {
            return None;
        }
        let n = self.batch.min(self.queue.len());
        self.next_at = now + self.interval;
        Some(self.queue.drain(..n).collect())
    }

    /// Kicks not sent yet.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn ep(n: u8) -> SocketAddr {
        format!("198.51.100.{n}:51000").parse().unwrap()
    }

    const WINDOW: Duration = Duration::from_secs(300);

    fn peers(n: u8) -> BTreeMap<Key, Arc<PeerSpec>> {
        (1..=n)
            .map(|i| (key(i), PeerSpec::new(key(i), []).into()))
            .collect()
    }

    fn plan(
        peers: &BTreeMap<Key, Arc<PeerSpec>>,
        book: &ActivityBook,
        here: &BTreeMap<Key, SystemTime>,
        now: SystemTime,
    ) -> TakeoverPlan {
        plan_takeover(TakeoverInput {
            peers,
            book,
            handshakes_here: here,
            now,
            window: WINDOW,
        })
    }

    fn kicked(p: &TakeoverPlan) -> Vec<(Key, SocketAddr, bool)> {
        p.kicks
            .iter()
            .map(|k| (k.peer.public_key, k.endpoint, k.recreate))
            .collect()
    }

    #[test]
    fn only_peers_active_within_the_window_are_kicked() {
        let now = t(10_000);
        let mut book = ActivityBook::new();
        book.relayed(key(1), now - WINDOW, Some(ep(1))); // exactly at the edge: in
        book.relayed(key(2), now - WINDOW - Duration::from_secs(1), Some(ep(2))); // out
        book.relayed(key(3), now + Duration::from_secs(5), Some(ep(3))); // future: in
        let p = plan(&peers(4), &book, &BTreeMap::new(), now);
        assert_eq!(
            kicked(&p),
            vec![(key(1), ep(1), false), (key(3), ep(3), false)]
        );
        assert_eq!(p.skipped_no_endpoint, 0);
    }

    #[test]
    fn the_cores_explicit_endpoint_wins_and_no_endpoint_is_counted() {
        let now = t(10_000);
        let mut book = ActivityBook::new();
        book.relayed(key(1), now, Some(ep(1)));
        book.relayed(key(2), now, None);
        let mut ps = peers(2);
        Arc::make_mut(ps.get_mut(&key(1)).unwrap()).endpoint = Some(ep(99));
        let p = plan(&ps, &book, &BTreeMap::new(), now);
        assert_eq!(kicked(&p), vec![(key(1), ep(99), false)]);
        assert_eq!(p.skipped_no_endpoint, 1);
        // The kick carries the peer as desired (to re-create it).
        assert_eq!(p.kicks[0].peer, ps[&key(1)]);
    }

    #[test]
    fn a_recent_handshake_here_means_recreate() {
        let now = t(10_000);
        let mut book = ActivityBook::new();
        for i in 1..=3 {
            book.relayed(key(i), now, Some(ep(i)));
        }
        let here = BTreeMap::from([
            (key(1), now - Duration::from_secs(10)),
            (key(2), now - RECREATE_WITHIN),
            (key(3), now - Duration::from_secs(3600)),
        ]);
        let p = plan(&peers(3), &book, &here, now);
        assert_eq!(
            kicked(&p),
            vec![
                (key(1), ep(1), true),
                (key(2), ep(2), false),
                (key(3), ep(3), false)
            ]
        );
        assert_eq!(p.recreated(), 1);
    }

    #[test]
    fn an_own_handshake_is_activity_and_peers_not_held_are_never_kicked() {
        let now = t(10_000);
        let mut book = ActivityBook::new();
        book.relayed(key(1), now - Duration::from_secs(3600), Some(ep(1)));
        book.relayed(key(9), now, Some(ep(9))); // not held
        let here = BTreeMap::from([(key(1), now - Duration::from_secs(60))]);
        let p = plan(&peers(2), &book, &here, now);
        assert_eq!(kicked(&p), vec![(key(1), ep(1), true)]);
    }

    #[test]
    fn the_plan_is_deterministic_in_key_order() {
        let now = t(10_000);
        let mut book = ActivityBook::new();
        for i in (1..=50).rev() {
            book.relayed(key(i), now, Some(ep(i)));
        }
        let a = plan(&peers(50), &book, &BTreeMap::new(), now);
        let b = plan(&peers(50), &book.clone(), &BTreeMap::new(), now);
        assert_eq!(a, b);
        let keys: Vec<Key> = a.kicks.iter().map(|k| k.peer.public_key).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(keys.len(), 50);
    }

    fn kicks(n: usize) -> Vec<Kick> {
        (0..n)
            .map(|i| Kick {
                peer: Arc::new(PeerSpec::new(Key([i as u8; 32]), [])),
                endpoint: ep(1),
                recreate: false,
            })
            .collect()
    }

    /// Drives a round on virtual time; the kicks sent per whole second.
    fn drive(mut pacer: Pacer) -> Vec<usize> {
        let mut per_second = Vec::new();
        let mut now = Duration::ZERO;
        while let Some(due) = pacer.poll_timeout() {
            now = now.max(due);
            let batch = pacer.poll_batch(now).unwrap();
            let second = now.as_secs() as usize;
            per_second.resize(per_second.len().max(second + 1), 0);
            per_second[second] += batch.len();
        }
        per_second
    }

    #[test]
    fn a_round_is_paced_at_the_rate() {
        let pacer = Pacer::new(kicks(5000), 2000, Duration::ZERO);
        assert_eq!(pacer.poll_timeout(), Some(Duration::ZERO));
        assert_eq!(drive(pacer), vec![2000, 2000, 1000]);
        // A slow rate: one kick per batch, 3 a second.
        assert_eq!(
            drive(Pacer::new(kicks(7), 3, Duration::ZERO)),
            vec![3, 3, 1]
        );
        // Everything within one batch at a high rate.
        assert_eq!(
            drive(Pacer::new(kicks(10), 100_000, Duration::ZERO)),
            vec![10]
        );
    }

    #[test]
    fn a_batch_is_not_sent_before_it_is_due_and_an_empty_round_is_over() {
        let mut pacer = Pacer::new(kicks(300), 2000, Duration::from_secs(5));
        assert_eq!(pacer.poll_batch(Duration::from_secs(5)).unwrap().len(), 200);
        assert_eq!(pacer.remaining(), 100);
        let due = pacer.poll_timeout().unwrap();
        assert_eq!(due, Duration::from_secs(5) + BATCH_PERIOD);
        assert!(pacer.poll_batch(due - Duration::from_millis(1)).is_none());
        assert_eq!(pacer.poll_batch(due).unwrap().len(), 100);
        assert_eq!(pacer.poll_timeout(), None);
        assert!(Pacer::new(Vec::new(), 10, Duration::ZERO)
            .poll_timeout()
            .is_none());
    }
}
