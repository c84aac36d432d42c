//! The admin API against an in-process Core: input errors naming their field, stats
//! totals, restart persistence.

mod common;

use common::*;
use gatehouse_core::api::{
    FirewallPolicy, FirewallRule, LocationPatch, NewLocation, NewPeer, PeerPatch, PortRange,
    Protocol, Verdict,
};
use gatehouse_core::client::{AdminClient, ClientError};
use gatehouse_proto::v1 as pb;
use pb::change::Kind as C;
use pb::gateway_message::Kind as G;

fn expect(e: ClientError, status: u16, field: Option<&str>) {
    assert_eq!(e.status().map(|s| s.as_u16()), Some(status), "{e}");
    assert_eq!(e.field(), field, "{e}");
}

#[tokio::test]
async fn admin_token_is_required() {
    let t = TestCore::start().await;
    let wrong = AdminClient::new(t.core.http_url(), "nope");
    expect(wrong.location(1).await.unwrap_err(), 401, None);
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/locations/1", t.core.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["error"].is_string());
}

/// `/readyz` answers without a token (container and load-balancer health checks) and
/// shows nothing else: every other path still needs the admin token.
#[tokio::test]
async fn readyz_needs_no_token() {
    let t = TestCore::start().await;
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("{}/readyz", t.core.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let resp = http
        .get(format!("{}/readyz/x", t.core.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

#[tokio::test]
async fn each_input_error_names_its_field() {
    let t = TestCore::start().await;
    let (loc, _) = t.location(false).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let rev = t.revision(loc).await;

    expect(t.admin.location(999).await.unwrap_err(), 404, None);
    expect(
        t.admin.add_peer(999, &peer(2)).await.unwrap_err(),
        404,
        None,
    );
    expect(t.admin.delete_peer(loc, 999).await.unwrap_err(), 404, None);

    let mut p = peer(2);
    p.public_key = "c2hvcnQ=".into();
    expect(
        t.admin.add_peer(loc, &p).await.unwrap_err(),
        400,
        Some("public_key"),
    );
    let mut p = peer(2);
    p.allowed_ips = vec!["10.9.9.0/24".into(), "10.0.0.300/32".into()];
    expect(
        t.admin.add_peer(loc, &p).await.unwrap_err(),
        400,
        Some("allowed_ips[1]"),
    );
    let mut p = peer(2);
    p.preshared_key = Some("AAAA".into());
    expect(
        t.admin.add_peer(loc, &p).await.unwrap_err(),
        400,
        Some("preshared_key"),
    );
    let mut p = peer(2);
    p.persistent_keepalive = 70000;
    expect(
        t.admin.add_peer(loc, &p).await.unwrap_err(),
        400,
        Some("persistent_keepalive"),
    );

    let mut dup = peer(2);
    dup.public_key = a.public_key.clone();
    expect(
        t.admin.add_peer(loc, &dup).await.unwrap_err(),
        409,
        Some("public_key"),
    );
    // Same network once normalized (peer(1) holds 10.9.0.3/32); the index is the input's.
    assert_eq!(a.allowed_ips, vec!["10.9.0.3/32"]);
    let mut clash = peer(2);
    clash.allowed_ips = vec!["fd00::/64".into(), "10.9.0.3".into()];
    expect(
        t.admin.add_peer(loc, &clash).await.unwrap_err(),
        409,
        Some("allowed_ips[1]"),
    );
    // In a bulk add the item is named, and nothing of the batch is stored.
    let batch = vec![peer(10), peer(11), clash.clone()];
    expect(
        t.admin.add_peers(loc, &batch).await.unwrap_err(),
        409,
        Some("[2].allowed_ips[1]"),
    );
    let batch = vec![peer(10), peer(10)];
    expect(
        t.admin.add_peers(loc, &batch).await.unwrap_err(),
        409,
        Some("[1].allowed_ips[0]"),
    );
    let patch = PeerPatch {
        allowed_ips: Some(vec!["10.9.0.3/32".into()]),
        ..Default::default()
    };
    let other = t.admin.add_peer(loc, &peer(3)).await.unwrap();
    expect(
        t.admin.patch_peer(loc, other.id, &patch).await.unwrap_err(),
        409,
        Some("allowed_ips[0]"),
    );
    let rev = rev + 1; // `other` was added

    let bad_port = LocationPatch {
        listen_port: Some(70000),
        ..Default::default()
    };
    expect(
        t.admin.patch_location(loc, &bad_port).await.unwrap_err(),
        400,
        Some("listen_port"),
    );
    let bad_mtu = LocationPatch {
        mtu: Some(1000),
        ..Default::default()
    };
    expect(
        t.admin.patch_location(loc, &bad_mtu).await.unwrap_err(),
        400,
        Some("mtu"),
    );
    let bad_addr = LocationPatch {
        addresses: Some(vec!["10.0.0.1/24".into(), "x".into()]),
        ..Default::default()
    };
    expect(
        t.admin.patch_location(loc, &bad_addr).await.unwrap_err(),
        400,
        Some("addresses[1]"),
    );
    let no_threshold = NewLocation {
        name: "m".into(),
        mfa: true,
        ..Default::default()
    };
    expect(
        t.admin.create_location(&no_threshold).await.unwrap_err(),
        400,
        Some("disconnect_threshold_secs"),
    );
    let bad_key = NewLocation {
        name: "k".into(),
        private_key: Some("AAAA".into()),
        ..Default::default()
    };
    expect(
        t.admin.create_location(&bad_key).await.unwrap_err(),
        400,
        Some("private_key"),
    );

    let fw = FirewallPolicy {
        enabled: true,
        default_verdict: Verdict::Drop,
        rules: vec![FirewallRule {
            priority: 1,
            sources: vec!["10.0.0.9-10.0.0.1".into()],
            destinations: vec![],
            ports: vec![],
            protocols: vec![],
            verdict: Verdict::Accept,
            comment: String::new(),
        }],
    };
    expect(
        t.admin.put_firewall(loc, &fw).await.unwrap_err(),
        400,
        Some("rules[0].sources[0]"),
    );
    expect(
        t.admin
            .start_mfa_session(loc, a.id, None)
            .await
            .unwrap_err(),
        409,
        Some("mfa"),
    );

    // None of the refused changes made a revision.
    assert_eq!(t.revision(loc).await, rev);
}

#[tokio::test]
async fn location_keys_and_firewall() {
    let t = TestCore::start().await;
    // A given private key yields the matching public key (RFC 7748 test vector).
    let private = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
    let loc = t
        .admin
        .create_location(&NewLocation {
            name: "k".into(),
            private_key: Some(private.into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        loc.public_key,
        "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
    );
    assert_eq!(loc.revision, 1);
    let text = serde_json::to_string(&t.admin.location(loc.id).await.unwrap()).unwrap();
    assert!(!text.contains(private), "the private key is never shown");

    let token = t.admin.create_token(loc.id).await.unwrap();
    let (mut gw, _, snap) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    assert!(
        !snap
            .location
            .as_ref()
            .unwrap()
            .firewall
            .as_ref()
            .unwrap()
            .enabled
    );
    let fw = FirewallPolicy {
        enabled: true,
        default_verdict: Verdict::Drop,
        rules: vec![FirewallRule {
            priority: 10,
            sources: vec!["10.8.0.0/24".into(), "fd08::/64".into()],
            destinations: vec!["192.168.1.10-192.168.1.20".into()],
            ports: vec![PortRange {
                start: 443,
                end: 443,
            }],
            protocols: vec![Protocol::Tcp],
            verdict: Verdict::Accept,
            comment: "web".into(),
        }],
    };
    assert_eq!(t.admin.put_firewall(loc.id, &fw).await.unwrap(), fw);
    let d = gw.delta().await;
    match &d.changes[..] {
        [pb::Change {
            kind: Some(C::SetFirewall(p)),
        }] => {
            assert!(p.enabled);
            assert_eq!(p.default_verdict, pb::Verdict::Drop as i32);
            assert_eq!(p.rules[0].protocols, vec![pb::Protocol::Tcp as i32]);
            assert_eq!(p.rules[0].ports[0].start, 443);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(t.admin.location(loc.id).await.unwrap().firewall, Some(fw));
}

#[tokio::test]
async fn switching_mfa_on_removes_peers_without_a_session() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let (mut gw, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let on = LocationPatch {
        mfa: Some(true),
        disconnect_threshold_secs: Some(300),
        ..Default::default()
    };
    t.admin.patch_location(loc, &on).await.unwrap();
    let d = gw.delta().await;
    assert!(d.changes.iter().any(
        |c| matches!(&c.kind, Some(C::SetMfa(m)) if m.enabled && m.disconnect_threshold_secs == 300)
    ));
    assert!(d
        .changes
        .iter()
        .any(|c| matches!(&c.kind, Some(C::RemovePeer(k)) if *k == raw(&a.public_key))));
}

fn stat(public_key: &str, epoch: u64, rx: u64, tx: u64) -> pb::PeerStats {
    pb::PeerStats {
        public_key: raw(public_key),
        endpoint: "203.0.113.5:51000".into(),
        rx_bytes: rx,
        tx_bytes: tx,
        last_handshake_ms: 1_700_000_000_000,
        counter_epoch: epoch,
        allowed_ips: vec![],
    }
}

async fn report(gw: &Gw, at: i64, peers: Vec<pb::PeerStats>) {
    gw.send(G::Stats(pb::Stats {
        collected_at_ms: at,
        peers,
        more: false,
    }))
    .await;
}

#[tokio::test]
async fn stats_totals_survive_epoch_changes_and_counter_resets() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let (gw, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;

    report(&gw, 1, vec![stat(&a.public_key, 5, 100, 10)]).await;
    report(&gw, 2, vec![stat(&a.public_key, 5, 150, 20)]).await;
    // A row for an unknown peer is ignored and does not end the stream.
    report(
        &gw,
        3,
        vec![stat(&key(), 1, 1, 1), stat(&a.public_key, 9, 30, 5)],
    )
    .await; // new epoch
    report(&gw, 4, vec![stat(&a.public_key, 9, 7, 6)]).await; // counter reset, same epoch
    eventually("last report stored", || async {
        t.admin
            .stats(loc)
            .await
            .unwrap()
            .first()
            .map(|s| s.updated_at)
            == Some(4)
    })
    .await;
    let s = t.admin.stats(loc).await.unwrap();
    assert_eq!(s.len(), 1, "the unknown peer has no row");
    let s = &s[0];
    assert_eq!((s.gateway_id.as_str(), s.peer_id), ("gw-1", a.id));
    assert_eq!((s.rx_bytes, s.tx_bytes), (7, 6));
    assert_eq!((s.total_rx, s.total_tx), (150 + 30 + 7, 20 + 5 + 6));
    assert_eq!(s.public_key, a.public_key);
    assert_eq!(s.endpoint.as_deref(), Some("203.0.113.5:51000"));
    assert_eq!(s.last_handshake, Some(1_700_000_000_000));
    // The stream is still up: it answers a snapshot request.
    gw.send(G::SnapshotRequest(pb::SnapshotRequest::default()))
        .await;
    let mut gw = gw;
    gw.snapshot().await;
}

#[tokio::test]
async fn a_restart_on_the_same_database_keeps_everything() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(true).await;
    let peers: Vec<NewPeer> = (0..5).map(peer).collect();
    let added = t.admin.add_peers(loc, &peers).await.unwrap();
    let session = t
        .admin
        .start_mfa_session(loc, added[0].id, None)
        .await
        .unwrap();
    t.admin
        .start_mfa_session(loc, added[1].id, None)
        .await
        .unwrap();
    let (gw, _, snap) = Gw::hello(
        t.grpc(),
        &token,
        "gw-1",
        vec![mfa_event(1, &added[1].public_key, 12345)],
    )
    .await;
    gw.send(G::Applied(pb::Applied {
        revision: snap.revision,
        attempted_revision: snap.revision,
        error: None,
    }))
    .await;
    report(&gw, 10, vec![stat(&added[0].public_key, 3, 500, 50)]).await;
    report(&gw, 11, vec![stat(&added[0].public_key, 4, 20, 2)]).await;
    eventually("stats stored", || async {
        t.admin
            .stats(loc)
            .await
            .unwrap()
            .first()
            .map(|s| s.updated_at)
            == Some(11)
    })
    .await;
    let before = (
        t.admin.location(loc).await.unwrap(),
        t.admin.peers(loc).await.unwrap(),
        t.admin.stats(loc).await.unwrap(),
        t.admin.events(loc).await.unwrap(),
    );
    drop(gw);

    let t = t.restart().await;
    let after = (
        t.admin.location(loc).await.unwrap(),
        t.admin.peers(loc).await.unwrap(),
        t.admin.stats(loc).await.unwrap(),
        t.admin.events(loc).await.unwrap(),
    );
    assert_eq!(before, after);
    assert_eq!(after.2[0].total_rx, 520);
    let g = t.admin.gateways(loc).await.unwrap();
    assert_eq!(
        (g.len(), g[0].applied_revision, g[0].connected),
        (1, snap.revision, false)
    );

    // The token still works, the revision continues, the session still authorizes its peer.
    let (mut gw, _, snap2) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    assert_eq!(snap2.revision, snap.revision);
    let p0 = snap2
        .location
        .as_ref()
        .unwrap()
        .peers
        .iter()
        .find(|p| p.id == added[0].id)
        .unwrap();
    assert_eq!(p0.mfa_session, session.session_id);
    t.admin.delete_peer(loc, added[4].id).await.unwrap();
    assert_eq!(gw.delta().await.base_revision, snap.revision);
    // Session ids are never reused.
    let s2 = t
        .admin
        .start_mfa_session(loc, added[2].id, None)
        .await
        .unwrap();
    assert!(s2.session_id > session.session_id + 1);
    t.core.stop().await;
}

/// Benchmark, not a test of speed: prints how long 100,000 peers take.
#[tokio::test]
#[ignore = "benchmark: cargo test -p gatehouse-core --release --test admin -- --ignored --nocapture"]
async fn scale_100k_peers() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let peers: Vec<NewPeer> = (0..100_000u32)
        .map(|n| NewPeer {
            public_key: key(),
            allowed_ips: vec![format!(
                "10.{}.{}.{}/32",
                100 + n / 62500,
                (n / 250) % 250,
                n % 250 + 2
            )],
            ..Default::default()
        })
        .collect();
    let started = std::time::Instant::now();
    t.admin.add_peers(loc, &peers).await.unwrap();
    eprintln!(
        "bulk add of 100000 peers (one revision): {:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let (_gw, _, snap) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    eprintln!(
        "Hello -> snapshot of 100000 peers received: {:?}",
        started.elapsed()
    );
    assert_eq!(snap.location.unwrap().peers.len(), 100_000);
}
