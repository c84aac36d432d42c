//! The agent's state machine on virtual time (`machine_sim`): the scenarios that
//! `tests/mfa.rs` and `tests/e2e_faults.rs` run in real time (seconds to minutes, a real
//! Core or root), here deterministic and in microseconds. Which test covers which:
//!
//! | here | tests/mfa.rs, tests/e2e_faults.rs |
//! |---|---|
//! | `mfa_idle_peer_removed_once_active_kept_new_session_returns` | `active_peer_stays_idle_peer_is_removed_once_and_returns_with_a_new_session`, `the_core_removes_the_peer_from_every_gateway_of_the_location` (the Core's removal applied) |
//! | `without_mfa_idle_peers_stay` | `a_location_without_mfa_never_removes_idle_peers` |
//! | `mfa_events_are_saved_before_the_removal` | the save-before-remove rule under all of mfa.rs |
//! | `expiry_while_the_core_is_away_survives_a_restart_and_reaches_the_core_once` | `offline_removal_survives_an_agent_restart_and_reaches_the_core_once` |
//! | `event_numbers_after_a_lost_state_file_are_new` | `events_after_a_lost_state_file_are_not_mistaken_for_old_ones` |
//! | `event_numbers_after_an_older_state_file_are_new` | `events_after_an_older_state_file_is_restored_are_not_mistaken_for_old_ones` |
//! | `a_removal_that_fails_to_apply_is_retried_without_a_second_event` | same name |
//! | `a_failed_save_postpones_the_removal` | (mfa.rs: none; the rollback rule) |
//! | `a_peer_active_on_another_gateway_is_kept` | `a_peer_active_on_one_gateway_is_not_cut_by_another` |
//! | `core_outage_changes_nothing` | `core_outage_loses_no_ping_and_changes_no_peer` |
//! | `kill_and_restart_while_the_core_is_down` | `sigkilled_agent_restarts_from_its_state_while_the_core_is_down` |
//! | `drift_made_by_hand_is_repaired` | same name |
//! | `truncated_state_file_the_core_resyncs` | `truncated_state_file_is_moved_aside_and_the_core_resyncs` |
//! | `hooks_run_at_their_moments` | `hooks_run_at_their_documented_moments` |
//! | `shutdown_keeps_the_tunnel_and_the_restart_writes_nothing` | `sigterm_keeps_the_tunnel_and_the_restart_writes_nothing` |
//! | `reboot_while_the_core_is_down_restores_the_tunnel` | `reboot_while_the_core_is_down_restores_the_tunnel_from_the_state_file` |
//! | `offline_allowance_removes_then_the_core_brings_back` | `offline_allowance_removes_peers_and_the_core_brings_them_back` |
//!
//! And the change path: a revision is planned against the machine's model of the
//! interface without a read, saved once, and the next read finds nothing to do; after a
//! failed apply the next change reads first; timers due together share one read; deltas of
//! one batch are one apply, a gap asks for a snapshot, a rejected revision applies only its
//! removals (as `tests/sync.rs` does in real time).

#[path = "machine_sim/mod.rs"]
mod machine_sim;

use std::time::Duration;

use gatehouse::backend::memory::MemoryBackend;
use gatehouse::hooks::Hook;
use gatehouse::plan::Phase;
use machine_sim::*;

const T: u32 = 30;

/// A machine connected to a Core holding `peers` (with MFA threshold `mfa`), applied.
fn synced(peers: &[u8], mfa: Option<u32>) -> Sim {
    let mut sim = Sim::new(settings());
    sim.core.publish(location(
        peers.iter().map(|n| peer(*n, 100 + *n as u64)).collect(),
        mfa,
    ));
    sim.start();
    sim.connect();
    assert_eq!(sim.status.applied_revision, sim.core.revision);
    for n in peers {
        assert!(sim.has(key(*n)));
    }
    sim
}

