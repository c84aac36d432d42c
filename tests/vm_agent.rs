//! The agent on kernel WireGuard, driven by the reference Core, in the VM
//! (`tests/vm/run-kernel-tests.sh --test vm_agent`): 10,000 peers plus one with 5,000
//! allowed IPs applied exactly; an equal snapshot writes nothing; a change to one peer
//! leaves a connected client's session and counters alone; a restarted agent adopts the
//! interface without touching a peer or an address.
//!
//! The Core and the agent run in this process on the VM's loopback; the agent's interface
//! lives in a gateway namespace and a real client (`wg`, kernel WireGuard) in another,
//! joined by a veth pair.

#[path = "netns/mod.rs"]
mod netns;
#[path = "support/mod.rs"]
mod support;
#[path = "vm/support.rs"]
mod vm;

use std::collections::BTreeMap;
use std::time::Duration;

use gatehouse::agent::status::Status;
use gatehouse::agent::{self, Settings};
use gatehouse::backend::kernel::KernelBackend;
use gatehouse::model::{Desired, InterfaceSpec, Key, PeerSpec, SecretKey};
use gatehouse_core::api::{NewLocation, NewPeer, PeerPatch};
use netns::{is_root, Netns};
use support::{eventually, peer_list, settings, Core};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const IGNORE: &str = "needs kernel WireGuard: tests/vm/run-kernel-tests.sh --test vm_agent";

