//! Settings from the environment and the statistics of timed rounds, shared by the
//! benches (std only, so any crate of the workspace can include it:
//! `#[path = "../tests/support/bench.rs"] mod bench;`). Benches print their figures; no
//! test asserts on a time.

#![allow(dead_code)]

use std::str::FromStr;
use std::time::{Duration, Instant};

/// The setting `name` from the environment, `default` when unset. A value that does not
/// parse stops the bench: measuring something else than asked is worse than no figure.
pub fn setting<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} does not parse")),
        Err(_) => default,
    }
}

/// The `q` quantile (0.0 = fastest, 1.0 = slowest) of `times`, nearest rank.
pub fn quantile(times: &[Duration], q: f64) -> Duration {
    assert!(!times.is_empty(), "no rounds timed");
    let mut v = times.to_vec();
    v.sort();
    v[((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize]
}

/// The median of `times` (the upper one of an even count).
pub fn median(times: Vec<Duration>) -> Duration {
    quantile(&times, 0.5)
}

/// How long `f` takes.
pub fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// The median of `rounds` timings of `f`.
pub fn median_of(rounds: usize, mut f: impl FnMut()) -> Duration {
    median((0..rounds.max(1)).map(|_| time(&mut f)).collect())
}

/// A median with the spread of the rounds.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: Duration,
    pub min: Duration,
    pub max: Duration,
}

pub fn spread(times: Vec<Duration>) -> Spread {
    Spread {
        median: quantile(&times, 0.5),
        min: quantile(&times, 0.0),
        max: quantile(&times, 1.0),
    }
}

/// Milliseconds, for tables.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `100000` as `100,000`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
