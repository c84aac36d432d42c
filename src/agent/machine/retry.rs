//! The retry of a failed apply. A reconcile whose peer steps, firewall step or read failed
//! runs again (the same level-triggered reconcile: the interface read when the model is
//! unknown, a full plan, the apply, the firewall step) after a backoff: [`RETRY_BASE`]
//! doubling to a ceiling well below the resync interval (a quarter of it, at most
//! [`RETRY_MAX`]), each delay between half the ceiling and the ceiling ("equal jitter": the
//! doubling holds, and no two failures retry in lockstep). Any reconcile that succeeds ends
//! it; peers refused for the backend's limit are not a failure (planning again refuses them
//! again). The resync still runs on its own period.
//!
//! Pure: the deadline is monotonic time, the jitter a number in `[0, 1)` the machine draws
//! from its seeded generator. Logged once per state change (failing, another error,
//! recovered); each attempt alone at DEBUG.

use std::time::Duration;

use rand::Rng as _;
use tracing::{debug, info, warn};

use super::Machine;
use crate::agent::status::ApplyRetry;
use crate::backoff::Backoff;

/// The first retry's ceiling.
pub const RETRY_BASE: Duration = Duration::from_millis(250);
/// The largest ceiling, whatever the resync interval.
pub const RETRY_MAX: Duration = Duration::from_secs(15);

/// What a reconcile's result changed in the retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The first failure after a success.
    Failing,
    /// Failing again, with another error than the last attempt's.
    Changed,
    /// Failing again with the same error.
    Same,
    /// A success after this many failed attempts.
    Recovered(u32),
    /// A success after a success.
    Fine,
}

/// The pending retry of a failed apply.
#[derive(Clone, Debug)]
pub struct Retry {
    backoff: Backoff,
    /// Failed reconciles in a row.
    attempts: u32,
    /// When the next attempt is due (monotonic); None: none pending.
    due: Option<Duration>,
    /// The last attempt's error.
    error: Option<String>,
    /// The last attempt's read of the interface failed: the next one reads first (a failed
    /// read gives the old model back, and planning on it would not see what the read was
    /// for).
    read_failed: bool,
}

impl Retry {
    /// The retry for a machine that resyncs every `resync`.
    pub fn new(resync: Duration) -> Self {
        let ceiling = (resync / 4).min(RETRY_MAX).max(RETRY_BASE);
        Retry {
            backoff: Backoff::new(RETRY_BASE, ceiling),
            attempts: 0,
            due: None,
            error: None,
            read_failed: false,
        }
    }

    /// A reconcile failed at `now` with `error`: the next attempt is due after the next
    /// delay, `jitter` (in `[0, 1)`) placing it between half the ceiling and the ceiling.
    pub fn failed(
        &mut self,
        now: Duration,
        error: String,
        jitter: f64,
        read_failed: bool,
    ) -> Change {
        self.read_failed = read_failed;
        let ceiling = self.backoff.ceiling();
        let delay = ceiling / 2 + self.backoff.next_delay(jitter) / 2;
        self.due = Some(now + delay);
        self.attempts = self.attempts.saturating_add(1);
        let change = match &self.error {
            None => Change::Failing,
            Some(last) if *last == error => Change::Same,
            Some(_) => Change::Changed,
        };
        self.error = Some(error);
        change
    }

    /// A reconcile succeeded: no retry pending, the next failure starts from the base.
    pub fn succeeded(&mut self) -> Change {
        let attempts = std::mem::take(&mut self.attempts);
        self.read_failed = false;
        self.backoff.reset();
        self.due = None;
        match self.error.take() {
            Some(_) => Change::Recovered(attempts),
            None => Change::Fine,
        }
    }

    /// When the next attempt is due.
    pub fn due(&self) -> Option<Duration> {
        self.due
    }

    /// Whether an attempt is due at `now`; it is then taken (the reconcile's result sets
    /// the next one).
    pub fn take_due(&mut self, now: Duration) -> bool {
        let due = self.due.is_some_and(|at| at <= now);
        if due {
            self.due = None;
        }
        due
    }

    /// The next attempt reads the interface first (the last one could not read it).
    pub fn reads(&self) -> bool {
        self.read_failed
    }

    /// The last reconcile failed (a retry is pending or running).
    pub fn failing(&self) -> bool {
        self.error.is_some()
    }

