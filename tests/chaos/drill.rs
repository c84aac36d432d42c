//! The chaos drill's run (issue 13), shared by the userspace drill in namespaces
//! (`tests/e2e_chaos.rs`) and its shorter kernel variant in the VM (`tests/vm_chaos.rs`):
//! the world built, the seeded schedule played at its times, then the end checks. The
//! seed comes from `GATEHOUSE_CHAOS_SEED` (else the clock) and the number of crashes from
//! `GATEHOUSE_CHAOS_CRASHES` (else the caller's default); both are printed first, so a
//! failing run replays.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::checks::{ping_figures, PingFigures};
use super::schedule::{self, gateway_label, Act, Setting, Target, GATEWAYS};
use super::timeline::Answer;
use super::{eventually, Backend, World, MFA_THRESHOLD, RESYNC, WAIT};

/// The share of a client's pings that may go unanswered over the schedule.
pub const LOSS_TOLERANCE: f64 = 0.01;
/// The ping interval of the clients (seconds).
pub const PING_INTERVAL: f64 = 0.1;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Runs one drill with `backend`, `default_crashes` crashes unless the environment says.
pub fn run(tag: &str, backend: Backend, default_crashes: usize) {
    let crashes = env_u64("GATEHOUSE_CHAOS_CRASHES").unwrap_or(default_crashes as u64) as usize;
    let seed = env_u64("GATEHOUSE_CHAOS_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let setting = Setting::with_crashes(crashes);
    let plan = schedule::plan(seed, setting);
    eprintln!(
        "chaos drill ({backend:?}): seed {seed}, {crashes} crashes over {:?}, {} steps \
         (replay: GATEHOUSE_CHAOS_SEED={seed} GATEHOUSE_CHAOS_CRASHES={crashes})",
        setting.length,
        plan.len()
    );
    super::run(tag, async |core_ns| {
        let started = Instant::now();
        let mut world = World::start(tag, core_ns, seed, backend).await;
        let setup = started.elapsed();

        // The schedule, each step at its time (late when an earlier one took long).
        let t0 = Instant::now();
        let from = now_unix();
        world.timeline.start = Some(t0);
        let mut late = Duration::ZERO;
        for step in &plan {
            let due = t0 + step.at;
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            } else {
                late = late.max(now - due);
            }
            world.act(step.act).await;
        }
        let to = now_unix();
        let schedule_took = t0.elapsed();
        world.timeline.note("schedule done");

        // Pings over the schedule, per client.
        let mut figures: Vec<PingFigures> = vec![];
        for (gw, p) in world.pingers.iter().enumerate() {
            let answers: Vec<Answer> = p.answers();
            let f = ping_figures(&answers, from, to, PING_INTERVAL);
            eprintln!(
                "figure: client {}: {} pings, {} lost, longest gap {:.2} s",
                gateway_label(gw),
                f.sent,
                f.lost,
                f.longest_gap
            );
            figures.push(f);
        }

        // Every churn MFA session ends (no client holds one), then the kernels converge.
        let t = Instant::now();
        eventually(
            "every churn MFA session ended",
            MFA_THRESHOLD + WAIT,
            || async { world.churn_sessions_ended().await },
        )
        .await;
        world.timeline.note("every churn session ended");
        eventually("every kernel equals its desired state", WAIT, || async {
            world.kernels_equal_desired().await
        })
        .await;
        // Still equal after one more resync interval (no repair undoes another).
        tokio::time::sleep(RESYNC).await;
        eventually(
            "every kernel still equals its desired state",
            RESYNC * 2,
            || async { world.kernels_equal_desired().await },
        )
        .await;
        let converged = t.elapsed();
        world.timeline.note("kernels equal the desired state");

        let (events, expired) = world.events_once().await.unwrap_or_else(|e| panic!("{e}"));

        // Counters: traffic stopped, then the Core's totals catch up with the kernels.
        world.pingers.clear();
        let bytes = eventually(
            "the Core's totals equal the kernels' counters",
            WAIT,
            || async { world.stats_equal_kernels().await },
        )
        .await;

        let crashes_done = plan
            .iter()
            .filter(|s| matches!(s.act, Act::Kill(_)))
            .count();
        let core_crashes = plan
            .iter()
            .filter(|s| s.act == Act::Kill(Target::Core))
            .count();
        eprintln!(
            "figure: chaos {backend:?} seed {seed}: {crashes_done} crashes ({core_crashes} of the Core), \
             schedule {:.1} s (late by at most {:.2} s), setup {:.1} s, converged {:.1} s \
             after it, {events} expiry events for {expired} sessions, {bytes} bytes compared; \
             admin done {:?}, refused or unanswered {:?}",
            schedule_took.as_secs_f64(),
            late.as_secs_f64(),
            setup.as_secs_f64(),
            converged.as_secs_f64(),
            world.model.done,
            world.model.failed,
        );
        for (gw, f) in figures.iter().enumerate() {
            assert!(
                (f.lost as f64) <= LOSS_TOLERANCE * f.sent as f64,
                "client {} lost {} of {} pings (tolerance {LOSS_TOLERANCE})",
                gateway_label(gw),
                f.lost,
                f.sent
            );
        }
        assert_eq!(crashes_done, crashes);
        assert_eq!(figures.len(), GATEWAYS);
    });
}
