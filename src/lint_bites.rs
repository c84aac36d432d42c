//! One call of each method that `clippy.toml` bans, placed where deciding code lives (under
//! the crate's `deny`), so that `scripts/lint-bites.sh` can check that clippy refuses every
//! one of them. Built only with the `lint-bites` feature, which nothing else enables.
#![allow(dead_code)] // called by nothing: clippy only has to see the calls

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

/// The clocks and sleeps.
pub async fn clocks() {
    let _ = Instant::now().elapsed();
    let _ = SystemTime::now().elapsed();
    let t = tokio::time::Instant::now();
    let _ = t.elapsed();
    std::thread::sleep(Duration::ZERO);
    tokio::time::sleep(Duration::ZERO).await;
    tokio::time::sleep_until(t).await;
}

/// The random sources.
#[allow(deprecated)] // `rand::thread_rng` is deprecated, and still banned
pub fn randomness() {
    let _ = rand::rng();
    let _ = rand::thread_rng();
    let _: u8 = rand::random();
    let _: u8 = rand::random_range(0..3);
    let _ = rand::random_bool(0.5);
    let _ = rand::random_ratio(1, 2);
    let _ = rand::random_iter::<u8>();
    rand::fill(&mut [0u8; 4][..]);
    let _ = x25519_dalek::StaticSecret::random();
}

/// Unordered iteration.
pub fn unordered(mut m: HashMap<u8, u8>, mut s: HashSet<u8>, o: &HashSet<u8>) {
    let _ = m.iter().next();
    let _ = m.iter_mut().next();
    let _ = m.keys().next();
    let _ = m.values().next();
    let _ = m.values_mut().next();
    let _ = m.clone().into_keys().next();
    let _ = m.clone().into_values().next();
    let _ = m.drain().next();
    let _ = s.iter().next();
    let _ = s.difference(o).next();
    let _ = s.intersection(o).next();
    let _ = s.union(o).next();
    let _ = s.symmetric_difference(o).next();
    let _ = s.drain().next();
    // `for` over a hash map calls no method: `clippy::iter_over_hash_type` catches it.
    for _ in &m {}
}
