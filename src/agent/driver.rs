//! The machine's executor: runs each [`Action`] against the backend, the state store, the
//! firewall kernel, the source routes, the hooks, the Core stream and the watch channels,
//! and feeds the outcome back. It decides nothing.

use std::sync::Arc;
use std::time::SystemTime;

use gatehouse_proto::v1;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::client::{queue_report, FromCore, Outgoing};
use super::firewall::FirewallStep;
use super::machine::{Action, AppendError, Machine, Now, Outcome, SendMode};
use super::peers::PeerTable;
use super::status::Status;
use super::steps::execute_phases;
use crate::backend::Backend;
use crate::ha::source::SourceRoutes;
use crate::hooks::Hooks;
use crate::http::DiffReport;
use crate::metrics::ApplyMetrics;
use crate::state::StateStore;
use crate::stats::Report;

/// Everything the machine's actions touch.
pub(super) struct Driver {
    pub(super) backend: Box<dyn Backend>,
    pub(super) store: StateStore,
    pub(super) firewall: FirewallStep,
    /// Some when floating addresses are configured.
    pub(super) routes: Option<SourceRoutes>,
    pub(super) hooks: Hooks,
    pub(super) interface: String,
    /// The current stream's sender; dropping it ends the stream (the client reconnects).
    pub(super) outbound: Option<mpsc::Sender<Outgoing>>,
    /// Held by the stats report on its way on this stream (a new one per stream).
    pub(super) report_held: Arc<()>,
    pub(super) status_tx: Option<watch::Sender<Status>>,
    /// The newest status, published at the end of the loop's turn (a turn is one input or
    /// one batch of Core messages: no half-done batch is shown).
    pub(super) unpublished: Option<Box<Status>>,
    pub(super) diff_tx: Option<watch::Sender<DiffReport>>,
    pub(super) peers_tx: Option<watch::Sender<Arc<PeerTable>>>,
    /// Each apply's duration and operations (shared with the HTTP server).
    pub(super) apply_metrics: ApplyMetrics,
    pub(super) origin: Instant,
}

impl Driver {
    pub(super) fn now(&self) -> Now {
        Now {
            mono: self.origin.elapsed(),
            wall: SystemTime::now(),
        }
    }

    /// Executes the machine's actions until it has none, feeding each outcome back.
    pub(super) async fn drain(&mut self, machine: &mut Machine) {
        while let Some(action) = machine.poll_action() {
            if let Some(outcome) = self.execute(action, machine).await {
                machine.handle_outcome(outcome, self.now());
            }
        }
    }

    /// One event from the connection task. Anything but a message ends the batch first:
    /// the Core sees what is applied.
    pub(super) async fn core_event(&mut self, machine: &mut Machine, event: FromCore) {
        let event = match event {
            FromCore::Message(msg) => {
                machine.handle_core_message(msg, self.now());
                return self.drain(machine).await;
            }
            other => other,
        };
        machine.handle_core_batch_end(self.now());
        self.drain(machine).await;
        match event {
            FromCore::HelloWanted(reply) => {
                let _ = reply.send(machine.handle_hello_wanted(self.now()));
            }
            FromCore::Connected { outbound } => {
                self.outbound = Some(outbound);
                self.report_held = Arc::new(());
                machine.handle_connected(self.now());
            }
            FromCore::Disconnected {
                error,
                unauthenticated: _,
                retry_in,
                retry_ceiling,
            } => {
                self.outbound = None;
                machine.handle_disconnected(error, retry_in, retry_ceiling, self.now());
            }
            FromCore::Message(_) => {}
        }
        self.drain(machine).await;
    }

