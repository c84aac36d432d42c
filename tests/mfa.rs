//! MFA inactivity end to end, in process, without root: the reference Core on loopback
//! and agents on the in-memory backend. Traffic is simulated by raising a peer's rx
//! counter behind the agent's back (`MemoryBackend::modify`), as the kernel would.
//!
//! Covers design §6 and the event rules of the proto: an active peer stays, an idle one
//! is removed within T + 5 s of its last sign of life, the Core stores the event once,
//! ends the session and removes the peer from every gateway; the peer comes back only
//! with a new session; expiry runs while the Core is away, survives an agent restart, and
//! the event reaches the Core exactly once when it returns; a removal that fails to apply
//! is retried without a second event; events after a lost state file are new events.
//! One ignored test states a known design issue (several gateways per location).

#[path = "support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse::backend::memory::MemoryBackend;
use gatehouse::model::Key;
use gatehouse::plan::Phase;
use gatehouse_core::api::{EventView, NewLocation, PeerView};
use support::*;
use tokio::task::JoinHandle;

/// The MFA disconnect threshold of these tests.
const T: Duration = Duration::from_secs(2);
/// How late a removal may come after the threshold has passed (stats interval, MFA
/// deadline, a loaded machine).
const SLACK: Duration = Duration::from_secs(5);

fn mfa_location(name: &str) -> NewLocation {
    NewLocation {
        mfa: true,
        disconnect_threshold_secs: T.as_secs(),
        ..plain_location(name)
    }
}

/// Starts an MFA session for every peer of the location; returns the peers by key with
/// their session ids.
async fn start_sessions(core: &Core, loc: u64) -> Vec<(PeerView, u64)> {
    let mut out = Vec::new();
    for p in core.admin.peers(loc).await.unwrap() {
        let s = core.admin.start_mfa_session(loc, p.id, None).await.unwrap();
        out.push((p, s.session_id));
    }
    out
}

fn has(backend: &MemoryBackend, k: Key) -> bool {
    backend.state().device.peers.contains_key(&k)
}

async fn peer_view(core: &Core, loc: u64, id: u64) -> PeerView {
    let peers = core.admin.peers(loc).await.unwrap();
    peers.into_iter().find(|p| p.id == id).expect("peer listed")
}

async fn events(core: &Core, loc: u64) -> Vec<EventView> {
    core.admin.events(loc).await.unwrap()
}

