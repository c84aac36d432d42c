//! One-peer change latency at scale, measured from the outside (issue 11): the reference
//! Core (in process, its admin HTTP API), the agent as a real process (`gatehouse run`)
//! in a network namespace, its `/status` polled. For each size: N peers added through the
//! admin API, the agent started and its cold apply awaited; then CHANGES times one peer's
//! persistent keepalive toggled (`PATCH .../peers/{id}`), timed from the admin call until
//! `/status` shows the new revision applied (polled every POLL_MS); at the end the agent's
//! peak RSS (`VmHWM` of `/proc/<pid>/status`) and the Core's count of stats entries.
//!
//!   sudo cargo bench --bench change                              # userspace, 1,000 peers
//!   sudo GATEHOUSE_BENCH_PEERS=1000,50000 nice cargo bench --bench change
//!   GATEHOUSE_BENCH_PEERS=1000,100000 tests/vm/run-kernel-bench.sh change   # kernel, in the VM
//!
//! Settings (environment): `GATEHOUSE_BENCH_PEERS` (sizes, comma-separated, default 1000),
//! `GATEHOUSE_BENCH_CHANGES` (default 20), `GATEHOUSE_BENCH_POLL_MS` (default 5),
//! `GATEHOUSE_BENCH_BACKEND` (`userspace`, default; `kernel` in the VM),
//! `GATEHOUSE_BENCH_RESYNC_SECS` (default 120: a failed apply is retried by the next
//! resync), `GATEHOUSE_BENCH_STATS_SECS` (default 3600, so no stats read lands among the
//! changes), `GATEHOUSE_BENCH_SETTLE_SECS` (default 0: how long the agent runs after the
//! changes before its peak RSS is read, so that stats and resync ticks count in it),
//! `GATEHOUSE_BENCH_AGENT_ENV` (`NAME=VALUE;NAME=VALUE`, set for the agent process only:
//! a profiler's `LD_PRELOAD`, `GATEHOUSE_*` settings). "VmHWM cold" is the peak after the
//! cold apply, "VmHWM" the peak at the end.
//! Prints a markdown table and, with two sizes or more, the ratio of the medians
//! (largest size / smallest). Resolution: the poll interval plus one `/status` call.

// The harness's own unit tests (compiled here too: benches build with cfg(test)) use
// nothing of this bench.
#[path = "../tests/support/bench.rs"]
mod bench;
#[allow(unused_imports)]
#[path = "../tests/e2e/mod.rs"]
mod e2e;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bench::{ms, quantile, setting};
use e2e::{AgentProcess, Site};
use gatehouse::agent::status::Status;
use gatehouse_core::api::{NewPeer, PeerPatch};

/// How long the agent may take to apply the first snapshot (100,000 peers under TCG).
const COLD_WITHIN: Duration = Duration::from_secs(3600);
/// How long one change may take before the bench gives up.
const CHANGE_WITHIN: Duration = Duration::from_secs(600);

/// One size's figures.
struct Row {
    peers: usize,
    cold: Duration,
    changes: Vec<Duration>,
    /// The admin call alone (the Core's share of each change).
    calls: Vec<Duration>,
    writes_per_change: f64,
    vm_hwm_cold_kib: u64,
    vm_hwm_kib: u64,
    stats_entries: u64,
}

impl Row {
    fn quantile(&self, q: f64) -> Duration {
        quantile(&self.changes, q)
    }
}

