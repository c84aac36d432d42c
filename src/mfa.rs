//! MFA inactivity: which peers of an MFA location have been inactive longer than the
//! location's threshold (design §6), and the tombstones that keep such a peer from being
//! re-added for the same session ([`tombstones`]).
//!
//! A peer shows life when a handshake completes or when it sends bytes (keepalives count):
//! WireGuard renews a handshake only every two minutes under traffic, so handshakes alone
//! would cut off active users for any threshold under that. A peer that never showed life
//! is counted from when the tracker first saw it on the interface.
//!
//! Time: inactivity is measured on a MONOTONIC clock the caller passes in (`now`, a
//! `Duration` since any fixed origin, e.g. `Instant::now() - start`). Wall time
//! (`SystemTime`) is used only to read the kernel's handshake timestamps and to carry
//! timers across a restart. Wall-clock jumps therefore never remove an active peer:
//! - received bytes are judged on the monotonic clock only;
//! - a handshake counts when its timestamp CHANGES (not when it is "newer"), so a clock set
//!   back does not hide new handshakes; its age is `now_wall - handshake`, clamped at 0 for
//!   a handshake in the future, and never more than the time since the previous
//!   observation (a handshake we had not seen before happened after we last looked), so a
//!   clock set forward cannot age it beyond that;
//! - after a restart the downtime is `max(0, now_wall - saved_wall)`: a clock set back adds
//!   nothing (removal is delayed by at most that jump), and activity during the downtime
//!   (counters grew) still keeps the peer.
//!
//! Pure: no clock reads, no I/O. The agent observes the interface, calls
//! [`MfaTracker::expired`] with the location's [`MfaPolicy`], removes those peers, calls
//! [`MfaTracker::forget`] and buries them in [`Tombstones`].

pub mod tombstones;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::keyed::KeyedVec;
use crate::model::{Key, PeerState};
use crate::state::codec::{self, duration_ms, from_unix_ms, unix_ms};

pub use tombstones::{Session, Tombstone, Tombstones};

/// Whether a location removes inactive peers, and after how long. Built only through
/// the validated constructors, so "MFA on with threshold 0" cannot exist and "MFA off"
/// is a value the tracker understands (it then expires nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MfaPolicy {
    /// Peers are never removed for inactivity.
    Disabled,
    /// Peers inactive for longer than the threshold are removed.
    Enabled(Threshold),
}

/// A nonzero inactivity threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Threshold(Duration);

impl Threshold {
    /// `None` for zero.
    pub fn new(d: Duration) -> Option<Self> {
        (!d.is_zero()).then_some(Threshold(d))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

/// MFA settings that cannot be enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("MFA is enabled but the disconnect threshold is 0")]
pub struct ZeroThreshold;

impl MfaPolicy {
    /// From the Core's `MfaSettings` (`enabled`, `disconnect_threshold_secs`). The
    /// threshold is ignored when disabled; enabled with 0 is an error (reject the
    /// revision, as the proto says).
    pub fn from_settings(enabled: bool, threshold_secs: u32) -> Result<Self, ZeroThreshold> {
        if !enabled {
            return Ok(MfaPolicy::Disabled);
        }
        Threshold::new(Duration::from_secs(threshold_secs.into()))
            .map(MfaPolicy::Enabled)
            .ok_or(ZeroThreshold)
    }

    /// The threshold, when enabled.
    pub fn threshold(self) -> Option<Duration> {
        match self {
            MfaPolicy::Disabled => None,
            MfaPolicy::Enabled(t) => Some(t.get()),
        }
    }
}

/// What one read of the interface says about a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSample {
    pub rx_bytes: u64,
    pub last_handshake: Option<SystemTime>,
}

impl From<&PeerState> for PeerSample {
    fn from(p: &PeerState) -> Self {
        PeerSample {
            rx_bytes: p.rx_bytes,
            last_handshake: p.last_handshake,
        }
    }
}

/// A peer to remove, with what its `PeerEvent` needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expiry {
    pub key: Key,
    pub inactive_for: Duration,
    pub threshold: Duration,
    /// The last handshake seen (for `PeerEvent.last_handshake_ms`).
    pub last_handshake: Option<SystemTime>,
}

