use std::sync::{Arc, Mutex};

use super::*;
use crate::firewall::nft::NftError;
use crate::model::{InterfaceSpec, Key, PeerSpec, SecretKey};

/// A kernel table in memory, recording what the step asked for.
#[derive(Default)]
struct Log {
    table: Option<Image>,
    reads: usize,
    writes: Vec<String>,
    cuts: Vec<(bool, usize)>,
    fail: bool,
}

struct Fake(Arc<Mutex<Log>>);

impl Tables for Fake {
    fn read(&mut self, _: &str) -> Result<Option<Image>, NftError> {
        let mut log = self.0.lock().unwrap();
        log.reads += 1;
        Ok(log.table.clone())
    }
    fn replace(&mut self, rs: &Ruleset) -> Result<WriteStats, NftError> {
        let mut log = self.0.lock().unwrap();
        if log.fail {
            return Err(NftError::Read("refused".into()));
        }
        log.table = Some(nft::image(rs).unwrap());
        log.writes.push("replace".into());
        Ok(WriteStats {
            messages: 5,
            bytes: 100,
        })
    }
    fn remove(&mut self, _: &str) -> Result<WriteStats, NftError> {
        let mut log = self.0.lock().unwrap();
        log.table = None;
        log.writes.push("remove".into());
        Ok(WriteStats::default())
    }
    fn cut(&mut self, cut: &Cut) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap()
            .cuts
            .push((cut.policy.is_some(), cut.removed.len()));
        Ok(0)
    }
}

fn step(enabled: bool) -> (FirewallStep, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let s = FirewallStep::new(
        "wg0",
        FirewallSettings {
            enabled,
            masquerade: false,
        },
        Box::new(Fake(log.clone())),
    );
    (s, log)
}

fn desired(peers: &[&str]) -> Desired {
    Desired {
        interface: InterfaceSpec {
            private_key: SecretKey::new([7u8; 32]),
            listen_port: 51820,
            addresses: ["10.77.0.1/24".parse().unwrap()].into(),
            mtu: None,
            fwmark: 0,
        },
        peers: peers
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                let key = Key([i as u8 + 1; 32]);
                (key, PeerSpec::new(key, [ip.parse().unwrap()]).into())
            })
            .collect(),
    }
}

fn policy(default: v1::Verdict) -> v1::FirewallPolicy {
    v1::FirewallPolicy {
        enabled: true,
        default_verdict: default as i32,
        rules: vec![v1::FirewallRule {
            priority: 1,
            destinations: vec!["198.51.100.0/24".into()],
            verdict: v1::Verdict::Accept as i32,
            ..Default::default()
        }],
    }
}

#[test]
fn an_equal_table_is_not_written_and_drift_is_repaired() {
    let (mut s, log) = step(true);
    let p = policy(v1::Verdict::Drop);
    let d = desired(&["10.77.0.2/32"]);
    s.run("revision 1", Some(&p), &d).unwrap();
    assert_eq!(log.lock().unwrap().writes, vec!["replace"]);
    assert_eq!(s.status().state, "in sync");
    assert_eq!(s.status().repairs, 0);
    // Equal: read back, nothing written.
    s.run("periodic resync", Some(&p), &d).unwrap();
    assert_eq!(log.lock().unwrap().writes.len(), 1);
    // Changed by hand: repaired, counted as a repair.
    log.lock()
        .unwrap()
        .table
        .as_mut()
        .unwrap()
        .chains
        .get_mut("vpn")
        .unwrap()
        .rules
        .pop();
    assert_eq!(s.diff(Some(&p), &d).len(), 1);
    s.run("periodic resync", Some(&p), &d).unwrap();
    assert_eq!(log.lock().unwrap().writes.len(), 2);
    assert_eq!(s.status().repairs, 1);
    assert!(s.diff(Some(&p), &d).is_empty());
}

#[test]
fn a_new_step_after_restart_writes_nothing_for_an_equal_table() {
    let (mut s, log) = step(true);
    let p = policy(v1::Verdict::Drop);
    let d = desired(&["10.77.0.2/32"]);
    s.run("revision 1", Some(&p), &d).unwrap();
    let table = log.lock().unwrap().table.clone();
    let (mut again, log2) = step(true);
    log2.lock().unwrap().table = table;
    again.run("start", Some(&p), &d).unwrap();
    assert!(log2.lock().unwrap().writes.is_empty());
    assert_eq!(again.status().repairs, 0);
}

#[test]
fn no_policy_or_a_disabled_one_removes_the_table() {
    let (mut s, log) = step(true);
    let d = desired(&["10.77.0.2/32"]);
    s.run("revision 1", Some(&policy(v1::Verdict::Drop)), &d)
        .unwrap();
    let mut off = policy(v1::Verdict::Drop);
    off.enabled = false;
    s.run("revision 2", Some(&off), &d).unwrap();
    assert_eq!(log.lock().unwrap().writes, vec!["replace", "remove"]);
    assert!(log.lock().unwrap().table.is_none());
    s.run("revision 3", None, &d).unwrap();
    assert_eq!(
        log.lock().unwrap().writes.len(),
        2,
        "nothing to remove twice"
    );
}

