//! Several gateways of one location (design §12, protocol rule 8): the Core relays where
//! each client is (activity and endpoint) to the other gateways at once, tells a
//! (re)connecting gateway what it knows after its snapshot, keeps that across restarts,
//! and keeps each gateway's listing and stats apart. In-process Core, scripted streams.

mod common;

use std::net::SocketAddr;

use common::*;
use gatehouse_proto::v1 as pb;
use pb::core_message::Kind as M;
use pb::gateway_message::Kind as G;

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One peer's row of a `Stats` report.
fn row(public_key: &str, endpoint: &str, rx: u64, handshake_ms: i64) -> pb::PeerStats {
    pb::PeerStats {
        public_key: raw(public_key),
        endpoint: endpoint.into(),
        rx_bytes: rx,
        tx_bytes: rx / 2,
        last_handshake_ms: handshake_ms,
        counter_epoch: 7,
        ..Default::default()
    }
}

fn report(collected_at_ms: i64, peers: Vec<pb::PeerStats>) -> G {
    G::Stats(pb::Stats {
        collected_at_ms,
        peers,
        more: false,
    })
}

/// A second gateway of the location (its own token).
async fn second(t: &TestCore, loc: u64, id: &str) -> Gw {
    let token = t.admin.create_token(loc).await.unwrap();
    Gw::hello(t.grpc(), &token, id, vec![]).await.0
}

/// The next message must be a delta caused by an admin change made now: everything the
/// gateway was sent before that change has been read. Fails on any peer activity first.
async fn nothing_relayed_before_a_change(t: &TestCore, loc: u64, gws: &mut [&mut Gw]) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(200);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    t.admin.add_peer(loc, &peer(n)).await.unwrap();
    for gw in gws.iter_mut() {
        match gw.next_any().await {
            Ok(M::Delta(_)) => {}
            other => panic!("expected only the delta, got {other:?}"),
        }
    }
}

fn by_key(a: &pb::PeerActivity) -> std::collections::BTreeMap<Vec<u8>, (i64, String)> {
    a.peers
        .iter()
        .map(|p| (p.public_key.clone(), (p.last_active_ms, p.endpoint.clone())))
        .collect()
}

#[tokio::test]
async fn activity_is_relayed_with_its_endpoint_to_the_other_gateway_only() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let (mut gw1, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let mut gw2 = second(&t, loc, "gw-2").await;
    let hs = unix_ms();
    gw1.send(report(
        hs,
        vec![row(&a.public_key, "198.51.100.7:40001", 500, hs)],
    ))
    .await;
    let relayed = gw2.activity().await;
    assert_eq!(relayed.peers.len(), 1);
    assert_eq!(relayed.peers[0].public_key, raw(&a.public_key));
    assert_eq!(relayed.peers[0].last_active_ms, hs);
    assert_eq!(relayed.peers[0].endpoint, "198.51.100.7:40001");
    // The gateway that saw it gets nothing back; neither gets anything twice.
    nothing_relayed_before_a_change(&t, loc, &mut [&mut gw1, &mut gw2]).await;

    // IPv6 endpoints travel in their canonical form.
    gw2.send(report(
        hs + 1_000,
        vec![row(&a.public_key, "[2001:db8::7]:40002", 900, hs + 1_000)],
    ))
    .await;
    let relayed = gw1.activity().await;
    assert_eq!(relayed.peers[0].endpoint, "[2001:db8::7]:40002");
    assert_eq!(relayed.peers[0].last_active_ms, hs + 1_000);
    nothing_relayed_before_a_change(&t, loc, &mut [&mut gw1, &mut gw2]).await;
}

#[tokio::test]
async fn an_endpoint_change_alone_is_relayed_and_a_bad_endpoint_never() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let (gw1, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let mut gw2 = second(&t, loc, "gw-2").await;
    let hs = unix_ms() - 5_000;
    gw1.send(report(
        hs,
        vec![row(&a.public_key, "198.51.100.7:40001", 500, hs)],
    ))
    .await;
    assert_eq!(gw2.activity().await.peers[0].endpoint, "198.51.100.7:40001");
    // Same counters, same handshake: only the endpoint moved (NAT rebinding).
    gw1.send(report(
        hs + 30_000,
        vec![row(&a.public_key, "198.51.100.7:40077", 500, hs)],
    ))
    .await;
    let moved = gw2.activity().await;
    assert_eq!(moved.peers[0].endpoint, "198.51.100.7:40077");
    assert_eq!(moved.peers[0].last_active_ms, hs, "no new activity claimed");
    // An unparsable endpoint is not relayed (nor is an unchanged report).
    for bad in ["not-an-endpoint", "0.0.0.0:1", "198.51.100.7:0"] {
        gw1.send(report(hs + 60_000, vec![row(&a.public_key, bad, 500, hs)]))
            .await;
    }
    let mut gw2s = [&mut gw2];
    nothing_relayed_before_a_change(&t, loc, &mut gw2s).await;
    // Activity reported with a bad endpoint keeps the last good one.
    gw1.send(report(
        hs + 90_000,
        vec![row(&a.public_key, "garbage", 800, hs)],
    ))
    .await;
    let relayed = gw2.activity().await;
    assert_eq!(relayed.peers[0].last_active_ms, hs + 90_000);
    assert_eq!(relayed.peers[0].endpoint, "198.51.100.7:40077");
}

