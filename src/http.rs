//! The agent's HTTP server: `/healthz` (alive), `/readyz` (ready by the rule in
//! [`crate::agent::status::readiness`]), `/metrics` (Prometheus text), `/status` and
//! `/diff` (JSON, for `gatehouse status` and `gatehouse diff`). It reads the status and the
//! diff the event loop publishes; it owns no state. No request makes the loop work more
//! than once a second: `/diff` answers from the loop's last read and, when that read is
//! older than a second, asks for one fresh read (requests in between share it). HA
//! commands (`POST /drain`, `/undrain`, `/activate`, `/deactivate`) go to the event loop
//! and answer its state after the command: `{"role": "...", "draining": bool}`. The
//! control endpoints (`/status`, `/diff`, the HA commands) answer loopback clients only,
//! whatever `http.listen` is (403 otherwise).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::agent::status::{unix_ms, Status};
use crate::ha;

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

#[derive(Clone)]
struct AppState {
    status: watch::Receiver<Status>,
    diff: DiffChannel,
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
pub fn router(
    status: watch::Receiver<Status>,
    diff: DiffChannel,
    ha: mpsc::Sender<ha::Request>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status_json))
        .route("/diff", get(diff_json))
        .route("/drain", post(drain))
        .route("/undrain", post(undrain))
        .route("/activate", post(activate))
        .route("/deactivate", post(deactivate))
        .with_state(AppState { status, diff, ha })
}

