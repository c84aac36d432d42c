//! Shared helpers: an in-process Core on loopback with a temporary database, the typed
//! admin client, and a raw tonic gateway stream.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use gatehouse_core::api::{NewLocation, NewPeer};
use gatehouse_core::client::AdminClient;
use gatehouse_core::{CoreConfig, RunningCore};
use gatehouse_proto::v1 as pb;
use gatehouse_proto::v1::gateway_service_client::GatewayServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::{Request, Status, Streaming};

pub const ADMIN: &str = "admin-token-for-tests";

/// Guards against a hung test only; never a speed assertion.
const HANG: Duration = Duration::from_secs(20);

pub struct TestCore {
    pub core: RunningCore,
    pub admin: AdminClient,
    pub dir: tempfile::TempDir,
}

impl TestCore {
    pub async fn start() -> TestCore {
        let dir = tempfile::tempdir().expect("tempdir");
        let core = start_on(&dir.path().join("core.db")).await;
        let admin = AdminClient::new(core.http_url(), ADMIN);
        TestCore { core, admin, dir }
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("core.db")
    }

    /// Stops the Core and starts a new one on the same database.
    pub async fn restart(self) -> TestCore {
        let TestCore { core, dir, .. } = self;
        core.stop().await;
        let core = start_on(&dir.path().join("core.db")).await;
        let admin = AdminClient::new(core.http_url(), ADMIN);
        TestCore { core, admin, dir }
    }

    pub fn grpc(&self) -> SocketAddr {
        self.core.grpc_addr()
    }

    /// A location (MFA or not) and a gateway token for it.
    pub async fn location(&self, mfa: bool) -> (u64, String) {
        let loc = self
            .admin
            .create_location(&NewLocation {
                name: "office".into(),
                listen_port: 51820,
                addresses: vec!["10.8.0.1/24".into(), "fd08::1/64".into()],
                mtu: 1420,
                mfa,
                disconnect_threshold_secs: if mfa { 600 } else { 0 },
                ..Default::default()
            })
            .await
            .expect("create location");
        let token = self.admin.create_token(loc.id).await.expect("token");
        (loc.id, token)
    }

    pub async fn revision(&self, location: u64) -> u64 {
        self.admin
            .location(location)
            .await
            .expect("location")
            .revision
    }
}

pub async fn start_on(db: &Path) -> RunningCore {
    gatehouse_core::start(CoreConfig {
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        database: db.to_owned(),
        admin_token: ADMIN.into(),
        tls: None,
    })
    .await
    .expect("start core")
}

/// A fresh random 32-byte key in base64.
pub fn key() -> String {
    B64.encode(rand::random::<[u8; 32]>())
}

pub fn raw(b64: &str) -> Vec<u8> {
    B64.decode(b64).expect("base64")
}

/// A peer with one /32 in 10.8.(n/250).(n%250+2).
pub fn peer(n: u32) -> NewPeer {
    NewPeer {
        public_key: key(),
        allowed_ips: vec![format!("10.9.{}.{}/32", n / 250, n % 250 + 2)],
        ..Default::default()
    }
}

/// A raw gateway stream.
pub struct Gw {
    pub tx: mpsc::Sender<pb::GatewayMessage>,
    pub rx: Streaming<pb::CoreMessage>,
    /// Peer-activity relays `next` skipped.
    pub relayed: Vec<pb::PeerActivity>,
}

