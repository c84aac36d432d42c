//! The agent as a pure state machine (sans-IO, as quinn-proto's `Connection`): it owns
//! every piece of the agent's state (the held location, the applied revision, failed
//! steps, the MFA timers, tombstones, counter epochs, the stats baseline, pending events
//! and their numbering, the Core link, the offline clock, the HA role and round, counts,
//! timer statistics) and a model of the interface ([`crate::plan::KernelModel`], updated
//! by each successful apply, and lent to each read to be refreshed in place). It never
//! reads a clock, draws a random number from the system, sleeps, or touches a socket, file
//! or netlink: time comes in as [`Now`], randomness from a seed given at construction, and
//! everything it wants done comes out as an [`Action`]. The driver (`super::driver`, or a
//! test's virtual-time driver) executes the actions.
//!
//! # Calling contract
//! - Inputs are the `handle_*` methods, each with the time [`Now`] (monotonic since the
//!   driver's origin, and wall time). Time never goes back between calls.
//! - After any input, call [`Machine::poll_action`] until it returns `None`, executing each
//!   action in order. An action that has a result ([`Action::wants_result`]: a read, an
//!   apply, a save, a firewall run, a kick, a send, a backend check, source routes) must be
//!   executed and its [`Outcome`] fed to [`Machine::handle_outcome`] **before polling
//!   again**; until then `poll_action` returns `None` and no other input may be given.
//! - Then sleep until [`Machine::poll_timeout`] (or an input) and call
//!   [`Machine::handle_timeout`] when it is reached.
//! - Core messages of one batch go in with [`Machine::handle_core_message`]; the batch
//!   ends with [`Machine::handle_core_batch_end`], which applies what was accepted (one
//!   apply and one state save however many revisions arrived). Call it also before
//!   [`Machine::handle_hello_wanted`], [`Machine::handle_connected`] and
//!   [`Machine::handle_disconnected`]: the Core is told what is applied.
//!
//! # Ordering guarantees
//! - MFA removals: the events (and tombstones) are in a `Save` whose success is fed back
//!   before the `Apply` that removes the peers; a failed save postpones the removal and
//!   takes the events back (no event number is used twice, none is lost).
//! - Every `Apply` plan lists removals first (the driver executes it phase by phase,
//!   removals alone, [`super::steps::execute_phases`]); the firewall runs after the peers.
//! - A revision from the Core is saved before its `Apply`; `Applied` without an error is
//!   sent only after an apply whose every step succeeded.
//!
//! # Errors in outcomes
//! - A failed read: the health shows it; a change planned on the model goes on (the model
//!   keeps what the read changed before it failed, and every peer it did not reach), a
//!   tick does nothing more (the resync tries its own read).
//! - A failed apply step (or the read before an apply): recorded per step (reported in
//!   `Applied`, `/status`), the model becomes unknown after a peer step, so the next change
//!   reads the interface first; the reconcile runs again after a backoff (`retry.rs`), and at
//!   the resync.
//! - A failed save: shown in the status; for MFA removals, the removal is postponed.
//! - A send that could not be queued: a lost `Applied` or snapshot request gives the stream
//!   up (the driver drops it; the next stream starts with Hello and a snapshot); a lost
//!   event is sent again; lost stats are reported in full next time.
//!
//! # Layout
//! `mod.rs` (inputs, outputs, the job runner), `core.rs` (the Core protocol), `reconcile.rs`
//! (plan, apply, the model, ticks, MFA expiry, the offline policy), `ha.rs` (role and
//! takeover rounds), `report.rs` (status, diff, the state to save), `held.rs` (the held
//! location's encodings), `model.rs` (the model updated by an apply), `retry.rs` (the
//! backoff after a failed apply).
#![deny(clippy::disallowed_methods)]

mod core;
mod ha;
mod held;
mod model;
mod persist;
mod reconcile;
mod report;
mod retry;
mod scope;

