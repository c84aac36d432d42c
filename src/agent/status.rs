//! What the agent tells about itself: the status the event loop publishes (through a
//! `watch` channel) for `/readyz`, `/status`, `/metrics` and `gatehouse status`, and the
//! readiness rule. The rule is pure: its inputs are facts and durations (time without the
//! Core, since the last missed deadline) the loop measures on the monotonic clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The agent's state as last published by the event loop.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub gateway_id: String,
    pub name: String,
    pub version: String,
    pub interface: String,
    pub backend: String,
    /// Revision held (accepted from the Core, or restored from the state file).
    pub held_revision: u64,
    /// Revision whose state the kernel matches (0 = none yet).
    pub applied_revision: u64,
    /// The last apply failed: the kernel may not match `held_revision` yet (all failed
    /// steps in one line).
    pub apply_error: Option<String>,
    /// One line per apply step whose last attempt failed ("addresses: ...", "firewall:
    /// ..."); retried at the next reconcile. Also the reasons in `/readyz`'s body.
    #[serde(default)]
    pub failed_steps: Vec<String>,
    /// The last reconcile failed: when it runs again (backoff), how many attempts failed
    /// in a row, and the last error.
    #[serde(default)]
    pub apply_retry: Option<ApplyRetry>,
    /// The last revision the Core sent that was rejected, with the reasons.
    pub last_rejected: Option<Rejected>,
    pub core: CoreStatus,
    /// Peers in the desired state (after MFA removals).
    pub desired_peers: usize,
    /// Peers read from the interface at the last read.
    pub kernel_peers: usize,
    /// When the interface was last read (unix ms): what this status says about the
    /// interface is as of then.
    #[serde(default)]
    pub last_read_unix_ms: Option<i64>,
    /// Timer runs and missed deadlines of the event loop.
    #[serde(default)]
    pub timers: super::timers::TimerStats,
    /// Operations the last reconcile applied (0 = the kernel already matched).
    pub last_reconcile_ops: usize,
    pub last_reconcile_unix_ms: Option<i64>,
    /// Repairs of drift found by periodic reconciliation since start.
    pub drift_repairs: u64,
    /// The operations of those repairs, by kind.
    #[serde(default)]
    pub drift: DriftCounts,
    /// Stats reports to the Core since start.
    #[serde(default)]
    pub stats: StatsCounts,
    /// The held location's name ("" before one is held).
    #[serde(default)]
    pub location: String,
    pub mfa_threshold_secs: Option<u64>,
    pub mfa_removals: u64,
    pub pending_events: usize,
    pub device_writes: u64,
    pub link_writes: u64,
    /// The backend's own health (e.g. wireguard-go running).
    pub backend_error: Option<String>,
    /// The last write of the state file failed.
    pub state_error: Option<String>,
    /// Set when the offline policy removed the peers.
    pub offline_removed: bool,
    pub ready: bool,
    pub ready_reason: String,
    /// When the event loop published this status (unix ms). The loop publishes at least
    /// every stats and resync interval; an older status means the loop is stuck.
    pub published_unix_ms: i64,
    /// After how long without a new status `/readyz` stops trusting it.
    pub stale_after_ms: u64,
    /// The agent's nftables table: in sync, drift, error or disabled.
    #[serde(default)]
    pub firewall: super::firewall::FirewallStatus,
    /// Several gateways per location: role, drain, the last takeover.
    #[serde(default)]
    pub ha: crate::ha::HaStatus,
}

impl Status {
    /// Readiness as served: the loop's verdict, unless the loop has not published for
    /// longer than `stale_after_ms` (a hung gateway is never reported ready).
    pub fn readiness_now(&self, now: SystemTime) -> (bool, String) {
        let age = unix_ms(now).saturating_sub(self.published_unix_ms);
        if self.stale_after_ms > 0 && age > self.stale_after_ms as i64 {
            return (
                false,
                format!(
                    "the agent's event loop has not reported for {}s",
                    age / 1000
                ),
            );
        }
        (self.ready, self.ready_reason.clone())
    }
}

