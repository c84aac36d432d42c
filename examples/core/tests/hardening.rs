//! The Core against a token holder acting as an attacker or a broken gateway: per-gateway
//! tokens (revocation and expiry end live streams, a token is bound to one gateway id),
//! the inbound message limit and per-message caps, throttled snapshot requests, paginated
//! lists, the database's file modes, and the strings gateways send.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;
use gatehouse_core::api::{NewToken, PeerView};
use gatehouse_proto::v1 as pb;
use pb::gateway_message::Kind as G;
use tonic::Code;

/// A generous bound on "at once" (the behaviour, not a benchmark).
const PROMPTLY: Duration = Duration::from_secs(3);

fn hello(gateway_id: &str) -> G {
    G::Hello(pb::Hello {
        gateway_id: gateway_id.into(),
        name: "host".into(),
        version: "0.1.0".into(),
        applied_revision: 0,
        pending_events: vec![],
    })
}

/// The status that ends the stream (skipping messages), within `PROMPTLY`.
async fn ended(gw: &mut Gw) -> tonic::Status {
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        match tokio::time::timeout_at(deadline, gw.rx.message()).await {
            Err(_) => panic!("the stream is still open after {PROMPTLY:?}"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return tonic::Status::cancelled("stream ended without a status"),
            Ok(Err(status)) => return status,
        }
    }
}

/// Opens a stream and sends Hello; the first answer (an ack) or the refusal.
async fn try_hello(t: &TestCore, token: &str, gateway_id: &str) -> Result<Gw, tonic::Status> {
    let mut gw = Gw::open(t.grpc(), Some(token)).await?;
    gw.send(hello(gateway_id)).await;
    match gw.next().await? {
        pb::core_message::Kind::EventAck(_) => Ok(gw),
        other => panic!("expected an ack, got {other:?}"),
    }
}

#[tokio::test]
async fn revoking_a_token_ends_its_live_stream_at_once_and_refuses_it_after() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let (mut gw, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let listed = t.admin.tokens(loc).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].gateway_id.as_deref(),
        Some("gw-1"),
        "bound by first use"
    );
    assert!(listed[0].last_used.is_some());
    assert!(listed[0].expires.is_none());

    let started = Instant::now();
    t.admin.revoke_token(loc, listed[0].id).await.unwrap();
    let status = ended(&mut gw).await;
    let took = started.elapsed();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    eprintln!("stream ended {took:?} after the revocation");

    let refused = Gw::open(t.grpc(), Some(&token))
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(t.admin.tokens(loc).await.unwrap().is_empty());
    let again = t.admin.revoke_token(loc, listed[0].id).await.unwrap_err();
    assert_eq!(again.status().map(|s| s.as_u16()), Some(404));
}

#[tokio::test]
async fn an_expiring_token_ends_its_stream_and_is_refused_after() {
    let t = TestCore::start().await;
    let (loc, _) = t.location(false).await;
    let new = NewToken {
        gateway_id: None,
        expires_in_secs: Some(1),
    };
    let created = t.admin.create_gateway_token(loc, &new).await.unwrap();
    let (mut gw, _, _) = Gw::hello(t.grpc(), &created.token, "gw-1", vec![]).await;
    let info = t.admin.tokens(loc).await.unwrap().pop().unwrap();
    assert_eq!(info.id, created.id);
    assert_eq!(info.expires.map(|e| e - info.created), Some(1000));

    let status = ended(&mut gw).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("expired"), "{status:?}");
    let refused = Gw::open(t.grpc(), Some(&created.token)).await.err();
    assert_eq!(refused.map(|s| s.code()), Some(Code::Unauthenticated));

    for bad in [0, u64::MAX] {
        let e = t
            .admin
            .create_gateway_token(
                loc,
                &NewToken {
                    gateway_id: None,
                    expires_in_secs: Some(bad),
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.field(), Some("expires_in_secs"), "{e}");
    }
}