impl Expiry {
    /// Human detail for the event, e.g. "inactive for 612s > threshold 600s".
    pub fn detail(&self) -> String {
        format!(
            "inactive for {}s > threshold {}s",
            self.inactive_for.as_secs(),
            self.threshold.as_secs()
        )
    }
}

/// Per-peer inactivity timers: one fixed-size record per tracked peer, sorted by key
/// ([`KeyedVec`]: no tree node per peer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MfaTracker {
    peers: KeyedVec<Entry>,
}

impl MfaTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one read of the interface. Peers seen for the first time start their timer
    /// at `now`. Sign of life: rx grew, rx fell to a lower nonzero value (the peer was
    /// re-created and has received since), or the handshake timestamp changed to a new
    /// value. Peers absent from this read keep their timer (a peer removed by hand and
    /// re-added by the reconciler shows no life by that); call [`forget`](Self::forget)
    /// or [`retain`](Self::retain) when a peer leaves the desired state.
    pub fn observe<I>(&mut self, peers: I, now: Duration, now_wall: SystemTime)
    where
        I: IntoIterator<Item = (Key, PeerSample)>,
        I::IntoIter: Clone,
    {
        // New peers join in one batch, made at its size with the tracker's room (it
        // becomes the tracker's vector on a first read): no growing copy beside it.
        let peers = peers.into_iter();
        let first = peers
            .clone()
            .filter(|(k, _)| !self.peers.contains_key(k))
            .count();
        let mut new = Vec::with_capacity(KeyedVec::<Entry>::room_for(first));
        for (key, sample) in peers {
            match self.peers.get_mut(&key) {
                Some(entry) => entry.observe(sample, now, now_wall),
                None => new.push((key, Some(Entry::first_seen(sample, now)))),
            }
        }
        // A new key read twice: seen at its first sample, observed at the next (a first
        // entry holds its sample as is). A read comes in key order: no sort (a stable
        // sort takes a scratch copy).
        if !new.is_sorted_by_key(|(k, _)| *k) {
            new.sort_by_key(|(k, _)| *k);
        }
        new.dedup_by(|later, kept| {
            let twice = later.0 == kept.0;
            if let (true, Some(later), Some(kept)) = (twice, later.1, kept.1.as_mut()) {
                let sample = PeerSample {
                    rx_bytes: later.rx_bytes,
                    last_handshake: later.last_handshake,
                };
                kept.observe(sample, now, now_wall);
            }
            twice
        });
        self.peers.merge(new);
    }

    /// A sign of life another gateway of the location saw at wall time `at` (relayed by
    /// the Core): the peer is active, only not here. Counts like a handshake seen here:
    /// its age is `now_wall - at`, clamped at 0 for a time in the future and never
    /// older than the peer's current sign of life. Unknown peers are ignored (they start
    /// their timer when first observed).
    pub fn seen_elsewhere(
        &mut self,
        key: &Key,
        at: SystemTime,
        now: Duration,
        now_wall: SystemTime,
    ) {
        let Some(entry) = self.peers.get_mut(key) else {
            return;
        };
        let age = now_wall.duration_since(at).unwrap_or(Duration::ZERO);
        if age < entry.life.age(now) {
            entry.life = Mark::aged(now, age);
        }
    }

    /// Peers inactive for longer than the threshold, by key. Nothing when disabled.
    /// Call right after [`observe`](Self::observe) with a fresh read.
    pub fn expired(&self, policy: MfaPolicy, now: Duration) -> Vec<Expiry> {
        let Some(threshold) = policy.threshold() else {
            return Vec::new();
        };
        self.peers
            .iter()
            .filter_map(|(key, e)| {
                let inactive_for = e.life.age(now);
                (inactive_for > threshold).then_some(Expiry {
                    key: *key,
                    inactive_for,
                    threshold,
                    last_handshake: e.last_handshake,
                })
            })
            .collect()
    }

    /// The earliest monotonic time at which [`expired`](Self::expired) would return a
    /// peer if none shows life until then (`<= now` when one is expired already). The
    /// agent re-reads the interface at that time, so removal happens on time without
    /// polling. `None` when disabled or nothing is tracked.
    pub fn next_deadline(&self, policy: MfaPolicy, now: Duration) -> Option<Duration> {
        let threshold = policy.threshold()?;
        let max_age = self.peers.iter().map(|(_, e)| e.life.age(now)).max()?;
        Some(match threshold.checked_sub(max_age) {
            // Expired means strictly longer than the threshold.
            Some(left) => now
                .saturating_add(left)
                .saturating_add(Duration::from_nanos(1)),
            None => now,
        })
    }

    /// How long a peer has been inactive, if tracked.
    pub fn inactive_for(&self, key: &Key, now: Duration) -> Option<Duration> {
        self.peers.get(key).map(|e| e.life.age(now))
    }

    /// Stops tracking a peer (removed, or re-authorized: its timer restarts when it is
    /// next observed).
    pub fn forget(&mut self, key: &Key) {
        self.peers.remove(key);
    }

    /// Keeps only the peers for which `keep` is true (e.g. those in the desired state).
    pub fn retain(&mut self, mut keep: impl FnMut(&Key) -> bool) {
        self.peers.retain(|k, _| keep(k));
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The timers in a form that survives a restart.
    pub fn persist(&self, now: Duration, now_wall: SystemTime) -> MfaSnapshot {
        MfaSnapshot {
            saved_at_unix_ms: unix_ms(now_wall),
            peers: self.timers(now).collect(),
        }
    }

    /// [`MfaTracker::persist`] without building it: serializes as the snapshot would.
    pub fn saved(&self, now: Duration, now_wall: SystemTime) -> MfaSaved<'_> {
        MfaSaved {
            tracker: self,
            now,
            saved_at_unix_ms: unix_ms(now_wall),
        }
    }

    /// Each peer's timer as saved at `now`, in key order.
    fn timers(&self, now: Duration) -> impl Iterator<Item = (Key, PeerTimer)> + '_ {
        self.peers.iter().map(move |(k, e)| {
            let snap = PeerTimer {
                rx_bytes: e.rx_bytes,
                last_handshake_unix_ms: e.last_handshake.map(unix_ms),
                inactive_for_ms: duration_ms(e.life.age(now)),
                since_observed_ms: duration_ms(e.observed.age(now)),
            };
            (*k, snap)
        })
    }

    /// Timers from a snapshot saved by an earlier run. The downtime (`now_wall` minus the
    /// saving time, 0 if the clock went back) is added to every timer. The saved counters
    /// and handshakes stay the reference, so the first [`observe`](Self::observe) counts
    /// activity during the downtime as life.
    pub fn restore(snap: &MfaSnapshot, now: Duration, now_wall: SystemTime) -> Self {
        let downtime = now_wall
            .duration_since(from_unix_ms(snap.saved_at_unix_ms))
            .unwrap_or(Duration::ZERO);
        let peers = snap.peers.iter().map(|(k, p)| {
            let entry = Entry {
                rx_bytes: p.rx_bytes,
                last_handshake: p.last_handshake_unix_ms.map(from_unix_ms),
                life: Mark::aged(
                    now,
                    Duration::from_millis(p.inactive_for_ms).saturating_add(downtime),
                ),
                observed: Mark::aged(
                    now,
                    Duration::from_millis(p.since_observed_ms).saturating_add(downtime),
                ),
            };
            (*k, entry)
        });
        MfaTracker {
            peers: KeyedVec::from_sorted(peers),
        }
    }
}

