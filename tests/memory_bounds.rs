//! Heap bounds of the agent's per-peer state, measured by a counting allocator (bytes
//! asked of the allocator, not time): the full state save streams (it never holds the
//! state's text or a copy of its big parts), and the per-peer trackers cost a fixed-size
//! record per peer.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use gatehouse::ha::activity::ActivityBook;
use gatehouse::location::{on_snapshot, Held, Update};
use gatehouse::mfa::{MfaTracker, PeerSample, Tombstones};
use gatehouse::model::{DeviceState, Key, Observed, PeerSpec, PeerState};
use gatehouse::plan::KernelModel;
use gatehouse::state::{HaSaved, LocationText, SavedState, StateStore};
use gatehouse::stats::{Epochs, Report, StatsTracker};
use gatehouse::validate::validate_location;
use gatehouse_proto::v1;

#[path = "support/counting_alloc.rs"]
#[allow(dead_code)]
mod counting_alloc;
use counting_alloc::{LIVE, PEAK};

/// One measurement at a time (the tests of this file share the counters).
static ONE: Mutex<()> = Mutex::new(());

/// What running `f` adds to the heap at its peak, above what was live before it.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - before)
}

/// What `f`'s result keeps on the heap.
fn kept_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    let out = f();
    let after = LIVE.load(Ordering::Relaxed);
    (out, after.saturating_sub(before))
}

const N: u32 = 20_000;

fn key(i: u32) -> Key {
    let mut k = [3u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    Key(k)
}

fn location() -> v1::Location {
    v1::Location {
        id: 1,
        name: "office".into(),
        interface: Some(v1::Interface {
            private_key: vec![5; 32],
            listen_port: 51820,
            addresses: vec!["10.0.0.1/8".into()],
            mtu: 0,
            fwmark: 0,
        }),
        peers: (0..N)
            .map(|i| v1::Peer {
                public_key: key(i).0.to_vec(),
                preshared_key: vec![9; 32],
                allowed_ips: vec![format!(
                    "10.{}.{}.{}/32",
                    1 + (i >> 16),
                    (i >> 8) & 255,
                    i & 255
                )],
                id: u64::from(i) + 1,
                mfa_session: 7,
                ..Default::default()
            })
            .collect(),
        firewall: None,
        mfa: Some(v1::MfaSettings {
            enabled: true,
            disconnect_threshold_secs: 600,
        }),
    }
}

fn interface() -> BTreeMap<Key, PeerState> {
    (0..N)
        .map(|i| {
            let ip = format!("10.{}.{}.{}/32", 1 + (i >> 16), (i >> 8) & 255, i & 255);
            let mut p = PeerState::fresh(PeerSpec::new(key(i), [ip.parse().unwrap()]));
            p.rx_bytes = u64::from(i);
            (key(i), p)
        })
        .collect()
}

fn wall() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// Accepting a snapshot drops the message once it is checked: the message and the held
/// form are never both held beside the checked location. Its peak above the message stays
/// under 1.25 times the held form (holding the message to the end made it about 1.45).
#[test]
fn accepting_a_snapshot_drops_the_message_once_checked() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let (snapshot, message) = kept_by(|| v1::Snapshot {
        revision: 1,
        location: Some(location()),
    });
    let before = LIVE.load(Ordering::Relaxed);
    let (update, peak) = peak_during(|| on_snapshot(snapshot));
    let held = LIVE.load(Ordering::Relaxed) - (before - message);
    let Update::Accept(accepted) = update else {
        panic!("the snapshot is valid: {update:?}");
    };
    assert_eq!(accepted.valid.desired.peers.len(), N as usize);
    println!("message {message} B, held {held} B, peak above the message {peak} B");
    assert!(
        peak * 4 < held * 5,
        "peak above the message {peak} B, held form {held} B"
    );
}

/// The counter epochs of a cold apply's peers (started in key order) end in a map with
/// full nodes: under 60 bytes a peer (left half full, about 80).
#[test]
fn the_epochs_of_a_cold_apply_are_compact() {
    use rand::SeedableRng as _;
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (epochs, bytes) = kept_by(|| {
        let mut epochs = Epochs::new();
        for i in 0..N {
            epochs.start(key(i), &mut rng);
        }
        epochs.started(N as usize);
        epochs
    });
    assert_eq!(epochs.len(), N as usize);
    let per_peer = bytes / N as usize;
    assert!(per_peer < 60, "{per_peer} bytes per peer");
}