    /// The pending retry as `/status` shows it.
    pub fn status(&self, now: Duration) -> Option<ApplyRetry> {
        let (at, error) = (self.due?, self.error.clone()?);
        Some(ApplyRetry {
            attempts: self.attempts,
            next_in_ms: at.saturating_sub(now).as_millis() as u64,
            error,
        })
    }
}

impl Machine {
    /// A reconcile ended: `failed` is its error when it is worth retrying. Schedules the
    /// next attempt (or ends the retry) and logs when that changes the state.
    pub(super) fn reconciled(&mut self, failed: Option<String>, read_failed: bool) {
        let Some(error) = failed else {
            if let Change::Recovered(attempts) = self.retry.succeeded() {
                info!(
                    attempts,
                    "apply succeeded after failed attempts; retry ended"
                );
            }
            return;
        };
        let jitter: f64 = self.rng.random();
        let now = self.now.mono;
        let change = self.retry.failed(now, error.clone(), jitter, read_failed);
        let attempts = self.retry.attempts;
        let retry_in_ms = self
            .retry
            .due()
            .map_or(0, |at| at.saturating_sub(now).as_millis() as u64);
        match change {
            Change::Failing => {
                warn!(%error, retry_in_ms, "apply failed; retrying with backoff")
            }
            Change::Changed => warn!(
                %error,
                attempts,
                retry_in_ms,
                "apply still failing, with another error; retrying with backoff"
            ),
            _ => debug!(%error, attempts, retry_in_ms, "apply still failing"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// The delays of `n` failures in a row with jitter `j`, starting at 0.
    fn delays(r: &mut Retry, n: usize, j: f64) -> Vec<Duration> {
        let mut now = Duration::ZERO;
        (0..n)
            .map(|_| {
                r.failed(now, "busy".into(), j, false);
                let at = r.due().unwrap();
                let d = at - now;
                now = at;
                d
            })
            .collect()
    }

    #[test]
    fn delays_double_from_the_base_to_a_quarter_of_the_resync() {
        let mut r = Retry::new(Duration::from_secs(10));
        // Ceilings 250, 500, 1000, 2000, 2500 (10 s / 4), full jitter value: the ceiling.
        let top = delays(&mut r, 6, 0.999_999);
        let want = [250, 500, 1000, 2000, 2500, 2500];
        for (got, want) in top.iter().zip(want) {
            assert!(*got <= MS(want) && *got + MS(1) >= MS(want), "{top:?}");
        }
        let mut r = Retry::new(Duration::from_secs(10));
        // Jitter 0: half the ceiling, never sooner.
        assert_eq!(
            delays(&mut r, 6, 0.0),
            [MS(125), MS(250), MS(500), MS(1000), MS(1250), MS(1250)]
        );
    }

    #[test]
    fn the_ceiling_is_at_most_retry_max_and_at_least_the_base() {
        let mut r = Retry::new(Duration::from_secs(3600));
        assert_eq!(*delays(&mut r, 20, 0.0).last().unwrap(), RETRY_MAX / 2);
        let mut r = Retry::new(MS(100));
        assert_eq!(delays(&mut r, 3, 0.0), [MS(125); 3]);
    }

    #[test]
    fn a_success_resets_and_reports_the_attempts() {
        let mut r = Retry::new(Duration::from_secs(60));
        assert_eq!(r.failed(MS(0), "a".into(), 0.0, false), Change::Failing);
        assert_eq!(r.failed(MS(200), "a".into(), 0.0, false), Change::Same);
        assert_eq!(r.failed(MS(500), "b".into(), 0.0, false), Change::Changed);
        assert_eq!(
            r.status(MS(600)),
            Some(ApplyRetry {
                attempts: 3,
                next_in_ms: 400,
                error: "b".into()
            })
        );
        assert_eq!(r.succeeded(), Change::Recovered(3));
        assert_eq!((r.due(), r.status(MS(0))), (None, None));
        assert_eq!(r.succeeded(), Change::Fine);
        assert_eq!(r.failed(MS(1000), "a".into(), 0.0, false), Change::Failing);
        assert_eq!(r.due(), Some(MS(1125)), "back to the base");
    }

    #[test]
    fn a_due_attempt_is_taken_once() {
        let mut r = Retry::new(Duration::from_secs(60));
        r.failed(MS(0), "a".into(), 0.0, false);
        assert!(!r.take_due(MS(124)));
        assert!(r.take_due(MS(125)));
        assert!(!r.take_due(MS(126)));
        assert!(r.failing(), "still failing until a reconcile succeeds");
    }
}
