//! The agent's HTTP server: `/healthz` (alive), `/readyz` (ready by the rule in
//! [`crate::agent::status::readiness`]), `/metrics` (Prometheus text), `/status` and
//! `/diff` (JSON, for `gatehouse status` and `gatehouse diff`), `/peers` (JSON: the
//! interface's peers, for `gatehouse status`). It reads the status and the
//! diff the event loop publishes; it owns no state. No request makes the loop work more
//! than once a second: `/diff` answers from the loop's last read and, when that read is
//! older than a second, asks for one fresh read (requests in between share it). HA
//! commands (`POST /drain`, `/undrain`, `/activate`, `/deactivate`) go to the event loop
//! and answer its state after the command: `{"role": "...", "draining": bool}`. The
//! control endpoints (`/status`, `/diff`, `/peers`, the HA commands) answer loopback clients only,
//! whatever `http.listen` is (403 otherwise).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::agent::peers::PeerTable;
use crate::agent::status::{unix_ms, Status};
use crate::ha;
use crate::metrics::ApplyMetrics;

/// A diff older than this is refreshed on request (at most one interface read per period).
pub const DIFF_MAX_AGE: Duration = Duration::from_secs(1);
/// How long a `/diff` request waits for the fresh read it asked for before answering with
/// the last one.
const DIFF_WAIT: Duration = Duration::from_secs(2);
/// How long an HA command waits for the event loop's answer.
const COMMAND_WAIT: Duration = Duration::from_secs(10);

/// The difference between the desired state and the interface, as `gatehouse diff` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DiffReport {
    pub held_revision: u64,
    /// One line per operation with its reasons; empty = the interface matches.
    pub operations: Vec<String>,
    pub error: Option<String>,
    /// When the interface read this diff compares against was made (unix ms); None
    /// before the first read.
    #[serde(default)]
    pub read_unix_ms: Option<i64>,
}

impl DiffReport {
    /// Whether the report is older than [`DIFF_MAX_AGE`] at `now` (or from the future: the
    /// wall clock was set back, so its age is unknown).
    pub fn is_stale(&self, now: SystemTime) -> bool {
        self.read_unix_ms.is_none_or(|at| {
            let age = unix_ms(now).saturating_sub(at);
            !(0..DIFF_MAX_AGE.as_millis() as i64).contains(&age)
        })
    }
}

/// The event loop's side of `/diff`: the last diff it published, and where to ask for a
/// fresh one (a full queue means one is already asked for).
#[derive(Clone)]
pub struct DiffChannel {
    pub report: watch::Receiver<DiffReport>,
    pub refresh: mpsc::Sender<()>,
}

/// What the event loop and the driver publish for the server to answer from.
#[derive(Clone)]
pub struct Published {
    pub status: watch::Receiver<Status>,
    pub diff: DiffChannel,
    /// The peers at the last read (refreshed like the diff: the same read serves both).
    pub peers: watch::Receiver<Arc<PeerTable>>,
    pub apply: ApplyMetrics,
}

#[derive(Clone)]
struct AppState {
    status: watch::Receiver<Status>,
    diff: DiffChannel,
    peers: watch::Receiver<Arc<PeerTable>>,
    apply: ApplyMetrics,
    ha: mpsc::Sender<ha::Request>,
}

/// Whether a client may use the control endpoints: loopback only (IPv4, IPv6, and IPv4
/// loopback mapped into IPv6).
pub fn is_local_client(peer: SocketAddr) -> bool {
    match peer.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Binds the listener (so a bad address fails at start, not later).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("http.listen {addr}: {e}"))
}

/// The router, without its connection info (the server adds it; tests inject it).
pub fn router(published: Published, ha: mpsc::Sender<ha::Request>) -> Router {
    let Published {
        status,
        diff,
        peers,
        apply,
    } = published;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status_json))
        .route("/diff", get(diff_json))
        .route("/peers", get(peers_json))
        .route("/drain", post(drain))
        .route("/undrain", post(undrain))
        .route("/activate", post(activate))
        .route("/deactivate", post(deactivate))
        .with_state(AppState {
            status,
            diff,
            peers,
            apply,
            ha,
        })
}