use std::collections::{BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use gatehouse_proto::v1;
use rand::rngs::StdRng;
use rand::SeedableRng as _;
use tracing::{info, warn};

use super::offline::OfflineClock;
use super::status::{CoreStatus, Status};
use super::steps::{StepErrors, StepOutcomes};
use super::timers::{Periodic, Timer, Timers};
use super::Settings;
use crate::backend::{Kick, PeerLimit};
use crate::hooks::Hook;
use crate::http::DiffReport;
use crate::location::Held;
use crate::mfa::{MfaTracker, Tombstones};
use crate::model::Desired;
use crate::plan::Plan;
use crate::state::{first_event_seq, PendingEvent, PersistedState, Record, SavedState};
use crate::stats::{Epochs, Report, StatsTracker};

pub use self::ha::HaState;
pub use self::model::ReadInto;
use self::reconcile::{Then, Wait};

/// The time of an input: monotonic since the driver's origin, and the wall clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    pub mono: Duration,
    pub wall: SystemTime,
}

/// What the machine wants done.
#[derive(Debug)]
pub enum Action {
    RunHook(Hook),
    /// The backend's own health check and repair. Result: [`Outcome::BackendChecked`].
    CheckBackend,
    /// Read the whole interface into the lent model
    /// ([`crate::backend::Backend::observe_into`]). Result: [`Outcome::Read`].
    Read {
        trigger: &'static str,
        into: ReadInto,
    },
    /// Execute the plan phase by phase. Result: [`Outcome::Applied`].
    Apply {
        trigger: String,
        plan: Plan,
    },
    /// Bring the firewall in line. Result: [`Outcome::Firewall`].
    Firewall {
        trigger: String,
        policy: Option<v1::FirewallPolicy>,
        desired: Box<Desired>,
    },
    /// The firewall is off in the settings: the step only removes a table of the agent's
    /// left from before (once); no desired state is built for it. Result:
    /// [`Outcome::Firewall`].
    FirewallOff {
        trigger: String,
    },
    /// A change of peers alone, after a scoped apply: the firewall's VPN addresses move by
    /// `change`; the table's inputs are unchanged (no read, no write). Result:
    /// [`Outcome::Firewall`].
    FirewallPeers {
        trigger: String,
        change: crate::firewall::vpn::VpnChange,
    },
    /// Write the state file (and start a new journal) with [`Machine::state_to_save`], borrowed
    /// from the machine: it does not change until this action's outcome is fed back (see
    /// the calling contract), so the state is not copied to be saved. Result:
    /// [`Outcome::Saved`].
    Save,
    /// Append records to the state journal, unless it is due for compaction. Result:
    /// [`Outcome::Appended`].
    Append(Vec<Record>),
    /// Queue messages to the Core, in order, stopping at the first that cannot be queued.
    /// Result: [`Outcome::Sent`].
    Send {
        messages: Vec<v1::GatewayMessage>,
        mode: SendMode,
    },
    /// Queue a stats report to the Core; its messages are built as the stream takes them.
    /// Result: [`Outcome::Sent`] (1) if it was queued, else [`Outcome::StatsRefused`].
    SendStats(Report),
    /// Make the device send handshakes. Result: [`Outcome::Kicked`].
    Kick(Vec<Kick>),
    /// Result: [`Outcome::RoutesInstalled`].
    InstallSourceRoutes {
        vips: Vec<IpAddr>,
        endpoints: Vec<SocketAddr>,
    },
    /// Result: [`Outcome::RoutesCleared`].
    ClearSourceRoutes,
    /// The status (the driver fills in the firewall and the backend's write counters).
    Publish(Box<Status>),
    /// A `/diff` report (the driver appends the firewall's differences for `policy` and
    /// `desired` when given).
    PublishDiff {
        report: DiffReport,
        policy: Option<v1::FirewallPolicy>,
        desired: Option<Box<Desired>>,
    },
    /// The peers as the last read found them (`/metrics`, `/peers`).
    PublishPeers(Box<crate::agent::peers::PeerTable>),
    /// Delete the interface (`remove_on_shutdown`).
    RemoveInterface,
}

