//! A failed apply is retried with backoff (`src/agent/machine/retry.rs`), on virtual time
//! (`machine_sim`, the memory backend with injected failures): the retry comes at the
//! backoff's times (each delay between half the ceiling and the ceiling: 250 ms doubling
//! to a quarter of the resync interval, 2.5 s here), long before the resync (10 s here);
//! a success resets it; a permanent failure keeps retrying at the ceiling with one log line
//! for the whole failure; nothing is retried when nothing failed (peers refused for the
//! backend's limit are not a failure).

#[allow(dead_code)]
#[path = "machine_sim/mod.rs"]
mod machine_sim;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse::agent::machine::Machine;
use gatehouse::backend::PeerLimit;
use gatehouse::plan::Phase;
use machine_sim::*;

const MS: fn(u64) -> Duration = Duration::from_millis;

/// The tests of this file run one at a time: a log line's callsite first reached on
/// another thread, while the capturing subscriber of the log test was being set, could be
/// cached as of interest to nobody (tracing's per-callsite cache is process-wide).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A machine connected to a Core holding `peers`, applied.
fn synced(peers: &[u8]) -> Sim {
    synced_with(settings(), peers)
}

fn synced_with(settings: gatehouse::agent::Settings, peers: &[u8]) -> Sim {
    let mut sim = Sim::new(settings);
    sim.core.publish(location(
        peers.iter().map(|n| peer(*n, 100 + *n as u64)).collect(),
        None,
    ));
    sim.start();
    sim.connect();
    assert_eq!(sim.status.applied_revision, sim.core.revision);
    sim
}

/// The Core's next revision leaves peer `n` out.
fn revoke(sim: &mut Sim, n: u8) {
    let mut loc = sim.core.location.clone().unwrap();
    loc.peers.retain(|p| p.id != n as u64);
    sim.core.publish(loc);
    sim.deliver();
}

/// Serves the machine's deadlines one by one until it applies again; the time of that
/// apply. Panics past `limit` of virtual time.
fn next_apply(sim: &mut Sim, limit: Duration) -> Duration {
    let end = sim.clock + limit;
    loop {
        let applies = sim.count_since(0, "apply");
        let at = sim.machine.poll_timeout().at + sim.started_at;
        assert!(at <= end, "no apply within {limit:?}: {:?}", sim.trace);
        sim.advance(at - sim.clock);
        if sim.count_since(0, "apply") > applies {
            return sim.clock;
        }
    }
}

/// `gap` is a delay of the backoff whose ceiling is `ceiling`.
fn within(gap: Duration, ceiling: Duration) -> bool {
    gap >= ceiling / 2 && gap <= ceiling
}

#[test]
fn a_removal_that_fails_twice_is_applied_at_the_third_attempt_at_the_backoffs_times() {
    let _serial = one_at_a_time();
    let mut sim = synced(&[1, 2]);
    sim.kernel.fail_phase(Phase::PeerRemovals, "ENOBUFS");
    let t0 = sim.clock;
    revoke(&mut sim, 2);
    assert!(sim.has(key(2)), "the first attempt failed");
    assert!(sim.core.applied.last().unwrap().error.is_some());
    let retry = sim.status.apply_retry.clone().expect("a retry pending");
    assert_eq!(retry.attempts, 1);
    assert!(retry.error.contains("ENOBUFS"), "{retry:?}");
    assert!(within(MS(retry.next_in_ms), MS(250)), "{retry:?}");

    let t1 = next_apply(&mut sim, 10 * S);
    assert!(
        within(t1 - t0, MS(250)),
        "second attempt after {:?}",
        t1 - t0
    );
    assert!(sim.has(key(2)), "the second attempt failed");
    assert_eq!(sim.status.apply_retry.as_ref().unwrap().attempts, 2);

    sim.kernel.clear_faults();
    let t2 = next_apply(&mut sim, 10 * S);
    assert!(
        within(t2 - t1, MS(500)),
        "third attempt after {:?}",
        t2 - t1
    );
    assert!(!sim.has(key(2)), "the third attempt removes the peer");
    assert!(t2 - t0 < S, "applied at {:?}, not at the resync", t2 - t0);
    assert_eq!(sim.status.apply_retry, None);
    assert_eq!(sim.status.failed_steps, Vec::<String>::new());
    // The Core learns that its revision is applied.
    let last = sim.core.applied.last().unwrap();
    assert_eq!(
        (last.revision, last.error.is_none()),
        (sim.core.revision, true)
    );
    assert_eq!(sim.status.applied_revision, sim.core.revision);
}

