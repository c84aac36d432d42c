//! A change of peers with a firewall policy is scoped (issue 11): after a snapshot, every
//! revision reached by a peer-only delta runs the firewall step as
//! `Action::FirewallPeers` (the touched peers' addresses, no desired state built, the
//! table neither read nor written), and incremental ≡ full: after any sequence of such
//! changes the table equals the full render of the resulting location, the step's VPN
//! addresses equal those of every peer rebuilt from scratch, every cut names exactly the
//! addresses that left, and a full step then has nothing to write and nothing to cut.
//!
//! The machine runs with its real firewall step over nftables kept in memory; the
//! interface is `plan::simulate`'s model. No root, no clock.
#![allow(dead_code)]
#[allow(dead_code)]
mod machine_sim;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use gatehouse::agent::firewall::{FirewallSettings, FirewallStep, Tables};
use gatehouse::agent::machine::{Action, Machine, Now, Outcome};
use gatehouse::agent::steps::nothing_failed;
use gatehouse::backend::Backend as _;
use gatehouse::firewall::conntrack::Cut;
use gatehouse::firewall::nft::{self, Image, NftError, WriteStats};
use gatehouse::firewall::policy::{span_of_net, Span};
use gatehouse::firewall::{render, Inputs, Ruleset};
use gatehouse::model::{Desired, InterfaceSpec, Key, Observed, PeerSpec, SecretKey};
use gatehouse_proto::v1;
use ipnet::IpNet;
use machine_sim::{location, settings, Sim};
use proptest::prelude::*;

const IFACE: &str = "wgsim0";

/// nftables and conntrack in memory: the table, what was written, what was cut.
#[derive(Default)]
struct Kernel {
    table: Option<Image>,
    reads: usize,
    writes: usize,
    cuts: Vec<Vec<Span>>,
}

struct Fake(Arc<Mutex<Kernel>>);

impl Tables for Fake {
    fn read(&mut self, _: &str) -> Result<Option<Image>, NftError> {
        let mut k = self.0.lock().unwrap();
        k.reads += 1;
        Ok(k.table.clone())
    }
    fn replace(&mut self, rs: &Ruleset) -> Result<WriteStats, NftError> {
        let mut k = self.0.lock().unwrap();
        k.table = Some(nft::image(rs)?);
        k.writes += 1;
        Ok(WriteStats::default())
    }
    fn remove(&mut self, _: &str) -> Result<WriteStats, NftError> {
        let mut k = self.0.lock().unwrap();
        k.table = None;
        k.writes += 1;
        Ok(WriteStats::default())
    }
    fn cut(&mut self, cut: &Cut) -> std::io::Result<usize> {
        self.0.lock().unwrap().cuts.push(cut.removed.to_vec());
        Ok(0)
    }
}

fn policy() -> v1::FirewallPolicy {
    v1::FirewallPolicy {
        enabled: true,
        default_verdict: v1::Verdict::Drop as i32,
        rules: vec![v1::FirewallRule {
            priority: 1,
            sources: vec!["10.0.0.0/8".into(), "fd00::/16".into()],
            destinations: vec!["192.168.1.0/24".into(), "192.168.2.5-192.168.2.9".into()],
            ports: vec![v1::PortRange {
                start: 443,
                end: 443,
            }],
            verdict: v1::Verdict::Accept as i32,
            ..Default::default()
        }],
    }
}

fn key(n: u8) -> Key {
    Key([n; 32])
}

/// Peer `n`'s allowed IPs picked by `mask` from its own pool (so no two peers share one)
/// plus the shared address `10.200.0.1/32` when `shared`.
fn ips(n: u8, mask: u8, shared: bool) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = (0..4u8)
        .filter(|b| mask & (1 << b) != 0)
        .map(|b| match b {
            0 | 1 => format!("10.{n}.0.{}/32", b + 1),
            2 => format!("10.{n}.1.0/24"),
            _ => format!("fd00::{n}:1/128"),
        })
        .collect();
    if shared {
        out.insert("10.200.0.1/32".into());
    }
    out
}

fn peer(n: u8, ips: &BTreeSet<String>) -> v1::Peer {
    v1::Peer {
        id: n as u64,
        public_key: key(n).0.to_vec(),
        allowed_ips: ips.iter().cloned().collect(),
        ..Default::default()
    }
}

/// One peer-only delta.
#[derive(Clone, Debug)]
enum Op {
    /// Add peer `n` (or change it when present) to the IPs of `mask`.
    Upsert {
        n: u8,
        mask: u8,
    },
    Remove {
        n: u8,
    },
    /// `to` takes the shared address from whoever holds it, in one delta with that
    /// holder's upsert without it (a valid location at every revision).
    Move {
        to: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..10, 1u8..16).prop_map(|(n, mask)| Op::Upsert { n, mask }),
        2 => (1u8..10).prop_map(|n| Op::Remove { n }),
        1 => (1u8..10).prop_map(|to| Op::Move { to }),
    ]
}

