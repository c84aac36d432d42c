//! The acting pieces of takeover (design §12) against real components, in network
//! namespaces created and removed by each test:
//! - `kick` + `SourceRoutes` with real wireguard-go on both sides: a gateway namespace with
//!   a floating address (VIP, a secondary address), a client behind a router namespace that
//!   masquerades (nftables), the client's endpoint for the gateway being the VIP;
//! - the address watcher seeing a VIP come and go (IPv4 and IPv6).
//!
//! Root only: `tests/netns/run-root-tests.sh e2e_takeover` (run by `scripts/test.sh`).
//! UAPI sockets live in /var/run/wireguard whatever the namespace, so every interface
//! name is unique per test process.

#[path = "netns/mod.rs"]
mod netns;
#[path = "e2e/wg.rs"]
mod wg;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use gatehouse::backend::userspace::{UserspaceBackend, UserspaceConfig};
use gatehouse::backend::{Backend, Kick};
use gatehouse::ha::addrwatch;
use gatehouse::ha::source::SourceRoutes;
use gatehouse::model::{Desired, InterfaceSpec, PeerSpec, SecretKey};
use gatehouse::plan::plan;
use ipnet::IpNet;
use netns::{is_root, unique, ChildGuard, Netns, PidGuard};
use tokio::sync::{mpsc, watch};

const GW_PORT: u16 = 51911;
const CLIENT_PORT: u16 = 51912;
/// The gateway's own address and its floating address, on the segment to the router.
const GW_ADDR: &str = "10.61.0.2";
const VIP: &str = "10.61.0.10";
/// The router's address on the gateway's segment: the masquerade source clients get.
const ROUTER_INSIDE: &str = "10.61.0.1";
const TABLE: u32 = 51820;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A private key as `wg genkey` makes it (clamped; wireguard-go stores keys clamped).
fn clamped_key() -> SecretKey {
    let mut k = *SecretKey::generate().expose();
    k[0] &= 248;
    k[31] = (k[31] & 127) | 64;
    SecretKey::new(k)
}

/// gateway (10.61.0.2 + VIP 10.61.0.10) — router (10.61.0.1 | 192.168.61.1, masquerade
/// towards the gateway) — client (192.168.61.2), and a client wireguard-go whose endpoint
/// for the gateway is the VIP. The tunnel is 10.98.0.0/24.
struct Lab {
    // Field order is drop order: processes before their namespaces.
    _client_wg: ChildGuard,
    gw_pid: PidGuard,
    gw: Netns,
    _router: Netns,
    client: Netns,
    gw_if: String,
    client_if: String,
    gw_key: SecretKey,
    client_key: SecretKey,
    _key_file: tempfile::NamedTempFile,
}

