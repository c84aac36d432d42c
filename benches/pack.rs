//! gatehouse's own userspace share of a kernel cold apply, natively (no VM, no root):
//! planning N single-address peers against an empty interface, then encoding the plan's
//! device and peer operations into `WG_CMD_SET_DEVICE` messages, without sending them.
//! Counts the allocations and allocated bytes of each step beside the message bytes.
//!
//!   cargo bench --bench pack                                  # 100,000 peers, 5 rounds
//!   GATEHOUSE_BENCH_PEERS=10000 GATEHOUSE_BENCH_ROUNDS=9 cargo bench --bench pack

#[path = "../tests/support/bench.rs"]
mod bench;
#[path = "../tests/vm/support.rs"]
mod support;

use std::time::Instant;

use bench::{ms, setting, spread, thousands};
use gatehouse::backend::kernel::pack::{pack_each, MESSAGE_LIMIT};
use gatehouse::model::Observed;
use gatehouse::plan::plan;

#[path = "../tests/support/counting_alloc.rs"]
#[allow(dead_code)]
mod counting_alloc;
use counting_alloc::counted;

fn main() {
    let peers = setting("GATEHOUSE_BENCH_PEERS", 100_000usize);
    let rounds = setting("GATEHOUSE_BENCH_ROUNDS", 5usize).max(1);
    let want = support::desired(9, 41000, u32::try_from(peers).unwrap_or(u32::MAX), 0);
    let observed = Observed::default();
    let (mut plan_t, mut pack_t) = (Vec::new(), Vec::new());
    let (mut plan_a, mut pack_a) = ((0, 0), (0, 0));
    let (mut messages, mut bytes) = (0, 0);
    let mut buffer = Vec::new();
    for _ in 0..rounds {
        let (a0, b0) = counted();
        let start = Instant::now();
        let p = plan(&want, &observed);
        plan_t.push(start.elapsed());
        let (a1, b1) = counted();
        let start = Instant::now();
        let (mut n, mut len) = (0, 0);
        pack_each(
            &mut buffer,
            "ghbench0",
            p.steps.iter().map(|s| &s.op),
            MESSAGE_LIMIT,
            |m| {
                n += 1;
                len += m.encoded_len();
            },
        );
        pack_t.push(start.elapsed());
        let (a2, b2) = counted();
        (messages, bytes) = (n, len);
        plan_a = (a1 - a0, b1 - b0);
        pack_a = (a2 - a1, b2 - b1);
        drop(p);
    }
    let (plan_s, pack_s) = (spread(plan_t), spread(pack_t));
    println!(
        "plan + pack of {} peers (cold: an empty interface), {rounds} rounds, median (min–max):",
        thousands(peers)
    );
    println!("| step | time | allocations | bytes allocated |");
    println!("|---|---:|---:|---:|");
    for (what, s, (a, b)) in [("plan", plan_s, plan_a), ("pack (encode)", pack_s, pack_a)] {
        println!(
            "| {what} | {:.1} ms ({:.1}–{:.1}) | {} | {} |",
            ms(s.median),
            ms(s.min),
            ms(s.max),
            thousands(a),
            thousands(b)
        );
    }
    println!(
        "messages: {messages}, message bytes: {} ({:.1} per peer)",
        thousands(bytes),
        bytes as f64 / peers.max(1) as f64
    );
}