#[tokio::test]
async fn a_connecting_gateway_learns_the_known_endpoints_after_its_snapshot() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(true).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let b = t.admin.add_peer(loc, &peer(2)).await.unwrap();
    // `c` has no MFA session: not in the snapshot, so not in what follows it either.
    let c = t.admin.add_peer(loc, &peer(3)).await.unwrap();
    t.admin.start_mfa_session(loc, a.id, None).await.unwrap();
    t.admin.start_mfa_session(loc, b.id, None).await.unwrap();
    let token2 = t.admin.create_token(loc).await.unwrap();
    let (gw1, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let hs = unix_ms();
    gw1.send(report(
        hs,
        vec![
            row(&a.public_key, "198.51.100.7:40001", 500, hs),
            row(&b.public_key, "[2001:db8::9]:40009", 700, hs - 10),
            row(&c.public_key, "198.51.100.8:40003", 700, hs),
        ],
    ))
    .await;
    common::eventually("the stats are stored", || async {
        t.admin.stats(loc).await.unwrap().len() == 3
    })
    .await;

    // gw-2 connects: EventAck, Snapshot, then where the clients are.
    let mut gw2 = Gw::open(t.grpc(), Some(&token2)).await.unwrap();
    gw2.send(G::Hello(pb::Hello {
        gateway_id: "gw-2".into(),
        name: "host-2".into(),
        version: "0.1.0".into(),
        applied_revision: 0,
        pending_events: vec![],
    }))
    .await;
    assert!(matches!(gw2.next_any().await, Ok(M::EventAck(_))));
    let snap = match gw2.next_any().await {
        Ok(M::Snapshot(s)) => s,
        other => panic!("expected the snapshot, got {other:?}"),
    };
    assert_eq!(snapshot_keys(&snap).len(), 2);
    let known = match gw2.next_any().await {
        Ok(M::PeerActivity(a)) => a,
        other => panic!("expected the known activity, got {other:?}"),
    };
    let expected = [
        (raw(&a.public_key), (hs, "198.51.100.7:40001".to_owned())),
        (
            raw(&b.public_key),
            (hs - 10, "[2001:db8::9]:40009".to_owned()),
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(by_key(&known), expected);

    // gw-1 reconnects (it may have lost its state): what it reported itself comes back.
    drop(gw1);
    let (mut gw1, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    match gw1.next_any().await {
        Ok(M::PeerActivity(again)) => assert_eq!(by_key(&again), expected),
        other => panic!("expected the known activity, got {other:?}"),
    }
}

#[tokio::test]
async fn what_is_known_survives_a_core_restart() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let (gw1, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let hs = unix_ms();
    gw1.send(report(
        hs,
        vec![row(&a.public_key, "198.51.100.7:40001", 500, hs)],
    ))
    .await;
    gw1.send(report(
        hs + 1,
        vec![row(&a.public_key, "198.51.100.7:40002", 500, hs)],
    ))
    .await;
    common::eventually("the endpoint change is stored", || async {
        let rows = t.admin.stats(loc).await.unwrap();
        rows.first().and_then(|r| r.endpoint.as_deref()) == Some("198.51.100.7:40002")
    })
    .await;
    drop(gw1);
    let t = t.restart().await;
    let token2 = t.admin.create_token(loc).await.unwrap();
    let (mut gw2, _, _) = Gw::hello(t.grpc(), &token2, "gw-2", vec![]).await;
    let known = gw2.activity().await;
    assert_eq!(known.peers.len(), 1);
    assert_eq!(known.peers[0].endpoint, "198.51.100.7:40002");
    assert_eq!(known.peers[0].last_active_ms, hs);
}

/// 32,769 peers seen: a connecting gateway gets them in two pieces (32,768 and 1).
#[tokio::test]
async fn what_follows_a_snapshot_is_sent_in_bounded_pieces() {
    const N: u32 = 32_769;
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let peers: Vec<_> = (0..N).map(peer).collect();
    let added = t.admin.add_peers(loc, &peers).await.unwrap();
    let (mut gw1, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let hs = unix_ms();
    let rows: Vec<pb::PeerStats> = added
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let port = 1024 + (i % 60_000) as u16;
            row(&p.public_key, &format!("198.51.100.7:{port}"), 500, hs)
        })
        .collect();
    let started = std::time::Instant::now();
    for piece in rows.chunks(gatehouse_proto::MAX_STATS_PEERS) {
        gw1.send(report(hs, piece.to_vec())).await;
    }
    // The Core handles a stream's messages in order: once this event is acknowledged,
    // both stats pieces are stored (and relayed).
    let barrier = pb::PeerEvent {
        seq: 1,
        public_key: raw(&key()),
        ..Default::default()
    };
    gw1.send(G::PeerEvent(barrier)).await;
    assert_eq!(gw1.ack().await.up_to_seq, 1);
    eprintln!(
        "stats of {N} peers (2 pieces) stored and relayed: {:?}",
        started.elapsed()
    );
    let token2 = t.admin.create_token(loc).await.unwrap();
    let started = std::time::Instant::now();
    let (mut gw2, _, _) = Gw::hello(t.grpc(), &token2, "gw-2", vec![]).await;
    let first = gw2.activity().await;
    assert_eq!(first.peers.len(), 32_768);
    let second = gw2.activity().await;
    assert_eq!(second.peers.len(), 1);
    eprintln!(
        "connect to the last whereabouts piece, {N} peers: {:?}",
        started.elapsed()
    );
    let mut keys: Vec<Vec<u8>> = first
        .peers
        .iter()
        .chain(&second.peers)
        .map(|p| p.public_key.clone())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), N as usize, "every peer once");
}