#[test]
fn a_success_resets_the_backoff() {
    let _serial = one_at_a_time();
    let mut sim = synced(&[1, 2, 3]);
    sim.kernel.fail_phase(Phase::PeerRemovals, "EAGAIN");
    revoke(&mut sim, 2);
    let mut last = sim.clock;
    // Four failed attempts: the next delay's ceiling is 2 s.
    for _ in 0..3 {
        last = next_apply(&mut sim, 10 * S);
    }
    assert_eq!(sim.status.apply_retry.as_ref().unwrap().attempts, 4);
    sim.kernel.clear_faults();
    let done = next_apply(&mut sim, 10 * S);
    assert!(within(done - last, 2 * S), "{:?}", done - last);
    assert!(!sim.has(key(2)));
    assert_eq!(sim.status.apply_retry, None);

    // A new failure starts again from the base.
    sim.kernel.fail_phase(Phase::PeerRemovals, "EAGAIN");
    let t0 = sim.clock;
    revoke(&mut sim, 3);
    let retry = sim.status.apply_retry.clone().expect("a retry pending");
    assert_eq!(retry.attempts, 1);
    assert!(within(MS(retry.next_in_ms), MS(250)), "{retry:?}");
    let t1 = next_apply(&mut sim, 10 * S);
    assert!(within(t1 - t0, MS(250)), "{:?}", t1 - t0);
}

#[test]
fn a_failing_firewall_step_is_retried_without_holding_back_the_peers_or_reading() {
    let _serial = one_at_a_time();
    // The firewall on: with it off its step is a clean-up that cannot fail.
    let mut on = settings();
    on.firewall.enabled = true;
    let mut sim = synced_with(on, &[1, 2]);
    sim.fail_firewall = Some("nft: Device or resource busy".into());
    let t0 = sim.clock;
    revoke(&mut sim, 2);
    assert!(!sim.has(key(2)), "the removal is not held back");
    let retry = sim.status.apply_retry.clone().expect("a retry pending");
    assert!(retry.error.contains("firewall: nft"), "{retry:?}");

    let from = sim.trace.len();
    let t1 = next_firewall(&mut sim, 10 * S);
    assert!(within(t1 - t0, MS(250)), "{:?}", t1 - t0);
    // The peers' model is known (their steps succeeded): nothing to read or apply.
    assert_eq!(sim.count_since(from, "read"), 0, "{:?}", &sim.trace[from..]);
    assert_eq!(
        sim.count_since(from, "apply"),
        0,
        "{:?}",
        &sim.trace[from..]
    );
    sim.fail_firewall = None;
    let t2 = next_firewall(&mut sim, 10 * S);
    assert!(within(t2 - t1, MS(500)), "{:?}", t2 - t1);
    assert_eq!(sim.status.apply_retry, None);
    assert_eq!(sim.status.failed_steps, Vec::<String>::new());
    let last = sim.core.applied.last().unwrap();
    assert_eq!(
        (last.revision, last.error.is_none()),
        (sim.core.revision, true)
    );
}

/// [`next_apply`] for the firewall step.
fn next_firewall(sim: &mut Sim, limit: Duration) -> Duration {
    let end = sim.clock + limit;
    loop {
        let runs = sim.count_since(0, "firewall");
        let at = sim.machine.poll_timeout().at + sim.started_at;
        assert!(
            at <= end,
            "no firewall step within {limit:?}: {:?}",
            sim.trace
        );
        sim.advance(at - sim.clock);
        if sim.count_since(0, "firewall") > runs {
            return sim.clock;
        }
    }
}

/// Log lines at INFO and above, written by the tracing subscriber set for this thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

