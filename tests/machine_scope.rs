//! The scoped change path (virtual time, `machine_sim`): a revision reached by deltas is
//! planned on the peers the deltas name only; after any sequence of such deltas, a full
//! plan against the interface is empty (nothing the scoped plans missed), and a scoped
//! change reads nothing and rewrites no state.

#[allow(dead_code)]
mod machine_sim;

use gatehouse::backend::Backend as _;
use gatehouse::plan::plan;
use gatehouse::validate::validate_location;
use gatehouse_proto::v1;
use machine_sim::*;
use proptest::prelude::*;

/// One change: upsert peer `n` with address variant `v`, or remove peer `n`.
#[derive(Clone, Debug)]
enum Change {
    Upsert { n: u8, v: u8, keepalive: u32 },
    Remove { n: u8 },
}

fn spec(n: u8, v: u8, keepalive: u32) -> v1::Peer {
    v1::Peer {
        id: n as u64,
        public_key: key(n).0.to_vec(),
        allowed_ips: vec![format!("10.0.{n}.{}/32", v + 1)],
        persistent_keepalive: keepalive,
        ..Default::default()
    }
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (1u8..12, 0u8..3, 0u32..2).prop_map(|(n, v, keepalive)| Change::Upsert {
            n,
            v,
            keepalive: keepalive * 25
        }),
        (1u8..12).prop_map(|n| Change::Remove { n }),
    ]
}

/// Sends `batch` as deltas, one per change, in one batch of Core messages.
fn send(sim: &mut Sim, batch: &[Change]) {
    for c in batch {
        let mut loc = sim.core.location.clone().unwrap();
        let kind = match c {
            Change::Upsert { n, v, keepalive } => {
                let p = spec(*n, *v, *keepalive);
                loc.peers.retain(|q| q.public_key != p.public_key);
                loc.peers.push(p.clone());
                v1::change::Kind::UpsertPeer(p)
            }
            Change::Remove { n } => {
                loc.peers.retain(|q| q.public_key != key(*n).0);
                v1::change::Kind::RemovePeer(key(*n).0.to_vec())
            }
        };
        let r = sim.core.revision;
        sim.core.revision = r + 1;
        sim.core.location = Some(loc);
        sim.core.outbox.push(v1::CoreMessage {
            kind: Some(v1::core_message::Kind::Delta(v1::Delta {
                revision: r + 1,
                base_revision: r,
                changes: vec![v1::Change { kind: Some(kind) }],
            })),
        });
    }
    sim.deliver();
}

fn full_plan_len(sim: &mut Sim) -> usize {
    let loc = sim.core.location.as_ref().unwrap();
    let valid = validate_location(loc).expect("the Core's location is valid");
    plan(&valid.desired, &sim.kernel.observe().unwrap()).len()
}

proptest! {
    #[test]
    fn after_scoped_changes_a_full_plan_is_empty(
        batches in proptest::collection::vec(proptest::collection::vec(change(), 1..4), 1..12)
    ) {
        let mut sim = Sim::new(settings());
        sim.core.publish(location((1..6).map(|n| spec(n, 0, 0)).collect(), None));
        sim.start();
        sim.connect();
        for batch in &batches {
            let from = sim.trace.len();
            send(&mut sim, batch);
            prop_assert_eq!(sim.status.applied_revision, sim.core.revision);
            prop_assert_eq!(full_plan_len(&mut sim), 0, "batch {:?}", batch);
            // Planned on the model: no read of the interface.
            prop_assert_eq!(sim.count_since(from, "read"), 0, "{:?}", &sim.trace[from..]);
        }
    }
}

