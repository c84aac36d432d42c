//! Peer statistics for the Core: which peers changed since the last report on this
//! stream ([`StatsTracker`]), a report that splits into size-bounded `Stats` messages as
//! the transport takes them ([`Report`]), and the per-peer counter epochs that let the
//! Core keep exact totals across counter resets ([`Epochs`], see the `Stats` message in
//! the proto).
//!
//! Pure: the caller reads the interface and sends the messages.

use std::collections::BTreeMap;
use std::hash::{Hash as _, Hasher as _};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::SystemTime;

use gatehouse_proto::v1::{PeerStats, Stats};
use gatehouse_proto::MAX_STATS_PEERS;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::model::{Key, PeerSpec, PeerState};
use crate::plan::KernelModel;
use crate::state::codec::{self, unix_ms};

/// What was last reported on the current stream: a fingerprint per peer, kept in the
/// marks of the model's entries ([`crate::model::Marks::reported`]: no record or key copy
/// here), and whether the next report must carry every peer.
#[derive(Clone, Debug, Default)]
pub struct StatsTracker {
    /// The next report carries every peer (a new stream, or a report that was lost).
    all: bool,
}

impl StatsTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The peers whose endpoint, rx, tx, last handshake, allowed IPs or counter epoch
    /// differ from what was last reported (every peer after a [`reset`](Self::reset)), in
    /// key order, and marks them as reported. A peer that leaves the interface takes its
    /// mark along: if it comes back it is reported. Call [`reset`](Self::reset) when a
    /// report could not be sent.
    pub fn changed(&mut self, model: &mut KernelModel, epochs: &Epochs) -> Vec<PeerReading> {
        let all = std::mem::take(&mut self.all);
        // Counted first, so that the readings take exactly their room (a report of
        // every peer grown by doubling would hold up to twice of it).
        let count = model
            .device
            .peers
            .iter()
            .filter(|(key, peer)| all || fingerprint(peer, epochs.get(key)) != peer.marks.reported)
            .count();
        let mut out = Vec::with_capacity(count);
        model.note(|key, peer, marks| {
            let epoch = epochs.get(key);
            let now = fingerprint(peer, epoch);
            if all || now != marks.reported {
                marks.reported = now;
                out.push(PeerReading::of(peer, epoch));
            }
        });
        out
    }

    /// A new stream: the next report carries every peer.
    pub fn reset(&mut self) {
        self.all = true;
    }

    /// `report` (taken from `model` by [`changed`](Self::changed)) was not sent: its
    /// peers are reported next time, with what they read then. Without the model (lent to
    /// a read), every peer is.
    pub fn refused(&mut self, model: Option<&mut KernelModel>, report: &Report) {
        let Some(model) = model else {
            self.all = true;
            return;
        };
        for key in report.keys() {
            model.note_peer(&key, |_, marks| marks.reported = 0);
        }
    }
}

/// One peer as a read found it, for a report: its settings shared with the model of the
/// interface (they hold its key, endpoint and allowed IPs, and are never changed in
/// place), its counters, its handshake and its counter epoch. 40 bytes, no allocation of
/// its own: the report's wire form is built later, one message at a time ([`Report`]).
#[derive(Clone)]
pub struct PeerReading {
    config: Arc<PeerSpec>,
    rx_bytes: u64,
    tx_bytes: u64,
    last_handshake_ms: i64,
    counter_epoch: u64,
}

impl PeerReading {
    /// What `peer` reads now, with its counter epoch.
    pub fn of(peer: &PeerState, counter_epoch: u64) -> Self {
        PeerReading {
            config: Arc::clone(&peer.config),
            rx_bytes: peer.rx_bytes,
            tx_bytes: peer.tx_bytes,
            last_handshake_ms: peer.last_handshake.map_or(0, unix_ms),
            counter_epoch,
        }
    }

    /// The peer's `PeerStats`.
    pub fn to_stats(&self) -> PeerStats {
        let config = &self.config;
        PeerStats {
            public_key: config.public_key.0.to_vec(),
            endpoint: config.endpoint.map(|e| e.to_string()).unwrap_or_default(),
            rx_bytes: self.rx_bytes,
            tx_bytes: self.tx_bytes,
            last_handshake_ms: self.last_handshake_ms,
            counter_epoch: self.counter_epoch,
            allowed_ips: config.allowed_ips.iter().map(|n| n.to_string()).collect(),
        }
    }
}

