//! Restart benchmark: an agent holding 10,000 peers is stopped and started again, with the
//! Core down (the worst case: everything comes from the state file) and with the Core up.
//! Measures the time from start (the backend's construction) to ready (`/readyz` logic),
//! as the agent's status channel reports it (no polling), and counts the writes the
//! restart makes (the promise: zero).
//!
//!   cargo bench --bench restart                 # memory backend (agent overhead only)
//!   sudo cargo bench --bench restart            # + userspace backend (wireguard-go, netns)
//!   tests/vm/run-kernel-bench.sh restart        # + kernel backend, inside the VM
//!
//! `GATEHOUSE_BENCH_PEERS` (default 10,000) and `GATEHOUSE_BENCH_ROUNDS` (restarts per
//! row, default 5) change the size; the 100,000 kernel figure:
//!   GATEHOUSE_BENCH_PEERS=100000 GATEHOUSE_BENCH_BACKENDS=kernel WGVM_MEM=8192 \
//!       WGVM_TIMEOUT=14400 tests/vm/run-kernel-bench.sh restart
//! `GATEHOUSE_BENCH_BACKENDS` (default `memory,kernel,userspace`) picks the backends:
//! wireguard-go holds at most 65,536 peers, so 100,000 is for the kernel and memory
//! backends.
//!
//! Prints a markdown table; `BENCHMARKS.md` records the figures with this command.

#[path = "../tests/support/bench.rs"]
mod bench;
#[path = "../tests/netns/mod.rs"]
mod netns;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use bench::setting;
use gatehouse::agent::status::Status;
use gatehouse::agent::{self, Settings};
use gatehouse::backend::kernel::KernelBackend;
use gatehouse::backend::memory::MemoryBackend;
use gatehouse::backend::userspace::{UserspaceBackend, UserspaceConfig};
use gatehouse::backend::Backend;
use gatehouse_core::api::NewPeer;
use support::{plain_location, Core};
use tokio::sync::{oneshot, watch};

fn peers() -> usize {
    setting("GATEHOUSE_BENCH_PEERS", 10_000usize)
}

/// Whether the backend `name` is to be measured.
fn wanted(name: &str) -> bool {
    std::env::var("GATEHOUSE_BENCH_BACKENDS")
        .map(|v| v.split(',').any(|b| b.trim() == name))
        .unwrap_or(true)
}

fn runs() -> usize {
    setting("GATEHOUSE_BENCH_ROUNDS", 5usize).max(1)
}

struct Row {
    backend: &'static str,
    core: &'static str,
    median: Duration,
    max: Duration,
    writes: u64,
}

impl Row {
    /// The row of the markdown table.
    fn line(&self) -> String {
        format!(
            "| {} | {} | {:.0} ms | {:.0} ms | {} |",
            self.backend,
            self.core,
            self.median.as_secs_f64() * 1000.0,
            self.max.as_secs_f64() * 1000.0,
            self.writes
        )
    }
}

/// Makes the backend and runs the agent until ready (and, with the Core up, until its
/// snapshot is applied), then stops it; returns (time to ready, writes made by this run).
/// The time counts from the backend's construction, as the agent's own start does (the
/// userspace backend probes for a wireguard-go to adopt there).
async fn start_until_ready(
    name: &str,
    settings: Settings,
    make: &dyn Fn() -> Box<dyn Backend>,
    core_up: bool,
) -> (Duration, u64) {
    let started = Instant::now();
    let backend = make();
    let before = backend.counters();
    let (tx, mut status) = watch::channel(Status::default());
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(agent::run_with_status(
        settings,
        backend,
        async move {
            let _ = stop_rx.await;
        },
        tx,
    ));
    let ready = loop {
        if status.borrow().ready {
            break started.elapsed();
        }
        if tokio::time::timeout(Duration::from_secs(600), status.changed())
            .await
            .is_err()
        {
            panic!("{name} (Core up: {core_up}): the agent never became ready in 600 s");
        }
    };
    while core_up && {
        let s = status.borrow();
        s.core.snapshots == 0 || s.applied_revision != s.held_revision
    } {
        if tokio::time::timeout(Duration::from_secs(600), status.changed())
            .await
            .is_err()
        {
            panic!("{name}: the Core's snapshot was never applied in 600 s");
        }
    }
    let s = status.borrow().clone();
    let _ = stop.send(());
    task.await.expect("agent panicked").expect("agent failed");
    let writes = s.device_writes + s.link_writes - before.device_writes - before.link_writes;
    (ready, writes)
}