impl Lab {
    fn new() -> Lab {
        let gw = Netns::new("tg");
        let router = Netns::new("tr");
        let client = Netns::new("tc");
        let (gw_link, inside) = gw.veth_to(&router, "tv", "10.61.0.2/24", "10.61.0.1/24");
        gw.ip(&["addr", "add", &format!("{VIP}/24"), "dev", &gw_link]);
        client.veth_to(&router, "tw", "192.168.61.2/24", "192.168.61.1/24");
        client.ip(&["route", "add", "default", "via", "192.168.61.1"]);
        router.exec("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
        router.exec("nft", &["add", "table", "ip", "gh_nat"]);
        router.exec(
            "nft",
            &[
                "add",
                "chain",
                "ip",
                "gh_nat",
                "post",
                "{",
                "type",
                "nat",
                "hook",
                "postrouting",
                "priority",
                "100",
                ";",
                "}",
            ],
        );
        router.exec(
            "nft",
            &[
                "add",
                "rule",
                "ip",
                "gh_nat",
                "post",
                "oifname",
                &inside,
                "masquerade",
            ],
        );

        let gw_if = unique("ghtg");
        let client_if = unique("ghtc");
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
        client.exec(
            "wg",
            &[
                "set",
                &client_if,
                "private-key",
                &key_path,
                "listen-port",
                &CLIENT_PORT.to_string(),
                "peer",
                &gw_key.public_key().to_base64(),
                "endpoint",
                &format!("{VIP}:{GW_PORT}"),
                "allowed-ips",
                "10.98.0.0/24",
            ],
        );
        client.ip(&["addr", "add", "10.98.0.2/24", "dev", &client_if]);
        client.ip(&["link", "set", &client_if, "up"]);
        Lab {
            _client_wg: client_wg,
            gw_pid: PidGuard(None),
            gw,
            _router: router,
            client,
            gw_if,
            client_if,
            gw_key,
            client_key,
            _key_file: key_file,
        }
    }

    /// The client as the gateway's peer: no endpoint (the gateway learns it, or a kick
    /// sets it), no keepalive.
    fn client_peer(&self) -> PeerSpec {
        PeerSpec::new(self.client_key.public_key(), [net("10.98.0.2/32")])
    }

    fn desired(&self) -> Desired {
        let peer = self.client_peer();
        Desired {
            interface: InterfaceSpec {
                private_key: self.gw_key.clone(),
                listen_port: GW_PORT,
                addresses: [net("10.98.0.1/24")].into(),
                mtu: Some(1380),
                fwmark: 0,
            },
            peers: BTreeMap::from([(peer.public_key, peer.into())]),
        }
    }

    /// A gateway wireguard-go started afresh (no session, no endpoint), configured.
    fn start_gateway(&mut self) -> UserspaceBackend {
        let name = self.gw_if.clone();
        let mut b = self.gw.enter(move || {
            UserspaceBackend::new(name, UserspaceConfig::default()).expect("backend")
        });
        let observed = b.observe().expect("observe");
        b.apply(&plan(&self.desired(), &observed)).expect("apply");
        self.gw_pid = PidGuard(b.pid());
        b
    }

    /// Stops the gateway's wireguard-go and deletes its interface.
    fn stop_gateway(&mut self, mut b: UserspaceBackend) {
        b.remove().expect("remove the gateway interface");
        self.gw_pid = PidGuard(None);
    }

    /// The client's view of the gateway peer (`wg show dump` in the client namespace).
    fn client_view(&self) -> wg::DumpPeer {
        let dump = wg::parse_dump(&self.client.exec("wg", &["show", &self.client_if, "dump"]))
            .expect("client dump");
        dump.peers[&self.gw_key.public_key().to_base64()].clone()
    }

    /// Waits until the client's latest handshake with the gateway is later than `after`
    /// (Unix seconds); `None` when it is not within `within`.
    fn client_handshake_after(&self, after: u64, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < within {
            if self.client_view().latest_handshake > after {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn source_routes(&self, f: impl FnOnce(&mut SourceRoutes) + Send) {
        self.gw.enter(|| f(&mut SourceRoutes::new(TABLE)));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
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

/// Waits until the current Unix second is later than `second` (handshake times that
/// `wg show` prints have a one-second resolution).
fn wait_past_second(second: u64) {
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        <= second
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long a test waits for a handshake a kick starts: less than WireGuard's 5 s
/// handshake retry, so the first initiation must be the one that succeeds.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(3);

/// The client talks to the gateway once; returns its handshake time and the client's
/// endpoint as the gateway saw it (behind the masquerade).
fn first_contact(lab: &Lab, b: &mut UserspaceBackend) -> (u64, SocketAddr) {
    assert!(
        (0..5).any(|_| lab.client.ping("10.98.0.1", 1)),
        "the client reaches the gateway through the VIP"
    );
    let handshake = lab.client_view().latest_handshake;
    assert!(handshake > 0);
    let seen = b.observe().expect("observe");
    let endpoint = seen.device.peers[&lab.client_key.public_key()]
        .config
        .endpoint
        .expect("the gateway learned the client's endpoint");
    assert_eq!(
        endpoint.ip(),
        ip(ROUTER_INSIDE),
        "the client is seen behind the masquerade"
    );
    (handshake, endpoint)
}

#[test]
#[ignore = "root + wireguard-go + nft: tests/netns/run-root-tests.sh e2e_takeover"]
fn a_kick_from_the_vip_reaches_a_client_behind_nat_and_without_the_route_it_does_not() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut lab = Lab::new();
    let mut b = lab.start_gateway();
    let (first, endpoint) = first_contact(&lab, &mut b);

    // The gateway restarts: no session, no endpoint. Without the source route, the kick
    // leaves from the gateway's own address, matches no NAT mapping and is dropped.
    lab.stop_gateway(b);
    let mut b = lab.start_gateway();
    lab.source_routes(|r| r.clear().expect("clear"));
    let kick = Kick {
        peer: std::sync::Arc::new(lab.client_peer()),
        endpoint,
        recreate: false,
    };
    b.kick(std::slice::from_ref(&kick)).expect("kick");
    assert_eq!(
        lab.client_handshake_after(first, HANDSHAKE_WAIT),
        None,
        "a handshake from {GW_ADDR} crossed the masquerade"
    );
    let seen = b.observe().expect("observe");
    let peer = &seen.device.peers[&lab.client_key.public_key()];
    assert_eq!(
        peer.config.endpoint,
        Some(endpoint),
        "the kick set the endpoint"
    );
    assert_eq!(peer.last_handshake, None);

    // Again from a fresh gateway (its handshake retry timers reset), with the route.
    lab.stop_gateway(b);
    let mut b = lab.start_gateway();
    let mut installed = 0;
    lab.source_routes(|r| {
        installed = r
            .install(&[ip(VIP), ip("2001:db8::10")], &[endpoint])
            .expect("install");
    });
    assert_eq!(installed, 1);
    let route = lab.gw.ip(&["route", "show", "table", &TABLE.to_string()]);
    assert!(route.contains(&format!("src {VIP}")), "{route}");
    let t = Instant::now();
    b.kick(&[kick]).expect("kick");
    let took = lab
        .client_handshake_after(first, HANDSHAKE_WAIT)
        .expect("the client completes the handshake the gateway started");
    eprintln!(
        "takeover handshake completed {:?} after the kick (observed by polling every 20 ms)",
        took.min(t.elapsed())
    );
    let view = lab.client_view();
    assert_eq!(
        view.config.endpoint,
        format!("{VIP}:{GW_PORT}"),
        "the client still talks to the VIP"
    );
    assert!(lab.gw.ping("10.98.0.2", 2), "the tunnel carries traffic");

    // Idempotent (one rule, one route), and clear removes routes and rules.
    lab.source_routes(|r| {
        assert_eq!(r.install(&[ip(VIP)], &[endpoint]).expect("again"), 1);
    });
    let rules = lab.gw.ip(&["rule", "show"]);
    assert_eq!(
        rules
            .lines()
            .filter(|l| l.contains(&format!("lookup {TABLE}")))
            .count(),
        1,
        "{rules}"
    );
    lab.source_routes(|r| {
        r.clear().expect("clear");
        assert_eq!(r.install(&[], &[endpoint]).expect("no VIP"), 0);
    });
    let rules = lab.gw.ip(&["rule", "show"]);
    assert!(!rules.contains(&TABLE.to_string()), "{rules}");
    lab.stop_gateway(b);
}

#[test]
#[ignore = "root + wireguard-go + nft: tests/netns/run-root-tests.sh e2e_takeover"]
fn only_a_recreating_kick_makes_a_gateway_holding_a_session_handshake_again() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut lab = Lab::new();
    let mut b = lab.start_gateway();
    let (first, endpoint) = first_contact(&lab, &mut b);
    lab.source_routes(|r| {
        r.install(&[ip(VIP)], &[endpoint]).expect("install");
    });
    wait_past_second(first);
    let rx_before = lab.client_view().rx_bytes;

    // The gateway still holds the session: the kick's keepalive travels over it (the
    // client receives it) and no handshake happens — the failback black hole.
    let mut kick = Kick {
        peer: std::sync::Arc::new(lab.client_peer()),
        endpoint,
        recreate: false,
    };
    b.kick(std::slice::from_ref(&kick)).expect("kick");
    assert_eq!(lab.client_handshake_after(first, HANDSHAKE_WAIT), None);
    assert!(
        lab.client_view().rx_bytes > rx_before,
        "the keepalive went over the old session"
    );

    // Re-created, the peer has no session: the kick starts a handshake.
    kick.recreate = true;
    b.kick(&[kick]).expect("kick");
    lab.client_handshake_after(first, HANDSHAKE_WAIT)
        .expect("a new handshake after the re-creation");
    let seen = b.observe().expect("observe");
    let peer = &seen.device.peers[&lab.client_key.public_key()];
    assert_eq!(peer.config.allowed_ips, lab.client_peer().allowed_ips);
    assert_eq!(
        peer.config.persistent_keepalive, 0,
        "the keepalive restored"
    );
    assert!(peer.last_handshake.is_some());

    // A kick of a peer the device does not have is skipped, whatever the kind.
    let stranger = PeerSpec::new(clamped_key().public_key(), [net("10.98.0.9/32")]);
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
    lab.source_routes(|r| r.clear().expect("clear"));
    lab.stop_gateway(b);
}

/// Runs the address watcher in `ns` and hands its reports to `f`.
fn with_watcher<F>(ns: &Netns, vips: Vec<IpAddr>, f: F)
where
    F: AsyncFnOnce(&mut mpsc::Receiver<BTreeSet<IpAddr>>) + Send,
{
    ns.enter(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                let (tx, mut rx) = mpsc::channel(16);
                let (stop_tx, stop_rx) = watch::channel(false);
                let task = tokio::spawn(addrwatch::run(vips, tx, stop_rx));
                f(&mut rx).await;
                stop_tx.send(true).expect("stop");
                tokio::time::timeout(Duration::from_secs(5), task)
                    .await
                    .expect("the watcher stops")
                    .expect("join")
                    .expect("the watcher ran without error");
            })
    })
}

async fn next(rx: &mut mpsc::Receiver<BTreeSet<IpAddr>>) -> BTreeSet<IpAddr> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a report within 5 s")
        .expect("the watcher is running")
}

/// Nothing more is reported (within a short while: the events were already sent).
async fn quiet(rx: &mut mpsc::Receiver<BTreeSet<IpAddr>>) {
    if let Ok(extra) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        panic!("unexpected report {extra:?}");
    }
}