#[tokio::test]
async fn a_token_is_bound_to_one_gateway_id_and_cannot_take_another_gateways_id() {
    let t = TestCore::start().await;
    let (loc, token_a) = t.location(false).await;
    let (mut a, _, _) = Gw::hello(t.grpc(), &token_a, "gw-a", vec![]).await;

    // The same token cannot be used as another gateway.
    let e = try_hello(&t, &token_a, "gw-b")
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Another (unbound) token cannot claim gw-a and kick its stream.
    let token_b = t.admin.create_token(loc).await.unwrap();
    let e = try_hello(&t, &token_b, "gw-a")
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // gw-a's stream is still served.
    t.admin.add_peer(loc, &peer(1)).await.unwrap();
    a.delta().await;
    // The unbound token still works for a new id.
    let (_b, _, _) = Gw::hello(t.grpc(), &token_b, "gw-b", vec![]).await;

    // A token created for gw-c only serves gw-c.
    let new = NewToken {
        gateway_id: Some("gw-c".into()),
        expires_in_secs: None,
    };
    let c = t.admin.create_gateway_token(loc, &new).await.unwrap();
    let e = try_hello(&t, &c.token, "gw-d")
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let (_c, _, _) = Gw::hello(t.grpc(), &c.token, "gw-c", vec![]).await;

    let bound: Vec<Option<String>> = t
        .admin
        .tokens(loc)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.gateway_id)
        .collect();
    assert_eq!(
        bound,
        vec![
            Some("gw-a".into()),
            Some("gw-b".into()),
            Some("gw-c".into())
        ]
    );
    let bad = NewToken {
        gateway_id: Some("gw c".into()),
        expires_in_secs: None,
    };
    let e = t.admin.create_gateway_token(loc, &bad).await.unwrap_err();
    assert_eq!(e.field(), Some("gateway_id"), "{e}");
}

#[tokio::test]
async fn the_token_list_never_shows_a_secret() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let body = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/locations/{loc}/tokens",
            t.core.http_url()
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!body.contains(&token), "{body}");
    assert!(!body.contains("token\""), "{body}");
    // The body-less creation of the first API still answers the secret, now with its id.
    let resp: serde_json::Value = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/locations/{loc}/tokens",
            t.core.http_url()
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(resp["token"]
        .as_str()
        .is_some_and(|s| s.starts_with("ght_")));
    assert!(resp["id"].as_u64().is_some());
}

#[tokio::test]
async fn an_oversized_message_is_refused_without_stalling_other_gateways() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let (mut good, _, _) = Gw::hello(t.grpc(), &token, "gw-good", vec![]).await;
    let token_bad = t.admin.create_token(loc).await.unwrap();
    let (mut bad, _, _) = Gw::hello(t.grpc(), &token_bad, "gw-bad", vec![]).await;

    // 5 MiB of stats, over the 4 MiB limit.
    let big = pb::PeerStats {
        public_key: vec![7; 32],
        allowed_ips: vec!["10.0.0.0/32".repeat(1000); 500],
        ..Default::default()
    };
    bad.send(G::Stats(pb::Stats {
        collected_at_ms: 1,
        peers: vec![big],
        more: false,
    }))
    .await;
    let status = ended(&mut bad).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // The other gateway is served at once.
    let started = Instant::now();
    t.admin.add_peer(loc, &peer(1)).await.unwrap();
    tokio::time::timeout(PROMPTLY, good.delta())
        .await
        .expect("the other gateway got its delta");
    eprintln!(
        "the other gateway's delta came {:?} after the change",
        started.elapsed()
    );
}

