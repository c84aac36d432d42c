//! The shared bench and scale helpers (`tests/support/bench.rs`, `tests/support/scale.rs`)
//! checked once here, since the benches that include them have no test harness.

#[path = "support/bench.rs"]
mod bench;
#[path = "support/scale.rs"]
mod scale;

use std::collections::BTreeSet;
use std::time::Duration;

fn ms(v: &[u64]) -> Vec<Duration> {
    v.iter().map(|&m| Duration::from_millis(m)).collect()
}

#[test]
fn quantiles_pick_by_nearest_rank() {
    let v = ms(&[50, 10, 40, 20, 30]);
    assert_eq!(bench::median(v.clone()), Duration::from_millis(30));
    assert_eq!(bench::quantile(&v, 0.0), Duration::from_millis(10));
    assert_eq!(bench::quantile(&v, 0.9), Duration::from_millis(50));
    // An even count: the upper median, as every bench printed it before.
    assert_eq!(bench::median(ms(&[4, 1, 3, 2])), Duration::from_millis(3));
    let s = bench::spread(v);
    assert_eq!(
        (s.min, s.median, s.max),
        (
            Duration::from_millis(10),
            Duration::from_millis(30),
            Duration::from_millis(50)
        )
    );
}

#[test]
fn thousands_are_grouped() {
    assert_eq!(bench::thousands(999), "999");
    assert_eq!(bench::thousands(100_000), "100,000");
    assert_eq!(bench::thousands(1_000_000), "1,000,000");
}

#[test]
fn a_setting_comes_from_the_environment_or_its_default() {
    std::env::set_var("GATEHOUSE_TEST_BENCH_SETTING", " 42 ");
    assert_eq!(bench::setting("GATEHOUSE_TEST_BENCH_SETTING", 7usize), 42);
    assert_eq!(bench::setting("GATEHOUSE_TEST_BENCH_UNSET", 7usize), 7);
    assert_eq!(
        bench::setting("GATEHOUSE_TEST_BENCH_UNSET", String::from("a,b")),
        "a,b"
    );
}

#[test]
fn scale_peers_are_distinct_beyond_65536() {
    let n = 70_000;
    let keys: BTreeSet<_> = (0..n).map(scale::key).collect();
    let outside: BTreeSet<_> = (0..n).map(scale::outside_ipv4).collect();
    let inside: BTreeSet<_> = (0..n)
        .flat_map(|i| scale::proto_peer(i).allowed_ips)
        .collect();
    assert_eq!(
        (keys.len(), outside.len(), inside.len()),
        (70_000, 70_000, 140_000)
    );
}

#[test]
fn a_scale_location_is_valid() {
    let location = scale::location_of(1_000);
    assert_eq!(location.peers.len(), 1_000);
    gatehouse::validate::validate_location(&location).expect("a valid location");
}