/// Serves until `shutdown` becomes true.
pub async fn serve(
    listener: TcpListener,
    published: Published,
    ha: mpsc::Sender<ha::Request>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let app = router(published, ha);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = shutdown.wait_for(|s| *s).await;
    })
    .await?;
    Ok(())
}

async fn readyz(State(app): State<AppState>) -> Response {
    let (ready, reason) = app
        .status
        .borrow()
        .readiness_now(std::time::SystemTime::now());
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, format!("{reason}\n")).into_response()
}

fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        "the control endpoints answer loopback clients only\n",
    )
        .into_response()
}

async fn status_json(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(app): State<AppState>,
) -> Response {
    if !is_local_client(peer) {
        return forbidden();
    }
    Json(app.status.borrow().clone()).into_response()
}

async fn diff_json(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(mut app): State<AppState>,
) -> Response {
    if !is_local_client(peer) {
        return forbidden();
    }
    let stale = app
        .diff
        .report
        .borrow_and_update()
        .is_stale(SystemTime::now());
    if stale {
        // A full queue: a refresh is already asked for; this request shares it.
        let _ = app.diff.refresh.try_send(());
        let _ = tokio::time::timeout(DIFF_WAIT, app.diff.report.changed()).await;
    }
    let report = app.diff.report.borrow().clone();
    Json(report).into_response()
}

/// `/peers`: the interface's peers, as fresh as `/diff` (no rows above
/// `http.peer_metrics_limit`).
async fn peers_json(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(mut app): State<AppState>,
) -> Response {
    if !is_local_client(peer) {
        return forbidden();
    }
    let table = fresh_peers(&mut app).await;
    Json(&*table).into_response()
}

/// The peer table, after asking for a fresh read when it is listed and older than
/// [`DIFF_MAX_AGE`] (the same read as `/diff`'s: at most one a second, shared by the
/// requests in between). A table without rows needs no read.
async fn fresh_peers(app: &mut AppState) -> Arc<PeerTable> {
    let stale = {
        let table = app.peers.borrow_and_update();
        table.listed
            && table.read_unix_ms.is_none_or(|at| {
                let age = unix_ms(SystemTime::now()).saturating_sub(at);
                !(0..DIFF_MAX_AGE.as_millis() as i64).contains(&age)
            })
    };
    if stale {
        let _ = app.diff.refresh.try_send(());
        let _ = tokio::time::timeout(DIFF_WAIT, app.peers.changed()).await;
    }
    Arc::clone(&app.peers.borrow())
}

async fn drain(peer: ConnectInfo<SocketAddr>, app: State<AppState>) -> Response {
    command(peer, app, ha::Command::Drain).await
}

async fn undrain(peer: ConnectInfo<SocketAddr>, app: State<AppState>) -> Response {
    command(peer, app, ha::Command::Undrain).await
}

async fn activate(peer: ConnectInfo<SocketAddr>, app: State<AppState>) -> Response {
    command(peer, app, ha::Command::Activate).await
}

async fn deactivate(peer: ConnectInfo<SocketAddr>, app: State<AppState>) -> Response {
    command(peer, app, ha::Command::Deactivate).await
}

/// Hands an HA command to the event loop and answers its state after it; 503 when the
/// loop does not answer in time.
async fn command(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(app): State<AppState>,
    command: ha::Command,
) -> Response {
    if !is_local_client(peer) {
        return forbidden();
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    let asked = app
        .ha
        .send_timeout(ha::Request { command, reply }, COMMAND_WAIT)
        .await;
    let answer = match asked {
        Ok(()) => tokio::time::timeout(COMMAND_WAIT, answer).await,
        Err(_) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent's event loop does not take commands\n",
            )
                .into_response()
        }
    };
    match answer {
        Ok(Ok(answer)) => Json(answer).into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the agent's event loop did not answer {}\n", command.name()),
        )
            .into_response(),
    }
}

