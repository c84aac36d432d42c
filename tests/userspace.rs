//! Root tests of the userspace backend with real wireguard-go processes: a gateway
//! namespace runs `UserspaceBackend`, a client namespace runs a second wireguard-go
//! configured with `wg`, joined by a veth pair. Run by `tests/netns/run-root-tests.sh`
//! or `sudo cargo test --test userspace -- --include-ignored`.
//!
//! UAPI sockets live in /var/run/wireguard whatever the namespace, so every interface
//! name is unique per test process.

#[path = "netns/mod.rs"]
mod netns;

use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use gatehouse::backend::userspace::{UserspaceBackend, UserspaceConfig};
use gatehouse::backend::{Backend, BackendError};
use gatehouse::model::{Desired, InterfaceSpec, Key, PeerSpec, SecretKey};
use gatehouse::plan::{plan, Op, Plan};
use ipnet::IpNet;
use netns::{unique, ChildGuard, Netns, PidGuard};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A private key as `wg genkey` makes it (clamped; wireguard-go stores keys clamped).
fn clamped_key() -> SecretKey {
    let mut k = *SecretKey::generate().expose();
    k[0] &= 248;
    k[31] = (k[31] & 127) | 64;
    SecretKey::new(k)
}

/// Gateway and client namespaces joined by a veth pair (gateway 192.168.77.1, client
/// .2), a client wireguard-go configured for the gateway, and the gateway's desired state.
struct Lab {
    _client_wg: ChildGuard,
    gw: Netns,
    client: Netns,
    gw_if: String,
    client_if: String,
    gw_key: SecretKey,
    client_key: SecretKey,
    _key_file: tempfile::NamedTempFile,
}

const GW_PORT: u16 = 51901;

impl Lab {
    fn new() -> Lab {
        let gw = Netns::new("ug");
        let client = Netns::new("uc");
        gw.veth_to(&client, "uv", "192.168.77.1/24", "192.168.77.2/24");
        let gw_if = unique("ghg");
        let client_if = unique("ghc");
        let gw_key = clamped_key();
        let client_key = clamped_key();

        let child = client
            .command("wireguard-go")
            .args(["-f", &client_if])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the client's wireguard-go");
        let client_wg = ChildGuard(child);
        wait_for(&format!("/var/run/wireguard/{client_if}.sock"));

        let mut key_file = tempfile::NamedTempFile::new().unwrap();
        writeln!(key_file, "{}", client_key.expose_base64()).unwrap();
        let key_path = key_file.path().to_str().unwrap().to_string();
        let gw_pub = gw_key.public_key().to_base64();
        let endpoint = format!("192.168.77.1:{GW_PORT}");
        client.exec(
            "wg",
            &[
                "set",
                &client_if,
                "private-key",
                &key_path,
                "listen-port",
                "51902",
                "peer",
                &gw_pub,
                "endpoint",
                &endpoint,
                "allowed-ips",
                "10.99.0.0/24",
            ],
        );
        client.ip(&["addr", "add", "10.99.0.2/24", "dev", &client_if]);
        client.ip(&["link", "set", &client_if, "up"]);
        Lab {
            gw,
            client,
            gw_if,
            client_if,
            gw_key,
            client_key,
            _client_wg: client_wg,
            _key_file: key_file,
        }
    }

    /// The client as the gateway's peer, with its endpoint so that the gateway can
    /// start a handshake itself (after a restart it has no session to answer with).
    fn client_peer(&self) -> PeerSpec {
        let mut peer = PeerSpec::new(self.client_key.public_key(), [net("10.99.0.2/32")]);
        peer.endpoint = Some("192.168.77.2:51902".parse().unwrap());
        peer
    }

    fn desired(&self, peers: Vec<PeerSpec>) -> Desired {
        Desired {
            interface: InterfaceSpec {
                private_key: self.gw_key.clone(),
                listen_port: GW_PORT,
                addresses: [net("10.99.0.1/24"), net("fd99::1/64")].into(),
                mtu: Some(1380),
                fwmark: 0,
            },
            peers: peers
                .into_iter()
                .map(|p| (p.public_key, p.into()))
                .collect(),
        }
    }

