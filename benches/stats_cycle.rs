//! Stats cycle at scale (issue 11): an agent holding N peers (default 100,000) reports to
//! the reference Core; between two stats ticks 1% of the peers get traffic and a
//! handshake. Measured per cycle: the reads of the interface (a counting wrapper around
//! the backend), the time of that read, and the `Stats` messages and peer entries the
//! Core received (its `GET .../gateways` counters `stats_messages`, `stats_entries`).
//! The promise: one read, and only the changed peers sent.
//!
//!   cargo bench --bench stats_cycle
//!   GATEHOUSE_BENCH_PEERS=1000 GATEHOUSE_BENCH_ROUNDS=2 cargo bench --bench stats_cycle
//!
//! The in-memory backend (the only one whose counters a benchmark can move without real
//! clients); `GATEHOUSE_BENCH_PEERS`, `GATEHOUSE_BENCH_ROUNDS` (cycles, default 3),
//! `GATEHOUSE_BENCH_STATS_MS` (the agent's `stats_interval`, default 3000).
//! The in-memory backend applies plans on `plan::KernelModel`, whose owners index makes the
//! first apply of 100,000 peers O(N log N) (it was quadratic before, BENCHMARKS.md).

#[path = "../tests/support/bench.rs"]
mod bench;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bench::setting;
use gatehouse::agent::status::Status;
use gatehouse::agent::{self};
use gatehouse::backend::memory::MemoryBackend;
use gatehouse::backend::{Backend, BackendError, Kick, PeerLimit, WriteCounters};
use gatehouse::model::Observed;
use gatehouse::plan::Plan;
use gatehouse_core::api::NewPeer;
use support::{plain_location, Core};
use tokio::sync::{oneshot, watch};

/// Reads of the interface and their total time (ns), shared with the bench.
#[derive(Clone, Default)]
struct Reads {
    count: Arc<AtomicU64>,
    nanos: Arc<AtomicU64>,
}

/// A backend that counts and times its reads and passes everything on.
struct Counting<B> {
    inner: B,
    reads: Reads,
}

impl<B: Backend> Backend for Counting<B> {
    fn interface(&self) -> &str {
        self.inner.interface()
    }
    fn observe(&mut self) -> Result<Observed, BackendError> {
        let t = Instant::now();
        let result = self.inner.observe();
        let took = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.reads.nanos.fetch_add(took, Ordering::SeqCst);
        self.reads.count.fetch_add(1, Ordering::SeqCst);
        result
    }
    fn apply(&mut self, plan: &Plan) -> Result<(), BackendError> {
        self.inner.apply(plan)
    }
    fn counters(&self) -> WriteCounters {
        self.inner.counters()
    }
    fn peer_limit(&self) -> Option<PeerLimit> {
        self.inner.peer_limit()
    }
    fn check(&mut self) -> Result<Option<String>, BackendError> {
        self.inner.check()
    }
    fn remove(&mut self) -> Result<(), BackendError> {
        self.inner.remove()
    }
    fn kick(&mut self, kicks: &[Kick]) -> Result<(), BackendError> {
        self.inner.kick(kicks)
    }
}

/// The Core's (messages, entries) counters for the agent's gateway.
async fn core_counts(core: &Core, location: u64) -> (u64, u64) {
    let gateways = core.admin.gateways(location).await.expect("gateways");
    gateways
        .first()
        .map_or((0, 0), |g| (g.stats_messages, g.stats_entries))
}

/// Waits until the Core's counters stop moving (300 ms unchanged) after `ticks` stats
/// ticks of the agent; returns them.
async fn settled(
    core: &Core,
    location: u64,
    status: &mut watch::Receiver<Status>,
    ticks: u64,
) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while status.borrow().timers.stats_ticks < ticks {
        assert!(Instant::now() < deadline, "no stats tick");
        let _ = tokio::time::timeout(Duration::from_secs(1), status.changed()).await;
    }
    let mut last = core_counts(core, location).await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = core_counts(core, location).await;
        if now == last {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the Core's counters never settled"
        );
        last = now;
    }
}

