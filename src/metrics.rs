//! The `/metrics` page (OpenMetrics text): the agent's own series, prefixed `gatehouse_`,
//! from the status the event loop publishes and the apply histograms the driver observes
//! ([`ApplyMetrics`]); and, while the interface has at most `http.peer_metrics_limit`
//! peers, the per-peer series under the names dashboards already chart
//! (`wireguard_peer_*`, as mdlayher/wireguard_exporter names them: the interface's own
//! counters, what `wg show` shows) beside the agent's totals across counter resets
//! (`gatehouse_peer_*_total`). Every series carries `location` and `gateway` labels.
//!
//! Rendering is pure: the page is a function of the status, the peer table, the
//! histograms and `now`.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::agent::peers::PeerTable;
use crate::agent::status::{unix_ms, Status};
use crate::ha;

/// What the driver observes of each apply: its duration and its operations. Clones share
/// the same histograms (the driver observes, the HTTP server renders).
#[derive(Clone, Debug)]
pub struct ApplyMetrics {
    duration: Histogram,
    operations: Histogram,
}

impl Default for ApplyMetrics {
    fn default() -> Self {
        ApplyMetrics {
            // 1 ms .. about 150 s.
            duration: Histogram::new(exponential_buckets(0.001, 2.5, 14)),
            // 1 .. 262,144 operations.
            operations: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
        }
    }
}

impl ApplyMetrics {
    /// One apply of `operations` operations that took `took`.
    pub fn observe(&self, took: Duration, operations: usize) {
        self.duration.observe(took.as_secs_f64());
        self.operations.observe(operations as f64);
    }
}

/// The page for `status`, `peers` (rows only when listed) and `apply`, at `now`.
pub fn render(
    s: &Status,
    peers: &PeerTable,
    apply: &ApplyMetrics,
    now: SystemTime,
) -> Result<String, std::fmt::Error> {
    let location = if s.location.is_empty() {
        peers.location.clone()
    } else {
        s.location.clone()
    };
    let mut root = Registry::with_labels(
        [
            (Cow::Borrowed("location"), Cow::Owned(location)),
            (Cow::Borrowed("gateway"), Cow::Owned(s.name.clone())),
        ]
        .into_iter(),
    );
    per_peer(&mut root, s, peers);
    let agent = root.sub_registry_with_prefix("gatehouse");
    own(agent, s, peers, apply, now);
    let mut out = String::new();
    encode(&mut out, &root)?;
    Ok(out)
}

/// The Prometheus text format (0.0.4) of an OpenMetrics page from [`render`], for
/// scrapers and tools that read only that (promtool): a counter's `HELP` and `TYPE` name
/// its `_total` series, and there is no `# EOF` or `# UNIT` line. The page uses no type
/// beyond counter, gauge and histogram.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let total = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some(h) = help.take() {
                let text = h
                    .strip_prefix("# HELP ")
                    .and_then(|h| h.strip_prefix(name))
                    .unwrap_or("");
                out.push_str(&format!("# HELP {total}{text}\n"));
            }
            out.push_str(&format!("# TYPE {total} {kind}\n"));
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