#[test]
fn mfa_idle_peer_removed_once_active_kept_new_session_returns() {
    let mut sim = synced(&[1, 2], Some(T));
    sim.active.insert(key(1));
    sim.advance(Duration::from_secs(T as u64) - S);
    assert!(sim.has(key(2)), "removed before the threshold");
    sim.advance(5 * S);
    assert!(!sim.has(key(2)), "idle peer still there past T + 4 s");
    assert!(sim.has(key(1)), "active peer removed");
    assert_eq!(sim.core.events_of(key(2)), 1);
    assert_eq!(sim.core.deliveries, 1);
    // The Core removed it from the location (a new revision), applied here.
    assert_eq!(sim.status.applied_revision, sim.core.revision);
    assert_eq!(sim.status.pending_events, 0, "acked");
    sim.advance(10 * Duration::from_secs(T as u64));
    assert_eq!(sim.core.deliveries, 1, "one event, ever");
    assert!(sim.has(key(1)));
    // A new session brings it back, with a new timer.
    let mut loc = sim.core.location.clone().unwrap();
    loc.peers.push(peer(2, 999));
    sim.core.publish(loc);
    sim.deliver();
    assert!(
        sim.has(key(2)),
        "the new session does not bring the peer back"
    );
    sim.advance(Duration::from_secs(T as u64) - S);
    assert!(sim.has(key(2)), "the new session's timer started early");
}

#[test]
fn without_mfa_idle_peers_stay() {
    let mut sim = synced(&[1, 2], None);
    sim.advance(3600 * S);
    assert!(sim.has(key(1)) && sim.has(key(2)));
    assert!(sim.core.events.is_empty());
}

#[test]
fn mfa_turned_on_later_starts_each_timer_then() {
    let mut sim = synced(&[1, 2], None);
    sim.advance(3600 * S);
    let saved = sim.last_save().expect("saved");
    assert!(saved.state.mfa.peers.is_empty(), "timers kept without MFA");
    // The location turns MFA on: the idle peers get a whole threshold from then.
    let mut loc = sim.core.location.clone().unwrap();
    loc.mfa = location(vec![], Some(T)).mfa;
    sim.core.publish(loc);
    sim.deliver();
    assert_eq!(sim.status.applied_revision, sim.core.revision);
    sim.advance(Duration::from_secs(T as u64) - 2 * S);
    assert!(
        sim.has(key(1)) && sim.has(key(2)),
        "removed before the threshold"
    );
    sim.advance(6 * S);
    assert!(
        !sim.has(key(1)) && !sim.has(key(2)),
        "idle peers kept past T"
    );
}

#[test]
fn timers_restored_without_a_location_keep_counting() {
    let mut sim = synced(&[1], Some(T));
    sim.advance(10 * S);
    let mut disk = sim.last_save().expect("saved");
    assert!(!disk.state.mfa.peers.is_empty());
    // The state file lost its location (or it no longer validates): the timers are kept
    // through the reads before the Core's snapshot.
    disk.state.location = None;
    sim.restart(Some(disk), S);
    sim.advance(10 * S);
    let saved = sim.last_save().expect("saved");
    assert!(
        saved.state.mfa.peers.contains_key(&key(1)),
        "restored timers dropped while no location is held"
    );
}

#[test]
fn mfa_events_are_saved_before_the_removal() {
    let mut sim = synced(&[1], Some(T));
    let from = sim.trace.len();
    sim.advance(Duration::from_secs(T as u64 + 5));
    assert!(!sim.has(key(1)));
    // The first apply that removed the peer came after a save holding its event and its
    // tombstone.
    let (_, saved_before) = sim
        .removals
        .iter()
        .find(|(keys, _)| keys.contains(&key(1)))
        .expect("the removal");
    let last = &sim.saves[saved_before - 1];
    assert!(
        last.pending_events.iter().any(|e| e.public_key == key(1)),
        "the event was not on disk before the removal"
    );
    assert!(last.tombstones.contains(&key(1)));
    // And the event went to the Core after the removal.
    let t = &sim.trace[from..];
    let removal = t.iter().position(|a| a.starts_with("apply")).unwrap();
    let event = t.iter().position(|a| a.starts_with("send Events")).unwrap();
    assert!(removal < event, "{t:?}");
}

