//! The agent's event loop: the one owner of the agent's state (held location, MFA timers,
//! pending events, stats baseline, status). The Core connection, the HTTP server and the
//! timers talk to it through channels; every trigger (a Core message, a timer, a drift
//! check) leads to the same idempotent reconcile: observe, plan, apply.
//!
//! Shutdown is injected: [`run`] returns when the `shutdown` future completes, leaving the
//! interface and its peers in place unless `remove_on_shutdown` is set.

pub mod client;
mod core_io;
pub mod firewall;
mod ha;
pub mod offline;
pub mod status;
pub mod steps;
pub mod timers;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use gatehouse_proto::v1;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::backend::{Backend, BackendError};
use crate::hooks::{Hook, Hooks};
use crate::http::{self, DiffChannel, DiffReport, DIFF_MAX_AGE};
use crate::location::Held;
use crate::mfa::{MfaPolicy, MfaTracker, PeerSample, Session, Tombstones};
use crate::model::{Desired, Key, Observed};
use crate::plan::{plan, Op, Plan, PlanSummary};
use crate::state::{first_event_seq, LoadOutcome, PendingEvent, PersistedState, StateStore};
use crate::stats::{batches, Epochs, StatsTracker};
use crate::validate::validate_location;
use client::{CoreSettings, FromCore};
use offline::OfflineClock;
use status::{readiness, unix_ms, Readiness, Status};
use steps::{execute, ApplyStep, StepErrors};
use timers::{Periodic, Timer, Timers};

/// Above this many operations, a plan's steps are logged at DEBUG and summarized at INFO.
const LOG_EACH_STEP_UP_TO: usize = 100;
/// Largest `Stats` message the agent sends (well under the gRPC limit).
const STATS_MESSAGE_BYTES: usize = 1024 * 1024;
/// Most Core events handled in one turn of the loop before the coalesced apply and a
/// look at the timers.
const CORE_BATCH_EVENTS: usize = 1024;
/// Longest a turn keeps taking Core events before the coalesced apply (the timers wait
/// for at most about this plus one apply).
const CORE_BATCH_TIME: Duration = Duration::from_millis(200);

/// Everything the event loop needs, resolved from the configuration by the caller.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    pub interface: String,
    pub backend_name: String,
    pub state_dir: PathBuf,
    pub core: CoreSettings,
    pub stats_interval: Duration,
    pub resync_interval: Duration,
    /// None: keep peers without the Core; Some(d): remove them after `d` without it.
    pub offline_remove_after: Option<Duration>,
    pub remove_on_shutdown: bool,
    /// Overrides the generated gateway id (the `gateway.id` key).
    pub gateway_id: Option<String>,
    pub http_listen: Option<SocketAddr>,
    pub hooks: Hooks,
    pub firewall: firewall::FirewallSettings,
    /// Several gateways per location (`[ha]`).
    pub ha: crate::ha::HaSettings,
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    settings: Settings,
    backend: Box<dyn Backend>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (status_tx, _) = watch::channel(Status::default());
    run_with_status(settings, backend, shutdown, status_tx).await
}

/// [`run`], publishing the status on `status_tx` (tests and embedders watch it).
pub async fn run_with_status(
    settings: Settings,
    backend: Box<dyn Backend>,
    shutdown: impl Future<Output = ()> + Send,
    status_tx: watch::Sender<Status>,
) -> anyhow::Result<()> {
    run_with_vip_reports(settings, backend, shutdown, status_tx, None).await
}

