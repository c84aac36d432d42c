//! The gateway protocol against an in-process Core: authentication, Hello ordering,
//! deltas to every gateway, events, Applied, fault injection.

mod common;

use std::time::Instant;

use common::*;
use gatehouse_core::api::{LocationPatch, PeerPatch};
use gatehouse_proto::v1 as pb;
use pb::change::Kind as C;
use pb::core_message::Kind as M;
use pb::gateway_message::Kind as G;
use tonic::Code;

#[tokio::test]
async fn missing_or_wrong_token_is_unauthenticated() {
    let t = TestCore::start().await;
    let (_loc, token) = t.location(false).await;
    let e = Gw::open(t.grpc(), None).await.err().expect("refused");
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = Gw::open(t.grpc(), Some("ght_wrong"))
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), Code::Unauthenticated);
    // The right token is accepted.
    let (_gw, _ack, snap) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    assert!(snap.revision >= 1);
}

#[tokio::test]
async fn first_message_must_be_hello() {
    let t = TestCore::start().await;
    let (_loc, token) = t.location(false).await;
    let mut gw = Gw::open(t.grpc(), Some(&token)).await.unwrap();
    gw.send(G::SnapshotRequest(pb::SnapshotRequest::default()))
        .await;
    assert_eq!(gw.next().await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn hello_gets_event_ack_then_the_whole_location() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let mut p = peer(1);
    p.preshared_key = Some(key());
    p.persistent_keepalive = 25;
    p.allowed_ips = vec![" 10.9.0.0/24".into(), "fd09::5".into()];
    let added = t.admin.add_peer(loc, &p).await.unwrap();
    let (_gw, ack, snap) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    assert_eq!(ack.up_to_seq, 0);
    assert_eq!(snap.revision, t.revision(loc).await);
    let l = snap.location.unwrap();
    assert_eq!(l.id, loc);
    let iface = l.interface.unwrap();
    assert_eq!(iface.listen_port, 51820);
    assert_eq!(iface.mtu, 1420);
    assert_eq!(iface.private_key.len(), 32);
    assert_eq!(iface.addresses, vec!["10.8.0.1/24", "fd08::1/64"]);
    assert_eq!(l.peers.len(), 1);
    let sp = &l.peers[0];
    assert_eq!(sp.public_key, raw(&p.public_key));
    assert_eq!(sp.preshared_key, raw(p.preshared_key.as_ref().unwrap()));
    assert_eq!(sp.allowed_ips, vec!["10.9.0.0/24", "fd09::5/128"]);
    assert_eq!(sp.persistent_keepalive, 25);
    assert_eq!(sp.id, added.id);
    assert_eq!(sp.mfa_session, 0);
    assert!(!l.mfa.unwrap().enabled);
}

#[tokio::test]
async fn one_change_is_one_delta_to_every_gateway() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let (mut a, _, sa) = Gw::hello(t.grpc(), &token, "gw-a", vec![]).await;
    let (mut b, _, sb) = Gw::hello(
        t.grpc(),
        &t.admin.create_token(loc).await.unwrap(),
        "gw-b",
        vec![],
    )
    .await;
    assert_eq!(sa.revision, sb.revision);
    let base = sa.revision;

    let p = peer(1);
    t.admin.add_peer(loc, &p).await.unwrap();
    // A marker change: if the first change had produced two deltas, the second delta
    // each gateway sees would not be the marker.
    t.admin
        .patch_location(
            loc,
            &LocationPatch {
                name: Some("renamed".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for gw in [&mut a, &mut b] {
        let d = gw.delta().await;
        assert_eq!((d.revision, d.base_revision), (base + 1, base));
        assert_eq!(d.changes.len(), 1);
        match &d.changes[0].kind {
            Some(C::UpsertPeer(sp)) => assert_eq!(sp.public_key, raw(&p.public_key)),
            other => panic!("expected an upsert, got {other:?}"),
        }
        let marker = gw.delta().await;
        assert_eq!(
            (marker.revision, marker.base_revision),
            (base + 2, base + 1)
        );
    }
}

#[tokio::test]
async fn each_update_kind_is_sent_as_its_own_change() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let added = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let (mut gw, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;

    // Patch with a new public key: remove the old, upsert the new.
    let new_key = key();
    t.admin
        .patch_peer(
            loc,
            added.id,
            &PeerPatch {
                public_key: Some(new_key.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let d = gw.delta().await;
    assert!(matches!(&d.changes[0].kind, Some(C::RemovePeer(k)) if *k == raw(&added.public_key)));
    assert!(matches!(&d.changes[1].kind, Some(C::UpsertPeer(p)) if p.public_key == raw(&new_key)));

    t.admin.delete_peer(loc, added.id).await.unwrap();
    let d = gw.delta().await;
    assert_eq!(d.changes.len(), 1);
    assert!(matches!(&d.changes[0].kind, Some(C::RemovePeer(k)) if *k == raw(&new_key)));

    t.admin
        .patch_location(
            loc,
            &LocationPatch {
                listen_port: Some(51821),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let d = gw.delta().await;
    assert!(matches!(&d.changes[0].kind, Some(C::SetInterface(i)) if i.listen_port == 51821));
}

#[tokio::test]
async fn bulk_add_of_a_thousand_peers_is_one_revision() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let (mut gw, _, snap) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let peers: Vec<_> = (0..1000).map(peer).collect();
    let started = Instant::now();
    let added = t.admin.add_peers(loc, &peers).await.unwrap();
    eprintln!("bulk add of 1000 peers over HTTP: {:?}", started.elapsed());
    assert_eq!(added.len(), 1000);
    assert_eq!(t.revision(loc).await, snap.revision + 1);
    let d = gw.delta().await;
    assert_eq!(
        (d.revision, d.base_revision),
        (snap.revision + 1, snap.revision)
    );
    assert_eq!(d.changes.len(), 1000);
    // Answered in order, each with its id.
    for (a, p) in added.iter().zip(&peers) {
        assert_eq!(a.public_key, p.public_key);
    }
}

#[tokio::test]
async fn events_in_hello_are_processed_before_the_snapshot_and_stored_once() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(true).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let b = t.admin.add_peer(loc, &peer(2)).await.unwrap();
    let sa = t.admin.start_mfa_session(loc, a.id, None).await.unwrap();
    let sb = t.admin.start_mfa_session(loc, b.id, None).await.unwrap();
    assert_ne!(sa.session_id, sb.session_id);
    assert!(sa.session_id != 0 && sb.session_id != 0);

    // Another gateway of the location, connected throughout.
    let (mut other, _, before) = Gw::hello(
        t.grpc(),
        &t.admin.create_token(loc).await.unwrap(),
        "gw-other",
        vec![],
    )
    .await;
    assert_eq!(snapshot_keys(&before).len(), 2);

    // gw-1 removed A for inactivity while the Core was away; a stale event for B (an
    // older session) must not remove B.
    let events = vec![
        mfa_event(7, &a.public_key, sa.session_id),
        mfa_event(8, &b.public_key, sb.session_id + 100),
    ];
    let (gw, ack, snap) = Gw::hello(t.grpc(), &token, "gw-1", events.clone()).await;
    assert_eq!(ack.up_to_seq, 8);
    assert_eq!(snapshot_keys(&snap), vec![b.public_key.clone()]);
    let d = other.delta().await;
    assert_eq!(d.base_revision, before.revision);
    assert!(
        matches!(&d.changes[..], [pb::Change { kind: Some(C::RemovePeer(k)) }] if *k == raw(&a.public_key))
    );

    // gw-1 does not get the delta of its own event after the snapshot that includes it:
    // its next delta is the following revision.
    let mut gw = gw;
    t.admin.add_peer(loc, &peer(3)).await.unwrap();
    let next = gw.delta().await;
    assert_eq!(
        (next.revision, next.base_revision),
        (snap.revision + 1, snap.revision)
    );
    assert_eq!(other.delta().await.revision, snap.revision + 1);

    // The same events again (the gateway did not see the ack): stored once, no new revision.
    drop(gw);
    let revision = t.revision(loc).await;
    let (_gw, ack, snap) = Gw::hello(t.grpc(), &token, "gw-1", events).await;
    assert_eq!(ack.up_to_seq, 8);
    assert_eq!(snap.revision, revision);
    let stored = t.admin.events(loc).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].seq, 7);
    assert_eq!(stored[0].reason, "mfa_inactive");
    assert_eq!(stored[0].peer_id, Some(a.id));
    assert_eq!(stored[0].gateway_id, "gw-1");
    assert_eq!(stored[0].last_handshake, Some(1_700_000_000_000));
    let peers = t.admin.peers(loc).await.unwrap();
    let pa = peers.iter().find(|p| p.id == a.id).unwrap();
    assert!(pa.mfa_session.is_none() && !pa.active);
    assert!(peers.iter().find(|p| p.id == b.id).unwrap().active);
}

#[tokio::test]
async fn a_later_peer_event_is_acked_and_removes_the_peer_for_other_gateways() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(true).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let s = t.admin.start_mfa_session(loc, a.id, None).await.unwrap();
    let (mut gw, _, snap) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    assert_eq!(
        snap.location.as_ref().unwrap().peers[0].mfa_session,
        s.session_id
    );
    assert_eq!(
        snap.location.as_ref().unwrap().peers[0].preshared_key,
        raw(&s.preshared_key)
    );
    let (mut other, _, _) = Gw::hello(
        t.grpc(),
        &t.admin.create_token(loc).await.unwrap(),
        "gw-2",
        vec![],
    )
    .await;
    gw.send(G::PeerEvent(mfa_event(3, &a.public_key, s.session_id)))
        .await;
    // The sender gets the delta (removing what it already removed is harmless) and the ack.
    let mut got_ack = false;
    let mut got_delta = false;
    for _ in 0..2 {
        match gw.next().await.unwrap() {
            M::EventAck(ack) => {
                assert_eq!(ack.up_to_seq, 3);
                got_ack = true;
            }
            M::Delta(_) => got_delta = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got_ack && got_delta);
    let d = other.delta().await;
    assert!(matches!(
        &d.changes[..],
        [pb::Change {
            kind: Some(C::RemovePeer(_))
        }]
    ));
}

#[tokio::test]
async fn mfa_session_start_and_end_add_and_remove_the_peer() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(true).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let (mut gw, _, snap) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    assert!(snapshot_keys(&snap).is_empty(), "no session, not desired");
    let psk = key();
    let s = t
        .admin
        .start_mfa_session(loc, a.id, Some(&psk))
        .await
        .unwrap();
    assert_eq!(s.preshared_key, psk);
    let d = gw.delta().await;
    match &d.changes[..] {
        [pb::Change {
            kind: Some(C::UpsertPeer(p)),
        }] => {
            assert_eq!(p.preshared_key, raw(&psk));
            assert_eq!(p.mfa_session, s.session_id);
        }
        other => panic!("unexpected {other:?}"),
    }
    t.admin.end_mfa_session(loc, a.id).await.unwrap();
    let d = gw.delta().await;
    assert!(
        matches!(&d.changes[..], [pb::Change { kind: Some(C::RemovePeer(k)) }] if *k == raw(&a.public_key))
    );
    // Ending it again: nothing to end.
    let e = t.admin.end_mfa_session(loc, a.id).await.unwrap_err();
    assert_eq!(e.status().map(|s| s.as_u16()), Some(404));
}

#[tokio::test]
async fn applied_updates_the_gateways_list() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let (gw, _, snap) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    gw.send(G::Applied(pb::Applied {
        revision: snap.revision,
        attempted_revision: snap.revision,
        error: None,
    }))
    .await;
    eventually("applied revision recorded", || async {
        let g = t.admin.gateways(loc).await.unwrap();
        g.len() == 1 && g[0].applied_revision == snap.revision
    })
    .await;
    let g = &t.admin.gateways(loc).await.unwrap()[0];
    assert_eq!(
        (g.gateway_id.as_str(), g.name.as_str(), g.version.as_str()),
        ("gw-1", "host-gw-1", "0.1.0")
    );
    assert!(g.connected && g.last_error.is_none() && g.last_seen > 0);

    gw.send(G::Applied(pb::Applied {
        revision: snap.revision,
        attempted_revision: snap.revision + 1,
        error: Some(pb::ApplyError {
            kind: pb::ApplyErrorKind::Invalid as i32,
            message: "bad CIDR".into(),
            rejected: vec![pb::Rejection {
                item: "peers[3].allowed_ips[1]".into(),
                reason: "not a CIDR".into(),
            }],
        }),
    }))
    .await;
    eventually("error recorded", || async {
        t.admin.gateways(loc).await.unwrap()[0].last_error.is_some()
    })
    .await;
    let g = &t.admin.gateways(loc).await.unwrap()[0];
    assert_eq!(
        g.applied_revision, snap.revision,
        "a failure does not move the applied revision"
    );
    let e = g.last_error.as_ref().unwrap();
    assert_eq!(
        (e.kind.as_str(), e.attempted_revision),
        ("invalid", snap.revision + 1)
    );
    assert_eq!(e.rejected[0].item, "peers[3].allowed_ips[1]");

    // Success clears the error; closing the stream clears `connected`.
    gw.send(G::Applied(pb::Applied {
        revision: snap.revision,
        attempted_revision: snap.revision,
        error: None,
    }))
    .await;
    eventually("error cleared", || async {
        t.admin.gateways(loc).await.unwrap()[0].last_error.is_none()
    })
    .await;
    drop(gw);
    eventually("disconnected", || async {
        !t.admin.gateways(loc).await.unwrap()[0].connected
    })
    .await;
}

#[tokio::test]
async fn the_same_gateway_reconnecting_replaces_its_old_stream() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let (mut old, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let (mut new, _, snap) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    assert_eq!(old.next().await.unwrap_err().code(), Code::Aborted);
    t.admin.add_peer(loc, &peer(1)).await.unwrap();
    assert_eq!(new.delta().await.base_revision, snap.revision);
    let g = t.admin.gateways(loc).await.unwrap();
    assert_eq!(g.len(), 1);
    assert!(g[0].connected);
}

#[tokio::test]
async fn dropped_deltas_leave_a_gap_that_a_snapshot_request_repairs() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let (mut gw, _, snap) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    t.core.drop_next_deltas(loc, 1);
    let lost = peer(1);
    t.admin.add_peer(loc, &lost).await.unwrap();
    t.admin.add_peer(loc, &peer(2)).await.unwrap();
    let d = gw.delta().await;
    assert_eq!(
        (d.revision, d.base_revision),
        (snap.revision + 2, snap.revision + 1)
    );
    gw.send(G::SnapshotRequest(pb::SnapshotRequest {
        held_revision: snap.revision,
        reason: "gap".into(),
    }))
    .await;
    let s = gw.snapshot().await;
    assert_eq!(s.revision, snap.revision + 2);
    assert!(snapshot_keys(&s).contains(&lost.public_key));
}

#[tokio::test]
async fn injected_messages_reach_every_gateway_of_the_location() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let (mut a, _, _) = Gw::hello(t.grpc(), &token, "gw-a", vec![]).await;
    let (mut b, _, _) = Gw::hello(
        t.grpc(),
        &t.admin.create_token(loc).await.unwrap(),
        "gw-b",
        vec![],
    )
    .await;
    let msg = pb::CoreMessage {
        kind: Some(M::Delta(pb::Delta {
            revision: 99,
            base_revision: 42,
            changes: vec![],
        })),
    };
    t.core.inject(loc, msg);
    for gw in [&mut a, &mut b] {
        let d = gw.delta().await;
        assert_eq!((d.revision, d.base_revision), (99, 42));
    }
}