/// The agent in this process, on a kernel backend opened inside `ns`.
struct KernelAgent {
    status: watch::Receiver<Status>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl KernelAgent {
    fn start(ns: &Netns, settings: Settings) -> KernelAgent {
        let backend = ns.enter(|| KernelBackend::new(&settings.interface).expect("kernel backend"));
        let (tx, status) = watch::channel(Status::default());
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(agent::run_with_status(
            settings,
            Box::new(backend),
            async move {
                let _ = stop_rx.await;
            },
            tx,
        ));
        KernelAgent {
            status,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    async fn applied(&self, revision: u64) {
        eventually(&format!("agent applied revision {revision}"), || async {
            self.status().applied_revision >= revision
        })
        .await;
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("agent panicked").expect("agent failed");
        }
    }
}

impl Drop for KernelAgent {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn private_key() -> SecretKey {
    SecretKey::new([0x42; 32]).clamped()
}

/// What the kernel must hold: the Core's peers of the location, as `Desired`.
async fn expected(core: &Core, loc: u64, listen_port: u16) -> Desired {
    let peers = core.admin.peers(loc).await.expect("peers");
    let mut want = BTreeMap::new();
    for p in peers {
        let key = Key::from_base64(&p.public_key).expect("key");
        let mut spec = PeerSpec::new(key, p.allowed_ips.iter().map(|s| s.parse().unwrap()));
        spec.persistent_keepalive = p.persistent_keepalive;
        want.insert(key, spec.into());
    }
    Desired {
        interface: InterfaceSpec {
            private_key: private_key(),
            listen_port,
            addresses: Default::default(),
            mtu: None,
            fwmark: 0,
        },
        peers: want,
    }
}

fn big_peer() -> NewPeer {
    let mut ips = Vec::new();
    for i in 0..5000u32 {
        ips.push(format!("172.16.{}.{}/32", i / 250, i % 250));
    }
    NewPeer {
        public_key: support::key(999_999).to_base64(),
        allowed_ips: ips,
        ..Default::default()
    }
}

struct Client {
    public_key: Key,
    ns: Netns,
}

/// A real client in its own namespace (kernel WireGuard), not yet configured.
fn client_keys() -> (String, Key) {
    let private = netns::run("wg", &["genkey"]).trim().to_owned();
    let public = SecretKey::from_base64(&private).expect("key").public_key();
    (private, public)
}

fn client_up(ns: &Netns, private: &str, gateway: &Key) {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("k");
    std::fs::write(&key_file, private).unwrap();
    ns.ip(&["link", "add", "wgc", "type", "wireguard"]);
    ns.exec(
        "wg",
        &[
            "set",
            "wgc",
            "private-key",
            key_file.to_str().unwrap(),
            "peer",
            &gateway.to_base64(),
            "endpoint",
            "192.0.2.1:51820",
            "allowed-ips",
            "10.0.0.0/16",
        ],
    );
    ns.ip(&["addr", "add", "10.0.0.2/16", "dev", "wgc"]);
    ns.ip(&["link", "set", "wgc", "up"]);
}

fn dump(ns: &Netns, iface: &str) -> vm::Dump {
    vm::parse_dump(&ns.exec("wg", &["show", iface, "dump"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kernel WireGuard: tests/vm/run-kernel-tests.sh --test vm_agent"]
async fn the_agent_keeps_kernel_wireguard_exactly_in_line_with_the_core() {
    assert!(is_root(), "{IGNORE}");
    if std::env::var_os("GATEHOUSE_TEST_CONVERGE_SECS").is_none() {
        // SAFETY: set before any other thread of this test reads the environment.
        unsafe { std::env::set_var("GATEHOUSE_TEST_CONVERGE_SECS", "300") };
    }
    let gw = Netns::new("vag");
    let cl = Netns::new("vac");
    gw.veth_to(&cl, "va", "192.0.2.1/24", "192.0.2.2/24");
    let iface = "ghk0";

    let mut core = Core::start().await;
    let new = NewLocation {
        name: "kernel".into(),
        listen_port: 51820,
        addresses: vec!["10.0.0.1/16".into(), "fd00::1/64".into()],
        private_key: Some(private_key().expose_base64()),
        ..Default::default()
    };
    let (loc, token) = core.location(new, 0).await;
    let (client_private, client_public) = client_keys();
    let client = Client {
        public_key: client_public,
        ns: cl,
    };
    core.admin
        .add_peer(
            loc,
            &NewPeer {
                public_key: client.public_key.to_base64(),
                allowed_ips: vec!["10.0.0.2/32".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut many = peer_list(0, 10_000);
    many.push(big_peer());
    core.admin.add_peers(loc, &many).await.unwrap();
    let rev = core.revision(loc).await;

    // 1. Cold apply of 10,000 peers + one with 5,000 allowed IPs.
    let state = tempfile::tempdir().unwrap();
    let mut s = settings(&core.url(), &token, state.path());
    s.interface = iface.into();
    s.resync_interval = Duration::from_secs(3600);
    let agent = KernelAgent::start(&gw, s.clone());
    agent.applied(rev).await;
    let want = expected(&core, loc, 51820).await;
    assert_eq!(want.peers.len(), 10_002);
    vm::assert_dump_matches(&dump(&gw, iface), &want);
    let addrs = gw.ip(&["-o", "addr", "show", "dev", iface]);
    assert!(
        addrs.contains("10.0.0.1/16") && addrs.contains("fd00::1/64"),
        "{addrs}"
    );
    let cold = agent.status();
    eprintln!(
        "cold apply: {} device write messages, {} link writes",
        cold.device_writes, cold.link_writes
    );

    // 2. The Core restarts: its snapshot equals the kernel, nothing is written.
    let snapshots = cold.core.snapshots;
    core.restart().await;
    eventually("resynced with the restarted Core", || async {
        let st = agent.status();
        st.core.connected && st.core.snapshots > snapshots
    })
    .await;
    let after = agent.status();
    assert_eq!(
        (after.device_writes, after.link_writes),
        (cold.device_writes, cold.link_writes),
        "an equal snapshot wrote to the kernel"
    );

    // 3. A real client passes traffic; changing ONE other peer leaves its session alone.
    client_up(&client.ns, &client_private, &private_key().public_key());
    assert!(client.ns.ping("10.0.0.1", 10), "ping through the tunnel");
    let before = dump(&gw, iface).peers[&client.public_key].clone();
    assert!(before.latest_handshake > 0 && before.rx > 0, "{before:?}");
    let other = core.admin.peers(loc).await.unwrap()[5].clone();
    core.admin
        .patch_peer(
            loc,
            other.id,
            &PeerPatch {
                persistent_keepalive: Some(21),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let rev = core.revision(loc).await;
    agent.applied(rev).await;
    let now = dump(&gw, iface);
    let kept = &now.peers[&client.public_key];
    // A re-created peer starts with no handshake and zeroed counters. WireGuard itself may
    // complete a newer handshake meanwhile (both sides initiating after the first ping
    // settle REKEY_TIMEOUT = 5 s later): newer is fine, older or zero is not.
    assert!(
        kept.latest_handshake >= before.latest_handshake,
        "handshake reset: {} -> {}",
        before.latest_handshake,
        kept.latest_handshake
    );
    assert!(
        kept.rx >= before.rx && kept.tx >= before.tx,
        "counters reset"
    );
    let changed = &now.peers[&Key::from_base64(&other.public_key).unwrap()];
    assert_eq!(changed.keepalive, 21);
    assert_eq!(
        agent.status().device_writes,
        after.device_writes + 1,
        "one peer change, one message"
    );
    assert!(client.ns.ping("10.0.0.1", 5));

    // 4. The agent restarts: the interface is adopted, nothing is written.
    agent.stop().await;
    let before = dump(&gw, iface);
    let agent = KernelAgent::start(&gw, s);
    agent.applied(rev).await;
    eventually("connected after restart", || async {
        agent.status().core.connected
    })
    .await;
    let st = agent.status();
    assert_eq!(
        (st.device_writes, st.link_writes),
        (0, 0),
        "restart wrote to the kernel"
    );
    let after = dump(&gw, iface);
    assert_eq!(after.peers.len(), before.peers.len());
    let (a, b) = (
        &after.peers[&client.public_key],
        &before.peers[&client.public_key],
    );
    assert_eq!(a.latest_handshake, b.latest_handshake);
    assert!(a.rx >= b.rx);
    let addrs = gw.ip(&["-o", "addr", "show", "dev", iface]);
    assert!(
        addrs.contains("10.0.0.1/16") && addrs.contains("fd00::1/64"),
        "{addrs}"
    );
    assert!(client.ns.ping("10.0.0.1", 5));
    agent.stop().await;
    core.stop().await;
}
