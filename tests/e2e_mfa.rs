//! MFA expiry and peer stats end to end with real WireGuard (issue 4): the agent as a real
//! process (userspace backend, wireguard-go) in a gateway namespace, a real wireguard-go
//! client in a client namespace, the reference Core in process (harness `tests/e2e`).
//!
//! - An MFA client that pings stays beyond twice the threshold; once it falls silent
//!   (its wireguard-go is killed: no packet at all, not even its passive keepalive)
//!   the gateway removes it within 15 s of the last ping, the Core stores one event and
//!   ends the session, and a second gateway (another agent process, in its own
//!   namespace, reaching the Core through a loopback proxy) removes it too.
//! - A client that sends nothing but persistent keepalives stays.
//! - Offline: the Core stopped, the client silent, the agent removes the peer, is
//!   SIGKILLed and restarted with the Core still down; when the Core returns the event is
//!   stored exactly once and the peer is not sent back.
//! - Stats: the Core's rx/tx for the client match `wg show` on the gateway within one
//!   stats interval.
//!
//! Root only: `tests/netns/run-root-tests.sh e2e_mfa`.

#[path = "e2e/mod.rs"]
mod e2e;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use e2e::agent::{self as agent_proc, AgentOptions, AgentPaths, AgentProcess};
use e2e::netns::{unique, Netns};
use e2e::{cmd, cmd_ok, eventually, ClientOptions, Site, CONVERGE};
use gatehouse_core::api::{EventView, NewLocation, StatsView};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The MFA disconnect threshold of these tests.
const T: Duration = Duration::from_secs(10);
/// The brief's bound: the peer is gone within this long after the last ping.
const GONE_WITHIN: Duration = Duration::from_secs(15);
/// How long the Core reconnect may take after an outage (agent backoff ceiling 30 s).
const RECONNECT: Duration = Duration::from_secs(60);

/// An MFA location with threshold [`T`], the client registered with an MFA session
/// (its preshared key configured on the client), the agent synced and a ping through.
async fn mfa_up(site: &mut Site) -> String {
    let name = format!("loc-{}", site.tag);
    site.create_location(NewLocation {
        mfa: true,
        disconnect_threshold_secs: T.as_secs(),
        ..Site::default_location(&name)
    })
    .await;
    // No persistent keepalive from the gateway: only the client's own packets count.
    site.add_client(ClientOptions {
        keepalive: 0,
        ..ClientOptions::default()
    })
    .await;
    let started = site
        .admin()
        .start_mfa_session(site.location().id, site.client().peer_id, None)
        .await
        .expect("start the MFA session");
    let psk_file = site.dir.path().join("client.psk");
    e2e::write_secret(&psk_file, &started.preshared_key);
    let ns = site.client_ns.name().to_string();
    let iface = site.client().interface.clone();
    let gw_key = site.location().public_key.clone();
    let psk_path = psk_file.display().to_string();
    cmd_ok(
        "ip",
        &[
            "netns",
            "exec",
            &ns,
            "wg",
            "set",
            &iface,
            "peer",
            &gw_key,
            "preshared-key",
            &psk_path,
        ],
    )
    .await;
    site.start_agent().await;
    site.wait_synced().await;
    site.wait_ping().await;
    site.client().public_key.clone()
}

/// The client falls silent at once: its wireguard-go is killed (by pid) and its
/// interface goes with it. Setting the interface down is not enough: wireguard-go still
/// sends its passive keepalive 10 s after the last data it received (32 bytes the
/// gateway rightly counts as a sign of life). Returns the client's peer id.
fn silence_client(site: &mut Site) -> u64 {
    let client = site.client.take().expect("a client");
    let id = client.peer_id;
    drop(client);
    id
}
async fn events(site: &Site) -> Vec<EventView> {
    site.admin()
        .events(site.location().id)
        .await
        .expect("GET events")
}

async fn session_ended(site: &Site, peer_id: u64) -> bool {
    let peers = site
        .admin()
        .peers(site.location().id)
        .await
        .expect("GET peers");
    let me = peers
        .iter()
        .find(|p| p.id == peer_id)
        .expect("the client peer is listed");
    me.mfa_session.is_none() && !me.active
}