#[test]
fn with_the_firewall_off_no_step_builds_the_desired_state_for_it() {
    let mut sim = Sim::new(settings());
    sim.core
        .publish(location((1..6).map(|n| spec(n, 0, 0)).collect(), None));
    sim.start();
    sim.connect();
    let from = sim.trace.len();
    send(
        &mut sim,
        &[Change::Upsert {
            n: 7,
            v: 0,
            keepalive: 0,
        }],
    );
    assert!(sim.has(key(7)));
    assert_eq!(sim.count_since(from, "save"), 0, "{:?}", &sim.trace[from..]);
    // Two resyncs (full plans).
    sim.advance(21 * S);
    assert!(
        sim.count_since(from, "read") >= 2,
        "{:?}",
        &sim.trace[from..]
    );
    // The first apply removed a table left from before (the step's clean-up); no step,
    // full or scoped, took a copy of the desired state.
    let full = sim.count_since(0, "firewall")
        - sim.count_since(0, "firewall peers")
        - sim.count_since(0, "firewall off");
    assert_eq!(full, 0, "{:?}", &sim.trace);
    assert_eq!(sim.count_since(0, "firewall peers"), 0, "{:?}", &sim.trace);
    assert_eq!(sim.count_since(0, "firewall off"), 1, "{:?}", &sim.trace);
}

/// A read that fails midway (a tick's) keeps the model: every peer stays in it, the
/// failure shows, and a change is still planned on it (no read) and applied.
#[test]
fn a_read_failing_midway_keeps_the_model_and_a_change_goes_on() {
    let mut sim = Sim::new(settings());
    sim.core
        .publish(location((1..6).map(|n| spec(n, 0, 0)).collect(), None));
    sim.start();
    sim.connect();
    sim.fail_reads = true;
    let from = sim.trace.len();
    sim.advance(3 * S);
    assert!(
        sim.count_since(from, "read") >= 1,
        "{:?}",
        &sim.trace[from..]
    );
    assert!(sim.status.backend_error.is_some());
    assert_eq!(sim.status.kernel_peers, 5);
    let from = sim.trace.len();
    send(
        &mut sim,
        &[Change::Upsert {
            n: 7,
            v: 0,
            keepalive: 0,
        }],
    );
    assert!(sim.has(key(7)));
    assert_eq!(sim.status.applied_revision, sim.core.revision);
    assert_eq!(sim.count_since(from, "read"), 0, "{:?}", &sim.trace[from..]);
}

/// The firewall actions of one scoped change, after the first apply, with the firewall
/// `on` in the settings and the location's `policy`: (full steps, scoped steps).
fn firewall_steps_of_one_change(on: bool, policy: Option<v1::FirewallPolicy>) -> (usize, usize) {
    let mut s = settings();
    s.firewall.enabled = on;
    let mut sim = Sim::new(s);
    let mut loc = location((1..6).map(|n| spec(n, 0, 0)).collect(), None);
    loc.firewall = policy;
    sim.core.publish(loc);
    sim.start();
    sim.connect();
    let from = sim.trace.len();
    send(
        &mut sim,
        &[Change::Upsert {
            n: 7,
            v: 0,
            keepalive: 0,
        }],
    );
    assert!(sim.has(key(7)));
    let scoped = sim.count_since(from, "firewall peers");
    (sim.count_since(from, "firewall") - scoped, scoped)
}

fn policy(enabled: bool) -> v1::FirewallPolicy {
    v1::FirewallPolicy {
        enabled,
        default_verdict: v1::Verdict::Accept as i32,
        rules: vec![],
    }
}

#[test]
fn without_an_enforced_policy_a_scoped_change_takes_the_scoped_firewall_step() {
    // The reference Core sends a location without a policy as a disabled one. The step
    // still runs (it cuts the flows of addresses that left), never the full one: no copy of
    // the desired state, no read of the table.
    assert_eq!(
        firewall_steps_of_one_change(true, Some(policy(false))),
        (0, 1)
    );
    assert_eq!(firewall_steps_of_one_change(true, None), (0, 1));
}

#[test]
fn with_the_firewall_off_in_the_settings_a_scoped_change_skips_the_firewall_step() {
    assert_eq!(
        firewall_steps_of_one_change(false, Some(policy(true))),
        (0, 0)
    );
    assert_eq!(
        firewall_steps_of_one_change(false, Some(policy(false))),
        (0, 0)
    );
}

#[test]
fn an_enforced_policy_takes_the_scoped_firewall_step_for_each_change() {
    assert_eq!(
        firewall_steps_of_one_change(true, Some(policy(true))),
        (0, 1)
    );
}
