//! Plan, apply and the model of the interface; the timers' ticks (one shared read), MFA
//! expiry (events saved before the removal) and the offline policy.
//!
//! A change is planned against the machine's model (its `model` field) without reading the
//! interface; the model is the last read with every successful apply simulated on it, and
//! becomes unknown after an apply that failed. The resync, the stats and MFA ticks, `/diff`,
//! a takeover and the start read the interface, which repairs drift made by hand.

use std::collections::BTreeMap;

use gatehouse_proto::v1;
use tracing::{debug, error, info, warn};

use super::{held, Action, Job, Machine, Now, Outcome, ReadInto, SendMode};
use crate::agent::status::unix_ms;
use crate::agent::steps::{nothing_failed, ApplyStep};
use crate::mfa::{MfaPolicy, MfaTracker, PeerSample, Session};
use crate::model::{Desired, Key};
use crate::plan::{plan, Op, Plan, PlanSummary};
use crate::state::{Buried, PendingEvent, Record};

/// Above this many operations, a plan's steps are logged at DEBUG and summarized at INFO.
const LOG_EACH_STEP_UP_TO: usize = 100;

/// What follows a reconcile, given its result.
#[derive(Debug)]
pub(super) enum Then {
    Nothing,
    /// The state file's revision restored at start.
    Start {
        revision: u64,
    },
    /// A revision from the Core: `Applied` follows.
    ApplyHeld {
        revision: u64,
    },
    /// The periodic resync; `in_sync`: the held revision was applied before it.
    Resync {
        in_sync: bool,
    },
    /// MFA removals: their events go to the Core.
    MfaRemoval,
    /// The removals of a rejected revision.
    RejectedRemovals {
        revision: u64,
    },
    /// The retry of a failed reconcile (`retry.rs`).
    Retry,
}

/// What a read is for.
#[derive(Debug)]
pub(super) enum AfterRead {
    Reconcile {
        trigger: String,
        save_first: bool,
        then: Then,
    },
    Tick {
        mfa: bool,
        stats: bool,
        resync: bool,
    },
    Takeover {
        reason: String,
    },
    Diff {
        desired: Box<Desired>,
    },
}

/// A planned apply waiting for its save or its outcome.
#[derive(Debug)]
pub(super) struct ApplyCtx {
    trigger: String,
    plan: Plan,
    /// The effective desired state, for the firewall, when the plan needed a copy (MFA
    /// tombstones or the offline policy took peers out); else built after the apply, when
    /// the firewall step needs it.
    desired: Option<Desired>,
    /// A scoped change: its peers and their allowed IPs before the apply (the firewall
    /// step takes the difference).
    touched: Option<super::scope::Touched>,
    /// A full plan: the firewall step runs (a scoped change may skip it).
    full: bool,
    summary: PlanSummary,
    then: Then,
}

/// What the machine waits for.
#[derive(Debug)]
pub(super) enum Wait {
    BackendCheck,
    RoutesCleared,
    Saved,
    Read(AfterRead),
    /// The revision is written before the apply.
    SavedThenApply(Box<ApplyCtx>),
    /// The revision is written before the reconcile (the model is unknown: read first).
    SavedThen(Box<Job>),
    Apply(Box<ApplyCtx>),
    Firewall {
        then: Then,
        read_error: Option<String>,
        summary: PlanSummary,
        /// The firewall is off in the settings.
        firewall_off: bool,
    },
    /// MFA events on disk before their removal.
    MfaSaved {
        rollback: Rollback,
        count: usize,
    },
    Sent(SendMode),
    Kicked {
        count: usize,
        recreated: Vec<Key>,
    },
    RoutesInstalled(Box<super::ha::Round>),
}

/// The machine's state before MFA events were made, to take them back.
#[derive(Debug)]
pub(super) struct Rollback {
    pending: usize,
    next_seq: u64,
    tombstones: crate::mfa::Tombstones,
}

