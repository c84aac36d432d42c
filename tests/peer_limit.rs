//! A location larger than the backend can hold, end to end in process: the reference Core
//! on loopback and an agent on the in-memory backend given a limit of 3 peers (as
//! wireguard-go holds at most 65,536). The peers beyond the limit are refused with one
//! error naming the limit and the kernel backend, in `Applied` (the Core's gateway view)
//! and in `/status`; removals and the peers within the limit are applied; the resyncs after
//! that write nothing.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeSet;

use gatehouse::backend::memory::MemoryBackend;
use gatehouse::backend::{Backend as _, PeerLimit};
use gatehouse::model::Key;
use support::*;

const LIMIT: PeerLimit = PeerLimit {
    max: 3,
    backend: "the test backend",
};

fn kernel_keys(agent: &Agent) -> BTreeSet<Key> {
    agent.backend.state().device.peers.keys().copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_beyond_the_backend_limit_are_refused_once_and_the_rest_applies() {
    let core = Core::start().await;
    let (loc, token) = core.location(plain_location("limit"), 5).await;
    let dir = tempfile::tempdir().unwrap();
    let backend = MemoryBackend::new("wgtest0");
    backend.set_peer_limit(Some(LIMIT));
    let agent = Agent::start_with(settings(&core.url(), &token, dir.path()), backend).await;

    // The first three by key are applied; one refusal in /status ...
    let by_key: Vec<Key> = (0..5)
        .map(key)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    eventually("three peers applied", || async {
        kernel_keys(&agent) == by_key[..3].iter().copied().collect()
    })
    .await;
    eventually("the refusal in /status", || async {
        agent.status().failed_steps.len() == 1
    })
    .await;
    let status = agent.status();
    let reason = &status.failed_steps[0];
    assert!(
        reason.starts_with("peer limit: 5 peers wanted but the test backend holds at most 3")
            && reason.contains("kernel backend"),
        "{reason}"
    );
    // ... and in the Core's view of the gateway (from `Applied`).
    eventually("the refusal in Applied", || async {
        let gws = core.admin.gateways(loc).await.unwrap();
        gws.first()
            .and_then(|g| g.last_error.as_ref())
            .is_some_and(|e| {
                e.rejected.len() == 1
                    && e.rejected[0].item == "step.peer_limit"
                    && e.rejected[0].reason.contains("at most 3")
            })
    })
    .await;

    // Resyncs while the refusal stands write nothing.
    let writes = agent.backend.counters();
    let resyncs = agent.status().timers.resyncs;
    eventually("two more resyncs", || async {
        agent.status().timers.resyncs >= resyncs + 2
    })
    .await;
    assert_eq!(
        agent.backend.counters(),
        writes,
        "a resync over the limit is a no-op"
    );
    assert_eq!(agent.status().failed_steps.len(), 1);

    // Removing a held peer makes room for the first refused one by key.
    let gone = by_key[0];
    let id = core
        .admin
        .peers(loc)
        .await
        .unwrap()
        .into_iter()
        .find(|p| Key::from_base64(&p.public_key) == Some(gone))
        .expect("peer")
        .id;
    let rev = core.admin.delete_peer(loc, id).await.unwrap().revision;
    eventually("the removal applied and the next peer in", || async {
        kernel_keys(&agent) == by_key[1..4].iter().copied().collect()
    })
    .await;
    eventually("the removal's revision held", || async {
        agent.status().held_revision >= rev
    })
    .await;
    agent.stop().await.unwrap();
}
