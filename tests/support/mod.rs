//! Shared support for in-process integration tests: a reference Core on loopback with its
//! admin client, and an agent on the in-memory backend, both started and stopped inside
//! the test. Use with `#[path = "support/mod.rs"] mod support;`.

#![allow(dead_code)]

pub mod scale;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gatehouse::agent::client::CoreSettings;
use gatehouse::agent::status::Status;
use gatehouse::agent::{self, Settings};
use gatehouse::backend::memory::MemoryBackend;
use gatehouse::config::{HooksConfig, Secret, TokenSource};
use gatehouse::hooks::Hooks;
use gatehouse::model::{Key, SecretKey};
use gatehouse_core::api::{NewLocation, NewPeer};
use gatehouse_core::client::AdminClient;
use gatehouse_core::{CoreConfig, RunningCore};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub const ADMIN_TOKEN: &str = "test-admin-token";
/// How long a test waits for the system to converge before failing.
pub const CONVERGE: Duration = Duration::from_secs(20);

/// A reference Core with its database in a temporary directory.
pub struct Core {
    pub running: Option<RunningCore>,
    pub admin: AdminClient,
    pub dir: tempfile::TempDir,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Core {
    pub async fn start() -> Core {
        let dir = tempfile::tempdir().expect("tempdir");
        let running = start_core(
            dir.path(),
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await;
        let (grpc, http) = (running.grpc_addr(), running.http_addr());
        Core {
            admin: AdminClient::new(running.http_url(), ADMIN_TOKEN),
            running: Some(running),
            dir,
            grpc,
            http,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn core(&self) -> &RunningCore {
        self.running.as_ref().expect("Core running")
    }

    pub async fn stop(&mut self) {
        if let Some(core) = self.running.take() {
            core.stop().await;
        }
    }

    /// Starts again on the same database and the same ports.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    pub async fn start_again(&mut self) {
        let mut tries = 0;
        loop {
            match gatehouse_core::start(core_config(self.dir.path(), self.grpc, self.http)).await {
                Ok(core) => {
                    self.running = Some(core);
                    return;
                }
                // The old listener may linger a moment.
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("Core restart: {e:#}"),
            }
        }
    }

    /// A location with `peers` peers (10.{i/250}.{i%250}.2/32 each) and a gateway token.
    pub async fn location(&self, new: NewLocation, peers: usize) -> (u64, String) {
        let loc = self
            .admin
            .create_location(&new)
            .await
            .expect("create location");
        if peers > 0 {
            self.admin
                .add_peers(loc.id, &peer_list(0, peers))
                .await
                .expect("add peers");
        }
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

fn core_config(dir: &Path, grpc: SocketAddr, http: SocketAddr) -> CoreConfig {
    CoreConfig {
        grpc_listen: grpc,
        http_listen: http,
        database: dir.join("core.db"),
        admin_token: ADMIN_TOKEN.into(),
        tls: None,
    }
}

async fn start_core(dir: &Path, grpc: SocketAddr, http: SocketAddr) -> RunningCore {
    gatehouse_core::start(core_config(dir, grpc, http))
        .await
        .expect("start Core")
}

/// A plain location: 10.0.0.1/16, port 51820.
pub fn plain_location(name: &str) -> NewLocation {
    NewLocation {
        name: name.into(),
        listen_port: 51820,
        addresses: vec!["10.0.0.1/16".into(), "fd00::1/64".into()],
        mtu: 1420,
        ..Default::default()
    }
}

/// A public key derived from a number (distinct for distinct numbers).
pub fn key(n: usize) -> Key {
    let mut bytes = [0u8; 32];
    bytes[1..9].copy_from_slice(&(n as u64 + 1).to_le_bytes());
    SecretKey::new(bytes).public_key()
}

pub fn peer(n: usize) -> NewPeer {
    NewPeer {
        public_key: key(n).to_base64(),
        allowed_ips: vec![format!("10.{}.{}.2/32", 1 + n / 250, n % 250)],
        ..Default::default()
    }
}

pub fn peer_list(from: usize, count: usize) -> Vec<NewPeer> {
    (from..from + count).map(peer).collect()
}

/// Peer `i` of a large location (100,000 and more) as the admin API takes it: the key
/// [`scale::key`] (no Curve25519 work) and one /32 in 10.100.0.0/14, outside
/// [`plain_location`]'s subnet.
pub fn bulk_peer(i: usize) -> NewPeer {
    let i = u32::try_from(i).expect("fewer than 2^32 peers");
    NewPeer {
        public_key: Key(scale::key(i)).to_base64(),
        allowed_ips: vec![scale::outside_ipv4(i)],
        ..Default::default()
    }
}

/// An agent on the in-memory backend, in this process.
pub struct Agent {
    pub backend: MemoryBackend,
    pub status: watch::Receiver<Status>,
    pub state_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

pub fn settings(url: &str, token: &str, state_dir: &Path) -> Settings {
    Settings {
        name: "test-gateway".into(),
        interface: "wgtest0".into(),
        backend_name: "memory".into(),
        state_dir: state_dir.to_path_buf(),
        core: CoreSettings {
            url: url.into(),
            token: TokenSource::Inline(Secret::new(token.into())),
            ca_pem: None,
            client_identity: None,
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(2),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        },
        stats_interval: Duration::from_millis(500),
        resync_interval: Duration::from_secs(1),
        offline_remove_after: None,
        remove_on_shutdown: false,
        gateway_id: None,
        http_listen: None,
        peer_metrics_limit: gatehouse::config::DEFAULT_PEER_METRICS_LIMIT,
        hooks: Hooks::new(HooksConfig::default(), "wgtest0"),
        firewall: Default::default(),
        ha: Default::default(),
    }
}

impl Agent {
    pub async fn start(url: &str, token: &str, state_dir: &Path) -> Agent {
        Self::start_with(
            settings(url, token, state_dir),
            MemoryBackend::new("wgtest0"),
        )
        .await
    }

    pub async fn start_with(settings: Settings, backend: MemoryBackend) -> Agent {
        let (status_tx, status) = watch::channel(Status::default());
        let (stop, stop_rx) = oneshot::channel::<()>();
        let state_dir = settings.state_dir.clone();
        let task = tokio::spawn(agent::run_with_status(
            settings,
            Box::new(backend.clone()),
            async move {
                let _ = stop_rx.await;
            },
            status_tx,
        ));
        Agent {
            backend,
            status,
            state_dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Waits until the agent has applied `revision` (and the kernel matches it).
    pub async fn applied(&self, revision: u64) {
        eventually(&format!("agent applied revision {revision}"), || async {
            self.status().applied_revision >= revision
        })
        .await;
    }

    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("agent task panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// How long to wait for convergence: [`CONVERGE`], or `GATEHOUSE_TEST_CONVERGE_SECS`
/// (the emulated VM is ~20 times slower than the host).
pub fn converge_limit() -> Duration {
    std::env::var("GATEHOUSE_TEST_CONVERGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(CONVERGE, Duration::from_secs)
}

/// Polls `check` until it is true, failing the test after [`converge_limit`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + converge_limit();
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