/// A stats report of one read, as the `Stats` messages it splits into: each of at most
/// `max_bytes` encoded bytes (leave room for the `GatewayMessage` envelope, a few bytes)
/// and [`MAX_STATS_PEERS`] peers, in key order, with `more = true` on all but the last. A
/// single peer larger than `max_bytes` travels alone. No peers: no messages.
///
/// The messages are built as they are taken (the transport takes the next one when it can
/// send it): a report holds its readings, 40 bytes a peer, and at most one message in its
/// wire form, however many peers it carries.
pub struct Report {
    collected_at_ms: i64,
    max_bytes: usize,
    readings: std::vec::IntoIter<PeerReading>,
    /// The first peer of the next message (it did not fit in the last one).
    carry: Option<PeerStats>,
}

impl Report {
    /// The report of `readings`, read at `collected_at`.
    pub fn new(readings: Vec<PeerReading>, collected_at: SystemTime, max_bytes: usize) -> Self {
        Report {
            collected_at_ms: unix_ms(collected_at),
            max_bytes,
            readings: readings.into_iter(),
            carry: None,
        }
    }

    /// The keys of the peers still to be sent, in key order.
    pub fn keys(&self) -> impl Iterator<Item = Key> + '_ {
        let carried = self
            .carry
            .iter()
            .filter_map(|s| Key::from_slice(&s.public_key));
        carried.chain(self.readings.as_slice().iter().map(|r| r.config.public_key))
    }

    /// How many peers are still to be sent.
    pub fn len(&self) -> usize {
        self.readings.len() + usize::from(self.carry.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Iterator for Report {
    type Item = Stats;

    fn next(&mut self) -> Option<Stats> {
        let mut batch = Stats {
            collected_at_ms: self.collected_at_ms,
            peers: Vec::new(),
            more: true,
        };
        // Fixed part: the timestamp and the `more` flag, counted as set.
        let mut size = batch.encoded_len();
        while batch.peers.len() < MAX_STATS_PEERS {
            let Some(peer) = self
                .carry
                .take()
                .or_else(|| self.readings.next().map(|r| r.to_stats()))
            else {
                break;
            };
            let len = peer.encoded_len();
            // Field 2, length-delimited: one key byte, the length, the message.
            let item =
                prost::encoding::key_len(2) + prost::encoding::encoded_len_varint(len as u64) + len;
            if !batch.peers.is_empty() && size + item > self.max_bytes {
                self.carry = Some(peer);
                break;
            }
            batch.peers.push(peer);
            size += item;
        }
        if batch.peers.is_empty() {
            return None;
        }
        batch.more = !self.is_empty();
        Some(batch)
    }
}

/// Short: a report's size, not its peers (they carry keys).
impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Report")
            .field("peers", &self.len())
            .field("collected_at_ms", &self.collected_at_ms)
            .finish_non_exhaustive()
    }
}

/// Short: no key in a log line.
impl std::fmt::Debug for PeerReading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerReading").finish_non_exhaustive()
    }
}

/// Counter epochs by peer: a fresh random nonzero value when the agent adds a peer to the
/// interface, kept across restarts, 0 (unknown) for peers adopted without one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epochs {
    /// Never holds 0 (zeros read from a state file are dropped).
    #[serde(
        serialize_with = "codec::key_map::serialize",
        deserialize_with = "nonzero_epochs"
    )]
    by_key: BTreeMap<Key, u64>,
}

impl Epochs {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new counter run for `key` (the agent just added it): a random nonzero epoch.
    pub fn start(&mut self, key: Key, rng: &mut impl rand::Rng) -> u64 {
        let epoch = rng.random_range(1..=u64::MAX);
        self.by_key.insert(key, epoch);
        epoch
    }

    /// After a run of [`Epochs::start`] (the peers of one apply, in key order): a run that
    /// made most of the map (a cold apply) rebuilds it with full nodes.
    pub fn started(&mut self, count: usize) {
        crate::btree::compact_after(&mut self.by_key, count);
    }