/// The test's own copy of the location's peers: peer → (mask, holds the shared address).
type Peers = BTreeMap<u8, (u8, bool)>;

fn spans_of(peers: &Peers) -> BTreeSet<Span> {
    peers
        .iter()
        .flat_map(|(n, (m, s))| ips(*n, *m, *s))
        .map(|s| span_of_net(&s.parse::<IpNet>().unwrap()))
        .collect()
}

fn desired_of(peers: &Peers, listen_port: u16) -> Desired {
    Desired {
        interface: InterfaceSpec {
            private_key: SecretKey::new([1; 32]),
            listen_port,
            addresses: ["10.0.0.1/24".parse().unwrap()].into(),
            mtu: Some(1420),
            fwmark: 0,
        },
        peers: peers
            .iter()
            .map(|(n, (m, s))| {
                let nets: Vec<IpNet> = ips(*n, *m, *s).iter().map(|i| i.parse().unwrap()).collect();
                (key(*n), PeerSpec::new(key(*n), nets).into())
            })
            .collect(),
    }
}

/// The changes of `op` on `peers`, as the Core would send them.
fn changes(op: &Op, peers: &mut Peers) -> Vec<v1::Change> {
    let upsert = |n: u8, (m, s): (u8, bool)| v1::Change {
        kind: Some(v1::change::Kind::UpsertPeer(peer(n, &ips(n, m, s)))),
    };
    match *op {
        Op::Upsert { n, mask } => {
            let shared = peers.get(&n).is_some_and(|p| p.1);
            peers.insert(n, (mask, shared));
            vec![upsert(n, (mask, shared))]
        }
        Op::Remove { n } => {
            peers.remove(&n);
            vec![v1::Change {
                kind: Some(v1::change::Kind::RemovePeer(key(n).0.to_vec())),
            }]
        }
        Op::Move { to } => {
            let mut out = vec![];
            let holder = peers.iter().find(|(_, p)| p.1).map(|(n, _)| *n);
            if let Some(h) = holder.filter(|h| *h != to) {
                let p = peers.get_mut(&h).unwrap();
                p.1 = false;
                out.push(upsert(h, *p));
            }
            let p = peers.entry(to).or_insert((1, false));
            p.1 = true;
            out.push(upsert(to, *p));
            out
        }
    }
}

struct Rig {
    m: Machine,
    obs: Observed,
    step: FirewallStep,
    kernel: Arc<Mutex<Kernel>>,
    now: Now,
    /// Firewall actions seen: (full, scoped).
    full: usize,
    scoped: usize,
}

impl Rig {
    fn new() -> Rig {
        let now = Sim::new(settings()).now();
        let kernel = Arc::new(Mutex::new(Kernel::default()));
        let firewall = FirewallSettings {
            enabled: true,
            masquerade: true,
        };
        let step = FirewallStep::new(IFACE, firewall, Box::new(Fake(kernel.clone())));
        let obs = gatehouse::backend::memory::MemoryBackend::new(IFACE)
            .observe()
            .unwrap();
        // The machine and its step share one `[firewall]` section, as in the agent.
        let mut settings = settings();
        settings.firewall = firewall;
        let m = Machine::new(settings, "gw".into(), None, None, vec![], 1, now);
        let mut rig = Rig {
            m,
            obs,
            step,
            kernel,
            now,
            full: 0,
            scoped: 0,
        };
        rig.m.handle_start(now);
        rig.turn();
        let _ = rig.m.handle_hello_wanted(now);
        rig.m.handle_connected(now);
        rig.turn();
        rig
    }

    fn turn(&mut self) {
        while let Some(a) = self.m.poll_action() {
            let outcome = match a {
                Action::Read { mut into, .. } => {
                    into.model().refresh_with(self.obs.clone());
                    Outcome::Read(into, Ok(()))
                }
                Action::Apply { plan, .. } => {
                    gatehouse::plan::simulate(&mut self.obs, &plan);
                    Outcome::Applied {
                        applied: plan,
                        outcomes: nothing_failed(),
                    }
                }
                Action::Firewall {
                    trigger,
                    policy,
                    desired,
                } => {
                    self.full += 1;
                    let r = self.step.run(&trigger, policy.as_ref(), &desired);
                    Outcome::Firewall(r.map_err(|e| e.to_string()))
                }
                Action::FirewallOff { trigger } => {
                    self.step.run_off(&trigger);
                    Outcome::Firewall(Ok(()))
                }
                Action::FirewallPeers { trigger, change } => {
                    self.scoped += 1;
                    let r = self.step.run_peers(&trigger, &change);
                    Outcome::Firewall(r.map_err(|e| e.to_string()))
                }
                Action::CheckBackend => Outcome::BackendChecked(Ok(None)),
                Action::Save => Outcome::Saved(Ok(())),
                Action::Append(_) => Outcome::Appended(Ok(0)),
                Action::Send { messages, .. } => Outcome::Sent(messages.len()),
                Action::SendStats(_) => Outcome::Sent(1),
                Action::Kick(_) => Outcome::Kicked(Ok(())),
                Action::InstallSourceRoutes { .. } => Outcome::RoutesInstalled(Ok(0)),
                Action::ClearSourceRoutes => Outcome::RoutesCleared(Ok(())),
                _ => continue,
            };
            self.m.handle_outcome(outcome, self.now);
        }
    }