    fn backend(&self) -> UserspaceBackend {
        let name = self.gw_if.clone();
        self.gw.enter(move || {
            UserspaceBackend::new(name, UserspaceConfig::default()).expect("backend")
        })
    }

    /// True when the gateway reaches the client through the tunnel, and the client the
    /// gateway (a few tries: the first packet waits for the handshake).
    fn tunnel_works(&self, tries: u32) -> bool {
        (0..tries).any(|_| self.gw.ping("10.99.0.2", 1)) && self.client.ping("10.99.0.1", 1)
    }

    /// True when neither side reaches the other.
    fn tunnel_is_closed(&self) -> bool {
        !self.gw.ping("10.99.0.2", 1) && !self.client.ping("10.99.0.1", 1)
    }

    fn gw_wg_show(&self, what: &str) -> String {
        self.gw.exec("wg", &["show", &self.gw_if, what])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The client's wireguard-go is killed by its guard (SIGKILL leaves its socket);
        // remove what the processes of this test leave in the shared socket directory.
        for name in [
            format!("{}.sock", self.client_if),
            format!("{}.sock", self.gw_if),
            format!("{}.log", self.gw_if),
        ] {
            let _ = std::fs::remove_file(Path::new("/var/run/wireguard").join(name));
        }
    }
}

