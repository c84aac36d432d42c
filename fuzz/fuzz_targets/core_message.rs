//! Core message bytes (a `CoreMessage`: snapshot or delta) → the agent's validated location.
//! A delta applies on top of a fixed valid location. Whatever is accepted must pass the
//! shared validator again and list only peers the validator calls valid.
#![no_main]

use gatehouse::location::{on_delta, on_snapshot, Held, Update};
use gatehouse_proto::v1::{self, core_message::Kind};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fn base() -> Held {
    let peer = |seed: u8, ip: &str| v1::Peer {
        public_key: gatehouse_validate::keys::public_of(&[seed; 32]).to_vec(),
        allowed_ips: vec![ip.into()],
        ..Default::default()
    };
    let snapshot = v1::Snapshot {
        revision: 5,
        location: Some(v1::Location {
            id: 1,
            name: "fuzz".into(),
            interface: Some(v1::Interface {
                private_key: vec![1; 32],
                listen_port: 51820,
                addresses: vec!["10.0.0.1/24".into()],
                mtu: 1420,
                fwmark: 0,
            }),
            peers: vec![peer(2, "10.0.0.2/32"), peer(3, "10.0.0.3/32")],
            firewall: None,
            mfa: None,
        }),
    };
    match on_snapshot(snapshot) {
        Update::Accept(h) => *h,
        other => panic!("the base location is valid: {other:?}"),
    }
}

/// An accepted location, encoded as the state file stores it, passes the shared validator
/// again, validates to what is held, and lists only valid peers.
fn check_held(held: &Held) {
    let location = held.to_proto();
    let again = gatehouse::validate::validate_location(&location);
    assert!(again.is_ok(), "accepted but invalid: {:?}", again.err());
    assert!(again.ok().as_ref() == Some(&held.valid), "the encoding does not round-trip");
    let valid = gatehouse::validate::valid_peer_keys(&location);
    for key in held.valid.desired.peers.keys() {
        assert!(valid.contains(key), "accepted a peer the validator rejects");
    }
}

fn check(update: Update) {
    if let Update::Accept(held) = update {
        check_held(&held);
    }
}

/// A delta is checked incrementally and applied in place: what it leaves must be what the
/// full validator accepts, and a rejected delta leaves the held location as it was.
fn check_delta(delta: &v1::Delta) {
    let mut held = base();
    let before = held.clone();
    match on_delta(Some(&mut held), delta) {
        Update::Advanced { .. } => check_held(&held),
        other => {
            assert!(
                held == before,
                "a delta that was not applied changed the held location"
            );
            check(other);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = v1::CoreMessage::decode(data) else {
        return;
    };
    match msg.kind {
        Some(Kind::Snapshot(s)) => check(on_snapshot(s)),
        Some(Kind::Delta(d)) => check_delta(&d),
        _ => {}
    }
});
