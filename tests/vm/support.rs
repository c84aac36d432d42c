//! Shared by the kernel VM tests and the kernel benchmark: deterministic desired states of
//! any size and a parser for `wg show <if> dump`, the independent view of the kernel.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use gatehouse::model::{Desired, InterfaceSpec, Key, PeerSpec, SecretKey};
use ipnet::IpNet;

/// 32 pseudo-random bytes from a seed (splitmix64): valid-looking distinct keys.
pub fn key_bytes(seed: u64) -> [u8; 32] {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    let mut out = [0u8; 32];
    for chunk in out.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

/// A private key as `wg genkey` makes them: clamped. The kernel stores (and reports) a
/// private key clamped, so an unclamped desired key would never compare equal.
pub fn secret(seed: u64) -> SecretKey {
    let mut k = key_bytes(seed);
    k[0] &= 248;
    k[31] = (k[31] & 127) | 64;
    SecretKey::new(k)
}

pub fn peer_key(n: u64) -> Key {
    Key(key_bytes(n + 1_000_000))
}

/// Peer `n`'s single address: 10.0.0.0/8 counted up from 10.0.0.1.
pub fn peer_ip(n: u32) -> IpNet {
    IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0001 + n)), 32).expect("valid /32")
}

/// `count` addresses: IPv4 /24s from 100.64.0.0 (at most 16,384), then IPv6 /64s.
pub fn many_ips(count: usize) -> BTreeSet<IpNet> {
    let v4 = count.min(4 * count / 5).min(16_384);
    let mut out: BTreeSet<IpNet> = (0..v4 as u32)
        .map(|i| IpNet::new(IpAddr::V4(Ipv4Addr::from(0x6440_0000 + (i << 8))), 24).expect("/24"))
        .collect();
    for i in 0..(count - v4) as u128 {
        let addr = Ipv6Addr::from((0xfd42u128 << 112) | (i << 64));
        out.insert(IpNet::new(IpAddr::V6(addr), 64).expect("/64"));
    }
    out
}

/// An interface with `peers` single-address peers and, if `big_ips > 0`, one more peer
/// holding that many allowed IPs.
pub fn desired(seed: u64, listen_port: u16, peers: u32, big_ips: usize) -> Desired {
    let mut map = BTreeMap::new();
    for n in 0..peers {
        let p = PeerSpec::new(peer_key(n as u64), [peer_ip(n)]);
        map.insert(p.public_key, p.into());
    }
    if big_ips > 0 {
        let mut p = PeerSpec::new(Key(key_bytes(seed ^ 0xb16)), many_ips(big_ips));
        p.preshared_key = Some(SecretKey::new(key_bytes(seed ^ 0x95c)));
        p.persistent_keepalive = 25;
        map.insert(p.public_key, p.into());
    }
    Desired {
        interface: InterfaceSpec {
            private_key: secret(seed),
            listen_port,
            addresses: ["10.200.0.1/16", "fd10:200::1/64"]
                .iter()
                .map(|s| s.parse().expect("address"))
                .collect(),
            mtu: Some(1400),
            fwmark: 0,
        },
        peers: map,
    }
}

/// One peer line of `wg show <if> dump`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpPeer {
    pub preshared_key: Option<String>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: BTreeSet<IpNet>,
    pub latest_handshake: u64,
    pub rx: u64,
    pub tx: u64,
    pub keepalive: u16,
}

/// `wg show <if> dump`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dump {
    pub private_key: Option<String>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: BTreeMap<Key, DumpPeer>,
}

fn none_or(s: &str) -> Option<String> {
    (s != "(none)").then(|| s.to_owned())
}

pub fn parse_dump(text: &str) -> Dump {
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().expect("interface line").split('\t').collect();
    assert_eq!(head.len(), 4, "interface line: {head:?}");
    let mut dump = Dump {
        private_key: none_or(head[0]),
        listen_port: head[2].parse().expect("listen port"),
        fwmark: if head[3] == "off" {
            0
        } else {
            head[3].parse().expect("fwmark")
        },
        peers: BTreeMap::new(),
    };
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 8, "peer line: {line}");
        let key = Key::from_base64(f[0]).expect("peer key");
        let allowed_ips = if f[3] == "(none)" {
            BTreeSet::new()
        } else {
            f[3].split(',')
                .map(|s| s.parse().expect("allowed ip"))
                .collect()
        };
        dump.peers.insert(
            key,
            DumpPeer {
                preshared_key: none_or(f[1]),
                endpoint: none_or(f[2]).map(|e| e.parse().expect("endpoint")),
                allowed_ips,
                latest_handshake: f[4].parse().expect("handshake"),
                rx: f[5].parse().expect("rx"),
                tx: f[6].parse().expect("tx"),
                keepalive: if f[7] == "off" {
                    0
                } else {
                    f[7].parse().expect("keepalive")
                },
            },
        );
    }
    dump
}

/// Asserts that the kernel's view (`wg show dump`) is exactly the desired configuration.
pub fn assert_dump_matches(dump: &Dump, want: &Desired) {
    assert_eq!(
        dump.private_key.as_deref(),
        Some(want.interface.private_key.expose_base64().as_str()),
        "private key"
    );
    if want.interface.listen_port != 0 {
        assert_eq!(dump.listen_port, want.interface.listen_port, "listen port");
    }
    assert_eq!(dump.fwmark, want.interface.fwmark, "fwmark");
    assert_eq!(
        dump.peers.keys().collect::<Vec<_>>(),
        want.peers.keys().collect::<Vec<_>>(),
        "peer set"
    );
    for (key, w) in &want.peers {
        let h = &dump.peers[key];
        assert_eq!(
            h.allowed_ips,
            std::collections::BTreeSet::from(&w.allowed_ips),
            "allowed IPs of {key}"
        );
        assert_eq!(
            h.preshared_key,
            w.preshared_key.as_ref().map(|k| k.expose_base64()),
            "preshared key of {key}"
        );
        assert_eq!(h.keepalive, w.persistent_keepalive, "keepalive of {key}");
        if w.endpoint.is_some() {
            assert_eq!(h.endpoint, w.endpoint, "endpoint of {key}");
        }
    }
}