/// The Core connection as the event loop sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CoreStatus {
    pub url: String,
    pub connected: bool,
    /// Since when connected, or since when unreachable (unix ms).
    pub since_unix_ms: Option<i64>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub retry_in_ms: Option<u64>,
    /// Snapshots received since start (one per connection, plus one per detected gap).
    pub snapshots: u64,
    /// The backoff ceiling the delay was drawn from (full jitter).
    pub retry_ceiling_ms: Option<u64>,
    /// Streams opened since start (each after the first is a reconnect).
    #[serde(default)]
    pub streams: u64,
}

/// The operations drift repairs applied since start, by kind.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DriftCounts {
    pub link: u64,
    pub device: u64,
    pub peers_added: u64,
    pub peers_updated: u64,
    pub peers_removed: u64,
}

impl DriftCounts {
    /// Counts the operations of one repair.
    pub fn add(&mut self, repair: &crate::plan::PlanSummary) {
        self.link += repair.link as u64;
        self.device += repair.device as u64;
        self.peers_added += repair.peers_added as u64;
        self.peers_updated += repair.peers_updated as u64;
        self.peers_removed += repair.peers_removed as u64;
    }

    /// (kind, count) in a fixed order, for the metrics.
    pub fn by_kind(&self) -> [(&'static str, u64); 5] {
        [
            ("link", self.link),
            ("device", self.device),
            ("peer_added", self.peers_added),
            ("peer_updated", self.peers_updated),
            ("peer_removed", self.peers_removed),
        ]
    }
}

/// Stats reports to the Core since start.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatsCounts {
    /// Reports queued to the stream.
    pub reports: u64,
    /// Reports the stream refused (congested or gone); their peers go in the next one.
    pub refused: u64,
    /// The Core has every change up to the read made then (unix ms): the read of the last
    /// report queued, or of a tick with nothing to report. None: not yet.
    pub synced_unix_ms: Option<i64>,
}

/// A failed apply waiting for its retry.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyRetry {
    /// Failed reconciles in a row.
    pub attempts: u32,
    /// In how long the next attempt runs (as of the status).
    pub next_in_ms: u64,
    pub error: String,
}

/// A rejected revision.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Rejected {
    pub revision: u64,
    pub items: Vec<String>,
}

/// A missed deadline keeps the gateway unready for this long after it happened.
pub const MISSED_DEADLINE_WINDOW: Duration = Duration::from_secs(60);

/// Inputs of the readiness rule.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    pub applied: bool,
    /// A step that keeps the gateway from carrying traffic failed.
    pub apply_failed: bool,
    /// Every failed apply step ("step: error"), blocking or not: reasons in the body.
    pub failed_steps: Vec<String>,
    /// Timer deadlines the event loop missed since start, and how long ago (monotonic)
    /// it last missed one.
    pub missed_deadlines: u64,
    pub missed_deadline_ago: Option<Duration>,
    pub backend_failed: bool,
    pub core_connected: bool,
    /// How long the gateway has been without the Core (zero while connected).
    pub offline_for: Duration,
    /// None: keep serving without the Core forever.
    pub offline_allowance: Option<Duration>,
    /// The operator drains this gateway (design §12).
    pub draining: bool,
    /// The last revision from the Core was rejected (the last good state stays).
    pub rejected_revision: Option<u64>,
}

/// Ready = this gateway can carry traffic: the interface applied and healthy, the event
/// loop meeting its deadlines, and not draining. A hung or half-configured gateway is
/// never reported ready. The Core's state is a reason in the body, never a verdict (an
/// outage, also past the offline allowance, must not eject every gateway of a location
/// at once); so are a rejected revision and failed steps that do not block (addresses,
/// firewall), listed after the verdict.
pub fn readiness(r: &Readiness) -> (bool, String) {
    let (ready, mut reason) = verdict(r);
    if let Some(revision) = r.rejected_revision {
        reason = format!("{reason}; revision {revision} rejected (the last good state stays)");
    }
    if r.failed_steps.is_empty() {
        return (ready, reason);
    }
    (
        ready,
        format!("{reason}; failed steps: {}", r.failed_steps.join("; ")),
    )
}

