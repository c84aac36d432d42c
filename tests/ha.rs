//! Several gateways per location (design §12), in process without root: an agent on the
//! in-memory backend, its HTTP server on loopback, and a Core that relays activity
//! (`RelayCore`: a snapshot, then the `PeerActivity` the test pushes, recording what the
//! gateway sends) or the reference Core (outages).
//!
//! What is shown: `/activate` kicks exactly the recently active peers at their relayed
//! endpoints (re-creating the one with a fresh session here, which gets a new counter
//! epoch); drain makes `/readyz` 503 and survives a restart; a Core outage keeps `/readyz`
//! 200; relayed endpoints survive a restart.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use gatehouse::backend::memory::MemoryBackend;
use gatehouse::backend::Kick;
use gatehouse::ha::{Answer, Command, Role};
use gatehouse::model::Key;
use gatehouse_proto::v1::gateway_service_server::{GatewayService, GatewayServiceServer};
use gatehouse_proto::v1::{self, core_message, gateway_message};
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn ep(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

type Outbound = mpsc::Sender<Result<v1::CoreMessage, tonic::Status>>;

/// A Core that answers each stream with one snapshot, then sends what the test pushes and
/// records every message the gateway sends.
#[derive(Clone, Default)]
struct RelayCore {
    location: v1::Location,
    out: Arc<Mutex<Option<Outbound>>>,
    received: Arc<Mutex<Vec<v1::GatewayMessage>>>,
}

#[tonic::async_trait]
impl GatewayService for RelayCore {
    type ConnectStream = ReceiverStream<Result<v1::CoreMessage, tonic::Status>>;

    async fn connect(
        &self,
        request: tonic::Request<tonic::Streaming<v1::GatewayMessage>>,
    ) -> Result<tonic::Response<Self::ConnectStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let received = Arc::clone(&self.received);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                received.lock().unwrap().push(m);
            }
        });
        let (tx, rx) = mpsc::channel(64);
        let snapshot = v1::CoreMessage {
            kind: Some(core_message::Kind::Snapshot(v1::Snapshot {
                revision: 1,
                location: Some(self.location.clone()),
            })),
        };
        tx.send(Ok(snapshot)).await.unwrap();
        *self.out.lock().unwrap() = Some(tx);
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

impl RelayCore {
    async fn start(peers: Vec<v1::Peer>) -> (RelayCore, String) {
        Self::start_with(peers, None).await
    }