    /// Sets the epoch of `key` to a known value.
    pub fn insert(&mut self, key: Key, epoch: NonZeroU64) {
        self.by_key.insert(key, epoch.get());
    }

    /// The epoch of `key`; 0 when unknown.
    pub fn get(&self, key: &Key) -> u64 {
        self.by_key.get(key).copied().unwrap_or(0)
    }

    /// The peer left the interface.
    pub fn remove(&mut self, key: &Key) {
        self.by_key.remove(key);
    }

    /// Keeps only the peers for which `keep` is true (e.g. those on the interface).
    pub fn retain(&mut self, mut keep: impl FnMut(&Key) -> bool) {
        self.by_key.retain(|k, _| keep(k));
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

fn nonzero_epochs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<Key, u64>, D::Error> {
    let mut map: BTreeMap<Key, u64> = codec::key_map::deserialize(d)?;
    map.retain(|_, e| *e != 0);
    Ok(map)
}

/// What a report carries of `peer` (endpoint, rx, tx, last handshake, allowed IPs, counter
/// epoch), as a 64-bit fingerprint: SipHash with its fixed keys, so the same fields give
/// the same fingerprint; never 0 (the mark of a peer not reported). Two different reports
/// of one peer share a fingerprint with probability 2⁻⁶³; its next change is then
/// reported.
fn fingerprint(peer: &PeerState, epoch: u64) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    let c = &peer.config;
    (
        c.endpoint,
        peer.rx_bytes,
        peer.tx_bytes,
        peer.last_handshake,
        epoch,
    )
        .hash(&mut h);
    c.allowed_ips.hash(&mut h);
    h.finish() | 1
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::SocketAddr;
    use std::time::Duration;

    use ipnet::IpNet;

    use rand::SeedableRng;

    use super::*;
    use crate::model::{DeviceState, Observed, PeerSpec};

    fn key(n: u32) -> Key {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&n.to_be_bytes());
        Key(k)
    }

    fn model(n: u32) -> KernelModel {
        model_of(peers(n))
    }

    fn model_of(peers: BTreeMap<Key, PeerState>) -> KernelModel {
        KernelModel::new(Observed {
            link: None,
            device: DeviceState {
                peers,
                ..Default::default()
            },
        })
    }

    /// Changes one peer of the model as a read would show it.
    fn change(m: &mut KernelModel, n: u32, f: impl FnOnce(&mut PeerState)) {
        m.modify(|o| f(o.device.peers.get_mut(&key(n)).unwrap()));
    }