fn set(ips: &[&str]) -> BTreeSet<IpAddr> {
    ips.iter().map(|s| ip(s)).collect()
}

#[test]
#[ignore = "root: tests/netns/run-root-tests.sh e2e_takeover"]
fn the_address_watcher_reports_vips_coming_and_going_in_order() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let ns = Netns::new("ta");
    let (a, b) = (unique("tava"), unique("tavb"));
    ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    ns.ip(&["link", "set", &a, "up"]);
    ns.ip(&["link", "set", &b, "up"]);
    // Present before the watcher starts: in the first report.
    ns.ip(&["addr", "add", "192.0.2.11/32", "dev", &b]);
    let vips = vec![ip("192.0.2.10"), ip("192.0.2.11"), ip("2001:db8::10")];
    with_watcher(&ns, vips, async |rx| {
        assert_eq!(next(rx).await, set(&["192.0.2.11"]));
        ns.ip(&["addr", "add", "192.0.2.10/24", "dev", &a]);
        assert_eq!(next(rx).await, set(&["192.0.2.10", "192.0.2.11"]));
        // Unrelated addresses say nothing.
        ns.ip(&["addr", "add", "198.51.100.1/24", "dev", &a]);
        ns.ip(&["addr", "add", "2001:db8::99/64", "dev", &a, "nodad"]);
        quiet(rx).await;
        ns.ip(&["addr", "add", "2001:db8::10/64", "dev", &a, "nodad"]);
        assert_eq!(
            next(rx).await,
            set(&["192.0.2.10", "192.0.2.11", "2001:db8::10"])
        );
        // The same VIP on a second interface: gone only when both lose it.
        ns.ip(&["addr", "add", "192.0.2.10/32", "dev", &b]);
        ns.ip(&["addr", "del", "192.0.2.10/24", "dev", &a]);
        quiet(rx).await;
        ns.ip(&["addr", "del", "192.0.2.10/32", "dev", &b]);
        assert_eq!(next(rx).await, set(&["192.0.2.11", "2001:db8::10"]));
        ns.ip(&["addr", "del", "2001:db8::10/64", "dev", &a]);
        assert_eq!(next(rx).await, set(&["192.0.2.11"]));
        ns.ip(&["addr", "del", "198.51.100.1/24", "dev", &a]);
        ns.ip(&["addr", "del", "192.0.2.11/32", "dev", &b]);
        assert_eq!(next(rx).await, set(&[]));
        quiet(rx).await;
    });
}

