//! Incremental validation (issue 11): for random valid locations and random runs of deltas,
//! [`location::on_deltas`] (which checks only the changed items against the held
//! location's index) accepts exactly when the full validator accepts the location that
//! results from the deltas, and what it then holds is what validating that location whole
//! gives (the same peers, settings and index). A rejected run leaves the held location as
//! it was. The generated content is dense on purpose: few keys and few prefixes, so
//! overlaps, replaced peers, peers removed and re-added, the location's own key and the
//! gateway's own addresses come up often.

use std::collections::BTreeMap;

use gatehouse::location::{apply_changes, on_deltas, Held, Update};
use gatehouse::model::SecretKey;
use gatehouse::validate::{valid_peer_keys, validate_location};
use gatehouse_proto::v1;
use proptest::prelude::*;

/// The location's private key seeds: 1 is the base's, 9 another one.
const OWN: u8 = 1;

fn own_public(seed: u8) -> Vec<u8> {
    SecretKey::new([seed; 32]).public_key().0.to_vec()
}

#[derive(Clone, Debug)]
enum KeyChoice {
    Seed(u8),
    Own,
    Short,
}

fn key_bytes(k: &KeyChoice) -> Vec<u8> {
    match k {
        KeyChoice::Seed(s) => vec![*s; 32],
        KeyChoice::Own => own_public(OWN),
        KeyChoice::Short => vec![7; 31],
    }
}

fn key_choice() -> impl Strategy<Value = KeyChoice> {
    prop_oneof![
        12 => (2u8..10).prop_map(KeyChoice::Seed),
        1 => Just(KeyChoice::Own),
        1 => Just(KeyChoice::Short),
    ]
}

/// A prefix from a small space: mostly canonical, sometimes with host bits set.
fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0u8..3, 0u8..4, prop::sample::select(vec![16u8, 24, 30, 31, 32]), any::<bool>())
            .prop_map(|(c, d, len, canonical)| {
                let net = ipnet::IpNet::new(format!("10.0.{c}.{d}").parse().unwrap(), len).unwrap();
                if canonical || len == 32 {
                    net.trunc().to_string()
                } else {
                    net.to_string()
                }
            }),
        2 => (0u8..4, prop::sample::select(vec![126u8, 127, 128]))
            .prop_map(|(x, len)| {
                ipnet::IpNet::new(format!("fd00::{x}").parse().unwrap(), len)
                    .unwrap()
                    .trunc()
                    .to_string()
            }),
    ]
}

fn peer() -> impl Strategy<Value = v1::Peer> {
    (
        key_choice(),
        prop::collection::vec(prefix(), 0..3),
        prop::sample::select(vec!["", "192.0.2.1:51820", "192.0.2.1:0"]),
        0u64..3,
    )
        .prop_map(|(key, allowed_ips, endpoint, session)| v1::Peer {
            public_key: key_bytes(&key),
            allowed_ips,
            endpoint: endpoint.into(),
            mfa_session: session,
            id: session + 10,
            ..Default::default()
        })
}

fn interface() -> impl Strategy<Value = v1::Interface> {
    let addresses = prop::collection::vec(
        prop::sample::select(vec![
            "10.0.0.1/24",
            "10.0.1.1/24",
            "10.0.2.3/16",
            "fd00::1/64",
            "fd00::2/64",
        ]),
        1..3,
    );
    (
        prop::sample::select(vec![OWN, OWN, 9]),
        addresses,
        prop::sample::select(vec![1420u32, 1420, 100]),
    )
        .prop_map(|(seed, addresses, mtu)| v1::Interface {
            private_key: vec![seed; 32],
            listen_port: 51820,
            addresses: addresses.into_iter().map(str::to_owned).collect(),
            mtu,
            fwmark: 0,
        })
}

fn change() -> impl Strategy<Value = v1::Change> {
    use v1::change::Kind;
    let kind = prop_oneof![
        8 => peer().prop_map(Kind::UpsertPeer),
        4 => key_choice().prop_map(|k| Kind::RemovePeer(key_bytes(&k))),
        1 => interface().prop_map(Kind::SetInterface),
        1 => (any::<bool>(), prop::sample::select(vec![0u32, 60]))
            .prop_map(|(enabled, t)| Kind::SetMfa(v1::MfaSettings {
                enabled,
                disconnect_threshold_secs: t,
            })),
        1 => prop::sample::select(vec![v1::Verdict::Accept, v1::Verdict::Unspecified])
            .prop_map(|v| Kind::SetFirewall(v1::FirewallPolicy {
                enabled: true,
                default_verdict: v as i32,
                rules: vec![],
            })),
    ];
    kind.prop_map(|k| v1::Change { kind: Some(k) })
}

/// A valid location: generated peers, the invalid and conflicting ones left out.
fn base() -> impl Strategy<Value = v1::Location> {
    (interface(), prop::collection::vec(peer(), 0..10)).prop_map(|(mut iface, peers)| {
        iface.mtu = 1420;
        let mut loc = v1::Location {
            id: 1,
            name: "prop".into(),
            interface: Some(iface),
            peers,
            firewall: None,
            mfa: None,
        };
        let mut seen = std::collections::BTreeSet::new();
        loc.peers.retain(|p| seen.insert(p.public_key.clone()));
        let valid = valid_peer_keys(&loc);
        loc.peers.retain(|p| {
            gatehouse::model::Key::from_slice(&p.public_key).is_some_and(|k| valid.contains(&k))
        });
        loc
    })
}