#[tokio::test]
async fn messages_over_their_caps_are_refused() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(true).await;

    // A Hello with more events than allowed (under the byte limit).
    let events: Vec<pb::PeerEvent> = (1..=gatehouse_proto::MAX_HELLO_EVENTS as u64 + 1)
        .map(|seq| mfa_event(seq, &key(), 1))
        .collect();
    let mut gw = Gw::open(t.grpc(), Some(&token)).await.unwrap();
    gw.send(G::Hello(pb::Hello {
        gateway_id: "gw-1".into(),
        pending_events: events,
        ..Default::default()
    }))
    .await;
    let status = ended(&mut gw).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("PeerEvent"), "{status:?}");
    assert!(t.admin.events(loc).await.unwrap().is_empty());

    // A Stats message with more rows than allowed (1.2 MiB, under the byte limit).
    let (mut gw, _, _) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let rows = (0..gatehouse_proto::MAX_STATS_PEERS + 1)
        .map(|_| pb::PeerStats {
            public_key: vec![1; 32],
            ..Default::default()
        })
        .collect();
    gw.send(G::Stats(pb::Stats {
        collected_at_ms: 1,
        peers: rows,
        more: false,
    }))
    .await;
    let status = ended(&mut gw).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test]
async fn a_snapshot_request_flood_is_throttled_and_the_gateway_converges() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let (mut gw, _, first) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let flood = tokio::spawn({
        let tx = gw.tx.clone();
        async move {
            for _ in 0..1000 {
                let msg = pb::GatewayMessage {
                    kind: Some(G::SnapshotRequest(pb::SnapshotRequest {
                        held_revision: 1,
                        reason: "flood".into(),
                    })),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        }
    });
    flood.await.unwrap();
    // A change after the flood: the coalesced snapshot must carry it.
    t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let latest = t.revision(loc).await;
    assert!(latest > first.revision);

    let mut snapshots = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(msg) = tokio::time::timeout_at(until, gw.next()).await {
        if let Ok(pb::core_message::Kind::Snapshot(s)) = msg {
            snapshots.push(s.revision);
        }
    }
    eprintln!("snapshots for 1,000 requests in 2.5 s: {snapshots:?}");
    assert!(
        (1..=4).contains(&snapshots.len()),
        "1,000 requests answered by {} snapshots",
        snapshots.len()
    );
    assert_eq!(
        snapshots.last(),
        Some(&latest),
        "the last snapshot is current"
    );
}

#[tokio::test]
async fn pagination_returns_every_item_exactly_once() {
    let t = TestCore::start().await;
    let (loc, _) = t.location(true).await;
    let many: Vec<_> = (0..25).map(peer).collect();
    let added = t.admin.add_peers(loc, &many).await.unwrap();
    let path = format!("/api/v1/locations/{loc}/peers");
    let mut seen: Vec<u64> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page: Vec<PeerView> = t.admin.page(&path, 7, after.as_deref()).await.unwrap();
        assert!(page.len() <= 7);
        seen.extend(page.iter().map(|p| p.id));
        if page.len() < 7 {
            break;
        }
        after = page.last().map(|p| p.id.to_string());
    }
    let mut want: Vec<u64> = added.iter().map(|p| p.id).collect();
    want.sort();
    assert_eq!(seen, want, "every peer once, in id order");
    assert_eq!(t.admin.peers(loc).await.unwrap().len(), 25);

    // Stats rows (one per peer), keyed by row id, and kept ids across updates.
    let tok = t.admin.create_token(loc).await.unwrap();
    let (gw, _, _) = Gw::hello(t.grpc(), &tok, "gw-stats", vec![]).await;
    for round in 1..=2u64 {
        let rows = added
            .iter()
            .map(|p| pb::PeerStats {
                public_key: raw(&p.public_key),
                rx_bytes: round,
                ..Default::default()
            })
            .collect();
        gw.send(G::Stats(pb::Stats {
            collected_at_ms: round as i64,
            peers: rows,
            more: false,
        }))
        .await;
    }
    eventually("both stats rounds stored", || async {
        let rows = t.admin.stats(loc).await.unwrap();
        rows.len() == 25 && rows.iter().all(|r| r.rx_bytes == 2)
    })
    .await;
    let stats_path = format!("/api/v1/locations/{loc}/stats");
    let mut rows: Vec<u64> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page: Vec<gatehouse_core::api::StatsView> = t
            .admin
            .page(&stats_path, 7, after.as_deref())
            .await
            .unwrap();
        rows.extend(page.iter().map(|r| r.peer_id));
        if page.len() < 7 {
            break;
        }
        after = page.last().map(|r| r.id.to_string());
    }
    rows.sort();
    assert_eq!(rows, want, "every stats row once");
    drop(gw);

    // Events (3,000 over three Hellos) and gateways (string key).
    for g in 0..3 {
        let tok = t.admin.create_token(loc).await.unwrap();
        let events = (1..=1000).map(|s| mfa_event(s, &key(), 1)).collect();
        let (gw, _, _) = Gw::hello(t.grpc(), &tok, &format!("gw-{g}"), events).await;
        drop(gw);
    }
    let events = t.admin.events(loc).await.unwrap();
    assert_eq!(events.len(), 3000);
    let mut ids: Vec<u64> = events.iter().map(|e| e.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3000, "no event twice across pages");
    let gws: Vec<String> = t
        .admin
        .page::<gatehouse_core::api::GatewayView>(
            &format!("/api/v1/locations/{loc}/gateways"),
            2,
            Some("gw-0"),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.gateway_id)
        .collect();
    assert_eq!(gws, vec!["gw-1", "gw-2"]);

    for bad in ["limit=0", "limit=10001", "after=x", "limt=3"] {
        let resp = reqwest::Client::new()
            .get(format!("{}{path}?{bad}", t.core.http_url()))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{bad}");
    }
}

