//! Reconnect backoff: exponential growth with full jitter, pure.
//!
//! The delay before attempt `n` (0-based) is uniform in `[0, min(max, base * 2^n)]`
//! ("full jitter"): a Core restart does not meet every gateway reconnecting in the same
//! instant. The caller supplies the randomness (`rng_value` in `[0, 1)`, e.g.
//! `rand::random::<f64>()`) and sleeps; this type only decides how long.

use std::time::Duration;

/// Default first ceiling: 500 ms.
pub const DEFAULT_BASE: Duration = Duration::from_millis(500);
/// Default largest ceiling: 30 s.
pub const DEFAULT_MAX: Duration = Duration::from_secs(30);

/// Exponential backoff state for one retried operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    /// Failed attempts since the last reset (saturates once the ceiling reaches `max`).
    attempt: u32,
}

impl Backoff {
    /// `base` is the ceiling of the first delay, `max` the largest ceiling. A `max`
    /// below `base` is raised to `base`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The delay to wait before the next attempt, and counts the attempt.
    /// `rng_value` is a uniform random number in `[0, 1)`; values outside are clamped and
    /// a NaN counts as 1 (the full ceiling: the safe side for a thundering herd).
    pub fn next_delay(&mut self, rng_value: f64) -> Duration {
        let ceiling = self.ceiling();
        if ceiling < self.max {
            self.attempt = self.attempt.saturating_add(1);
        }
        let factor = if rng_value.is_nan() {
            1.0
        } else {
            rng_value.clamp(0.0, 1.0)
        };
        // `mul_f64` panics on overflow (e.g. `Duration::MAX * 1.0` after rounding).
        Duration::try_from_secs_f64(ceiling.as_secs_f64() * factor)
            .map_or(ceiling, |d| d.min(ceiling))
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        // 2^attempt overflows a u32 multiplier past 31; the cap is reached long before
        // for any sane base, and checked_mul covers the rest.
        let factor = 1u32.checked_shl(self.attempt).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// Failed attempts counted since the last reset (stops growing at the cap).
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to the first delay (call after a connection proved healthy).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(DEFAULT_BASE, DEFAULT_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn ceilings_double_from_base() {
        let mut b = Backoff::default();
        let got: Vec<Duration> = (0..7).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(
            got,
            [
                MS(500),
                MS(1000),
                MS(2000),
                MS(4000),
                MS(8000),
                MS(16000),
                MS(30000)
            ]
        );
    }

    #[test]
    fn capped_at_max_forever() {
        let mut b = Backoff::default();
        for _ in 0..10_000 {
            assert!(b.next_delay(1.0) <= DEFAULT_MAX);
        }
        assert_eq!(b.next_delay(1.0), DEFAULT_MAX);
        // The counter stops growing at the cap, so it cannot overflow.
        assert!(b.attempts() <= 7);
    }

    #[test]
    fn huge_base_does_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(u64::MAX / 2), Duration::MAX);
        for _ in 0..100 {
            let _ = b.next_delay(1.0);
        }
        assert_eq!(b.ceiling(), Duration::MAX);
    }

    #[test]
    fn jitter_scales_within_ceiling() {
        let mut b = Backoff::default();
        for _ in 0..3 {
            let _ = b.next_delay(0.0);
        }
        // Fourth attempt: ceiling 4 s.
        let mut probe = b.clone();
        assert_eq!(probe.next_delay(0.0), Duration::ZERO);
        let mut probe = b.clone();
        assert_eq!(probe.next_delay(0.25), MS(1000));
        let mut probe = b.clone();
        assert_eq!(probe.next_delay(0.999), MS(3996));
    }

    #[test]
    fn jitter_bounds_hold_for_out_of_range_input() {
        let mut b = Backoff::default();
        assert_eq!(b.clone().next_delay(-3.0), Duration::ZERO);
        assert_eq!(b.clone().next_delay(7.0), MS(500));
        assert_eq!(b.next_delay(f64::NAN), MS(500));
    }

    #[test]
    fn reset_returns_to_base() {
        let mut b = Backoff::default();
        for _ in 0..5 {
            let _ = b.next_delay(0.5);
        }
        assert_eq!(b.ceiling(), MS(16000));
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.next_delay(1.0), MS(500));
    }

    #[test]
    fn max_below_base_is_raised() {
        let mut b = Backoff::new(MS(800), MS(100));
        assert_eq!(b.next_delay(1.0), MS(800));
        assert_eq!(b.next_delay(1.0), MS(800));
    }
}