fn held(revision: u64, location: v1::Location) -> Held {
    let valid = validate_location(&location).expect("valid");
    Held::new(revision, location, valid)
}

/// The held location encodes to a location that validates to it (the state file's round
/// trip), for every valid location and after runs of deltas.
fn round_trips(h: &Held) -> Result<(), TestCaseError> {
    let encoded = h.to_proto();
    // The state file's encoding, made a peer at a time, is the same bytes.
    let mut pieces = Vec::new();
    h.encode_proto(&mut |b: &[u8]| {
        pieces.extend_from_slice(b);
        Ok::<_, ()>(())
    })
    .expect("no error");
    prop_assert!(
        pieces == prost::Message::encode_to_vec(&encoded),
        "streamed encoding"
    );
    let again = validate_location(&encoded).map_err(|r| TestCaseError::fail(format!("{r:?}")))?;
    prop_assert_eq!(&again, &h.valid);
    prop_assert!(
        held(h.revision, encoded) == *h,
        "the index is the encoded location's"
    );
    Ok(())
}

fn by_key(loc: &v1::Location) -> BTreeMap<Vec<u8>, v1::Peer> {
    loc.peers
        .iter()
        .map(|p| (p.public_key.clone(), p.clone()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn incremental_accepts_exactly_what_the_full_validator_accepts(
        loc in base(),
        runs in prop::collection::vec(prop::collection::vec(change(), 1..4), 1..4),
    ) {
        prop_assume!(validate_location(&loc).is_ok());
        let deltas: Vec<v1::Delta> = runs
            .into_iter()
            .enumerate()
            .map(|(i, changes)| v1::Delta {
                revision: 6 + i as u64,
                base_revision: 5 + i as u64,
                changes,
            })
            .collect();
        let all: Vec<v1::Change> = deltas.iter().flat_map(|d| d.changes.clone()).collect();
        let resulting = apply_changes(&loc, &all).expect("known changes");
        let full = validate_location(&resulting);
        let before = held(5, loc.clone());
        round_trips(&before)?;
        let mut h = before.clone();
        let (update, used) = on_deltas(Some(&mut h), &deltas);
        prop_assert_eq!(used, deltas.len());
        let last = 5 + deltas.len() as u64;
        match update {
            Update::Advanced { revision, .. } => {
                prop_assert!(full.is_ok(), "incremental accepted, full rejected: {:?}", full.err());
                prop_assert_eq!(revision, last);
                // What validating the resulting location whole holds ...
                let full = full.unwrap();
                prop_assert_eq!(&h.valid, &full);
                prop_assert_eq!(h.firewall(), resulting.firewall.as_ref());
                // ... the same peers as the resulting location (the order of the list
                // aside), and the index is the one of the location it encodes.
                let encoded = h.to_proto();
                let keys = |l: &v1::Location| by_key(l).into_keys().collect::<Vec<_>>();
                prop_assert_eq!(keys(&encoded), keys(&resulting));
                prop_assert!(h == held(last, encoded), "index or domain drifted");
                round_trips(&h)?;
            }
            Update::Reject { rejections, .. } => {
                prop_assert!(full.is_err(), "incremental rejected {:?}, full accepted", rejections);
                prop_assert!(!rejections.is_empty());
                prop_assert!(h == before, "a rejected run changed the held location");
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// A delta that adds one new peer: the same rejections, item for item, as the full
    /// validator lists for the resulting location (the new peer is the last one in both).
    #[test]
    fn a_new_peer_is_rejected_with_the_full_validators_items(loc in base(), new in peer()) {
        prop_assume!(validate_location(&loc).is_ok());
        prop_assume!(!loc.peers.iter().any(|p| p.public_key == new.public_key));
        // Prefixes of the new peer nested in each other are named differently (index doc).
        let nets: Vec<ipnet::IpNet> = new.allowed_ips.iter().filter_map(|s| s.parse().ok()).collect();
        prop_assume!(!nets.iter().enumerate().any(|(i, a)| {
            nets.iter().enumerate().any(|(j, b)| i != j && a.contains(b))
        }));
        let change = v1::Change { kind: Some(v1::change::Kind::UpsertPeer(new)) };
        let resulting = apply_changes(&loc, std::slice::from_ref(&change)).expect("known");
        let delta = v1::Delta { revision: 6, base_revision: 5, changes: vec![change] };
        let mut h = held(5, loc);
        let (update, _) = on_deltas(Some(&mut h), &[delta]);
        match (update, validate_location(&resulting)) {
            (Update::Reject { mut rejections, .. }, Err(mut full)) => {
                rejections.sort_by(|a, b| a.item.cmp(&b.item));
                full.sort_by(|a, b| a.item.cmp(&b.item));
                prop_assert_eq!(rejections, full);
            }
            (Update::Advanced { .. }, Ok(_)) => {}
            (update, full) => prop_assert!(false, "{:?} against {:?}", update, full.err()),
        }
    }
}