/// [`run_with_status`], the floating addresses present reported by `vip_reports` instead
/// of the rtnetlink watcher when given (tests, embedders with a watcher of their own).
pub async fn run_with_vip_reports(
    settings: Settings,
    backend: Box<dyn Backend>,
    shutdown: impl Future<Output = ()> + Send,
    status_tx: watch::Sender<Status>,
    vip_reports: Option<mpsc::Receiver<BTreeSet<IpAddr>>>,
) -> anyhow::Result<()> {
    let (store, outcome) = StateStore::open(&settings.state_dir)
        .with_context(|| format!("state_dir {}", settings.state_dir.display()))?;
    let http_listener = match settings.http_listen {
        Some(addr) => Some(http::bind(addr).await?),
        None => None,
    };
    let mut agent = Agent::new(settings, backend, store, outcome);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (core_tx, core_rx) = mpsc::channel(1024);
    let (refresh_tx, refresh_rx) = mpsc::channel(1);
    let (diff_tx, diff_rx) = watch::channel(DiffReport::default());
    let (ha_tx, ha_rx) = mpsc::channel(16);
    let (vip_tx, vip_rx) = mpsc::channel(16);
    let status_rx = status_tx.subscribe();
    agent.status_tx = Some(status_tx);
    agent.diff_tx = Some(diff_tx);
    let diff = DiffChannel {
        report: diff_rx,
        refresh: refresh_tx,
    };

    agent.start().await;
    let client = tokio::spawn(client::run(
        agent.settings.core.clone(),
        core_tx,
        stop_rx.clone(),
    ));
    let http = http_listener.map(|l| {
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = http::serve(l, status_rx, diff, ha_tx, stop).await {
                error!(error = %e, "HTTP server failed");
            }
        })
    });
    // The floating addresses are watched only when some are configured.
    let vips = agent.settings.ha.vips.clone();
    let watcher = match vip_reports {
        Some(reports) => Some(tokio::spawn(ha::forward_vips(
            reports,
            vip_tx,
            stop_rx.clone(),
        ))),
        None => {
            (!vips.is_empty()).then(|| tokio::spawn(ha::watch_vips(vips, vip_tx, stop_rx.clone())))
        }
    };

    let inputs = Inputs {
        core: core_rx,
        refresh: refresh_rx,
        ha: ha_rx,
        vips: vip_rx,
    };
    agent.event_loop(inputs, shutdown).await;
    let _ = stop_tx.send(true);
    let _ = client.await;
    if let Some(h) = http {
        let _ = h.await;
    }
    if let Some(w) = watcher {
        let _ = w.await;
    }
    agent.stop().await;
    Ok(())
}

struct Agent {
    settings: Settings,
    backend: Box<dyn Backend>,
    store: StateStore,
    gateway_id: String,
    origin: Instant,
    held: Option<Held>,
    applied_revision: u64,
    /// The apply steps whose last attempt failed (plan phases and the firewall).
    steps: StepErrors,
    backend_error: Option<String>,
    /// The last state-file write failed (a restart without the Core would use older state).
    state_error: Option<String>,
    last_rejected: Option<status::Rejected>,
    mfa: MfaTracker,
    tombstones: Tombstones,
    epochs: Epochs,
    stats: StatsTracker,
    pending: Vec<PendingEvent>,
    next_seq: u64,
    /// Events up to this seq went out on the current stream (in Hello or after).
    sent_up_to: u64,
    /// A snapshot was asked for on this stream and has not arrived yet.
    snapshot_requested: bool,
    outbound: Option<mpsc::Sender<v1::GatewayMessage>>,
    core: status::CoreStatus,
    last_contact: Option<SystemTime>,
    /// Time without the Core, for the offline policy and readiness.
    offline: OfflineClock,
    offline_removed: bool,
    started_up: bool,
    counts: Counts,
    status_tx: Option<watch::Sender<Status>>,
    diff_tx: Option<watch::Sender<DiffReport>>,
    /// When the interface was last read (monotonic, and wall time for the status).
    last_read: Option<(Instant, SystemTime)>,
    /// When `/diff` last caused a read of its own.
    last_diff_read: Option<Instant>,
    timers: Timers,
    /// A revision was accepted from the Core and is not applied yet (applies coalesce).
    unapplied: bool,
    /// Deltas received in this batch, judged together at its end.
    queued_deltas: Vec<v1::Delta>,
    /// Peers were removed from the held revision because a newer one that no longer
    /// lists them was rejected: the held content is not the Core's any more, so the next
    /// delta is answered with a snapshot request.
    held_trimmed: bool,
    firewall: firewall::FirewallStep,
    ha: ha::HaState,
}

/// The event loop's input channels.
struct Inputs {
    core: mpsc::Receiver<FromCore>,
    /// `/diff` asks for a fresh read.
    refresh: mpsc::Receiver<()>,
    /// HA commands from the HTTP server.
    ha: mpsc::Receiver<crate::ha::Request>,
    /// The address watcher's reports.
    vips: mpsc::Receiver<ha::VipEvent>,
}

