//! State file writes for a one-peer change with 1,000 and 100,000 peers held: a full
//! [`StateStore::save`] (what every change cost before the journal) against
//! [`StateStore::append`] of one `Deltas` record holding the one-peer delta. Bytes are what
//! reaches the files; time includes the fsyncs (and the rename and directory fsync of a
//! save). The state holds the prost-encoded location (each peer a /32 and a /128, a
//! preshared key) and a stats epoch per peer. No root; runs in a temp dir (set TMPDIR to
//! measure another filesystem).
//!
//!   cargo bench --bench state
//!
//! Prints a markdown table; `BENCHMARKS.md` records the figures with this command.

#[path = "../tests/support/bench.rs"]
mod bench;
#[path = "../tests/support/scale.rs"]
mod scale;

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use bench::median;
use gatehouse::model::Key;
use gatehouse::state::{PersistedState, Record, StateStore};
use gatehouse::stats::Epochs;
use gatehouse_proto::v1;
use prost::Message as _;

/// The shared bench peer with a preshared key.
fn peer(i: u32) -> v1::Peer {
    v1::Peer {
        preshared_key: vec![9; 32],
        ..scale::proto_peer(i)
    }
}

fn state(id: &str, peers: u32) -> PersistedState {
    let location = scale::location((0..peers).map(peer).collect());
    let mut epochs = Epochs::new();
    for i in 0..peers {
        epochs.insert(Key(scale::key(i)), NonZeroU64::MIN);
    }
    PersistedState {
        applied_revision: 1,
        location: Some(location.encode_to_vec()),
        epochs,
        ..PersistedState::new(id)
    }
}

/// The record of a one-peer change: an upsert of one peer on top of `revision - 1`.
fn one_peer_change(revision: u64, peers: u32) -> Record {
    let delta = v1::Delta {
        revision,
        base_revision: revision - 1,
        changes: vec![v1::Change {
            kind: Some(v1::change::Kind::UpsertPeer(peer(peers + 10))),
        }],
    };
    Record::Deltas {
        revision,
        deltas: vec![delta.encode_to_vec()],
    }
}

struct Row {
    save_bytes: u64,
    save_time: Duration,
    saves: usize,
    append_bytes: u64,
    append_time: Duration,
    appends: usize,
}

fn measure(peers: u32, saves: usize, appends: usize) -> Row {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (mut store, _) = StateStore::open(tmp.path()).expect("open");
    let s = state(store.gateway_id(), peers);
    let mut save_times = Vec::new();
    for _ in 0..saves {
        let t = Instant::now();
        store.save(&s).expect("save");
        save_times.push(t.elapsed());
    }
    let save_bytes = store.base_bytes() + store.journal_bytes();
    let mut append_times = Vec::new();
    let mut append_bytes = 0;
    for round in 0..appends {
        let record = one_peer_change(2 + round as u64, peers);
        let t = Instant::now();
        append_bytes = store.append(&[record]).expect("append");
        append_times.push(t.elapsed());
    }
    assert!(!store.should_compact());
    Row {
        save_bytes,
        save_time: median(save_times),
        saves,
        append_bytes,
        append_time: median(append_times),
        appends,
    }
}

fn main() {
    println!("| peers held | full save: bytes | full save: time (median) | append one record: bytes | append: time (median) | bytes ratio |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (peers, saves) in [(1_000u32, 30), (100_000, 5)] {
        let r = measure(peers, saves, 200);
        println!(
            "| {peers} | {} | {:.2?} (of {}) | {} | {:.2?} (of {}) | {:.0}× |",
            r.save_bytes,
            r.save_time,
            r.saves,
            r.append_bytes,
            r.append_time,
            r.appends,
            r.save_bytes as f64 / r.append_bytes as f64
        );
    }
}
