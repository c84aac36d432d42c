//! Firewall benchmark (issue 9): a policy of 10,000 addresses and 100 rules rendered and
//! written as one nftables batch, then an equal re-apply (read back, compare, nothing
//! written). Needs root; runs in a network namespace of its own (unshared, gone at exit).
//!
//!     cargo bench --bench firewall
//!
//! `GATEHOUSE_BENCH_ADDRESSES` (default 10,000), `GATEHOUSE_BENCH_RULES` (100) and
//! `GATEHOUSE_BENCH_ROUNDS` (5; the median is printed) change the size.

#[path = "../tests/support/bench.rs"]
mod bench;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bench::{median, setting};
use gatehouse::firewall::diff::differences;
use gatehouse::firewall::nft::{image, Socket};
use gatehouse::firewall::{from_proto, render, Inputs};
use gatehouse_proto::v1;

/// `addresses` spread over `rules` rules as destinations (every other address, so none
/// merge), half of the rules with a port range, sources the VPN's subnets.
fn policy(addresses: usize, rules: usize) -> v1::FirewallPolicy {
    let per_rule = addresses.div_ceil(rules);
    let rules = (0..rules)
        .map(|r| v1::FirewallRule {
            priority: r as u32,
            sources: vec!["10.77.0.0/16".into(), "fd77::/64".into()],
            destinations: (0..per_rule)
                .map(|i| {
                    let n = 0x0a00_0000u32 + ((r * per_rule + i) as u32) * 2;
                    Ipv4Addr::from(n).to_string()
                })
                .collect(),
            ports: if r % 2 == 0 {
                vec![v1::PortRange {
                    start: 1000 + r as u32,
                    end: 2000 + r as u32,
                }]
            } else {
                vec![]
            },
            protocols: vec![],
            verdict: if r % 3 == 0 {
                v1::Verdict::Drop
            } else {
                v1::Verdict::Accept
            } as i32,
            comment: String::new(),
        })
        .collect();
    v1::FirewallPolicy {
        enabled: true,
        default_verdict: v1::Verdict::Drop as i32,
        rules,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", bench::ms(d))
}

fn main() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("firewall bench: needs root (nftables in a network namespace of its own)");
        return Ok(());
    }
    // SAFETY: a single-threaded process moving itself to a new, empty namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!("unshare: {}", std::io::Error::last_os_error());
    }
    let addresses = setting("GATEHOUSE_BENCH_ADDRESSES", 10_000usize);
    let rule_count = setting("GATEHOUSE_BENCH_RULES", 100usize);
    let rounds = setting("GATEHOUSE_BENCH_ROUNDS", 5usize).max(1);
    let proto = policy(addresses, rule_count);

    let (mut render_t, mut write_t, mut reapply_t) = (vec![], vec![], vec![]);
    let mut last = None;
    for round in 0..rounds {
        let t = Instant::now();
        let p = from_proto(&proto)?.expect("enabled");
        let rs = render(&Inputs {
            interface: "wgbench",
            listen_port: 51820,
            policy: Some(&p),
            masquerade: true,
        })
        .expect("a table");
        render_t.push(t.elapsed());

        // A different table first (so this round's write replaces a full one).
        let mut sock = Socket::open()?;
        if round == 0 {
            sock.remove(&rs.table)?;
        }
        let t = Instant::now();
        let stats = sock.replace(&rs)?;
        write_t.push(t.elapsed());

        // Equal re-apply: what the agent does at each resync and restart.
        let t = Instant::now();
        let want = image(&rs)?;
        let have = sock.read(&rs.table)?;
        let diffs = differences(&rs.table, Some(&want), have.as_ref());
        reapply_t.push(t.elapsed());
        assert!(diffs.is_empty(), "read back differs: {diffs:?}");
        last = Some((stats, rs.rule_count(), rs.element_count(), rs.sets.len()));
    }
    let (stats, rules, elements, sets) = last.expect("one round");
    println!("| policy | nft rules | sets | set elements | render | write (one batch) | messages | bytes | equal re-apply (read back + compare, 0 written) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {addresses} addresses, {rule_count} rules | {rules} | {sets} | {elements} | {} | {} | {} | {} | {} |",
        ms(median(render_t)),
        ms(median(write_t)),
        stats.messages,
        stats.bytes,
        ms(median(reapply_t)),
    );
    Ok(())
}