/// The persisted form of [`MfaTracker`] (part of the state file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MfaSnapshot {
    /// Wall time of saving, Unix ms.
    pub saved_at_unix_ms: i64,
    #[serde(with = "codec::key_map")]
    pub peers: BTreeMap<Key, PeerTimer>,
}

/// [`MfaSnapshot`] borrowed from the tracker ([`MfaTracker::saved`]): the same JSON, each
/// peer's timer made as it is written.
pub struct MfaSaved<'a> {
    tracker: &'a MfaTracker,
    now: Duration,
    saved_at_unix_ms: i64,
}

impl Serialize for MfaSaved<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;

        struct Peers<'a>(&'a MfaSaved<'a>);
        impl Serialize for Peers<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let timers = self.0.tracker.timers(self.0.now);
                s.collect_map(timers.map(|(k, t)| (k.to_base64(), t)))
            }
        }

        // The fields of `MfaSnapshot`, in its order.
        let mut st = s.serialize_struct("MfaSnapshot", 2)?;
        st.serialize_field("saved_at_unix_ms", &self.saved_at_unix_ms)?;
        st.serialize_field("peers", &Peers(self))?;
        st.end()
    }
}

/// One peer's timer as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerTimer {
    pub rx_bytes: u64,
    pub last_handshake_unix_ms: Option<i64>,
    pub inactive_for_ms: u64,
    pub since_observed_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    rx_bytes: u64,
    last_handshake: Option<SystemTime>,
    /// Last sign of life.
    life: Mark,
    /// Last time this peer was in an observation.
    observed: Mark,
}

