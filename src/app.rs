//! Wiring: turns a validated [`Config`] into the agent's [`Settings`] and backend, sets up
//! logging and signals, and implements the `status`, `diff` and HA commands (`drain`,
//! `undrain`, `activate`, `deactivate`): HTTP clients of a running agent. `main.rs` only parses the command line and calls in here.

use std::time::Duration;

use anyhow::Context as _;
use tracing::info;

use crate::agent::client::CoreSettings;
use crate::agent::status::Status;
use crate::agent::{self, Settings};
use crate::backend::userspace::{UserspaceBackend, UserspaceConfig};
use crate::backend::{memory::MemoryBackend, Backend, BackendError, BackendKind};
use crate::config::{Config, LogFormat, OfflinePolicy};
use crate::hooks::Hooks;
use crate::http::DiffReport;

/// Resolves what the event loop needs from the configuration (reads the TLS files).
pub fn settings(config: &Config) -> anyhow::Result<Settings> {
    let read = |path: &std::path::Path, key: &str| {
        std::fs::read(path).with_context(|| format!("{key}: cannot read {}", path.display()))
    };
    let ca_pem = match &config.core.ca_file {
        Some(p) => Some(read(p, "core.ca_file")?),
        None => None,
    };
    let client_identity = match (&config.core.client_cert_file, &config.core.client_key_file) {
        (Some(c), Some(k)) => Some((
            read(c, "core.client_cert_file")?,
            read(k, "core.client_key_file")?,
        )),
        _ => None,
    };
    let mut url = config.core.url.to_string();
    // `Url` renders "http://host:1/" with a trailing slash; the gRPC endpoint wants none.
    if url.ends_with('/') {
        url.pop();
    }
    Ok(Settings {
        name: config.gateway.name.clone().unwrap_or_else(hostname),
        interface: config.gateway.interface.clone(),
        backend_name: config.gateway.backend.to_string(),
        state_dir: config.gateway.state_dir.clone(),
        core: CoreSettings {
            url,
            token: config.core.token.clone(),
            ca_pem,
            client_identity,
            connect_timeout: config.core.connect_timeout,
            keepalive_interval: config.core.keepalive_interval,
            backoff_base: Duration::from_millis(500),
            backoff_max: config.core.reconnect_max,
        },
        stats_interval: config.gateway.stats_interval,
        resync_interval: config.gateway.resync_interval,
        offline_remove_after: match config.gateway.offline_policy {
            OfflinePolicy::Keep => None,
            OfflinePolicy::RemoveAfter(d) => Some(d),
        },
        remove_on_shutdown: config.gateway.remove_on_shutdown,
        gateway_id: config.gateway.id.clone(),
        http_listen: config.http.listen,
        peer_metrics_limit: config.http.peer_metrics_limit,
        hooks: Hooks::new(config.hooks.clone(), config.gateway.interface.clone()),
        firewall: crate::agent::firewall::FirewallSettings {
            // The in-memory backend has no kernel interface to filter.
            enabled: config.firewall.enabled && config.gateway.backend != BackendKind::Memory,
            masquerade: config.firewall.masquerade,
        },
        ha: crate::ha::HaSettings {
            vips: config.ha.vip.clone(),
            takeover_window: config.ha.takeover_window,
            takeover_rate: config.ha.takeover_rate,
            route_table: config.ha.route_table,
        },
    })
}

/// Opens the configured backend.
pub fn backend(config: &Config) -> Result<Box<dyn Backend>, BackendError> {
    let iface = &config.gateway.interface;
    Ok(match config.gateway.backend {
        BackendKind::Kernel => Box::new(crate::backend::kernel::KernelBackend::new(iface)?),
        BackendKind::Userspace => Box::new(UserspaceBackend::new(
            iface.clone(),
            UserspaceConfig {
                binary: config.gateway.wireguard_go.clone().into(),
                ..UserspaceConfig::default()
            },
        )?),
        BackendKind::Memory => Box::new(MemoryBackend::new(iface.clone())),
    })
}

/// `gatehouse run`: the agent until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    config
        .core
        .token
        .read()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let settings = settings(&config)?;
    let backend =
        backend(&config).map_err(|e| anyhow::anyhow!("backend {}: {e}", config.gateway.backend))?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        interface = %settings.interface,
        backend = %settings.backend_name,
        core = %settings.core.url,
        "gatehouse starting"
    );
    agent::run(settings, backend, shutdown_signal()).await
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
    }
}

