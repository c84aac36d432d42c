//! Takeover planning: how long one round's decision takes for a large location (100,000
//! held peers, half of them active within the window with a relayed endpoint, one in ten
//! with a recent handshake here), and how long draining the round through the pacer takes
//! in CPU time (the round itself lasts peers / takeover_rate seconds of wall time).
//!
//!   cargo bench --bench takeover_plan
//!
//! Prints a markdown table; `BENCHMARKS.md` records the figures with this command.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use gatehouse::ha::activity::ActivityBook;
use gatehouse::ha::takeover::{plan_takeover, Pacer, TakeoverInput};
use gatehouse::model::{Key, PeerSpec};

const PEERS: u32 = 100_000;
const RUNS: usize = 5;

fn key(i: u32) -> Key {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    Key(k)
}

fn main() {
    let now = SystemTime::now();
    let peers: BTreeMap<Key, std::sync::Arc<PeerSpec>> = (0..PEERS)
        .map(|i| {
            let ip = format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255);
            (key(i), PeerSpec::new(key(i), [ip.parse().unwrap()]).into())
        })
        .collect();
    let mut book = ActivityBook::new();
    let mut here = BTreeMap::new();
    for i in 0..PEERS {
        let endpoint: SocketAddr =
            format!("198.51.{}.{}:{}", (i >> 8) & 255, i & 255, 1024 + i % 60000)
                .parse()
                .unwrap();
        let age = if i % 2 == 0 { 30 } else { 3600 };
        book.relayed(key(i), now - Duration::from_secs(age), Some(endpoint));
        if i % 10 == 0 {
            here.insert(key(i), now - Duration::from_secs(20));
        }
    }
    let mut plan_times = Vec::new();
    let mut pace_times = Vec::new();
    let mut kicks = 0;
    for _ in 0..RUNS {
        let started = Instant::now();
        let plan = plan_takeover(TakeoverInput {
            peers: &peers,
            book: &book,
            handshakes_here: &here,
            now,
            window: Duration::from_secs(300),
        });
        plan_times.push(started.elapsed());
        kicks = plan.kicks.len();
        let started = Instant::now();
        let mut pacer = Pacer::new(plan.kicks, 2000, Duration::ZERO);
        let mut batches = 0;
        while let Some(due) = pacer.poll_timeout() {
            batches += pacer.poll_batch(due).map_or(0, |_| 1);
        }
        pace_times.push(started.elapsed());
        assert_eq!(batches, kicks.div_ceil(200));
    }
    plan_times.sort();
    pace_times.sort();
    println!("| step ({PEERS} held peers, {kicks} kicks) | median | worst |");
    println!("|---|---|---|");
    println!(
        "| plan_takeover | {:.1} ms | {:.1} ms |",
        plan_times[RUNS / 2].as_secs_f64() * 1e3,
        plan_times[RUNS - 1].as_secs_f64() * 1e3
    );
    println!(
        "| pacer, all batches (CPU) | {:.1} ms | {:.1} ms |",
        pace_times[RUNS / 2].as_secs_f64() * 1e3,
        pace_times[RUNS - 1].as_secs_f64() * 1e3
    );
}