    /// Executes one action; `machine` is read (never changed) for what the action names
    /// from it (the state to save).
    async fn execute(&mut self, action: Action, machine: &Machine) -> Option<Outcome> {
        let text = |e: &dyn std::fmt::Display| e.to_string();
        Some(match action {
            Action::RunHook(hook) => {
                let _ = self.hooks.run(hook).await;
                return None;
            }
            Action::CheckBackend => {
                Outcome::BackendChecked(self.backend.check().map_err(|e| text(&e)))
            }
            Action::Read { mut into, .. } => {
                let read = self.backend.observe_into(into.model());
                Outcome::Read(into, read.map_err(|e| text(&e)))
            }
            Action::Apply { trigger, plan } => {
                let (operations, started) = (plan.len(), Instant::now());
                let (executed, outcomes) = execute_phases(self.backend.as_mut(), plan, &trigger);
                self.apply_metrics.observe(started.elapsed(), operations);
                Outcome::Applied {
                    applied: executed.applied,
                    outcomes,
                }
            }
            Action::Firewall {
                trigger,
                policy,
                desired,
            } => Outcome::Firewall(
                self.firewall
                    .run(&trigger, policy.as_ref(), &desired)
                    .map_err(|e| text(&e)),
            ),
            Action::FirewallOff { trigger } => {
                self.firewall.run_off(&trigger);
                Outcome::Firewall(Ok(()))
            }
            Action::FirewallPeers { trigger, change } => Outcome::Firewall(
                self.firewall
                    .run_peers(&trigger, &change)
                    .map_err(|e| text(&e)),
            ),
            Action::Save => Outcome::Saved(
                self.store
                    .save(&machine.state_to_save())
                    .map_err(|e| text(&e)),
            ),
            Action::Append(records) => Outcome::Appended(if self.store.should_compact() {
                Err(AppendError::Compact)
            } else {
                self.store
                    .append(&records)
                    .map_err(|e| AppendError::Failed(text(&e)))
            }),
            Action::Send { messages, mode } => Outcome::Sent(self.send(messages, &mode)),
            Action::SendStats(report) => match self.send_stats(report) {
                Ok(()) => Outcome::Sent(1),
                Err(report) => Outcome::StatsRefused(*report),
            },
            Action::Kick(batch) => Outcome::Kicked(self.backend.kick(&batch).map_err(|e| text(&e))),
            Action::InstallSourceRoutes { vips, endpoints } => {
                Outcome::RoutesInstalled(match self.routes.as_mut() {
                    Some(r) => r.install(&vips, &endpoints).map_err(|e| text(&e)),
                    None => Ok(0),
                })
            }
            Action::ClearSourceRoutes => Outcome::RoutesCleared(match self.routes.as_mut() {
                Some(r) => r.clear().map_err(|e| text(&e)),
                None => Ok(()),
            }),
            Action::Publish(status) => {
                self.unpublished = Some(status);
                return None;
            }
            Action::PublishDiff {
                mut report,
                policy,
                desired,
            } => {
                if let (Some(desired), None) = (desired, &report.error) {
                    let lines = self.firewall.diff(policy.as_ref(), &desired);
                    report.operations.extend(lines);
                }
                if let Some(tx) = &self.diff_tx {
                    tx.send_replace(report);
                }
                return None;
            }
            Action::PublishPeers(table) => {
                if let Some(tx) = &self.peers_tx {
                    tx.send_replace(Arc::new(*table));
                }
                return None;
            }
            Action::RemoveInterface => {
                match self.backend.remove() {
                    Ok(()) => {
                        info!(interface = %self.interface, "interface removed (remove_on_shutdown)")
                    }
                    Err(e) => error!(error = %e, "could not remove the interface"),
                }
                return None;
            }
        })
    }

    /// Publishes the newest status, with the firewall's state and the backend's counters.
    pub(super) fn publish(&mut self) {
        let (Some(tx), Some(mut status)) = (&self.status_tx, self.unpublished.take()) else {
            return;
        };
        status.firewall = self.firewall.status().clone();
        let counters = self.backend.counters();
        status.device_writes = counters.device_writes;
        status.link_writes = counters.link_writes;
        tx.send_replace(*status);
    }

    /// Queues messages in order, stopping at the first that cannot be queued; how many
    /// went. Stats are skipped when the Core is not keeping up (rather than queue megabytes
    /// of them); a lost must-send gives the stream up.
    fn send(&mut self, messages: Vec<v1::GatewayMessage>, mode: &SendMode) -> usize {
        let Some(tx) = &self.outbound else {
            return 0;
        };
        let mut queued = 0;
        for message in messages {
            if let Err(e) = tx.try_send(Outgoing::Message(message)) {
                warn!(error = %e, "cannot queue a message to the Core");
                break;
            }
            queued += 1;
        }
        if *mode == SendMode::Must && queued == 0 {
            // Dropping the only sender ends the request stream; the connection task sees
            // the stream end and reconnects.
            self.outbound = None;
        }
        queued
    }

    /// Queues a stats report, or gives it back (see [`queue_report`]).
    fn send_stats(&mut self, report: Report) -> Result<(), Box<Report>> {
        let Some(tx) = &self.outbound else {
            return Err(Box::new(report));
        };
        queue_report(tx, &self.report_held, report)
    }
}
