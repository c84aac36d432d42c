//! A measurement, not a test of speed (nothing here asserts a time): the machine's own
//! cost of a one-peer change (a Core delta adding one peer, to the revision applied),
//! after a snapshot of N peers, with the actions executed by a thin in-memory executor
//! whose time is not counted; with a firewall policy too, where the driver's firewall step
//! (over nftables kept in memory) is timed on its own. Run:
//! `cargo test --release --test machine_change_cost -- --ignored --nocapture`
//! (figures in BENCHMARKS.md, "Issue 11: one-peer change inside the agent").
#![allow(dead_code)]
#[allow(dead_code)]
mod machine_sim;
use gatehouse::agent::firewall::{FirewallSettings, FirewallStep};
use gatehouse::agent::machine::{Action, Machine, Outcome};
use gatehouse::agent::steps::nothing_failed;
use gatehouse::backend::Backend as _;
use gatehouse::firewall::nft;
use gatehouse::model::Observed;
use gatehouse::plan::KernelModel;
use gatehouse_proto::v1;
use machine_sim::*;
use std::time::{Duration, Instant};

fn wkey(n: u32) -> gatehouse::model::Key {
    let mut k = [9u8; 32];
    k[..4].copy_from_slice(&n.to_be_bytes());
    gatehouse::model::Key(k)
}
fn wpeer(n: u32) -> v1::Peer {
    v1::Peer {
        id: n as u64,
        public_key: wkey(n).0.to_vec(),
        allowed_ips: vec![format!(
            "10.{}.{}.{}/32",
            (n >> 16) & 255,
            (n >> 8) & 255,
            n & 255
        )],
        ..Default::default()
    }
}

struct X {
    /// The interface, applied to as the kernel would (O(k log N) per apply).
    obs: KernelModel,
    rev: u64,
    /// The driver's firewall step over nftables kept in memory, and its time.
    fw: FirewallStep,
    fw_time: Duration,
}

/// nftables in memory: the step's render, read-back and comparison run, the kernel's part
/// does not.
struct Tables(Option<nft::Image>);

impl gatehouse::agent::firewall::Tables for Tables {
    fn read(&mut self, _: &str) -> Result<Option<nft::Image>, nft::NftError> {
        Ok(self.0.clone())
    }
    fn replace(
        &mut self,
        rs: &gatehouse::firewall::Ruleset,
    ) -> Result<nft::WriteStats, nft::NftError> {
        self.0 = Some(nft::image(rs)?);
        Ok(nft::WriteStats::default())
    }
    fn remove(&mut self, _: &str) -> Result<nft::WriteStats, nft::NftError> {
        self.0 = None;
        Ok(nft::WriteStats::default())
    }
    fn cut(&mut self, _: &gatehouse::firewall::conntrack::Cut) -> std::io::Result<usize> {
        Ok(0)
    }
}

fn exec(x: &mut X, a: Action) -> Option<Outcome> {
    Some(match a {
        Action::Read { mut into, .. } => {
            into.model().refresh_with(Observed::clone(&x.obs));
            Outcome::Read(into, Ok(()))
        }
        Action::Apply { plan, .. } => {
            x.obs.apply(&plan);
            Outcome::Applied {
                applied: plan,
                outcomes: nothing_failed(),
            }
        }
        Action::CheckBackend => Outcome::BackendChecked(Ok(None)),
        // The driver's firewall step, timed on its own.
        Action::Firewall {
            trigger,
            policy,
            desired,
        } => {
            let s = Instant::now();
            let r = x.fw.run(&trigger, policy.as_ref(), &desired);
            x.fw_time += s.elapsed();
            Outcome::Firewall(r.map_err(|e| e.to_string()))
        }
        Action::FirewallOff { trigger } => {
            x.fw.run_off(&trigger);
            Outcome::Firewall(Ok(()))
        }
        Action::FirewallPeers { trigger, change } => {
            let s = Instant::now();
            let r = x.fw.run_peers(&trigger, &change);
            x.fw_time += s.elapsed();
            Outcome::Firewall(r.map_err(|e| e.to_string()))
        }
        Action::Save => Outcome::Saved(Ok(())),
        Action::Append(_) => Outcome::Appended(Ok(0)),
        Action::Send { messages, .. } => Outcome::Sent(messages.len()),
        Action::SendStats(_) => Outcome::Sent(1),
        Action::Kick(_) => Outcome::Kicked(Ok(())),
        Action::InstallSourceRoutes { .. } => Outcome::RoutesInstalled(Ok(0)),
        Action::ClearSourceRoutes => Outcome::RoutesCleared(Ok(())),
        _ => return None,
    })
}