    fn core(&mut self, kind: v1::core_message::Kind) {
        self.m
            .handle_core_message(v1::CoreMessage { kind: Some(kind) }, self.now);
        self.turn();
        self.m.handle_core_batch_end(self.now);
        self.turn();
    }
}

/// The table the full path renders for the location.
fn full_render() -> Image {
    let policy = gatehouse::firewall::from_proto(&policy()).unwrap();
    let rs = render(&Inputs {
        interface: IFACE,
        listen_port: 51820,
        policy: policy.as_ref(),
        masquerade: true,
    })
    .unwrap();
    nft::image(&rs).unwrap()
}

fn run(initial: Peers, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut rig = Rig::new();
    let mut peers = initial;
    let mut loc = location(
        peers
            .iter()
            .map(|(n, (m, s))| peer(*n, &ips(*n, *m, *s)))
            .collect(),
        None,
    );
    loc.firewall = Some(policy());
    rig.core(v1::core_message::Kind::Snapshot(v1::Snapshot {
        revision: 1,
        location: Some(loc),
    }));
    prop_assert_eq!(rig.full, 1, "the snapshot runs the full step");
    let want = full_render();
    let reads_after_snapshot = rig.kernel.lock().unwrap().reads;
    let mut revision = 1;
    for op in &ops {
        let before = spans_of(&peers);
        let cuts_before = rig.kernel.lock().unwrap().cuts.len();
        let changes = changes(op, &mut peers);
        rig.core(v1::core_message::Kind::Delta(v1::Delta {
            revision: revision + 1,
            base_revision: revision,
            changes,
        }));
        revision += 1;
        let after = spans_of(&peers);
        // Scoped: the step took the change without the table.
        prop_assert_eq!(rig.full, 1, "{:?}: a full firewall step", op);
        prop_assert_eq!(rig.scoped, revision as usize - 1);
        let k = rig.kernel.lock().unwrap();
        prop_assert_eq!(k.reads, reads_after_snapshot, "the table was read");
        prop_assert_eq!(k.writes, 1, "the table was written");
        // Incremental ≡ full: the table, the addresses, the flows cut.
        prop_assert_eq!(k.table.as_ref(), Some(&want));
        prop_assert_eq!(rig.step.vpn_addresses(), Some(&after));
        let gone: Vec<Span> = before.difference(&after).copied().collect();
        let cut: Vec<Span> = k.cuts[cuts_before..].concat();
        prop_assert_eq!(cut, gone, "{:?}: the addresses whose flows go", op);
        prop_assert_eq!(rig.obs.device.peers.len(), peers.len());
    }
    // A full step on the resulting location: nothing to write, nothing to cut.
    let (writes, cuts) = {
        let k = rig.kernel.lock().unwrap();
        (k.writes, k.cuts.len())
    };
    let p = policy();
    rig.step
        .run("periodic resync", Some(&p), &desired_of(&peers, 51820))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let k = rig.kernel.lock().unwrap();
    prop_assert_eq!(k.writes, writes);
    prop_assert_eq!(k.cuts.len(), cuts);
    prop_assert_eq!(rig.step.vpn_addresses(), Some(&spans_of(&peers)));
    Ok(())
}

fn initial() -> impl Strategy<Value = Peers> {
    proptest::collection::btree_map(1u8..10, 1u8..16, 0..6).prop_map(|m| {
        let mut peers: Peers = m.into_iter().map(|(n, mask)| (n, (mask, false))).collect();
        if let Some(p) = peers.values_mut().next() {
            p.1 = true;
        }
        peers
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn scoped_firewall_updates_equal_the_full_render(
        initial in initial(),
        ops in proptest::collection::vec(op(), 1..16),
    ) {
        run(initial, ops)?;
    }
}

#[test]
fn a_peer_added_and_removed_with_a_policy_is_scoped() {
    let mut initial = Peers::new();
    initial.insert(1, (1, true));
    run(
        initial,
        vec![
            Op::Upsert { n: 2, mask: 0b1001 },
            Op::Move { to: 2 },
            Op::Remove { n: 2 },
            Op::Remove { n: 1 },
        ],
    )
    .unwrap();
}