impl Action {
    /// Whether the driver must feed this action's [`Outcome`] back before polling again.
    pub fn wants_result(&self) -> bool {
        !matches!(
            self,
            Action::RunHook(_)
                | Action::Publish(_)
                | Action::PublishDiff { .. }
                | Action::PublishPeers(_)
                | Action::RemoveInterface
        )
    }
}

/// How a [`Action::Send`] is treated when not every message could be queued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendMode {
    /// Applied, SnapshotRequest: the stream is given up (the driver drops its sender).
    Must,
    /// Peer events with these seqs: the unsent ones go again later.
    Events(Vec<u64>),
    /// A stats report ([`Action::SendStats`]): the driver skips it when the Core is not
    /// keeping up (the last report still on its way, or the queue over half full); then
    /// everything is reported next time.
    Stats,
}

/// The result of an action.
#[derive(Debug)]
pub enum Outcome {
    BackendChecked(Result<Option<String>, String>),
    /// The lent model, given back, and whether the read succeeded.
    Read(ReadInto, Result<(), String>),
    Applied {
        /// The steps that were applied.
        applied: Plan,
        outcomes: StepOutcomes,
    },
    Firewall(Result<(), String>),
    Saved(Result<(), String>),
    /// The bytes appended.
    Appended(Result<u64, AppendError>),
    /// How many messages were queued (a prefix of those given).
    Sent(usize),
    /// The stats report was not queued: given back, unsent.
    StatsRefused(Report),
    Kicked(Result<(), String>),
    RoutesInstalled(Result<usize, String>),
    RoutesCleared(Result<(), String>),
}

/// Why an [`Action::Append`] was not done (the machine writes the full state instead).
#[derive(Debug)]
pub enum AppendError {
    /// The journal outgrew the base (`StateStore::should_compact`).
    Compact,
    Failed(String),
}

/// When the machine wants [`Machine::handle_timeout`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeout {
    /// Monotonic, since the driver's origin.
    pub at: Duration,
    /// A takeover round's next batch: served before any input.
    pub urgent: bool,
}

/// A unit of work; each may end in one action that wants a result, and spawn the work
/// that follows it.
#[derive(Debug)]
enum Job {
    Act(Action),
    /// A full save of the current state (built when the job runs).
    Save,
    /// A write of these records (see [`Machine::write`]).
    Write(Vec<Record>),
    Start,
    Tick {
        mfa: bool,
        stats: bool,
        resync: bool,
    },
    TickRead {
        mfa: bool,
        stats: bool,
        resync: bool,
    },
    OfflinePolicy,
    Reconcile {
        trigger: String,
        /// Read the interface even when the model is known (the resync).
        read: bool,
        /// Save the state before the apply (a new revision).
        save_first: bool,
        then: Then,
    },
    ExpireMfa,
    /// The peers whose counters changed since the last report (None: no stream up at the
    /// read, nothing taken from the tracker).
    SendStats(Option<Report>),
    SendPendingEvents,
    CoreMessage(Box<v1::CoreMessage>),
    FlushDeltas,
    ApplyHeld,
    Rejected {
        revision: u64,
        items: Vec<crate::validate::Rejection>,
        listed: Option<BTreeSet<crate::model::Key>>,
    },
    PostUp,
    HaInput(crate::ha::role::RoleInput),
    KickDue,
    AfterKick,
    Diff,
}

#[derive(Default)]
struct Counts {
    desired_peers: usize,
    kernel_peers: usize,
    last_reconcile_ops: usize,
    last_reconcile: Option<SystemTime>,
    drift_repairs: u64,
    /// The operations of those repairs, by kind.
    drift: super::status::DriftCounts,
    mfa_removals: u64,
    /// Stats reports queued and refused on the streams since start.
    stats: super::status::StatsCounts,
    /// The read the stats report on its way carries (set while one is awaited).
    stats_in_flight: Option<SystemTime>,
}

