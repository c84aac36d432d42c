//! The sync loop end to end, in process, without root: the reference Core on loopback and
//! agents on the in-memory backend.

#[path = "support/mod.rs"]
mod support;

use gatehouse::backend::Backend as _;
use gatehouse::model::Key;
use gatehouse::plan::Op;
use gatehouse_core::api::PeerPatch;
use gatehouse_proto::v1::{self, change::Kind, core_message};
use support::*;

fn kernel_keys(agent: &Agent) -> Vec<Key> {
    agent.backend.state().device.peers.keys().copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_snapshot_is_applied_and_acknowledged() {
    let core = Core::start().await;
    let (loc, token) = core.location(plain_location("first"), 3).await;
    let rev = core.revision(loc).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&core.url(), &token, dir.path()).await;

    agent.applied(rev).await;
    eventually("Core lists the applied revision", || async {
        let gws = core.admin.gateways(loc).await.unwrap();
        gws.len() == 1 && gws[0].connected && gws[0].applied_revision == rev
    })
    .await;
    let state = agent.backend.state();
    assert_eq!(state.device.peers.len(), 3);
    let link = state.link.expect("link created");
    assert!(link.up);
    assert_eq!(link.mtu, 1420);
    assert_eq!(link.addresses.len(), 2);
    let gw = &core.admin.gateways(loc).await.unwrap()[0];
    assert_eq!(gw.gateway_id, agent.status().gateway_id);
    assert!(agent.status().ready);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_added_changed_removed_are_one_operation_each() {
    let core = Core::start().await;
    let (loc, token) = core.location(plain_location("ops"), 2).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&core.url(), &token, dir.path()).await;
    agent.applied(core.revision(loc).await).await;
    agent.backend.clear_log();

    // Add.
    let added = core.admin.add_peer(loc, &peer(100)).await.unwrap();
    agent.applied(core.revision(loc).await).await;
    let ops = agent.backend.applied_ops();
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert!(matches!(&ops[0], Op::AddPeer(p) if p.public_key == key(100)));
    agent.backend.clear_log();

    // Change: keepalive and allowed IPs in one patch = one update of that peer.
    let patch = PeerPatch {
        allowed_ips: Some(vec!["10.9.9.9/32".into()]),
        persistent_keepalive: Some(25),
        ..Default::default()
    };
    core.admin.patch_peer(loc, added.id, &patch).await.unwrap();
    agent.applied(core.revision(loc).await).await;
    let ops = agent.backend.applied_ops();
    assert_eq!(ops.len(), 1, "{ops:?}");
    match &ops[0] {
        Op::UpdatePeer(u) => {
            assert_eq!(u.public_key, key(100));
            assert_eq!(u.persistent_keepalive, Some(25));
            assert_eq!(
                u.allowed_ips
                    .as_ref()
                    .unwrap()
                    .iter()
                    .next()
                    .unwrap()
                    .to_string(),
                "10.9.9.9/32"
            );
            assert!(u.preshared_key.is_none());
        }
        other => panic!("expected an update, got {other:?}"),
    }
    agent.backend.clear_log();

    // Remove.
    core.admin.delete_peer(loc, added.id).await.unwrap();
    agent.applied(core.revision(loc).await).await;
    assert_eq!(agent.backend.applied_ops(), vec![Op::RemovePeer(key(100))]);
    assert_eq!(kernel_keys(&agent).len(), 2);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_peers_in_one_bulk_call_are_one_revision() {
    let core = Core::start().await;
    let (loc, token) = core.location(plain_location("bulk"), 0).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&core.url(), &token, dir.path()).await;
    let before = core.revision(loc).await;
    agent.applied(before).await;
    agent.backend.clear_log();
    let writes_before = agent.backend.counters().device_writes;

    core.admin
        .add_peers(loc, &peer_list(0, 1000))
        .await
        .unwrap();
    let after = core.revision(loc).await;
    assert_eq!(after, before + 1, "one bulk call, one revision");
    agent.applied(after).await;
    assert_eq!(kernel_keys(&agent).len(), 1000);
    let ops = agent.backend.applied_ops();
    assert_eq!(ops.len(), 1000);
    assert!(ops.iter().all(|op| matches!(op, Op::AddPeer(_))));
    assert_eq!(
        agent.backend.counters().device_writes - writes_before,
        1,
        "one apply of one plan"
    );
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_restart_on_the_same_database_gives_an_empty_plan() {
    let mut core = Core::start().await;
    let (loc, token) = core.location(plain_location("restart"), 50).await;
    let rev = core.revision(loc).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&core.url(), &token, dir.path()).await;
    agent.applied(rev).await;
    let snapshots = agent.status().core.snapshots;
    agent.backend.clear_log();
    let counters = agent.backend.counters();

    core.restart().await;
    eventually("the agent resynced with the restarted Core", || async {
        let s = agent.status();
        s.core.connected && s.core.snapshots > snapshots
    })
    .await;
    eventually("the restarted Core lists the gateway connected", || async {
        let gws = core.admin.gateways(loc).await.unwrap();
        gws.len() == 1 && gws[0].connected && gws[0].applied_revision == rev
    })
    .await;
    assert_eq!(core.revision(loc).await, rev, "the revision survived");
    assert!(agent.backend.applied_ops().is_empty());
    assert_eq!(agent.backend.counters(), counters, "nothing written");
    assert_eq!(agent.status().last_reconcile_ops, 0);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_gap_asks_for_a_snapshot_and_converges() {
    let core = Core::start().await;
    let (loc, token) = core.location(plain_location("gap"), 2).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&core.url(), &token, dir.path()).await;
    agent.applied(core.revision(loc).await).await;
    let snapshots = agent.status().core.snapshots;

    core.core().drop_next_deltas(loc, 1);
    core.admin.add_peer(loc, &peer(10)).await.unwrap(); // lost on the way
    core.admin.add_peer(loc, &peer(11)).await.unwrap(); // base is not what the agent holds
    let rev = core.revision(loc).await;
    agent.applied(rev).await;
    let keys = kernel_keys(&agent);
    assert!(
        keys.contains(&key(10)) && keys.contains(&key(11)),
        "{keys:?}"
    );
    assert_eq!(keys.len(), 4);
    assert!(
        agent.status().core.snapshots > snapshots,
        "the gap was closed by a snapshot"
    );
    agent.stop().await.unwrap();
}