#[tokio::test]
async fn gateways_are_listed_apart_with_their_address_and_their_own_stats() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let (gw1, _, snap) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let mut gw2 = second(&t, loc, "gw-2").await;
    gw1.send(G::Applied(pb::Applied {
        revision: snap.revision,
        attempted_revision: snap.revision,
        error: None,
    }))
    .await;
    let hs = unix_ms();
    gw1.send(report(
        hs,
        vec![row(&a.public_key, "198.51.100.7:40001", 1_000, hs)],
    ))
    .await;
    let _ = gw2.activity().await;
    gw2.send(report(
        hs + 1,
        vec![row(&a.public_key, "203.0.113.5:50000", 30, hs + 1)],
    ))
    .await;
    common::eventually("both gateways' stats are stored", || async {
        t.admin.stats(loc).await.unwrap().len() == 2
    })
    .await;

    let gateways = t.admin.gateways(loc).await.unwrap();
    assert_eq!(gateways.len(), 2);
    let (g1, g2) = (&gateways[0], &gateways[1]);
    assert_eq!(
        (g1.gateway_id.as_str(), g2.gateway_id.as_str()),
        ("gw-1", "gw-2")
    );
    assert!(g1.connected && g2.connected);
    assert_eq!(g1.applied_revision, snap.revision);
    assert_eq!(g2.applied_revision, 0, "gw-2 has applied nothing yet");
    let addr1: SocketAddr = g1.remote_addr.parse().expect("gw-1 remote_addr");
    let addr2: SocketAddr = g2.remote_addr.parse().expect("gw-2 remote_addr");
    assert!(addr1.ip().is_loopback() && addr1.port() != 0);
    assert_ne!(addr1, addr2, "two streams, two source ports");

    let stats = t.admin.stats(loc).await.unwrap();
    let of = |g: &str| stats.iter().find(|s| s.gateway_id == g).unwrap().clone();
    let (s1, s2) = (of("gw-1"), of("gw-2"));
    assert_eq!(s1.endpoint.as_deref(), Some("198.51.100.7:40001"));
    assert_eq!(s2.endpoint.as_deref(), Some("203.0.113.5:50000"));
    assert_eq!((s1.total_rx, s1.total_tx), (1_000, 500));
    assert_eq!((s2.total_rx, s2.total_tx), (30, 15));
}