/// The agent's state and decisions (see the module doc for the calling contract).
pub struct Machine {
    settings: Settings,
    gateway_id: String,
    peer_limit: Option<PeerLimit>,
    now: Now,
    rng: StdRng,
    held: Option<Held>,
    applied_revision: u64,
    steps: StepErrors,
    backend_error: Option<String>,
    state_error: Option<String>,
    last_rejected: Option<super::status::Rejected>,
    mfa: MfaTracker,
    tombstones: Tombstones,
    epochs: Epochs,
    stats: StatsTracker,
    /// The agent's per-peer totals, kept while per-peer metrics are on.
    peer_totals: crate::agent::peers::PeerTotals,
    pending: Vec<PendingEvent>,
    next_seq: u64,
    /// Events up to this seq went out on the current stream (in Hello or after).
    sent_up_to: u64,
    snapshot_requested: bool,
    /// A stream to the Core is up (the driver holds its sender).
    stream_up: bool,
    core: CoreStatus,
    last_contact: Option<SystemTime>,
    offline: OfflineClock,
    offline_removed: bool,
    started_up: bool,
    counts: Counts,
    /// The interface as the machine believes it is: the last read, with each successful
    /// apply simulated on it. None: unknown (before the first read, after a failed apply).
    model: Option<model::Model>,
    last_read: Option<(Duration, SystemTime)>,
    last_diff_read: Option<Duration>,
    timers: Timers,
    periodic: Periodic,
    /// An MFA check that could not carry out an expiry is not retried before this.
    mfa_not_before: Duration,
    unapplied: bool,
    queued_deltas: VecDeque<v1::Delta>,
    held_trimmed: bool,
    ha: HaState,
    jobs: VecDeque<Job>,
    spawned: Vec<Job>,
    wait: Option<Wait>,
    outbox: VecDeque<Action>,
    /// Something changed since the last `Publish`.
    dirty: bool,
    /// What the state store holds (see `persist.rs`).
    disk: persist::Disk,
    /// Journal records were replayed at restore: the start writes the full state.
    compact_at_start: bool,
    /// The peers the deltas accepted since the last apply of the held revision name (see
    /// `scope.rs`); None: plan everything (a snapshot, a settings change).
    scope: Option<BTreeSet<crate::model::Key>>,
    /// The scope of the apply of the held revision under way.
    apply_scope: Option<BTreeSet<crate::model::Key>>,
    /// The last plan refused peers beyond the backend's limit: the next plans are full.
    refused_last: bool,
    /// The firewall is off in the settings and the step ran once (its clean-up): no later
    /// change or resync has anything to do there.
    firewall_idle: bool,
    /// The next attempt after a failed reconcile.
    retry: retry::Retry,
}

