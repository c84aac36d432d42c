//! The interface's peers as the last read found them, for the per-peer metrics and
//! `gatehouse status` ([`PeerTable`]), and the agent's own traffic totals per peer that
//! never go backwards when a peer is re-created ([`PeerTotals`], the counter-run rule of
//! the proto's `Stats`).
//!
//! Pure: built from the model after a read. Kept only while the location has at most
//! `http.peer_metrics_limit` peers, so that a large location costs neither memory nor a
//! scrape of a hundred thousand series.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use gatehouse_proto::counters::CounterRun;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::{Key, Observed};
use crate::state::codec::unix_ms;
use crate::stats::Epochs;

/// The peers of the interface at a read, or why they are not listed.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerTable {
    /// When the read was made (unix ms); None before the first read.
    pub read_unix_ms: Option<i64>,
    /// The location's name (the `location` label of the metrics).
    pub location: String,
    /// The interface's public key (base64); None when the device has no private key.
    pub public_key: Option<String>,
    pub listen_port: u16,
    pub fwmark: u32,
    /// Peers on the interface at the read.
    pub peer_count: usize,
    /// `http.peer_metrics_limit`: above it no peer is listed (0: never).
    pub limit: usize,
    /// The peers are listed (`peer_count <= limit`); false: `peers` is empty.
    pub listed: bool,
    /// In key order.
    pub peers: Vec<PeerRow>,
}

/// One peer as read, with the agent's totals for it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerRow {
    /// Base64.
    pub public_key: String,
    /// Configured or learned; None: not known yet.
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// Unix ms of the last completed handshake; None: never.
    pub latest_handshake_unix_ms: Option<i64>,
    /// The interface's counters (what `wg show` shows; they restart when the peer is
    /// re-created).
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Seconds, 0 = off.
    pub persistent_keepalive: u16,
    /// Whether a preshared key is set (never the key).
    pub preshared_key: bool,
    /// The agent's totals across counter runs (see [`PeerTotals`]).
    pub total_rx_bytes: u64,
    pub total_tx_bytes: u64,
}

