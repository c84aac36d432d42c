//! A gateway that comes back with a long backlog of peer events (100,000, e.g. after a
//! long outage of the Core with MFA expiry running) still connects at once: its `Hello`
//! carries at most `MAX_HELLO_EVENTS` of them and the rest follow as `PeerEvent`s, and
//! every event is stored exactly once. In-process: reference Core + agent on the memory
//! backend.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use gatehouse::backend::memory::MemoryBackend;
use gatehouse::state::{PendingEvent, PersistedState, StateStore};
use gatehouse_proto::v1::PeerEventReason;
use support::*;

const BACKLOG: u64 = 100_000;
/// Generous bound for storing the whole backlog (the behaviour, not a benchmark).
const STORED_WITHIN: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_event_backlog_never_blocks_a_reconnect_and_is_stored_once() {
    let core = Core::start().await;
    let (loc, token) = core.location(plain_location("backlog"), 3).await;
    let rev = core.revision(loc).await;

    // The state a gateway leaves after removing 100,000 peers while the Core was away.
    let dir = tempfile::tempdir().unwrap();
    let gateway_id = {
        let (mut store, _) = StateStore::open(dir.path()).unwrap();
        let gateway_id = store.gateway_id().to_owned();
        let mut state = PersistedState::new(gateway_id.clone());
        state.pending_events = (1..=BACKLOG)
            .map(|seq| PendingEvent {
                seq,
                public_key: key(1_000_000 + seq as usize),
                reason: PeerEventReason::OfflinePolicy,
                last_handshake_ms: 0,
                at_ms: 1_700_000_000_000,
                mfa_session: 0,
                peer_id: 0,
                detail: "removed while the Core was away".into(),
            })
            .collect();
        state.next_seq = BACKLOG + 1;
        store.save(&state).unwrap();
        gateway_id
    };

    let started = Instant::now();
    // The periodic resync rewrites the state file, whose size is the backlog's: at the
    // default interval, not the other tests' 1 s.
    let mut settings = settings(&core.url(), &token, dir.path());
    settings.resync_interval = Duration::from_secs(60);
    let agent = Agent::start_with(settings, MemoryBackend::new("wgtest0")).await;
    agent.applied(rev).await;
    let connected = started.elapsed();
    assert!(agent.status().core.connected);
    eprintln!("figure: connected and applied {connected:?} after start with {BACKLOG} events");

    let deadline = Instant::now() + STORED_WITHIN;
    loop {
        if agent.status().pending_events == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} events still unacknowledged after {STORED_WITHIN:?}",
            agent.status().pending_events
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "figure: {BACKLOG} events stored and acknowledged {:?} after start",
        started.elapsed()
    );

    let events = core.admin.events(loc).await.unwrap();
    assert_eq!(events.len() as u64, BACKLOG, "every event stored once");
    let seqs: BTreeSet<u64> = events
        .iter()
        .filter(|e| e.gateway_id == gateway_id)
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=BACKLOG).collect::<BTreeSet<u64>>());
    agent.stop().await.unwrap();
}