#[test]
fn a_permanent_failure_retries_at_the_ceiling_and_logs_once() {
    let _serial = one_at_a_time();
    let mut sim = synced(&[1, 2]);
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    sim.kernel.fail_phase(Phase::PeerRemovals, "EAGAIN");
    let start = sim.clock;
    revoke(&mut sim, 2);
    let logged_at_start = logs.lines().len();
    let mut times = vec![start];
    while sim.clock < start + 60 * S {
        times.push(next_apply(&mut sim, 10 * S));
    }
    assert!(sim.has(key(2)), "the fault stands");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // Never longer than the ceiling (2.5 s); at the ceiling after the ramp (the resync
    // every 10 s is an attempt too, and may come sooner).
    assert!(gaps.iter().all(|g| *g <= MS(2500)), "{gaps:?}");
    let at_ceiling = gaps[4..].iter().filter(|g| within(**g, MS(2500))).count();
    assert!(at_ceiling * 10 >= (gaps.len() - 4) * 7, "{gaps:?}");
    assert!(gaps.len() >= 24, "{} attempts in 60 s", gaps.len());
    assert_eq!(
        sim.status.apply_retry.as_ref().unwrap().attempts as usize,
        times.len(),
        "every attempt counted"
    );
    // The failure was logged when it started; the attempts since, not at all.
    let lines = logs.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("apply failed; retrying with backoff")),
        "{lines:#?}"
    );
    assert_eq!(lines.len(), logged_at_start, "{lines:#?}");

    // The fault ends: one line says so.
    sim.kernel.clear_faults();
    next_apply(&mut sim, 10 * S);
    assert!(!sim.has(key(2)));
    let lines = logs.lines();
    assert!(
        lines[logged_at_start..]
            .iter()
            .any(|l| l.contains("apply succeeded after failed attempts")),
        "{lines:#?}"
    );
}

#[test]
fn no_retry_when_nothing_failed_nor_for_peers_beyond_the_limit() {
    let _serial = one_at_a_time();
    let limit = PeerLimit {
        max: 3,
        backend: "the test backend",
    };
    let mut sim = Sim::new(settings());
    sim.kernel.set_peer_limit(Some(limit));
    let now = sim.now();
    sim.machine = Machine::new(
        settings(),
        "gw-sim".into(),
        Some(limit),
        None,
        vec![],
        1,
        now,
    );
    sim.core
        .publish(location((1..=5).map(|n| peer(n, n as u64)).collect(), None));
    sim.start();
    sim.connect();
    assert_eq!(sim.status.failed_steps.len(), 1, "the refusal is reported");
    assert_eq!(sim.status.apply_retry, None, "a refusal is not retried");
    // Until the resync: the stats ticks alone (a read each), no reconcile.
    let from = sim.trace.len();
    sim.advance(9 * S);
    assert_eq!(
        sim.count_since(from, "apply"),
        0,
        "{:?}",
        &sim.trace[from..]
    );
    assert_eq!(
        sim.count_since(from, "read"),
        sim.count_since(from, "read stats"),
        "{:?}",
        &sim.trace[from..]
    );

    // A change that applies: nothing pending either.
    revoke(&mut sim, 1);
    assert!(!sim.has(key(1)));
    assert_eq!(sim.status.apply_retry, None);
    let from = sim.trace.len();
    sim.advance(S / 2);
    assert_eq!(
        sim.count_since(from, "apply"),
        0,
        "{:?}",
        &sim.trace[from..]
    );
}

/// A resync whose read fails gives the old model back: the retry reads the interface
/// first, so what the read was for (a stranger added by hand) is repaired at the retry,
/// not a resync later.
#[test]
fn a_retry_after_a_failed_read_reads_the_interface() {
    let _serial = one_at_a_time();
    let mut sim = synced(&[1, 2]);
    let resync = sim.settings.resync_interval;
    sim.kernel.modify(|o| {
        let mut p = o.device.peers[&key(2)].clone();
        std::sync::Arc::make_mut(&mut p.config).public_key = key(77);
        std::sync::Arc::make_mut(&mut p.config).allowed_ips =
            ["10.77.0.50/32".parse().unwrap()].into();
        o.device.peers.insert(key(77), p);
    });
    sim.fail_reads = true;
    // Up to the resync's failed read (a tick's failed read schedules nothing).
    let end = sim.clock + 2 * resync;
    while sim.status.apply_retry.is_none() {
        let at = sim.machine.poll_timeout().at + sim.started_at;
        assert!(at <= end, "no retry after the resync's failed read");
        sim.advance(at - sim.clock);
    }
    let retry = sim.status.apply_retry.clone().expect("a retry pending");
    assert!(retry.error.contains("cannot read"), "{retry:?}");
    sim.fail_reads = false;
    let t0 = sim.clock;
    let from = sim.trace.len();
    let t1 = next_apply(&mut sim, resync / 2);
    assert!(
        sim.count_since(from, "read") >= 1,
        "{:?}",
        &sim.trace[from..]
    );
    assert!(
        !sim.has(key(77)),
        "the stranger stays until the next resync"
    );
    assert!(t1 - t0 < resync / 2, "{:?}", t1 - t0);
    assert_eq!(sim.status.apply_retry, None);
}
