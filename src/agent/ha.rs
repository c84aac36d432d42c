//! The event loop's HA side (design §12): it feeds the role ([`crate::ha::role`]) with the
//! address watcher's reports and the operator's commands, and on each transition to
//! active executes one takeover round ([`crate::ha::takeover`]): source routes for the
//! endpoints, then the kicks, batch by batch at the configured rate. Re-created peers get
//! a fresh counter epoch; their MFA timers go on (a re-creation is no sign of life and
//! no reset). A failing kick, route write or address watch is logged, counted in the
//! status and metrics, and never stops the loop nor delays a removal.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use gatehouse_proto::v1;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::status::unix_ms;
use super::Agent;
use crate::ha::activity::ActivityBook;
use crate::ha::role::{Operator, RoleInput, RoleState, Transition};
use crate::ha::source::SourceRoutes;
use crate::ha::takeover::{plan_takeover, Pacer, TakeoverInput};
use crate::ha::{addrwatch, Answer, Command, HaSettings, HaStatus, Request, Role, TakeoverStatus};
use crate::model::Key;
use crate::state::codec::from_unix_ms;
use crate::state::HaPersisted;

/// How long the address watcher waits before it starts again after a failure.
const WATCH_RETRY: Duration = Duration::from_secs(5);

/// What the address watcher tells the loop.
#[derive(Debug)]
pub(super) enum VipEvent {
    Present(BTreeSet<IpAddr>),
    WatchFailed(String),
}

/// The loop's HA state (not `Debug`: the agreed `SourceRoutes` interface does not promise it).
pub(super) struct HaState {
    settings: HaSettings,
    role: RoleState,
    pub(super) book: ActivityBook,
    /// Some when floating addresses are configured (the routes need one to leave from).
    routes: Option<SourceRoutes>,
    round: Option<Pacer>,
    active_since: Option<SystemTime>,
    last_takeover: Option<TakeoverStatus>,
    takeovers: u64,
    kicks: u64,
    failures: u64,
    last_error: Option<String>,
    /// Peers were re-created in the running round: the state file gets their new counter
    /// epochs when the round ends (one write, not one per batch).
    epochs_unsaved: bool,
}

impl HaState {
    pub(super) fn new(settings: HaSettings) -> Self {
        HaState {
            routes: (!settings.vips.is_empty()).then(|| SourceRoutes::new(settings.route_table)),
            settings,
            role: RoleState::new(false),
            book: ActivityBook::new(),
            round: None,
            active_since: None,
            last_takeover: None,
            takeovers: 0,
            kicks: 0,
            failures: 0,
            last_error: None,
            epochs_unsaved: false,
        }
    }

    pub(super) fn restore(&mut self, persisted: HaPersisted) {
        self.role = RoleState::resume(
            persisted.draining,
            persisted.vips_present.into_iter().collect(),
            persisted.operator,
        );
        if self.role.role() == Role::Active {
            self.active_since = persisted.active_since_unix_ms.map(from_unix_ms);
            info!("active before the restart: still active, no takeover round");
        }
        self.book = persisted.activity;
        if persisted.draining {
            info!("draining (kept from before the restart; `gatehouse undrain` ends it)");
        }
    }

    pub(super) fn persisted(&self) -> HaPersisted {
        HaPersisted {
            draining: self.role.draining(),
            activity: self.book.clone(),
            vips_present: self.role.vips_present().iter().copied().collect(),
            operator: self.role.operator(),
            active_since_unix_ms: self.active_since.map(unix_ms),
        }
    }

    pub(super) fn draining(&self) -> bool {
        self.role.draining()
    }

    /// When the next batch of the running round is due (monotonic since the loop's origin).
    pub(super) fn next_kick(&self) -> Option<Duration> {
        self.round.as_ref().and_then(Pacer::poll_timeout)
    }

    pub(super) fn status(&self) -> HaStatus {
        HaStatus {
            role: self.role.role(),
            draining: self.role.draining(),
            vips_present: self.role.vips_present().iter().copied().collect(),
            active_since_unix_ms: self.active_since.map(unix_ms),
            last_takeover: self.last_takeover.clone(),
            relayed_endpoints: self.book.endpoints_known(),
            takeovers: self.takeovers,
            kicks: self.kicks,
            failures: self.failures,
            last_error: self.last_error.clone(),
        }
    }

    fn answer(&self) -> Answer {
        Answer {
            role: self.role.role(),
            draining: self.role.draining(),
        }
    }

    fn failed(&mut self, what: &str, error: String) {
        warn!(%error, "HA: {what} failed");
        self.failures += 1;
        self.last_error = Some(format!("{what}: {error}"));
    }
}