/// Serves until `shutdown` becomes true.
pub async fn serve(
    listener: TcpListener,
    status: watch::Receiver<Status>,
    diff: DiffChannel,
    ha: mpsc::Sender<ha::Request>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let app = router(status, diff, ha);
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

async fn metrics(State(app): State<AppState>) -> Response {
    let s = app.status.borrow().clone();
    match render_metrics(&s) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Renders the status as Prometheus/OpenMetrics text.
pub fn render_metrics(s: &Status) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("gatehouse");
    let gauge = |registry: &mut Registry, name: &str, help: &str, v: i64| {
        let g: Gauge = Gauge::default();
        g.set(v);
        registry.register(name, help, g);
    };
    let counter = |registry: &mut Registry, name: &str, help: &str, v: u64| {
        let c: Counter = Counter::default();
        c.inc_by(v);
        registry.register(name, help, c);
    };
    gauge(
        &mut registry,
        "ready",
        "1 when /readyz answers 200",
        s.ready as i64,
    );
    gauge(
        &mut registry,
        "core_connected",
        "1 while a stream to the Core is open",
        s.core.connected as i64,
    );
    gauge(
        &mut registry,
        "held_revision",
        "Revision accepted from the Core",
        s.held_revision as i64,
    );
    gauge(
        &mut registry,
        "applied_revision",
        "Revision the interface matches",
        s.applied_revision as i64,
    );
    gauge(
        &mut registry,
        "desired_peers",
        "Peers in the desired state",
        s.desired_peers as i64,
    );
    gauge(
        &mut registry,
        "kernel_peers",
        "Peers on the interface",
        s.kernel_peers as i64,
    );
    gauge(
        &mut registry,
        "pending_events",
        "Peer events not yet acknowledged by the Core",
        s.pending_events as i64,
    );
    gauge(
        &mut registry,
        "apply_failed",
        "1 when the last apply failed",
        s.apply_error.is_some() as i64,
    );
    gauge(
        &mut registry,
        "failed_steps",
        "Apply steps (peer removals, link, addresses, peers, device, firewall) whose last attempt failed",
        s.failed_steps.len() as i64,
    );
    counter(
        &mut registry,
        "missed_deadlines",
        "Timer runs (MFA expiry, stats, resync) more than 5s after their deadline",
        s.timers.missed_deadlines,
    );
    gauge(
        &mut registry,
        "timer_max_lateness_milliseconds",
        "The latest a timer ran after its deadline since start",
        s.timers.max_lateness_ms as i64,
    );
    gauge(
        &mut registry,
        "firewall_error",
        "1 when the last firewall step failed (the last good table stays)",
        (s.firewall.state == "error") as i64,
    );
    counter(
        &mut registry,
        "firewall_repairs",
        "Repairs of the firewall table after a change outside gatehouse",
        s.firewall.repairs,
    );
    counter(
        &mut registry,
        "mfa_removals",
        "Peers removed for MFA inactivity",
        s.mfa_removals,
    );
    counter(
        &mut registry,
        "drift_repairs",
        "Reconciles that found and repaired drift",
        s.drift_repairs,
    );
    counter(
        &mut registry,
        "backend_device_writes",
        "WireGuard write messages sent",
        s.device_writes,
    );
    counter(
        &mut registry,
        "backend_link_writes",
        "Link write messages sent",
        s.link_writes,
    );
    gauge(
        &mut registry,
        "ha_active",
        "1 while this gateway is active (a floating address here, or activated)",
        (s.ha.role == ha::Role::Active) as i64,
    );
    gauge(
        &mut registry,
        "ha_draining",
        "1 while this gateway is drained (/readyz answers 503)",
        s.ha.draining as i64,
    );
    counter(
        &mut registry,
        "ha_takeovers",
        "Transitions to active since start (each starts one takeover round)",
        s.ha.takeovers,
    );
    counter(
        &mut registry,
        "ha_kicks",
        "Handshakes initiated towards clients on takeover",
        s.ha.kicks,
    );
    counter(
        &mut registry,
        "ha_failures",
        "Failed takeover kicks, source-route writes and address watches",
        s.ha.failures,
    );
    gauge(
        &mut registry,
        "ha_relayed_endpoints",
        "Peers whose last endpoint is known (seen here or relayed by the Core)",
        s.ha.relayed_endpoints as i64,
    );
    gauge(
        &mut registry,
        "core_connect_failures",
        "Consecutive failed Core connection attempts",
        i64::from(s.core.consecutive_failures),
    );
    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_status_values() {
        let s = Status {
            ready: true,
            held_revision: 42,
            mfa_removals: 3,
            ..Default::default()
        };
        let text = render_metrics(&s).unwrap();
        assert!(text.contains("gatehouse_ready 1"), "{text}");
        assert!(text.contains("gatehouse_held_revision 42"), "{text}");
        assert!(text.contains("gatehouse_mfa_removals_total 3"), "{text}");
    }

    #[test]
    fn missed_deadlines_and_failed_steps_are_metrics() {
        let mut s = Status {
            failed_steps: vec!["addresses: no IPv6".into()],
            ..Default::default()
        };
        s.timers.missed_deadlines = 4;
        let text = render_metrics(&s).unwrap();
        assert!(
            text.contains("gatehouse_missed_deadlines_total 4"),
            "{text}"
        );
        assert!(text.contains("gatehouse_failed_steps 1"), "{text}");
    }

    #[test]
    fn ha_metrics_follow_the_status() {
        let mut s = Status::default();
        s.ha.role = ha::Role::Active;
        s.ha.draining = true;
        s.ha.takeovers = 2;
        s.ha.kicks = 40;
        s.ha.relayed_endpoints = 7;
        let text = render_metrics(&s).unwrap();
        for line in [
            "gatehouse_ha_active 1",
            "gatehouse_ha_draining 1",
            "gatehouse_ha_takeovers_total 2",
            "gatehouse_ha_kicks_total 40",
            "gatehouse_ha_relayed_endpoints 7",
            "gatehouse_ha_failures_total 0",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }

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
                status.clone(),
                DiffChannel {
                    report: report.clone(),
                    refresh: refresh.clone(),
                },
                ha_tx.clone(),
            )
            .layer(MockConnectInfo(addr));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let server = tokio::spawn(async move { axum::serve(listener, app).await });
            for path in ["/status", "/diff"] {
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