/// `VmHWM` of a process, in KiB (its peak resident set).
fn vm_hwm_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// Polls `/status` every `poll` until `done` holds; panics after `within`.
async fn wait_status(
    site: &Site,
    poll: Duration,
    within: Duration,
    what: &str,
    done: impl Fn(&Status) -> bool,
) -> Status {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = site.try_status().await {
            if done(&s) {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(poll).await;
    }
}

/// Starts the agent with the bench's configuration (the e2e one with `backend` set).
async fn start_agent(site: &mut Site, backend: &str) {
    let text = e2e::agent::render_config(&site.paths, &site.core.url(), &site.options);
    let mut config: toml::Table = toml::from_str(&text).expect("the rendered configuration");
    if let Some(toml::Value::Table(gw)) = config.get_mut("gateway") {
        gw.insert("backend".into(), backend.into());
    }
    let text = toml::to_string(&config).expect("render");
    std::fs::write(&site.paths.config, text).expect("write the agent configuration");
    site.agent = Some(AgentProcess::spawn_with_env(&site.paths, &agent_env()));
}

/// `GATEHOUSE_BENCH_AGENT_ENV`: `NAME=VALUE` pairs separated by `;`.
fn agent_env() -> Vec<(String, String)> {
    setting("GATEHOUSE_BENCH_AGENT_ENV", String::new())
        .split(';')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .expect("GATEHOUSE_BENCH_AGENT_ENV: NAME=VALUE pairs");
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

async fn measure(mut site: Site, peers: usize, backend: &str) -> Row {
    let changes = setting("GATEHOUSE_BENCH_CHANGES", 20usize);
    let poll = Duration::from_millis(setting("GATEHOUSE_BENCH_POLL_MS", 5));
    let name = format!("loc-{}", site.tag);
    let id = site.create_location(Site::default_location(&name)).await.id;
    let all: Vec<NewPeer> = (0..peers).map(e2e::support::bulk_peer).collect();
    let mut ids = Vec::with_capacity(peers);
    for chunk in all.chunks(8_192) {
        let added = site.admin().add_peers(id, chunk).await.expect("add peers");
        ids.extend(added.into_iter().map(|p| p.id));
    }
    let revision = site.revision().await;
    site.options.stats_interval = Duration::from_secs(setting("GATEHOUSE_BENCH_STATS_SECS", 3600));
    site.options.resync_interval = Duration::from_secs(setting("GATEHOUSE_BENCH_RESYNC_SECS", 120));
    site.options.log_level = "warn".into();
    let started = Instant::now();
    start_agent(&mut site, backend).await;
    wait_status(&site, poll, COLD_WITHIN, "the cold apply", |s| {
        s.applied_revision == revision && s.apply_error.is_none()
    })
    .await;
    let cold = started.elapsed();
    let pid = site.agent.as_ref().expect("the agent runs").pid();
    let vm_hwm_cold = vm_hwm_kib(pid);
    eprintln!("change bench: {peers} peers applied by the agent in {cold:?}");

    // The peer in the middle of the key order, its keepalive toggled 0 -> 25 -> 0 ...
    let target = ids[peers / 2];
    let mut times = Vec::with_capacity(changes);
    let mut calls = Vec::with_capacity(changes);
    let before = site.status().await;
    for i in 0..changes {
        let from = site.revision().await;
        let keepalive = if i % 2 == 0 { 25 } else { 0 };
        let patch = PeerPatch {
            persistent_keepalive: Some(keepalive),
            ..Default::default()
        };
        let t = Instant::now();
        site.admin()
            .patch_peer(id, target, &patch)
            .await
            .expect("patch the peer");
        calls.push(t.elapsed());
        let s = wait_status(&site, poll, CHANGE_WITHIN, "the change applied", |s| {
            s.applied_revision > from
        })
        .await;
        let took = t.elapsed();
        assert_eq!(s.applied_revision, from + 1, "one change is one revision");
        assert!(s.apply_error.is_none(), "apply failed: {:?}", s.apply_error);
        eprintln!(
            "change bench: {peers} peers, change {i}: {:.1} ms",
            ms(took)
        );
        times.push(took);
        // Let the agent finish what follows the apply (Applied, state file) first.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = site.status().await;
    let settle = Duration::from_secs(setting("GATEHOUSE_BENCH_SETTLE_SECS", 0));
    if !settle.is_zero() {
        eprintln!("change bench: {peers} peers, the agent runs {settle:?} more (ticks)");
        tokio::time::sleep(settle).await;
    }
    let vm_hwm = vm_hwm_kib(pid);
    let stats_entries = site
        .gateway_in_core()
        .await
        .map(|g| g.stats_entries)
        .unwrap_or_default();
    site.stop_agent();
    Row {
        peers,
        cold,
        changes: times,
        calls,
        writes_per_change: (after.device_writes - before.device_writes) as f64 / changes as f64,
        vm_hwm_cold_kib: vm_hwm_cold,
        vm_hwm_kib: vm_hwm,
        stats_entries,
    }
}

fn main() {
    let sizes: Vec<usize> = setting("GATEHOUSE_BENCH_PEERS", String::from("1000"))
        .split(',')
        .map(|s| s.trim().parse().expect("GATEHOUSE_BENCH_PEERS: sizes"))
        .collect();
    let backend = setting("GATEHOUSE_BENCH_BACKEND", String::from("userspace"));
    if !e2e::netns::is_root() {
        eprintln!("change bench: needs root (network namespaces); skipped");
        return;
    }
    let rows = Mutex::new(Vec::new());
    for &peers in &sizes {
        let backend = backend.as_str();
        let rows = &rows;
        e2e::run("bc", async move |site: Site| {
            let row = measure(site, peers, backend).await;
            rows.lock().expect("rows").push(row);
        });
    }
    let rows = rows.into_inner().expect("rows");
    let changes = rows.first().map_or(0, |r| r.changes.len());
    println!(
        "\nOne-peer change, admin call to revision applied ({backend} backend, {changes} changes each)\n"
    );
    println!("| peers | cold apply via agent | median | min | p90 | max | device writes per change | agent VmHWM cold | agent VmHWM | stats entries at the Core | admin call alone (median) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} | {:.1} MiB | {:.1} MiB | {} | {:.1} ms |",
            r.peers,
            ms(r.cold),
            ms(r.quantile(0.5)),
            ms(r.quantile(0.0)),
            ms(r.quantile(0.9)),
            ms(r.quantile(1.0)),
            r.writes_per_change,
            r.vm_hwm_cold_kib as f64 / 1024.0,
            r.vm_hwm_kib as f64 / 1024.0,
            r.stats_entries,
            ms(quantile(&r.calls, 0.5))
        );
    }
    if let (Some(small), Some(large)) = (rows.first(), rows.last()) {
        if rows.len() > 1 {
            println!(
                "\nratio of the medians, {} / {} peers: {:.2}",
                large.peers,
                small.peers,
                ms(large.quantile(0.5)) / ms(small.quantile(0.5))
            );
        }
    }
}