#[derive(Default)]
struct Counts {
    desired_peers: usize,
    kernel_peers: usize,
    last_reconcile_ops: usize,
    last_reconcile: Option<SystemTime>,
    drift_repairs: u64,
    mfa_removals: u64,
}

impl Agent {
    fn new(
        settings: Settings,
        backend: Box<dyn Backend>,
        store: StateStore,
        outcome: LoadOutcome,
    ) -> Self {
        let mut agent = Agent {
            ha: ha::HaState::new(settings.ha.clone()),
            firewall: firewall::FirewallStep::new(
                &settings.interface,
                settings.firewall,
                Box::new(firewall::Kernel),
            ),
            gateway_id: settings
                .gateway_id
                .clone()
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| store.gateway_id().to_string()),
            core: status::CoreStatus {
                url: settings.core.url.clone(),
                ..Default::default()
            },
            settings,
            backend,
            store,
            origin: Instant::now(),
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
            pending: Vec::new(),
            // A fresh start (no usable state file) must not reuse earlier event numbers.
            next_seq: first_event_seq(SystemTime::now()),
            sent_up_to: 0,
            snapshot_requested: false,
            outbound: None,
            last_contact: None,
            // Without the Core from the start until it connects.
            offline: OfflineClock::restore(None, None, None, SystemTime::now(), Duration::ZERO),
            offline_removed: false,
            started_up: false,
            counts: Counts::default(),
            status_tx: None,
            diff_tx: None,
            last_read: None,
            last_diff_read: None,
            timers: Timers::default(),
            unapplied: false,
            queued_deltas: Vec::new(),
            held_trimmed: false,
        };
        match outcome {
            LoadOutcome::Fresh => {
                info!(gateway_id = %agent.gateway_id, "no state file: starting fresh")
            }
            LoadOutcome::Corrupt { moved_to, reason } => warn!(
                moved_to = %moved_to.display(),
                %reason,
                "state file unreadable: moved aside, starting from the Core"
            ),
            LoadOutcome::Loaded(state) => agent.restore(*state),
        }
        agent
    }

    fn restore(&mut self, state: PersistedState) {
        let now = self.mono();
        let wall = SystemTime::now();
        self.mfa = MfaTracker::restore(&state.mfa, now, wall);
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
            now,
        );
        let Some(bytes) = state.location else {
            return;
        };
        let location = match <v1::Location as prost::Message>::decode(bytes.as_slice()) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "state file: the saved location does not decode; waiting for the Core");
                return;
            }
        };
        match validate_location(&location) {
            Ok(valid) => {
                info!(
                    revision = state.applied_revision,
                    peers = valid.desired.peers.len(),
                    pending_events = self.pending.len(),
                    "restored the last applied location from the state file"
                );
                self.held = Some(Held::new(state.applied_revision, location, valid));
                self.bound_ha_book();
            }
            Err(rejections) => warn!(
                first = %rejections[0],
                "state file: the saved location is invalid; waiting for the Core"
            ),
        }
    }

    /// Start-up: pre_up, then restore or adopt the interface from the state file.
    async fn start(&mut self) {
        let _ = self.settings.hooks.run(Hook::PreUp).await;
        self.clear_source_routes();
        if let Err(e) = self.backend.check() {
            self.backend_error = Some(e.to_string());
            error!(error = %e, "backend check failed");
        }
        if self.held.is_some() {
            // A start long after the Core went away: the offline policy decides before
            // any peer is restored, so removed peers are not briefly re-added.
            self.check_offline_policy();
            let revision = self.held.as_ref().map_or(0, |h| h.revision);
            match self.reconcile("start: restore from state file") {
                Ok(_) => {
                    self.applied_revision = revision;
                    self.after_first_apply().await;
                }
                Err(e) => error!(error = %e, "could not restore the interface from the state file"),
            }
        }
        self.publish();
    }

    /// The loop. Timers and inputs take turns at priority: after a turn that served an
    /// input the timers go first, after a timer the inputs do. So no input (a burst of
    /// Core messages, a flood of HTTP requests) can starve the timers, and timers whose
    /// work outlasts their period cannot starve the inputs. Among themselves the stats and
    /// resync timers go earliest deadline first ([`Periodic`]), so neither starves the
    /// other. Each input turn is bounded:
    /// Core events are taken in batches whose revisions are applied once
    /// ([`Agent::on_core_batch`]), `/diff` reads the interface at most once a second.
    /// A running takeover round's next batch goes before anything but shutdown: it is
    /// one short write, paced by the round itself.
    async fn event_loop(&mut self, inputs: Inputs, shutdown: impl Future<Output = ()>) {
        let Inputs {
            core: mut core_rx,
            refresh: mut refresh_rx,
            ha: mut ha_rx,
            vips: mut vip_rx,
        } = inputs;
        tokio::pin!(shutdown);
        let mut periodic = Periodic::new(
            self.mono(),
            self.settings.stats_interval,
            self.settings.resync_interval,
        );
        let mut timers_first = true;
        loop {
            let (periodic_timer, periodic_due) = periodic.next();
            let periodic_at = self.origin + periodic_due;
            let mfa_at = self
                .next_mfa_deadline()
                .map(|d| self.origin + d)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let kick_at = self.ha.next_kick().map(|d| self.origin + d);
            let kick_sleep = tokio::time::sleep_until(kick_at.unwrap_or(mfa_at));
            let turn = if timers_first {
                tokio::select! {
                    biased;
                    _ = &mut shutdown => Turn::Stop,
                    _ = kick_sleep, if kick_at.is_some() => Turn::Kick,
                    _ = tokio::time::sleep_until(mfa_at) => Turn::Mfa(mfa_at),
                    _ = tokio::time::sleep_until(periodic_at) => Turn::Periodic(periodic_timer, periodic_at),
                    event = core_rx.recv() => event.map_or(Turn::Stop, Turn::Core),
                    Some(()) = refresh_rx.recv() => Turn::Refresh,
                    Some(request) = ha_rx.recv() => Turn::Ha(request),
                    Some(event) = vip_rx.recv() => Turn::Vips(event),
                }
            } else {
                tokio::select! {
                    biased;
                    _ = &mut shutdown => Turn::Stop,
                    _ = kick_sleep, if kick_at.is_some() => Turn::Kick,
                    event = core_rx.recv() => event.map_or(Turn::Stop, Turn::Core),
                    Some(()) = refresh_rx.recv() => Turn::Refresh,
                    Some(request) = ha_rx.recv() => Turn::Ha(request),
                    Some(event) = vip_rx.recv() => Turn::Vips(event),
                    _ = tokio::time::sleep_until(mfa_at) => Turn::Mfa(mfa_at),
                    _ = tokio::time::sleep_until(periodic_at) => Turn::Periodic(periodic_timer, periodic_at),
                }
            };
            timers_first = !matches!(turn, Turn::Mfa(_) | Turn::Periodic(..) | Turn::Kick);
            match turn {
                Turn::Stop => break,
                Turn::Mfa(due) => {
                    self.timer_ran(Timer::Mfa, due);
                    self.on_tick("mfa deadline", false);
                }
                Turn::Periodic(timer, due) => {
                    self.timer_ran(timer, due);
                    if timer == Timer::Resync {
                        self.on_resync().await;
                    } else {
                        self.on_tick("stats interval", true);
                    }
                    periodic.ran(timer, self.mono());
                }
                Turn::Core(event) => self.on_core_batch(event, &mut core_rx).await,
                Turn::Refresh => self.refresh_diff(),
                Turn::Ha(request) => self.on_ha_request(request),
                Turn::Vips(event) => self.on_vip_event(event),
                Turn::Kick => self.kick_due(),
            }
            self.publish();
        }
    }

    /// Counts a timer run that was due at `due`.
    fn timer_ran(&mut self, timer: Timer, due: Instant) {
        let late = Instant::now().saturating_duration_since(due);
        if self.timers.ran(timer, late, self.mono(), SystemTime::now()) {
            warn!(
                ?timer,
                late_ms = late.as_millis() as u64,
                "the event loop missed a timer deadline"
            );
        }
    }

    /// Handles `first` and the Core events already queued behind it (up to
    /// [`CORE_BATCH_EVENTS`] or [`CORE_BATCH_TIME`]); accepted revisions are applied once,
    /// at the end, newest state only.
    async fn on_core_batch(&mut self, first: FromCore, core_rx: &mut mpsc::Receiver<FromCore>) {
        let started = Instant::now();
        self.on_core(first).await;
        let mut handled = 1;
        while handled < CORE_BATCH_EVENTS && started.elapsed() < CORE_BATCH_TIME {
            let Ok(event) = core_rx.try_recv() else { break };
            self.on_core(event).await;
            handled += 1;
        }
        if handled > 1 {
            debug!(events = handled, "Core events handled in one batch");
        }
        self.apply_accepted().await;
    }

    /// Shutdown: pre_down, flush the state, keep (or remove) the interface, post_down.
    async fn stop(&mut self) {
        let iface = self.settings.interface.clone();
        let _ = self.settings.hooks.run(Hook::PreDown).await;
        self.clear_source_routes();
        self.save_state();
        if self.settings.remove_on_shutdown {
            match self.backend.remove() {
                Ok(()) => info!(interface = %iface, "interface removed (remove_on_shutdown)"),
                Err(e) => error!(error = %e, "could not remove the interface"),
            }
        } else {
            info!(interface = %iface, "stopping; the interface and its peers stay in place");
        }
        let _ = self.settings.hooks.run(Hook::PostDown).await;
    }

    fn mono(&self) -> Duration {
        self.origin.elapsed()
    }

    // ------------------------------------------------------------------ reconcile --

    /// The desired state after local decisions: MFA removals and the offline policy.
    fn effective_desired(&mut self) -> Option<Desired> {
        let held = self.held.as_ref()?;
        let mut desired = held.valid.desired.clone();
        self.tombstones.filter(&mut desired, &sessions(held));
        if self.offline_removed {
            desired.peers.clear();
        }
        self.counts.desired_peers = desired.peers.len();
        Some(desired)
    }

    fn mfa_policy(&self) -> MfaPolicy {
        self.held
            .as_ref()
            .map_or(MfaPolicy::Disabled, |h| h.valid.mfa)
    }

    /// Observe, plan, apply. The one path every trigger takes. The plan is executed
    /// phase by phase ([`steps::execute`]): removals first, each failing step recorded in
    /// `self.steps` and retried by the next reconcile.
    fn reconcile(&mut self, trigger: &str) -> Result<PlanSummary, ReconcileError> {
        let Some(desired) = self.effective_desired() else {
            return Ok(PlanSummary::default());
        };
        let observed = match self.observe() {
            Ok(o) => o,
            Err(e) => {
                // The firewall does not depend on the WireGuard device being readable.
                self.firewall_step(trigger, &desired);
                return Err(e.into());
            }
        };
        // Peers beyond the backend's limit are refused, the rest applied.
        let fitted = crate::peer_limit::fit(&desired, &observed, self.backend.peer_limit());
        self.steps.record_peer_limit(fitted.refused.as_ref());
        let plan = plan(&fitted.desired, &observed);
        self.counts.last_reconcile = Some(SystemTime::now());
        self.counts.last_reconcile_ops = plan.len();
        let summary = plan.summary();
        if plan.is_empty() {
            debug!(trigger, "reconcile: the interface matches");
        } else {
            log_plan(trigger, &plan, summary);
        }
        // An empty plan still runs: it clears the errors of steps that have nothing left
        // to do (the interface was repaired some other way).
        let executed = execute(self.backend.as_mut(), plan, trigger, &mut self.steps);
        // Bookkeeping for what was applied only; after a failed step the next observation
        // tells what happened (a peer added then has counter epoch 0, which the Core handles).
        self.account(&executed.applied);
        // The firewall runs after the peer steps: reported like them (`Applied`, `/status`,
        // `/readyz`) and retried by the next reconcile; it cannot keep a removal.
        self.firewall_step(trigger, &desired);
        match self.steps.summary() {
            Some(failed) => Err(ReconcileError::Steps(failed)),
            None => Ok(summary),
        }
    }

    /// Reads the interface; the backend's health is the outcome of the last read.
    fn observe(&mut self) -> Result<Observed, BackendError> {
        let observed = match self.backend.observe() {
            Ok(o) => o,
            Err(e) => {
                self.backend_error = Some(e.to_string());
                return Err(e);
            }
        };
        self.backend_error = None;
        self.last_read = Some((Instant::now(), SystemTime::now()));
        self.counts.kernel_peers = observed.device.peers.len();
        let now = self.mono();
        let wall = SystemTime::now();
        self.mfa.observe(
            observed
                .device
                .peers
                .iter()
                .map(|(k, p)| (*k, PeerSample::from(p))),
            now,
            wall,
        );
        self.ha.book.observe_here(&observed.device.peers, wall);
        Ok(observed)
    }

    /// Bookkeeping after an apply: counter epochs and trackers of added/removed peers.
    fn account(&mut self, plan: &Plan) {
        for step in &plan.steps {
            match &step.op {
                Op::AddPeer(spec) => {
                    self.epochs.start(spec.public_key, &mut rand::rng());
                }
                Op::RemovePeer(key) => {
                    self.epochs.remove(key);
                    self.mfa.forget(key);
                    self.stats.forget(key);
                }
                _ => {}
            }
        }
    }

    async fn after_first_apply(&mut self) {
        if !self.started_up {
            self.started_up = true;
            let _ = self.settings.hooks.run(Hook::PostUp).await;
        }
    }

    // ------------------------------------------------------------------ timers --

    fn next_mfa_deadline(&self) -> Option<Duration> {
        let policy = self.mfa_policy();
        // An expiry that could not be carried out is retried one second later, not in a
        // tight loop.
        let floor = self.mono() + Duration::from_secs(1);
        self.mfa
            .next_deadline(policy, self.mono())
            .map(|d| d.max(floor))
    }

    /// Stats interval and MFA deadlines: read the interface once, expire, report.
    fn on_tick(&mut self, trigger: &str, report_stats: bool) {
        self.check_offline_policy();
        let observed = match self.observe() {
            Ok(o) => o,
            Err(e) => {
                warn!(trigger, error = %e, "cannot read the interface");
                self.backend_error = Some(e.to_string());
                return;
            }
        };
        self.expire_mfa(&observed);
        if report_stats {
            self.send_stats(&observed);
        }
    }

    async fn on_resync(&mut self) {
        match self.backend.check() {
            // Health is cleared by the next successful read of the interface (below).
            Ok(Some(repair)) => warn!(%repair, "backend repaired itself"),
            Ok(None) => {}
            Err(e) => {
                error!(error = %e, "backend unhealthy");
                self.backend_error = Some(e.to_string());
            }
        }
        self.check_offline_policy();
        let in_sync = self.held.as_ref().map(|h| h.revision) == Some(self.applied_revision);
        let result = self.reconcile("periodic resync");
        match result {
            Ok(summary) if summary != PlanSummary::default() => {
                if in_sync {
                    self.counts.drift_repairs += 1;
                    warn!(%summary, "drift repaired: the interface had been changed outside gatehouse");
                }
                self.mark_applied().await;
            }
            Ok(_) => self.mark_applied().await,
            Err(_) => {}
        }
        self.save_state();
    }

    /// The firewall step, after the peer steps (a failing firewall never holds back a
    /// removal): recorded like them, so it is reported and retried the same way.
    fn firewall_step(&mut self, trigger: &str, desired: &Desired) {
        let fw = self.held.as_ref().and_then(|h| h.firewall().cloned());
        let result = self.firewall.run(trigger, fw.as_ref(), desired);
        self.steps.record(ApplyStep::Firewall, result);
    }

    /// After a successful reconcile: the held revision is what the kernel has.
    async fn mark_applied(&mut self) {
        let Some(rev) = self.held.as_ref().map(|h| h.revision) else {
            return;
        };
        if rev != self.applied_revision {
            self.applied_revision = rev;
            self.send_applied(rev, None);
        }
        self.after_first_apply().await;
    }

    fn check_offline_policy(&mut self) {
        let Some(limit) = self.settings.offline_remove_after else {
            return;
        };
        if self.outbound.is_some() || self.offline_removed {
            return;
        }
        let offline = self.offline.offline_for(self.mono());
        if offline > limit {
            warn!(
                offline_secs = offline.as_secs(),
                limit_secs = limit.as_secs(),
                "offline policy: the Core has been unreachable too long; removing peers"
            );
            self.offline_removed = true;
            let _ = self.reconcile("offline policy");
        }
    }

    // ------------------------------------------------------------------ MFA --

    fn expire_mfa(&mut self, observed: &Observed) {
        let policy = self.mfa_policy();
        let Some(held) = &self.held else { return };
        let now = self.mono();
        let (expired, moot): (Vec<_>, Vec<_>) =
            self.mfa.expired(policy, now).into_iter().partition(|e| {
                // A buried peer still on the interface is a removal that failed to apply:
                // the reconcile retries it; it is not a new expiry (nor a new event).
                observed.device.peers.contains_key(&e.key)
                    && held.valid.desired.peers.contains_key(&e.key)
                    && !self.tombstones.contains(&e.key)
            });
        // Timers of peers that are not (or no longer) both desired and on the interface
        // cannot lead to a removal: dropped, so they do not hold the next deadline in the
        // past (a wake-up and an interface dump every second). A peer that comes back
        // starts a new timer.
        for e in &moot {
            self.mfa.forget(&e.key);
        }
        if expired.is_empty() {
            return;
        }
        let at_ms = unix_ms(SystemTime::now());
        let (pending_before, seq_before) = (self.pending.len(), self.next_seq);
        let tombstones_before = self.tombstones.clone();
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
            self.tombstones.bury(
                e.key,
                Session::of(meta.mfa_session, psk.as_ref()),
                SystemTime::now(),
            );
        }
        // The events are on disk before any peer is removed.
        if let Err(e) = self.store.save(&self.persisted()) {
            error!(error = %e, "cannot write the state file: MFA removal postponed");
            self.tombstones = tombstones_before;
            self.pending.truncate(pending_before);
            self.next_seq = seq_before;
            return;
        }
        self.counts.mfa_removals += expired.len() as u64;
        let _ = self.reconcile("MFA inactivity");
        self.send_pending_events();
    }

    // ------------------------------------------------------------------ state --

    fn persisted(&self) -> PersistedState {
        PersistedState {
            gateway_id: self.gateway_id.clone(),
            applied_revision: self.held.as_ref().map_or(0, |h| h.revision),
            location: self
                .held
                .as_ref()
                .map(|h| prost::Message::encode_to_vec(&h.to_proto())),
            mfa: self.mfa.persist(self.mono(), SystemTime::now()),
            tombstones: self.tombstones.clone(),
            epochs: self.epochs.clone(),
            pending_events: self.pending.clone(),
            next_seq: self.next_seq,
            // While the stream is up the Core is in contact now, even if idle.
            offline_ms: Some(self.offline.offline_for(self.mono()).as_millis() as u64),
            saved_unix_ms: Some(unix_ms(SystemTime::now())),
            core_last_contact_unix_ms: if self.outbound.is_some() {
                Some(unix_ms(SystemTime::now()))
            } else {
                self.last_contact.map(unix_ms)
            },
            ha: self.ha.persisted(),
        }
    }

    fn save_state(&mut self) {
        match self.store.save(&self.persisted()) {
            Ok(()) => self.state_error = None,
            Err(e) => {
                error!(error = %e, "cannot write the state file");
                self.state_error = Some(e.to_string());
            }
        }
    }

    // ------------------------------------------------------------------ status --

    fn publish(&mut self) {
        let Some(tx) = &self.status_tx else { return };
        let counters = self.backend.counters();
        let (ready, ready_reason) = readiness(&Readiness {
            applied: self.applied_revision != 0,
            apply_failed: self.steps.blocking(),
            failed_steps: self.steps.reasons(),
            missed_deadlines: self.timers.stats.missed_deadlines,
            missed_deadline_ago: self.timers.missed_ago(self.mono()),
            backend_failed: self.backend_error.is_some(),
            core_connected: self.outbound.is_some(),
            offline_for: self.offline.offline_for(self.mono()),
            offline_allowance: self.settings.offline_remove_after,
            draining: self.ha.draining(),
            rejected_revision: self.last_rejected.as_ref().map(|r| r.revision),
        });
        let status = Status {
            firewall: self.firewall.status().clone(),
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
            last_rejected: self.last_rejected.clone(),
            core: self.core.clone(),
            desired_peers: self.counts.desired_peers,
            kernel_peers: self.counts.kernel_peers,
            last_read_unix_ms: self.last_read.map(|(_, wall)| unix_ms(wall)),
            timers: self.timers.stats.clone(),
            last_reconcile_ops: self.counts.last_reconcile_ops,
            last_reconcile_unix_ms: self.counts.last_reconcile.map(unix_ms),
            drift_repairs: self.counts.drift_repairs,
            mfa_threshold_secs: self.mfa_policy().threshold().map(|d| d.as_secs()),
            mfa_removals: self.counts.mfa_removals,
            pending_events: self.pending.len(),
            device_writes: counters.device_writes,
            link_writes: counters.link_writes,
            backend_error: self.backend_error.clone(),
            state_error: self.state_error.clone(),
            offline_removed: self.offline_removed,
            ready,
            ready_reason,
            published_unix_ms: unix_ms(SystemTime::now()),
            stale_after_ms: (2 * self
                .settings
                .stats_interval
                .max(self.settings.resync_interval)
                + Duration::from_secs(10))
            .as_millis() as u64,
        };
        tx.send_replace(status);
    }

    /// `/diff` asked for a fresh read: at most one per [`DIFF_MAX_AGE`], whatever the
    /// number of requests; the report is published for every waiting request.
    fn refresh_diff(&mut self) {
        if self
            .last_diff_read
            .is_some_and(|at| at.elapsed() < DIFF_MAX_AGE)
        {
            return;
        }
        self.last_diff_read = Some(Instant::now());
        let report = self.diff();
        if let Some(tx) = &self.diff_tx {
            tx.send_replace(report);
        }
    }

    fn diff(&mut self) -> DiffReport {
        let held_revision = self.held.as_ref().map_or(0, |h| h.revision);
        let read_unix_ms = Some(unix_ms(SystemTime::now()));
        let Some(desired) = self.effective_desired() else {
            return DiffReport {
                held_revision,
                operations: vec![],
                error: Some("no location held yet".into()),
                read_unix_ms,
            };
        };
        let fw = self.held.as_ref().and_then(|h| h.firewall().cloned());
        let firewall = self.firewall.diff(fw.as_ref(), &desired);
        match self.observe() {
            Ok(observed) => DiffReport {
                held_revision,
                operations: plan(&desired, &observed)
                    .steps
                    .iter()
                    .map(|s| {
                        let reasons: Vec<String> =
                            s.reasons.iter().map(|r| r.to_string()).collect();
                        reasons.join("; ")
                    })
                    .chain(firewall)
                    .collect(),
                error: None,
                read_unix_ms,
            },
            Err(e) => DiffReport {
                held_revision,
                operations: vec![],
                error: Some(e.to_string()),
                read_unix_ms,
            },
        }
    }
}