impl Entry {
    fn first_seen(sample: PeerSample, now: Duration) -> Self {
        Entry {
            rx_bytes: sample.rx_bytes,
            last_handshake: sample.last_handshake,
            life: Mark::aged(now, Duration::ZERO),
            observed: Mark::aged(now, Duration::ZERO),
        }
    }

    /// A read of a tracked peer (the rules of [`MfaTracker::observe`]).
    fn observe(&mut self, sample: PeerSample, now: Duration, now_wall: SystemTime) {
        let mut life_age: Option<Duration> = None;
        let rx_reset_with_traffic = sample.rx_bytes < self.rx_bytes && sample.rx_bytes > 0;
        if sample.rx_bytes > self.rx_bytes || rx_reset_with_traffic {
            life_age = Some(Duration::ZERO);
        }
        if let Some(hs) = sample.last_handshake {
            if self.last_handshake != Some(hs) {
                let age = now_wall.duration_since(hs).unwrap_or(Duration::ZERO);
                let age = age.min(self.observed.age(now));
                life_age = Some(life_age.map_or(age, |a| a.min(age)));
            }
        }
        if let Some(age) = life_age {
            if age < self.life.age(now) {
                self.life = Mark::aged(now, age);
            }
        }
        self.rx_bytes = sample.rx_bytes;
        // A peer re-created (takeover, drift repair) reads as never handshaken: its
        // last handshake is still the one seen before (for the event), and a
        // re-creation is no sign of life.
        if sample.last_handshake.is_some() {
            self.last_handshake = sample.last_handshake;
        }
        self.observed = Mark::aged(now, Duration::ZERO);
    }
}

/// "`before` had already passed at monotonic time `at`": a point in the past that may lie
/// before the monotonic origin (restored timers, old handshakes) without underflow.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Mark {
    at: Duration,
    before: Duration,
}

impl Mark {
    fn aged(at: Duration, before: Duration) -> Self {
        Mark { at, before }
    }

    /// Time elapsed since the mark at `now` (a `now` before `at` counts as no time).
    fn age(self, now: Duration) -> Duration {
        self.before.saturating_add(now.saturating_sub(self.at))
    }
}