/// The policy of the firewall variant: a default drop and a few rules.
fn policy() -> v1::FirewallPolicy {
    v1::FirewallPolicy {
        enabled: true,
        default_verdict: v1::Verdict::Drop as i32,
        rules: vec![v1::FirewallRule {
            priority: 1,
            sources: vec!["10.0.0.0/8".into()],
            destinations: vec!["192.168.0.0/16".into()],
            ports: vec![v1::PortRange {
                start: 443,
                end: 443,
            }],
            protocols: vec![v1::Protocol::Tcp as i32],
            verdict: v1::Verdict::Accept as i32,
            comment: String::new(),
        }],
    }
}

fn turn(m: &mut Machine, x: &mut X, now: gatehouse::agent::machine::Now, t: &mut Duration) {
    loop {
        let s = Instant::now();
        let a = m.poll_action();
        *t += s.elapsed();
        let Some(a) = a else { break };
        if let Some(o) = exec(x, a) {
            let s = Instant::now();
            m.handle_outcome(o, now);
            *t += s.elapsed();
        }
    }
}

fn measure(n: u32, firewall: Option<v1::FirewallPolicy>) {
    let with_policy = firewall.is_some();
    let sim = Sim::new(settings());
    let now = sim.now();
    let mut m = Machine::new(settings(), "gw".into(), None, None, vec![], 1, now);
    let mut x = X {
        obs: KernelModel::new(
            gatehouse::backend::memory::MemoryBackend::new("wgsim0")
                .observe()
                .unwrap(),
        ),
        rev: 1,
        fw: FirewallStep::new(
            "wgsim0",
            FirewallSettings {
                enabled: true,
                masquerade: false,
            },
            Box::new(Tables(None)),
        ),
        fw_time: Duration::ZERO,
    };
    let mut t = Duration::ZERO;
    m.handle_start(now);
    turn(&mut m, &mut x, now, &mut t);
    let _ = m.handle_hello_wanted(now);
    m.handle_connected(now);
    turn(&mut m, &mut x, now, &mut t);
    let mut loc = location((1..=n).map(wpeer).collect(), None);
    loc.interface.as_mut().unwrap().addresses = vec!["10.255.255.1/8".into()];
    loc.firewall = firewall;
    m.handle_core_message(
        v1::CoreMessage {
            kind: Some(v1::core_message::Kind::Snapshot(v1::Snapshot {
                revision: 1,
                location: Some(loc),
            })),
        },
        now,
    );
    turn(&mut m, &mut x, now, &mut t);
    m.handle_core_batch_end(now);
    turn(&mut m, &mut x, now, &mut t);
    assert_eq!(x.obs.device.peers.len(), n as usize);
    let mut times = vec![];
    let mut fw_times = vec![];
    for i in 0..21u32 {
        let r = x.rev;
        x.rev += 1;
        let msg = v1::CoreMessage {
            kind: Some(v1::core_message::Kind::Delta(v1::Delta {
                revision: r + 1,
                base_revision: r,
                changes: vec![v1::Change {
                    kind: Some(v1::change::Kind::UpsertPeer(wpeer(n + 1 + i))),
                }],
            })),
        };
        let mut mt = Duration::ZERO;
        x.fw_time = Duration::ZERO;
        let s = Instant::now();
        m.handle_core_message(msg, now);
        mt += s.elapsed();
        turn(&mut m, &mut x, now, &mut mt);
        let s = Instant::now();
        m.handle_core_batch_end(now);
        mt += s.elapsed();
        turn(&mut m, &mut x, now, &mut mt);
        assert!(x.obs.device.peers.contains_key(&wkey(n + 1 + i)));
        times.push(mt);
        fw_times.push(x.fw_time);
    }
    times.sort();
    fw_times.sort();
    eprintln!(
        "N={n}{}: machine per one-peer change: median {:?} min {:?} max {:?}",
        if with_policy { " with a policy" } else { "" },
        times[10],
        times[0],
        times[20]
    );
    eprintln!(
        "N={n}{}: driver's firewall step (nftables in memory) per change: median {:?} min {:?} max {:?}",
        if with_policy { " with a policy" } else { "" },
        fw_times[10],
        fw_times[0],
        fw_times[20]
    );
}

#[test]
#[ignore = "a measurement: run it in release with --ignored --nocapture"]
fn one_peer_change_cost_inside_the_machine() {
    let sizes: Vec<u32> = std::env::var("GATEHOUSE_CHANGE_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000]);
    for n in sizes {
        measure(n, None);
    }
}

#[test]
#[ignore = "a measurement: run it in release with --ignored --nocapture"]
fn one_peer_change_cost_inside_the_machine_with_a_policy() {
    let sizes: Vec<u32> = std::env::var("GATEHOUSE_CHANGE_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000]);
    for n in sizes {
        measure(n, Some(policy()));
    }
}