/// What one turn of the event loop serves.
enum Turn {
    Stop,
    Mfa(Instant),
    /// The stats or resync timer, due at the instant.
    Periodic(Timer, Instant),
    Core(FromCore),
    Refresh,
    Ha(crate::ha::Request),
    Vips(ha::VipEvent),
    /// The next batch of a takeover round is due.
    Kick,
}

/// Why a reconcile did not complete.
#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    /// The interface could not be read: nothing was planned.
    #[error("cannot read the interface: {0}")]
    Observe(#[from] BackendError),
    /// Some steps failed (the others were applied): one line per failed step.
    #[error("{0}")]
    Steps(String),
}

fn sessions(held: &Held) -> BTreeMap<Key, u64> {
    held.valid
        .meta
        .iter()
        .map(|(k, m)| (*k, m.mfa_session))
        .collect()
}

fn log_plan(trigger: &str, plan: &Plan, summary: PlanSummary) {
    let each = plan.len() <= LOG_EACH_STEP_UP_TO;
    for step in &plan.steps {
        for r in &step.reasons {
            if each {
                info!(trigger, subject = %r.subject, field = r.field, old = %r.old, new = %r.new, "apply");
            } else {
                debug!(trigger, subject = %r.subject, field = r.field, old = %r.old, new = %r.new, "apply");
            }
        }
    }
    info!(trigger, %summary, "applying plan");
}