async fn scenario(name: &'static str, make: &dyn Fn() -> Box<dyn Backend>, rows: &mut Vec<Row>) {
    let mut core = Core::start().await;
    let (loc, token) = core.location(plain_location("bench"), 0).await;
    let all: Vec<NewPeer> = (0..peers()).map(support::bulk_peer).collect();
    for chunk in all.chunks(8_192) {
        core.admin.add_peers(loc, chunk).await.expect("add peers");
    }
    let rev = core.revision(loc).await;
    let state = tempfile::tempdir().unwrap();
    let mut settings = support::settings(&core.url(), &token, state.path());
    settings.interface = "ghbench0".into();
    settings.stats_interval = Duration::from_secs(3600);
    settings.resync_interval = Duration::from_secs(3600);

    // First start: the cold apply (not measured here; see the kernel benchmark).
    let (cold, _) = start_until_ready(name, settings.clone(), make, true).await;
    eprintln!("{name}: cold start to ready {cold:?} (revision {rev})");

    for core_up in [true, false] {
        if !core_up {
            core.stop().await;
        }
        let mut times = Vec::new();
        let mut writes = 0;
        for _ in 0..runs() {
            let (t, w) = start_until_ready(name, settings.clone(), make, core_up).await;
            times.push(t);
            writes += w;
        }
        times.sort();
        let row = Row {
            backend: name,
            core: if core_up { "up" } else { "down" },
            median: times[times.len() / 2],
            max: times[times.len() - 1],
            writes,
        };
        // Each row as soon as it is measured: a later scenario that fails keeps it.
        eprintln!("{}", row.line());
        rows.push(row);
    }
}

fn main() {
    // The agent's log on stderr when asked (`RUST_LOG=warn`): in the VM it is the only
    // trace of a start that never becomes ready.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    rt.block_on(async {
        if !wanted("memory") {
            return;
        }
        let memory = MemoryBackend::new("ghbench0");
        scenario(
            "memory",
            &|| Box::new(memory.clone()) as Box<dyn Backend>,
            &mut rows,
        )
        .await;
    });
    if wanted("kernel")
        && netns::is_root()
        && std::path::Path::new("/sys/module/wireguard").exists()
    {
        let ns = netns::Netns::new("bk");
        rt.block_on(async {
            scenario(
                "kernel",
                &|| {
                    Box::new(ns.enter(|| KernelBackend::new("ghbench0").expect("kernel")))
                        as Box<dyn Backend>
                },
                &mut rows,
            )
            .await;
        });
    }
    let have_wg_go = std::process::Command::new("wireguard-go")
        .arg("--version")
        .output()
        .is_ok();
    if wanted("userspace") && netns::is_root() && have_wg_go {
        let ns = netns::Netns::new("bu");
        let iface = format!("ghbu{}", std::process::id() % 10_000);
        rt.block_on(async {
            scenario(
                "userspace",
                &|| {
                    let i = iface.clone();
                    Box::new(ns.enter(move || {
                        UserspaceBackend::new(i, UserspaceConfig::default()).expect("userspace")
                    })) as Box<dyn Backend>
                },
                &mut rows,
            )
            .await;
        });
        // wireguard-go keeps running by design (the tunnel survives restarts); end it.
        let _ = std::process::Command::new("pkill")
            .args(["-f", &format!("wireguard-go -f {iface}")])
            .status();
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{iface}.log"));
    }
    println!(
        "\nRestart of an agent holding {} peers ({} runs each)\n",
        peers(),
        runs()
    );
    println!("| backend | Core | start to ready (median) | max | writes by the restarts |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("{}", r.line());
    }
}