/// `/metrics`: OpenMetrics when the scraper asks for it (Prometheus does), else the
/// Prometheus text format (curl, promtool).
async fn metrics(State(mut app): State<AppState>, headers: HeaderMap) -> Response {
    let peers = fresh_peers(&mut app).await;
    let status = app.status.borrow().clone();
    let page = match crate::metrics::render(&status, &peers, &app.apply, SystemTime::now()) {
        Ok(page) => page,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            page,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::to_prometheus_text(&page),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_is_stale_after_a_second_or_when_the_clock_went_back() {
        let now = SystemTime::now();
        let at = |ms: i64| DiffReport {
            read_unix_ms: Some(unix_ms(now) + ms),
            ..Default::default()
        };
        assert!(DiffReport::default().is_stale(now));
        assert!(!at(-500).is_stale(now));
        assert!(at(-1000).is_stale(now));
        assert!(at(60_000).is_stale(now));
    }

    #[test]
    fn only_loopback_clients_are_local() {
        for local in [
            "127.0.0.1:1",
            "127.3.2.1:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_local_client(local.parse().unwrap()), "{local}");
        }
        for remote in [
            "192.0.2.1:1",
            "0.0.0.0:1",
            "[2001:db8::1]:1",
            "[::ffff:192.0.2.1]:1",
        ] {
            assert!(!is_local_client(remote.parse().unwrap()), "{remote}");
        }
    }

    /// Through the router: a non-loopback client gets 403 from `/status` and `/diff`,
    /// while `/readyz` and `/metrics` still answer it.
    #[tokio::test]
    async fn control_endpoints_refuse_remote_clients() {
        use axum::extract::connect_info::MockConnectInfo;
        let (_status_tx, status) = watch::channel(Status::default());
        let (_diff_tx, report) = watch::channel(DiffReport::default());
        let (refresh, _refresh_rx) = mpsc::channel(1);
        let (_peers_tx, peers) = watch::channel(Arc::new(PeerTable::default()));
        let (ha_tx, mut ha_rx) = mpsc::channel::<ha::Request>(4);
        // A stand-in event loop: answers every command.
        tokio::spawn(async move {
            while let Some(r) = ha_rx.recv().await {
                let _ = r.reply.send(ha::Answer {
                    role: ha::Role::Active,
                    draining: r.command == ha::Command::Drain,
                });
            }
        });
        for (client, want) in [("192.0.2.1:4000", 403u16), ("127.0.0.1:4000", 200)] {
            let addr: SocketAddr = client.parse().unwrap();
            let app = router(
                Published {
                    status: status.clone(),
                    diff: DiffChannel {
                        report: report.clone(),
                        refresh: refresh.clone(),
                    },
                    peers: peers.clone(),
                    apply: ApplyMetrics::default(),
                },
                ha_tx.clone(),
            )
            .layer(MockConnectInfo(addr));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let server = tokio::spawn(async move { axum::serve(listener, app).await });
            for path in ["/status", "/diff", "/peers"] {
                let got = reqwest::get(format!("{url}{path}")).await.unwrap().status();
                assert_eq!(got.as_u16(), want, "{client} {path}");
            }
            let http = reqwest::Client::new();
            for path in ["/drain", "/undrain", "/activate", "/deactivate"] {
                let got = http.post(format!("{url}{path}")).send().await.unwrap();
                assert_eq!(got.status().as_u16(), want, "{client} POST {path}");
                if want == 200 {
                    let answer: ha::Answer = got.json().await.unwrap();
                    assert_eq!(answer.draining, path == "/drain", "{path}");
                }
            }
            let metrics = reqwest::get(format!("{url}/metrics"))
                .await
                .unwrap()
                .status();
            assert_eq!(metrics.as_u16(), 200, "{client} /metrics");
            server.abort();
        }
    }
}
