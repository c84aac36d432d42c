//! The HA side of the machine (design §12): the role ([`crate::ha::role`]) fed with the
//! address reports and the operator's commands, and on each transition to active one
//! takeover round ([`crate::ha::takeover`]): a read, source routes for the endpoints, then
//! the kicks, batch by batch at the configured rate. Re-created peers get a fresh counter
//! epoch; their MFA timers go on. A failing kick, route write or address watch is
//! counted in the status and never stops anything nor delays a removal.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use gatehouse_proto::v1;
use tracing::{debug, info, warn};

use super::reconcile::{AfterRead, Wait};
use super::{Action, Job, Machine, Now};
use crate::agent::status::unix_ms;
use crate::backend::Kick;
use crate::ha::activity::ActivityBook;
use crate::ha::role::{Operator, RoleInput, RoleState, Transition};
use crate::ha::takeover::{plan_takeover, Pacer, TakeoverInput, TakeoverPlan};
use crate::ha::{Answer, Command, HaSettings, HaStatus, Role, TakeoverStatus};
use crate::model::Key;
use crate::state::codec::from_unix_ms;
use crate::state::{HaPersisted, HaSaved};

/// The HA state.
#[derive(Debug)]
pub struct HaState {
    settings: HaSettings,
    role: RoleState,
    pub(super) book: ActivityBook,
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

/// A round planned, waiting for its source routes.
#[derive(Debug)]
pub(super) struct Round {
    reason: String,
    plan: TakeoverPlan,
}

impl HaState {
    pub(super) fn new(settings: HaSettings) -> Self {
        HaState {
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

    /// Source routes are used only with floating addresses (they need one to leave from).
    pub(super) fn routes_configured(&self) -> bool {
        !self.settings.vips.is_empty()
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

    /// [`HaState::persisted`] borrowed (the book is not copied).
    pub(super) fn saved(&self) -> HaSaved<'_> {
        HaSaved {
            draining: self.role.draining(),
            activity: &self.book,
            vips_present: self.role.vips_present().iter().copied().collect(),
            operator: self.role.operator(),
            active_since_unix_ms: self.active_since.map(unix_ms),
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

    /// When the next batch of the running round is due (monotonic).
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

    pub(super) fn answer(&self) -> Answer {
        Answer {
            role: self.role.role(),
            draining: self.role.draining(),
        }
    }

    pub(super) fn failed(&mut self, what: &str, error: String) {
        warn!(%error, "HA: {what} failed");
        self.failures += 1;
        self.last_error = Some(format!("{what}: {error}"));
    }
}

impl Machine {
    /// An operator's command; its answer is [`Machine::ha_answer`] once the actions ran.
    pub fn handle_ha_command(&mut self, command: Command, now: Now) {
        self.input(now);
        match command {
            Command::Drain | Command::Undrain => {
                let draining = command == Command::Drain;
                if self.ha.role.set_draining(draining) {
                    info!(draining, "HA: {} by the operator", command.name());
                    // Kept until undrain, across restarts.
                    self.spawn(Job::Save);
                }
            }
            Command::Activate => self.spawn(Job::HaInput(RoleInput::Operator(Operator::Activate))),
            Command::Deactivate => {
                self.spawn(Job::HaInput(RoleInput::Operator(Operator::Deactivate)))
            }
        }
        self.run();
    }

    /// The floating addresses present on the host (the address watcher's report).
    pub fn handle_vips_present(&mut self, set: BTreeSet<IpAddr>, now: Now) {
        self.input(now);
        debug!(present = ?set, "HA: floating addresses on this host");
        self.ha.last_error = self
            .ha
            .last_error
            .take()
            .filter(|e| !e.starts_with("address watcher"));
        self.spawn(Job::HaInput(RoleInput::VipsPresent(set)));
        self.run();
    }

    /// The address watcher failed (it is started again by the driver).
    pub fn handle_vip_watch_failed(&mut self, error: String, now: Now) {
        self.input(now);
        self.ha.failed("address watcher", error);
        self.run();
    }

    pub(super) fn ha_input(&mut self, input: RoleInput) {
        let before = self.ha.role.clone();
        if let Some(transition) = self.ha.role.handle(input) {
            self.on_transition(transition);
        }
        if self.ha.role != before {
            // The role's inputs are kept across restarts.
            self.spawn(Job::Save);
        }
    }

    fn on_transition(&mut self, t: Transition) {
        info!(role = %t.to, reason = %t.reason, "HA: role changed");
        match t.to {
            Role::Active => {
                // A second round in the same active period keeps its start.
                let wall = self.now.wall;
                self.ha.active_since.get_or_insert(wall);
                self.ha.takeovers += 1;
                // One takeover round: planned from a fresh read.
                self.read(
                    "takeover",
                    AfterRead::Takeover {
                        reason: t.reason.to_string(),
                    },
                );
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
                self.spawn(Job::Act(Action::ClearSourceRoutes));
            }
        }
    }

    /// After the takeover's read (the model, when it succeeded): the round's plan, then
    /// routes for its endpoints.
    pub(super) fn plan_round(&mut self, reason: &str) {
        let wall = self.now.wall;
        // A session made since this gateway became active is with this gateway now: never
        // stale, never re-created (only older ones can be another gateway's leftovers).
        let active_since = self.ha.active_since.unwrap_or(wall);
        let handshakes_here: BTreeMap<Key, SystemTime> = self
            .model
            .iter()
            .filter(|_| self.backend_error.is_none())
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
            now: wall,
            window: self.ha.settings.takeover_window,
        });
        info!(
            kicks = plan.kicks.len(),
            recreate = plan.recreated(),
            skipped_no_endpoint = plan.skipped_no_endpoint,
            window_secs = self.ha.settings.takeover_window.as_secs(),
            "HA: takeover round"
        );
        let round = Round {
            reason: reason.to_string(),
            plan,
        };
        if !self.ha.routes_configured() {
            return self.routes_installed(round, Ok(0));
        }
        let endpoints: Vec<SocketAddr> = round
            .plan
            .kicks
            .iter()
            .map(|k| k.endpoint)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let vips: Vec<IpAddr> = self.ha.role.vips_present().iter().copied().collect();
        self.request(
            Action::InstallSourceRoutes { vips, endpoints },
            Wait::RoutesInstalled(Box::new(round)),
        );
    }

    pub(super) fn routes_installed(&mut self, round: Round, result: Result<usize, String>) {
        let source_routes = result.unwrap_or_else(|e| {
            // The kicks still go out (from the address the main table picks).
            self.ha.failed("installing source routes", e);
            0
        });
        let plan = round.plan;
        self.ha.last_takeover = Some(TakeoverStatus {
            at_unix_ms: unix_ms(self.now.wall),
            reason: round.reason,
            kicked: 0,
            planned: plan.kicks.len(),
            recreated: plan.recreated(),
            skipped_no_endpoint: plan.skipped_no_endpoint,
            source_routes,
        });
        self.ha.round = Some(Pacer::new(
            plan.kicks,
            self.ha.settings.takeover_rate,
            self.now.mono,
        ));
        self.kick_due();
    }

    /// Sends the batch of the running round that is due.
    pub(super) fn kick_due(&mut self) {
        let now = self.now.mono;
        let Some(batch) = self.ha.round.as_mut().and_then(|r| r.poll_batch(now)) else {
            return;
        };
        if self.ha.next_kick().is_none() {
            self.ha.round = None;
        }
        self.spawn(Job::AfterKick);
        self.kick(batch);
    }

    /// A round that ended with re-created peers: their epochs are saved (one write).
    pub(super) fn after_kick(&mut self) {
        if self.ha.round.is_none() && std::mem::take(&mut self.ha.epochs_unsaved) {
            self.spawn(Job::Save);
        }
    }

    fn kick(&mut self, batch: Vec<Kick>) {
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
        let recreated = batch
            .iter()
            .filter(|k| k.recreate)
            .map(|k| k.peer.public_key)
            .collect();
        let count = batch.len();
        self.request(Action::Kick(batch), Wait::Kicked { count, recreated });
    }

    pub(super) fn kicked(&mut self, count: usize, recreated: Vec<Key>, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.ha.kicks += count as u64;
                if let Some(t) = &mut self.ha.last_takeover {
                    t.kicked += count;
                }
                for key in &recreated {
                    // New counters: a new run for the Core (the `counter_epoch` rule).
                    self.epochs.start(*key, &mut self.rng);
                }
                debug!(
                    kicks = count,
                    recreated = recreated.len(),
                    "HA: handshakes initiated"
                );
                self.ha.epochs_unsaved |= !recreated.is_empty();
            }
            Err(e) => self.ha.failed(&format!("kicking {count} peers"), e),
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