#[test]
fn the_full_save_streams_the_state_to_the_file() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let loc = location();
    let valid = validate_location(&loc).expect("valid");
    let held = Held::new(9, loc, valid);
    let mut mfa = MfaTracker::new();
    mfa.observe(
        (0..N).map(|i| {
            let sample = PeerSample {
                rx_bytes: u64::from(i),
                last_handshake: Some(wall()),
            };
            (key(i), sample)
        }),
        Duration::from_secs(1),
        wall(),
    );
    let (tombstones, epochs, book) = (Tombstones::new(), Epochs::new(), ActivityBook::new());
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, _) = StateStore::open(tmp.path()).unwrap();
    let view = SavedState {
        gateway_id: "gw",
        applied_revision: 9,
        location: Some(LocationText(&held)),
        mfa: mfa.saved(Duration::from_secs(2), wall()),
        tombstones: &tombstones,
        epochs: &epochs,
        pending_events: &[],
        next_seq: 1,
        core_last_contact_unix_ms: None,
        offline_ms: None,
        saved_unix_ms: None,
        ha: HaSaved {
            draining: false,
            activity: &book,
            vips_present: vec![],
            operator: None,
            active_since_unix_ms: None,
        },
    };
    let (saved, peak) = peak_during(|| store.save(&view));
    saved.unwrap();
    let written = std::fs::metadata(tmp.path().join("state.json"))
        .unwrap()
        .len() as usize;
    assert!(written > 5_000_000, "{written} bytes written");
    // The write buffer (64 KiB), one peer's encoding and its text, the path names: far
    // below the text (which a whole-text save holds, twice while it grows) or a copy of
    // the location or the timers.
    assert!(
        peak < 256 * 1024,
        "the save held {peak} bytes at its peak for a {written}-byte file"
    );
}

#[test]
fn the_trackers_keep_a_fixed_size_record_per_peer() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let peers = interface();
    let n = peers.len();

    // MFA: the key (32 bytes) and an 88-byte timer, with an eighth of room for peers
    // added between reads (135 bytes); a tree of them cost about 220.
    let (mfa, bytes) = kept_by(|| {
        let mut t = MfaTracker::new();
        let samples = peers.iter().map(|(k, p)| (*k, PeerSample::from(p)));
        // The first read holds one vector of the records, not a growing one beside it.
        let ((), peak) = peak_during(|| t.observe(samples, Duration::from_secs(1), wall()));
        assert!(
            peak <= n * 136,
            "MFA first read: {} bytes per peer",
            peak / n
        );
        // A second read: the steady state.
        let samples = peers.iter().map(|(k, p)| (*k, PeerSample::from(p)));
        t.observe(samples, Duration::from_secs(2), wall());
        t
    });
    assert_eq!(mfa.len(), n);
    assert!(
        bytes <= n * 136,
        "MFA tracker: {} bytes per peer",
        bytes / n
    );

    // The HA book and the stats tracker keep nothing per peer of their own: their notes
    // (whose received bytes grew at the last read, the fingerprint last reported) live in
    // the model's entries, together with the refresh's mark: 16 bytes more on each entry
    // (they were 48 bytes a peer each, and an eighth of room, in vectors of their own,
    // and a read listed the keys it saw: 32 bytes a peer).
    assert!(
        std::mem::size_of::<PeerState>() <= 56,
        "a model entry: {} bytes",
        std::mem::size_of::<PeerState>()
    );
    let mut model = KernelModel::new(Observed {
        link: None,
        device: DeviceState {
            peers: peers.clone(),
            ..Default::default()
        },
    });
    let (book, bytes) = kept_by(|| {
        let mut b = ActivityBook::new();
        b.observe_here(&model.device.peers, wall());
        b.observe_here(&model.device.peers, wall());
        b
    });
    assert_eq!(bytes, 0, "HA book of peers without a sign of life");
    let epochs = Epochs::new();
    let (stats, bytes) = kept_by(|| {
        let mut s = StatsTracker::new();
        assert_eq!(s.changed(&mut model, &epochs).len(), n);
        assert!(s.changed(&mut model, &epochs).is_empty());
        s
    });
    assert_eq!(bytes, 0, "stats tracker");

    // The first report: a reading of every peer (40 bytes each, in a vector of exactly
    // their number, and nothing else on the way), its messages built one at a time as they are taken. Sending it holds
    // one message at a time, however many peers the report carries: about 6 times its
    // encoded size (a peer's `PeerStats` is about 3 times its encoding, and the message's
    // vector grows by doubling). A report built whole added about 200 bytes a peer.
    let mut tracker = StatsTracker::new();
    tracker.reset();
    let (report, report_bytes) = peak_during(|| tracker.changed(&mut model, &epochs));
    assert_eq!(report.capacity(), report.len());
    assert!(
        report_bytes <= n * 40,
        "stats report: {} bytes per peer at its peak",
        report_bytes / n
    );
    let max = 64 * 1024;
    let (messages, peak) = peak_during(|| {
        Report::new(report, wall(), max)
            .map(|m| prost::Message::encoded_len(&m))
            .collect::<Vec<_>>()
    });
    assert!(messages.len() > 10, "{} messages", messages.len());
    assert!(
        peak < 8 * max,
        "sending a report in messages of {max} bytes added {peak} at its peak"
    );
    drop((mfa, book, stats, messages));
}
