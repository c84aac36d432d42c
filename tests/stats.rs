//! Peer statistics end to end, in process, without root: the reference Core on loopback
//! and an agent on the in-memory backend, whose counters the test changes behind the
//! agent's back (`MemoryBackend::modify`). Checks what the Core stores: only changed peers
//! are reported, and totals stay exact across counter resets and agent restarts (the
//! counter-epoch rule of the proto's `Stats`).

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use gatehouse::model::Key;
use gatehouse_core::api::StatsView;
use support::*;

const STATS_INTERVAL: Duration = Duration::from_millis(300);

/// Settings with a short stats interval.
fn fast_settings(core: &Core, token: &str, dir: &std::path::Path) -> gatehouse::agent::Settings {
    let mut s = settings(&core.url(), token, dir);
    s.stats_interval = STATS_INTERVAL;
    s.resync_interval = Duration::from_millis(200);
    s
}

/// Like `eventually`, polling at a pace that leaves the Core time to serve the agent
/// (a 10,000-row `GET /stats` is not free in a debug build).
async fn slow_poll<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + CONVERGE * 3;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn rows(core: &Core, loc: u64) -> Vec<StatsView> {
    core.admin.stats(loc).await.expect("GET stats")
}

async fn row_of(core: &Core, loc: u64, k: Key) -> Option<StatsView> {
    let b64 = k.to_base64();
    rows(core, loc)
        .await
        .into_iter()
        .find(|r| r.public_key == b64)
}

/// Sets the kernel counters of one peer.
fn set_counters(agent: &Agent, k: Key, rx: u64, tx: u64) {
    agent.backend.modify(|o| {
        let p = o.device.peers.get_mut(&k).expect("peer on the interface");
        p.rx_bytes = rx;
        p.tx_bytes = tx;
    });
}

