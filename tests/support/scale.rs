//! Deterministic peers and locations of any size, for the benches and the scale tests:
//! peer `i` always has the same key and addresses, so sizes of 100,000 and more cost no
//! key generation. Depends on `gatehouse_proto` and std only, so any crate of the
//! workspace can include it: `#[path = "../tests/support/scale.rs"] mod scale;` from a
//! bench (`../../tests/support/scale.rs` from `validate/benches`), `support::scale` from a
//! test that includes `support/mod.rs`.

#![allow(dead_code)]

use std::net::Ipv6Addr;

use gatehouse_proto::v1;

/// Peer `i`'s public key: 32 bytes distinct for every `i` (its index in the first four)
/// and not of low order, so valid without any Curve25519 work.
pub fn key(i: u32) -> [u8; 32] {
    let mut key = [7u8; 32];
    key[..4].copy_from_slice(&i.to_le_bytes());
    key
}

/// Peer `i`'s IPv4 address in 10.100.0.0/14 (room for 262,144 peers), outside the
/// locations the tests create (10.0.0.0/16 and smaller).
pub fn outside_ipv4(i: u32) -> String {
    format!("10.{}.{}.{}/32", 100 + (i >> 16), (i >> 8) & 0xff, i & 0xff)
}

/// Peer `i` as the Core sends it: [`key`] and one /32 and one /128 inside [`location`]'s
/// subnets (10.0.0.0/8 and fd00::/64, counted from .2: .1 is the gateway's).
pub fn proto_peer(i: u32) -> v1::Peer {
    let [_, a, b, c] = (i + 2).to_be_bytes();
    v1::Peer {
        public_key: key(i).to_vec(),
        allowed_ips: vec![
            format!("10.{a}.{b}.{c}/32"),
            format!(
                "{}/128",
                Ipv6Addr::from(0xfd00u128 << 112 | u128::from(i + 2))
            ),
        ],
        ..Default::default()
    }
}

/// Location 1, "bench": an interface on 10.0.0.1/8 and fd00::1/64 holding `peers`, no
/// firewall policy, MFA off.
pub fn location(peers: Vec<v1::Peer>) -> v1::Location {
    v1::Location {
        id: 1,
        name: "bench".into(),
        interface: Some(v1::Interface {
            private_key: vec![1; 32],
            listen_port: 51820,
            addresses: vec!["10.0.0.1/8".into(), "fd00::1/64".into()],
            mtu: 1420,
            fwmark: 0,
        }),
        peers,
        firewall: None,
        mfa: None,
    }
}

/// [`location`] with peers `0..n` of [`proto_peer`].
pub fn location_of(n: u32) -> v1::Location {
    location((0..n).map(proto_peer).collect())
}