impl Machine {
    /// A machine for `settings`, restored from `loaded` (the state file, if usable, with
    /// the journal's plain-data records applied) and `replay` (the journal's `Deltas`
    /// records, `StateStore::take_replay`). `seed` seeds the counter epochs' random
    /// numbers.
    pub fn new(
        settings: Settings,
        gateway_id: String,
        peer_limit: Option<PeerLimit>,
        loaded: Option<PersistedState>,
        replay: Vec<Record>,
        seed: u64,
        now: Now,
    ) -> Self {
        let periodic = Periodic::new(now.mono, settings.stats_interval, settings.resync_interval);
        let retry = retry::Retry::new(settings.resync_interval);
        let mut m = Machine {
            ha: HaState::new(settings.ha.clone()),
            core: CoreStatus {
                url: settings.core.url.clone(),
                ..Default::default()
            },
            settings,
            gateway_id,
            peer_limit,
            now,
            rng: StdRng::seed_from_u64(seed),
            held: None,
            applied_revision: 0,
            steps: StepErrors::default(),
            backend_error: None,
            state_error: None,
            last_rejected: None,
            mfa: MfaTracker::new(),
            tombstones: Tombstones::default(),
            epochs: Epochs::default(),
            stats: StatsTracker::default(),
            peer_totals: Default::default(),
            pending: Vec::new(),
            // A fresh start (no usable state file) must not reuse earlier event numbers.
            next_seq: first_event_seq(now.wall),
            sent_up_to: 0,
            snapshot_requested: false,
            stream_up: false,
            last_contact: None,
            // Without the Core from the start until it connects.
            offline: OfflineClock::restore(None, None, None, now.wall, now.mono),
            offline_removed: false,
            started_up: false,
            counts: Counts::default(),
            model: None,
            last_read: None,
            last_diff_read: None,
            timers: Timers::default(),
            periodic,
            mfa_not_before: Duration::ZERO,
            unapplied: false,
            queued_deltas: VecDeque::new(),
            held_trimmed: false,
            jobs: VecDeque::new(),
            spawned: Vec::new(),
            wait: None,
            outbox: VecDeque::new(),
            dirty: true,
            disk: persist::Disk::default(),
            compact_at_start: false,
            scope: None,
            apply_scope: None,
            refused_last: false,
            firewall_idle: false,
            retry,
        };
        if let Some(state) = loaded {
            m.restore(state, &replay);
        }
        m
    }

    fn restore(&mut self, state: PersistedState, replay: &[Record]) {
        self.disk = persist::Disk::loaded(state.applied_revision);
        let Now { mono, wall } = self.now;
        self.mfa = MfaTracker::restore(&state.mfa, mono, wall);
        self.tombstones = state.tombstones;
        self.epochs = state.epochs;
        self.pending = state.pending_events;
        self.ha.restore(state.ha);
        // Event numbers never go back, also when an older state file is restored from a
        // backup: at least the wall clock's count (as after a lost file), and above every
        // number the Core acknowledges (see the EventAck handling).
        self.next_seq = state.next_seq.max(first_event_seq(wall)).max(1);
        let at = |ms: i64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
        self.last_contact = state.core_last_contact_unix_ms.map(at);
        self.offline = OfflineClock::restore(
            state.offline_ms.map(Duration::from_millis),
            state.saved_unix_ms.map(at),
            self.last_contact,
            wall,
            mono,
        );
        if let Some(mut held) = state
            .location
            .and_then(|bytes| held::restore(state.applied_revision, &bytes))
        {
            if !replay.is_empty() {
                let replayed = persist::replay(&mut held, replay);
                info!(
                    records = replay.len(),
                    replayed,
                    revision = held.revision,
                    "state journal replayed on the restored location"
                );
                // The start compacts: the base holds the replayed revision again.
                self.disk.forget();
                self.compact_at_start = true;
            }
            info!(
                revision = held.revision,
                peers = held.valid.desired.peers.len(),
                pending_events = self.pending.len(),
                "restored the last applied location from the state file"
            );
            self.held = Some(held);
            self.bound_ha_book();
        }
    }

    // ------------------------------------------------------------------ outputs --

    /// The next action to execute, or None (idle, or waiting for an outcome).
    pub fn poll_action(&mut self) -> Option<Action> {
        if let Some(a) = self.outbox.pop_front() {
            return Some(a);
        }
        if self.wait.is_none() && self.jobs.is_empty() && std::mem::take(&mut self.dirty) {
            return Some(Action::Publish(Box::new(self.status())));
        }
        None
    }

    /// When the machine next wants [`Machine::handle_timeout`].
    pub fn poll_timeout(&self) -> Timeout {
        if let Some(at) = self.ha.next_kick() {
            return Timeout { at, urgent: true };
        }
        let (_, periodic) = self.periodic.next();
        let at = [self.next_mfa_check(), self.retry.due()]
            .into_iter()
            .flatten()
            .fold(periodic, Duration::min);
        Timeout { at, urgent: false }
    }