fn verdict(r: &Readiness) -> (bool, String) {
    if r.draining {
        return (
            false,
            "draining: moved out of service by the operator (`gatehouse undrain` ends it)".into(),
        );
    }
    if !r.applied {
        return (false, "no configuration applied yet".into());
    }
    if r.backend_failed {
        return (false, "backend unhealthy".into());
    }
    if r.apply_failed {
        return (false, "the last apply failed".into());
    }
    if let Some(ago) = r.missed_deadline_ago {
        if ago < MISSED_DEADLINE_WINDOW {
            return (
                false,
                format!(
                    "the event loop missed {} timer deadlines (the last {}s ago)",
                    r.missed_deadlines,
                    ago.as_secs()
                ),
            );
        }
    }
    if r.core_connected {
        return (true, "applied, Core connected".into());
    }
    let offline_for = r.offline_for;
    match r.offline_allowance {
        None => (
            true,
            format!(
                "applied, Core unreachable for {}s (offline policy: keep)",
                offline_for.as_secs()
            ),
        ),
        Some(limit) if offline_for <= limit => (
            true,
            format!(
                "applied, Core unreachable for {}s (allowance {}s)",
                offline_for.as_secs(),
                limit.as_secs()
            ),
        ),
        Some(limit) => (
            true,
            format!(
                "applied, Core unreachable for {}s, beyond the offline allowance of {}s",
                offline_for.as_secs(),
                limit.as_secs()
            ),
        ),
    }
}

/// Unix milliseconds of a wall time (0 before the epoch).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Readiness {
        Readiness {
            applied: true,
            core_connected: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_recent_missed_deadline_is_not_ready_and_failed_steps_are_listed() {
        let late = Readiness {
            missed_deadlines: 3,
            missed_deadline_ago: Some(Duration::from_secs(5)),
            ..base()
        };
        let (ok, why) = readiness(&late);
        assert!(!ok);
        assert!(why.contains("missed 3 timer deadlines"), "{why}");
        let old = Readiness {
            missed_deadline_ago: Some(MISSED_DEADLINE_WINDOW * 2),
            failed_steps: vec!["addresses: no IPv6".into()],
            ..late
        };
        let (ok, why) = readiness(&old);
        assert!(ok, "{why}");
        assert!(why.ends_with("failed steps: addresses: no IPv6"), "{why}");
    }

    #[test]
    fn ready_only_when_applied_healthy_and_core_ok() {
        assert!(readiness(&base()).0);
        assert!(
            !readiness(&Readiness {
                applied: false,
                ..base()
            },)
            .0
        );
        assert!(
            !readiness(&Readiness {
                apply_failed: true,
                ..base()
            },)
            .0
        );
        assert!(
            !readiness(&Readiness {
                backend_failed: true,
                ..base()
            },)
            .0
        );
    }

    #[test]
    fn draining_is_not_ready_whatever_else_holds() {
        let (ok, why) = readiness(&Readiness {
            draining: true,
            ..base()
        });
        assert!(!ok);
        assert!(why.starts_with("draining"), "{why}");
    }

    #[test]
    fn a_rejected_revision_is_a_reason_not_a_verdict() {
        let (ok, why) = readiness(&Readiness {
            rejected_revision: Some(7),
            ..base()
        });
        assert!(ok, "{why}");
        assert!(why.contains("revision 7 rejected"), "{why}");
    }

    #[test]
    fn a_stale_status_is_not_ready() {
        let now = SystemTime::now();
        let s = Status {
            ready: true,
            ready_reason: "ok".into(),
            published_unix_ms: unix_ms(now) - 5_000,
            stale_after_ms: 60_000,
            ..Default::default()
        };
        assert!(s.readiness_now(now).0);
        let stuck = Status {
            published_unix_ms: unix_ms(now) - 120_000,
            ..s
        };
        let (ok, why) = stuck.readiness_now(now);
        assert!(!ok);
        assert!(why.contains("not reported for 120s"), "{why}");
    }

    #[test]
    fn offline_allowance_decides_without_core() {
        let offline = Readiness {
            core_connected: false,
            offline_for: Duration::from_secs(120),
            ..base()
        };
        let (ok, why) = readiness(&offline);
        assert!(ok);
        assert!(why.contains("unreachable for 120s"), "{why}");
        // Past the allowance too: a Core outage is a reason, never a 503.
        let limited = Readiness {
            offline_allowance: Some(Duration::from_secs(60)),
            ..offline.clone()
        };
        let (ok, why) = readiness(&limited);
        assert!(ok, "{why}");
        assert!(why.contains("beyond the offline allowance"), "{why}");
        let within = Readiness {
            offline_allowance: Some(Duration::from_secs(600)),
            ..offline
        };
        assert!(readiness(&within).0);
    }
}
