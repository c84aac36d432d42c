//! How long the shared validator takes for a location of 100,000 peers (each a /32 and a
//! /128), and the overlap check alone. Run: `cargo bench -p gatehouse-validate`.

use std::time::{Duration, Instant};

use gatehouse_proto::v1;
use gatehouse_validate::overlap::{find_overlaps, Holder};
use gatehouse_validate::{keys, validate_location};
use ipnet::IpNet;

const PEERS: u32 = 100_000;

fn location() -> v1::Location {
    let peers = (0..PEERS)
        .map(|i| {
            let mut seed = [7u8; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            let [_, a, b, c] = (i + 2).to_be_bytes();
            v1::Peer {
                // Any 32 bytes that are not of low order are a valid public key.
                public_key: seed.to_vec(),
                allowed_ips: vec![
                    format!("10.{a}.{b}.{c}/32"),
                    format!(
                        "{}/128",
                        std::net::Ipv6Addr::from(0xfd00u128 << 112 | u128::from(i + 2))
                    ),
                ],
                ..Default::default()
            }
        })
        .collect();
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

fn median(mut f: impl FnMut()) -> Duration {
    let mut runs: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    runs.sort();
    runs[2]
}

fn main() {
    let loc = location();
    assert!(keys::public_key(&loc.peers[0].public_key).is_ok());
    let whole = median(|| {
        let v = validate_location(&loc).expect("valid");
        assert_eq!(v.peers.len(), PEERS as usize);
    });
    let entries: Vec<(IpNet, Holder<u32>)> = loc
        .peers
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            p.allowed_ips
                .iter()
                .map(move |s| (s.parse().expect("prefix"), Holder::Peer(i as u32)))
        })
        .collect();
    let overlap = median(|| assert!(find_overlaps(&entries).is_empty()));
    println!("validate_location, {PEERS} peers (2 prefixes each): {whole:?} (median of 5)");
    println!(
        "find_overlaps, {} prefixes: {overlap:?} (median of 5)",
        entries.len()
    );
}