fn wait_for(path: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new(path).exists() {
        assert!(Instant::now() < deadline, "{path} did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn reconcile(b: &mut dyn Backend, d: &Desired) -> Plan {
    let observed = b.observe().expect("observe");
    let p = plan(d, &observed);
    b.apply(&p).expect("apply");
    p
}

#[test]
#[ignore = "needs root, wireguard-go and wg; run tests/netns/run-root-tests.sh"]
fn tunnel_lifecycle_with_real_wireguard_go() {
    let lab = Lab::new();
    let mut b = lab.backend();

    // Nothing runs yet: the plan creates the interface and configures everything.
    let p = reconcile(&mut b, &lab.desired(vec![lab.client_peer()]));
    assert_eq!(p.steps[0].op, Op::CreateLink);
    let mut pid_guard = PidGuard(b.pid());
    assert!(b.pid().is_some());
    assert_eq!(
        b.counters().device_writes,
        3,
        "the private key, then one UAPI set for all peer ops, then the port after them"
    );
    assert!(lab.tunnel_works(5), "ping through the tunnel");
    let shown = lab.gw.ip(&["addr", "show", "dev", &lab.gw_if]);
    assert!(
        shown.contains("10.99.0.1/24") && shown.contains("fd99::1/64"),
        "{shown}"
    );
    assert!(lab
        .gw
        .ip(&["link", "show", &lab.gw_if])
        .contains("mtu 1380"));

    // Converged: observing again plans nothing and an empty apply writes nothing.
    let before = b.counters();
    let p = reconcile(&mut b, &lab.desired(vec![lab.client_peer()]));
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(b.counters(), before, "a no-op apply sends zero writes");

    // Changing the client's allowed IPs is one peer update, visible in `wg show`.
    let mut wider = lab.client_peer();
    wider.allowed_ips.insert(net("10.98.0.0/24"));
    let p = reconcile(&mut b, &lab.desired(vec![wider.clone()]));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(matches!(p.steps[0].op, Op::UpdatePeer(_)));
    let allowed = lab.gw_wg_show("allowed-ips");
    assert!(
        allowed.contains("10.98.0.0/24") && allowed.contains("10.99.0.2/32"),
        "{allowed}"
    );
    assert_eq!(b.counters().device_writes, before.device_writes + 1);
    assert_eq!(b.counters().link_writes, before.link_writes);
    assert!(lab.tunnel_works(3), "the session survives the update");

    // Removing the peer stops traffic.
    let p = reconcile(&mut b, &lab.desired(vec![]));
    assert!(matches!(p.steps[..], [ref s] if matches!(s.op, Op::RemovePeer(_))));
    assert_eq!(lab.gw_wg_show("peers").trim(), "");
    assert!(lab.tunnel_is_closed(), "traffic stops without the peer");

    // Back again, then wireguard-go dies: check() notices and restarts it, a reconcile
    // restores the configuration and traffic flows again.
    reconcile(&mut b, &lab.desired(vec![wider.clone()]));
    assert!(lab.tunnel_works(5));
    let old_pid = b.pid().expect("a started process");
    // SAFETY: kill has no memory preconditions; the pid is the backend's child.
    unsafe { libc::kill(old_pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let err = loop {
        match b.observe() {
            Err(e) => break e,
            Ok(_) => assert!(Instant::now() < deadline, "death not noticed"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(matches!(err, BackendError::Unavailable(_)), "{err}");
    let repaired = b.check().expect("check").expect("something repaired");
    assert!(repaired.contains("restarted"), "{repaired}");
    let new_pid = b.pid().expect("restarted");
    pid_guard.0 = Some(new_pid);
    assert_ne!(new_pid, old_pid);
    let p = reconcile(&mut b, &lab.desired(vec![wider.clone()]));
    assert!(
        p.steps.iter().any(|s| matches!(s.op, Op::AddPeer(_))),
        "{p:?}"
    );
    assert!(lab.tunnel_works(5), "ping after the restart");
    assert_eq!(b.check().unwrap(), None, "healthy now");

    // remove() stops our wireguard-go and its interface goes.
    b.remove().unwrap();
    let links = lab.gw.ip(&["link", "show"]);
    assert!(!links.contains(&lab.gw_if), "{links}");
    assert!(!Path::new(&format!("/var/run/wireguard/{}.sock", lab.gw_if)).exists());
}

/// Peer `i` of a large location: a distinct public key (any 32 bytes not of low order)
/// and one /32 in 10.120.0.0/14.
fn many_peer(i: u32) -> PeerSpec {
    let mut key = [7u8; 32];
    key[..4].copy_from_slice(&i.to_le_bytes());
    let ip = format!("10.{}.{}.{}/32", 120 + (i >> 16), (i >> 8) & 255, i & 255);
    PeerSpec::new(Key(key), [net(&ip)])
}

/// A cold apply of more peers than one UAPI transaction carries goes in batches (the
/// request is never built whole), all of it lands, and the read of them all (parsed as
/// it arrives, over many socket reads) plans nothing afterwards.
#[test]
#[ignore = "needs root, wireguard-go and wg; run tests/netns/run-root-tests.sh"]
fn a_cold_apply_of_thousands_of_peers_goes_in_batches_and_reads_back_whole() {
    use gatehouse::backend::userspace::SET_BATCH_PEERS;
    let lab = Lab::new();
    let mut b = lab.backend();
    let n = 2 * SET_BATCH_PEERS as u32 + 100;
    let mut peers: Vec<PeerSpec> = (0..n).map(many_peer).collect();
    peers.push(lab.client_peer());
    let desired = lab.desired(peers);
    reconcile(&mut b, &desired);
    let _guard = PidGuard(b.pid());
    assert_eq!(
        b.counters().device_writes,
        1 + 3 + 1,
        "the private key, {} peer operations in batches of {SET_BATCH_PEERS}, then the port",
        n + 1
    );
    let observed = b.observe().expect("observe");
    assert_eq!(observed.device.peers.len(), n as usize + 1);
    for (key, spec) in &desired.peers {
        assert_eq!(
            observed.device.peers[key].config.allowed_ips, spec.allowed_ips,
            "{key}"
        );
    }
    let again = plan(&desired, &observed);
    assert!(again.is_empty(), "converged: {again:?}");
    assert!(lab.tunnel_works(5), "the client among them still works");
    b.remove().unwrap();
}

#[test]
#[ignore = "needs root, wireguard-go and wg; run tests/netns/run-root-tests.sh"]
fn a_new_backend_adopts_a_running_wireguard_go_without_churn() {
    let lab = Lab::new();
    let desired = lab.desired(vec![lab.client_peer()]);
    let mut first = lab.backend();
    reconcile(&mut first, &desired);
    let pid = first.pid().expect("started");
    let _guard = PidGuard(Some(pid));
    assert!(lab.tunnel_works(5));
    let rx_before = lab.gw_wg_show("transfer");
    drop(first);

    // The process survives the backend, and a new backend adopts it.
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let mut second = lab.backend();
    assert_eq!(second.pid(), None, "adopted, not started");
    let p = reconcile(&mut second, &desired);
    assert!(p.is_empty(), "adopting plans nothing: {p:?}");
    assert_eq!(second.counters().device_writes, 0);
    assert_eq!(second.counters().link_writes, 0);
    assert_eq!(second.check().unwrap(), None);
    assert!(!rx_before.trim().is_empty());
    assert!(lab.tunnel_works(3), "traffic kept flowing");

    // remove() of an adopted process deletes its interface; wireguard-go then exits.
    second.remove().unwrap();
    let sock = format!("/var/run/wireguard/{}.sock", lab.gw_if);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&sock).exists() {
        assert!(
            Instant::now() < deadline,
            "adopted wireguard-go did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs root, wireguard-go and wg; run tests/netns/run-root-tests.sh"]
fn listen_port_in_use_is_named_in_the_error() {
    let lab = Lab::new();
    // Something else holds the port in the gateway's namespace.
    let _holder = lab
        .gw
        .enter(|| std::net::UdpSocket::bind(("0.0.0.0", GW_PORT)).expect("bind"));
    let mut b = lab.backend();
    let desired = lab.desired(vec![]);
    let observed = b.observe().unwrap();
    let err = b.apply(&plan(&desired, &observed)).unwrap_err();
    let _guard = PidGuard(b.pid());
    let text = err.to_string();
    assert!(
        text.contains(&GW_PORT.to_string()) && text.contains("in use"),
        "{text}"
    );
    b.remove().unwrap();
}

#[test]
#[ignore = "needs root; run tests/netns/run-root-tests.sh"]
fn missing_wireguard_go_binary_is_a_config_error() {
    let ns = Netns::new("ub");
    let name = unique("ghm");
    let err = ns
        .enter(move || {
            UserspaceBackend::new(
                name,
                UserspaceConfig {
                    binary: "/nonexistent/wireguard-go".into(),
                    ..UserspaceConfig::default()
                },
            )
        })
        .unwrap_err();
    assert!(matches!(err, BackendError::Config(_)), "{err}");
}

/// wireguard-go starts with a cleared environment: only what it needs (and PATH), nothing
/// of the agent's (a token in GATEHOUSE_CORE_TOKEN, for one). A stand-in binary records its
/// environment in its log and exits.
#[test]
#[ignore = "needs root (setns); run tests/netns/run-root-tests.sh"]
fn wireguard_go_gets_a_cleared_environment() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("wireguard-go");
    std::fs::write(&fake, "#!/bin/sh\n/usr/bin/env\nexit 1\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ns = Netns::new("ue");
    let name = unique("ghe");
    let config = UserspaceConfig {
        binary: fake,
        socket_dir: dir.path().to_path_buf(),
        start_timeout: Duration::from_secs(5),
        ..UserspaceConfig::default()
    };
    let socket_dir = config.socket_dir.clone();
    let iface = name.clone();
    let err = ns.enter(move || {
        let mut b = UserspaceBackend::new(iface, config).expect("backend");
        let p = Plan {
            steps: vec![gatehouse::plan::Step {
                op: Op::CreateLink,
                reasons: vec![],
            }],
        };
        b.apply(&p).expect_err("the stand-in exits")
    });
    assert!(err.to_string().contains("exited"), "{err}");
    let log = std::fs::read_to_string(socket_dir.join(format!("{name}.log"))).unwrap();
    let names: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    assert!(names.contains(&"WG_PROCESS_FOREGROUND"), "{log}");
    assert!(names.contains(&"LOG_LEVEL"), "{log}");
    // What the shell itself sets is allowed; nothing inherited from the test process
    // (which has PATH, HOME, CARGO_* and more).
    for name in names {
        assert!(
            [
                "WG_PROCESS_FOREGROUND",
                "LOG_LEVEL",
                "PATH",
                "PWD",
                "SHLVL",
                "_",
                "OLDPWD"
            ]
            .contains(&name),
            "{name} passed to wireguard-go:\n{log}"
        );
    }
}