    async fn start_with(peers: Vec<v1::Peer>, mfa: Option<v1::MfaSettings>) -> (RelayCore, String) {
        let core = RelayCore {
            location: v1::Location {
                id: 1,
                name: "ha".into(),
                interface: Some(v1::Interface {
                    private_key: vec![7; 32],
                    listen_port: 51820,
                    addresses: vec!["10.0.0.1/16".into()],
                    mtu: 1420,
                    fwmark: 0,
                }),
                peers,
                firewall: None,
                mfa,
            },
            ..Default::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(GatewayServiceServer::new(core.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (core, url)
    }

    /// Relays activity: (peer, when, endpoint or "").
    async fn relay(&self, active: &[(usize, SystemTime, &str)]) {
        let tx = self
            .out
            .lock()
            .unwrap()
            .clone()
            .expect("a gateway connected");
        let msg = v1::CoreMessage {
            kind: Some(core_message::Kind::PeerActivity(v1::PeerActivity {
                peers: active
                    .iter()
                    .map(|(n, at, endpoint)| v1::ActivePeer {
                        public_key: key(*n).0.to_vec(),
                        last_active_ms: unix_ms(*at),
                        endpoint: endpoint.to_string(),
                    })
                    .collect(),
            })),
        };
        tx.send(Ok(msg)).await.unwrap();
    }

    /// The counter epochs the gateway reported for `peer`, in order (no repeats).
    fn epochs_reported(&self, peer: Key) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for m in self.received.lock().unwrap().iter() {
            let Some(gateway_message::Kind::Stats(stats)) = &m.kind else {
                continue;
            };
            for p in stats.peers.iter().filter(|p| p.public_key == peer.0) {
                if out.last() != Some(&p.counter_epoch) {
                    out.push(p.counter_epoch);
                }
            }
        }
        out
    }
}

fn proto_peer(n: usize, endpoint: &str) -> v1::Peer {
    v1::Peer {
        public_key: key(n).0.to_vec(),
        allowed_ips: vec![format!("10.{}.{}.2/32", 1 + n / 250, n % 250)],
        endpoint: endpoint.into(),
        ..Default::default()
    }
}

/// Test settings with the HTTP server on a free loopback port.
fn settings_with_http(url: &str, token: &str, dir: &std::path::Path) -> gatehouse::agent::Settings {
    let mut s = settings(url, token, dir);
    s.http_listen = Some(format!("127.0.0.1:{}", free_port()).parse().unwrap());
    s
}

/// An agent with its HTTP server on a free loopback port; the server's base URL.
async fn agent_with_http(url: &str, dir: &std::path::Path) -> (Agent, String) {
    start(settings_with_http(url, "token", dir)).await
}

async fn start(s: gatehouse::agent::Settings) -> (Agent, String) {
    start_on(s, MemoryBackend::new("wgtest0")).await
}

/// Starts on `backend` (a clone of a stopped agent's backend: the interface stayed).
async fn start_on(s: gatehouse::agent::Settings, backend: MemoryBackend) -> (Agent, String) {
    let base = format!("http://{}", s.http_listen.unwrap());
    let agent = Agent::start_with(s, backend).await;
    eventually("the HTTP server answers", || async {
        reqwest::get(format!("{base}/healthz")).await.is_ok()
    })
    .await;
    (agent, base)
}

async fn post(base: &str, command: Command) -> Answer {
    let r = reqwest::Client::new()
        .post(format!("{base}/{}", command.name()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", command.name());
    r.json().await.unwrap()
}

async fn readyz(base: &str) -> (u16, String) {
    let r = reqwest::get(format!("{base}/readyz")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn kicked(kicks: &[Kick]) -> BTreeMap<Key, (SocketAddr, bool)> {
    kicks
        .iter()
        .map(|k| (k.peer.public_key, (k.endpoint, k.recreate)))
        .collect()
}

/// `/activate` sends one round: exactly the peers active within the window with a known
/// endpoint (the Core's configured endpoint first), the one with a recent handshake here
/// re-created (and reported with a new counter epoch); a second `/activate` is no new
/// transition and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activate_kicks_exactly_the_recently_active_peers_at_their_relayed_endpoints() {
    let peers = vec![
        proto_peer(0, ""),
        proto_peer(1, ""),
        proto_peer(2, ""),
        proto_peer(3, ""),
        proto_peer(4, "198.51.100.44:4444"),
        proto_peer(5, ""),
    ];
    let (core, url) = RelayCore::start(peers).await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, base) = agent_with_http(&url, dir.path()).await;
    agent.applied(1).await;

    let now = SystemTime::now();
    // Peer 5 had a session here 30 s ago: still valid, so it is re-created before its kick.
    agent.backend.modify(|o| {
        let p = o.device.peers.get_mut(&key(5)).unwrap();
        p.last_handshake = Some(now - Duration::from_secs(30));
        std::sync::Arc::make_mut(&mut p.config).endpoint = Some(ep("198.51.100.5:5555"));
        p.rx_bytes = 1000;
    });
    core.relay(&[
        (1, now, "198.51.100.1:1111"),
        // Active 10 minutes ago: outside the 5-minute window.
        (2, now - Duration::from_secs(600), "198.51.100.2:2222"),
        // Active, but nobody knows where: skipped and counted.
        (3, now, ""),
        // The Core's configured endpoint wins over the relayed one.
        (4, now, "198.51.100.4:9999"),
    ])
    .await;
    eventually("relayed endpoints and peer 5's first epoch", || async {
        agent.status().ha.relayed_endpoints >= 4 && !core.epochs_reported(key(5)).is_empty()
    })
    .await;
    let epoch_before = core.epochs_reported(key(5));
    assert!(agent.backend.kicks().is_empty());
    assert_eq!(agent.status().ha.role, Role::Standby);

    let answer = post(&base, Command::Activate).await;
    assert_eq!(
        answer,
        Answer {
            role: Role::Active,
            draining: false
        }
    );
    eventually("three kicks", || async { agent.backend.kicks().len() >= 3 }).await;
    let want = BTreeMap::from([
        (key(1), (ep("198.51.100.1:1111"), false)),
        (key(4), (ep("198.51.100.44:4444"), false)),
        (key(5), (ep("198.51.100.5:5555"), true)),
    ]);
    assert_eq!(kicked(&agent.backend.kicks()), want);
    let t = agent.status().ha.last_takeover.expect("a takeover round");
    assert_eq!(
        (t.planned, t.kicked, t.recreated, t.skipped_no_endpoint),
        (3, 3, 1, 1)
    );
    // The re-created peer restarted its counters and got a new epoch, reported to the Core.
    let p5 = agent.backend.state().device.peers[&key(5)].clone();
    assert_eq!((p5.rx_bytes, p5.last_handshake), (0, None));
    eventually("peer 5 reported with a new counter epoch", || async {
        core.epochs_reported(key(5)).len() > epoch_before.len()
    })
    .await;
    let epochs = core.epochs_reported(key(5));
    let new = *epochs.last().unwrap();
    assert!(new != 0 && !epoch_before.contains(&new), "{epochs:?}");

    // Already active: no transition, no second round.
    post(&base, Command::Activate).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(agent.backend.kicks().len(), 3);
    assert_eq!(agent.status().ha.takeovers, 1);
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let labels = r#"{location="ha",gateway="test-gateway"}"#;
    assert!(
        metrics.contains(&format!("gatehouse_ha_kicks_total{labels} 3")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("gatehouse_ha_active{labels} 1")),
        "{metrics}"
    );

    let answer = post(&base, Command::Deactivate).await;
    assert_eq!(answer.role, Role::Standby);
    // Every peer stays, whatever the role.
    assert_eq!(agent.backend.state().device.peers.len(), 6);
    agent.stop().await.unwrap();
}

/// A kick that fails is counted and shown; the loop goes on and removals still apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_kick_is_shown_and_never_stops_the_loop() {
    let (core, url) = RelayCore::start(vec![proto_peer(0, ""), proto_peer(1, "")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, base) = agent_with_http(&url, dir.path()).await;
    agent.applied(1).await;
    core.relay(&[(0, SystemTime::now(), "198.51.100.1:1111")])
        .await;
    eventually("relayed endpoint", || async {
        agent.status().ha.relayed_endpoints == 1
    })
    .await;
    agent.backend.fail_kicks("device gone");
    post(&base, Command::Activate).await;
    eventually("the failure shown", || async {
        agent.status().ha.failures == 1
    })
    .await;
    let s = agent.status();
    assert!(
        s.ha.last_error
            .as_deref()
            .unwrap_or("")
            .contains("device gone"),
        "{:?}",
        s.ha
    );
    assert!(agent.backend.kicks().is_empty());
    // The loop still serves commands and readiness.
    assert!(post(&base, Command::Drain).await.draining);
    assert_eq!(readyz(&base).await.0, 503);
    agent.stop().await.unwrap();
}

/// Drain: `/readyz` 503 with "draining", every peer kept; kept across a restart (also
/// without the Core) until `undrain`. Driven through the `gatehouse drain|undrain` client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_makes_readyz_503_and_survives_a_restart() {
    let mut core = Core::start().await;
    let (loc, token) = core.location(plain_location("drain"), 3).await;
    let dir = tempfile::tempdir().unwrap();
    let s = settings_with_http(&core.url(), &token, dir.path());
    let (agent, base) = start(s.clone()).await;
    agent.applied(core.revision(loc).await).await;
    eventually("ready", || async { readyz(&base).await.0 == 200 }).await;

    assert_eq!(gatehouse::app::ha_command(&base, Command::Drain).await, 0);
    let (code, body) = readyz(&base).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    assert_eq!(agent.backend.state().device.peers.len(), 3);
    assert!(agent.status().ha.draining);
    agent.stop().await.unwrap();

    // Restarted while the Core is away too: still draining.
    core.stop().await;
    let (agent, _) = start(s).await;
    eventually("restored and applied", || async {
        agent.status().applied_revision > 0
    })
    .await;
    let (code, body) = readyz(&base).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    assert_eq!(agent.backend.state().device.peers.len(), 3);

    assert_eq!(gatehouse::app::ha_command(&base, Command::Undrain).await, 0);
    let (code, body) = readyz(&base).await;
    assert_eq!(code, 200, "{body}");
    agent.stop().await.unwrap();
    // Unreachable agent: nonzero.
    assert_ne!(gatehouse::app::ha_command(&base, Command::Drain).await, 0);
}

/// A Core outage, even past the offline allowance, is a reason in `/readyz`'s body and
/// never a 503: one Core must not take every gateway out of the load balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_outage_keeps_readyz_200() {
    let mut core = Core::start().await;
    let (loc, token) = core.location(plain_location("outage"), 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings_with_http(&core.url(), &token, dir.path());
    s.offline_remove_after = Some(Duration::from_secs(1));
    let (agent, base) = start(s).await;
    agent.applied(core.revision(loc).await).await;
    eventually("ready with the Core", || async {
        readyz(&base).await.0 == 200
    })
    .await;

    core.stop().await;
    eventually("the outage is past the allowance", || async {
        readyz(&base)
            .await
            .1
            .contains("beyond the offline allowance")
    })
    .await;
    let (code, body) = readyz(&base).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("Core unreachable"), "{body}");
    agent.stop().await.unwrap();
}

/// Relayed endpoints are in the state file: a gateway restarted without the Core still
/// knows where its clients are, and takes over towards them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_endpoints_survive_a_restart() {
    let (core, url) = RelayCore::start(vec![proto_peer(0, ""), proto_peer(1, "")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = agent_with_http(&url, dir.path()).await;
    agent.applied(1).await;
    core.relay(&[(1, SystemTime::now(), "[2001:db8::1]:3333")])
        .await;
    eventually("relayed endpoint", || async {
        agent.status().ha.relayed_endpoints == 1
    })
    .await;
    agent.stop().await.unwrap();

    // No Core this time (nothing listens on port 1).
    let (agent, base) = agent_with_http("http://127.0.0.1:1", dir.path()).await;
    eventually("restored", || async {
        agent.status().applied_revision == 1
    })
    .await;
    assert_eq!(agent.status().ha.relayed_endpoints, 1);
    post(&base, Command::Activate).await;
    eventually("one kick", || async { !agent.backend.kicks().is_empty() }).await;
    assert_eq!(
        kicked(&agent.backend.kicks()),
        BTreeMap::from([(key(1), (ep("[2001:db8::1]:3333"), false))])
    );
    agent.stop().await.unwrap();
}

/// The role is kept across restarts: an agent restarted while active is still active and
/// sends no new round (a restart re-creates no peer: no churn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_gateway_restarted_stays_active_without_a_new_round() {
    let (core, url) = RelayCore::start(vec![proto_peer(0, ""), proto_peer(1, "")]).await;
    let dir = tempfile::tempdir().unwrap();
    let s = settings_with_http(&url, "token", dir.path());
    let (agent, base) = start(s.clone()).await;
    agent.applied(1).await;
    let now = SystemTime::now();
    agent.backend.modify(|o| {
        let p = o.device.peers.get_mut(&key(0)).unwrap();
        p.last_handshake = Some(now - Duration::from_secs(5));
        std::sync::Arc::make_mut(&mut p.config).endpoint = Some(ep("198.51.100.9:9999"));
    });
    core.relay(&[(1, now, "198.51.100.1:1111")]).await;
    eventually("relayed endpoint", || async {
        agent.status().ha.relayed_endpoints == 2
    })
    .await;
    post(&base, Command::Activate).await;
    eventually("two kicks", || async { agent.backend.kicks().len() == 2 }).await;
    let backend = agent.backend.clone();
    agent.stop().await.unwrap();
    // The kicked peer had a handshake again before the restart.
    backend.modify(|o| {
        o.device.peers.get_mut(&key(0)).unwrap().last_handshake = Some(SystemTime::now());
    });
    backend.clear_log();

    let (agent, _) = start_on(s, backend).await;
    eventually("restored", || async {
        agent.status().applied_revision == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = agent.status();
    assert_eq!(st.ha.role, Role::Active);
    assert!(st.ha.active_since_unix_ms.is_some());
    assert_eq!(st.ha.takeovers, 0);
    assert_eq!(agent.backend.kicks().len(), 2, "no new round");
    assert!(
        agent.backend.applied_ops().is_empty(),
        "{:?}",
        agent.backend.applied_ops()
    );
    agent.stop().await.unwrap();
}

/// A peer re-created on takeover keeps its MFA timer: the re-creation is no sign of life
/// (nor a restart of the timer), and the inactivity event still names its last real
/// handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_created_peer_keeps_its_mfa_timer() {
    let mut peer = proto_peer(0, "");
    peer.mfa_session = 7;
    let mfa = v1::MfaSettings {
        enabled: true,
        disconnect_threshold_secs: 2,
    };
    let (core, url) = RelayCore::start_with(vec![peer], Some(mfa)).await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, base) = agent_with_http(&url, dir.path()).await;
    agent.applied(1).await;
    let handshake = SystemTime::now();
    agent.backend.modify(|o| {
        let p = o.device.peers.get_mut(&key(0)).unwrap();
        p.last_handshake = Some(handshake);
        std::sync::Arc::make_mut(&mut p.config).endpoint = Some(ep("198.51.100.9:9999"));
        p.rx_bytes = 100;
    });
    eventually("the handshake seen", || async {
        agent.status().ha.relayed_endpoints == 1
    })
    .await;
    post(&base, Command::Activate).await;
    eventually("re-created", || async {
        agent.backend.kicks().first().is_some_and(|k| k.recreate)
    })
    .await;
    eventually("removed for MFA inactivity", || async {
        !agent.backend.state().device.peers.contains_key(&key(0))
    })
    .await;
    let event = || {
        core.received
            .lock()
            .unwrap()
            .iter()
            .find_map(|m| match &m.kind {
                Some(gateway_message::Kind::PeerEvent(e)) => Some(e.clone()),
                _ => None,
            })
    };
    eventually("the inactivity event at the Core", || async {
        event().is_some()
    })
    .await;
    let event = event().unwrap();
    assert_eq!(event.last_handshake_ms, unix_ms(handshake), "{event:?}");
    agent.stop().await.unwrap();
}

/// The floating addresses present drive the role through the event loop: one round when
/// one appears, none for a second one, standby when they go; `deactivate` holds until the
/// address next appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floating_address_reports_drive_the_role() {
    use std::collections::BTreeSet;
    use std::net::IpAddr;
    let (core, url) = RelayCore::start(vec![proto_peer(0, ""), proto_peer(1, "")]).await;
    let dir = tempfile::tempdir().unwrap();
    // No `[ha] vip` configured: no rtnetlink watcher and no source routes on this host;
    // the test reports the addresses itself.
    let s = settings_with_http(&url, "token", dir.path());
    let base = format!("http://{}", s.http_listen.unwrap());
    let backend = MemoryBackend::new("wgtest0");
    let (status_tx, status) = tokio::sync::watch::channel(Default::default());
    let (vips, vip_reports) = mpsc::channel::<BTreeSet<IpAddr>>(4);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(gatehouse::agent::run_with_vip_reports(
        s,
        Box::new(backend.clone()),
        async move {
            let _ = stopped.await;
        },
        status_tx,
        Some(vip_reports),
    ));
    let ha = || status.borrow().ha.clone();
    eventually("applied", || async {
        status.borrow().applied_revision == 1
    })
    .await;
    core.relay(&[(1, SystemTime::now(), "198.51.100.1:1111")])
        .await;
    eventually("relayed", || async { ha().relayed_endpoints == 1 }).await;
    let set =
        |list: &[&str]| -> BTreeSet<IpAddr> { list.iter().map(|a| a.parse().unwrap()).collect() };

    vips.send(set(&["192.0.2.10"])).await.unwrap();
    eventually("active", || async { ha().role == Role::Active }).await;
    eventually("one kick", || async { backend.kicks().len() == 1 }).await;
    assert_eq!(backend.kicks()[0].endpoint, ep("198.51.100.1:1111"));
    vips.send(set(&["192.0.2.10", "2001:db8::10"]))
        .await
        .unwrap();
    eventually("both present", || async { ha().vips_present.len() == 2 }).await;
    assert_eq!((ha().takeovers, backend.kicks().len()), (1, 1));

    // Deactivated while the address is here: standby until it comes back.
    assert_eq!(post(&base, Command::Deactivate).await.role, Role::Standby);
    vips.send(set(&[])).await.unwrap();
    eventually("gone", || async { ha().vips_present.is_empty() }).await;
    assert_eq!(ha().role, Role::Standby);
    assert_eq!(ha().active_since_unix_ms, None);
    vips.send(set(&["192.0.2.10"])).await.unwrap();
    eventually("active again", || async { ha().role == Role::Active }).await;
    eventually("a second round", || async { backend.kicks().len() == 2 }).await;
    assert_eq!(ha().takeovers, 2);
    vips.send(set(&[])).await.unwrap();
    eventually("standby", || async { ha().role == Role::Standby }).await;

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