    fn peers(n: u32) -> BTreeMap<Key, PeerState> {
        (0..n)
            .map(|i| {
                let ip: IpNet = format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255)
                    .parse()
                    .unwrap();
                let mut p = PeerState::fresh(PeerSpec::new(key(i), [ip]));
                p.rx_bytes = u64::from(i) * 10;
                p.tx_bytes = u64::from(i) * 20;
                (key(i), p)
            })
            .collect()
    }

    /// The report's peers in their wire form.
    fn stats(readings: Vec<PeerReading>) -> Vec<PeerStats> {
        readings.iter().map(PeerReading::to_stats).collect()
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn first_report_carries_everyone_then_only_changes() {
        let mut m = model(10_000);
        let epochs = Epochs::new();
        let mut t = StatsTracker::new();
        assert_eq!(t.changed(&mut m, &epochs).len(), 10_000);
        assert!(t.changed(&mut m, &epochs).is_empty());

        // Change 100 peers spread over the map, in varied ways.
        let mut expected = BTreeSet::new();
        for i in (0..10_000).step_by(100) {
            change(&mut m, i, |p| match i % 500 {
                0 => p.rx_bytes += 1,
                100 => p.tx_bytes += 1,
                200 => p.last_handshake = Some(now()),
                300 => {
                    std::sync::Arc::make_mut(&mut p.config)
                        .allowed_ips
                        .insert("fd00::1/128".parse().unwrap());
                }
                _ => {
                    std::sync::Arc::make_mut(&mut p.config).endpoint =
                        Some("192.0.2.1:51820".parse().unwrap())
                }
            });
            expected.insert(key(i));
        }
        let got: BTreeSet<Key> = stats(t.changed(&mut m, &epochs))
            .iter()
            .map(|s| Key::from_slice(&s.public_key).unwrap())
            .collect();
        assert_eq!(got, expected);
        assert!(t.changed(&mut m, &epochs).is_empty());
    }

    #[test]
    fn endpoint_only_change_is_reported_with_its_fields() {
        let mut m = model(3);
        let epochs = Epochs::new();
        let mut t = StatsTracker::new();
        t.changed(&mut m, &epochs);
        let ep: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        change(&mut m, 1, |p| {
            std::sync::Arc::make_mut(&mut p.config).endpoint = Some(ep)
        });
        let got = stats(t.changed(&mut m, &epochs));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].public_key, key(1).0.to_vec());
        assert_eq!(got[0].endpoint, "[2001:db8::1]:4000");
        assert_eq!(got[0].rx_bytes, 10);
        assert_eq!(got[0].tx_bytes, 20);
        assert_eq!(got[0].allowed_ips, vec!["10.0.0.1/32".to_string()]);
        assert_eq!(got[0].last_handshake_ms, 0);
    }

    #[test]
    fn an_allowed_ip_change_alone_is_reported() {
        let mut m = model(3);
        let epochs = Epochs::new();
        let mut t = StatsTracker::new();
        t.changed(&mut m, &epochs);
        let extra: IpNet = "fd00::1/128".parse().unwrap();
        change(&mut m, 2, |p| {
            std::sync::Arc::make_mut(&mut p.config)
                .allowed_ips
                .insert(extra);
        });
        let got = stats(t.changed(&mut m, &epochs));
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].allowed_ips,
            vec!["10.0.0.2/32".to_string(), "fd00::1/128".into()]
        );
        assert!(t.changed(&mut m, &epochs).is_empty());
    }

    #[test]
    fn epoch_change_and_reappearance_are_reported() {
        let mut m = model(2);
        let mut epochs = Epochs::new();
        let mut t = StatsTracker::new();
        t.changed(&mut m, &epochs);
        // The peer was re-created with identical (zero) counters: new epoch.
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let e = epochs.start(key(0), &mut rng);
        let got = stats(t.changed(&mut m, &epochs));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].counter_epoch, e);
        // Gone, then back as the same settings and counters: reported again.
        let gone = m.modify(|o| o.device.peers.remove(&key(1)).unwrap());
        assert!(t.changed(&mut m, &epochs).is_empty());
        let mut back = gone.clone();
        back.marks = crate::model::Marks::default();
        m.modify(|o| o.device.peers.insert(key(1), back));
        assert_eq!(t.changed(&mut m, &epochs).len(), 1);
    }

    /// A peer the model's refresh re-reads with the same counters is not reported again;
    /// one it reads with other settings is (its entry is made anew).
    #[test]
    fn a_refresh_keeps_what_was_reported() {
        let mut m = model(3);
        let epochs = Epochs::new();
        let mut t = StatsTracker::new();
        assert_eq!(t.changed(&mut m, &epochs).len(), 3);
        let mut read = peers(3);
        m.refresh_with(Observed {
            link: None,
            device: DeviceState {
                peers: read.clone(),
                ..Default::default()
            },
        });
        assert!(t.changed(&mut m, &epochs).is_empty());
        std::sync::Arc::make_mut(&mut read.get_mut(&key(2)).unwrap().config).endpoint =
            Some("192.0.2.9:1".parse().unwrap());
        m.refresh_with(Observed {
            link: None,
            device: DeviceState {
                peers: read,
                ..Default::default()
            },
        });
        let got = stats(t.changed(&mut m, &epochs));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].endpoint, "192.0.2.9:1");
    }

    #[test]
    fn reset_reports_everyone_again() {
        let mut m = model(50);
        let epochs = Epochs::new();
        let mut t = StatsTracker::new();
        t.changed(&mut m, &epochs);
        assert!(t.changed(&mut m, &epochs).is_empty());
        t.reset();
        assert_eq!(t.changed(&mut m, &epochs).len(), 50);
        assert!(t.changed(&mut m, &epochs).is_empty());
    }

    #[test]
    fn batches_respect_the_size_and_keep_order() {
        let all = StatsTracker::new().changed(&mut model(10_000), &Epochs::new());
        let max = 64 * 1024;
        let out: Vec<Stats> = Report::new(all.clone(), now(), max).collect();
        assert!(out.len() > 1);
        for (i, b) in out.iter().enumerate() {
            assert!(b.encoded_len() <= max, "batch {i}: {}", b.encoded_len());
            assert_eq!(b.more, i + 1 < out.len());
            assert_eq!(b.collected_at_ms, 1_700_000_000_000);
            assert!(!b.peers.is_empty());
        }
        // Batches are full: adding the next peer would have exceeded the limit.
        for w in out.windows(2) {
            let mut grown = w[0].clone();
            grown.peers.push(w[1].peers[0].clone());
            assert!(grown.encoded_len() > max);
        }
        let flat: Vec<PeerStats> = out.into_iter().flat_map(|b| b.peers).collect();
        assert_eq!(flat, stats(all));
    }

    #[test]
    fn batches_are_exact_for_many_limits() {
        let all = StatsTracker::new().changed(&mut model(200), &Epochs::new());
        for max in 200..=400 {
            let out: Vec<Stats> = Report::new(all.clone(), now(), max).collect();
            for w in out.windows(2) {
                assert!(w[0].encoded_len() <= max, "limit {max}");
                let mut grown = w[0].clone();
                grown.peers.push(w[1].peers[0].clone());
                assert!(grown.encoded_len() > max, "limit {max}: batch not full");
            }
            let last = out.last().unwrap();
            assert!(last.encoded_len() <= max, "limit {max}");
            assert_eq!(out.iter().map(|b| b.peers.len()).sum::<usize>(), 200);
        }
    }

    #[test]
    fn batches_edge_cases() {
        assert!(Report::new(Vec::new(), now(), 1000).next().is_none());
        let all = StatsTracker::new().changed(&mut model(3), &Epochs::new());
        // A limit smaller than any peer: one peer per message, none lost.
        let out: Vec<Stats> = Report::new(all.clone(), now(), 10).collect();
        assert_eq!(out.len(), 3);
        assert_eq!(out.iter().filter(|b| b.more).count(), 2);
        // A generous limit: one message, not marked `more`.
        let out: Vec<Stats> = Report::new(all, now(), 1 << 20).collect();
        assert_eq!(out.len(), 1);
        assert!(!out[0].more);
        // No limit on bytes: the protocol's limit on peers still splits.
        let all = StatsTracker::new().changed(&mut model(40_000), &Epochs::new());
        let mut report = Report::new(all, now(), usize::MAX);
        let first = report.next().unwrap();
        assert_eq!(first.peers.len(), MAX_STATS_PEERS);
        assert!(first.more);
        assert_eq!(report.len(), 40_000 - MAX_STATS_PEERS);
        let second = report.next().unwrap();
        assert_eq!(second.peers.len(), 40_000 - MAX_STATS_PEERS);
        assert!(!second.more && report.is_empty() && report.next().is_none());
    }

    #[test]
    fn epochs_are_nonzero_kept_and_dropped() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut e = Epochs::new();
        let a = e.start(key(1), &mut rng);
        let b = e.start(key(2), &mut rng);
        assert!(a != 0 && b != 0 && a != b);
        assert_eq!(e.get(&key(1)), a);
        assert_eq!(e.get(&key(3)), 0, "adopted without state: unknown");
        e.insert(key(3), NonZeroU64::new(5).unwrap());
        e.remove(&key(2));
        assert_eq!(e.get(&key(2)), 0);
        e.retain(|k| *k != key(3));
        assert_eq!(e.len(), 1);

        let json = serde_json::to_string(&e).unwrap();
        let back: Epochs = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
        let zero = format!(r#"{{"{}":0}}"#, key(9).to_base64());
        let back: Epochs = serde_json::from_str(&zero).unwrap();
        assert!(back.is_empty());
    }
}
