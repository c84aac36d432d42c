//! The agent's HTTP server: `/healthz` (alive), `/readyz` (ready by the rule in
//! [`crate::agent::status::readiness`]), `/metrics` (Prometheus text), `/status` and
//! `/diff` (JSON, for `gatehouse status` and `gatehouse diff`). It reads the status the
//! event loop publishes and asks the loop for a diff over a channel; it owns no state.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::agent::status::Status;

/// The difference between the desired state and the interface, as `gatehouse diff` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DiffReport {
    pub held_revision: u64,
    /// One line per operation with its reasons; empty = the interface matches.
    pub operations: Vec<String>,
    pub error: Option<String>,
}

/// Requests the HTTP server sends to the event loop.
pub type DiffRequests = mpsc::Sender<oneshot::Sender<DiffReport>>;

#[derive(Clone)]
struct AppState {
    status: watch::Receiver<Status>,
    diff: DiffRequests,
}

/// Binds the listener (so a bad address fails at start, not later).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("http.listen {addr}: {e}"))
}

/// Serves until `shutdown` becomes true.
pub async fn serve(
    listener: TcpListener,
    status: watch::Receiver<Status>,
    diff: DiffRequests,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status_json))
        .route("/diff", get(diff_json))
        .with_state(AppState { status, diff });
    axum::serve(listener, app)
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

async fn status_json(State(app): State<AppState>) -> Json<Status> {
    Json(app.status.borrow().clone())
}

async fn diff_json(State(app): State<AppState>) -> Response {
    let (tx, rx) = oneshot::channel();
    if app.diff.send(tx).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "agent stopping\n").into_response();
    }
    match rx.await {
        Ok(report) => Json(report).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "agent stopping\n").into_response(),
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
}
