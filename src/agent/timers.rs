//! Whether the event loop meets its timer deadlines (MFA expiry, stats, resync, which also
//! runs the offline policy). Each timer reports when it was due and when it ran; one that
//! runs more than [`LATE_AFTER`] late is a missed deadline, counted and shown in
//! `/status`, `/metrics` and `/readyz`. Pure: the loop passes the lateness and the time.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// A timer running later than this after its deadline has missed it. Generous: the loop
/// does bounded pieces of work between timers (one apply of a large location can take a
/// second or two), so a miss means it was starved.
pub const LATE_AFTER: Duration = Duration::from_secs(5);

/// The event loop's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    Mfa,
    Stats,
    Resync,
}

/// What the timers did since start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerStats {
    pub mfa_checks: u64,
    pub stats_ticks: u64,
    pub resyncs: u64,
    /// Timer runs later than [`LATE_AFTER`] after their deadline.
    pub missed_deadlines: u64,
    /// The latest any timer ran after its deadline (ms).
    pub max_lateness_ms: u64,
    /// When a deadline was last missed (unix ms).
    pub last_missed_unix_ms: Option<i64>,
}

/// The loop's record of its timers.
#[derive(Clone, Debug, Default)]
pub struct Timers {
    pub stats: TimerStats,
    /// When (monotonic) a deadline was last missed.
    pub last_missed: Option<Duration>,
}

impl Timers {
    /// Records that `timer` runs `late` after its deadline, at monotonic time `now` (wall
    /// time `wall`, for display). Returns true when that is a missed deadline.
    pub fn ran(&mut self, timer: Timer, late: Duration, now: Duration, wall: SystemTime) -> bool {
        let s = &mut self.stats;
        match timer {
            Timer::Mfa => s.mfa_checks += 1,
            Timer::Stats => s.stats_ticks += 1,
            Timer::Resync => s.resyncs += 1,
        }
        s.max_lateness_ms = s.max_lateness_ms.max(late.as_millis() as u64);
        if late <= LATE_AFTER {
            return false;
        }
        s.missed_deadlines += 1;
        s.last_missed_unix_ms = Some(super::status::unix_ms(wall));
        self.last_missed = Some(now);
        true
    }

    /// How long ago (at monotonic `now`) a deadline was last missed.
    pub fn missed_ago(&self, now: Duration) -> Option<Duration> {
        self.last_missed.map(|at| now.saturating_sub(at))
    }
}

/// The periodic timers' deadlines (stats and resync), served earliest deadline first.
///
/// A timer whose work outlasts its period is due again as soon as it ran; with a fixed
/// order among ready timers it would run forever and the one after it never (a read of a
/// large interface longer than `stats_interval` starved the resync). Served by deadline,
/// every due timer runs within one turn of the others: after running, a timer's next
/// deadline is one period after it ran, later than the deadline of any timer that was
/// already waiting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Periodic {
    stats: (Duration, Duration),
    resync: (Duration, Duration),
}

impl Periodic {
    /// Both timers first due one period after `now` (monotonic).
    pub fn new(now: Duration, stats_every: Duration, resync_every: Duration) -> Self {
        Periodic {
            stats: (now + stats_every, stats_every),
            resync: (now + resync_every, resync_every),
        }
    }

    /// The next timer to serve and its deadline: the earliest; a tie goes to the resync
    /// (the rarer one).
    pub fn next(&self) -> (Timer, Duration) {
        if self.resync.0 <= self.stats.0 {
            (Timer::Resync, self.resync.0)
        } else {
            (Timer::Stats, self.stats.0)
        }
    }

    /// `timer` ran at `now`: it is due one period later (a late run is not caught up with
    /// a burst).
    pub fn ran(&mut self, timer: Timer, now: Duration) {
        match timer {
            Timer::Stats => self.stats.0 = now + self.stats.1,
            Timer::Resync => self.resync.0 = now + self.resync.1,
            Timer::Mfa => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves the timers for `until` with each run of a timer taking `work(timer)`; returns
    /// the times each timer ran.
    fn simulate(
        mut p: Periodic,
        until: Duration,
        work: impl Fn(Timer) -> Duration,
    ) -> (Vec<Duration>, Vec<Duration>) {
        let (mut now, mut stats, mut resyncs) = (Duration::ZERO, vec![], vec![]);
        while now < until {
            let (timer, at) = p.next();
            now = now.max(at);
            match timer {
                Timer::Stats => stats.push(now),
                _ => resyncs.push(now),
            }
            now += work(timer);
            p.ran(timer, now);
        }
        (stats, resyncs)
    }

    #[test]
    fn a_stats_read_longer_than_its_interval_does_not_starve_the_resync() {
        let s = Duration::from_secs;
        // stats every 1 s, each read 1.5 s (a huge interface); resync every 60 s.
        let p = Periodic::new(Duration::ZERO, s(1), s(60));
        let (stats, resyncs) = simulate(p, s(600), |t| match t {
            Timer::Stats => Duration::from_millis(1500),
            _ => s(2),
        });
        assert!(resyncs.len() >= 9, "resyncs in 600 s: {resyncs:?}");
        for pair in resyncs.windows(2) {
            // One period plus at most one stats read and the resync's own work.
            assert!(pair[1] - pair[0] <= s(60) + s(4), "resync gap: {pair:?}");
        }
        assert!(stats.len() > 200);
    }

    #[test]
    fn timers_run_on_their_period_when_idle_and_ties_go_to_the_resync() {
        let s = Duration::from_secs;
        let mut p = Periodic::new(s(0), s(30), s(60));
        assert_eq!(p.next(), (Timer::Stats, s(30)));
        p.ran(Timer::Stats, s(30));
        assert_eq!(p.next(), (Timer::Resync, s(60)));
        p.ran(Timer::Resync, s(60));
        assert_eq!(p.next(), (Timer::Stats, s(60)));
        p.ran(Timer::Stats, s(61));
        assert_eq!(p.next(), (Timer::Stats, s(91)));
    }

    #[test]
    fn a_late_run_is_a_missed_deadline() {
        let mut t = Timers::default();
        let (now, wall) = (Duration::from_secs(100), SystemTime::now());
        assert!(!t.ran(Timer::Stats, Duration::from_millis(300), now, wall));
        assert!(!t.ran(Timer::Mfa, LATE_AFTER, now, wall));
        assert_eq!(t.missed_ago(now), None);
        assert!(t.ran(
            Timer::Resync,
            LATE_AFTER + Duration::from_millis(1),
            now,
            wall
        ));
        assert_eq!(
            (t.stats.stats_ticks, t.stats.mfa_checks, t.stats.resyncs),
            (1, 1, 1)
        );
        assert_eq!(t.stats.missed_deadlines, 1);
        assert_eq!(
            t.missed_ago(now + Duration::from_secs(7)),
            Some(Duration::from_secs(7))
        );
        assert_eq!(t.stats.max_lateness_ms, 5001);
    }
}