/// Logging to stderr, text or JSON, with the configured filter.
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// `gatehouse status`: prints the running agent's interface and peers as `wg show` does
/// (from `/peers`), then what only gatehouse knows (from `/status`); with `json`, both as
/// one JSON object `{"status": ..., "peers": ...}`. Exit 0 when ready, 1 when not, 3 when
/// the agent cannot be reached.
pub async fn status(base: &str, json: bool) -> i32 {
    let base = base.trim_end_matches('/');
    let mut s = match call::<Status>(reqwest::Method::GET, &format!("{base}/status")).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return 3;
        }
    };
    let now = std::time::SystemTime::now();
    (s.ready, s.ready_reason) = s.readiness_now(now);
    let peers =
        call::<crate::agent::peers::PeerTable>(reqwest::Method::GET, &format!("{base}/peers"))
            .await;
    if json {
        let peers = peers.ok();
        let both = serde_json::json!({ "status": &s, "peers": peers });
        match serde_json::to_string_pretty(&both) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        }
    } else {
        match &peers {
            Ok(table) => println!(
                "{}",
                crate::show::render_interface(&s.interface, table, now)
            ),
            Err(e) => eprintln!("(no peer listing: {e})\n"),
        }
        print!("{}", render_status(&s));
    }
    if s.ready {
        0
    } else {
        1
    }
}

/// `gatehouse diff`: prints what differs between the desired state and the interface;
/// exit 0 when nothing differs, 1 when something does, 3 when the agent cannot be reached.
pub async fn diff(base: &str, json: bool) -> i32 {
    let url = format!("{}/diff", base.trim_end_matches('/'));
    match call::<DiffReport>(reqwest::Method::GET, &url).await {
        Ok(d) if json => {
            match serde_json::to_string_pretty(&d) {
                Ok(text) => println!("{text}"),
                Err(e) => eprintln!("error: {e}"),
            }
            i32::from(d.error.is_some() || !d.operations.is_empty())
        }
        Ok(d) => {
            if let Some(ms) = d.read_unix_ms {
                let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
                println!(
                    "(the interface as read at {})",
                    humantime::format_rfc3339_millis(t)
                );
            }
            if let Some(e) = &d.error {
                println!("revision {}: cannot compare: {e}", d.held_revision);
                return 1;
            }
            if d.operations.is_empty() {
                println!(
                    "revision {}: the interface matches the desired state",
                    d.held_revision
                );
                return 0;
            }
            println!(
                "revision {}: {} difference(s) (the next reconcile applies them):",
                d.held_revision,
                d.operations.len()
            );
            for op in &d.operations {
                println!("  {op}");
            }
            1
        }
        Err(e) => {
            eprintln!("error: {e}");
            3
        }
    }
}

/// `gatehouse drain|undrain|activate|deactivate`: asks the running agent (`POST`) and
/// prints its one-line answer; exit 0 when it did, 1 when it refused, 3 when it cannot
/// be reached.
pub async fn ha_command(base: &str, command: crate::ha::Command) -> i32 {
    let url = format!("{}/{}", base.trim_end_matches('/'), command.name());
    match call::<crate::ha::Answer>(reqwest::Method::POST, &url).await {
        Ok(a) => {
            println!("{}: {}", command.name(), render_ha_line(a.role, a.draining));
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                CallError::Unreachable { .. } => 3,
                CallError::Refused { .. } | CallError::Unexpected { .. } => 1,
            }
        }
    }
}

/// The role/draining line of `gatehouse status` and the HA commands.
fn render_ha_line(role: crate::ha::Role, draining: bool) -> String {
    format!(
        "{role}, {}",
        if draining {
            "DRAINING (/readyz 503)"
        } else {
            "not draining"
        }
    )
}