/// Waits until `k` is gone from the backend, at most until `deadline`; returns when.
async fn removed_before(
    backend: &MemoryBackend,
    k: Key,
    deadline: std::time::Instant,
) -> std::time::Instant {
    loop {
        let now = std::time::Instant::now();
        if !has(backend, k) {
            return now;
        }
        assert!(
            now < deadline,
            "peer {k} still on the interface {:?} after the deadline",
            now - deadline
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Simulated traffic from some peers: their rx counters grow every 100 ms (only while
/// they are on the interface). Stops on drop.
struct Traffic {
    task: Option<JoinHandle<()>>,
    last: Arc<Mutex<Option<std::time::Instant>>>,
}

impl Traffic {
    fn start(backend: &MemoryBackend, keys: &[Key]) -> Traffic {
        let (backend, keys) = (backend.clone(), keys.to_vec());
        let last = Arc::new(Mutex::new(None));
        let mark = Arc::clone(&last);
        let task = tokio::spawn(async move {
            loop {
                backend.modify(|o| {
                    for k in &keys {
                        if let Some(p) = o.device.peers.get_mut(k) {
                            p.rx_bytes += 148;
                        }
                    }
                });
                *mark.lock().unwrap() = Some(std::time::Instant::now());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Traffic {
            task: Some(task),
            last,
        }
    }

    /// Stops the traffic; returns when the counters last grew.
    async fn stop(mut self) -> std::time::Instant {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        let last = *self.last.lock().unwrap();
        last.expect("traffic ran at least once")
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Removal of `k` after its last sign of life at `last`: not before the threshold has
/// passed, and within T + SLACK.
async fn expect_expiry(backend: &MemoryBackend, k: Key, last: std::time::Instant) {
    let gone = removed_before(backend, k, last + T + SLACK).await;
    assert!(
        gone - last > T,
        "removed {:?} after its last sign of life, threshold {T:?}",
        gone - last
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_peer_stays_idle_peer_is_removed_once_and_returns_with_a_new_session() {
    let mut core = Core::start().await;
    let (loc, token) = core.location(mfa_location("mfa"), 2).await;
    let sessions = start_sessions(&core, loc).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&core.url(), &token, dir.path()).await;
    agent.applied(core.revision(loc).await).await;
    let (a, b) = (key(0), key(1));
    let b_peer = sessions.iter().find(|(p, _)| p.public_key == b.to_base64());
    let (b_peer, b_session) = b_peer.map(|(p, s)| (p.clone(), *s)).unwrap();
    assert!(has(&agent.backend, a) && has(&agent.backend, b));
    assert_eq!(agent.status().mfa_threshold_secs, Some(T.as_secs()));

    // Both active for longer than the threshold: both stay.
    let traffic_a = Traffic::start(&agent.backend, &[a]);
    let traffic_b = Traffic::start(&agent.backend, &[b]);
    tokio::time::sleep(T * 2).await;
    assert!(has(&agent.backend, a) && has(&agent.backend, b));
    assert_eq!(agent.status().mfa_removals, 0);

    // B goes idle: removed within T + 5 s of its last sign of life.
    let last_b = traffic_b.stop().await;
    expect_expiry(&agent.backend, b, last_b).await;
    assert!(has(&agent.backend, a), "the active peer stays");

    // The Core lists the event once and ended the session.
    eventually("the Core stored the event", || async {
        !events(&core, loc).await.is_empty()
    })
    .await;
    let ev = events(&core, loc).await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].reason, "mfa_inactive");
    assert_eq!(ev[0].public_key, b.to_base64());
    assert_eq!(ev[0].peer_id, Some(b_peer.id));
    assert_eq!(ev[0].mfa_session, b_session);
    assert_eq!(ev[0].gateway_id, agent.status().gateway_id);
    assert!(ev[0].detail.contains("inactive for"), "{}", ev[0].detail);
    let view = peer_view(&core, loc, b_peer.id).await;
    assert!(view.mfa_session.is_none() && !view.active, "{view:?}");
    eventually("the event is acknowledged", || async {
        agent.status().pending_events == 0
    })
    .await;
    assert_eq!(agent.status().mfa_removals, 1);

    // A later snapshot (the Core restarts) does not send it back.
    let snapshots = agent.status().core.snapshots;
    core.restart().await;
    eventually("the agent applied a new snapshot", || async {
        let s = agent.status();
        s.core.connected && s.core.snapshots > snapshots
    })
    .await;
    agent.applied(core.revision(loc).await).await;
    assert!(!has(&agent.backend, b), "not re-added for the same session");
    assert!(has(&agent.backend, a));

    // Still active: A stays, far beyond the threshold.
    tokio::time::sleep(T).await;
    assert!(has(&agent.backend, a));

    // A new session brings B back, with its new preshared key and a fresh timer.
    let again = core
        .admin
        .start_mfa_session(loc, b_peer.id, None)
        .await
        .unwrap();
    assert_ne!(again.session_id, b_session);
    agent.applied(again.revision).await;
    let state = agent.backend.state();
    let psk = state.device.peers[&b].config.preshared_key.as_ref();
    assert_eq!(
        psk.map(|k| k.expose_base64()),
        Some(again.preshared_key.clone())
    );
    let traffic_b = Traffic::start(&agent.backend, &[b]);
    tokio::time::sleep(T * 2).await;
    assert!(has(&agent.backend, b), "active in its new session");
    assert_eq!(events(&core, loc).await.len(), 1, "no further event");

    drop((traffic_a, traffic_b));
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_location_without_mfa_never_removes_idle_peers() {
    let core = Core::start().await;
    let new = NewLocation {
        mfa: false,
        // Ignored without MFA.
        disconnect_threshold_secs: T.as_secs(),
        ..plain_location("nomfa")
    };
    let (loc, token) = core.location(new, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&core.url(), &token, dir.path()).await;
    agent.applied(core.revision(loc).await).await;
    assert_eq!(agent.status().mfa_threshold_secs, None);
    let before = agent.backend.state().device.peers.len();
    assert_eq!(before, 3);

    // Idle for several thresholds and stats intervals.
    tokio::time::sleep(T * 3 + SLACK / 5).await;
    assert_eq!(agent.backend.state().device.peers.len(), 3);
    let s = agent.status();
    assert_eq!((s.mfa_removals, s.pending_events), (0, 0));
    assert!(events(&core, loc).await.is_empty());
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_removes_the_peer_from_every_gateway_of_the_location() {
    // A longer threshold, so that the second gateway, started half a threshold later,
    // is far from expiring the peer by itself when the first one does.
    let threshold = T * 2;
    let core = Core::start().await;
    let new = NewLocation {
        disconnect_threshold_secs: threshold.as_secs(),
        ..mfa_location("mfapair")
    };
    let (loc, token) = core.location(new, 2).await;
    let sessions = start_sessions(&core, loc).await;
    let rev = core.revision(loc).await;
    let (a, b) = (key(0), key(1));
    let b_id = sessions
        .iter()
        .find(|(p, _)| p.public_key == b.to_base64())
        .map(|(p, _)| p.id)
        .unwrap();

    // B is idle on both gateways; A is active on both.
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let gw1 = Agent::start(&core.url(), &token, d1.path()).await;
    gw1.applied(rev).await;
    let _a1 = Traffic::start(&gw1.backend, &[a]);
    tokio::time::sleep(threshold / 2).await;
    let token2 = core.admin.create_token(loc).await.unwrap();
    let gw2 = Agent::start(&core.url(), &token2, d2.path()).await;
    gw2.applied(rev).await;
    let _a2 = Traffic::start(&gw2.backend, &[a]);
    assert!(has(&gw2.backend, b));

    // Gateway 1 expires B; the Core ends the session and removes B from the location,
    // so gateway 2 removes it too, before its own timer would.
    eventually("gateway 1 removed the idle peer", || async {
        !has(&gw1.backend, b)
    })
    .await;
    eventually("gateway 2 removed it too", || async {
        !has(&gw2.backend, b)
    })
    .await;
    let ev = events(&core, loc).await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].gateway_id, gw1.status().gateway_id);
    assert_eq!(
        gw2.status().mfa_removals,
        0,
        "gateway 2 removed it on the Core's word, not by its own timer"
    );
    assert!(!peer_view(&core, loc, b_id).await.active);
    let rev = core.revision(loc).await;
    gw1.applied(rev).await;
    gw2.applied(rev).await;
    // Gateway 2 keeps it removed past its own deadline and reports nothing.
    tokio::time::sleep(threshold / 2).await;
    assert!(!has(&gw2.backend, b));
    assert_eq!(events(&core, loc).await.len(), 1);
    assert!(has(&gw1.backend, a) && has(&gw2.backend, a));
    gw1.stop().await.unwrap();
    gw2.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_removal_survives_an_agent_restart_and_reaches_the_core_once() {
    let mut core = Core::start().await;
    let (loc, token) = core.location(mfa_location("mfaoffline"), 2).await;
    let sessions = start_sessions(&core, loc).await;
    let rev = core.revision(loc).await;
    let dir = tempfile::tempdir().unwrap();
    let backend = MemoryBackend::new("wgtest0");
    let url = core.url();
    let start = || Agent::start_with(settings(&url, &token, dir.path()), backend.clone());
    let agent = start().await;
    agent.applied(rev).await;
    let (a, b) = (key(0), key(1));
    let (b_id, b_session) = sessions
        .iter()
        .find(|(p, _)| p.public_key == b.to_base64())
        .map(|(p, s)| (p.id, *s))
        .unwrap();
    let _traffic_a = Traffic::start(&backend, &[a]);
    let traffic_b = Traffic::start(&backend, &[b]);

    // The Core goes away while B is still active; then B goes idle.
    core.stop().await;
    eventually("the agent noticed the Core is gone", || async {
        !agent.status().core.connected
    })
    .await;
    let last_b = traffic_b.stop().await;
    expect_expiry(&backend, b, last_b).await;
    eventually("the event is kept", || async {
        agent.status().pending_events == 1
    })
    .await;
    let gateway_id = agent.status().gateway_id;

    // The agent restarts, the Core still down: the event is still pending, the peer
    // stays removed (the state file's location still has it, in the same session).
    agent.stop().await.unwrap();
    let agent = start().await;
    eventually("restored from the state file", || async {
        agent.status().applied_revision == rev
    })
    .await;
    assert_eq!(agent.status().pending_events, 1);
    assert!(!has(&backend, b), "not restored from the state file");
    tokio::time::sleep(T).await; // a few resyncs and MFA deadlines
    assert!(!has(&backend, b));
    assert!(
        has(&backend, a),
        "the active peer stays while the Core is away"
    );
    let s = agent.status();
    assert_eq!((s.pending_events, s.mfa_removals), (1, 0), "{s:?}");

    // The Core returns: the event is stored exactly once, the session ends, and the
    // snapshot it answers with does not send B back.
    core.start_again().await;
    eventually("the event is acknowledged", || async {
        let s = agent.status();
        s.core.connected && s.pending_events == 0
    })
    .await;
    let ev = events(&core, loc).await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].gateway_id, gateway_id);
    assert_eq!(ev[0].public_key, b.to_base64());
    assert_eq!(ev[0].mfa_session, b_session);
    assert!(peer_view(&core, loc, b_id).await.mfa_session.is_none());
    let now = core.revision(loc).await;
    assert_eq!(now, rev + 1, "ending the session is one revision");
    agent.applied(now).await;
    assert!(!has(&backend, b));
    assert!(has(&backend, a));
    tokio::time::sleep(Duration::from_secs(2)).await; // resyncs with the Core's location
    assert!(!has(&backend, b));
    assert_eq!(events(&core, loc).await.len(), 1);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_after_a_lost_state_file_are_not_mistaken_for_old_ones() {
    // The gateway id survives in its own file; the event numbering must not start over,
    // or the Core takes the new events for repeats of the old ones and drops them.
    let core = Core::start().await;
    let (loc, token) = core.location(mfa_location("mfalost"), 2).await;
    let sessions = start_sessions(&core, loc).await;
    let dir = tempfile::tempdir().unwrap();
    let backend = MemoryBackend::new("wgtest0");
    let url = core.url();
    let start = || Agent::start_with(settings(&url, &token, dir.path()), backend.clone());
    let (a, b) = (key(0), key(1));
    let b_id = sessions
        .iter()
        .find(|(p, _)| p.public_key == b.to_base64())
        .map(|(p, _)| p.id)
        .unwrap();
    let _traffic_a = Traffic::start(&backend, &[a]);

    let agent = start().await;
    agent.applied(core.revision(loc).await).await;
    eventually("first removal stored", || async {
        events(&core, loc).await.len() == 1 && agent.status().pending_events == 0
    })
    .await;
    let gateway_id = agent.status().gateway_id;
    agent.stop().await.unwrap();

    // The state file is lost; B gets a new session and goes idle again.
    std::fs::remove_file(dir.path().join(gatehouse::state::STATE_FILE)).unwrap();
    let again = core.admin.start_mfa_session(loc, b_id, None).await.unwrap();
    let agent = start().await;
    agent.applied(again.revision).await;
    assert_eq!(agent.status().gateway_id, gateway_id, "same gateway id");
    eventually("the second removal stored as a new event", || async {
        events(&core, loc).await.len() == 2
    })
    .await;
    let ev = events(&core, loc).await;
    assert!(ev.iter().all(|e| e.gateway_id == gateway_id));
    assert_ne!(ev[0].seq, ev[1].seq);
    assert_eq!(ev[1].mfa_session, again.session_id);
    eventually("the new session ended", || async {
        peer_view(&core, loc, b_id).await.mfa_session.is_none()
    })
    .await;
    assert!(!has(&backend, b));
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_after_an_older_state_file_is_restored_are_not_mistaken_for_old_ones() {
    // A state file restored from a backup holds an event number the Core has seen since:
    // the numbering must still go on above it, or the Core drops the new event as a repeat.
    let core = Core::start().await;
    let (loc, token) = core.location(mfa_location("mfabackup"), 2).await;
    let sessions = start_sessions(&core, loc).await;
    let dir = tempfile::tempdir().unwrap();
    let backend = MemoryBackend::new("wgtest0");
    let url = core.url();
    let start = || Agent::start_with(settings(&url, &token, dir.path()), backend.clone());
    let (a, b) = (key(0), key(1));
    let b_id = sessions
        .iter()
        .find(|(p, _)| p.public_key == b.to_base64())
        .map(|(p, _)| p.id)
        .unwrap();
    let _traffic_a = Traffic::start(&backend, &[a]);
    let state_file = dir.path().join(gatehouse::state::STATE_FILE);

    let agent = start().await;
    agent.applied(core.revision(loc).await).await;
    // The backup, taken before B's removal (B idles for T from now).
    let backup = std::fs::read(&state_file).unwrap();
    eventually("first removal stored", || async {
        events(&core, loc).await.len() == 1 && agent.status().pending_events == 0
    })
    .await;
    agent.stop().await.unwrap();

    // The backup is restored; B gets a new session and goes idle again.
    std::fs::write(&state_file, &backup).unwrap();
    let again = core.admin.start_mfa_session(loc, b_id, None).await.unwrap();
    let agent = start().await;
    agent.applied(again.revision).await;
    eventually("the second removal stored as a new event", || async {
        events(&core, loc).await.len() == 2
    })
    .await;
    let ev = events(&core, loc).await;
    assert!(ev[1].seq > ev[0].seq, "{ev:?}");
    assert_eq!(ev[1].mfa_session, again.session_id);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_that_fails_to_apply_is_retried_without_a_second_event() {
    // Offline (no Core delta to retry the removal for us), with the periodic resync, which
    // retries a failed apply, coming long after the threshold.
    let mut core = Core::start().await;
    let (loc, token) = core.location(mfa_location("mfafail"), 2).await;
    start_sessions(&core, loc).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&core.url(), &token, dir.path());
    s.resync_interval = T * 4;
    let agent = Agent::start_with(s, MemoryBackend::new("wgtest0")).await;
    agent.applied(core.revision(loc).await).await;
    let (a, b) = (key(0), key(1));
    let _traffic_a = Traffic::start(&agent.backend, &[a]);
    let traffic_b = Traffic::start(&agent.backend, &[b]);
    core.stop().await;
    eventually("the agent noticed the Core is gone", || async {
        !agent.status().core.connected
    })
    .await;

    // B goes idle; removing it fails until the fault ends (a fault of one apply would be
    // over at the retry, 125 to 250 ms later: too soon to watch).
    agent
        .backend
        .fail_phase(Phase::PeerRemovals, "injected: netlink busy");
    traffic_b.stop().await;
    eventually("the removal failed", || async {
        agent.status().apply_error.is_some()
    })
    .await;
    assert!(has(&agent.backend, b), "still there after the failed apply");
    agent.backend.clear_faults();
    eventually("the removal retried", || async { !has(&agent.backend, b) }).await;
    let s = agent.status();
    assert_eq!(
        (s.pending_events, s.mfa_removals),
        (1, 1),
        "one removal, one event: {s:?}"
    );

    core.start_again().await;
    eventually("the event stored", || async {
        agent.status().pending_events == 0
    })
    .await;
    assert_eq!(events(&core, loc).await.len(), 1);
    assert!(has(&agent.backend, a) && !has(&agent.backend, b));
    agent.stop().await.unwrap();
}

/// Several gateways per location (protocol rule 8): a client talks to ONE gateway and is
/// idle on every other. The Core relays its signs of life (`PeerActivity`), so the other
/// gateways keep it; once it really goes idle, both remove it and the session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_active_on_one_gateway_is_not_cut_by_another() {
    let core = Core::start().await;
    let (loc, token) = core.location(mfa_location("mfaboth"), 1).await;
    start_sessions(&core, loc).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let gw1 = Agent::start(&core.url(), &token, d1.path()).await;
    let token2 = core.admin.create_token(loc).await.unwrap();
    let gw2 = Agent::start(&core.url(), &token2, d2.path()).await;
    let rev = core.revision(loc).await;
    gw1.applied(rev).await;
    gw2.applied(rev).await;
    let a = key(0);
    // The client uses gateway 1 only.
    let traffic = Traffic::start(&gw1.backend, &[a]);
    tokio::time::sleep(T * 4).await;
    assert!(has(&gw1.backend, a), "an active user was cut");
    assert!(
        has(&gw2.backend, a),
        "the idle gateway removed an active user"
    );
    assert!(
        events(&core, loc)
            .await
            .iter()
            .all(|e| e.outcome != "session_ended"),
        "the session was ended while the client was active"
    );
    assert_eq!(gw2.status().mfa_removals, 0);

    // The client stops: both gateways remove it, the session ends.
    let last = traffic.stop().await;
    let deadline = last + T + Duration::from_secs(5);
    removed_before(&gw1.backend, a, deadline).await;
    removed_before(&gw2.backend, a, deadline).await;
    eventually("the Core ended the session", || async {
        events(&core, loc)
            .await
            .iter()
            .any(|e| e.outcome == "session_ended")
    })
    .await;
    gw1.stop().await.unwrap();
    gw2.stop().await.unwrap();
}