#[test]
fn expiry_while_the_core_is_away_survives_a_restart_and_reaches_the_core_once() {
    let mut sim = synced(&[1, 2], Some(T));
    sim.active.insert(key(1));
    sim.disconnect();
    sim.advance(Duration::from_secs(T as u64 + 5));
    assert!(!sim.has(key(2)), "not removed while the Core is away");
    assert_eq!(sim.status.pending_events, 1);
    // Killed and restarted, still without the Core: the removal stands.
    let state = sim.last_save();
    sim.restart(state, 5 * S);
    sim.advance(20 * S);
    assert!(
        !sim.has(key(2)),
        "the restart brought the removed peer back"
    );
    assert!(sim.has(key(1)));
    assert_eq!(sim.status.pending_events, 1);
    assert!(sim.core.events.is_empty());
    sim.connect();
    sim.advance(5 * S);
    assert_eq!(sim.core.events_of(key(2)), 1);
    assert_eq!(
        sim.core.deliveries, 1,
        "the event reached the Core more than once"
    );
    assert_eq!(sim.status.pending_events, 0);
    assert!(!sim.has(key(2)));
}

/// Expires peer `n` of a synced sim (its own state) and returns the event's seq.
fn expire(sim: &mut Sim, n: u8) -> u64 {
    let before = sim.core.events.len();
    sim.advance(Duration::from_secs(T as u64 + 5));
    assert!(!sim.has(key(n)));
    assert_eq!(sim.core.events.len(), before + 1);
    *sim.core.events.keys().last().unwrap()
}

#[test]
fn event_numbers_after_a_lost_state_file_are_new() {
    let mut sim = synced(&[1, 2], Some(T));
    sim.active.insert(key(1));
    let first = expire(&mut sim, 2);
    // The state file is lost; the peer comes back with a new session, and expires again.
    sim.restart(None, S);
    sim.connect();
    let mut loc = sim.core.location.clone().unwrap();
    loc.peers.push(peer(2, 555));
    sim.core.publish(loc);
    sim.deliver();
    assert!(sim.has(key(2)));
    let second = expire(&mut sim, 2);
    assert!(
        second > first,
        "seq {second} after {first}: taken as a repeat"
    );
    assert_eq!(sim.core.events_of(key(2)), 2);
}

#[test]
fn event_numbers_after_an_older_state_file_are_new() {
    let mut sim = synced(&[1, 2, 3], Some(T));
    sim.active.insert(key(1));
    sim.active.insert(key(3));
    let older = sim.last_save();
    let first = expire(&mut sim, 2);
    // An older state file restored from a backup (its next number is below `first`).
    sim.restart(older, S);
    sim.connect();
    sim.active.remove(&key(3));
    let second = expire(&mut sim, 3);
    assert!(
        second > first,
        "seq {second} after {first}: taken as a repeat"
    );
    assert_eq!(sim.core.events_of(key(3)), 1);
}

#[test]
fn a_removal_that_fails_to_apply_is_retried_without_a_second_event() {
    let mut sim = synced(&[1, 2], Some(T));
    sim.active.insert(key(1));
    // The Core's revision without the peer would hide the retry: its acks and removal are
    // held back by keeping it away until the retry is seen.
    sim.kernel.fail_phase(Phase::PeerRemovals, "device busy");
    sim.disconnect();
    sim.advance(Duration::from_secs(T as u64 + 5));
    assert!(
        sim.has(key(2)),
        "the removal failed, the peer is still there"
    );
    assert_eq!(sim.status.pending_events, 1);
    assert!(sim.status.apply_error.is_some());
    // Many ticks later, still one event.
    sim.advance(60 * S);
    assert_eq!(
        sim.status.pending_events, 1,
        "a second event for the same removal"
    );
    sim.kernel.clear_faults();
    sim.advance(Duration::from_secs(11));
    assert!(!sim.has(key(2)), "the removal is not retried");
    assert_eq!(sim.status.pending_events, 1);
    sim.connect();
    assert_eq!(sim.core.deliveries, 1);
    assert_eq!(sim.core.events_of(key(2)), 1);
}

#[test]
fn a_failed_save_postpones_the_removal() {
    let mut sim = synced(&[1], Some(T));
    sim.fail_saves = true;
    sim.advance(Duration::from_secs(T as u64 + 5));
    assert!(sim.has(key(1)), "removed before its event was on disk");
    assert_eq!(sim.status.pending_events, 0, "the event was not taken back");
    assert!(sim.status.state_error.is_some());
    sim.fail_saves = false;
    sim.advance(3 * S);
    assert!(!sim.has(key(1)));
    assert_eq!(sim.core.events_of(key(1)), 1);
}