impl PeerTable {
    /// The table of `observed` read at `read_unix_ms`, with `totals` (already folded
    /// with this read); no rows when the interface has more than `limit` peers.
    pub fn of(
        observed: &Observed,
        location: &str,
        totals: &PeerTotals,
        limit: usize,
        read_unix_ms: i64,
    ) -> Self {
        let device = &observed.device;
        let listed = device.peers.len() <= limit;
        let peers = if listed {
            device
                .peers
                .iter()
                .map(|(key, p)| {
                    let run = totals.get(key);
                    PeerRow {
                        public_key: key.to_base64(),
                        endpoint: p.config.endpoint,
                        allowed_ips: p.config.allowed_ips.iter().copied().collect(),
                        latest_handshake_unix_ms: p.last_handshake.map(unix_ms),
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                        persistent_keepalive: p.config.persistent_keepalive,
                        preshared_key: p.config.preshared_key.is_some(),
                        total_rx_bytes: run.map_or(p.rx_bytes, CounterRun::total_rx),
                        total_tx_bytes: run.map_or(p.tx_bytes, CounterRun::total_tx),
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        PeerTable {
            read_unix_ms: Some(read_unix_ms),
            location: location.to_owned(),
            public_key: device
                .private_key
                .as_ref()
                .map(|k| k.public_key().to_base64()),
            listen_port: device.listen_port,
            fwmark: device.fwmark,
            peer_count: device.peers.len(),
            limit,
            listed,
            peers,
        }
    }
}

/// The agent's traffic totals per peer: the counter runs of the peers on the interface,
/// folded at every read by the rule the Core uses for its totals
/// ([`CounterRun::advance`]): a peer re-created (a new counter epoch, or counters that
/// went down) adds its last run to its base. A peer that leaves the interface is
/// forgotten only once it is no longer wanted either (a peer removed and added again by
/// a change keeps counting).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerTotals {
    runs: BTreeMap<Key, CounterRun>,
}

impl PeerTotals {
    /// Folds a read into the totals; `wanted` says which peers absent from the read are
    /// kept.
    pub fn fold(&mut self, observed: &Observed, epochs: &Epochs, wanted: impl Fn(&Key) -> bool) {
        let peers = &observed.device.peers;
        self.runs
            .retain(|key, _| peers.contains_key(key) || wanted(key));
        for (key, p) in peers {
            let epoch = epochs.get(key);
            match self.runs.get_mut(key) {
                // In place: no insertion (no rebalancing) for the peers already known.
                Some(run) => *run = CounterRun::advance(Some(*run), epoch, p.rx_bytes, p.tx_bytes),
                None => {
                    let run = CounterRun::advance(None, epoch, p.rx_bytes, p.tx_bytes);
                    self.runs.insert(*key, run);
                }
            }
        }
    }

    pub fn get(&self, key: &Key) -> Option<&CounterRun> {
        self.runs.get(key)
    }

    /// Forgets every peer (per-peer metrics were turned off by the peer count).
    pub fn clear(&mut self) {
        self.runs.clear();
    }

    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::model::{PeerSpec, PeerState, SecretKey};

    fn key(b: u8) -> Key {
        Key([b; 32])
    }

    fn observed(peers: &[(u8, u64, u64)]) -> Observed {
        let mut o = Observed::default();
        o.device.private_key = Some(SecretKey::new([7; 32]));
        o.device.listen_port = 51820;
        for &(b, rx, tx) in peers {
            let mut spec = PeerSpec::new(key(b), ["10.0.0.2/32".parse().expect("net")]);
            spec.preshared_key = Some(SecretKey::new([9; 32]));
            let mut p = PeerState::fresh(Arc::new(spec));
            p.rx_bytes = rx;
            p.tx_bytes = tx;
            p.last_handshake = Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
            o.device.peers.insert(key(b), p);
        }
        o
    }

    #[test]
    fn a_re_created_peer_keeps_counting_from_its_total() {
        let mut totals = PeerTotals::default();
        let mut epochs = Epochs::new();
        epochs.insert(key(1), NonZeroU64::new(5).expect("nonzero"));
        totals.fold(&observed(&[(1, 100, 40)]), &epochs, |_| false);
        // Re-created by the agent: a new epoch, counters from zero.
        epochs.insert(key(1), NonZeroU64::new(6).expect("nonzero"));
        totals.fold(&observed(&[(1, 10, 5)]), &epochs, |_| false);
        let run = totals.get(&key(1)).expect("run");
        assert_eq!((run.total_rx(), run.total_tx()), (110, 45));
        // Re-created behind the agent's back (same epoch, counters went down).
        totals.fold(&observed(&[(1, 3, 1)]), &epochs, |_| false);
        let run = totals.get(&key(1)).expect("run");
        assert_eq!((run.total_rx(), run.total_tx()), (113, 46));
    }

    #[test]
    fn a_peer_away_for_a_read_is_kept_only_while_wanted() {
        let mut totals = PeerTotals::default();
        let epochs = Epochs::new();
        totals.fold(&observed(&[(1, 100, 40), (2, 7, 7)]), &epochs, |_| false);
        totals.fold(&observed(&[]), &epochs, |k| *k == key(1));
        assert!(totals.get(&key(1)).is_some());
        assert!(totals.get(&key(2)).is_none());
        totals.fold(&observed(&[(1, 20, 10)]), &epochs, |_| false);
        let run = totals.get(&key(1)).expect("run");
        assert_eq!((run.total_rx(), run.total_tx()), (120, 50));
    }

    #[test]
    fn the_table_lists_peers_up_to_the_limit_and_never_a_secret() {
        let o = observed(&[(1, 100, 40), (2, 5, 6)]);
        let mut totals = PeerTotals::default();
        totals.fold(&o, &Epochs::new(), |_| false);
        let table = PeerTable::of(&o, "office", &totals, 2, 1_000);
        assert!(table.listed);
        assert_eq!(table.peer_count, 2);
        assert_eq!(table.peers.len(), 2);
        let row = &table.peers[0];
        assert_eq!(row.public_key, key(1).to_base64());
        assert_eq!((row.rx_bytes, row.tx_bytes), (100, 40));
        assert_eq!((row.total_rx_bytes, row.total_tx_bytes), (100, 40));
        assert_eq!(row.latest_handshake_unix_ms, Some(1_700_000_000_000));
        assert!(row.preshared_key);
        assert_eq!(
            table.public_key,
            Some(SecretKey::new([7; 32]).public_key().to_base64())
        );
        let json = serde_json::to_string(&table).expect("json");
        let secret = SecretKey::new([9; 32]).expose_base64();
        assert!(!json.contains(&secret), "{json}");
        assert!(!json.contains(&SecretKey::new([7; 32]).expose_base64()));

        let over = PeerTable::of(&o, "office", &totals, 1, 1_000);
        assert!(!over.listed);
        assert!(over.peers.is_empty());
        assert_eq!(over.peer_count, 2);
    }
}
