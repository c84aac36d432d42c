//! The kernel backend's takeover kick against kernel WireGuard, in the VM
//! (`tests/vm/run-kernel-tests.sh --test vm_kick`): a gateway namespace (KernelBackend)
//! and a client namespace (`wg`, kernel WireGuard) joined by a veth pair. The client never
//! sends: every handshake is one the gateway's kick started.

#[path = "netns/mod.rs"]
mod netns;
#[path = "vm/support.rs"]
mod vm;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gatehouse::backend::kernel::KernelBackend;
use gatehouse::backend::{Backend, Kick};
use gatehouse::model::{Desired, InterfaceSpec, Key, PeerSpec, SecretKey};
use gatehouse::plan::plan;
use netns::{is_root, unique, Netns};

const IGNORE: &str = "needs kernel WireGuard: tests/vm/run-kernel-tests.sh --test vm_kick";
/// Less than WireGuard's 5 s handshake retry: the kick's own initiation must succeed.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(4);

fn client_latest_handshake(ns: &Netns, iface: &str, gateway: &Key) -> u64 {
    vm::parse_dump(&ns.exec("wg", &["show", iface, "dump"])).peers[gateway].latest_handshake
}

/// Waits until the client's latest handshake is later than `after` (Unix seconds).
fn handshake_after(ns: &Netns, iface: &str, gateway: &Key, after: u64) -> bool {
    let start = Instant::now();
    while start.elapsed() < HANDSHAKE_WAIT {
        if client_latest_handshake(ns, iface, gateway) > after {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn wait_past_second(second: u64) {
    while SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        <= second
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs kernel WireGuard: tests/vm/run-kernel-tests.sh --test vm_kick"]
fn a_kernel_kick_starts_a_handshake_and_a_recreating_one_replaces_a_session() {
    assert!(is_root(), "{IGNORE}");
    let gw = Netns::new("vkg");
    let client = Netns::new("vkc");
    gw.veth_to(&client, "vkv", "192.0.2.1/24", "192.0.2.2/24");
    let iface = unique("ghkk");

    let gw_key = vm::secret(71);
    let client_private = netns::run("wg", &["genkey"]).trim().to_owned();
    let client_key = SecretKey::from_base64(&client_private)
        .expect("key")
        .public_key();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("k");
    std::fs::write(&key_file, &client_private).unwrap();
    client.ip(&["link", "add", "wgc", "type", "wireguard"]);
    client.exec(
        "wg",
        &[
            "set",
            "wgc",
            "private-key",
            key_file.to_str().unwrap(),
            "listen-port",
            "51821",
            "peer",
            &gw_key.public_key().to_base64(),
            "endpoint",
            "192.0.2.1:51820",
            "allowed-ips",
            "10.0.0.0/16",
        ],
    );
    client.ip(&["addr", "add", "10.0.0.2/16", "dev", "wgc"]);
    client.ip(&["link", "set", "wgc", "up"]);

    // The gateway's peer: no endpoint, no keepalive; the gateway cannot reach it alone.
    let peer = PeerSpec::new(client_key, ["10.0.0.2/32".parse().unwrap()]);
    let want = Desired {
        interface: InterfaceSpec {
            private_key: gw_key.clone(),
            listen_port: 51820,
            addresses: ["10.0.0.1/16".parse().unwrap()].into(),
            mtu: None,
            fwmark: 0,
        },
        peers: BTreeMap::from([(client_key, peer.clone().into())]),
    };
    let mut b = gw.enter(|| KernelBackend::new(&iface).expect("kernel backend"));
    let observed = b.observe().expect("observe");
    b.apply(&plan(&want, &observed)).expect("apply");
    let gw_pub = gw_key.public_key();
    assert_eq!(client_latest_handshake(&client, "wgc", &gw_pub), 0);

    // 1. A kick: endpoint set, keepalive 0 -> 1 -> 0 in one message, handshake.
    let endpoint: SocketAddr = "192.0.2.2:51821".parse().unwrap();
    let mut kick = Kick {
        peer: std::sync::Arc::new(peer.clone()),
        endpoint,
        recreate: false,
    };
    let writes = b.counters().device_writes;
    b.kick(std::slice::from_ref(&kick)).expect("kick");
    assert_eq!(
        b.counters().device_writes,
        writes + 1,
        "one netlink message"
    );
    assert!(
        handshake_after(&client, "wgc", &gw_pub, 0),
        "the kick started a handshake"
    );
    let seen = b.observe().expect("observe").device.peers[&client_key].clone();
    assert_eq!(seen.config.endpoint, Some(endpoint));
    assert_eq!(seen.config.persistent_keepalive, 0, "keepalive restored");
    assert!(seen.last_handshake.is_some());
    let first = client_latest_handshake(&client, "wgc", &gw_pub);

    // 2. The session is valid: a kick sends a keepalive over it, no handshake.
    wait_past_second(first);
    b.kick(std::slice::from_ref(&kick)).expect("kick");
    assert!(
        !handshake_after(&client, "wgc", &gw_pub, first),
        "no handshake while the gateway holds a session"
    );

    // 3. Re-created in the same message: no session, a new handshake.
    kick.recreate = true;
    b.kick(std::slice::from_ref(&kick)).expect("kick");
    assert!(
        handshake_after(&client, "wgc", &gw_pub, first),
        "the re-created peer handshakes again"
    );
    let seen = b.observe().expect("observe").device.peers[&client_key].clone();
    assert_eq!(seen.config.allowed_ips, peer.allowed_ips);
    assert_eq!(seen.config.persistent_keepalive, 0);

    // 4. Kicks of an absent peer change nothing.
    let stranger = PeerSpec::new(Key([9; 32]), ["10.0.9.9/32".parse().unwrap()]);
    b.kick(&[
        Kick {
            peer: std::sync::Arc::new(stranger.clone()),
            endpoint,
            recreate: true,
        },
        Kick {
            peer: std::sync::Arc::new(stranger),
            endpoint,
            recreate: false,
        },
    ])
    .expect("kick");
    assert_eq!(b.observe().expect("observe").device.peers.len(), 1);
}