#[test]
fn a_peer_active_on_another_gateway_is_kept() {
    let mut sim = synced(&[1, 2], Some(T));
    // Peer 1 talks to another gateway: the Core relays its signs of life.
    for _ in 0..10 {
        sim.advance(5 * S);
        let wall = sim.now().wall;
        sim.core.outbox.push(gatehouse_proto::v1::CoreMessage {
            kind: Some(gatehouse_proto::v1::core_message::Kind::PeerActivity(
                gatehouse_proto::v1::PeerActivity {
                    peers: vec![gatehouse_proto::v1::ActivePeer {
                        public_key: key(1).0.to_vec(),
                        last_active_ms: gatehouse::agent::status::unix_ms(wall),
                        endpoint: String::new(),
                    }],
                },
            )),
        });
        sim.deliver();
    }
    assert!(sim.has(key(1)), "cut while active on another gateway");
    assert!(!sim.has(key(2)));
    // Once it is idle everywhere, it goes too.
    sim.advance(Duration::from_secs(T as u64 + 5));
    assert!(!sim.has(key(1)));
    assert_eq!(sim.core.events.len(), 2);
}

#[test]
fn core_outage_changes_nothing() {
    let mut sim = synced(&[1, 2], None);
    let before = sim.kernel.state();
    sim.kernel.clear_log();
    sim.disconnect();
    sim.advance(600 * S);
    assert!(
        sim.kernel.applied_ops().is_empty(),
        "writes during the outage"
    );
    assert_eq!(
        sim.kernel.state().device.peers.len(),
        before.device.peers.len()
    );
    assert!(sim.status.ready, "{}", sim.status.ready_reason);
    assert!(
        sim.status.ready_reason.contains("unreachable"),
        "{}",
        sim.status.ready_reason
    );
    assert!(!sim.status.core.connected);
    sim.connect();
    sim.advance(5 * S);
    assert!(
        sim.kernel.applied_ops().is_empty(),
        "writes after the Core came back"
    );
    assert_eq!(
        sim.core.applied.last().map(|a| a.revision),
        Some(sim.core.revision)
    );
}

#[test]
fn kill_and_restart_while_the_core_is_down() {
    let mut sim = synced(&[1, 2], None);
    let revision = sim.status.applied_revision;
    sim.disconnect();
    sim.kernel.clear_log();
    let state = sim.last_save();
    sim.restart(state, 2 * S);
    // Restored at start, before any Core or resync.
    assert_eq!(sim.status.applied_revision, revision);
    assert!(sim.status.ready, "{}", sim.status.ready_reason);
    sim.advance(30 * S);
    assert_eq!(sim.status.applied_revision, revision);
    assert!(sim.status.ready, "{}", sim.status.ready_reason);
    assert!(
        sim.kernel.applied_ops().is_empty(),
        "the restart rewrote the interface"
    );
    assert!(sim.has(key(1)) && sim.has(key(2)));
}

#[test]
fn drift_made_by_hand_is_repaired() {
    let mut sim = synced(&[1, 2], None);
    let resync = sim.settings.resync_interval;
    let before = sim.kernel.state();
    // A peer removed by hand.
    sim.kernel.modify(|o| {
        o.device.peers.remove(&key(1));
    });
    sim.advance(resync);
    assert!(sim.has(key(1)), "not repaired within resync_interval");
    assert_eq!(sim.status.drift_repairs, 1);
    // A stranger added by hand.
    sim.kernel.modify(|o| {
        let mut p = o.device.peers[&key(2)].clone();
        std::sync::Arc::make_mut(&mut p.config).public_key = key(77);
        std::sync::Arc::make_mut(&mut p.config).allowed_ips =
            ["10.77.0.50/32".parse().unwrap()].into();
        o.device.peers.insert(key(77), p);
    });
    sim.advance(resync);
    assert!(!sim.has(key(77)), "the stranger stays");
    assert_eq!(sim.status.drift_repairs, 2);
    // The link deleted.
    sim.kernel.modify(|o| *o = Default::default());
    sim.advance(resync);
    let after = sim.kernel.state();
    assert_eq!(after.link, before.link);
    assert_eq!(
        after.device.peers.keys().collect::<Vec<_>>(),
        before.device.peers.keys().collect::<Vec<_>>()
    );
    assert_eq!(sim.status.drift_repairs, 3);
    assert!(sim.status.ready && sim.status.backend_error.is_none());
}

