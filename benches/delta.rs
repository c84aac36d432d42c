//! One-peer delta on a held location of 1,000 and of 100,000 peers (each a /32 and a /128):
//! how long [`location::on_deltas`] takes to check and apply it in place (the incremental
//! path), against validating the resulting location whole (what each delta cost before).
//! Each round is an upsert of a new peer followed by its removal, so the held location
//! returns to its size; the figure is the median of the single deltas. No root.
//!
//!   cargo bench --bench delta
//!
//! Prints a markdown table; `BENCHMARKS.md` records the figures with this command.

use std::time::{Duration, Instant};

use gatehouse::location::{on_deltas, on_snapshot, Held, Update};
use gatehouse::validate::validate_location;
use gatehouse_proto::v1;

const ROUNDS: u64 = 2_000;

fn peer(i: u32) -> v1::Peer {
    let mut key = [7u8; 32];
    key[..4].copy_from_slice(&i.to_le_bytes());
    let [_, a, b, c] = (i + 2).to_be_bytes();
    v1::Peer {
        // Any 32 bytes that are not of low order are a valid public key.
        public_key: key.to_vec(),
        allowed_ips: vec![
            format!("10.{a}.{b}.{c}/32"),
            format!(
                "{}/128",
                std::net::Ipv6Addr::from(0xfd00u128 << 112 | u128::from(i + 2))
            ),
        ],
        ..Default::default()
    }
}

fn location(peers: u32) -> v1::Location {
    v1::Location {
        id: 1,
        name: "bench".into(),
        interface: Some(v1::Interface {
            private_key: vec![1; 32],
            listen_port: 51820,
            addresses: vec!["10.0.0.1/8".into(), "fd00::1/64".into()],
            mtu: 1420,
            fwmark: 0,
        }),
        peers: (0..peers).map(peer).collect(),
        firewall: None,
        mfa: None,
    }
}

fn held(peers: u32) -> Held {
    match on_snapshot(&v1::Snapshot {
        revision: 1,
        location: Some(location(peers)),
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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Median of the one-peer deltas (upserts and removals alike).
fn incremental(peers: u32) -> Duration {
    use v1::change::Kind;
    let mut h = held(peers);
    let extra = peer(peers + 10);
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        for kind in [
            Kind::UpsertPeer(extra.clone()),
            Kind::RemovePeer(extra.public_key.clone()),
        ] {
            let d = delta(h.revision + 1, kind);
            let t = Instant::now();
            let (update, _) = on_deltas(Some(&mut h), std::slice::from_ref(&d));
            times.push(t.elapsed());
            assert!(
                matches!(update, Update::Advanced { .. }),
                "round {round}: {update:?}"
            );
        }
    }
    assert_eq!(h.valid.desired.peers.len(), peers as usize);
    median(times)
}

/// Validating the location whole after one added peer (median of 5).
fn whole(peers: u32) -> Duration {
    let mut loc = location(peers);
    loc.peers.push(peer(peers + 10));
    median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                validate_location(&loc).expect("valid");
                t.elapsed()
            })
            .collect(),
    )
}

fn main() {
    println!("| peers held | one-peer delta, incremental (median of {}) | whole location validated (median of 5) |", 2 * ROUNDS);
    println!("|---:|---:|---:|");
    for peers in [1_000u32, 100_000] {
        println!(
            "| {peers} | {:?} | {:?} |",
            incremental(peers),
            whole(peers)
        );
    }
}