impl Machine {
    /// Feeds an outcome to what waited for it.
    pub(super) fn resume(&mut self, wait: Wait, outcome: Outcome) {
        let (wait, outcome) = match outcome {
            Outcome::Saved(_) | Outcome::Appended(_) => match self.written(wait, outcome) {
                Some(resumed) => resumed,
                // A refused append: the full save runs, the work waits for it.
                None => return,
            },
            outcome => (wait, outcome),
        };
        match (wait, outcome) {
            (Wait::BackendCheck, Outcome::BackendChecked(result)) => match result {
                // Health is cleared by the next successful read of the interface.
                Ok(Some(repair)) => warn!(%repair, "backend repaired itself"),
                Ok(None) => {}
                Err(e) => {
                    error!(error = %e, "backend unhealthy");
                    self.backend_error = Some(e);
                }
            },
            (Wait::RoutesCleared, Outcome::RoutesCleared(result)) => {
                if let Err(e) = result {
                    self.ha.failed("clearing source routes", e);
                }
            }
            (Wait::Saved, Outcome::Saved(result)) => self.saved(result),
            (Wait::SavedThenApply(ctx), Outcome::Saved(result)) => {
                self.saved(result);
                self.apply(*ctx);
            }
            (Wait::SavedThen(job), Outcome::Saved(result)) => {
                self.saved(result);
                self.spawn(*job);
            }
            (Wait::Read(after), Outcome::Read(into, result)) => {
                self.after_read(after, into, result)
            }
            (Wait::Apply(ctx), Outcome::Applied { applied, outcomes }) => {
                let failed = outcomes.values().any(Result::is_err);
                self.steps.record_all(outcomes);
                self.account(&applied);
                match (&mut self.model, failed) {
                    (Some(model), false) => {
                        model.apply(&applied);
                        // An updated peer that now matches the location is held once.
                        if let Some(held) = &self.held {
                            let updated = applied.steps.iter().filter_map(|s| match &s.op {
                                Op::UpdatePeer(u) => Some(&u.public_key),
                                _ => None,
                            });
                            model.share(&held.valid.desired, updated);
                        }
                    }
                    // After a failed step the interface is unknown: the next change reads it.
                    _ => self.model = None,
                }
                if let Some(model) = &self.model {
                    self.counts.kernel_peers = model.device.peers.len();
                }
                // The applied operations (a copy of every peer after a cold apply) go
                // before the firewall step builds its desired state.
                drop(applied);
                self.firewall_after(*ctx);
            }
            (
                Wait::Firewall {
                    then,
                    read_error,
                    summary,
                    firewall_off,
                },
                Outcome::Firewall(result),
            ) => {
                self.firewall_idle = firewall_off && result.is_ok();
                self.steps.record(ApplyStep::Firewall, result);
                // Peers refused for the backend's limit fail alike at every attempt.
                let read_failed = read_error.is_some();
                let retry = read_failed || self.steps.retryable();
                let result = match (read_error, self.steps.summary()) {
                    (Some(e), _) => Err(format!("cannot read the interface: {e}")),
                    (None, Some(failed)) => Err(failed),
                    (None, None) => Ok(summary),
                };
                self.reconciled(
                    result.as_ref().err().filter(|_| retry).cloned(),
                    read_failed,
                );
                self.finish(then, result);
            }
            (Wait::MfaSaved { rollback, count }, Outcome::Saved(result)) => match result {
                Ok(()) => {
                    self.state_error = None;
                    self.counts.mfa_removals += count as u64;
                    self.spawn(Job::Reconcile {
                        trigger: "MFA inactivity".into(),
                        read: false,
                        save_first: false,
                        then: Then::MfaRemoval,
                    });
                }
                Err(e) => {
                    error!(error = %e, "cannot write the state file: MFA removal postponed");
                    self.state_error = Some(e);
                    self.tombstones = rollback.tombstones;
                    self.pending.truncate(rollback.pending);
                    self.next_seq = rollback.next_seq;
                }
            },
            (Wait::Sent(mode), Outcome::Sent(queued)) => self.sent(mode, queued),
            (Wait::Sent(SendMode::Stats), Outcome::StatsRefused(report)) => {
                self.stats_refused(report)
            }
            (Wait::Kicked { count, recreated }, Outcome::Kicked(result)) => {
                self.kicked(count, recreated, result)
            }
            (Wait::RoutesInstalled(round), Outcome::RoutesInstalled(result)) => {
                self.routes_installed(*round, result)
            }
            (wait, outcome) => {
                error!(
                    ?wait,
                    ?outcome,
                    "an outcome that does not answer the action asked for"
                );
            }
        }
    }

