//! The reference Core of gatehouse: a SQLite store of locations, peers, MFA sessions,
//! gateways, stats and events; the `gatehouse.v1` `GatewayService` over gRPC; and the admin
//! HTTP JSON API. [`start`] binds both listeners and serves them in tasks, so tests run a
//! Core in-process; `main.rs` only reads the configuration and calls it.

pub mod api;
pub mod audit;
pub mod client;
pub mod config;
mod dbfile;
mod error;
mod grpc;
mod http;
mod hub;
mod input;
mod page;
mod peer_index;
mod relay;
mod shared;
mod stats;
mod store;
mod throttle;
mod tokens;
mod validate;
mod whereabouts;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use gatehouse_proto::v1::gateway_service_server::GatewayServiceServer;
use gatehouse_proto::v1::CoreMessage;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

pub use error::CoreError;
/// The proto form of a location's stored firewall policy (what gateways receive).
pub use store::firewall_pb;

/// Everything [`start`] needs.
#[derive(Clone)]
pub struct CoreConfig {
    /// gRPC listener for gateways (port 0: any free port).
    pub grpc_listen: SocketAddr,
    /// Admin HTTP listener (port 0: any free port).
    pub http_listen: SocketAddr,
    /// The SQLite file (created when missing).
    pub database: PathBuf,
    /// Bearer token of the admin API (never logged nor shown by Debug).
    pub admin_token: String,
    /// TLS for the gRPC listener; `None`: plain HTTP/2 (loopback and tests).
    pub tls: Option<TlsConfig>,
}

impl fmt::Debug for CoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreConfig")
            .field("grpc_listen", &self.grpc_listen)
            .field("http_listen", &self.http_listen)
            .field("database", &self.database)
            .field("admin_token", &"<redacted>")
            .field("tls", &self.tls)
            .finish()
    }
}

/// TLS material of the gRPC listener, PEM encoded.
#[derive(Clone)]
pub struct TlsConfig {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// When set, gateways must present a client certificate signed by this CA (mTLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .field("mtls", &self.client_ca_pem.is_some())
            .finish()
    }
}

impl TlsConfig {
    /// Reads the certificate chain, key and optional client CA from PEM files.
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<Self> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        Ok(TlsConfig {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: client_ca.map(read).transpose()?,
        })
    }

    fn server_config(&self) -> ServerTlsConfig {
        let mut tls =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        if let Some(ca) = &self.client_ca_pem {
            tls = tls.client_ca_root(Certificate::from_pem(ca));
        }
        tls
    }
}

/// A Core serving in background tasks.
pub struct RunningCore {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    shared: Arc<shared::Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

/// HTTP/2 keepalive of the gRPC server: a ping every 10 s, dead after 10 s without answer.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// How long [`RunningCore::stop`] waits for each server to finish.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Opens the database, binds both listeners and serves them in tasks.
pub async fn start(config: CoreConfig) -> anyhow::Result<RunningCore> {
    let store = store::Store::open(&config.database)
        .with_context(|| format!("opening database {}", config.database.display()))?;
    let shared = Arc::new(shared::Shared::new(store));
    let (shutdown, shutdown_rx) = watch::channel(false);

    let grpc_listener = TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("binding gRPC listener {}", config.grpc_listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("binding HTTP listener {}", config.http_listen))?;
    let http_addr = http_listener.local_addr()?;

    let service = GatewayServiceServer::new(grpc::GatewaySvc::new(
        Arc::clone(&shared),
        shutdown_rx.clone(),
    ))
    // Gateways' messages are small (ordering rule 7): a larger one is refused before it is
    // buffered. Snapshots towards gateways may be large.
    .max_decoding_message_size(gatehouse_proto::MAX_GATEWAY_MESSAGE_BYTES)
    .max_encoding_message_size(gatehouse_proto::MAX_MESSAGE_BYTES);
    let mut server = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE));
    if let Some(tls) = &config.tls {
        server = server
            .tls_config(tls.server_config())
            .context("configuring gRPC TLS")?;
    }
    let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let grpc = server
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, stopped(shutdown_rx.clone()));
    let grpc_task = tokio::spawn(async move {
        if let Err(e) = grpc.await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });

    let router = http::router(Arc::clone(&shared), &config.admin_token);
    let http = axum::serve(http_listener, router).with_graceful_shutdown(stopped(shutdown_rx));
    let http_task = tokio::spawn(async move {
        if let Err(e) = http.await {
            tracing::error!(error = %e, "admin HTTP server failed");
        }
    });

    tracing::info!(%grpc_addr, %http_addr, tls = config.tls.is_some(), "Core listening");
    Ok(RunningCore {
        grpc_addr,
        http_addr,
        shared,
        shutdown,
        tasks: vec![("gRPC", grpc_task), ("HTTP", http_task)],
    })
}

/// Resolves when a stop is requested (or the `RunningCore` is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

impl RunningCore {
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://{http_addr}`: the base URL for [`client::AdminClient`].
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Graceful stop: ends every gateway stream, stops both servers, flushes the database.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for (name, mut task) in self.tasks {
            if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
                tracing::warn!(server = name, "did not stop in time; aborted");
                task.abort();
            }
        }
        if let Err(e) = self.shared.flush().await {
            tracing::error!(error = %e, "flushing the database failed");
        }
        tracing::info!("Core stopped");
    }

    /// Fault injection: the next `n` deltas of the location are not sent to gateways
    /// (their revisions still count, as if the messages were lost).
    #[doc(hidden)]
    pub fn drop_next_deltas(&self, location_id: u64, n: usize) {
        self.shared.hub.drop_next(location_id, n);
    }

    /// Fault injection: sends `msg` as is to every connected gateway of the location.
    #[doc(hidden)]
    pub fn inject(&self, location_id: u64, msg: CoreMessage) {
        self.shared.hub.inject(location_id, msg);
    }
}