/// Runs the address watcher until `stop`, starting it again after a failure; its
/// reports and failures go to the loop.
pub(super) async fn watch_vips(
    vips: Vec<IpAddr>,
    tx: mpsc::Sender<VipEvent>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (inner_tx, mut inner_rx) = mpsc::channel(16);
        let forward = async {
            while let Some(set) = inner_rx.recv().await {
                if tx.send(VipEvent::Present(set)).await.is_err() {
                    break;
                }
            }
        };
        let (result, ()) = tokio::join!(
            addrwatch::run(vips.clone(), inner_tx, stop.clone()),
            forward
        );
        if *stop.borrow() {
            return;
        }
        let error = match result {
            Ok(()) => "the address watcher stopped".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if tx.send(VipEvent::WatchFailed(error)).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_RETRY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Forwards reports of the floating addresses present made by someone else (see
/// [`super::run_with_vip_reports`]) until `stop` or either side is gone.
pub(super) async fn forward_vips(
    mut reports: mpsc::Receiver<BTreeSet<IpAddr>>,
    tx: mpsc::Sender<VipEvent>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let set = tokio::select! {
            set = reports.recv() => set,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(set) = set else { return };
        if tx.send(VipEvent::Present(set)).await.is_err() {
            return;
        }
    }
}

impl Agent {
    /// An operator's command (HTTP or `gatehouse drain|undrain|activate|deactivate`).
    pub(super) fn on_ha_request(&mut self, request: Request) {
        match request.command {
            Command::Drain | Command::Undrain => {
                let draining = request.command == Command::Drain;
                if self.ha.role.set_draining(draining) {
                    info!(draining, "HA: {} by the operator", request.command.name());
                    // Kept until undrain, across restarts.
                    self.save_state();
                }
            }
            Command::Activate => self.ha_input(RoleInput::Operator(Operator::Activate)),
            Command::Deactivate => self.ha_input(RoleInput::Operator(Operator::Deactivate)),
        }
        let _ = request.reply.send(self.ha.answer());
    }

    pub(super) fn on_vip_event(&mut self, event: VipEvent) {
        match event {
            VipEvent::Present(set) => {
                debug!(present = ?set, "HA: floating addresses on this host");
                self.ha.last_error = self
                    .ha
                    .last_error
                    .take()
                    .filter(|e| !e.starts_with("address watcher"));
                self.ha_input(RoleInput::VipsPresent(set));
            }
            VipEvent::WatchFailed(error) => self.ha.failed("address watcher", error),
        }
    }

    fn ha_input(&mut self, input: RoleInput) {
        let before = self.ha.role.clone();
        if let Some(transition) = self.ha.role.handle(input) {
            self.on_transition(transition);
        }
        if self.ha.role != before {
            // The role's inputs are kept across restarts.
            self.save_state();
        }
    }

    fn on_transition(&mut self, t: Transition) {
        info!(role = %t.to, reason = %t.reason, "HA: role changed");
        match t.to {
            Role::Active => {
                // A second round in the same active period keeps its start.
                self.ha.active_since.get_or_insert_with(SystemTime::now);
                self.ha.takeovers += 1;
                self.start_round(&t.reason);
            }
            Role::Standby => {
                self.ha.active_since = None;
                // Saved with the role change by the caller.
                self.ha.epochs_unsaved = false;
                // The rest of a round is not sent: another gateway carries the clients now.
                if let Some(left) = self.ha.round.take().map(|r| r.remaining()) {
                    if left > 0 {
                        info!(left, "HA: takeover round cut short");
                    }
                }
                self.clear_source_routes();
            }
        }
    }

    /// One takeover round: plan from a fresh read, routes for its endpoints, first batch.
    fn start_round(&mut self, reason: &str) {
        let observed = match self.observe() {
            Ok(o) => Some(o),
            Err(e) => {
                // Without a read, own handshakes are unknown: no re-creation, relayed
                // activity still tells whom to kick.
                self.ha
                    .failed("reading the interface for the takeover", e.to_string());
                None
            }
        };
        // A session made since this gateway became active is with this gateway now: never
        // stale, never re-created (only older ones can be another gateway's leftovers).
        let active_since = self.ha.active_since.unwrap_or_else(SystemTime::now);
        let handshakes_here: BTreeMap<Key, SystemTime> = observed
            .iter()
            .flat_map(|o| o.device.peers.iter())
            .filter_map(|(k, p)| p.last_handshake.map(|h| (*k, h)))
            .filter(|(_, h)| *h < active_since)
            .collect();
        let Some(desired) = self.effective_desired() else {
            info!("HA: active, but no location held yet: nothing to take over");
            return;
        };
        let plan = plan_takeover(TakeoverInput {
            peers: &desired.peers,
            book: &self.ha.book,
            handshakes_here: &handshakes_here,
            now: SystemTime::now(),
            window: self.ha.settings.takeover_window,
        });
        info!(
            kicks = plan.kicks.len(),
            recreate = plan.recreated(),
            skipped_no_endpoint = plan.skipped_no_endpoint,
            window_secs = self.ha.settings.takeover_window.as_secs(),
            "HA: takeover round"
        );
        let endpoints: Vec<SocketAddr> = plan
            .kicks
            .iter()
            .map(|k| k.endpoint)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let vips: Vec<IpAddr> = self.ha.role.vips_present().iter().copied().collect();
        let source_routes = match self
            .ha
            .routes
            .as_mut()
            .map(|r| r.install(&vips, &endpoints))
        {
            Some(Ok(n)) => n,
            Some(Err(e)) => {
                // The kicks still go out (from the address the main table picks).
                self.ha.failed("installing source routes", e.to_string());
                0
            }
            None => 0,
        };
        self.ha.last_takeover = Some(TakeoverStatus {
            at_unix_ms: unix_ms(SystemTime::now()),
            reason: reason.to_string(),
            kicked: 0,
            planned: plan.kicks.len(),
            recreated: plan.recreated(),
            skipped_no_endpoint: plan.skipped_no_endpoint,
            source_routes,
        });
        self.ha.round = Some(Pacer::new(
            plan.kicks,
            self.ha.settings.takeover_rate,
            self.mono(),
        ));
        self.kick_due();
    }

    /// Sends the batches of the running round that are due.
    pub(super) fn kick_due(&mut self) {
        let now = self.mono();
        let Some(batch) = self.ha.round.as_mut().and_then(|r| r.poll_batch(now)) else {
            return;
        };
        if self.ha.next_kick().is_none() {
            self.ha.round = None;
        }
        self.kick(batch);
        if self.ha.round.is_none() && std::mem::take(&mut self.ha.epochs_unsaved) {
            self.save_state();
        }
    }

    fn kick(&mut self, batch: Vec<crate::backend::Kick>) {
        // A peer no longer held is not kicked (and the backend skips, never re-adds, a
        // peer that is not on the interface, e.g. one removed for MFA inactivity).
        let Some(held) = self.held.as_ref().filter(|_| !self.offline_removed) else {
            return;
        };
        let batch: Vec<_> = batch
            .into_iter()
            .filter(|k| held.valid.desired.peers.contains_key(&k.peer.public_key))
            .collect();
        if batch.is_empty() {
            return;
        }
        match self.backend.kick(&batch) {
            Ok(()) => {
                self.ha.kicks += batch.len() as u64;
                if let Some(t) = &mut self.ha.last_takeover {
                    t.kicked += batch.len();
                }
                let recreated: Vec<Key> = batch
                    .iter()
                    .filter(|k| k.recreate)
                    .map(|k| k.peer.public_key)
                    .collect();
                for key in &recreated {
                    // New counters: a new run for the Core (the `counter_epoch` rule).
                    self.epochs.start(*key, &mut rand::rng());
                }
                debug!(
                    kicks = batch.len(),
                    recreated = recreated.len(),
                    "HA: handshakes initiated"
                );
                self.ha.epochs_unsaved |= !recreated.is_empty();
            }
            Err(e) => self
                .ha
                .failed(&format!("kicking {} peers", batch.len()), e.to_string()),
        }
    }

    /// Removes gatehouse's source routes: when the active role ends, at stop, and at start
    /// (routes left by a crash).
    pub(super) fn clear_source_routes(&mut self) {
        if let Some(Err(e)) = self.ha.routes.as_mut().map(SourceRoutes::clear) {
            self.ha.failed("clearing source routes", e.to_string());
        }
    }

    /// Signs of life relayed by the Core: where each held peer was last seen.
    pub(super) fn ha_relayed(&mut self, peer: &v1::ActivePeer, key: Key, at: SystemTime) {
        if !self
            .held
            .as_ref()
            .is_some_and(|h| h.valid.desired.peers.contains_key(&key))
        {
            return;
        }
        // The shared wire rule (canonical, unicast, port not 0), as for the Core's peers.
        let endpoint = gatehouse_validate::net::endpoint(&peer.endpoint).unwrap_or_else(|e| {
            debug!(peer = %key, error = %e, "relayed endpoint ignored");
            None
        });
        self.ha.book.relayed(key, at, endpoint);
    }

    /// The book holds the held location's peers only.
    pub(super) fn bound_ha_book(&mut self) {
        let Some(held) = &self.held else { return };
        let peers = &held.valid.desired.peers;
        self.ha.book.retain(|k| peers.contains_key(k));
    }
}
