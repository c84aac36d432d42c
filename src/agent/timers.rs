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

#[cfg(test)]
mod tests {
    use super::*;

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