#[test]
fn disabled_locally_only_removes_a_leftover_table_once() {
    let (mut on, log) = step(true);
    let d = desired(&["10.77.0.2/32"]);
    on.run("revision 1", Some(&policy(v1::Verdict::Drop)), &d)
        .unwrap();
    let (mut off, log2) = step(false);
    log2.lock().unwrap().table = log.lock().unwrap().table.clone();
    for _ in 0..3 {
        off.run("revision 2", Some(&policy(v1::Verdict::Drop)), &d)
            .unwrap();
    }
    assert_eq!(log2.lock().unwrap().writes, vec!["remove"]);
    assert_eq!(off.status().state, "disabled");
}

#[test]
fn flows_are_cut_when_the_policy_changes_or_a_peer_goes() {
    let (mut s, log) = step(true);
    let p = policy(v1::Verdict::Drop);
    s.run(
        "revision 1",
        Some(&p),
        &desired(&["10.77.0.2/32", "10.77.0.3/32"]),
    )
    .unwrap();
    s.run(
        "resync",
        Some(&p),
        &desired(&["10.77.0.2/32", "10.77.0.3/32"]),
    )
    .unwrap();
    assert_eq!(
        log.lock().unwrap().cuts,
        vec![(true, 0)],
        "only the first (a change)"
    );
    s.run("revision 2", Some(&p), &desired(&["10.77.0.2/32"]))
        .unwrap();
    assert_eq!(
        log.lock().unwrap().cuts.last(),
        Some(&(true, 1)),
        "the removed peer"
    );
    s.run(
        "revision 3",
        Some(&policy(v1::Verdict::Accept)),
        &desired(&["10.77.0.2/32"]),
    )
    .unwrap();
    assert_eq!(log.lock().unwrap().cuts.len(), 3, "a new policy");
}

#[test]
fn a_failed_write_is_an_error_state_and_keeps_the_last_table() {
    let (mut s, log) = step(true);
    let d = desired(&["10.77.0.2/32"]);
    s.run("revision 1", Some(&policy(v1::Verdict::Drop)), &d)
        .unwrap();
    let before = log.lock().unwrap().table.clone();
    log.lock().unwrap().fail = true;
    let err = s
        .run("revision 2", Some(&policy(v1::Verdict::Accept)), &d)
        .unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(s.status().state, "error");
    assert!(s.status().error().unwrap().contains("refused"));
    assert_eq!(log.lock().unwrap().table, before);
}

fn spans(list: &[&str]) -> BTreeSet<Span> {
    list.iter()
        .map(|s| span_of_net(&s.parse().unwrap()))
        .collect()
}

#[test]
fn a_change_of_peers_moves_the_addresses_without_reading_or_writing_the_table() {
    let (mut s, log) = step(true);
    let p = policy(v1::Verdict::Drop);
    s.run(
        "revision 1",
        Some(&p),
        &desired(&["10.77.0.2/32", "10.77.0.3/32"]),
    )
    .unwrap();
    let (reads, table) = {
        let l = log.lock().unwrap();
        (l.reads, l.table.clone())
    };
    let change = VpnChange::between(
        ["10.77.0.3/32".parse().unwrap()],
        ["10.77.0.4/32".parse().unwrap()],
    );
    s.run_peers("revision 2", &change).unwrap();
    {
        let l = log.lock().unwrap();
        assert_eq!(l.reads, reads, "the table is not read");
        assert_eq!(l.writes, vec!["replace"], "nor written");
        assert_eq!(l.table, table);
        assert_eq!(l.cuts.last(), Some(&(false, 1)), "the removed peer's flows");
    }
    assert_eq!(s.status().peer_changes, 1);
    assert_eq!(
        s.vpn_addresses(),
        Some(&spans(&["10.77.0.2/32", "10.77.0.4/32"]))
    );
    // The full step on the same location finds nothing to write and nothing to cut.
    let cuts = log.lock().unwrap().cuts.len();
    s.run(
        "periodic resync",
        Some(&p),
        &desired(&["10.77.0.2/32", "10.77.0.4/32"]),
    )
    .unwrap();
    assert_eq!(log.lock().unwrap().writes.len(), 1);
    assert_eq!(log.lock().unwrap().cuts.len(), cuts);
}

#[test]
fn a_change_of_peers_without_a_table_in_sync_is_an_error_for_the_full_step_to_repair() {
    let (mut s, log) = step(true);
    let change = VpnChange::between([], ["10.77.0.4/32".parse().unwrap()]);
    let err = s.run_peers("revision 2", &change).unwrap_err();
    assert!(matches!(err, FirewallError::NotInSync), "{err}");
    assert_eq!(s.status().state, "error");
    let d = desired(&["10.77.0.4/32"]);
    log.lock().unwrap().fail = true;
    let p = policy(v1::Verdict::Drop);
    assert!(s.run("revision 2", Some(&p), &d).is_err());
    assert!(
        s.run_peers("revision 3", &change).is_err(),
        "a failed write"
    );
    log.lock().unwrap().fail = false;
    s.run("periodic resync", Some(&p), &d).unwrap();
    s.run_peers("revision 3", &VpnChange::default()).unwrap();
    assert_eq!(s.status().state, "in sync");
}