#[tokio::test]
async fn stop_ends_open_streams_and_returns() {
    let t = TestCore::start().await;
    let (_loc, token) = t.location(false).await;
    let (mut gw, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let started = Instant::now();
    let TestCore {
        core, dir: _dir, ..
    } = t;
    core.stop().await;
    eprintln!("stop with one open stream took {:?}", started.elapsed());
    assert_eq!(gw.next().await.unwrap_err().code(), Code::Unavailable);
}

fn active_stats(public_key: &str, rx: u64, handshake_ms: i64) -> pb::Stats {
    pb::Stats {
        collected_at_ms: handshake_ms,
        peers: vec![pb::PeerStats {
            public_key: raw(public_key),
            rx_bytes: rx,
            tx_bytes: rx,
            last_handshake_ms: handshake_ms,
            counter_epoch: 7,
            ..Default::default()
        }],
        more: false,
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn activity_on_one_gateway_is_relayed_to_the_others() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(true).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    t.admin.start_mfa_session(loc, a.id, None).await.unwrap();
    let (gw1, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let (mut gw2, _, _) = Gw::hello(
        t.grpc(),
        &t.admin.create_token(loc).await.unwrap(),
        "gw-2",
        vec![],
    )
    .await;
    let hs = unix_ms();
    gw1.send(G::Stats(active_stats(&a.public_key, 500, hs)))
        .await;
    let relayed = gw2.activity().await;
    assert_eq!(relayed.peers.len(), 1);
    assert_eq!(relayed.peers[0].public_key, raw(&a.public_key));
    assert_eq!(relayed.peers[0].last_active_ms, hs);
    // Unchanged counters and handshake are no new activity: nothing relayed. Growth is.
    gw1.send(G::Stats(active_stats(&a.public_key, 500, hs)))
        .await;
    let mut later = active_stats(&a.public_key, 900, hs);
    later.collected_at_ms = hs + 1_000;
    gw1.send(G::Stats(later)).await;
    let relayed = gw2.activity().await;
    assert_eq!(relayed.peers[0].last_active_ms, hs + 1_000);
    assert!(gw2.relayed.is_empty(), "one relay per sign of life");
}

#[tokio::test]
async fn an_inactivity_event_for_a_peer_active_elsewhere_renews_the_session() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(true).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let s = t.admin.start_mfa_session(loc, a.id, None).await.unwrap();
    let (gw1, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let (mut gw2, _, _) = Gw::hello(
        t.grpc(),
        &t.admin.create_token(loc).await.unwrap(),
        "gw-2",
        vec![],
    )
    .await;
    // The client is active on gateway 1 ...
    gw1.send(G::Stats(active_stats(&a.public_key, 500, unix_ms())))
        .await;
    let _ = gw2.activity().await;
    // ... and gateway 2, which never saw it, reports it inactive.
    gw2.send(G::PeerEvent(mfa_event(1, &a.public_key, s.session_id)))
        .await;
    let mut renewed = None;
    for _ in 0..2 {
        match gw2.next().await.unwrap() {
            M::EventAck(ack) => assert_eq!(ack.up_to_seq, 1),
            M::Delta(d) => renewed = Some(d),
            other => panic!("unexpected {other:?}"),
        }
    }
    let d = renewed.expect("a delta renewing the session");
    let Some(C::UpsertPeer(p)) = &d.changes[0].kind else {
        panic!("expected an upsert, got {d:?}");
    };
    assert_ne!(p.mfa_session, s.session_id, "a new session id");
    assert_eq!(
        p.preshared_key,
        raw(&s.preshared_key),
        "the same preshared key"
    );
    let peers = t.admin.peers(loc).await.unwrap();
    assert!(peers[0].active, "the session goes on");
    let events = t.admin.events(loc).await.unwrap();
    assert_eq!(events[0].outcome, "session_renewed");
}

/// Right after the Core starts, a gateway that is not connected yet may have carried the
/// client while the Core was away: its idle peer's session is kept (renewed), not cut on
/// another gateway's idle view. A connected gateway's old activity is known: cut.
#[tokio::test]
async fn after_a_core_start_a_gateway_not_back_yet_gets_the_benefit_of_the_doubt() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(true).await; // threshold 600 s, Core up for less
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let b = t.admin.add_peer(loc, &peer(2)).await.unwrap();
    let sa = t.admin.start_mfa_session(loc, a.id, None).await.unwrap();
    let sb = t.admin.start_mfa_session(loc, b.id, None).await.unwrap();
    let long_ago = unix_ms() - 3_600_000;
    let (gw1, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let (mut gw2, _, _) = Gw::hello(
        t.grpc(),
        &t.admin.create_token(loc).await.unwrap(),
        "gw-2",
        vec![],
    )
    .await;
    // gw-1 saw both peers active, an hour ago.
    let mut old = active_stats(&a.public_key, 500, long_ago);
    old.peers
        .extend(active_stats(&b.public_key, 500, long_ago).peers);
    gw1.send(G::Stats(old)).await;
    let _ = gw2.activity().await;

    // gw-1 still connected: its (old) view is known, the session of `a` ends.
    gw2.send(G::PeerEvent(mfa_event(1, &a.public_key, sa.session_id)))
        .await;
    let _ = (gw2.next().await, gw2.next().await);
    // gw-1 gone (as after a Core outage, before it reconnects): `b` is kept.
    drop(gw1);
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while t
        .admin
        .gateways(loc)
        .await
        .unwrap()
        .iter()
        .any(|g| g.gateway_id == "gw-1" && g.connected)
    {
        assert!(Instant::now() < deadline, "gw-1 still listed as connected");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    gw2.send(G::PeerEvent(mfa_event(2, &b.public_key, sb.session_id)))
        .await;
    let _ = (gw2.next().await, gw2.next().await);
    let events = t.admin.events(loc).await.unwrap();
    let outcome = |seq: u64| {
        events
            .iter()
            .find(|e| e.seq == seq)
            .map(|e| e.outcome.clone())
            .unwrap()
    };
    assert_eq!(outcome(1), "session_ended");
    assert_eq!(outcome(2), "session_renewed");
}

#[tokio::test]
async fn the_gateways_list_counts_stats_messages_and_entries() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let (gw, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let hs = unix_ms();
    gw.send(G::Stats(active_stats(&a.public_key, 500, hs)))
        .await;
    // Two entries, one of them for a peer the location does not have: both counted.
    let mut two = active_stats(&a.public_key, 900, hs);
    two.peers.extend(active_stats(&key(), 1, hs).peers);
    gw.send(G::Stats(two)).await;
    eventually("2 messages, 3 entries", || async {
        let g = t.admin.gateways(loc).await.unwrap();
        g.len() == 1 && (g[0].stats_messages, g[0].stats_entries) == (2, 3)
    })
    .await;
    // The counts are the gateway's, across its streams.
    drop(gw);
    let (gw, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    gw.send(G::Stats(pb::Stats::default())).await;
    eventually("3 messages, 3 entries", || async {
        let g = t.admin.gateways(loc).await.unwrap();
        (g[0].stats_messages, g[0].stats_entries) == (3, 3)
    })
    .await;
}