#[test]
#[ignore = "root: tests/netns/run-root-tests.sh e2e_takeover"]
fn source_routes_copy_the_next_hop_for_both_families_and_follow_the_vip() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let gw = Netns::new("ts");
    let router = Netns::new("tt");
    let (link, far) = gw.veth_to(&router, "ts", "10.62.0.2/24", "10.62.0.1/24");
    gw.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:62::2/64",
        "dev",
        &link,
        "nodad",
    ]);
    router.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:62::1/64",
        "dev",
        &far,
        "nodad",
    ]);
    gw.ip(&["addr", "add", "10.62.0.10/24", "dev", &link]);
    gw.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:62::10/64",
        "dev",
        &link,
        "nodad",
    ]);
    gw.ip(&["route", "add", "default", "via", "10.62.0.1"]);
    gw.ip(&["-6", "route", "add", "default", "via", "2001:db8:62::1"]);
    let vips = [ip("10.62.0.10"), ip("2001:db8:62::10")];
    let endpoints: Vec<SocketAddr> = ["198.51.100.7:1", "[2001:db8:99::7]:2", "10.62.0.1:3"]
        .iter()
        .map(|e| e.parse().unwrap())
        .collect();
    let mut routes = gw.enter(|| SourceRoutes::new(TABLE));
    let installed = gw.enter(|| routes.install(&vips, &endpoints).expect("install"));
    assert_eq!(installed, 3);

    let v4 = gw.ip(&["route", "get", "198.51.100.7"]);
    assert!(
        v4.contains("via 10.62.0.1") && v4.contains("src 10.62.0.10"),
        "{v4}"
    );
    let on_link = gw.ip(&["route", "get", "10.62.0.1"]);
    assert!(
        on_link.contains("src 10.62.0.10") && !on_link.contains("via"),
        "{on_link}"
    );
    let v6 = gw.ip(&["-6", "route", "get", "2001:db8:99::7"]);
    assert!(
        v6.contains("via 2001:db8:62::1") && v6.contains("src 2001:db8:62::10"),
        "{v6}"
    );
    for family in ["-4", "-6"] {
        let rules = gw.ip(&[family, "rule", "show"]);
        let ours: Vec<&str> = rules
            .lines()
            .filter(|l| l.contains(&format!("lookup {TABLE}")))
            .collect();
        assert_eq!(ours.len(), 1, "{rules}");
        assert!(ours[0].starts_with("32765:"), "{rules}");
    }
    // Installing again changes nothing. When the IPv4 VIP leaves, the kernel keeps the
    // routes from it: the next install (given the VIPs present) removes them.
    let again = gw.enter(|| routes.install(&vips, &endpoints).expect("again"));
    assert_eq!(again, 3);
    gw.ip(&["addr", "del", "10.62.0.10/24", "dev", &link]);
    let left = gw.enter(|| routes.install(&vips[1..], &[]).expect("count"));
    assert_eq!(left, 1, "only the IPv6 route is left");
    let main = gw.ip(&["route", "get", "198.51.100.7"]);
    assert!(main.contains("src 10.62.0.2"), "{main}");

    gw.enter(|| routes.clear().expect("clear"));
    for family in ["-4", "-6"] {
        let rules = gw.ip(&[family, "rule", "show"]);
        assert!(!rules.contains(&format!("lookup {TABLE}")), "{rules}");
        let table = gw.ip(&[family, "route", "show", "table", &TABLE.to_string()]);
        assert!(table.trim().is_empty(), "{table}");
    }
}