impl fmt::Debug for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} before {:?}", self.before, self.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    /// A wall clock in a plausible present.
    fn wall(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + s(1_700_000_000 + secs)
    }

    fn on(secs: u64) -> MfaPolicy {
        MfaPolicy::from_settings(true, secs as u32).unwrap()
    }

    fn sample(rx: u64, hs: Option<SystemTime>) -> PeerSample {
        PeerSample {
            rx_bytes: rx,
            last_handshake: hs,
        }
    }

    fn expired_keys(t: &MfaTracker, p: MfaPolicy, now: Duration) -> Vec<Key> {
        t.expired(p, now).into_iter().map(|e| e.key).collect()
    }

    /// Monotonic and wall clocks advancing together, as on a calm host.
    fn observe_at(t: &mut MfaTracker, secs: u64, peers: &[(Key, PeerSample)]) {
        t.observe(peers.iter().copied(), s(secs), wall(secs));
    }

    #[test]
    fn a_timer_is_one_fixed_size_record() {
        // The removal mark of the sorted vector fits in the record's niche: a tracked
        // peer costs its key and its entry, nothing more (no tree node).
        assert_eq!(
            std::mem::size_of::<(Key, Option<Entry>)>(),
            std::mem::size_of::<Key>() + std::mem::size_of::<Entry>()
        );
        assert!(std::mem::size_of::<Entry>() <= 88);
        let mut t = MfaTracker::new();
        let sample = PeerSample {
            rx_bytes: 1,
            last_handshake: None,
        };
        t.observe((0..100u8).rev().map(|n| (key(n), sample)), s(1), wall(1));
        assert_eq!(t.len(), 100);
        assert_eq!(t.peers.iter().next().map(|(k, _)| *k), Some(key(0)));
    }

    #[test]
    fn policy_from_settings() {
        assert_eq!(MfaPolicy::from_settings(false, 0), Ok(MfaPolicy::Disabled));
        assert_eq!(
            MfaPolicy::from_settings(false, 600),
            Ok(MfaPolicy::Disabled)
        );
        assert_eq!(MfaPolicy::from_settings(true, 0), Err(ZeroThreshold));
        assert_eq!(on(600).threshold(), Some(s(600)));
        assert!(Threshold::new(Duration::ZERO).is_none());
    }

    #[test]
    fn recent_handshake_keeps_old_handshake_expires() {
        let mut t = MfaTracker::new();
        observe_at(
            &mut t,
            0,
            &[(key(1), sample(0, None)), (key(2), sample(0, None))],
        );
        // Peer 1 handshakes at t=50 (seen at 55); peer 2 never.
        observe_at(
            &mut t,
            55,
            &[
                (key(1), sample(0, Some(wall(50)))),
                (key(2), sample(0, None)),
            ],
        );
        assert_eq!(t.inactive_for(&key(1), s(55)), Some(s(5)));
        assert_eq!(expired_keys(&t, on(30), s(55)), vec![key(2)]);
        // Peer 1's handshake ages past 30 s with nothing new.
        observe_at(
            &mut t,
            81,
            &[
                (key(1), sample(0, Some(wall(50)))),
                (key(2), sample(0, None)),
            ],
        );
        assert_eq!(expired_keys(&t, on(30), s(81)), vec![key(1), key(2)]);
        let e = &t.expired(on(30), s(81))[0];
        assert_eq!(e.inactive_for, s(31));
        assert_eq!(e.last_handshake, Some(wall(50)));
        assert_eq!(e.detail(), "inactive for 31s > threshold 30s");
    }

    #[test]
    fn traffic_without_new_handshake_keeps_peer_under_rekey_interval() {
        // WireGuard rekeys every 2 minutes; with T = 30 s, only rx shows life.
        let mut t = MfaTracker::new();
        let hs = Some(wall(1));
        observe_at(&mut t, 0, &[(key(1), sample(0, None))]);
        let mut rx = 148;
        for now in (2..=300).step_by(10) {
            rx += 32; // a keepalive
            observe_at(&mut t, now, &[(key(1), sample(rx, hs))]);
            assert!(expired_keys(&t, on(30), s(now)).is_empty(), "cut at {now}");
        }
        // Traffic stops: expires once 30 s have passed since the last rx.
        observe_at(&mut t, 320, &[(key(1), sample(rx, hs))]);
        assert!(expired_keys(&t, on(30), s(320)).is_empty());
        observe_at(&mut t, 333, &[(key(1), sample(rx, hs))]);
        assert_eq!(t.inactive_for(&key(1), s(333)), Some(s(41)));
        assert_eq!(expired_keys(&t, on(30), s(333)), vec![key(1)]);
    }

    #[test]
    fn never_handshaken_counts_from_first_sight() {
        let mut t = MfaTracker::new();
        observe_at(&mut t, 100, &[(key(1), sample(0, None))]);
        observe_at(&mut t, 130, &[(key(1), sample(0, None))]);
        assert!(
            expired_keys(&t, on(30), s(130)).is_empty(),
            "exactly T is not longer"
        );
        observe_at(&mut t, 131, &[(key(1), sample(0, None))]);
        assert_eq!(expired_keys(&t, on(30), s(131)), vec![key(1)]);
        let e = &t.expired(on(30), s(131))[0];
        assert_eq!(e.last_handshake, None);
    }

    #[test]
    fn disabled_never_expires() {
        let mut t = MfaTracker::new();
        observe_at(&mut t, 0, &[(key(1), sample(0, None))]);
        let far = s(10 * 365 * 86_400);
        assert!(t.expired(MfaPolicy::Disabled, far).is_empty());
        assert_eq!(t.next_deadline(MfaPolicy::Disabled, far), None);
        // Same tracker, MFA on: it would expire.
        assert_eq!(expired_keys(&t, on(600), far), vec![key(1)]);
    }

    #[test]
    fn threshold_changed_by_core() {
        let mut t = MfaTracker::new();
        observe_at(
            &mut t,
            0,
            &[(key(1), sample(0, None)), (key(2), sample(0, None))],
        );
        observe_at(
            &mut t,
            200,
            &[(key(1), sample(10, None)), (key(2), sample(0, None))],
        );
        observe_at(
            &mut t,
            400,
            &[(key(1), sample(10, None)), (key(2), sample(0, None))],
        );
        // Peer 1 inactive 200 s, peer 2 400 s.
        assert!(expired_keys(&t, on(600), s(400)).is_empty());
        assert_eq!(expired_keys(&t, on(300), s(400)), vec![key(2)]);
        assert_eq!(expired_keys(&t, on(100), s(400)), vec![key(1), key(2)]);
        // Longer again: nobody.
        assert!(expired_keys(&t, on(3600), s(400)).is_empty());
    }

    #[test]
    fn wall_clock_set_back_does_not_remove_active_peer() {
        let mut t = MfaTracker::new();
        observe_at(&mut t, 0, &[(key(1), sample(0, Some(wall(0))))]);
        // The wall clock goes back one hour at monotonic 10 s; the peer handshakes at
        // monotonic 20 s, which the kernel stamps with the set-back clock.
        let back = |m: u64| wall(m) - s(3600);
        let hs_new = back(20);
        t.observe([(key(1), sample(0, Some(hs_new)))], s(25), back(25));
        assert_eq!(t.inactive_for(&key(1), s(25)), Some(s(5)));
        // Rx under the set-back clock is life too.
        t.observe([(key(1), sample(500, Some(hs_new)))], s(50), back(50));
        assert_eq!(t.inactive_for(&key(1), s(50)), Some(Duration::ZERO));
        assert!(expired_keys(&t, on(30), s(60)).is_empty());
    }

    #[test]
    fn wall_clock_set_forward_does_not_remove_active_peer() {
        let mut t = MfaTracker::new();
        observe_at(&mut t, 0, &[(key(1), sample(0, None))]);
        // At monotonic 5 s the peer handshakes (stamped correctly); before the next
        // read at 10 s, the wall clock jumps forward one hour.
        let fwd = |m: u64| wall(m) + s(3600);
        t.observe([(key(1), sample(148, Some(wall(5))))], s(10), fwd(10));
        assert_eq!(t.inactive_for(&key(1), s(10)), Some(Duration::ZERO));
        // Without rx: a handshake unseen at the last read counts as no older than that read.
        let mut t = MfaTracker::new();
        observe_at(&mut t, 0, &[(key(1), sample(0, None))]);
        t.observe([(key(1), sample(0, Some(wall(5))))], s(10), fwd(10));
        assert_eq!(t.inactive_for(&key(1), s(10)), Some(s(10)));
        assert!(expired_keys(&t, on(30), s(10)).is_empty());
        // An unchanged handshake under the jumped clock changes nothing.
        t.observe([(key(1), sample(0, Some(wall(5))))], s(20), fwd(20));
        assert_eq!(t.inactive_for(&key(1), s(20)), Some(s(20)));
    }

    #[test]
    fn handshake_in_the_future_counts_as_now_once() {
        let mut t = MfaTracker::new();
        observe_at(&mut t, 0, &[(key(1), sample(0, None))]);
        observe_at(&mut t, 20, &[(key(1), sample(0, Some(wall(500))))]);
        assert_eq!(t.inactive_for(&key(1), s(20)), Some(Duration::ZERO));
        // The same future timestamp later is not new life: removal is delayed by at most
        // one threshold.
        observe_at(&mut t, 51, &[(key(1), sample(0, Some(wall(500))))]);
        assert_eq!(expired_keys(&t, on(30), s(51)), vec![key(1)]);
    }

    #[test]
    fn counter_reset_to_lower_nonzero_is_life_but_zero_is_not() {
        let mut t = MfaTracker::new();
        observe_at(&mut t, 0, &[(key(1), sample(1000, None))]);
        observe_at(&mut t, 20, &[(key(1), sample(0, None))]);
        assert_eq!(t.inactive_for(&key(1), s(20)), Some(s(20)));
        observe_at(&mut t, 25, &[(key(1), sample(1000, None))]);
        assert_eq!(t.inactive_for(&key(1), s(25)), Some(Duration::ZERO));
        observe_at(&mut t, 30, &[(key(1), sample(200, None))]);
        assert_eq!(t.inactive_for(&key(1), s(30)), Some(Duration::ZERO));
    }

    #[test]
    fn a_re_created_peer_keeps_its_timer_and_last_handshake() {
        let mut t = MfaTracker::new();
        observe_at(&mut t, 0, &[(key(1), sample(500, Some(wall(0))))]);
        observe_at(&mut t, 10, &[(key(1), sample(900, Some(wall(0))))]);
        // Re-created at 12: counters and handshake read as zero and none.
        observe_at(&mut t, 12, &[(key(1), sample(0, None))]);
        observe_at(&mut t, 40, &[(key(1), sample(0, None))]);
        assert_eq!(t.inactive_for(&key(1), s(40)), Some(s(30)));
        let expired = t.expired(on(20), s(40));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].last_handshake, Some(wall(0)));
        // Its first handshake after the re-creation is life.
        observe_at(&mut t, 41, &[(key(1), sample(0, Some(wall(41))))]);
        assert_eq!(t.inactive_for(&key(1), s(41)), Some(Duration::ZERO));
    }

    #[test]
    fn new_handshake_age_is_bounded_by_the_previous_read() {
        let mut t = MfaTracker::new();
        observe_at(&mut t, 0, &[(key(1), sample(0, None))]);
        observe_at(&mut t, 10, &[(key(1), sample(100, None))]);
        observe_at(&mut t, 40, &[(key(1), sample(100, Some(wall(15))))]);
        assert_eq!(t.inactive_for(&key(1), s(40)), Some(s(25)));
        // A changed handshake stamped earlier than the last one (clock set back) was not
        // there at the read at 40, so it happened since: life no earlier than 40.
        observe_at(&mut t, 45, &[(key(1), sample(100, Some(wall(12))))]);
        assert_eq!(t.inactive_for(&key(1), s(45)), Some(s(5)));
    }

    #[test]
    fn absent_peer_keeps_timer_until_forgotten() {
        let mut t = MfaTracker::new();
        observe_at(&mut t, 0, &[(key(1), sample(50, None))]);
        observe_at(&mut t, 20, &[]);
        // Re-added by the reconciler with fresh counters: no life.
        observe_at(&mut t, 40, &[(key(1), sample(0, None))]);
        assert_eq!(expired_keys(&t, on(30), s(40)), vec![key(1)]);
        t.forget(&key(1));
        assert!(t.is_empty());
        observe_at(&mut t, 41, &[(key(1), sample(0, None))]);
        assert_eq!(t.inactive_for(&key(1), s(41)), Some(Duration::ZERO));
        t.retain(|k| *k != key(1));
        assert!(t.is_empty());
    }

    #[test]
    fn next_deadline_is_the_first_expiry() {
        let mut t = MfaTracker::new();
        assert_eq!(t.next_deadline(on(30), s(0)), None);
        observe_at(&mut t, 0, &[(key(1), sample(0, None))]);
        observe_at(
            &mut t,
            10,
            &[(key(1), sample(0, None)), (key(2), sample(0, None))],
        );
        let d = t.next_deadline(on(30), s(10)).unwrap();
        assert_eq!(d, s(30) + Duration::from_nanos(1));
        assert!(t.expired(on(30), d - Duration::from_nanos(1)).is_empty());
        assert_eq!(expired_keys(&t, on(30), d), vec![key(1)]);
        // After peer 1 shows life at 20, peer 2 (seen at 10) is next.
        observe_at(
            &mut t,
            20,
            &[(key(1), sample(5, None)), (key(2), sample(0, None))],
        );
        let d = t.next_deadline(on(30), s(20)).unwrap();
        assert_eq!(d, s(40) + Duration::from_nanos(1));
        assert_eq!(expired_keys(&t, on(30), d), vec![key(2)]);
        // Already expired: now.
        assert_eq!(t.next_deadline(on(30), s(100)), Some(s(100)));
        // A shorter threshold brings it forward.
        assert_eq!(
            t.next_deadline(on(15), s(20)),
            Some(s(25) + Duration::from_nanos(1))
        );
    }

    #[test]
    fn restore_counts_downtime() {
        let mut t = MfaTracker::new();
        observe_at(&mut t, 0, &[(key(1), sample(10, None))]);
        let snap = t.persist(s(100), wall(100));
        // Down for 400 s; the new process's monotonic clock starts near 0.
        let r = MfaTracker::restore(&snap, s(1), wall(500));
        assert_eq!(r.inactive_for(&key(1), s(1)), Some(s(500)));
        assert_eq!(expired_keys(&r, on(300), s(1)), vec![key(1)]);
        assert!(expired_keys(&r, on(600), s(1)).is_empty());
        assert_eq!(
            r.next_deadline(on(600), s(1)),
            Some(s(101) + Duration::from_nanos(1))
        );
    }

    #[test]
    fn restore_keeps_peer_active_during_downtime() {
        let mut t = MfaTracker::new();
        let hs = Some(wall(0));
        observe_at(
            &mut t,
            0,
            &[(key(1), sample(10, hs)), (key(2), sample(10, hs))],
        );
        let snap = t.persist(s(100), wall(100));
        let mut r = MfaTracker::restore(&snap, s(0), wall(500));
        // Peer 1 received bytes while the agent was down; peer 2 did not.
        r.observe(
            [(key(1), sample(99, hs)), (key(2), sample(10, hs))],
            s(0),
            wall(500),
        );
        assert_eq!(expired_keys(&r, on(300), s(0)), vec![key(2)]);
        // A handshake during the downtime is life at its time (bounded by the downtime).
        let mut r = MfaTracker::restore(&snap, s(0), wall(500));
        r.observe([(key(2), sample(10, Some(wall(450))))], s(0), wall(500));
        assert_eq!(r.inactive_for(&key(2), s(0)), Some(s(50)));
    }

    #[test]
    fn restore_with_clock_set_back_adds_nothing() {
        let mut t = MfaTracker::new();
        observe_at(&mut t, 0, &[(key(1), sample(10, None))]);
        let snap = t.persist(s(100), wall(100));
        let r = MfaTracker::restore(&snap, s(7), wall(100) - s(3600));
        assert_eq!(r.inactive_for(&key(1), s(7)), Some(s(100)));
        assert_eq!(r.inactive_for(&key(1), s(17)), Some(s(110)));
    }

    #[test]
    fn snapshot_serde_round_trip() {
        let mut t = MfaTracker::new();
        observe_at(
            &mut t,
            0,
            &[
                (key(1), sample(10, Some(wall(0)))),
                (key(2), sample(0, None)),
            ],
        );
        let snap = t.persist(s(5), wall(5));
        let json = serde_json::to_string(&snap).unwrap();
        let back: MfaSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        let r = MfaTracker::restore(&back, s(5), wall(5));
        assert_eq!(r.persist(s(5), wall(5)), snap);
    }

    #[test]
    fn activity_seen_by_another_gateway_keeps_the_peer() {
        let policy = MfaPolicy::from_settings(true, 30).unwrap();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let k = Key([1; 32]);
        let mut t = MfaTracker::new();
        let idle = PeerSample {
            rx_bytes: 0,
            last_handshake: None,
        };
        t.observe([(k, idle)], Duration::ZERO, wall);
        let now = Duration::from_secs(25);
        // Active elsewhere 2 s ago: the timer restarts from then.
        t.seen_elsewhere(&k, wall + Duration::from_secs(23), now, wall + now);
        let later = Duration::from_secs(40);
        assert!(t.expired(policy, later).is_empty());
        assert_eq!(t.inactive_for(&k, later), Some(Duration::from_secs(17)));
        // An older relayed sign of life changes nothing; a future one counts as now.
        t.seen_elsewhere(&k, wall, later, wall + later);
        assert_eq!(t.inactive_for(&k, later), Some(Duration::from_secs(17)));
        t.seen_elsewhere(&k, wall + Duration::from_secs(3600), later, wall + later);
        assert_eq!(t.inactive_for(&k, later), Some(Duration::ZERO));
        // Unknown peers are not tracked by a relay.
        t.seen_elsewhere(&Key([2; 32]), wall, later, wall + later);
        assert_eq!(t.len(), 1);
    }
}
