//! How long the gateway has been without the Core, for the offline policy and readiness.
//!
//! Within a run the time is counted on the monotonic clock, so a wall-clock step (NTP, an
//! operator's `date`) neither hastens nor postpones the policy. Across restarts it is kept
//! in the state file (the time counted at the last save, and the wall time of that save),
//! so a restart loop does not start the count over; the time the agent was stopped is
//! added from the wall clock, never negative (a clock set back adds nothing). Pure: both
//! clocks are passed in.

use std::time::{Duration, SystemTime};

/// Time without the Core.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OfflineClock {
    /// Time without the Core counted before `since` (earlier runs, the agent stopped).
    banked: Duration,
    /// Since when (monotonic) this run has been without the Core; None while connected.
    since: Option<Duration>,
}

impl OfflineClock {
    /// The clock at start: without the Core from `now` on, after `saved` counted by the
    /// run that wrote the state file at wall time `saved_at`. With no count saved (a state
    /// file of an older release), the wall time since `last_contact` is used.
    pub fn restore(
        saved: Option<Duration>,
        saved_at: Option<SystemTime>,
        last_contact: Option<SystemTime>,
        wall: SystemTime,
        now: Duration,
    ) -> Self {
        let since_wall = |t: SystemTime| wall.duration_since(t).unwrap_or_default();
        let banked = match (saved, saved_at) {
            (Some(saved), Some(at)) => saved.saturating_add(since_wall(at)),
            (Some(saved), None) => saved,
            (None, _) => last_contact.map(since_wall).unwrap_or_default(),
        };
        OfflineClock {
            banked,
            since: Some(now),
        }
    }

    /// The Core is connected: the count is over.
    pub fn connected(&mut self) {
        *self = OfflineClock::default();
    }

    /// The Core is unreachable from `now` on (no change when it already was).
    pub fn disconnected(&mut self, now: Duration) {
        if self.since.is_none() {
            self.since = Some(now);
        }
    }

    /// How long the gateway has been without the Core at `now`; zero while connected.
    pub fn offline_for(&self, now: Duration) -> Duration {
        match self.since {
            Some(since) => self.banked.saturating_add(now.saturating_sub(since)),
            None => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn counted_on_the_monotonic_clock_whatever_the_wall_clock_does() {
        let wall = SystemTime::UNIX_EPOCH + 1_000_000 * S;
        let mut c = OfflineClock::restore(None, None, None, wall, 5 * S);
        assert_eq!(c.offline_for(65 * S), 60 * S);
        // No wall time is read within a run: a step of the wall clock changes nothing.
        c.disconnected(70 * S);
        assert_eq!(c.offline_for(125 * S), 120 * S);
        c.connected();
        assert_eq!(c.offline_for(130 * S), Duration::ZERO);
        c.disconnected(200 * S);
        assert_eq!(c.offline_for(230 * S), 30 * S);
    }

    #[test]
    fn a_restart_loop_keeps_counting() {
        let mut wall = SystemTime::UNIX_EPOCH + 1_000_000 * S;
        let mut saved = None;
        let mut saved_at = None;
        // Ten runs of 10 s each, 1 s apart, each saving just before it ends.
        for _ in 0..10 {
            let c = OfflineClock::restore(saved, saved_at, None, wall, Duration::ZERO);
            saved = Some(c.offline_for(10 * S));
            saved_at = Some(wall + 10 * S);
            wall += 11 * S;
        }
        // All 110 s count: the runs and the gaps between them.
        let c = OfflineClock::restore(saved, saved_at, None, wall, Duration::ZERO);
        assert_eq!(c.offline_for(Duration::ZERO), 110 * S);
    }

    #[test]
    fn the_time_stopped_counts_but_a_clock_set_back_adds_nothing() {
        let at = SystemTime::UNIX_EPOCH + 1_000_000 * S;
        let later = OfflineClock::restore(Some(30 * S), Some(at), None, at + 3600 * S, S);
        assert_eq!(later.offline_for(S), 3630 * S);
        let set_back = OfflineClock::restore(Some(30 * S), Some(at), None, at - 3600 * S, S);
        assert_eq!(set_back.offline_for(S), 30 * S);
        // A state file of an older release: the wall time since the last contact.
        let old = OfflineClock::restore(None, None, Some(at), at + 90 * S, S);
        assert_eq!(old.offline_for(11 * S), 100 * S);
    }
}