    /// The answer for an HA command (after the command's actions are done).
    pub fn ha_answer(&self) -> crate::ha::Answer {
        self.ha.answer()
    }

    /// The state to write, as an owned value (what [`Machine::state_to_save`] writes).
    pub fn persisted(&self) -> PersistedState {
        self.persisted_state()
    }

    /// What an [`Action::Save`] writes: the state borrowed from the machine, serialized
    /// as [`Machine::persisted`] would be without building it.
    pub fn state_to_save(&self) -> SavedState<'_> {
        self.saved_state()
    }

    // ------------------------------------------------------------------ inputs --

    /// Start-up: pre_up, stale source routes cleared, the backend checked, then the
    /// interface restored from the state file (the offline policy decides first).
    pub fn handle_start(&mut self, now: Now) {
        self.input(now);
        self.spawn(Job::Act(Action::RunHook(Hook::PreUp)));
        self.spawn(Job::Act(Action::ClearSourceRoutes));
        self.spawn(Job::Act(Action::CheckBackend));
        self.spawn(Job::Start);
        self.run();
    }

    /// Shutdown: pre_down, source routes cleared, the state saved, the interface kept (or
    /// removed with `remove_on_shutdown`), post_down.
    pub fn handle_shutdown(&mut self, now: Now) {
        self.input(now);
        self.spawn(Job::Act(Action::RunHook(Hook::PreDown)));
        self.spawn(Job::Act(Action::ClearSourceRoutes));
        self.spawn(Job::Save);
        if self.settings.remove_on_shutdown {
            self.spawn(Job::Act(Action::RemoveInterface));
        } else {
            info!(interface = %self.settings.interface, "stopping; the interface and its peers stay in place");
        }
        self.spawn(Job::Act(Action::RunHook(Hook::PostDown)));
        self.run();
    }

    /// The deadline of [`Machine::poll_timeout`] (or later) is reached: the due timers run,
    /// sharing one read of the interface.
    pub fn handle_timeout(&mut self, now: Now) {
        self.input(now);
        if self.ha.next_kick().is_some_and(|at| at <= now.mono) {
            self.spawn(Job::KickDue);
        }
        let mfa = self.next_mfa_check().is_some_and(|at| at <= now.mono);
        if mfa {
            let due = self.next_mfa_check().unwrap_or(now.mono);
            self.timer_ran(Timer::Mfa, due);
            self.mfa_not_before = now.mono + Duration::from_secs(1);
        }
        let (mut stats, mut resync) = (false, false);
        loop {
            let (timer, due) = self.periodic.next();
            if due > now.mono {
                break;
            }
            self.timer_ran(timer, due);
            self.periodic.ran(timer, now.mono);
            match timer {
                Timer::Resync => resync = true,
                _ => stats = true,
            }
        }
        if mfa || stats || resync {
            self.spawn(Job::Tick { mfa, stats, resync });
        }
        // After the tick's read (its model is used); the resync's reconcile is the retry.
        if self.retry.take_due(now.mono) && !resync {
            self.spawn(Job::Reconcile {
                trigger: "apply retry".into(),
                read: self.retry.reads(),
                save_first: false,
                then: Then::Retry,
            });
        }
        self.run();
    }

    /// The outcome of the last action that wanted one.
    pub fn handle_outcome(&mut self, outcome: Outcome, now: Now) {
        self.input(now);
        match self.wait.take() {
            Some(wait) => self.resume(wait, outcome),
            None => warn!(?outcome, "an outcome nobody waits for ignored"),
        }
        self.run();
    }

    /// `/diff` asks for a fresh read: at most one per [`crate::http::DIFF_MAX_AGE`].
    pub fn handle_diff_refresh(&mut self, now: Now) {
        self.input(now);
        let recent = self
            .last_diff_read
            .is_some_and(|at| now.mono.saturating_sub(at) < crate::http::DIFF_MAX_AGE);
        if !recent {
            self.last_diff_read = Some(now.mono);
            self.spawn(Job::Diff);
        }
        self.run();
    }

    // ------------------------------------------------------------------ the runner --

    fn input(&mut self, now: Now) {
        self.now = Now {
            mono: now.mono.max(self.now.mono),
            wall: now.wall,
        };
        self.dirty = true;
    }

    /// Work that follows the job running now (in the order spawned, before older work).
    fn spawn(&mut self, job: Job) {
        self.spawned.push(job);
    }

    fn emit(&mut self, action: Action) {
        self.outbox.push_back(action);
    }

    /// Reads the interface into the model (lent to the read until its outcome).
    fn read(&mut self, trigger: &'static str, after: reconcile::AfterRead) {
        let into = ReadInto::lend(self.model.take());
        self.request(Action::Read { trigger, into }, Wait::Read(after));
    }

    /// Emits an action that wants a result; the work stops until it comes.
    fn request(&mut self, action: Action, wait: Wait) {
        debug_assert!(self.wait.is_none(), "one outcome awaited at a time");
        self.outbox.push_back(action);
        self.wait = Some(wait);
    }

    fn run(&mut self) {
        loop {
            for job in self.spawned.drain(..).rev() {
                self.jobs.push_front(job);
            }
            if self.wait.is_some() {
                return;
            }
            let Some(job) = self.jobs.pop_front() else {
                return;
            };
            self.job(job);
        }
    }

    fn job(&mut self, job: Job) {
        match job {
            Job::Act(action) => {
                let wait = match &action {
                    Action::CheckBackend => Some(Wait::BackendCheck),
                    Action::ClearSourceRoutes => Some(Wait::RoutesCleared),
                    _ => None,
                };
                match wait {
                    Some(Wait::RoutesCleared) if !self.ha.routes_configured() => {}
                    Some(w) => self.request(action, w),
                    None => self.emit(action),
                }
            }
            Job::Save => self.save_full(Wait::Saved),
            Job::Write(records) => self.write(records, Wait::Saved),
            Job::Start => self.start(),
            Job::Tick { mfa, stats, resync } => self.tick(mfa, stats, resync),
            Job::TickRead { mfa, stats, resync } => self.tick_read(mfa, stats, resync),
            Job::OfflinePolicy => self.check_offline_policy(),
            Job::Reconcile {
                trigger,
                read,
                save_first,
                then,
            } => self.reconcile(trigger, read, save_first, then),
            Job::ExpireMfa => self.expire_mfa(),
            Job::SendStats(changed) => self.send_stats(changed),
            Job::SendPendingEvents => self.send_pending_events(),
            Job::CoreMessage(msg) => self.on_message(*msg),
            Job::FlushDeltas => self.flush_deltas(),
            Job::ApplyHeld => self.apply_held(),
            Job::Rejected {
                revision,
                items,
                listed,
            } => self.rejected(revision, items, listed),
            Job::PostUp => {
                if !self.started_up {
                    self.started_up = true;
                    self.emit(Action::RunHook(Hook::PostUp));
                }
            }
            Job::HaInput(input) => self.ha_input(input),
            Job::KickDue => self.kick_due(),
            Job::AfterKick => self.after_kick(),
            Job::Diff => self.diff(),
        }
    }

    /// Counts a timer run that was due at `due`.
    fn timer_ran(&mut self, timer: Timer, due: Duration) {
        let late = self.now.mono.saturating_sub(due);
        if self.timers.ran(timer, late, self.now.mono, self.now.wall) {
            warn!(
                ?timer,
                late_ms = late.as_millis() as u64,
                "the event loop missed a timer deadline"
            );
        }
    }

    /// When the next MFA check is due: the tracker's next deadline, not sooner than a
    /// second after the last check (an expiry that could not be carried out is retried
    /// one second later, not in a tight loop).
    fn next_mfa_check(&self) -> Option<Duration> {
        self.mfa
            .next_deadline(self.mfa_policy(), self.now.mono)
            .map(|d| d.max(self.mfa_not_before))
    }
}