/// A client active only on gateway A for longer than the threshold, then only on B: the
/// inactivity events of the idle gateway never end its MFA session (protocol rule 8).
#[tokio::test]
async fn an_mfa_client_moving_between_gateways_keeps_its_session() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(true).await; // threshold 600 s
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let s = t.admin.start_mfa_session(loc, a.id, None).await.unwrap();
    let (mut gw_a, _, _) = Gw::hello(t.grpc(), &token, "gw-a", vec![]).await;
    let mut gw_b = second(&t, loc, "gw-b").await;
    let now = unix_ms();
    // Active on A for 15 minutes (reports every 5), idle on B all along.
    gw_b.send(report(now - 900_000, vec![row(&a.public_key, "", 0, 0)]))
        .await;
    for (i, at) in [now - 900_000, now - 600_000, now - 300_000, now]
        .into_iter()
        .enumerate()
    {
        let rx = 1_000 * (i as u64 + 1);
        gw_a.send(report(
            at,
            vec![row(&a.public_key, "198.51.100.7:40001", rx, now - 900_000)],
        ))
        .await;
        let _ = gw_b.activity().await;
    }
    // B's expiry fires: the session is renewed (same key), not ended.
    gw_b.send(G::PeerEvent(mfa_event(1, &a.public_key, s.session_id)))
        .await;
    let renewed = renewal(&mut gw_b).await;
    assert_ne!(renewed.mfa_session, s.session_id);
    assert_eq!(renewed.preshared_key, raw(&s.preshared_key));
    let _ = gw_a.delta().await;

    // The client moves to B (another NAT mapping) and is active there only.
    gw_b.send(report(
        now + 1,
        vec![row(&a.public_key, "198.51.100.7:40999", 5_000, now + 1)],
    ))
    .await;
    let seen = gw_a.activity().await;
    assert_eq!(seen.peers[0].endpoint, "198.51.100.7:40999");
    // A's expiry fires for the renewed session: renewed again, never ended.
    gw_a.send(G::PeerEvent(mfa_event(
        1,
        &a.public_key,
        renewed.mfa_session,
    )))
    .await;
    let again = renewal(&mut gw_a).await;
    assert_eq!(again.preshared_key, raw(&s.preshared_key));

    let events = t.admin.events(loc).await.unwrap();
    assert_eq!(events.len(), 2);
    assert!(
        events.iter().all(|e| e.outcome == "session_renewed"),
        "{events:?}"
    );
    assert!(
        t.admin.peers(loc).await.unwrap()[0].active,
        "the session goes on"
    );
}

/// The EventAck and the delta (renewing the session) that answer an MFA event.
async fn renewal(gw: &mut Gw) -> pb::Peer {
    let mut upserted = None;
    for _ in 0..2 {
        match gw.next().await.unwrap() {
            M::EventAck(ack) => assert_eq!(ack.up_to_seq, 1),
            M::Delta(d) => match d.changes.first().and_then(|c| c.kind.clone()) {
                Some(pb::change::Kind::UpsertPeer(p)) => upserted = Some(p),
                other => panic!("expected the session renewed, got {other:?}"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }
    upserted.expect("a delta renewing the session")
}

/// A gateway the Core stops hearing from (cut off, its stream not yet known dead) may
/// have carried the client since: an idle
/// sibling's inactivity event within a threshold of the Core's last word from it renews
/// the session, even when the client's last reported activity there is older than the
/// threshold (a gateway cut off from the Core for a few seconds keeps its clients).
#[tokio::test]
async fn a_client_on_a_gateway_the_core_cannot_hear_keeps_its_session() {
    const T: u64 = 4;
    let t = TestCore::start().await;
    let view = t
        .admin
        .create_location(&gatehouse_core::api::NewLocation {
            name: "cut".into(),
            listen_port: 51820,
            addresses: vec!["10.8.0.1/24".into()],
            mfa: true,
            disconnect_threshold_secs: T,
            ..Default::default()
        })
        .await
        .unwrap();
    let loc = view.id;
    let token = t.admin.create_token(loc).await.unwrap();
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let s = t.admin.start_mfa_session(loc, a.id, None).await.unwrap();
    let (gw_a, _, _) = Gw::hello(t.grpc(), &token, "gw-a", vec![]).await;
    let mut gw_b = second(&t, loc, "gw-b").await;
    let start = unix_ms();
    // The client is active on A now (a fresh handshake)...
    gw_a.send(report(
        start,
        vec![row(&a.public_key, "198.51.100.7:40001", 10, start)],
    ))
    .await;
    let _ = gw_b.activity().await;
    // ... A is heard from (a report without news) T - 1 s later, then cut off: its
    // stream stays open, as a cut one does until it is known dead.
    tokio::time::sleep(std::time::Duration::from_secs(T - 1)).await;
    gw_a.send(report(unix_ms(), vec![])).await;
    // B's expiry fires more than T after the client's last activity A reported, less
    // than T after the Core last heard from A.
    let wait = (start + (T as i64 + 1) * 1000 - unix_ms()).max(0) as u64;
    tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
    gw_b.send(G::PeerEvent(mfa_event(1, &a.public_key, s.session_id)))
        .await;
    let renewed = renewal(&mut gw_b).await;
    assert_eq!(renewed.preshared_key, raw(&s.preshared_key));
    let events = t.admin.events(loc).await.unwrap();
    assert_eq!(events[0].outcome, "session_renewed", "{events:?}");
    assert!(t.admin.peers(loc).await.unwrap()[0].active);
    drop(gw_a);
}
