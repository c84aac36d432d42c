//! One-peer delta on a held location of 1,000 and of 100,000 peers (each a /32 and a /128):
//! how long [`location::on_deltas`] takes to check and apply it in place (the incremental
//! path), against validating the resulting location whole (what each delta cost before).
//! Each round is an upsert of a new peer followed by its removal, so the held location
//! returns to its size; the figure is the median of the single deltas. The one-peer change
//! on the agent's side is that check plus [`plan::plan_keys`] for the changed peer against
//! the converged interface model: both columns are shown, against the full [`plan::plan`].
//! No root.
//!
//!   cargo bench --bench delta
//!
//! Prints a markdown table; `BENCHMARKS.md` records the figures with this command.

#[path = "../tests/support/bench.rs"]
mod bench;
#[path = "../tests/support/scale.rs"]
mod scale;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bench::{median, median_of};
use gatehouse::location::{on_deltas, on_snapshot, Held, Update};
use gatehouse::model::{Desired, DeviceState, Key, LinkState, Observed, PeerState};
use gatehouse::plan::{self, Scope};
use gatehouse::validate::validate_location;
use gatehouse_proto::v1;

const ROUNDS: u64 = 2_000;

fn held(peers: u32) -> Held {
    match on_snapshot(v1::Snapshot {
        revision: 1,
        location: Some(scale::location_of(peers)),
    }) {
        Update::Accept(h) => *h,
        other => panic!("{other:?}"),
    }
}

fn delta(revision: u64, kind: v1::change::Kind) -> v1::Delta {
    v1::Delta {
        revision,
        base_revision: revision - 1,
        changes: vec![v1::Change { kind: Some(kind) }],
    }
}

/// Medians of the one-peer deltas (upserts and removals alike): the check and apply, and
/// the check and apply plus the scoped plan of the changed peer.
fn incremental(peers: u32) -> (Duration, Duration) {
    use v1::change::Kind;
    let mut h = held(peers);
    let observed = converged(&h.valid.desired);
    let extra = scale::proto_peer(peers + 10);
    let extra_key: BTreeSet<Key> = Key::from_slice(&extra.public_key).into_iter().collect();
    let scope = Scope {
        keys: &extra_key,
        settings: false,
    };
    let mut times = Vec::new();
    let mut with_plan = Vec::new();
    for round in 0..ROUNDS {
        for kind in [
            Kind::UpsertPeer(extra.clone()),
            Kind::RemovePeer(extra.public_key.clone()),
        ] {
            let d = delta(h.revision + 1, kind);
            let t = Instant::now();
            let (update, _) = on_deltas(Some(&mut h), std::slice::from_ref(&d));
            times.push(t.elapsed());
            let p = plan::plan_keys(&h.valid.desired, &observed, scope, |_| false);
            with_plan.push(t.elapsed());
            assert!(p.len() <= 1, "{p:?}");
            assert!(
                matches!(update, Update::Advanced { .. }),
                "round {round}: {update:?}"
            );
        }
    }
    assert_eq!(h.valid.desired.peers.len(), peers as usize);
    (median(times), median(with_plan))
}

/// The interface once `desired` is applied (built directly: simulating 100,000 additions
/// one by one is quadratic).
fn converged(desired: &Desired) -> Observed {
    let iface = &desired.interface;
    Observed {
        link: Some(LinkState {
            mtu: iface.mtu.unwrap_or(1420),
            up: true,
            addresses: iface.addresses.clone(),
        }),
        device: DeviceState {
            private_key: Some(iface.private_key.clone()),
            listen_port: iface.listen_port,
            fwmark: iface.fwmark,
            peers: desired
                .peers
                .iter()
                .map(|(k, p)| (*k, PeerState::fresh(p.clone())))
                .collect(),
        },
    }
}

/// The full plan of the location with one added peer against the converged interface
/// (median of 5).
fn full_plan(peers: u32) -> Duration {
    let h = held(peers);
    let observed = converged(&h.valid.desired);
    let mut desired = h.valid.desired.clone();
    let one = scale::location(vec![scale::proto_peer(peers + 10)]);
    let extra = validate_location(&one)
        .expect("valid")
        .desired
        .peers
        .pop_first()
        .expect("a peer");
    desired.peers.insert(extra.0, extra.1);
    median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let p = plan::plan(&desired, &observed);
                let e = t.elapsed();
                assert_eq!(p.len(), 1);
                e
            })
            .collect(),
    )
}

/// Validating the location whole after one added peer (median of 5).
fn whole(peers: u32) -> Duration {
    let mut loc = scale::location_of(peers);
    loc.peers.push(scale::proto_peer(peers + 10));
    median_of(5, || {
        validate_location(&loc).expect("valid");
    })
}

fn main() {
    println!("| peers held | one-peer delta, incremental (median of {}) | incremental + scoped plan | whole location validated (median of 5) | full plan (median of 5) |", 2 * ROUNDS);
    println!("|---:|---:|---:|---:|---:|");
    for peers in [1_000u32, 100_000] {
        let (check, with_plan) = incremental(peers);
        println!(
            "| {peers} | {check:?} | {with_plan:?} | {:?} | {:?} |",
            whole(peers),
            full_plan(peers)
        );
    }
}
