//! The reproduced cases of content every gateway would reject: the Core refuses each with a
//! 4xx naming the field (or, for surrounding whitespace, stores the canonical form), so what
//! it stores and serves always passes the gateways' validator.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;
use gatehouse_core::api::{
    FirewallPolicy, FirewallRule, LocationPatch, NewLocation, NewPeer, PeerPatch, Verdict,
};
use gatehouse_core::client::ClientError;

fn expect(e: ClientError, status: u16, field: &str) {
    assert_eq!(e.status().map(|s| s.as_u16()), Some(status), "{e}");
    assert_eq!(e.field(), Some(field), "{e}");
}

fn with_ips(ips: &[&str]) -> NewPeer {
    NewPeer {
        allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
        ..peer(100)
    }
}

#[tokio::test]
async fn reproduced_cases_are_refused_naming_the_field() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await; // 10.8.0.1/24, fd08::1/64
    let a = t.admin.add_peer(loc, &peer(1)).await.unwrap(); // 10.9.0.3/32
    let rev = t.revision(loc).await;
    let own = t.admin.location(loc).await.unwrap().public_key;

    let endpoint_port_0 = NewPeer {
        endpoint: Some("192.0.2.1:0".into()),
        ..peer(2)
    };
    expect(
        t.admin.add_peer(loc, &endpoint_port_0).await.unwrap_err(),
        400,
        "endpoint",
    );
    let own_key = NewPeer {
        public_key: own.clone(),
        ..peer(2)
    };
    expect(
        t.admin.add_peer(loc, &own_key).await.unwrap_err(),
        409,
        "public_key",
    );
    // Overlapping the other peer's /32, in either direction.
    expect(
        t.admin
            .add_peer(loc, &with_ips(&["10.9.0.0/24"]))
            .await
            .unwrap_err(),
        409,
        "allowed_ips[0]",
    );
    expect(
        t.admin
            .add_peer(loc, &with_ips(&["fd00::/64", "10.9.0.3/32"]))
            .await
            .unwrap_err(),
        409,
        "allowed_ips[1]",
    );
    expect(
        t.admin
            .add_peer(loc, &with_ips(&["0.0.0.0/0"]))
            .await
            .unwrap_err(),
        400,
        "allowed_ips[0]",
    );
    expect(
        t.admin
            .add_peer(loc, &with_ips(&["10.99.0.1/32", "::/0"]))
            .await
            .unwrap_err(),
        400,
        "allowed_ips[1]",
    );
    // Covering the gateway's own address; a /32 elsewhere in its subnet is normal.
    expect(
        t.admin
            .add_peer(loc, &with_ips(&["10.8.0.0/30"]))
            .await
            .unwrap_err(),
        409,
        "allowed_ips[0]",
    );
    expect(
        t.admin
            .add_peer(loc, &with_ips(&["fd08::1/128"]))
            .await
            .unwrap_err(),
        409,
        "allowed_ips[0]",
    );
    expect(
        t.admin
            .add_peer(loc, &with_ips(&["10.9.1.7/24"]))
            .await
            .unwrap_err(),
        400,
        "allowed_ips[0]",
    );
    let zero = B64.encode([0u8; 32]);
    let zero_psk = NewPeer {
        preshared_key: Some(zero.clone()),
        ..peer(2)
    };
    expect(
        t.admin.add_peer(loc, &zero_psk).await.unwrap_err(),
        400,
        "preshared_key",
    );
    let low_order = NewPeer {
        public_key: zero.clone(),
        ..peer(2)
    };
    expect(
        t.admin.add_peer(loc, &low_order).await.unwrap_err(),
        400,
        "public_key",
    );
    let order_8 = "4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA=";
    let low_order = NewPeer {
        public_key: order_8.into(),
        ..peer(2)
    };
    expect(
        t.admin.add_peer(loc, &low_order).await.unwrap_err(),
        400,
        "public_key",
    );
    // In a bulk add the item is named.
    expect(
        t.admin
            .add_peers(loc, &[peer(5), own_key.clone()])
            .await
            .unwrap_err(),
        409,
        "[1].public_key",
    );
    // A patch is checked as an add is.
    let patch = PeerPatch {
        allowed_ips: Some(vec!["10.8.0.1/32".into()]),
        ..Default::default()
    };
    expect(
        t.admin.patch_peer(loc, a.id, &patch).await.unwrap_err(),
        409,
        "allowed_ips[0]",
    );
    let patch = PeerPatch {
        public_key: Some(own),
        ..Default::default()
    };
    expect(
        t.admin.patch_peer(loc, a.id, &patch).await.unwrap_err(),
        409,
        "public_key",
    );
    let patch = PeerPatch {
        preshared_key: Some(zero.clone()),
        ..Default::default()
    };
    expect(
        t.admin.patch_peer(loc, a.id, &patch).await.unwrap_err(),
        400,
        "preshared_key",
    );
    // The location: its address moved onto a peer's, a zero private key, port 0, /0.
    let onto_peer = LocationPatch {
        addresses: Some(vec!["10.9.0.3/16".into()]),
        ..Default::default()
    };
    expect(
        t.admin.patch_location(loc, &onto_peer).await.unwrap_err(),
        409,
        "addresses",
    );
    let zero_key = LocationPatch {
        private_key: Some(zero.clone()),
        ..Default::default()
    };
    expect(
        t.admin.patch_location(loc, &zero_key).await.unwrap_err(),
        400,
        "private_key",
    );
    let port_0 = LocationPatch {
        listen_port: Some(0),
        ..Default::default()
    };
    expect(
        t.admin.patch_location(loc, &port_0).await.unwrap_err(),
        400,
        "listen_port",
    );
    let slash_0 = LocationPatch {
        addresses: Some(vec!["10.8.0.1/0".into()]),
        ..Default::default()
    };
    expect(
        t.admin.patch_location(loc, &slash_0).await.unwrap_err(),
        400,
        "addresses[0]",
    );
    let bad_name = NewLocation {
        name: "a\u{1b}[2J".into(),
        ..Default::default()
    };
    expect(
        t.admin.create_location(&bad_name).await.unwrap_err(),
        400,
        "name",
    );
    let zero_key = NewLocation {
        name: "z".into(),
        private_key: Some(zero),
        ..Default::default()
    };
    expect(
        t.admin.create_location(&zero_key).await.unwrap_err(),
        400,
        "private_key",
    );
    assert_eq!(
        t.revision(loc).await,
        rev,
        "nothing refused made a revision"
    );

    // A firewall address with a leading space is stored in canonical form.
    let fw = FirewallPolicy {
        enabled: true,
        default_verdict: Verdict::Drop,
        rules: vec![FirewallRule {
            priority: 1,
            sources: vec![" 10.9.0.3".into(), "10.9.0.0/24 ".into()],
            destinations: vec![],
            ports: vec![],
            protocols: vec![],
            verdict: Verdict::Accept,
            comment: String::new(),
        }],
    };
    let stored = t.admin.put_firewall(loc, &fw).await.unwrap();
    assert_eq!(stored.rules[0].sources, vec!["10.9.0.3", "10.9.0.0/24"]);

    // What the Core serves passes the gateways' validator.
    let (_gw, _, snap) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let served = snap.location.expect("location");
    assert!(
        gatehouse_validate::validate_location(&served).is_ok(),
        "{:?}",
        gatehouse_validate::validate_location(&served).err()
    );
}