/// How long a command waits for the running agent's answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a call to the running agent brought no answer of the expected form.
#[derive(Debug, thiserror::Error)]
enum CallError {
    /// Nothing answered (or the answer broke off): exit 3 for every command.
    #[error("cannot reach the agent at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The agent answered with an error status (an HA command it refuses).
    #[error("{url} answered {status}: {body}")]
    Refused {
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
    /// The agent answered success with a body that is not the expected JSON.
    #[error("{url}: unexpected answer ({source}): {body}")]
    Unexpected {
        url: String,
        #[source]
        source: serde_json::Error,
        body: String,
    },
}

/// The one request of the agent's HTTP clients (`GET /status`, `GET /diff`, `POST /drain`
/// etc.): sends `method` to `url` and decodes the JSON answer.
async fn call<T: serde::de::DeserializeOwned>(
    method: reqwest::Method,
    url: &str,
) -> Result<T, CallError> {
    let unreachable = |source| CallError::Unreachable {
        url: url.to_owned(),
        source,
    };
    let response = reqwest::Client::builder()
        .timeout(AGENT_TIMEOUT)
        .build()
        .map_err(unreachable)?
        .request(method, url)
        .send()
        .await
        .map_err(unreachable)?;
    let status = response.status();
    let body = response.text().await.map_err(unreachable)?;
    if !status.is_success() {
        return Err(CallError::Refused {
            url: url.to_owned(),
            status,
            body: body.trim().to_owned(),
        });
    }
    serde_json::from_str(&body).map_err(|source| CallError::Unexpected {
        url: url.to_owned(),
        source,
        body: body.trim().to_owned(),
    })
}

/// The human form of the status.
pub fn render_status(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let since = |ms: Option<i64>| {
        ms.map(|ms| {
            let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
            humantime::format_rfc3339_seconds(t).to_string()
        })
        .unwrap_or_else(|| "-".into())
    };
    let _ = writeln!(
        out,
        "gateway    {} ({}), gatehouse {}",
        s.name, s.gateway_id, s.version
    );
    if !s.location.is_empty() {
        let _ = writeln!(out, "location   {}", s.location);
    }
    let _ = writeln!(out, "interface  {} ({} backend)", s.interface, s.backend);
    let _ = writeln!(
        out,
        "ready      {} ({})",
        if s.ready { "yes" } else { "no" },
        s.ready_reason
    );
    let core = if s.core.connected {
        format!(
            "connected to {} since {}",
            s.core.url,
            since(s.core.since_unix_ms)
        )
    } else {
        format!(
            "UNREACHABLE ({}) since {}: {}",
            s.core.url,
            since(s.core.since_unix_ms),
            s.core.last_error.as_deref().unwrap_or("not connected yet")
        )
    };
    let _ = writeln!(out, "core       {core}");
    let ha = &s.ha;
    let mut ha_line = render_ha_line(ha.role, ha.draining);
    if !ha.vips_present.is_empty() {
        let vips: Vec<String> = ha.vips_present.iter().map(|v| v.to_string()).collect();
        ha_line.push_str(&format!(", floating address {}", vips.join(" ")));
    }
    if let Some(t) = &ha.last_takeover {
        ha_line.push_str(&format!(
            "; last takeover {} ({}): {}/{} handshakes, {} re-created, {} without endpoint, {} source routes",
            since(Some(t.at_unix_ms)),
            t.reason,
            t.kicked,
            t.planned,
            t.recreated,
            t.skipped_no_endpoint,
            t.source_routes
        ));
    }
    if let Some(e) = &ha.last_error {
        ha_line.push_str(&format!("; {} failures, last: {e}", ha.failures));
    }
    let _ = writeln!(out, "ha         {ha_line}");
    let _ = writeln!(
        out,
        "revision   held {}, applied {}",
        s.held_revision, s.applied_revision
    );
    let _ = writeln!(
        out,
        "peers      {} desired, {} on the interface",
        s.desired_peers, s.kernel_peers
    );
    if let Some(t) = s.mfa_threshold_secs {
        let _ = writeln!(
            out,
            "mfa        threshold {t}s, {} removed for inactivity, {} events unacknowledged",
            s.mfa_removals, s.pending_events
        );
    }
    let _ = writeln!(
        out,
        "reconcile  last {} ({} operations), {} drift repairs",
        since(s.last_reconcile_unix_ms),
        s.last_reconcile_ops,
        s.drift_repairs
    );
    for failed in &s.failed_steps {
        let _ = writeln!(out, "apply      FAILED step {failed}");
    }
    if let Some(r) = &s.apply_retry {
        let _ = writeln!(
            out,
            "apply      retry in {} ms ({} failed attempts in a row): {}",
            r.next_in_ms, r.attempts, r.error
        );
    }
    let fw = &s.firewall;
    if !fw.state.is_empty() {
        let _ = writeln!(
            out,
            "firewall   {} (table inet {}: {} rules, {} set elements; {} writes, {} repairs, {} connections cut){}",
            fw.state,
            fw.table,
            fw.rules,
            fw.set_elements,
            fw.writes,
            fw.repairs,
            fw.flows_cut,
            if fw.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", fw.detail.join("; "))
            }
        );
    }
    let _ = writeln!(
        out,
        "timers     {} stats, {} resyncs, {} MFA checks; {} missed deadlines (max {} ms late); interface read {}",
        s.timers.stats_ticks,
        s.timers.resyncs,
        s.timers.mfa_checks,
        s.timers.missed_deadlines,
        s.timers.max_lateness_ms,
        since(s.last_read_unix_ms)
    );
    if let Some(r) = &s.last_rejected {
        let _ = writeln!(
            out,
            "rejected   revision {}: {}",
            r.revision,
            r.items.join("; ")
        );
    }
    if let Some(e) = &s.state_error {
        let _ = writeln!(out, "state      NOT SAVED: {e}");
    }
    if let Some(e) = &s.backend_error {
        let _ = writeln!(out, "backend    UNHEALTHY: {e}");
    }
    if s.offline_removed {
        let _ = writeln!(out, "offline    peers removed by the offline policy");
    }
    out
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "gatehouse".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::{Role, TakeoverStatus};

