//! Takeover kick benchmark: how long one `Backend::kick` of N peers takes (the write the
//! agent paces with `takeover_rate`), plain and re-creating, on the kernel backend when the
//! kernel has WireGuard (run it in the VM: `tests/vm/run-kernel-tests.sh --bench takeover`)
//! and on the userspace backend (wireguard-go) otherwise (`cargo bench --bench takeover`,
//! as root). Runs in a network namespace of its own, deleted at the end. Prints a
//! markdown table of medians.
//!
//! The peers' endpoints (198.18.0.0/15) are behind a next hop on a veth segment that
//! forwards nothing: every kick makes the
//! device build and send a real handshake initiation (wireguard-go does it inside the UAPI
//! transaction; the kernel queues it to a worker after the netlink answer).

#[path = "../tests/support/bench.rs"]
mod bench;
#[path = "../tests/vm/support.rs"]
mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use bench::{median, setting};
use gatehouse::backend::kernel::KernelBackend;
use gatehouse::backend::userspace::{UserspaceBackend, UserspaceConfig};
use gatehouse::backend::{Backend, Kick};
use gatehouse::model::Desired;
use gatehouse::plan::plan;

fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// This process in a namespace of its own, deleted on drop.
struct Namespace(String);

impl Namespace {
    fn enter_new() -> anyhow::Result<Namespace> {
        let name = format!("ghkickb{}", std::process::id());
        sh("ip", &["netns", "add", &name])?;
        let ns = Namespace(name);
        let file = std::fs::File::open(format!("/var/run/netns/{}", ns.0))?;
        // SAFETY: a valid namespace fd; this single-threaded program (and the processes it
        // starts) then live in the namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        anyhow::ensure!(rc == 0, "setns: {}", std::io::Error::last_os_error());
        Ok(ns)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.0]);
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("takeover bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let peers = setting("GATEHOUSE_BENCH_PEERS", 2_000usize);
    let rounds = setting("GATEHOUSE_BENCH_ROUNDS", 3usize).max(1);
    let want: Desired = support::desired(17, 41100, u32::try_from(peers)?, 0);
    let _ns = Namespace::enter_new()?;
    sh("ip", &["link", "set", "lo", "up"])?;
    sh(
        "ip",
        &[
            "link", "add", "ghkba", "type", "veth", "peer", "name", "ghkbb",
        ],
    )?;
    sh("ip", &["addr", "add", "192.0.2.1/24", "dev", "ghkba"])?;
    sh("ip", &["addr", "add", "192.0.2.2/24", "dev", "ghkbb"])?;
    sh("ip", &["link", "set", "ghkba", "up"])?;
    sh("ip", &["link", "set", "ghkbb", "up"])?;
    // Clients behind a router: one next hop for every endpoint (one neighbour entry).
    sh(
        "ip",
        &[
            "route",
            "add",
            "198.18.0.0/15",
            "via",
            "192.0.2.2",
            "dev",
            "ghkba",
        ],
    )?;

    // UAPI sockets are named by interface whatever the namespace: unique per run.
    let interface = format!("ghkick{}", std::process::id() % 100_000);
    let (name, mut backend): (&str, Box<dyn Backend>) = match KernelBackend::new(&interface) {
        Ok(b) => ("kernel", Box::new(b)),
        Err(_) => (
            "userspace",
            Box::new(UserspaceBackend::new(
                &interface,
                UserspaceConfig {
                    // A re-creating kick of thousands of peers is one long transaction.
                    uapi_timeout: Duration::from_secs(300),
                    ..UserspaceConfig::default()
                },
            )?),
        ),
    };
    let result = measure(name, backend.as_mut(), &want, rounds);
    if name == "userspace" {
        // Stops wireguard-go, also after a failure; a kernel interface goes with the
        // namespace (faster).
        backend.remove()?;
    }
    result
}

fn measure(
    name: &str,
    backend: &mut dyn Backend,
    want: &Desired,
    rounds: usize,
) -> anyhow::Result<()> {
    let peers = want.peers.len();
    let observed = backend.observe()?;
    backend.apply(&plan(want, &observed))?;

    let kicks = |recreate: bool| -> Vec<Kick> {
        want.peers
            .values()
            .enumerate()
            .map(|(n, p)| Kick {
                peer: p.clone(),
                endpoint: SocketAddr::from((Ipv4Addr::from(0xc612_0000u32 + 1 + n as u32), 51820)),
                recreate,
            })
            .collect()
    };
    let mut rows = Vec::new();
    for (what, recreate) in [("kick", false), ("kick, re-creating", true)] {
        let batch = kicks(recreate);
        let mut times = Vec::new();
        let mut messages = 0;
        for _ in 0..rounds {
            let before = backend.counters().device_writes;
            let start = Instant::now();
            backend.kick(&batch)?;
            times.push(start.elapsed());
            messages = backend.counters().device_writes - before;
            eprintln!(
                "takeover bench: {what}: {:.1} ms",
                times[times.len() - 1].as_secs_f64() * 1e3
            );
            // wireguard-go and the kernel refuse a second initiation to a peer within 5 s
            // (REKEY_TIMEOUT); wait so that every round starts as many handshakes.
            std::thread::sleep(Duration::from_millis(5_100));
        }
        rows.push((what, median(times), messages));
    }
    let observed = backend.observe()?;
    anyhow::ensure!(
        observed.device.peers.len() == peers,
        "peers after the kicks: {}",
        observed.device.peers.len()
    );
    println!("| backend | {peers} peers | median of {rounds} | writes | per peer |");
    println!("|---|---|---|---|---|");
    for (what, t, messages) in rows {
        println!(
            "| {name} | {what} | {:.1} ms | {messages} | {:.1} µs |",
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() * 1e6 / peers as f64
        );
    }
    Ok(())
}