struct Cycle {
    reads: u64,
    read_time: Duration,
    messages: u64,
    entries: u64,
    changed: usize,
}

async fn bench(peers: usize, rounds: usize, stats_every: Duration) -> Vec<Cycle> {
    let core = Core::start().await;
    let (loc, token) = core.location(plain_location("stats"), 0).await;
    let all: Vec<NewPeer> = (0..peers).map(support::bulk_peer).collect();
    for chunk in all.chunks(8_192) {
        core.admin.add_peers(loc, chunk).await.expect("add peers");
    }
    let revision = core.revision(loc).await;
    let state = tempfile::tempdir().expect("tempdir");
    let mut settings = support::settings(&core.url(), &token, state.path());
    settings.stats_interval = stats_every;
    settings.resync_interval = Duration::from_secs(3600);
    let memory = MemoryBackend::new("wgtest0");
    let reads = Reads::default();
    let backend = Counting {
        inner: memory.clone(),
        reads: reads.clone(),
    };
    let (tx, mut status) = watch::channel(Status::default());
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(agent::run_with_status(
        settings,
        Box::new(backend),
        async move {
            let _ = stop_rx.await;
        },
        tx,
    ));
    let started = Instant::now();
    while status.borrow().applied_revision != revision {
        tokio::time::timeout(Duration::from_secs(1800), status.changed())
            .await
            .expect("the snapshot applied")
            .expect("the agent runs");
    }
    eprintln!(
        "stats bench: {peers} peers applied in {:?}",
        started.elapsed()
    );
    // The first report after the apply carries every peer; the cycles start after it.
    let ticks = status.borrow().timers.stats_ticks;
    let mut counts = settled(&core, loc, &mut status, ticks + 1).await;
    let mut cycles = Vec::new();
    for round in 0..rounds {
        let ticks = status.borrow().timers.stats_ticks;
        let (reads0, nanos0) = (
            reads.count.load(Ordering::SeqCst),
            reads.nanos.load(Ordering::SeqCst),
        );
        // 1% of the peers (every 100th, shifted each round) had traffic and a handshake.
        let mut changed = 0;
        memory.modify(|o| {
            for (i, p) in o.device.peers.values_mut().enumerate() {
                if i % 100 == round % 100 {
                    p.rx_bytes += 1_000;
                    p.tx_bytes += 2_000;
                    p.last_handshake = Some(SystemTime::now());
                    changed += 1;
                }
            }
        });
        let after = settled(&core, loc, &mut status, ticks + 1).await;
        let cycle = Cycle {
            reads: reads.count.load(Ordering::SeqCst) - reads0,
            read_time: Duration::from_nanos(reads.nanos.load(Ordering::SeqCst) - nanos0),
            messages: after.0 - counts.0,
            entries: after.1 - counts.1,
            changed,
        };
        eprintln!(
            "stats bench: cycle {round}: {} read(s) in {:?}, {} message(s), {} entries, {} changed",
            cycle.reads, cycle.read_time, cycle.messages, cycle.entries, cycle.changed
        );
        cycles.push(cycle);
        counts = after;
    }
    let _ = stop.send(());
    task.await.expect("agent panicked").expect("agent failed");
    cycles
}

fn main() {
    let peers = setting("GATEHOUSE_BENCH_PEERS", 100_000usize);
    let rounds = setting("GATEHOUSE_BENCH_ROUNDS", 3usize).max(1);
    let stats_every = Duration::from_millis(setting("GATEHOUSE_BENCH_STATS_MS", 3000));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cycles = rt.block_on(bench(peers, rounds, stats_every));
    println!("\nStats cycle, {peers} peers held, 1% changed between two ticks (memory backend)\n");
    println!("| cycle | peers changed | reads of the interface | read time | Stats messages | entries sent |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (i, c) in cycles.iter().enumerate() {
        println!(
            "| {i} | {} | {} | {:.1} ms | {} | {} |",
            c.changed,
            c.reads,
            c.read_time.as_secs_f64() * 1e3,
            c.messages,
            c.entries
        );
    }
}
