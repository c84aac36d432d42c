//! What the machine shows and keeps: the status, the `/diff` report, the state to save.

use std::time::Duration;

use super::reconcile::AfterRead;
use super::{held, Action, Machine};
use crate::agent::status::{readiness, unix_ms, Readiness, Status};
use crate::http::DiffReport;
use crate::model::Desired;
use crate::plan::plan;
use crate::state::{LocationText, PersistedState, SavedState};

impl Machine {
    /// The state a full save writes, borrowed: what [`Machine::persisted_state`] would build,
    /// serialized without building it.
    pub(super) fn saved_state(&self) -> SavedState<'_> {
        let (mono, wall) = (self.now.mono, self.now.wall);
        SavedState {
            gateway_id: &self.gateway_id,
            applied_revision: self.held.as_ref().map_or(0, |h| h.revision),
            location: self.held.as_ref().map(LocationText),
            mfa: self.mfa.saved(mono, wall),
            tombstones: &self.tombstones,
            epochs: &self.epochs,
            pending_events: &self.pending,
            next_seq: self.next_seq,
            core_last_contact_unix_ms: self.core_last_contact(),
            offline_ms: Some(self.offline.offline_for(mono).as_millis() as u64),
            saved_unix_ms: Some(unix_ms(wall)),
            ha: self.ha.saved(),
        }
    }

    /// While the stream is up the Core is in contact now, even if idle.
    fn core_last_contact(&self) -> Option<i64> {
        if self.stream_up {
            Some(unix_ms(self.now.wall))
        } else {
            self.last_contact.map(unix_ms)
        }
    }

    pub(super) fn persisted_state(&self) -> PersistedState {
        let (mono, wall) = (self.now.mono, self.now.wall);
        PersistedState {
            gateway_id: self.gateway_id.clone(),
            applied_revision: self.held.as_ref().map_or(0, |h| h.revision),
            location: held::encoded(self.held.as_ref()),
            mfa: self.mfa.persist(mono, wall),
            tombstones: self.tombstones.clone(),
            epochs: self.epochs.clone(),
            pending_events: self.pending.clone(),
            next_seq: self.next_seq,
            // While the stream is up the Core is in contact now, even if idle.
            offline_ms: Some(self.offline.offline_for(mono).as_millis() as u64),
            saved_unix_ms: Some(unix_ms(wall)),
            core_last_contact_unix_ms: self.core_last_contact(),
            ha: self.ha.persisted(),
        }
    }

    /// The status (without the firewall's and the backend's counters, which the driver
    /// adds).
    pub fn status(&self) -> Status {
        let (mono, wall) = (self.now.mono, self.now.wall);
        let (ready, ready_reason) = readiness(&Readiness {
            applied: self.applied_revision != 0,
            apply_failed: self.steps.blocking(),
            failed_steps: self.steps.reasons(),
            missed_deadlines: self.timers.stats.missed_deadlines,
            missed_deadline_ago: self.timers.missed_ago(mono),
            backend_failed: self.backend_error.is_some(),
            core_connected: self.stream_up,
            offline_for: self.offline.offline_for(mono),
            offline_allowance: self.settings.offline_remove_after,
            draining: self.ha.draining(),
            rejected_revision: self.last_rejected.as_ref().map(|r| r.revision),
        });
        Status {
            firewall: Default::default(),
            ha: self.ha.status(),
            gateway_id: self.gateway_id.clone(),
            name: self.settings.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            interface: self.settings.interface.clone(),
            backend: self.settings.backend_name.clone(),
            held_revision: self.held.as_ref().map_or(0, |h| h.revision),
            applied_revision: self.applied_revision,
            apply_error: self.steps.summary(),
            failed_steps: self.steps.reasons(),
            apply_retry: self.retry.status(mono),
            last_rejected: self.last_rejected.clone(),
            core: self.core.clone(),
            desired_peers: self.counts.desired_peers,
            kernel_peers: self.counts.kernel_peers,
            last_read_unix_ms: self.last_read.map(|(_, wall)| unix_ms(wall)),
            timers: self.timers.stats.clone(),
            last_reconcile_ops: self.counts.last_reconcile_ops,
            last_reconcile_unix_ms: self.counts.last_reconcile.map(unix_ms),
            drift_repairs: self.counts.drift_repairs,
            drift: self.counts.drift.clone(),
            stats: self.counts.stats.clone(),
            location: self
                .held
                .as_ref()
                .map(|h| h.valid.name.clone())
                .unwrap_or_default(),
            mfa_threshold_secs: self.mfa_policy().threshold().map(|d| d.as_secs()),
            mfa_removals: self.counts.mfa_removals,
            pending_events: self.pending.len(),
            device_writes: 0,
            link_writes: 0,
            backend_error: self.backend_error.clone(),
            state_error: self.state_error.clone(),
            offline_removed: self.offline_removed,
            ready,
            ready_reason,
            published_unix_ms: unix_ms(wall),
            stale_after_ms: (2 * self
                .settings
                .stats_interval
                .max(self.settings.resync_interval)
                + Duration::from_secs(10))
            .as_millis() as u64,
        }
    }

    /// `/diff`: a fresh read, compared with what is wanted.
    pub(super) fn diff(&mut self) {
        let held_revision = self.held.as_ref().map_or(0, |h| h.revision);
        let Some(desired) = self.effective_desired() else {
            let report = DiffReport {
                held_revision,
                operations: vec![],
                error: Some("no location held yet".into()),
                read_unix_ms: Some(unix_ms(self.now.wall)),
            };
            return self.emit(Action::PublishDiff {
                report,
                policy: None,
                desired: None,
            });
        };
        self.read(
            "/diff",
            AfterRead::Diff {
                desired: Box::new(desired),
            },
        );
    }

    pub(super) fn diff_read(&mut self, read: Result<(), String>, desired: Desired) {
        let held_revision = self.held.as_ref().map_or(0, |h| h.revision);
        let read_unix_ms = Some(unix_ms(self.now.wall));
        let report = match (read, &self.model) {
            (Ok(()), Some(observed)) => DiffReport {
                held_revision,
                operations: plan(&desired, observed)
                    .steps
                    .iter()
                    .map(|s| {
                        let reasons: Vec<String> = s.why().map(|r| r.to_string()).collect();
                        reasons.join("; ")
                    })
                    .collect(),
                error: None,
                read_unix_ms,
            },
            (Err(e), _) => DiffReport {
                held_revision,
                operations: vec![],
                error: Some(e),
                read_unix_ms,
            },
            (Ok(()), None) => DiffReport {
                held_revision,
                operations: vec![],
                error: Some("the interface is unknown".into()),
                read_unix_ms,
            },
        };
        let policy = held::firewall_policy(self.held.as_ref());
        self.emit(Action::PublishDiff {
            report,
            policy,
            desired: Some(Box::new(desired)),
        });
    }
}
