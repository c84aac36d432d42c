//! Kernel backend benchmark, beside the `wg` tool on the same (virtual) machine. Needs
//! root and kernel WireGuard: run it in the VM with `tests/vm/run-kernel-bench.sh`.
//! Prints a markdown table of medians with their spread (min–max over the rounds), then the
//! cold apply's ratio per round and what each side's time includes; absolute times under
//! TCG emulation are slow, the ratios are what to read. In the cold apply the two sides
//! take turns going first (even rounds gatehouse, odd rounds `wg`).
//!
//!   tests/vm/run-kernel-bench.sh                                    # 10,000 peers, 3 rounds
//!   GATEHOUSE_BENCH_PEERS=100000 GATEHOUSE_BENCH_ROUNDS=5 WGVM_MEM=4096 WGVM_TIMEOUT=14400 \
//!       tests/vm/run-kernel-bench.sh                                # the 100,000 figures
//!
//! With `GATEHOUSE_BENCH_DEFGUARD` set to the helper built from `benches/defguard` (the
//! script builds it and sets it; `GATEHOUSE_BENCH_DEFGUARD=0` leaves the column out), a
//! third column: defguard_wireguard_rs's kernel path (`WGApi<Kernel>`) on the same config,
//! cold (`create_interface` + `configure_interface`) and one peer (`configure_peer`),
//! timed inside the helper.
//!
//! Never deletes an interface (minutes for 10,000 peers under TCG): each round's
//! interfaces stay in the benchmark's namespace, dropped at the end.

#[path = "../tests/support/bench.rs"]
mod bench;
#[path = "../tests/vm/support.rs"]
mod support;

use std::io::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use bench::{ms, setting, spread, thousands, Spread};
use gatehouse::backend::kernel::KernelBackend;
use gatehouse::backend::Backend;
use gatehouse::model::Desired;
use gatehouse::plan::plan;

fn progress(what: &str, d: Duration) {
    eprintln!("kernel bench: {what}: {:.1} ms", d.as_secs_f64() * 1e3);
}
/// The benchmark runs in its own network namespace, deleted when it ends: deleting a
/// WireGuard interface with 10,000 peers takes minutes under TCG, deleting a namespace
/// returns at once (the kernel tears it down in the background).
struct Namespace(String);

impl Namespace {
    fn enter_new() -> anyhow::Result<Namespace> {
        let name = format!("ghbench{}", std::process::id());
        sh("ip", &["netns", "add", &name])?;
        let ns = Namespace(name);
        let file = std::fs::File::open(format!("/var/run/netns/{}", ns.0))?;
        // SAFETY: a valid namespace fd; this single-threaded program (and the commands it
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
        eprintln!("kernel bench: {e:#}");
        std::process::exit(1);
    }
}

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

fn time(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed())
}

/// `12.3 ms (10.1–14.2)`.
fn show(s: Spread) -> String {
    format!("{:.1} ms ({:.1}–{:.1})", ms(s.median), ms(s.min), ms(s.max))
}

fn wg_config(want: &Desired, port: u16) -> anyhow::Result<tempfile::NamedTempFile> {
    let mut f = tempfile::NamedTempFile::new()?;
    writeln!(
        f,
        "[Interface]\nPrivateKey = {}\nListenPort = {port}",
        want.interface.private_key.expose_base64()
    )?;
    for p in want.peers.values() {
        let ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
        writeln!(
            f,
            "[Peer]\nPublicKey = {}\nAllowedIPs = {}",
            p.public_key,
            ips.join(",")
        )?;
        if let Some(psk) = &p.preshared_key {
            writeln!(f, "PresharedKey = {}", psk.expose_base64())?;
        }
        if p.persistent_keepalive != 0 {
            writeln!(f, "PersistentKeepalive = {}", p.persistent_keepalive)?;
        }
    }
    f.flush()?;
    Ok(f)
}

fn converge(b: &mut KernelBackend, want: &Desired) -> anyhow::Result<()> {
    let observed = b.observe()?;
    b.apply(&plan(want, &observed))?;
    Ok(())
}

struct Row {
    what: String,
    ours: Spread,
    messages: u64,
    tool: Spread,
    tool_cmd: &'static str,
    defguard: Option<Spread>,
}

/// The defguard helper's path, when the column is wanted.
fn defguard_helper() -> Option<String> {
    let path = std::env::var("GATEHOUSE_BENCH_DEFGUARD").ok()?;
    std::path::Path::new(&path).is_file().then_some(path)
}

/// Runs the defguard helper; its stdout is the time of the library calls in ms.
fn defguard(helper: &str, args: &[&str]) -> anyhow::Result<Duration> {
    let out = Command::new(helper).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "defguard helper {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let ms: f64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok(Duration::from_secs_f64(ms / 1e3))
}