    /// A stand-in agent on loopback: answers one request per reply (status line and body)
    /// and returns the request lines it saw.
    fn stand_in(
        replies: Vec<(&'static str, &'static str)>,
    ) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (status, body) in replies {
                let (mut conn, _) = listener.accept().expect("accept");
                let mut buf = [0u8; 4096];
                let n = conn.read(&mut buf).expect("read");
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.push(head.lines().next().unwrap_or("").to_owned());
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
            seen
        });
        (url, server)
    }

    #[tokio::test]
    async fn one_call_serves_get_and_post_and_tells_the_failures_apart() {
        let (url, server) = stand_in(vec![
            ("200 OK", r#"{"role":"active","draining":false}"#),
            ("200 OK", r#"{"role":"standby","draining":true}"#),
            ("403 Forbidden", " loopback only\n"),
            ("200 OK", "not json"),
        ]);
        let get: crate::ha::Answer = call(reqwest::Method::GET, &format!("{url}/status"))
            .await
            .expect("GET");
        assert_eq!((get.role, get.draining), (Role::Active, false));
        let post: crate::ha::Answer = call(reqwest::Method::POST, &format!("{url}/drain"))
            .await
            .expect("POST");
        assert_eq!((post.role, post.draining), (Role::Standby, true));
        let refused = call::<crate::ha::Answer>(reqwest::Method::POST, &format!("{url}/activate"))
            .await
            .expect_err("403");
        assert!(
            matches!(&refused, CallError::Refused { status, body, .. } if status.as_u16() == 403 && body == "loopback only"),
            "{refused}"
        );
        let garbled = call::<Status>(reqwest::Method::GET, &format!("{url}/status"))
            .await
            .expect_err("not json");
        assert!(matches!(garbled, CallError::Unexpected { .. }), "{garbled}");
        assert_eq!(
            server.join().expect("server"),
            vec![
                "GET /status HTTP/1.1",
                "POST /drain HTTP/1.1",
                "POST /activate HTTP/1.1",
                "GET /status HTTP/1.1"
            ]
        );
        let gone = call::<Status>(reqwest::Method::GET, &format!("{url}/status"))
            .await
            .expect_err("nothing listens");
        assert!(matches!(gone, CallError::Unreachable { .. }), "{gone}");
    }

    #[test]
    fn status_prints_the_role_and_drain_line() {
        let mut s = Status::default();
        assert!(
            render_status(&s).contains("ha         standby, not draining\n"),
            "{}",
            render_status(&s)
        );
        s.ha.role = Role::Active;
        s.ha.draining = true;
        s.ha.vips_present = vec!["192.0.2.10".parse().unwrap()];
        s.ha.last_takeover = Some(TakeoverStatus {
            at_unix_ms: 1_700_000_000_000,
            reason: "floating address present: 192.0.2.10".into(),
            kicked: 3,
            planned: 4,
            recreated: 1,
            skipped_no_endpoint: 2,
            source_routes: 3,
        });
        let text = render_status(&s);
        assert!(
            text.contains("ha         active, DRAINING (/readyz 503), floating address 192.0.2.10; last takeover 2023-11-14T22:13:20Z (floating address present: 192.0.2.10): 3/4 handshakes, 1 re-created, 2 without endpoint, 3 source routes\n"),
            "{text}"
        );
    }
}
