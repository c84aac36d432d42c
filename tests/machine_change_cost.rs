//! A measurement, not a test of speed (nothing here asserts a time): the machine's own
//! cost of a one-peer change (a Core delta adding one peer, to the revision applied),
//! after a snapshot of N peers, with the actions executed by a thin in-memory executor
//! whose time is not counted. Run:
//! `cargo test --release --test machine_change_cost -- --ignored --nocapture`
//! (figures in BENCHMARKS.md, "Issue 11: one-peer change inside the agent").
#![allow(dead_code)]
#[allow(dead_code)]
mod machine_sim;
use gatehouse::agent::machine::{Action, Machine, Outcome};
use gatehouse::agent::steps::nothing_failed;
use gatehouse::backend::Backend as _;
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
}

fn exec(x: &mut X, a: Action) -> Option<Outcome> {
    Some(match a {
        Action::Read { .. } => Outcome::Read(Ok(Observed::clone(&x.obs))),
        Action::Apply { plan, .. } => {
            x.obs.apply(&plan);
            Outcome::Applied {
                applied: plan,
                outcomes: nothing_failed(),
            }
        }
        Action::CheckBackend => Outcome::BackendChecked(Ok(None)),
        Action::Firewall { .. } => Outcome::Firewall(Ok(())),
        Action::Save(_) => Outcome::Saved(Ok(())),
        Action::Append(_) => Outcome::Appended(Ok(0)),
        Action::Send { messages, .. } => Outcome::Sent(messages.len()),
        Action::Kick(_) => Outcome::Kicked(Ok(())),
        Action::InstallSourceRoutes { .. } => Outcome::RoutesInstalled(Ok(0)),
        Action::ClearSourceRoutes => Outcome::RoutesCleared(Ok(())),
        _ => return None,
    })
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

fn measure(n: u32) {
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
    };
    let mut t = Duration::ZERO;
    m.handle_start(now);
    turn(&mut m, &mut x, now, &mut t);
    let _ = m.handle_hello_wanted(now);
    m.handle_connected(now);
    turn(&mut m, &mut x, now, &mut t);
    let mut loc = location((1..=n).map(wpeer).collect(), None);
    loc.interface.as_mut().unwrap().addresses = vec!["10.255.255.1/8".into()];
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
    }
    times.sort();
    eprintln!(
        "N={n}: machine per one-peer change: median {:?} min {:?} max {:?}",
        times[10], times[0], times[20]
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
        measure(n);
    }
}
