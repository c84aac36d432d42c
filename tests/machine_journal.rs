//! The state journal on the machine's change path (virtual time, `machine_sim`): a
//! revision reached by deltas is a journal record, not a rewrite of the state; a restart
//! replays the records on the base and compacts; a refused or failed append falls back to
//! a full save; MFA expiries and acks are records too.

#[allow(dead_code)]
mod machine_sim;

use std::time::Duration;

use gatehouse::state::Record;
use gatehouse_proto::v1;
use machine_sim::*;

/// A wider key space than `machine_sim::key` (u8): peer `n` of up to 65,535.
fn wide_key(n: u16) -> gatehouse::model::Key {
    let mut k = [7u8; 32];
    k[..2].copy_from_slice(&n.to_be_bytes());
    gatehouse::model::Key(k)
}

fn wide_peer(n: u16) -> v1::Peer {
    v1::Peer {
        id: n as u64,
        public_key: wide_key(n).0.to_vec(),
        allowed_ips: vec![format!("10.{}.{}.1/32", n >> 8, n & 0xff)],
        ..Default::default()
    }
}

fn wide_location(peers: u16) -> v1::Location {
    let mut loc = location((1..=peers).map(wide_peer).collect(), None);
    if let Some(i) = loc.interface.as_mut() {
        i.addresses = vec!["10.255.0.1/16".into()];
    }
    loc
}

fn upsert(revision: u64, base: u64, peer: v1::Peer) -> v1::CoreMessage {
    v1::CoreMessage {
        kind: Some(v1::core_message::Kind::Delta(v1::Delta {
            revision,
            base_revision: base,
            changes: vec![v1::Change {
                kind: Some(v1::change::Kind::UpsertPeer(peer)),
            }],
        })),
    }
}

/// A machine synced to a snapshot of `peers` peers.
fn synced(peers: u16) -> Sim {
    let mut sim = Sim::new(settings());
    sim.core.publish(wide_location(peers));
    sim.start();
    sim.connect();
    assert_eq!(sim.status.applied_revision, sim.core.revision);
    sim
}

/// Sends one delta adding peer `n`; returns the writes it caused.
fn one_peer_delta(sim: &mut Sim, n: u16) -> Vec<Write> {
    let from = sim.writes.len();
    let r = sim.core.revision;
    sim.core.revision = r + 1;
    sim.core.outbox.push(upsert(r + 1, r, wide_peer(n)));
    sim.deliver();
    assert_eq!(sim.status.applied_revision, r + 1);
    assert!(sim.has(wide_key(n)));
    sim.writes[from..].to_vec()
}

fn appended(writes: &[Write]) -> usize {
    match writes {
        [Write::Append(n)] => *n,
        other => panic!("one append expected, got {other:?}"),
    }
}

#[test]
fn a_one_peer_delta_appends_a_record_of_the_same_size_at_any_location_size() {
    let mut small = synced(10);
    let mut large = synced(2000);
    let base = match large.writes.last() {
        Some(Write::Full(n)) => *n,
        other => panic!("a full save of the snapshot expected, got {other:?}"),
    };
    let a = appended(&one_peer_delta(&mut small, 3000));
    let b = appended(&one_peer_delta(&mut large, 3000));
    // The record names the peer, its epoch and the revision: not the location. (The
    // epoch is a random number: its decimal length may differ by a few bytes.)
    assert!(a < 1500 && b < 1500, "{a} {b}");
    assert!(a.abs_diff(b) < 40, "{a} {b}");
    assert!(b * 100 < base, "record {b} bytes, base {base} bytes");
}