#[tokio::test]
async fn the_database_and_its_wal_files_are_owner_only() {
    let t = TestCore::start().await;
    let (loc, _) = t.location(false).await;
    t.admin.add_peer(loc, &peer(1)).await.unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", t.db().display());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{path} has mode {mode:o}");
    }

    // A database an older Core left world-readable is tightened at start.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let core = start_on(&db).await;
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    core.stop().await;
}

#[tokio::test]
async fn strings_from_gateways_are_bounded_and_printable() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(true).await;
    // A gateway id that is not printable is refused.
    let e = try_hello(&t, &token, "gw\u{1b}[2J")
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = try_hello(&t, &token, &"g".repeat(129)).await.err();
    assert_eq!(e.map(|e| e.code()), Some(Code::InvalidArgument));

    let mut gw = Gw::open(t.grpc(), Some(&token)).await.unwrap();
    let mut ev = mfa_event(1, &key(), 1);
    ev.detail = format!("bad\n{}", "d".repeat(100_000));
    gw.send(G::Hello(pb::Hello {
        gateway_id: "gw-1".into(),
        name: format!("host\u{1b}[31m{}", "h".repeat(10_000)),
        version: "1.0\r\n".repeat(1000),
        applied_revision: 0,
        pending_events: vec![ev],
    }))
    .await;
    gw.ack().await;
    gw.snapshot().await;
    gw.send(G::Applied(pb::Applied {
        revision: 0,
        attempted_revision: 2,
        error: Some(pb::ApplyError {
            kind: pb::ApplyErrorKind::Invalid as i32,
            message: "\u{7}".repeat(50_000),
            rejected: (0..2000)
                .map(|i| pb::Rejection {
                    item: format!("peers[{i}]"),
                    reason: "x".repeat(1000),
                })
                .collect(),
        }),
    }))
    .await;
    let printable = |s: &str| !s.chars().any(char::is_control);
    eventually("the Applied error is stored", || async {
        t.admin.gateways(loc).await.unwrap()[0].last_error.is_some()
    })
    .await;
    let g = t.admin.gateways(loc).await.unwrap().remove(0);
    assert!(g.name.len() <= 253 && printable(&g.name), "{:?}", g.name);
    assert!(
        g.version.len() <= 64 && printable(&g.version),
        "{:?}",
        g.version
    );
    let err = g.last_error.unwrap();
    assert!(err.message.len() <= 1024 && printable(&err.message));
    assert!(err.rejected.len() <= 129, "{}", err.rejected.len());
    assert!(err.rejected.iter().all(|r| r.reason.len() <= 512));
    let ev = t.admin.events(loc).await.unwrap().remove(0);
    assert!(
        ev.detail.len() <= 512 && printable(&ev.detail),
        "{:?}",
        ev.detail
    );
}