type Labels = Vec<(&'static str, String)>;

fn gauge(registry: &mut Registry, name: &str, help: &str, v: i64) {
    let g: Gauge = Gauge::default();
    g.set(v);
    registry.register(name, help, g);
}

fn counter(registry: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    c.inc_by(v);
    registry.register(name, help, c);
}

/// A state set: one series per state, 1 for the current one.
fn state_set(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    states: &[&str],
    current: &str,
) {
    let family = Family::<Labels, Gauge>::default();
    for state in states {
        family
            .get_or_create(&vec![(label, (*state).to_owned())])
            .set(i64::from(*state == current));
    }
    registry.register(name, help, family);
}

/// The `wireguard_*` series of the interface and its peers (the interface's counters) and
/// the agent's totals per peer.
fn per_peer(root: &mut Registry, s: &Status, table: &PeerTable) {
    if !table.listed {
        return;
    }
    let device = || ("device", s.interface.clone());
    let info = Family::<Labels, Gauge>::default();
    if let Some(key) = &table.public_key {
        info.get_or_create(&vec![device(), ("public_key", key.clone())])
            .set(1);
    }
    root.register("wireguard_device_info", "Metadata about a device", info);
    let peer_info = Family::<Labels, Gauge>::default();
    let allowed = Family::<Labels, Gauge>::default();
    let rx = Family::<Labels, Counter>::default();
    let tx = Family::<Labels, Counter>::default();
    let handshake = Family::<Labels, Gauge>::default();
    let total_rx = Family::<Labels, Counter>::default();
    let total_tx = Family::<Labels, Counter>::default();
    for p in &table.peers {
        let key = || vec![device(), ("public_key", p.public_key.clone())];
        let endpoint = p.endpoint.map(|e| e.to_string()).unwrap_or_default();
        let mut labels = key();
        labels.push(("endpoint", endpoint));
        peer_info.get_or_create(&labels).set(1);
        for net in &p.allowed_ips {
            let mut labels = key();
            labels.push(("allowed_ips", net.to_string()));
            allowed.get_or_create(&labels).set(1);
        }
        rx.get_or_create(&key()).inc_by(p.rx_bytes);
        tx.get_or_create(&key()).inc_by(p.tx_bytes);
        handshake
            .get_or_create(&key())
            .set(p.latest_handshake_unix_ms.map_or(0, |ms| ms / 1000));
        let own = vec![("public_key", p.public_key.clone())];
        total_rx.get_or_create(&own).inc_by(p.total_rx_bytes);
        total_tx.get_or_create(&own).inc_by(p.total_tx_bytes);
    }
    root.register(
        "wireguard_peer_info",
        "Metadata about a peer. The public_key label on peer metrics refers to the peer's public key; not the device's public key",
        peer_info,
    );
    root.register(
        "wireguard_peer_allowed_ips_info",
        "Metadata about each of a peer's allowed IP subnets for a given device",
        allowed,
    );
    root.register(
        "wireguard_peer_receive_bytes",
        "Number of bytes received from a given peer (the interface's counter: it restarts when the peer is re-created)",
        rx,
    );
    root.register(
        "wireguard_peer_transmit_bytes",
        "Number of bytes transmitted to a given peer (the interface's counter: it restarts when the peer is re-created)",
        tx,
    );
    root.register(
        "wireguard_peer_last_handshake_seconds",
        "UNIX timestamp for the last handshake with a given peer (0: never)",
        handshake,
    );
    let agent = root.sub_registry_with_prefix("gatehouse");
    agent.register(
        "peer_receive_bytes",
        "Bytes received from a peer across its counter resets (re-creations) since the agent started",
        total_rx,
    );
    agent.register(
        "peer_transmit_bytes",
        "Bytes sent to a peer across its counter resets (re-creations) since the agent started",
        total_tx,
    );
}

/// The agent's own series.
fn own(r: &mut Registry, s: &Status, peers: &PeerTable, apply: &ApplyMetrics, now: SystemTime) {
    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&vec![
        ("version", s.version.clone()),
        ("interface", s.interface.clone()),
        ("backend", s.backend.clone()),
        ("gateway_id", s.gateway_id.clone()),
    ])
    .set(1);
    r.register(
        "info",
        "The agent's version, interface, backend and gateway id",
        info,
    );
    gauge(r, "ready", "1 when /readyz answers 200", s.ready as i64);
    gauge(
        r,
        "core_connected",
        "1 while a stream to the Core is open",
        s.core.connected as i64,
    );
    state_set(
        r,
        "core_stream_state",
        "The stream to the Core: connected or disconnected (retrying with backoff)",
        "state",
        &["connected", "disconnected"],
        if s.core.connected {
            "connected"
        } else {
            "disconnected"
        },
    );
    counter(
        r,
        "core_reconnects",
        "Streams to the Core opened after the first since start",
        s.core.streams.saturating_sub(1),
    );
    gauge(
        r,
        "core_connect_failures",
        "Consecutive failed Core connection attempts",
        i64::from(s.core.consecutive_failures),
    );
    gauge(
        r,
        "held_revision",
        "Revision accepted from the Core",
        s.held_revision as i64,
    );
    gauge(
        r,
        "applied_revision",
        "Revision the interface matches",
        s.applied_revision as i64,
    );
    gauge(
        r,
        "desired_peers",
        "Peers in the desired state",
        s.desired_peers as i64,
    );
    gauge(
        r,
        "kernel_peers",
        "Peers on the interface at the last read",
        s.kernel_peers as i64,
    );
    gauge(
        r,
        "peer_metrics_enabled",
        "1 while per-peer series are served (the interface has at most http.peer_metrics_limit peers)",
        peers.listed as i64,
    );
    gauge(
        r,
        "pending_events",
        "Peer events not yet acknowledged by the Core",
        s.pending_events as i64,
    );
    gauge(
        r,
        "apply_failed",
        "1 when the last apply failed",
        s.apply_error.is_some() as i64,
    );
    gauge(
        r,
        "failed_steps",
        "Apply steps (peer removals, link, addresses, peers, device, firewall) whose last attempt failed",
        s.failed_steps.len() as i64,
    );
    r.register(
        "apply_duration_seconds",
        "How long each apply to the interface took",
        apply.duration.clone(),
    );
    r.register(
        "apply_operations",
        "Operations (peers added, changed, removed; link and device settings) per apply",
        apply.operations.clone(),
    );
    counter(
        r,
        "missed_deadlines",
        "Timer runs (MFA expiry, stats, resync) more than 5s after their deadline",
        s.timers.missed_deadlines,
    );
    let lateness: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    lateness.set(s.timers.max_lateness_ms as f64 / 1000.0);
    r.register(
        "timer_max_lateness_seconds",
        "The latest a timer ran after its deadline since start",
        lateness,
    );
    counter(
        r,
        "drift_repairs",
        "Reconciles that found and repaired drift",
        s.drift_repairs,
    );
    let drift = Family::<Labels, Counter>::default();
    for (kind, n) in s.drift.by_kind() {
        drift
            .get_or_create(&vec![("kind", kind.to_owned())])
            .inc_by(n);
    }
    drift
        .get_or_create(&vec![("kind", "firewall".to_owned())])
        .inc_by(s.firewall.repairs);
    r.register(
        "drift_operations",
        "Operations of drift repairs, by kind (link, device, peer_added, peer_updated, peer_removed, firewall)",
        drift,
    );
    counter(
        r,
        "stats_reports",
        "Stats reports queued to the Core",
        s.stats.reports,
    );
    counter(
        r,
        "stats_refused",
        "Stats reports the stream could not take (their peers go in the next report)",
        s.stats.refused,
    );
    if let Some(synced) = s.stats.synced_unix_ms {
        let lag: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        lag.set((unix_ms(now).saturating_sub(synced)).max(0) as f64 / 1000.0);
        r.register(
            "stats_lag_seconds",
            "Age of the newest read the Core has every change of (the last report queued, or a read with nothing to report)",
            lag,
        );
    }
    counter(
        r,
        "mfa_removals",
        "Peers removed for MFA inactivity",
        s.mfa_removals,
    );
    let firewall = match s.firewall.state.as_str() {
        "in sync" => "in_sync",
        "" => "pending",
        other => other,
    };
    state_set(
        r,
        "firewall_state",
        "The agent's nftables table: in_sync, drift (being repaired), error (the last good table stays), disabled, pending (before the first step)",
        "state",
        &["in_sync", "drift", "error", "disabled", "pending"],
        firewall,
    );
    gauge(
        r,
        "firewall_error",
        "1 when the last firewall step failed (the last good table stays)",
        (s.firewall.state == "error") as i64,
    );
    counter(
        r,
        "firewall_repairs",
        "Repairs of the firewall table after a change outside gatehouse",
        s.firewall.repairs,
    );
    counter(
        r,
        "backend_device_writes",
        "WireGuard write messages sent",
        s.device_writes,
    );
    counter(
        r,
        "backend_link_writes",
        "Link write messages sent",
        s.link_writes,
    );
    let role = if s.ha.draining {
        "draining"
    } else if s.ha.role == ha::Role::Active {
        "active"
    } else {
        "standby"
    };
    state_set(
        r,
        "ha_role",
        "Several gateways per location: active, standby, or draining (moved out of service by the operator)",
        "role",
        &["active", "standby", "draining"],
        role,
    );
    gauge(
        r,
        "ha_active",
        "1 while this gateway is active (a floating address here, or activated)",
        (s.ha.role == ha::Role::Active) as i64,
    );
    gauge(
        r,
        "ha_draining",
        "1 while this gateway is drained (/readyz answers 503)",
        s.ha.draining as i64,
    );
    counter(
        r,
        "ha_takeovers",
        "Transitions to active since start (each starts one takeover round)",
        s.ha.takeovers,
    );
    counter(
        r,
        "ha_kicks",
        "Handshakes initiated towards clients on takeover",
        s.ha.kicks,
    );
    counter(
        r,
        "ha_failures",
        "Failed takeover kicks, source-route writes and address watches",
        s.ha.failures,
    );
    gauge(
        r,
        "ha_relayed_endpoints",
        "Peers whose last endpoint is known (seen here or relayed by the Core)",
        s.ha.relayed_endpoints as i64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::peers::PeerRow;

    fn at() -> SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn page(s: &Status) -> String {
        render(s, &PeerTable::default(), &ApplyMetrics::default(), at()).unwrap()
    }

    #[test]
    fn metrics_render_status_values() {
        let s = Status {
            ready: true,
            held_revision: 42,
            mfa_removals: 3,
            name: "gw-a".into(),
            location: "office".into(),
            ..Default::default()
        };
        let text = page(&s);
        for line in [
            r#"gatehouse_ready{location="office",gateway="gw-a"} 1"#,
            r#"gatehouse_held_revision{location="office",gateway="gw-a"} 42"#,
            r#"gatehouse_mfa_removals_total{location="office",gateway="gw-a"} 3"#,
            r#"gatehouse_peer_metrics_enabled{location="office",gateway="gw-a"} 0"#,
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        assert!(!text.contains("wireguard_"), "{text}");
    }

    #[test]
    fn the_text_format_names_counters_by_their_total_series() {
        let mut s = Status::default();
        s.timers.max_lateness_ms = 1500;
        let om = page(&s);
        assert!(
            om.contains("# TYPE gatehouse_drift_repairs counter\n"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = to_prometheus_text(&om);
        assert!(
            text.contains("# TYPE gatehouse_drift_repairs_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "# HELP gatehouse_drift_repairs_total Reconciles that found and repaired drift.\n"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE gatehouse_ready gauge\n"), "{text}");
        assert!(
            text.contains("# TYPE gatehouse_apply_duration_seconds histogram\n"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(
            text.contains(r#"gatehouse_timer_max_lateness_seconds{location="",gateway=""} 1.5"#),
            "{text}"
        );
        // Every sample line is kept, in order.
        let samples = |t: &str| {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(samples(&om), samples(&text));
    }

    #[test]
    fn missed_deadlines_and_failed_steps_are_metrics() {
        let mut s = Status {
            failed_steps: vec!["addresses: no IPv6".into()],
            ..Default::default()
        };
        s.timers.missed_deadlines = 4;
        let text = page(&s);
        assert!(text.contains("gatehouse_missed_deadlines_total{"), "{text}");
        assert!(text.contains("} 4\n"), "{text}");
        assert!(
            text.contains(r#"gatehouse_failed_steps{location="",gateway=""} 1"#),
            "{text}"
        );
    }

    #[test]
    fn states_roles_and_drift_kinds_are_series() {
        let mut s = Status::default();
        s.ha.role = ha::Role::Active;
        s.ha.draining = true;
        s.ha.takeovers = 2;
        s.firewall.state = "in sync".into();
        s.firewall.repairs = 5;
        s.core.streams = 3;
        s.drift.peers_removed = 7;
        let text = page(&s);
        for line in [
            r#"gatehouse_ha_role{location="",gateway="",role="draining"} 1"#,
            r#"gatehouse_ha_role{location="",gateway="",role="active"} 0"#,
            r#"gatehouse_ha_active{location="",gateway=""} 1"#,
            r#"gatehouse_ha_takeovers_total{location="",gateway=""} 2"#,
            r#"gatehouse_firewall_state{location="",gateway="",state="in_sync"} 1"#,
            r#"gatehouse_firewall_state{location="",gateway="",state="error"} 0"#,
            r#"gatehouse_core_stream_state{location="",gateway="",state="disconnected"} 1"#,
            r#"gatehouse_core_reconnects_total{location="",gateway=""} 2"#,
            r#"gatehouse_drift_operations_total{location="",gateway="",kind="peer_removed"} 7"#,
            r#"gatehouse_drift_operations_total{location="",gateway="",kind="firewall"} 5"#,
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }

    #[test]
    fn applies_are_histograms_and_stats_lag_is_measured_at_now() {
        let apply = ApplyMetrics::default();
        apply.observe(Duration::from_millis(30), 12);
        let now = at();
        let mut s = Status::default();
        s.stats.synced_unix_ms = Some(unix_ms(now) - 2_500);
        let text = render(&s, &PeerTable::default(), &apply, now).unwrap();
        assert!(
            text.contains(r#"gatehouse_apply_duration_seconds_count{location="",gateway=""} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"gatehouse_apply_operations_bucket{le="16.0",location="",gateway=""} 1"#
            ) || text.contains(
                r#"gatehouse_apply_operations_bucket{location="",gateway="",le="16.0"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"gatehouse_stats_lag_seconds{location="",gateway=""} 2.5"#),
            "{text}"
        );
    }

    #[test]
    fn per_peer_series_are_the_interface_counters_and_the_agent_totals() {
        let s = Status {
            interface: "wg0".into(),
            name: "gw-a".into(),
            location: "office".into(),
            ..Default::default()
        };
        let table = PeerTable {
            location: "office".into(),
            public_key: Some("DEV=".into()),
            peer_count: 1,
            limit: 10,
            listed: true,
            peers: vec![PeerRow {
                public_key: "PEER=".into(),
                endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                allowed_ips: vec![
                    "10.0.0.2/32".parse().unwrap(),
                    "fd00::2/128".parse().unwrap(),
                ],
                latest_handshake_unix_ms: Some(1_700_000_000_999),
                rx_bytes: 1234,
                tx_bytes: 5678,
                total_rx_bytes: 9234,
                total_tx_bytes: 9678,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render(&s, &table, &ApplyMetrics::default(), at()).unwrap();
        let l = r#"location="office",gateway="gw-a",device="wg0",public_key="PEER=""#;
        for line in [
            r#"wireguard_device_info{location="office",gateway="gw-a",device="wg0",public_key="DEV="} 1"#.to_string(),
            format!(r#"wireguard_peer_info{{{l},endpoint="192.0.2.1:51820"}} 1"#),
            format!(r#"wireguard_peer_allowed_ips_info{{{l},allowed_ips="10.0.0.2/32"}} 1"#),
            format!(r#"wireguard_peer_allowed_ips_info{{{l},allowed_ips="fd00::2/128"}} 1"#),
            format!("wireguard_peer_receive_bytes_total{{{l}}} 1234"),
            format!("wireguard_peer_transmit_bytes_total{{{l}}} 5678"),
            format!("wireguard_peer_last_handshake_seconds{{{l}}} 1700000000"),
            r#"gatehouse_peer_receive_bytes_total{location="office",gateway="gw-a",public_key="PEER="} 9234"#.to_string(),
            r#"gatehouse_peer_transmit_bytes_total{location="office",gateway="gw-a",public_key="PEER="} 9678"#.to_string(),
            r#"gatehouse_peer_metrics_enabled{location="office",gateway="gw-a"} 1"#.to_string(),
        ] {
            assert!(text.contains(&line), "{line}: {text}");
        }
        // Above the limit: no per-peer series at all.
        let over = PeerTable {
            listed: false,
            peers: vec![],
            ..table
        };
        let text = render(&s, &over, &ApplyMetrics::default(), at()).unwrap();
        assert!(!text.contains("wireguard_"), "{text}");
        assert!(!text.contains("gatehouse_peer_receive"), "{text}");
    }
}