fn run() -> anyhow::Result<()> {
    let peers = setting("GATEHOUSE_BENCH_PEERS", 10_000usize);
    let rounds = setting("GATEHOUSE_BENCH_ROUNDS", 3usize).max(1);
    let want = support::desired(9, 41000, u32::try_from(peers)?, 0);
    let n = thousands(peers);
    let helper = defguard_helper();
    let mtu = want.interface.mtu.unwrap_or(1420).to_string();
    let addresses: Vec<String> = want
        .interface
        .addresses
        .iter()
        .map(|a| a.to_string())
        .collect();
    let _ns = Namespace::enter_new()?;
    let mut rows = Vec::new();

    // Cold: ours from nothing (link, MTU, addresses, up, device, peers); the tool on a
    // link created beforehand (device and peers only). Fresh interfaces every round.
    let (mut ours, mut tool, mut dg) = (Vec::new(), Vec::new(), Vec::new());
    let mut dg_if = String::new();
    let mut messages = 0;
    let mut backend = None;
    let mut conf = None;
    let mut conf_dg = None;
    let mut tool_if = String::new();
    let mut order = Vec::new();
    for round in 0..rounds {
        let port = 41000 + 2 * round as u16;
        let mut round_want = want.clone();
        round_want.interface.listen_port = port;
        let mut b = KernelBackend::new(&format!("ghb{round}"))?;
        tool_if = format!("ght{round}");
        let c = wg_config(&want, port + 1)?;
        let path = c.path().to_str().unwrap_or_default().to_owned();
        sh("ip", &["link", "add", &tool_if, "type", "wireguard"])?;
        // The order alternates (even rounds gatehouse first, odd rounds `wg` first): the
        // second of a round runs beside the first one's kernel aftermath (peers' timers, the
        // memory it took), which would otherwise always weigh on the same side.
        let gatehouse_first = round % 2 == 0;
        let mut ours_cold = || -> anyhow::Result<()> {
            ours.push(time(|| converge(&mut b, &round_want))?);
            progress("cold apply", ours[ours.len() - 1]);
            Ok(())
        };
        let mut tool_cold = || -> anyhow::Result<()> {
            tool.push(time(|| sh("wg", &["setconf", &tool_if, &path]))?);
            progress("wg setconf", tool[tool.len() - 1]);
            Ok(())
        };
        if gatehouse_first {
            ours_cold()?;
            tool_cold()?;
        } else {
            tool_cold()?;
            ours_cold()?;
        }
        order.push(if gatehouse_first {
            "gatehouse first"
        } else {
            "wg first"
        });
        messages = b.counters().device_writes;
        backend = Some((b, round_want));
        if let Some(helper) = &helper {
            dg_if = format!("ghd{round}");
            let c = wg_config(&want, 42000 + round as u16)?;
            let path = c.path().to_str().unwrap_or_default().to_owned();
            let mut args = vec!["cold", &dg_if, &path, &mtu];
            args.extend(addresses.iter().map(String::as_str));
            dg.push(defguard(helper, &args)?);
            progress("defguard cold", dg[dg.len() - 1]);
            conf_dg = Some((c, path));
        }
        conf = Some((c, path));
    }
    let (mut backend, want) = backend.ok_or_else(|| anyhow::anyhow!("no rounds"))?;
    let (_conf, conf_path) = conf.ok_or_else(|| anyhow::anyhow!("no rounds"))?;
    let ratios: Vec<f64> = ours
        .iter()
        .zip(&tool)
        .map(|(o, t)| o.as_secs_f64() / t.as_secs_f64())
        .collect();
    let cold_rounds: Vec<String> = ratios
        .iter()
        .zip(&order)
        .map(|(r, first)| format!("{r:.2} ({first})"))
        .collect();
    // The rounds are paired (both sides close in time): under a host load that drifts
    // during the run, the median of the per-round ratios is the figure to read.
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ratio = sorted[sorted.len() / 2];
    let cold = spread(ours);
    let messages_cold = messages;
    rows.push(Row {
        what: format!("cold apply, {n} peers"),
        ours: cold,
        messages,
        tool: spread(tool),
        tool_cmd: "`wg setconf` (same config, link pre-created)",
        defguard: (!dg.is_empty()).then(|| spread(dg)),
    });

    // No-op snapshot: observe + plan + apply of the state the kernel already has.
    let (mut ours, mut tool) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let before = backend.counters();
        ours.push(time(|| converge(&mut backend, &want))?);
        anyhow::ensure!(backend.counters() == before, "no-op snapshot wrote");
        progress("no-op snapshot", ours[ours.len() - 1]);
        tool.push(time(|| sh("wg", &["syncconf", &tool_if, &conf_path]))?);
        progress("wg syncconf", tool[tool.len() - 1]);
    }
    let noop = spread(ours);
    rows.push(Row {
        what: format!("no-op snapshot, {n} peers (observe+plan+apply)"),
        ours: noop,
        messages: 0,
        tool: spread(tool),
        tool_cmd: "`wg syncconf` (same config)",
        defguard: None,
    });

    // One peer changed (its keepalive toggled).
    let key = *want
        .peers
        .keys()
        .nth(peers / 2)
        .unwrap_or_else(|| unreachable!());
    let (mut ours, mut ours_apply, mut tool) = (Vec::new(), Vec::new(), Vec::new());
    let mut dg = Vec::new();
    let mut changed = want.clone();
    for round in 0..rounds {
        let keepalive = if round % 2 == 0 { 25 } else { 0 };
        if let Some(p) = changed.peers.get_mut(&key) {
            std::sync::Arc::make_mut(p).persistent_keepalive = keepalive;
        }
        ours.push(time(|| converge(&mut backend, &changed))?);
        // Apply only: the plan made against an observation taken before.
        let observed = backend.observe()?;
        if let Some(p) = changed.peers.get_mut(&key) {
            std::sync::Arc::make_mut(p).persistent_keepalive = 25 - keepalive;
        }
        let p = plan(&changed, &observed);
        anyhow::ensure!(p.len() == 1, "one-peer plan has {} steps", p.len());
        ours_apply.push(time(|| Ok(backend.apply(&p)?))?);
        progress("one peer", ours[ours.len() - 1]);
        let k = key.to_base64();
        tool.push(time(|| {
            sh(
                "wg",
                &[
                    "set",
                    &tool_if,
                    "peer",
                    &k,
                    "persistent-keepalive",
                    &keepalive.to_string(),
                ],
            )
        })?);
        if let (Some(helper), Some((_, path))) = (&helper, &conf_dg) {
            let ka = keepalive.to_string();
            dg.push(defguard(helper, &["one", &dg_if, path, &k, &ka])?);
        }
    }
    let tool_one = spread(tool);
    let dg_one = (!dg.is_empty()).then(|| spread(dg));
    rows.push(Row {
        what: format!("one peer changed at {n} (observe+plan+apply)"),
        ours: spread(ours),
        messages: 1,
        tool: tool_one,
        tool_cmd: "`wg set <if> peer <key> persistent-keepalive N`",
        defguard: dg_one,
    });
    rows.push(Row {
        what: format!("one peer changed at {n} (apply of a known plan)"),
        ours: spread(ours_apply),
        messages: 1,
        tool: tool_one,
        tool_cmd: "`wg set <if> peer <key> persistent-keepalive N`",
        defguard: dg_one,
    });

    println!("| scenario | gatehouse, median (min–max) | messages | wg tool, median (min–max) | tool command | gatehouse / tool | defguard_wireguard_rs, median (min–max) | gatehouse / defguard |");
    println!("|---|---:|---:|---:|---|---:|---:|---:|");
    for r in rows {
        let (dg, dg_ratio) = match r.defguard {
            Some(d) => (
                show(d),
                format!(
                    "{:.2}",
                    r.ours.median.as_secs_f64() / d.median.as_secs_f64()
                ),
            ),
            None => ("–".into(), "–".into()),
        };
        println!(
            "| {} | {} | {} | {} | {} | {:.2} | {dg} | {dg_ratio} |",
            r.what,
            show(r.ours),
            r.messages,
            show(r.tool),
            r.tool_cmd,
            r.ours.median.as_secs_f64() / r.tool.median.as_secs_f64()
        );
    }
    println!(
        "\ncold apply, gatehouse / `wg setconf` per round, in order: {}; median of the \
         per-round ratios {median_ratio:.2} ({:.2}–{:.2})",
        cold_rounds.join(", "),
        sorted[0],
        sorted[sorted.len() - 1]
    );
    println!(
        "cold apply, what each side includes: gatehouse = observe (the interface is absent) + \
         plan + link create, MTU, {} addresses, up (rtnetlink) + device and peers \
         ({messages_cold} netlink messages, each waiting for its ACK); `wg setconf` = process \
         start, reading and parsing the config file, device and peers on a link created \
         beforehand (untimed); defguard = its helper's library calls only (process start \
         excluded)",
        addresses.len()
    );
    println!(
        "no-op snapshot / cold apply (medians): {:.1}%",
        100.0 * noop.median.as_secs_f64() / cold.median.as_secs_f64()
    );
    println!(
        "median of {rounds} rounds, {peers} peers; kernel {}",
        kernel_release()
    );
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