async fn on_gateway(site: &Site, peer: &str) -> bool {
    site.gw_dump().await.peers.contains_key(peer)
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_mfa"]
fn silent_mfa_client_is_removed_from_every_gateway() {
    e2e::run("mr", async |mut site: Site| {
        let peer = mfa_up(&mut site).await;

        // Pinging for more than twice the threshold: the peer stays.
        let count = (T.as_secs() * 2 + 3) as u32;
        let pinger = site.start_pinger(count, "1");
        let t = Instant::now();
        while t.elapsed() < T * 2 {
            assert!(on_gateway(&site, &peer).await, "removed while pinging");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let pings = pinger.finish().await;
        let last_ping = Instant::now();
        let peer_id = silence_client(&mut site);
        assert!(pings.received + 1 >= pings.transmitted, "{pings:?}");
        assert!(on_gateway(&site, &peer).await, "removed while pinging");
        assert_eq!(site.status().await.mfa_removals, 0);

        // A second gateway of the location joins now: its own timer for the (to it idle)
        // peer starts later than the first gateway's, so it removes the peer on the
        // Core's word, not by its own expiry.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let second = SecondGateway::start(&site).await;
        second.wait_peer(&peer, true).await;

        // Gone from `wg show` within 15 s of the last ping (and not before the threshold).
        let gone = eventually("the silent peer removed", GONE_WITHIN * 2, || async {
            (!on_gateway(&site, &peer).await).then(|| last_ping.elapsed())
        })
        .await;
        eprintln!("figure: peer gone {gone:?} after the last ping (threshold {T:?})");
        assert!(
            gone <= GONE_WITHIN,
            "gone only {gone:?} after the last ping"
        );
        assert!(gone + Duration::from_secs(1) >= T, "gone after {gone:?}");

        // The Core lists the event once and the session ended.
        let status = site.status().await;
        let stored = eventually("the Core stored the event", CONVERGE, || async {
            let ev = events(&site).await;
            (!ev.is_empty() && site.status().await.pending_events == 0).then_some(ev)
        })
        .await;
        assert_eq!(stored.len(), 1, "{stored:?}");
        assert_eq!(stored[0].reason, "mfa_inactive");
        assert_eq!(stored[0].public_key, peer);
        assert_eq!(stored[0].gateway_id, status.gateway_id);
        assert!(session_ended(&site, peer_id).await);
        assert_eq!(status.mfa_removals, 1);

        // The second gateway removes it too, and does not report it itself.
        let t2 = Instant::now();
        second.wait_peer(&peer, false).await;
        eprintln!(
            "figure: second gateway removed it {:?} after the first",
            t2.elapsed()
        );
        let rev = site.revision().await;
        eventually(
            "the second gateway applied the revision",
            CONVERGE,
            || async {
                let gws = site.admin().gateways(site.location().id).await.ok()?;
                gws.iter()
                    .any(|g| {
                        g.name == second.paths.name && g.connected && g.applied_revision == rev
                    })
                    .then_some(())
            },
        )
        .await;
        tokio::time::sleep(T / 2).await;
        assert_eq!(events(&site).await.len(), 1, "one event in all");
        assert!(!on_gateway(&site, &peer).await);
        second.assert_peer(&peer, false).await;
    });
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_mfa"]
fn client_sending_only_keepalives_stays() {
    // No data at all, only the client's persistent keepalive every 3 s: received bytes
    // are a sign of life (a handshake-only rule would remove it after the threshold, as
    // WireGuard renews handshakes only every two minutes).
    e2e::run("ma", async |mut site: Site| {
        let peer = mfa_up(&mut site).await;
        let ns = site.client_ns.name().to_string();
        let iface = site.client().interface.clone();
        let gw_key = site.location().public_key.clone();
        cmd_ok(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "wg",
                "set",
                &iface,
                "peer",
                &gw_key,
                "persistent-keepalive",
                "3",
            ],
        )
        .await;
        let handshake = site.gw_dump().await.peers[&peer].latest_handshake;
        let t = Instant::now();
        while t.elapsed() < T * 2 + Duration::from_secs(5) {
            assert!(
                on_gateway(&site, &peer).await,
                "removed while keepalives flow"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let dump = site.gw_dump().await;
        assert_eq!(
            dump.peers[&peer].latest_handshake, handshake,
            "no new handshake: only keepalives kept it"
        );
        let s = site.status().await;
        assert_eq!((s.mfa_removals, s.pending_events), (0, 0));
        assert!(events(&site).await.is_empty());
    });
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_mfa"]
fn offline_removal_survives_sigkill_and_reaches_the_core_once() {
    e2e::run("mk", async |mut site: Site| {
        let peer = mfa_up(&mut site).await;
        let first = site.status().await;

        site.stop_core().await;
        eventually("the agent saw the Core go", CONVERGE, || async {
            site.try_status().await.filter(|s| !s.core.connected)
        })
        .await;
        let peer_id = silence_client(&mut site);
        eventually("the silent peer removed", CONVERGE, || async {
            (!on_gateway(&site, &peer).await).then_some(())
        })
        .await;
        let removed = eventually("the event kept", CONVERGE, || async {
            site.try_status().await.filter(|s| s.pending_events == 1)
        })
        .await;
        assert_eq!(removed.mfa_removals, 1);

        // SIGKILL, restart with the Core still down: still pending, still removed.
        site.kill_agent();
        site.start_agent().await;
        let restarted = eventually("restored from the state file", CONVERGE, || async {
            site.try_status()
                .await
                .filter(|s| s.applied_revision == first.applied_revision)
        })
        .await;
        assert!(!restarted.core.connected);
        assert_eq!(restarted.pending_events, 1);
        // Several resyncs and MFA ticks: the state file's location still holds the peer
        // in the same session; the tombstone keeps it out.
        tokio::time::sleep(site.options.resync_interval * 3).await;
        assert!(
            !on_gateway(&site, &peer).await,
            "re-added from the state file"
        );
        let s = site.status().await;
        assert_eq!((s.pending_events, s.mfa_removals), (1, 0), "{s:?}");

        // The Core returns: the event is stored once, the peer is not sent back.
        site.start_core().await;
        site.wait_synced_within(RECONNECT).await;
        eventually("the event acknowledged", CONVERGE, || async {
            site.try_status().await.filter(|s| s.pending_events == 0)
        })
        .await;
        let ev = events(&site).await;
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].public_key, peer);
        assert_eq!(ev[0].gateway_id, first.gateway_id);
        assert!(session_ended(&site, peer_id).await);
        assert_eq!(site.revision().await, first.applied_revision + 1);
        assert!(!on_gateway(&site, &peer).await, "sent back by the snapshot");
        tokio::time::sleep(site.options.resync_interval * 2).await;
        assert!(!on_gateway(&site, &peer).await);
        assert_eq!(events(&site).await.len(), 1);
    });
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_mfa"]
fn core_stats_match_wg_show_within_one_stats_interval() {
    e2e::run("ms", async |mut site: Site| {
        let name = format!("loc-{}", site.tag);
        site.create_location(Site::default_location(&name)).await;
        site.add_client(ClientOptions {
            keepalive: 0,
            ..ClientOptions::default()
        })
        .await;
        site.start_agent().await;
        let status = site.wait_synced().await;
        site.wait_ping().await;
        let peer = site.client().public_key.clone();
        let interval = site.options.stats_interval;

        let mut epoch = None;
        for burst in 0..3 {
            let pings = site.ping(5, "0.2", None).await;
            assert_eq!(pings.received, 5, "burst {burst}: {pings:?}");
            let dump = site.gw_dump().await;
            let seen = Instant::now();
            let wg = dump.peers[&peer].clone();
            assert!(wg.rx_bytes > 0 && wg.tx_bytes > 0);
            let row = eventually("the Core's row matches wg show", CONVERGE, || async {
                core_row(&site, &status.gateway_id, &peer)
                    .await
                    .filter(|r| r.rx_bytes == wg.rx_bytes && r.tx_bytes == wg.tx_bytes)
            })
            .await;
            let lag = seen.elapsed();
            eprintln!("figure: burst {burst}: the Core matched wg show {lag:?} after it was read");
            assert!(
                lag <= interval + Duration::from_secs(1),
                "burst {burst}: the Core matched only {lag:?} after wg show (interval {interval:?})"
            );
            assert_eq!((row.total_rx, row.total_tx), (wg.rx_bytes, wg.tx_bytes));
            assert_eq!(row.endpoint.as_deref(), Some(wg.config.endpoint.as_str()));
            assert_eq!(
                row.last_handshake.map(|ms| ms / 1000),
                Some(wg.latest_handshake as i64)
            );
            assert_ne!(row.counter_epoch, 0, "a peer the agent created");
            assert_eq!(*epoch.get_or_insert(row.counter_epoch), row.counter_epoch);
        }
    });
}

async fn core_row(site: &Site, gateway_id: &str, peer: &str) -> Option<StatsView> {
    let rows = site.admin().stats(site.location().id).await.ok()?;
    rows.into_iter()
        .find(|r| r.gateway_id == gateway_id && r.public_key == peer)
}

// ------------------------------------------------------------------ second gateway --

/// A second gateway of the site's location: the agent as a process in a namespace of its
/// own (its wireguard-go binds the same listen port), joined to the gateway namespace by
/// a veth pair; it reaches the in-process Core (on the gateway namespace's loopback)
/// through a TCP proxy the test runs there. Fields drop in order: the agent, every other
/// process of its namespace (its wireguard-go) and its UAPI files, the proxy, the
/// namespace.
struct SecondGateway {
    _agent: AgentProcess,
    _cleanup: e2e::procs::Cleanup,
    proxy: JoinHandle<()>,
    pub paths: AgentPaths,
    ns: Netns,
}

const SECOND_UNDERLAY: &str = "198.51.100.1";

impl SecondGateway {
    async fn start(site: &Site) -> SecondGateway {
        let ns = Netns::new(&format!("{}h", site.tag));
        site.gw.veth_to(
            &ns,
            "eh",
            &format!("{SECOND_UNDERLAY}/24"),
            "198.51.100.2/24",
        );
        let core: SocketAddr = site
            .core
            .url()
            .trim_start_matches("http://")
            .parse()
            .expect("the Core's gRPC address");
        // Runs on the test's runtime, whose threads live in the gateway namespace.
        let listener = TcpListener::bind((SECOND_UNDERLAY, 0))
            .await
            .expect("bind the proxy");
        let proxy_addr = listener.local_addr().expect("proxy address");
        let proxy = tokio::spawn(proxy(listener, core));

        let interface = unique("ghh");
        // One token per gateway: a token is bound to the first gateway id using it.
        let location = site.location.as_ref().expect("the site's location").id;
        let token = site.admin().create_token(location).await.expect("token");
        let token_file = site.dir.path().join("token2");
        e2e::write_secret(&token_file, &token);
        let paths = AgentPaths {
            config: site.dir.path().join("gateway2.toml"),
            token_file,
            state_dir: site.dir.path().join("state2"),
            log: site.dir.path().join("agent2.log"),
            http: "127.0.0.1:9180".parse().expect("address"),
            interface: interface.clone(),
            name: format!("{}-2", site.paths.name),
        };
        let rendered = agent_proc::render_config(
            &paths,
            &format!("http://{proxy_addr}"),
            &AgentOptions::default(),
        );
        // Cleartext to a non-loopback address must be allowed explicitly (test veth).
        let mut config: toml::Table = toml::from_str(&rendered).expect("rendered TOML");
        if let Some(core) = config.get_mut("core").and_then(|c| c.as_table_mut()) {
            core.insert("allow_insecure".into(), true.into());
        }
        let config = toml::to_string(&config).expect("render TOML");
        std::fs::write(&paths.config, config).expect("write the second configuration");
        let cleanup = e2e::procs::Cleanup {
            namespaces: e2e::procs::netns_id(ns.name()).into_iter().collect(),
            files: ["sock", "log"]
                .iter()
                .map(|ext| format!("/var/run/wireguard/{interface}.{ext}").into())
                .collect(),
        };
        // Spawned from a thread inside its namespace: the process lives there.
        let agent = ns.enter(|| AgentProcess::spawn(&paths));
        let second = SecondGateway {
            _agent: agent,
            _cleanup: cleanup,
            proxy,
            paths,
            ns,
        };
        let rev = site.revision().await;
        eventually("the second gateway synced", CONVERGE, || async {
            let gws = site.admin().gateways(site.location().id).await.ok()?;
            gws.iter()
                .any(|g| g.name == second.paths.name && g.connected && g.applied_revision == rev)
                .then_some(())
        })
        .await;
        second
    }

    /// `wg show` of the second gateway's interface.
    async fn dump(&self) -> Option<e2e::Dump> {
        let out = cmd(
            "ip",
            &[
                "netns",
                "exec",
                self.ns.name(),
                "wg",
                "show",
                &self.paths.interface,
                "dump",
            ],
        )
        .await;
        if !out.status.success() {
            return None;
        }
        e2e::wg::parse_dump(&String::from_utf8_lossy(&out.stdout)).ok()
    }

    async fn wait_peer(&self, peer: &str, present: bool) {
        eventually(
            &format!("peer present = {present} on the second gateway"),
            CONVERGE,
            || async {
                let dump = self.dump().await?;
                (dump.peers.contains_key(peer) == present).then_some(())
            },
        )
        .await;
    }

    async fn assert_peer(&self, peer: &str, present: bool) {
        let dump = self.dump().await.expect("wg show on the second gateway");
        assert_eq!(dump.peers.contains_key(peer), present);
    }
}

impl Drop for SecondGateway {
    fn drop(&mut self) {
        self.proxy.abort();
        if std::thread::panicking() {
            eprintln!(
                "---- agent log of the second gateway (last 40 lines) ----\n{}\n----",
                agent_proc::tail(&self.paths.log, 40)
            );
        }
    }
}

/// Forwards every connection to `target` until aborted.
async fn proxy(listener: TcpListener, target: SocketAddr) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}