impl Gw {
    /// Opens the stream (sends nothing yet).
    pub async fn open(addr: SocketAddr, token: Option<&str>) -> Result<Gw, Status> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut client = GatewayServiceClient::new(channel)
            .max_decoding_message_size(gatehouse_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(gatehouse_proto::MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(64);
        let mut req = Request::new(ReceiverStream::new(rx));
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let rx = client.connect(req).await?.into_inner();
        Ok(Gw {
            tx,
            rx,
            relayed: Vec::new(),
        })
    }

    /// Opens a stream, sends Hello and returns the EventAck and the Snapshot.
    pub async fn hello(
        addr: SocketAddr,
        token: &str,
        gateway_id: &str,
        pending: Vec<pb::PeerEvent>,
    ) -> (Gw, pb::EventAck, pb::Snapshot) {
        let mut gw = Gw::open(addr, Some(token)).await.expect("open stream");
        gw.send(pb::gateway_message::Kind::Hello(pb::Hello {
            gateway_id: gateway_id.into(),
            name: format!("host-{gateway_id}"),
            version: "0.1.0".into(),
            applied_revision: 0,
            pending_events: pending,
        }))
        .await;
        let ack = gw.ack().await;
        let snap = gw.snapshot().await;
        (gw, ack, snap)
    }

    pub async fn send(&self, kind: pb::gateway_message::Kind) {
        self.tx
            .send(pb::GatewayMessage { kind: Some(kind) })
            .await
            .expect("stream open");
    }

    /// The next message other than a peer-activity relay, or the status that ended the
    /// stream. Relays are kept for [`Gw::activity`].
    pub async fn next(&mut self) -> Result<pb::core_message::Kind, Status> {
        loop {
            match self.next_any().await? {
                pb::core_message::Kind::PeerActivity(a) => self.relayed.push(a),
                other => return Ok(other),
            }
        }
    }

    /// The next message of any kind.
    pub async fn next_any(&mut self) -> Result<pb::core_message::Kind, Status> {
        match tokio::time::timeout(HANG, self.rx.message()).await {
            Err(_) => panic!("no message from the Core (hung)"),
            Ok(Err(status)) => Err(status),
            Ok(Ok(None)) => Err(Status::cancelled("stream ended")),
            Ok(Ok(Some(m))) => Ok(m.kind.expect("message kind")),
        }
    }

    /// The next peer-activity relay (one skipped by `next` first).
    pub async fn activity(&mut self) -> pb::PeerActivity {
        if !self.relayed.is_empty() {
            return self.relayed.remove(0);
        }
        match self.next_any().await {
            Ok(pb::core_message::Kind::PeerActivity(a)) => a,
            Ok(other) => panic!("expected peer activity, got {other:?}"),
            Err(status) => panic!("expected peer activity, stream ended: {status}"),
        }
    }

    pub async fn delta(&mut self) -> pb::Delta {
        match self.next().await {
            Ok(pb::core_message::Kind::Delta(d)) => d,
            other => panic!("expected a delta, got {other:?}"),
        }
    }

    pub async fn snapshot(&mut self) -> pb::Snapshot {
        match self.next().await {
            Ok(pb::core_message::Kind::Snapshot(s)) => s,
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }

    pub async fn ack(&mut self) -> pb::EventAck {
        match self.next().await {
            Ok(pb::core_message::Kind::EventAck(a)) => a,
            other => panic!("expected an event ack, got {other:?}"),
        }
    }
}

pub fn mfa_event(seq: u64, public_key: &str, session: u64) -> pb::PeerEvent {
    pb::PeerEvent {
        seq,
        public_key: raw(public_key),
        reason: pb::PeerEventReason::MfaInactive as i32,
        last_handshake_ms: 1_700_000_000_000,
        at_ms: 1_700_000_600_000,
        mfa_session: session,
        peer_id: 0,
        detail: "inactive for 612s > threshold 600s".into(),
    }
}

/// Public keys (base64) of a snapshot's peers, sorted.
pub fn snapshot_keys(s: &pb::Snapshot) -> Vec<String> {
    let mut keys: Vec<String> = s
        .location
        .as_ref()
        .expect("location")
        .peers
        .iter()
        .map(|p| B64.encode(&p.public_key))
        .collect();
    keys.sort();
    keys
}

/// Polls `f` until it holds (bounded; the Core notices a closed stream asynchronously).
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}