    fn saved(&mut self, result: Result<(), String>) {
        match result {
            Ok(()) => self.state_error = None,
            Err(e) => {
                error!(error = %e, "cannot write the state file");
                self.state_error = Some(e);
            }
        }
    }

    // ------------------------------------------------------------------ reads --

    /// A read of the interface (made into the lent model): the health, the MFA timers,
    /// the HA book and the model.
    fn on_read(&mut self, into: ReadInto, result: Result<(), String>) -> Result<(), String> {
        self.model = into.give_back(result.is_ok());
        if let Err(e) = result {
            self.backend_error = Some(e.clone());
            return Err(e);
        }
        let Some(model) = &self.model else {
            return Ok(());
        };
        let Now { mono, wall } = self.now;
        self.backend_error = None;
        self.last_read = Some((mono, wall));
        let peers = &model.device.peers;
        self.counts.kernel_peers = peers.len();
        // A held location without MFA keeps no inactivity timers: they would only take
        // room (about 136 bytes a peer). When MFA is turned on, each peer's timer starts at
        // the first read after, as for a peer just added. With no location held (its state
        // lost), the timers restored from the state file keep counting.
        let without_mfa = self
            .held
            .as_ref()
            .is_some_and(|h| h.valid.mfa.threshold().is_none());
        if !without_mfa {
            self.mfa.observe(
                peers.iter().map(|(k, p)| (*k, PeerSample::from(p))),
                mono,
                wall,
            );
        } else if !self.mfa.is_empty() {
            self.mfa = MfaTracker::new();
        }
        self.ha.book.observe_here(peers, wall);
        self.publish_peers();
        Ok(())
    }

    /// After a read: the agent's per-peer totals folded, and the peer table published
    /// (without rows above `peer_metrics_limit`, and then no totals kept).
    fn publish_peers(&mut self) {
        let Some(model) = &self.model else {
            return;
        };
        let limit = self.settings.peer_metrics_limit;
        if model.device.peers.len() <= limit {
            let wanted = self.held.as_ref().map(|h| &h.valid.desired.peers);
            self.peer_totals.fold(model, &self.epochs, |k| {
                wanted.is_some_and(|w| w.contains_key(k))
            });
        } else if !self.peer_totals.is_empty() {
            self.peer_totals = Default::default();
        }
        let location = self.held.as_ref().map_or("", |h| h.valid.name.as_str());
        let table = crate::agent::peers::PeerTable::of(
            model,
            location,
            &self.peer_totals,
            limit,
            unix_ms(self.now.wall),
        );
        self.emit(Action::PublishPeers(Box::new(table)));
    }