#[test]
fn a_restart_after_appends_holds_the_newest_revision_and_compacts() {
    let mut sim = synced(20);
    for n in 100..105 {
        appended(&one_peer_delta(&mut sim, n));
    }
    let revision = sim.core.revision;
    let disk = sim.last_save().expect("a base on disk");
    assert!(disk.applied_revision < revision);
    assert_eq!(disk.replay.len(), 5);
    let epoch = disk.epochs.get(&wide_key(104));
    assert!(epoch != 0, "the epoch is on disk");
    // Killed and restarted without the Core: the journal is replayed on the base.
    sim.kernel.clear_log();
    sim.restart(Some(disk), Duration::from_secs(1));
    assert_eq!(sim.status.applied_revision, revision);
    assert!(
        sim.kernel.applied_ops().is_empty(),
        "the restart changed the interface"
    );
    // The start compacted: one full base at the newest revision, no journal.
    let now = sim.last_save().unwrap();
    assert_eq!(now.applied_revision, revision);
    assert!(now.replay.is_empty());
    assert_eq!(now.epochs.get(&wide_key(104)), epoch);
    assert!(matches!(sim.writes.last(), Some(Write::Full(_))));
    // The Core sees the newest revision, with nothing to redo.
    sim.connect();
    assert_eq!(sim.status.applied_revision, sim.core.revision);
}

#[test]
fn a_snapshot_and_a_failed_append_are_full_saves() {
    let mut sim = synced(20);
    appended(&one_peer_delta(&mut sim, 100));
    // A failed append: the full state instead, and the revision is applied.
    sim.fail_appends = true;
    let writes = one_peer_delta(&mut sim, 101);
    assert!(matches!(writes.as_slice(), [Write::Full(_)]), "{writes:?}");
    sim.fail_appends = false;
    appended(&one_peer_delta(&mut sim, 102));
    // A snapshot is the whole location: a full save.
    let from = sim.writes.len();
    sim.core.publish(wide_location(30));
    sim.deliver();
    assert!(
        matches!(sim.writes[from..], [Write::Full(_)]),
        "{:?}",
        &sim.writes[from..]
    );
    appended(&one_peer_delta(&mut sim, 103));
}

#[test]
fn a_journal_that_outgrew_the_base_is_compacted() {
    let mut sim = synced(3);
    let mut full = 0;
    for n in 100..140 {
        let writes = one_peer_delta(&mut sim, n);
        if matches!(writes.as_slice(), [Write::Full(_)]) {
            full += 1;
        }
    }
    assert!(full >= 1, "never compacted");
    let disk = sim.last_save().unwrap();
    sim.restart(Some(disk), Duration::from_secs(1));
    assert_eq!(sim.status.applied_revision, sim.core.revision);
}

#[test]
fn mfa_expiry_and_acks_are_journal_records() {
    let mut sim = Sim::new(settings());
    sim.core
        .publish(location(vec![peer(1, 101), peer(2, 102)], Some(60)));
    sim.start();
    sim.connect();
    sim.core.acks = false;
    sim.active.insert(key(1));
    sim.advance(Duration::from_secs(70));
    assert!(!sim.has(key(2)));
    assert_eq!(sim.core.events_of(key(2)), 1);
    // The write before the removal was a record holding the event and the tombstone.
    let (_, written_before) = sim
        .removals
        .iter()
        .find(|(keys, _)| keys.contains(&key(2)))
        .expect("the removal");
    assert!(
        matches!(sim.writes[written_before - 1], Write::Append(_)),
        "{:?}",
        sim.writes
    );
    let disk = &sim.saves[written_before - 1];
    assert!(disk.pending_events.iter().any(|e| e.public_key == key(2)));
    assert!(disk.tombstones.contains(&key(2)));
    // The Core's ack is a record too.
    let seq = *sim.core.events.keys().next().unwrap();
    let from = sim.writes.len();
    let journal = sim.journal.len();
    sim.core.outbox.push(v1::CoreMessage {
        kind: Some(v1::core_message::Kind::EventAck(v1::EventAck {
            up_to_seq: seq,
        })),
    });
    sim.deliver();
    assert!(
        matches!(sim.writes[from..], [Write::Append(_)]),
        "{:?}",
        &sim.writes[from..]
    );
    assert!(matches!(sim.journal[journal..], [Record::Acked { up_to }] if up_to == seq));
    assert!(sim.last_save().unwrap().pending_events.is_empty());
}