#[test]
fn truncated_state_file_the_core_resyncs() {
    let mut sim = synced(&[1, 2], None);
    sim.kernel.clear_log();
    // The state file is unreadable (moved aside by the store): a fresh machine.
    sim.restart(None, S);
    assert_eq!(sim.status.applied_revision, 0);
    assert!(!sim.status.ready);
    sim.connect();
    assert_eq!(sim.status.applied_revision, sim.core.revision);
    assert!(sim.status.ready, "{}", sim.status.ready_reason);
    assert!(
        sim.kernel.applied_ops().is_empty(),
        "peers churned: {:?}",
        sim.kernel.applied_ops()
    );
    assert!(sim
        .last_save()
        .is_some_and(|s| s.applied_revision == sim.core.revision));
}

#[test]
fn hooks_run_at_their_moments() {
    let mut sim = Sim::new(settings());
    sim.core.publish(location(vec![peer(1, 1)], None));
    sim.start();
    assert_eq!(sim.hooks, vec![(Hook::PreUp, false, 0)]);
    sim.connect();
    assert_eq!(
        sim.hooks[1],
        (Hook::PostUp, true, 1),
        "post_up after the first apply"
    );
    sim.advance(30 * S);
    assert_eq!(sim.hooks.len(), 2, "post_up once");
    sim.stop();
    assert_eq!(
        &sim.hooks[2..],
        &[(Hook::PreDown, true, 1), (Hook::PostDown, true, 1)]
    );
    // A restart adopts the interface: pre_up sees it, post_up follows the first apply.
    let state = sim.last_save();
    sim.restart(state, S);
    assert_eq!(
        &sim.hooks[4..],
        &[(Hook::PreUp, true, 1), (Hook::PostUp, true, 1)]
    );
}

#[test]
fn shutdown_keeps_the_tunnel_and_the_restart_writes_nothing() {
    let mut sim = synced(&[1, 2], None);
    let from = sim.trace.len();
    sim.stop();
    assert_eq!(sim.count_since(from, "remove interface"), 0);
    assert!(sim.kernel.state().link.is_some() && sim.has(key(1)) && sim.has(key(2)));
    sim.kernel.clear_log();
    let state = sim.last_save();
    sim.restart(state, S);
    sim.advance(30 * S);
    sim.connect();
    sim.advance(30 * S);
    assert!(
        sim.kernel.applied_ops().is_empty(),
        "the restart wrote to the interface"
    );
}

#[test]
fn reboot_while_the_core_is_down_restores_the_tunnel() {
    let mut sim = synced(&[1, 2], None);
    let revision = sim.status.applied_revision;
    sim.disconnect();
    let state = sim.last_save();
    // A reboot: the interface is gone with the processes.
    sim.kernel = MemoryBackend::new("wgsim0");
    sim.restart(state, 60 * S);
    assert!(
        sim.has(key(1)) && sim.has(key(2)),
        "not restored from the state file"
    );
    assert_eq!(sim.status.applied_revision, revision);
    assert!(!sim.status.core.connected);
    sim.kernel.clear_log();
    sim.connect();
    assert!(
        sim.kernel.applied_ops().is_empty(),
        "writes after the Core returned"
    );
}