    fn after_read(&mut self, after: AfterRead, into: ReadInto, result: Result<(), String>) {
        let read = self.on_read(into, result);
        match after {
            AfterRead::Reconcile {
                trigger,
                save_first,
                then,
            } => match read {
                Ok(()) => self.plan_and_apply(trigger, save_first, then),
                // The firewall does not depend on the WireGuard device being readable (its
                // step builds the desired state it needs).
                Err(e) if self.held.is_some() => {
                    self.firewall(trigger, None, None, then, Some(e), PlanSummary::default())
                }
                Err(e) => self.finish(then, Err(e)),
            },
            AfterRead::Tick { mfa, stats, resync } => {
                match &read {
                    Ok(()) => {
                        if mfa || stats {
                            self.spawn(Job::ExpireMfa);
                        }
                        if stats {
                            // The delta is taken from this read now (the MFA expiry
                            // before the send may change the model): the changed peers'
                            // counters, not a copy of the whole interface.
                            let changed = self.stats_changed();
                            self.spawn(Job::SendStats(changed));
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot read the interface"),
                }
                if resync {
                    let in_sync =
                        self.held.as_ref().map(|h| h.revision) == Some(self.applied_revision);
                    self.spawn(Job::Reconcile {
                        trigger: "periodic resync".into(),
                        // A read that failed is tried again by the resync itself.
                        read: read.is_err(),
                        save_first: false,
                        then: Then::Resync { in_sync },
                    });
                }
            }
            AfterRead::Takeover { reason } => {
                if let Err(e) = read {
                    // Without a read, own handshakes are unknown: no re-creation, relayed
                    // activity still tells whom to kick.
                    self.ha
                        .failed("reading the interface for the takeover", e.to_string());
                }
                self.plan_round(&reason);
            }
            AfterRead::Diff { desired } => self.diff_read(read, *desired),
        }
    }

    // ------------------------------------------------------------------ ticks --

    /// The due timers share one read: MFA expiry, the stats report, the resync (with the
    /// backend's check before it); the offline policy decides first.
    pub(super) fn tick(&mut self, mfa: bool, stats: bool, resync: bool) {
        if resync {
            self.spawn(Job::Act(Action::CheckBackend));
        }
        self.spawn(Job::OfflinePolicy);
        self.spawn(Job::TickRead { mfa, stats, resync });
    }

    pub(super) fn tick_read(&mut self, mfa: bool, stats: bool, resync: bool) {
        let trigger = if resync {
            "periodic resync"
        } else if stats {
            "stats interval"
        } else {
            "mfa deadline"
        };
        self.read(trigger, AfterRead::Tick { mfa, stats, resync });
    }

    pub(super) fn start(&mut self) {
        if std::mem::take(&mut self.compact_at_start) {
            // The journal replayed at restore is folded into a new base.
            self.spawn(Job::Save);
        }
        let Some(revision) = self.held.as_ref().map(|h| h.revision) else {
            return;
        };
        // A start long after the Core went away: the offline policy decides before any
        // peer is restored, so removed peers are not briefly re-added.
        self.check_offline_policy();
        self.spawn(Job::Reconcile {
            trigger: "start: restore from state file".into(),
            read: true,
            save_first: false,
            then: Then::Start { revision },
        });
    }

    pub(super) fn check_offline_policy(&mut self) {
        let Some(limit) = self.settings.offline_remove_after else {
            return;
        };
        if self.stream_up || self.offline_removed {
            return;
        }
        let offline = self.offline.offline_for(self.now.mono);
        if offline > limit {
            warn!(
                offline_secs = offline.as_secs(),
                limit_secs = limit.as_secs(),
                "offline policy: the Core has been unreachable too long; removing peers"
            );
            self.offline_removed = true;
            self.spawn(Job::Reconcile {
                trigger: "offline policy".into(),
                read: false,
                save_first: false,
                then: Then::Nothing,
            });
        }
    }

    // ------------------------------------------------------------------ reconcile --

    /// The desired state after local decisions: MFA removals and the offline policy.
    pub(super) fn effective_desired(&mut self) -> Option<Desired> {
        let held = self.held.as_ref()?;
        let mut desired = held.valid.desired.clone();
        if !self.tombstones.is_empty() {
            let sessions: BTreeMap<Key, u64> = held
                .valid
                .meta
                .iter()
                .map(|(k, m)| (*k, m.mfa_session))
                .collect();
            self.tombstones.filter(&mut desired, &sessions);
        }
        if self.offline_removed {
            desired.peers.clear();
        }
        self.counts.desired_peers = desired.peers.len();
        Some(desired)
    }

    /// Whether the desired state differs from the held location's: MFA tombstones or the
    /// offline policy take peers out (a full plan needs its own copy only then).
    fn desired_filtered(&self) -> bool {
        !self.tombstones.is_empty() || self.offline_removed
    }

    /// The desired state for the firewall step after an apply: the plan's copy, or for a
    /// full plan that planned on the held location itself, a copy made now (the plan's
    /// operations are gone by then); None for a scoped change.
    fn firewall_desired(&mut self, desired: Option<Desired>, full: bool) -> Option<Desired> {
        match (desired, full) {
            // Off in the settings: the step reads no desired state.
            _ if !self.settings.firewall.enabled => None,
            (Some(desired), _) => Some(desired),
            (None, true) => self.effective_desired(),
            (None, false) => None,
        }
    }

    pub(super) fn mfa_policy(&self) -> MfaPolicy {
        self.held
            .as_ref()
            .map_or(MfaPolicy::Disabled, |h| h.valid.mfa)
    }

    /// Plan and apply: against the model when it is known and `read` is false, else after
    /// a read. With `save_first` the state is written before anything is applied.
    pub(super) fn reconcile(&mut self, trigger: String, read: bool, save_first: bool, then: Then) {
        if self.held.is_none() {
            return self.finish(then, Ok(PlanSummary::default()));
        }
        if !read && self.model.is_some() {
            return self.plan_and_apply(trigger, save_first, then);
        }
        if save_first {
            // On disk before the kernel changes, also when the read then fails.
            let job = Job::Reconcile {
                trigger,
                read,
                save_first: false,
                then,
            };
            return self.write(Vec::new(), Wait::SavedThen(Box::new(job)));
        }
        self.read(
            "reconcile",
            AfterRead::Reconcile {
                trigger,
                save_first,
                then,
            },
        );
    }

    fn plan_and_apply(&mut self, trigger: String, save_first: bool, then: Then) {
        let (plan, desired, touched, full) = match self.take_scope(&then) {
            // A change reached by deltas: only the peers they name.
            Some(keys) => match self.plan_scoped(&keys) {
                Some(plan) => {
                    let touched = self.touched_before(keys);
                    (plan, None, touched, false)
                }
                None => return self.finish(then, Err("the interface is unknown".into())),
            },
            None => {
                // Planned on the held location itself unless peers are filtered out: no
                // copy of every peer beside the plan's own.
                let filtered = match self.desired_filtered() {
                    true => self.effective_desired(),
                    false => None,
                };
                let Some(held) = &self.held else {
                    return self.finish(then, Ok(PlanSummary::default()));
                };
                let Some(model) = &self.model else {
                    return self.finish(then, Err("the interface is unknown".into()));
                };
                let desired = filtered.as_ref().unwrap_or(&held.valid.desired);
                self.counts.desired_peers = desired.peers.len();
                // Peers beyond the backend's limit are refused, the rest applied.
                let (plan, refused) = {
                    let fitted = crate::peer_limit::fit(desired, model, self.peer_limit);
                    (plan(&fitted.desired, model), fitted.refused)
                };
                self.refused_last = refused.is_some();
                self.steps.record_peer_limit(refused.as_ref());
                (plan, filtered, None, true)
            }
        };
        self.counts.last_reconcile = Some(self.now.wall);
        self.counts.last_reconcile_ops = plan.len();
        let summary = plan.summary();
        // The plan a failing reconcile tries again is logged once, not at every attempt.
        let again = self.retry.failing() && matches!(then, Then::Retry | Then::Resync { .. });
        if plan.is_empty() {
            debug!(trigger, "reconcile: the interface matches");
        } else {
            log_plan(&trigger, &plan, summary, again);
        }
        // Added peers get their counter epoch now, so the save before the apply has it.
        let mut started = BTreeMap::new();
        for step in &plan.steps {
            if let Op::AddPeer(spec) = &step.op {
                let epoch = self.epochs.start(spec.public_key, &mut self.rng);
                started.insert(spec.public_key, epoch);
            }
        }
        self.epochs.started(started.len());
        let ctx = ApplyCtx {
            trigger,
            plan,
            desired,
            touched,
            full,
            summary,
            then,
        };
        if save_first {
            let records = if started.is_empty() {
                vec![]
            } else {
                vec![Record::Epochs { started }]
            };
            self.write(records, Wait::SavedThenApply(Box::new(ctx)));
        } else {
            self.apply(ctx);
        }
    }

    fn apply(&mut self, mut ctx: ApplyCtx) {
        if ctx.plan.is_empty() {
            // An empty plan still "runs": it clears the errors of steps that have nothing
            // left to do (the interface was repaired some other way).
            self.steps.record_all(nothing_failed());
            return self.firewall_after(ctx);
        }
        let plan = std::mem::take(&mut ctx.plan);
        let trigger = ctx.trigger.clone();
        self.request(Action::Apply { trigger, plan }, Wait::Apply(Box::new(ctx)));
    }

    /// The firewall step that follows the peer steps of `ctx` (its plan applied or empty).
    fn firewall_after(&mut self, ctx: ApplyCtx) {
        let desired = self.firewall_desired(ctx.desired, ctx.full);
        self.firewall(
            ctx.trigger,
            desired,
            ctx.touched,
            ctx.then,
            None,
            ctx.summary,
        );
    }

    /// The firewall step, after the peer steps (a failing firewall never holds back a
    /// removal): recorded like them, so it is reported and retried the same way. A scoped
    /// change whose apply succeeded (`touched`, the model known) moves the firewall's VPN
    /// addresses by its peers' difference; anything else brings the whole table in line.
    fn firewall(
        &mut self,
        trigger: String,
        desired: Option<Desired>,
        touched: Option<super::scope::Touched>,
        then: Then,
        read_error: Option<String>,
        summary: PlanSummary,
    ) {
        let policy = held::firewall_policy(self.held.as_ref());
        let wait = Wait::Firewall {
            then,
            read_error,
            summary,
            firewall_off: !self.settings.firewall.enabled,
        };
        if self.firewall_done_while_off() {
            // The firewall is off and its clean-up ran: nothing to do.
            return self.resume(wait, Outcome::Firewall(Ok(())));
        }
        if !self.settings.firewall.enabled {
            return self.request(Action::FirewallOff { trigger }, wait);
        }
        if let (None, Some(change)) = (&desired, touched.and_then(|t| self.vpn_change(t))) {
            return self.request(Action::FirewallPeers { trigger, change }, wait);
        }
        let Some(desired) = desired.or_else(|| self.effective_desired()) else {
            return self.resume(wait, Outcome::Firewall(Ok(())));
        };
        self.request(
            Action::Firewall {
                trigger,
                policy,
                desired: Box::new(desired),
            },
            wait,
        );
    }

    fn finish(&mut self, then: Then, result: Result<PlanSummary, String>) {
        match then {
            Then::Nothing => {}
            Then::Start { revision } => match result {
                Ok(_) => {
                    self.applied_revision = revision;
                    self.spawn(Job::PostUp);
                }
                Err(e) => error!(error = %e, "could not restore the interface from the state file"),
            },
            Then::ApplyHeld { revision } => match result {
                Ok(_) => {
                    self.applied_revision = revision;
                    self.send_applied(revision, None);
                    self.spawn(Job::PostUp);
                }
                Err(e) => {
                    let error = self.steps.to_apply_error().unwrap_or(v1::ApplyError {
                        kind: v1::ApplyErrorKind::Backend as i32,
                        message: e,
                        rejected: vec![],
                    });
                    self.send_applied(revision, Some(error));
                }
            },
            Then::Resync { in_sync } => {
                match result {
                    Ok(summary) => {
                        if summary != PlanSummary::default() && in_sync {
                            self.counts.drift_repairs += 1;
                            self.counts.drift.add(&summary);
                            warn!(%summary, "drift repaired: the interface had been changed outside gatehouse");
                        }
                        self.mark_applied();
                    }
                    Err(e) => debug!(error = %e, "resync not complete"),
                }
                self.spawn(Job::Save);
            }
            Then::MfaRemoval => self.spawn(Job::SendPendingEvents),
            Then::RejectedRemovals { revision } => {
                if let Err(e) = result {
                    warn!(revision, error = %e, "removals of a rejected revision not complete; retried with backoff");
                }
            }
            // Failing again: `reconciled` scheduled the next attempt.
            Then::Retry => {
                if result.is_ok() {
                    self.mark_applied();
                }
            }
        }
    }

    /// After a successful resync: the held revision is what the kernel has.
    fn mark_applied(&mut self) {
        let Some(rev) = self.held.as_ref().map(|h| h.revision) else {
            return;
        };
        if rev != self.applied_revision {
            self.applied_revision = rev;
            self.send_applied(rev, None);
        }
        self.spawn(Job::PostUp);
    }

    /// Bookkeeping after an apply: trackers of removed peers.
    fn account(&mut self, applied: &Plan) {
        for step in &applied.steps {
            if let Op::RemovePeer(key) = &step.op {
                self.epochs.remove(key);
                self.mfa.forget(key);
            }
        }
    }

    // ------------------------------------------------------------------ MFA --

    /// Expiry after a read (the model is that read): events numbered and saved, then the
    /// removal applied.
    pub(super) fn expire_mfa(&mut self) {
        let policy = self.mfa_policy();
        let (Some(held), Some(observed)) = (&self.held, &self.model) else {
            return;
        };
        let Now { mono, wall } = self.now;
        let (expired, moot): (Vec<_>, Vec<_>) =
            self.mfa.expired(policy, mono).into_iter().partition(|e| {
                // A buried peer still on the interface is a removal that failed to apply:
                // the reconcile retries it; it is not a new expiry (nor a new event).
                observed.device.peers.contains_key(&e.key)
                    && held.valid.desired.peers.contains_key(&e.key)
                    && !self.tombstones.contains(&e.key)
            });
        // Timers of peers that are not (or no longer) both desired and on the interface
        // cannot lead to a removal: dropped, so they do not hold the next deadline in the
        // past. A peer that comes back starts a new timer.
        for e in &moot {
            self.mfa.forget(&e.key);
        }
        if expired.is_empty() {
            return;
        }
        let at_ms = unix_ms(wall);
        let rollback = Rollback {
            pending: self.pending.len(),
            next_seq: self.next_seq,
            tombstones: self.tombstones.clone(),
        };
        for e in &expired {
            let meta = held.valid.meta.get(&e.key).copied().unwrap_or_default();
            let psk = held
                .valid
                .desired
                .peers
                .get(&e.key)
                .and_then(|p| p.preshared_key.clone());
            let seq = self.next_seq;
            self.next_seq += 1;
            let detail = e.detail();
            info!(peer = %e.key, seq, %detail, "MFA: removing inactive peer");
            self.pending.push(PendingEvent {
                seq,
                public_key: e.key,
                reason: v1::PeerEventReason::MfaInactive,
                last_handshake_ms: e.last_handshake.map(unix_ms).unwrap_or(0),
                at_ms,
                mfa_session: meta.mfa_session,
                peer_id: meta.id,
                detail,
            });
            self.tombstones
                .bury(e.key, Session::of(meta.mfa_session, psk.as_ref()), wall);
        }
        // The events are on disk before any peer is removed.
        let record = Record::Expired {
            events: self.pending[rollback.pending..].to_vec(),
            buried: expired
                .iter()
                .filter_map(|e| self.tombstones.get(&e.key).map(|t| Buried::new(e.key, t)))
                .collect(),
            next_seq: self.next_seq,
        };
        self.write(
            vec![record],
            Wait::MfaSaved {
                rollback,
                count: expired.len(),
            },
        );
    }
}

/// `quiet`: at DEBUG only (a plan tried again while it fails).
fn log_plan(trigger: &str, plan: &Plan, summary: PlanSummary, quiet: bool) {
    if quiet {
        return debug!(trigger, %summary, "applying plan again");
    }
    let each = plan.len() <= LOG_EACH_STEP_UP_TO;
    for step in &plan.steps {
        for r in step.why() {
            if each {
                info!(trigger, subject = %r.subject, field = r.field, old = %r.old, new = %r.new, "apply");
            } else {
                debug!(trigger, subject = %r.subject, field = r.field, old = %r.old, new = %r.new, "apply");
            }
        }
    }
    info!(trigger, %summary, "applying plan");
}
