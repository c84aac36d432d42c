//! The event loop is fair: no input source starves its timers (MFA expiry, stats, resync
//! with the offline policy). In process, without root: the reference Core on loopback and
//! an agent on the in-memory backend. Not benchmarks: the bounds are generous, the point
//! is that the timers keep firing (missed deadlines are counted by the agent itself).

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse::agent::timers::TimerStats;
use gatehouse::backend::memory::MemoryBackend;
use gatehouse::backend::Backend as _;
use gatehouse::http::DiffReport;
use gatehouse_proto::v1::gateway_service_server::{GatewayService, GatewayServiceServer};
use gatehouse_proto::v1::{self, change::Kind, core_message};
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const STATS_INTERVAL: Duration = Duration::from_millis(200);
const RESYNC_INTERVAL: Duration = Duration::from_millis(500);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn fast_settings(core: &Core, token: &str, dir: &std::path::Path) -> gatehouse::agent::Settings {
    let mut s = settings(&core.url(), token, dir);
    s.stats_interval = STATS_INTERVAL;
    s.resync_interval = RESYNC_INTERVAL;
    s
}

fn timers(agent: &Agent) -> TimerStats {
    agent.status().timers
}

/// 50 clients asking `/diff` and `/status` as fast as they can for 10 s: the timers keep
/// their deadlines, and `/diff` reads the interface at most once a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_fire_under_a_flood_of_status_and_diff_requests() {
    let core = Core::start().await;
    let (loc, token) = core.location(plain_location("flood"), 1000).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut s = fast_settings(&core, &token, dir.path());
    s.http_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let agent = Agent::start_with(s, MemoryBackend::new("wgtest0")).await;
    agent.applied(core.revision(loc).await).await;

    let before = timers(&agent);
    let flood = Duration::from_secs(10);
    let reads = Arc::new(Mutex::new(BTreeSet::new()));
    let mut clients = Vec::new();
    for n in 0..50 {
        let reads = reads.clone();
        let base = format!("http://127.0.0.1:{port}");
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let end = tokio::time::Instant::now() + flood;
            let mut answered = 0u64;
            while tokio::time::Instant::now() < end {
                let path = if n % 2 == 0 { "diff" } else { "status" };
                let r = http.get(format!("{base}/{path}")).send().await.unwrap();
                assert!(r.status().is_success(), "{path}: {}", r.status());
                if path == "diff" {
                    let d: DiffReport = r.json().await.unwrap();
                    assert!(d.error.is_none(), "{:?}", d.error);
                    reads
                        .lock()
                        .unwrap()
                        .insert(d.read_unix_ms.expect("read time"));
                } else {
                    r.bytes().await.unwrap();
                }
                answered += 1;
            }
            answered
        }));
    }
    let mut answered = 0;
    for c in clients {
        answered += c.await.unwrap();
    }
    let after = timers(&agent);
    let reads = reads.lock().unwrap().len();
    eprintln!(
        "{answered} requests answered; {reads} distinct diff reads; timers {before:?} -> {after:?}"
    );
    assert!(answered > 100, "the flood did not happen: {answered}");
    assert!(reads <= 12, "{reads} fresh reads in 10 s for /diff");
    let missed = after.missed_deadlines - before.missed_deadlines;
    assert!(missed <= 1, "{missed} deadlines missed under the flood");
    // 50 stats ticks and 20 resyncs were due; half is plenty to show they fire.
    assert!(
        after.stats_ticks - before.stats_ticks >= 25,
        "stats ticks: {before:?} -> {after:?}"
    );
    assert!(
        after.resyncs - before.resyncs >= 10,
        "resyncs: {before:?} -> {after:?}"
    );
    agent.stop().await.unwrap();
}

/// The stream to the connected gateway.
type Outbound = mpsc::Sender<Result<v1::CoreMessage, tonic::Status>>;

/// A Core that answers Hello with a snapshot and then sends what the test pushes, at once,
/// ignoring what the gateway sends (the reference Core paces its sends with its own
/// database writes, so it cannot make a burst).
#[derive(Clone, Default)]
struct BurstCore {
    location: v1::Location,
    out: Arc<Mutex<Option<Outbound>>>,
}

#[tonic::async_trait]
impl GatewayService for BurstCore {
    type ConnectStream = ReceiverStream<Result<v1::CoreMessage, tonic::Status>>;

    async fn connect(
        &self,
        request: tonic::Request<tonic::Streaming<v1::GatewayMessage>>,
    ) -> Result<tonic::Response<Self::ConnectStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        let (tx, rx) = mpsc::channel(4096);
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

impl BurstCore {
    async fn start(peers: usize) -> (BurstCore, String) {
        let core = BurstCore {
            location: v1::Location {
                id: 1,
                name: "burst".into(),
                interface: Some(v1::Interface {
                    private_key: vec![7; 32],
                    listen_port: 51820,
                    addresses: vec!["10.0.0.1/16".into()],
                    mtu: 1420,
                    fwmark: 0,
                }),
                peers: (0..peers).map(proto_peer).collect(),
                firewall: None,
                mfa: None,
            },
            out: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let service = GatewayServiceServer::new(core.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (core, url)
    }

    async fn send_all(&self, messages: Vec<v1::CoreMessage>) {
        let tx = self
            .out
            .lock()
            .unwrap()
            .clone()
            .expect("a gateway connected");
        for m in messages {
            tx.send(Ok(m)).await.unwrap();
        }
    }
}

fn proto_peer(n: usize) -> v1::Peer {
    v1::Peer {
        public_key: key(n).0.to_vec(),
        allowed_ips: vec![format!("10.{}.{}.2/32", 1 + n / 250, n % 250)],
        ..Default::default()
    }
}

/// 1,000 deltas at once: the newest state is applied in a few applies (not 1,000
/// reconciles), and the timers keep their deadlines meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_fire_under_a_burst_of_a_thousand_deltas() {
    let (core, url) = BurstCore::start(1000).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&url, "token", dir.path());
    s.stats_interval = STATS_INTERVAL;
    s.resync_interval = RESYNC_INTERVAL;
    let agent = Agent::start_with(s, MemoryBackend::new("wgtest0")).await;
    agent.applied(1).await;
    // Let the start-up settle, so the counts below are the burst's.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let before = timers(&agent);
    let writes_before = agent.backend.counters().device_writes;
    let started = tokio::time::Instant::now();
    let deltas = (0..1000u64)
        .map(|i| v1::CoreMessage {
            kind: Some(core_message::Kind::Delta(v1::Delta {
                revision: 2 + i,
                base_revision: 1 + i,
                changes: vec![v1::Change {
                    kind: Some(Kind::UpsertPeer(proto_peer(1000 + i as usize))),
                }],
            })),
        })
        .collect();
    core.send_all(deltas).await;
    agent.applied(1001).await;
    let took = started.elapsed();
    // Two more resync periods, so a starved timer shows up as late.
    tokio::time::sleep(RESYNC_INTERVAL * 2).await;
    let after = timers(&agent);
    let writes = agent.backend.counters().device_writes - writes_before;
    eprintln!(
        "1000 deltas applied in {took:?} with {writes} device writes; timers {before:?} -> {after:?}"
    );
    assert_eq!(agent.backend.state().device.peers.len(), 2000);
    assert!(
        writes <= 50,
        "{writes} applies for 1000 deltas: not coalesced"
    );
    let missed = after.missed_deadlines - before.missed_deadlines;
    assert!(missed <= 1, "{missed} deadlines missed during the burst");
    assert!(after.stats_ticks > before.stats_ticks);
    assert!(after.resyncs > before.resyncs);
    agent.stop().await.unwrap();
}