#[test]
fn offline_allowance_removes_then_the_core_brings_back() {
    let mut s = settings();
    s.offline_remove_after = Some(120 * S);
    let mut sim = Sim::new(s);
    sim.core
        .publish(location(vec![peer(1, 1), peer(2, 2)], None));
    sim.start();
    sim.connect();
    // Connected but idle for longer than the allowance: nothing happens.
    sim.advance(300 * S);
    assert!(sim.has(key(1)));
    sim.disconnect();
    sim.advance(60 * S);
    assert!(
        sim.has(key(1)) && sim.has(key(2)),
        "removed within the allowance"
    );
    sim.advance(70 * S);
    assert!(
        !sim.has(key(1)) && !sim.has(key(2)),
        "kept past the allowance"
    );
    assert!(sim.status.offline_removed);
    assert!(sim.status.ready, "{}", sim.status.ready_reason);
    assert!(sim.kernel.state().link.is_some(), "the interface stays");
    // A restart still past the allowance does not bring them back.
    let state = sim.last_save();
    sim.restart(state, S);
    assert!(!sim.has(key(1)), "the restart re-added removed peers");
    sim.connect();
    assert!(
        sim.has(key(1)) && sim.has(key(2)),
        "the Core did not bring them back"
    );
    assert!(!sim.status.offline_removed);
}

#[test]
fn a_change_is_planned_on_the_model_saved_once_and_the_next_read_finds_nothing() {
    let mut sim = synced(&[1, 2], None);
    let from = sim.trace.len();
    sim.kernel.clear_log();
    // Three revisions in one batch: one save, one apply, no read.
    for n in 3..6 {
        let mut loc = sim.core.location.clone().unwrap();
        loc.peers.push(peer(n, 0));
        sim.core.publish(loc);
    }
    sim.deliver();
    assert_eq!(sim.count_since(from, "read"), 0, "{:?}", &sim.trace[from..]);
    assert_eq!(sim.count_since(from, "save"), 1, "{:?}", &sim.trace[from..]);
    assert_eq!(
        sim.count_since(from, "apply"),
        1,
        "{:?}",
        &sim.trace[from..]
    );
    assert_eq!(sim.status.applied_revision, sim.core.revision);
    assert!(sim.has(key(5)));
    // Planning again after the model was updated: nothing to do (the resync reads).
    let ops = sim.kernel.applied_ops().len();
    let from = sim.trace.len();
    sim.advance(sim.settings.resync_interval);
    assert!(sim.count_since(from, "read") >= 1);
    assert_eq!(
        sim.count_since(from, "apply"),
        0,
        "{:?}",
        &sim.trace[from..]
    );
    assert_eq!(sim.kernel.applied_ops().len(), ops);
    assert_eq!(sim.status.drift_repairs, 0);
}

#[test]
fn after_a_failed_apply_the_next_change_reads_first() {
    let mut sim = synced(&[1], None);
    sim.kernel.fail_next_apply("busy");
    let mut loc = sim.core.location.clone().unwrap();
    loc.peers.push(peer(2, 0));
    sim.core.publish(loc.clone());
    sim.deliver();
    assert!(sim.core.applied.last().unwrap().error.is_some());
    let from = sim.trace.len();
    loc.peers.push(peer(3, 0));
    sim.core.publish(loc);
    sim.deliver();
    assert_eq!(sim.count_since(from, "read"), 1, "{:?}", &sim.trace[from..]);
    assert!(sim.has(key(2)) && sim.has(key(3)));
    assert!(sim.core.applied.last().unwrap().error.is_none());
}

/// A stats tick reports what its read shows: every peer first on a stream, then only the
/// peers whose counters moved, and nothing when none did.
#[test]
fn a_stats_tick_reports_the_changed_peers_of_its_read() {
    let mut s = settings();
    s.stats_interval = 10 * S;
    let mut sim = Sim::new(s);
    sim.core
        .publish(location(vec![peer(1, 1), peer(2, 2), peer(3, 3)], None));
    sim.start();
    sim.connect();
    sim.advance(10 * S);
    assert_eq!(sim.core.stats_peers, vec![vec![key(1), key(2), key(3)]]);
    sim.active.insert(key(2));
    sim.advance(10 * S);
    assert_eq!(sim.core.stats_peers[1..], [vec![key(2)]]);
    sim.active.clear();
    sim.advance(10 * S);
    assert_eq!(sim.core.stats_peers.len(), 2, "nothing moved: no message");
    // A report the driver refuses comes back: its peers are in the next one, not every
    // peer.
    sim.active.insert(key(3));
    sim.refuse_stats = true;
    sim.advance(10 * S);
    sim.active.clear();
    sim.refuse_stats = false;
    sim.advance(10 * S);
    assert_eq!(sim.core.stats_peers.len(), 3);
    assert_eq!(sim.core.stats_peers[2], vec![key(3)]);
}