/// Waits until the Core's row for `k` shows these kernel counters (and `check` holds).
async fn core_row_reaches(
    core: &Core,
    loc: u64,
    k: Key,
    rx: u64,
    tx: u64,
    check: impl Fn(&StatsView) -> bool,
) -> StatsView {
    let mut last = None;
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        if let Some(r) = row_of(core, loc, k).await {
            if r.rx_bytes == rx && r.tx_bytes == tx && check(&r) {
                return r;
            }
            last = Some(r);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Core row never reached rx={rx} tx={tx}; last: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cycle_reports_exactly_the_changed_peers_of_ten_thousand() {
    const PEERS: usize = 10_000;
    let core = Core::start().await;
    let (loc, token) = core.location(plain_location("stats10k"), PEERS).await;
    let rev = core.revision(loc).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(
        fast_settings(&core, &token, dir.path()),
        gatehouse::backend::memory::MemoryBackend::new("wgtest0"),
    )
    .await;
    // A few seconds in a debug build (the memory backend's kernel model indexes the
    // allowed IPs' owners; 4 s for 10,000 under a load average of 10).
    slow_poll("the agent applied the 10,000 peers", || async {
        agent.status().applied_revision >= rev
    })
    .await;

    // The first report on the stream carries every peer.
    slow_poll("the Core has a row for every peer", || async {
        rows(&core, loc).await.len() == PEERS
    })
    .await;
    let t0 = rows(&core, loc)
        .await
        .iter()
        .map(|r| r.updated_at)
        .max()
        .unwrap();
    // Nothing changes: later cycles report nothing.
    tokio::time::sleep(STATS_INTERVAL * 4).await;
    let quiet = rows(&core, loc).await;
    assert!(
        quiet.iter().all(|r| r.updated_at <= t0),
        "unchanged peers were reported again"
    );

    // Change 100 peers spread over the key space: rx only, tx only, or both.
    let mut expected: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    agent.backend.modify(|o| {
        for i in (0..PEERS).step_by(PEERS / 100) {
            let k = key(i);
            let p = o.device.peers.get_mut(&k).expect("peer on the interface");
            let n = i as u64;
            match i / 100 % 3 {
                0 => p.rx_bytes += 1_000 + n,
                1 => p.tx_bytes += 2_000 + n,
                _ => {
                    p.rx_bytes += 3_000 + n;
                    p.tx_bytes += 4_000 + n;
                }
            }
            expected.insert(k.to_base64(), (p.rx_bytes, p.tx_bytes));
        }
    });
    assert_eq!(expected.len(), 100);

    slow_poll("the Core stored the 100 changed peers", || async {
        rows(&core, loc)
            .await
            .iter()
            .filter(|r| r.updated_at > t0)
            .count()
            >= 100
    })
    .await;
    // Give a few more cycles the chance to report anything else (they must not).
    tokio::time::sleep(STATS_INTERVAL * 4).await;
    let after = rows(&core, loc).await;
    let updated: Vec<&StatsView> = after.iter().filter(|r| r.updated_at > t0).collect();
    let keys: BTreeSet<&str> = updated.iter().map(|r| r.public_key.as_str()).collect();
    assert_eq!(
        keys,
        expected.keys().map(String::as_str).collect(),
        "exactly the changed peers were reported"
    );
    assert_eq!(updated.len(), 100);
    let cycles: BTreeSet<i64> = updated.iter().map(|r| r.updated_at).collect();
    assert_eq!(cycles.len(), 1, "all in one collection: {cycles:?}");
    for r in updated {
        let (rx, tx) = expected[&r.public_key];
        assert_eq!((r.rx_bytes, r.tx_bytes), (rx, tx), "{}", r.public_key);
        assert_eq!((r.total_rx, r.total_tx), (rx, tx), "{}", r.public_key);
        assert_ne!(r.counter_epoch, 0, "the agent created the peer");
    }
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_survive_a_peer_recreated_by_the_agent() {
    let core = Core::start().await;
    let (loc, token) = core.location(plain_location("statsreset"), 3).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(
        fast_settings(&core, &token, dir.path()),
        gatehouse::backend::memory::MemoryBackend::new("wgtest0"),
    )
    .await;
    agent.applied(core.revision(loc).await).await;
    let k = key(0);

    set_counters(&agent, k, 5_000, 700);
    let first = core_row_reaches(&core, loc, k, 5_000, 700, |_| true).await;
    assert_ne!(first.counter_epoch, 0);
    assert_eq!((first.total_rx, first.total_tx), (5_000, 700));

    // The peer disappears from the kernel; the agent's resync re-creates it with fresh
    // counters and a new epoch. The new counters end up HIGHER than the old ones, so
    // only the epoch tells the Core that a new run started.
    agent.backend.modify(|o| {
        o.device.peers.remove(&k);
    });
    eventually("the agent re-created the peer", || async {
        agent.backend.state().device.peers.contains_key(&k)
    })
    .await;
    set_counters(&agent, k, 6_000, 800);
    let r = core_row_reaches(&core, loc, k, 6_000, 800, |r| {
        r.counter_epoch != first.counter_epoch
    })
    .await;
    assert_ne!(r.counter_epoch, 0);
    assert_eq!((r.total_rx, r.total_tx), (11_000, 1_500));

    // The same run goes on: no double counting.
    set_counters(&agent, k, 6_500, 900);
    let r = core_row_reaches(&core, loc, k, 6_500, 900, |_| true).await;
    assert_eq!((r.total_rx, r.total_tx), (11_500, 1_600));
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_survive_agent_restarts_with_and_without_a_state_file() {
    let core = Core::start().await;
    let (loc, token) = core.location(plain_location("statsrestart"), 2).await;
    let dir = tempfile::tempdir().unwrap();
    let backend = gatehouse::backend::memory::MemoryBackend::new("wgtest0");
    let start = || Agent::start_with(fast_settings(&core, &token, dir.path()), backend.clone());
    let k = key(1);

    let agent = start().await;
    agent.applied(core.revision(loc).await).await;
    set_counters(&agent, k, 1_000, 100);
    let first = core_row_reaches(&core, loc, k, 1_000, 100, |_| true).await;
    let epoch = first.counter_epoch;
    assert_ne!(epoch, 0);
    agent.stop().await.unwrap();

    // Traffic while the agent is down; the restarted agent adopts the peer with the
    // epoch from its state file, so the Core continues the run.
    backend.modify(|o| {
        let p = o.device.peers.get_mut(&k).unwrap();
        p.rx_bytes = 1_500;
        p.tx_bytes = 150;
    });
    let agent = start().await;
    let r = core_row_reaches(&core, loc, k, 1_500, 150, |_| true).await;
    assert_eq!(r.counter_epoch, epoch, "epoch kept in the state file");
    assert_eq!((r.total_rx, r.total_tx), (1_500, 150));
    assert_eq!(
        agent.status().last_reconcile_ops,
        0,
        "adopted without changes"
    );
    agent.stop().await.unwrap();

    // The state file is lost: the agent adopts the peer with epoch 0 ("unknown start"),
    // which must continue the run, not add the old counters a second time.
    std::fs::remove_file(dir.path().join(gatehouse::state::STATE_FILE)).unwrap();
    backend.modify(|o| {
        let p = o.device.peers.get_mut(&k).unwrap();
        p.rx_bytes = 2_000;
        p.tx_bytes = 200;
    });
    let agent = start().await;
    agent.applied(core.revision(loc).await).await;
    let r = core_row_reaches(&core, loc, k, 2_000, 200, |_| true).await;
    assert_eq!(r.counter_epoch, 0, "adopted without state: unknown epoch");
    assert_eq!((r.total_rx, r.total_tx), (2_000, 200), "not double-counted");
    assert_eq!(
        backend
            .applied_ops()
            .iter()
            .filter(|op| matches!(op, gatehouse::plan::Op::AddPeer(_)))
            .count(),
        2,
        "only the first start added the peers"
    );

    // The adopted peer is re-created by the agent (it vanished from the kernel): a new,
    // known epoch ends the unknown run.
    backend.modify(|o| {
        o.device.peers.remove(&k);
    });
    eventually("the agent re-created the peer", || async {
        backend.state().device.peers.contains_key(&k)
    })
    .await;
    set_counters(&agent, k, 50, 5);
    let r = core_row_reaches(&core, loc, k, 50, 5, |r| r.counter_epoch != 0).await;
    assert_eq!((r.total_rx, r.total_tx), (2_050, 205));
    agent.stop().await.unwrap();
}