fn bad_peer(public_key: Vec<u8>, ips: &[&str]) -> v1::Peer {
    v1::Peer {
        public_key,
        allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_content_is_rejected_naming_the_item_and_only_its_removals_are_applied() {
    let core = Core::start().await;
    let (loc, token) = core.location(plain_location("invalid"), 3).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&core.url(), &token, dir.path()).await;
    let rev = core.revision(loc).await;
    agent.applied(rev).await;
    agent.backend.clear_log();
    let before = agent.backend.state();

    let good_iface = v1::Interface {
        private_key: vec![7; 32],
        listen_port: 51820,
        addresses: vec!["10.0.0.1/16".into()],
        mtu: 1420,
        fwmark: 0,
    };
    let existing = key(0).0.to_vec();
    let cases: Vec<(&str, Vec<v1::Change>, &str)> = vec![
        (
            "bad key",
            vec![Kind::UpsertPeer(bad_peer(vec![1; 31], &["10.200.0.1/32"]))],
            "peers[3].public_key",
        ),
        (
            "bad CIDR",
            vec![Kind::UpsertPeer(bad_peer(vec![1; 32], &["10.0.0.300/32"]))],
            "peers[3].allowed_ips[0]",
        ),
        (
            "allowed IP of another peer",
            vec![Kind::UpsertPeer(bad_peer(vec![1; 32], &["10.1.0.2/32"]))],
            "peers[3].allowed_ips[0]",
        ),
        (
            "port out of range",
            vec![Kind::SetInterface(v1::Interface {
                listen_port: 70000,
                ..good_iface.clone()
            })],
            "interface.listen_port",
        ),
        (
            "MTU out of range",
            vec![Kind::SetInterface(v1::Interface {
                mtu: 100,
                ..good_iface.clone()
            })],
            "interface.mtu",
        ),
    ]
    .into_iter()
    .map(|(name, kinds, item)| {
        let changes = kinds
            .into_iter()
            .map(|k| v1::Change { kind: Some(k) })
            .collect();
        (name, changes, item)
    })
    .collect();

    for (name, changes, item) in cases {
        core.core().inject(
            loc,
            v1::CoreMessage {
                kind: Some(core_message::Kind::Delta(v1::Delta {
                    revision: rev + 1,
                    base_revision: rev,
                    changes,
                })),
            },
        );
        expect_rejection(&core, loc, &agent, name, item).await;
    }
    assert!(agent.backend.applied_ops().is_empty(), "nothing applied");
    assert_eq!(agent.backend.state(), before, "backend unchanged");

    // A duplicate public key can only come in a snapshot (a delta upsert replaces). The
    // snapshot lists only key(0): its removals (keys 1 and 2) are applied all the same.
    let mut location = v1::Location {
        id: loc,
        name: "invalid".into(),
        interface: Some(good_iface),
        peers: vec![
            bad_peer(existing.clone(), &["10.1.0.2/32"]),
            bad_peer(existing, &["10.1.0.3/32"]),
        ],
        firewall: None,
        mfa: None,
    };
    core.core().inject(
        loc,
        v1::CoreMessage {
            kind: Some(core_message::Kind::Snapshot(v1::Snapshot {
                revision: rev + 1,
                location: Some(location.clone()),
            })),
        },
    );
    expect_rejection(
        &core,
        loc,
        &agent,
        "duplicate public key",
        "peers[1].public_key",
    )
    .await;

    eventually("the unlisted peers are removed", || async {
        kernel_keys(&agent) == vec![key(0)]
    })
    .await;
    let mut removed = agent.backend.applied_ops();
    removed.sort_by_key(|op| format!("{op:?}"));
    let mut want = vec![Op::RemovePeer(key(1)), Op::RemovePeer(key(2))];
    want.sort_by_key(|op| format!("{op:?}"));
    assert_eq!(removed, want, "only the removals applied");
    assert_eq!(
        agent.status().applied_revision,
        rev,
        "last good revision kept"
    );

    // The next real change: the held content is no longer the Core's revision, so the
    // delta is answered with a snapshot, which brings back what the Core still lists.
    location.peers.clear();
    core.admin.add_peer(loc, &peer(50)).await.unwrap();
    agent.applied(rev + 1).await;
    let mut want = vec![key(0), key(1), key(2), key(50)];
    want.sort();
    assert_eq!(kernel_keys(&agent), want);
    agent.stop().await.unwrap();
}

async fn expect_rejection(core: &Core, loc: u64, agent: &Agent, name: &str, item: &str) {
    eventually(&format!("{name}: rejection of {item} reported"), || async {
        let gws = core.admin.gateways(loc).await.unwrap();
        let named = gws[0]
            .last_error
            .as_ref()
            .is_some_and(|e| e.kind == "invalid" && e.rejected.iter().any(|r| r.item == item));
        let local = agent
            .status()
            .last_rejected
            .is_some_and(|r| r.items.iter().any(|i| i.starts_with(item)));
        named && local
    })
    .await;
    // Clear the local record so the next case is observed afresh.
    let gws = core.admin.gateways(loc).await.unwrap();
    assert_eq!(gws[0].applied_revision, agent.status().applied_revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_and_retried_with_growing_delays() {
    let core = Core::start().await;
    let (loc, _token) = core.location(plain_location("token"), 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&core.url(), "not-the-token", dir.path()).await;

    let mut ceilings = Vec::new();
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while ceilings.len() < 5 && tokio::time::Instant::now() < deadline {
        let _ = tokio::time::timeout(CONVERGE, agent.status.changed()).await;
        let s = agent.status();
        if let Some(c) = s.core.retry_ceiling_ms {
            if ceilings.last() != Some(&(s.core.consecutive_failures, c)) {
                ceilings.push((s.core.consecutive_failures, c));
            }
        }
    }
    let s = agent.status();
    assert!(s.core.consecutive_failures >= 5, "{s:?}");
    assert!(!s.core.connected);
    let error = s.core.last_error.unwrap_or_default();
    assert!(
        error.contains("Unauthenticated") || error.contains("token"),
        "{error}"
    );
    for pair in ceilings.windows(2) {
        assert!(pair[1].0 > pair[0].0, "failures counted: {ceilings:?}");
        assert!(pair[1].1 >= pair[0].1, "delays never shrink: {ceilings:?}");
    }
    assert!(
        ceilings.last().unwrap().1 > ceilings.first().unwrap().1,
        "delays grow: {ceilings:?}"
    );
    assert!(agent.is_running(), "no crash");
    assert!(core.admin.gateways(loc).await.unwrap().is_empty());
    assert_eq!(agent.status().applied_revision, 0);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_of_one_location_both_converge() {
    let core = Core::start().await;
    let (loc, token) = core.location(plain_location("pair"), 5).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Agent::start(&core.url(), &token, d1.path()).await;
    let token_b = core.admin.create_token(loc).await.unwrap();
    let b = Agent::start(&core.url(), &token_b, d2.path()).await;
    let both = |rev: u64| {
        let (a, b) = (&a, &b);
        let core = &core;
        async move {
            a.applied(rev).await;
            b.applied(rev).await;
            eventually("Core lists both gateways at the revision", || async {
                let gws = core.admin.gateways(loc).await.unwrap();
                gws.len() == 2 && gws.iter().all(|g| g.connected && g.applied_revision == rev)
            })
            .await;
        }
    };
    both(core.revision(loc).await).await;
    assert_ne!(a.status().gateway_id, b.status().gateway_id);

    let p = core.admin.add_peer(loc, &peer(77)).await.unwrap();
    both(core.revision(loc).await).await;
    core.admin
        .patch_peer(
            loc,
            p.id,
            &PeerPatch {
                persistent_keepalive: Some(15),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    both(core.revision(loc).await).await;
    core.admin.delete_peer(loc, p.id).await.unwrap();
    both(core.revision(loc).await).await;
    assert_eq!(a.backend.state().device, b.backend.state().device);
    assert_eq!(kernel_keys(&a).len(), 5);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// The offline policy counts the time without the Core across restarts: an agent
/// restarted every second, each run shorter than the limit, still removes the peers once
/// the total passes it (the count is kept in the state file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loop_does_not_defeat_the_offline_policy() {
    let mut core = Core::start().await;
    let (loc, token) = core.location(plain_location("offline-loop"), 2).await;
    let dir = tempfile::tempdir().unwrap();
    let backend = gatehouse::backend::memory::MemoryBackend::new("wgtest0");
    let mut s = settings(&core.url(), &token, dir.path());
    s.offline_remove_after = Some(std::time::Duration::from_secs(3));
    let mut agent = Agent::start_with(s.clone(), backend.clone()).await;
    agent.applied(core.revision(loc).await).await;
    core.stop().await;
    eventually("the agent noticed the Core is gone", || async {
        !agent.status().core.connected
    })
    .await;
    let started = tokio::time::Instant::now();
    while !agent.status().offline_removed {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "peers kept after 15 s of restarts"
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        agent.stop().await.unwrap();
        agent = Agent::start_with(s.clone(), backend.clone()).await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(backend.state().device.peers.is_empty());
    agent.stop().await.unwrap();
}

/// Each apply step failing on its own (fault injection in the memory backend): a peer
/// revoked meanwhile leaves the interface all the same, the failure is reported in the
/// status and to the Core (`Applied` names the step), and once the fault is gone the next
/// resync applies the rest and clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_never_keeps_a_revoked_peer() {
    use gatehouse::plan::Phase;
    use gatehouse_core::api::LocationPatch;
    for (phase, step) in [
        (Phase::Link, "link"),
        (Phase::Addresses, "addresses"),
        (Phase::Peers, "peers"),
        (Phase::Device, "device"),
    ] {
        let core = Core::start().await;
        let (loc, token) = core.location(plain_location(step), 3).await;
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(&core.url(), &token, dir.path()).await;
        agent.applied(core.revision(loc).await).await;
        agent
            .backend
            .fail_phase(phase, format!("injected {step} failure"));
        // A change that needs the failing step.
        match phase {
            Phase::Link => agent
                .backend
                .modify(|o| o.link.as_mut().unwrap().up = false),
            Phase::Addresses => {
                let patch = LocationPatch {
                    addresses: Some(vec![
                        "10.0.0.1/16".into(),
                        "fd00::1/64".into(),
                        "fd01::1/64".into(),
                    ]),
                    ..Default::default()
                };
                core.admin.patch_location(loc, &patch).await.unwrap();
            }
            Phase::Peers => {
                core.admin.add_peer(loc, &peer(10)).await.unwrap();
            }
            Phase::Device => {
                let patch = LocationPatch {
                    listen_port: Some(51999),
                    ..Default::default()
                };
                core.admin.patch_location(loc, &patch).await.unwrap();
            }
            Phase::PeerRemovals => unreachable!(),
        }
        eventually(&format!("{step}: the failure reported"), || async {
            agent
                .status()
                .failed_steps
                .iter()
                .any(|f| f.starts_with(&format!("{step}: ")))
        })
        .await;

        // A peer revoked now leaves at once.
        let victim = core.admin.peers(loc).await.unwrap()[0].clone();
        core.admin.delete_peer(loc, victim.id).await.unwrap();
        let victim_key = Key::from_base64(&victim.public_key).unwrap();
        eventually(&format!("{step}: the revoked peer gone"), || async {
            !kernel_keys(&agent).contains(&victim_key)
        })
        .await;
        let status = agent.status();
        assert_eq!(
            status.failed_steps.len(),
            1,
            "{step}: {:?}",
            status.failed_steps
        );
        // Addresses are a reason in the body only; the other steps make it unready.
        assert_eq!(
            status.ready,
            phase == Phase::Addresses,
            "{step}: {}",
            status.ready_reason
        );
        assert!(
            status.ready_reason.contains(step),
            "{step}: {}",
            status.ready_reason
        );
        if phase != Phase::Link {
            eventually(
                &format!("{step}: the Core told which step failed"),
                || async {
                    let gws = core.admin.gateways(loc).await.unwrap();
                    gws[0].last_error.as_ref().is_some_and(|e| {
                        e.rejected.iter().any(|r| r.item == format!("step.{step}"))
                    })
                },
            )
            .await;
        }

        // The fault is gone: the next resync completes the apply.
        agent.backend.clear_faults();
        let rev = core.revision(loc).await;
        agent.applied(rev).await;
        eventually(&format!("{step}: the failure cleared"), || async {
            let s = agent.status();
            s.failed_steps.is_empty() && s.ready
        })
        .await;
        let state = agent.backend.state();
        let link = state.link.as_ref().unwrap();
        match phase {
            Phase::Link => assert!(link.up),
            Phase::Addresses => assert!(link.addresses.contains(&"fd01::1/64".parse().unwrap())),
            Phase::Peers => assert!(state.device.peers.contains_key(&key(10))),
            Phase::Device => assert_eq!(state.device.listen_port, 51999),
            Phase::PeerRemovals => unreachable!(),
        }
        agent.stop().await.unwrap();
    }
}