/// Content stored before the rules tightened: reported at start, and the location is served
/// without it (not frozen); fixing an item clears its finding and serves it again.
#[tokio::test]
async fn stored_content_failing_the_rules_is_reported_not_served() {
    let t = TestCore::start().await;
    let (loc, token) = t.location(false).await;
    let good = t.admin.add_peer(loc, &peer(1)).await.unwrap();
    let port0 = t.admin.add_peer(loc, &peer(2)).await.unwrap();
    let slash0 = t.admin.add_peer(loc, &peer(3)).await.unwrap();
    let db = t.db();
    let TestCore { core, dir, .. } = t;
    core.stop().await;
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute(
            "UPDATE peers SET endpoint = '192.0.2.1:0' WHERE id = ?1",
            [port0.id as i64],
        )
        .unwrap();
        conn.execute(
            "UPDATE peers SET allowed_ips = '0.0.0.0/0' WHERE id = ?1",
            [slash0.id as i64],
        )
        .unwrap();
    }
    let core = start_on(&db).await;
    let t = TestCore {
        admin: gatehouse_core::client::AdminClient::new(core.http_url(), ADMIN),
        core,
        dir,
    };

    let mut findings: Vec<(Option<u64>, String)> = t
        .admin
        .audit()
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.peer_id, f.item))
        .collect();
    findings.sort();
    assert_eq!(
        findings,
        vec![
            (Some(port0.id), "endpoint".to_string()),
            (Some(slash0.id), "allowed_ips[0]".to_string()),
        ]
    );

    let (mut gw, _, snap) = Gw::hello(t.grpc(), &token, "gw-1", vec![]).await;
    let served = snap.location.expect("location");
    assert_eq!(served.peers.len(), 1, "only the valid peer is served");
    assert_eq!(served.peers[0].id, good.id);
    assert!(gatehouse_validate::validate_location(&served).is_ok());

    // The location is not frozen: a new peer goes out as a delta the gateway accepts.
    t.admin.add_peer(loc, &peer(4)).await.unwrap();
    let d = gw.delta().await;
    assert_eq!(d.changes.len(), 1);
    // Fixing the endpoint clears its finding and serves the peer again.
    let fix = PeerPatch {
        endpoint: Some(String::new()),
        ..Default::default()
    };
    t.admin.patch_peer(loc, port0.id, &fix).await.unwrap();
    let d = gw.delta().await;
    assert!(matches!(
        &d.changes[0].kind,
        Some(gatehouse_proto::v1::change::Kind::UpsertPeer(p)) if p.id == port0.id
    ));
    let left: Vec<Option<u64>> = t
        .admin
        .audit()
        .await
        .unwrap()
        .iter()
        .map(|f| f.peer_id)
        .collect();
    assert_eq!(left, vec![Some(slash0.id)]);
}