#[test]
fn timers_due_together_share_one_read() {
    let mut s = settings();
    s.stats_interval = 10 * S;
    s.resync_interval = 10 * S;
    let mut sim = Sim::new(s);
    sim.core.publish(location(vec![peer(1, 1)], None));
    sim.start();
    sim.connect();
    let from = sim.trace.len();
    sim.advance(10 * S);
    assert_eq!(sim.count_since(from, "read"), 1, "{:?}", &sim.trace[from..]);
}

fn delta(
    revision: u64,
    base: u64,
    upsert: gatehouse_proto::v1::Peer,
) -> gatehouse_proto::v1::CoreMessage {
    use gatehouse_proto::v1;
    v1::CoreMessage {
        kind: Some(v1::core_message::Kind::Delta(v1::Delta {
            revision,
            base_revision: base,
            changes: vec![v1::Change {
                kind: Some(v1::change::Kind::UpsertPeer(upsert)),
            }],
        })),
    }
}

#[test]
fn deltas_in_one_batch_are_one_apply_and_a_gap_asks_for_a_snapshot() {
    let mut sim = synced(&[1], None);
    let r = sim.core.revision;
    let from = sim.trace.len();
    sim.core.outbox.push(delta(r + 1, r, peer(2, 0)));
    sim.core.outbox.push(delta(r + 2, r + 1, peer(3, 0)));
    sim.deliver();
    assert!(sim.has(key(2)) && sim.has(key(3)));
    assert_eq!(
        sim.count_since(from, "apply"),
        1,
        "{:?}",
        &sim.trace[from..]
    );
    // One write before the apply: a journal record (the deltas on the saved revision).
    assert_eq!(
        sim.count_since(from, "append"),
        1,
        "{:?}",
        &sim.trace[from..]
    );
    assert_eq!(sim.count_since(from, "save"), 0, "{:?}", &sim.trace[from..]);
    assert_eq!(sim.count_since(from, "read"), 0);
    assert_eq!(sim.status.applied_revision, r + 2);
    // A delta on a base the gateway does not hold: a snapshot request, then the snapshot.
    let mut loc = sim.core.location.clone().unwrap();
    loc.peers.push(peer(4, 0));
    sim.core.revision = r + 5;
    sim.core.location = Some(loc);
    sim.core.outbox.push(delta(r + 5, r + 4, peer(4, 0)));
    sim.deliver();
    assert_eq!(sim.core.snapshot_requests, 1);
    assert!(sim.has(key(4)));
    assert!(
        !sim.has(key(2)),
        "the snapshot is the Core's whole location"
    );
    assert_eq!(sim.status.applied_revision, r + 5);
}

#[test]
fn a_rejected_revision_reports_and_applies_only_its_removals() {
    let mut sim = synced(&[1, 2], None);
    let good = sim.status.applied_revision;
    let mut bad = peer(3, 0);
    bad.allowed_ips = vec!["not an address".into()];
    // Peer 2 no longer listed, peer 3 invalid.
    sim.core.publish(location(vec![peer(1, 1), bad], None));
    sim.deliver();
    assert!(!sim.has(key(2)), "a revoked peer kept by invalid content");
    assert!(sim.has(key(1)) && !sim.has(key(3)));
    let applied = sim.core.applied.last().unwrap();
    assert_eq!(applied.revision, good);
    assert!(applied
        .error
        .as_ref()
        .is_some_and(|e| !e.rejected.is_empty()));
    assert!(sim.status.last_rejected.is_some());
    // The held content is no longer the Core's: the next delta gets a snapshot request.
    let r = sim.core.revision;
    sim.core.location = Some(location(vec![peer(1, 1)], None));
    sim.core.outbox.push(delta(r + 1, r, peer(1, 1)));
    sim.core.revision = r + 1;
    sim.deliver();
    assert_eq!(sim.core.snapshot_requests, 1);
    assert_eq!(sim.status.applied_revision, r + 1);
    assert!(sim.status.last_rejected.is_none());
}
