//! Memory per peer of the state the agent holds (issue 11): the held location (validated
//! domain form and its index), one desired state handed to the planner, the observed
//! interface as a read returns it, the owners index the machine's model of the interface
//! keeps beside it (`plan::KernelModel`), what the stats tracker keeps per reported
//! peer, and what a read of the interface (wireguard-go's `get=1` answer, fed line by line)
//! holds at its peak beyond the model it updates: parsed whole and then made the model (as
//! the agent did before reading into its model in place) and read into the model in place
//! (`KernelModel::refresh`), and the model a cold apply leaves, at 1,000 and 100,000 peers (each a /32 and a /128, a
//! preshared key, an id and an MFA session). A counting global allocator measures the bytes
//! live after each is built (and the peak while building the held location from a snapshot).
//! No root.
//!
//!   cargo bench --bench memory
//!
//! Prints a markdown table; `BENCHMARKS.md` records the figures with this command.

#[path = "../tests/support/scale.rs"]
mod scale;

use std::sync::atomic::Ordering;

use gatehouse::backend::userspace::uapi::GetParser;
use gatehouse::location::{on_snapshot, Held, Update};
use gatehouse::model::{DeviceState, Observed, PeerState};
use gatehouse::plan::KernelModel;
use gatehouse::stats::{Epochs, StatsTracker};
use gatehouse_proto::v1;

#[path = "../tests/support/counting_alloc.rs"]
#[allow(dead_code)]
mod counting_alloc;
use counting_alloc::{live, PEAK};

/// The shared bench peer with a preshared key, an id and an MFA session.
fn peer(i: u32) -> v1::Peer {
    v1::Peer {
        preshared_key: vec![9; 32],
        id: u64::from(i) + 1,
        mfa_session: 1,
        ..scale::proto_peer(i)
    }
}

fn location(peers: u32) -> v1::Location {
    v1::Location {
        mfa: Some(v1::MfaSettings {
            enabled: true,
            disconnect_threshold_secs: 600,
        }),
        ..scale::location((0..peers).map(peer).collect())
    }
}

/// The `get=1` answer wireguard-go gives for `model`'s peers, line by line (never whole).
fn get_lines(model: &KernelModel) -> impl Iterator<Item = String> + '_ {
    let hex = |b: &[u8; 32]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let device = ["listen_port=51820".to_string()].into_iter();
    let peers = model.device.peers.values().flat_map(move |p| {
        let mut lines = vec![
            format!("public_key={}", hex(&p.config.public_key.0)),
            format!("preshared_key={}", hex(&[9; 32])),
            "protocol_version=1".into(),
            format!("rx_bytes={}", p.rx_bytes + 1000),
            format!("tx_bytes={}", p.tx_bytes + 2000),
            "last_handshake_time_sec=1700000000".into(),
            "last_handshake_time_nsec=5".into(),
            "persistent_keepalive_interval=0".into(),
        ];
        lines.extend(
            p.config
                .allowed_ips
                .iter()
                .map(|ip| format!("allowed_ip={ip}")),
        );
        lines
    });
    device.chain(peers).chain(["errno=0".to_string()])
}

/// The peak bytes per peer above `model` of a read of its interface: parsed whole, then
/// made the model (`whole`), or read into the model in place.
fn read_peak(model: &mut KernelModel, whole: bool) -> usize {
    let n = model.device.peers.len();
    let base = live();
    PEAK.store(base, Ordering::Relaxed);
    if whole {
        let mut parser = GetParser::default();
        for line in get_lines(model) {
            let _ = parser.line(&line);
        }
        let device = parser.finish().expect("a complete answer");
        *model = KernelModel::default();
        *model = KernelModel::new(Observed { link: None, device });
    } else {
        // The answer's lines are made from the model itself: collected first (outside the
        // measure) so that the read may change it.
        let lines: Vec<String> = get_lines(model).collect();
        let base = live();
        PEAK.store(base, Ordering::Relaxed);
        let mut parser = GetParser::new(model.refresh());
        for line in &lines {
            let _ = parser.line(line);
        }
        parser.finish().expect("a complete answer").finish();
        return (PEAK.load(Ordering::Relaxed) - base) / n;
    }
    (PEAK.load(Ordering::Relaxed).saturating_sub(base)) / n
}

/// Bytes per peer of (held, held peak while built, desired, observed, model index, stats
/// tracker, a read parsed whole beside the model, a read into the model in place, the model
/// after a cold apply).
fn measure(peers: u32) -> [usize; 9] {
    let base = live();
    let snapshot = v1::Snapshot {
        revision: 1,
        location: Some(location(peers)),
    };
    // The peak above the message: `on_snapshot` takes it and drops it once checked.
    let with_message = live();
    PEAK.store(with_message, Ordering::Relaxed);
    let held: Held = match on_snapshot(snapshot) {
        Update::Accept(h) => *h,
        other => panic!("{other:?}"),
    };
    let peak = PEAK.load(Ordering::Relaxed) - with_message;
    let held_bytes = live() - base;

    let base = live();
    let desired = held.valid.desired.clone();
    let desired_bytes = live() - base;

    let base = live();
    let observed = Observed {
        link: None,
        device: DeviceState {
            peers: desired
                .peers
                .iter()
                .map(|(k, p)| (*k, PeerState::fresh(p.clone())))
                .collect(),
            ..DeviceState::default()
        },
    };
    let observed_bytes = live() - base;
    assert_eq!(observed.device.peers.len(), peers as usize);

    // The model takes the read over: what it adds is its owners index.
    let base = live();
    let mut model = KernelModel::new(observed);
    let index_bytes = live() - base;

    // The model a cold apply leaves (every peer added by the plan, in key order).
    let cold_plan = gatehouse::plan::plan(&desired, &KernelModel::default());
    let base = live();
    let mut cold = KernelModel::default();
    cold.apply(&cold_plan);
    let cold_bytes = live() - base;
    drop(cold);
    drop(cold_plan);

    let whole = read_peak(&mut model, true);
    let in_place = read_peak(&mut model, false);

    let base = live();
    let mut tracker = StatsTracker::new();
    let sent = tracker.changed(&mut model, &Epochs::new());
    drop(sent);
    let tracker_bytes = live() - base;
    drop(model);

    let n = peers as usize;
    [
        held_bytes / n,
        peak / n,
        desired_bytes / n,
        observed_bytes / n,
        index_bytes / n,
        tracker_bytes / n,
        whole,
        in_place,
        cold_bytes / n,
    ]
}

fn main() {
    println!("| peers | held (valid + index) | peak while accepting a snapshot | one desired copy | observed | model's owners index | stats tracker | held + desired + observed + index + tracker, MiB at this size | a read's peak above the model: parsed whole, then the model | read into the model in place | the model after a cold apply (observed + index) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for peers in [1_000u32, 100_000] {
        let [held, peak, desired, observed, index, tracker, whole, in_place, cold] = measure(peers);
        let sum = held + desired + observed + index + tracker;
        let total = sum as f64 * f64::from(peers) / (1024.0 * 1024.0);
        println!("| {peers} | {held} B | {peak} B | {desired} B | {observed} B | {index} B | {tracker} B | {total:.1} MiB | {whole} B | {in_place} B | {cold} B |");
    }
}
