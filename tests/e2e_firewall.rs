//! Firewall acceptance (issue 9, contract §7), root only:
//! `tests/netns/run-root-tests.sh e2e_firewall`.
//!
//! - Executor tests run in a fresh network namespace of their own (a thread that unshares
//!   it): one batch, read-back equal, drift found, removal, foreign tables untouched.
//! - Traffic tests use the e2e site (gateway namespace with the agent and the userspace
//!   backend, a real WireGuard client) plus a far-side host namespace behind the gateway.

#[path = "firewall/mod.rs"]
mod firewall;

use firewall::{in_fresh_netns, nft, policy, rule, RuleExt};
use gatehouse::firewall::nft::{image, Socket};
use gatehouse::firewall::{diff::differences, from_proto, render, Inputs};
use gatehouse_proto::v1::{Protocol, Verdict};

fn sample() -> gatehouse::firewall::Policy {
    from_proto(&policy(
        Verdict::Drop,
        vec![
            rule(10, Verdict::Accept)
                .src(&["10.77.0.0/24", "fd77::/64"])
                .dst(&["198.51.100.10", "198.51.100.20-198.51.100.30", "fd99::10"])
                .ports(&[(80, 80), (8000, 8100)]),
            rule(20, Verdict::Accept).protos(&[Protocol::Icmp]),
            rule(5, Verdict::Drop).dst(&["198.51.100.66"]),
        ],
    ))
    .unwrap()
    .unwrap()
}

#[test]
#[ignore = "root: tests/netns/run-root-tests.sh e2e_firewall"]
fn one_batch_reads_back_equal_and_drift_is_found() {
    in_fresh_netns(|| {
        nft(&["add", "table", "ip", "operator"]);
        nft(&["add", "chain", "ip", "operator", "c", "{ type filter hook forward priority 0; policy accept; }"]);
        nft(&["add", "rule", "ip", "operator", "c", "tcp dport 22 accept"]);
        let foreign = nft(&["list", "table", "ip", "operator"]);

        let p = sample();
        let rs = render(&Inputs {
            interface: "wgfw0",
            listen_port: 51820,
            policy: Some(&p),
            masquerade: true,
        })
        .unwrap();
        let want = image(&rs).unwrap();
        let mut sock = Socket::open().unwrap();
        assert_eq!(sock.read(&rs.table).unwrap(), None);
        let stats = sock.replace(&rs).unwrap();
        assert!(stats.messages > 3, "{stats:?}");
        let have = sock.read(&rs.table).unwrap();
        let d = differences(&rs.table, Some(&want), have.as_ref());
        assert!(d.is_empty(), "{d:?}\nwant {want:#?}\nhave {have:#?}");
        // Replaced again: still one table, equal.
        sock.replace(&rs).unwrap();
        let have = sock.read(&rs.table).unwrap();
        assert!(differences(&rs.table, Some(&want), have.as_ref()).is_empty());
        let listing = nft(&["list", "tables"]);
        assert_eq!(
            listing.lines().filter(|l| l.contains("gatehouse_")).count(),
            1,
            "{listing}"
        );
        // A change by hand is seen.
        nft(&["add", "rule", "inet", "gatehouse_wgfw0", "vpn", "accept"]);
        let have = sock.read(&rs.table).unwrap();
        let d = differences(&rs.table, Some(&want), have.as_ref());
        assert_eq!(d.len(), 1, "{d:?}");
        nft(&["delete", "element", "inet", "gatehouse_wgfw0", "r0_d4", "{ 198.51.100.10 }"]);
        let have = sock.read(&rs.table).unwrap();
        assert_eq!(differences(&rs.table, Some(&want), have.as_ref()).len(), 2);
        // Removal.
        sock.remove(&rs.table).unwrap();
        assert_eq!(sock.read(&rs.table).unwrap(), None);
        sock.remove(&rs.table).unwrap();
        assert_eq!(nft(&["list", "table", "ip", "operator"]), foreign);
    });
}
