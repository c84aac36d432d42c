//! A virtual-time driver for the agent's state machine: a scripted Core (it feeds
//! `CoreMessage`s, records what the machine sends, stores each event once and acks it,
//! and, like the reference Core, ends an MFA session by removing the peer), the kernel as
//! the in-memory backend (`plan::simulate` with injectable failures and drift), an
//! in-memory store modelled as the real one is (a base and a journal: a restart is a new
//! machine restored from the base with the journal's records replayed), and a clock
//! that jumps from one deadline to the next. Nothing sleeps: minutes pass in microseconds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use gatehouse::agent::client::CoreSettings;
use gatehouse::agent::machine::AppendError;
use gatehouse::agent::machine::{Action, Machine, Now, Outcome};
use gatehouse::agent::status::Status;
use gatehouse::agent::steps::execute_phases;
use gatehouse::agent::Settings;
use gatehouse::backend::memory::MemoryBackend;
use gatehouse::backend::Backend as _;
use gatehouse::config::{HooksConfig, Secret, TokenSource};
use gatehouse::hooks::{Hook, Hooks};
use gatehouse::model::{DeviceSink as _, Key};
use gatehouse::state::{journal, PersistedState, Record};
use gatehouse_proto::v1::{self, core_message::Kind as In, gateway_message::Kind as Out};

pub const S: Duration = Duration::from_secs(1);

pub fn key(n: u8) -> Key {
    Key([n; 32])
}

pub fn peer(n: u8, session: u64) -> v1::Peer {
    v1::Peer {
        id: n as u64,
        public_key: key(n).0.to_vec(),
        allowed_ips: vec![format!("10.0.0.{}/32", 10 + n)],
        mfa_session: session,
        ..Default::default()
    }
}

pub fn location(peers: Vec<v1::Peer>, mfa_threshold: Option<u32>) -> v1::Location {
    v1::Location {
        id: 1,
        name: "sim".into(),
        interface: Some(v1::Interface {
            private_key: vec![1; 32],
            listen_port: 51820,
            addresses: vec!["10.0.0.1/24".into()],
            mtu: 1420,
            fwmark: 0,
        }),
        peers,
        firewall: None,
        mfa: mfa_threshold.map(|t| v1::MfaSettings {
            enabled: true,
            disconnect_threshold_secs: t,
        }),
    }
}

pub fn settings() -> Settings {
    Settings {
        name: "sim-gateway".into(),
        interface: "wgsim0".into(),
        backend_name: "memory".into(),
        state_dir: PathBuf::from("/nonexistent"),
        core: CoreSettings {
            url: "http://core.invalid".into(),
            token: TokenSource::Inline(Secret::new("t".into())),
            ca_pem: None,
            client_identity: None,
            connect_timeout: 2 * S,
            keepalive_interval: 2 * S,
            backoff_base: S,
            backoff_max: 30 * S,
        },
        stats_interval: S,
        resync_interval: 10 * S,
        offline_remove_after: None,
        remove_on_shutdown: false,
        gateway_id: Some("gw-sim".into()),
        http_listen: None,
        peer_metrics_limit: gatehouse::config::DEFAULT_PEER_METRICS_LIMIT,
        hooks: Hooks::new(HooksConfig::default(), "wgsim0"),
        firewall: Default::default(),
        ha: Default::default(),
    }
}

/// The scripted Core.
#[derive(Default)]
pub struct ScriptedCore {
    pub up: bool,
    pub revision: u64,
    pub location: Option<v1::Location>,
    /// Each event stored once, by seq.
    pub events: BTreeMap<u64, v1::PeerEvent>,
    /// Event deliveries, repeats included.
    pub deliveries: usize,
    pub applied: Vec<v1::Applied>,
    pub snapshot_requests: usize,
    pub stats: usize,
    /// The peers of each `Stats` message received, in order.
    pub stats_peers: Vec<Vec<Key>>,
    /// Messages to the gateway not delivered yet.
    pub outbox: Vec<v1::CoreMessage>,
    /// Acks are sent (off: the Core stores events but its acks are lost).
    pub acks: bool,
}

impl ScriptedCore {
    /// A new revision of the location, sent as a snapshot when the stream is up.
    pub fn publish(&mut self, location: v1::Location) {
        self.revision += 1;
        self.location = Some(location);
        if self.up {
            self.send_snapshot();
        }
    }

    pub fn send_snapshot(&mut self) {
        self.outbox.push(v1::CoreMessage {
            kind: Some(In::Snapshot(v1::Snapshot {
                revision: self.revision,
                location: self.location.clone(),
            })),
        });
    }

    fn on_event(&mut self, e: v1::PeerEvent) {
        self.deliveries += 1;
        let seq = e.seq;
        if let std::collections::btree_map::Entry::Vacant(slot) = self.events.entry(seq) {
            let key = e.public_key.clone();
            slot.insert(e);
            // The session ends: the peer leaves the location (every gateway).
            if let Some(mut loc) = self.location.clone() {
                loc.peers.retain(|p| p.public_key != key);
                self.publish(loc);
            }
        }
        if self.acks {
            self.outbox.push(v1::CoreMessage {
                kind: Some(In::EventAck(v1::EventAck { up_to_seq: seq })),
            });
        }
    }

    fn receive(&mut self, m: v1::GatewayMessage) {
        match m.kind {
            Some(Out::PeerEvent(e)) => self.on_event(e),
            Some(Out::Applied(a)) => self.applied.push(a),
            Some(Out::SnapshotRequest(_)) => {
                self.snapshot_requests += 1;
                self.send_snapshot();
            }
            Some(Out::Stats(s)) => {
                self.stats += 1;
                let keys = s
                    .peers
                    .iter()
                    .filter_map(|p| Key::from_slice(&p.public_key));
                self.stats_peers.push(keys.collect());
            }
            _ => {}
        }
    }

    /// The events stored for `k`.
    pub fn events_of(&self, k: Key) -> usize {
        self.events.values().filter(|e| e.public_key == k.0).count()
    }
}

/// One action as the trace records it.
fn kind(a: &Action) -> String {
    match a {
        Action::RunHook(h) => format!("hook {h:?}"),
        Action::CheckBackend => "check".into(),
        Action::Read { trigger, .. } => format!("read {trigger}"),
        Action::Apply { plan, .. } => format!("apply {}", plan.summary()),
        Action::Firewall { .. } => "firewall".into(),
        Action::FirewallPeers { .. } => "firewall peers".into(),
        Action::FirewallOff { .. } => "firewall off".into(),
        Action::Save => "save".into(),
        Action::Append(_) => "append".into(),
        Action::Send { mode, .. } => format!("send {mode:?}"),
        Action::SendStats(_) => "send Stats".into(),
        Action::Kick(_) => "kick".into(),
        Action::InstallSourceRoutes { .. } => "routes".into(),
        Action::ClearSourceRoutes => "clear routes".into(),
        Action::Publish(_) => "publish".into(),
        Action::PublishDiff { .. } => "diff".into(),
        Action::PublishPeers(_) => "peers".into(),
        Action::RemoveInterface => "remove interface".into(),
    }
}

/// What the store holds: the base with the journal's plain-data records applied (what
/// `StateStore::open` loads) and the journal's `Deltas` records (`take_replay`).
#[derive(Clone, Debug)]
pub struct Disk {
    pub state: PersistedState,
    pub replay: Vec<Record>,
}

impl std::ops::Deref for Disk {
    type Target = PersistedState;
    fn deref(&self) -> &PersistedState {
        &self.state
    }
}

/// One write to the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// A full save of this many bytes (the JSON of the state).
    Full(usize),
    /// An append of this many bytes (the framed records).
    Append(usize),
}

/// The world around one machine.
pub struct Sim {
    pub settings: Settings,
    pub machine: Machine,
    pub kernel: MemoryBackend,
    pub core: ScriptedCore,
    /// What the store held after each write, oldest first.
    pub saves: Vec<Disk>,
    /// Each write, oldest first.
    pub writes: Vec<Write>,
    /// The base on disk and its journal.
    pub base: Option<PersistedState>,
    pub journal: Vec<Record>,
    /// Fails saves and appends.
    pub fail_saves: bool,
    /// Fails appends only.
    pub fail_appends: bool,
    /// Fails the firewall step with this error.
    pub fail_firewall: Option<String>,
    /// Fails reads midway: the first peer goes into the lent model, then the read fails.
    pub fail_reads: bool,
    /// The driver refuses stats reports (the last one still on its way).
    pub refuse_stats: bool,
    /// Appends are possible (a full save succeeded since the store opened with no base,
    /// or since a save failed).
    journal_open: bool,
    pub trace: Vec<String>,
    /// (hook, the link existed, peers on the interface)
    pub hooks: Vec<(Hook, bool, usize)>,
    pub status: Status,
    /// The last peer table published.
    pub peers: gatehouse::agent::peers::PeerTable,
    /// Each apply's peer removals, with how many states had been saved before it.
    pub removals: Vec<(Vec<Key>, usize)>,
    /// Peers with traffic: their counters grow before every timer.
    pub active: BTreeSet<Key>,
    /// Virtual time since the sim began, and since this machine's start.
    pub clock: Duration,
    pub started_at: Duration,
    pub wall0: SystemTime,
    seed: u64,
}

impl Sim {
    pub fn new(settings: Settings) -> Sim {
        let wall0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let now = Now {
            mono: Duration::ZERO,
            wall: wall0,
        };
        let machine = Machine::new(
            settings.clone(),
            "gw-sim".into(),
            None,
            None,
            vec![],
            1,
            now,
        );
        Sim {
            settings,
            machine,
            kernel: MemoryBackend::new("wgsim0"),
            core: ScriptedCore {
                acks: true,
                ..Default::default()
            },
            saves: vec![],
            writes: vec![],
            base: None,
            journal: vec![],
            fail_saves: false,
            fail_appends: false,
            fail_firewall: None,
            fail_reads: false,
            refuse_stats: false,
            journal_open: false,
            trace: vec![],
            hooks: vec![],
            status: Status::default(),
            peers: Default::default(),
            removals: vec![],
            active: BTreeSet::new(),
            clock: Duration::ZERO,
            started_at: Duration::ZERO,
            wall0,
            seed: 1,
        }
    }

    pub fn now(&self) -> Now {
        Now {
            mono: self.clock - self.started_at,
            wall: self.wall0 + self.clock,
        }
    }

    pub fn start(&mut self) {
        let now = self.now();
        self.machine.handle_start(now);
        self.drain();
    }

    /// Shutdown (SIGTERM): the machine's stop actions run.
    pub fn stop(&mut self) {
        let now = self.now();
        self.machine.handle_shutdown(now);
        self.drain();
    }

    /// A new process (after a kill, a reboot or a stop) restored from `disk`, `after`
    /// the old one stopped; the kernel keeps what it had unless the caller changed it.
    /// The store then holds `disk` (a journal's records stay until the next full save).
    pub fn restart(&mut self, disk: Option<Disk>, after: Duration) {
        self.clock += after;
        self.started_at = self.clock;
        self.seed += 1;
        self.core.up = false;
        self.core.outbox.clear();
        let (state, replay) = match disk {
            Some(d) => (Some(d.state), d.replay),
            None => (None, vec![]),
        };
        self.journal_open = state.is_some();
        self.base = state.clone();
        self.journal = replay.clone();
        self.machine = Machine::new(
            self.settings.clone(),
            "gw-sim".into(),
            None,
            state,
            replay,
            self.seed,
            self.now(),
        );
        self.start();
    }

    /// What the store holds now (None before the first full save).
    pub fn last_save(&self) -> Option<Disk> {
        let mut state = self.base.clone()?;
        let mut replay = vec![];
        for r in &self.journal {
            match r {
                Record::Deltas { .. } => replay.push(r.clone()),
                r => journal::apply(&mut state, r),
            }
        }
        Some(Disk { state, replay })
    }

    fn journal_bytes(&self) -> usize {
        let mut buf = vec![];
        journal::encode(&self.journal, &mut buf).expect("records encode");
        buf.len()
    }

    /// The Core's stream opens: Hello (its events stored and acked), then a snapshot.
    pub fn connect(&mut self) {
        let now = self.now();
        self.machine.handle_core_batch_end(now);
        self.drain();
        let hello = self.machine.handle_hello_wanted(now);
        self.core.up = true;
        for e in hello.pending_events {
            self.core.on_event(e);
        }
        self.core.send_snapshot();
        self.machine.handle_connected(now);
        self.drain();
        self.deliver();
    }

    pub fn disconnect(&mut self) {
        let now = self.now();
        self.core.up = false;
        self.core.outbox.clear();
        self.machine.handle_core_batch_end(now);
        self.drain();
        self.machine
            .handle_disconnected("the Core is down".into(), S, 30 * S, now);
        self.drain();
    }

    /// Delivers the Core's messages in batches until it has nothing more to say.
    pub fn deliver(&mut self) {
        while self.core.up && !self.core.outbox.is_empty() {
            let batch = std::mem::take(&mut self.core.outbox);
            for m in batch {
                let now = self.now();
                self.machine.handle_core_message(m, now);
                self.drain();
            }
            let now = self.now();
            self.machine.handle_core_batch_end(now);
            self.drain();
        }
    }

    /// Virtual time passes: each deadline the machine asks for is served in turn.
    pub fn advance(&mut self, d: Duration) {
        let end = self.clock + d;
        loop {
            let at = self.machine.poll_timeout().at + self.started_at;
            if at > end {
                break;
            }
            self.clock = self.clock.max(at);
            self.traffic();
            let now = self.now();
            self.machine.handle_timeout(now);
            self.drain();
            self.deliver();
        }
        self.clock = end;
    }

    fn traffic(&mut self) {
        let wall = self.now().wall;
        let active = self.active.clone();
        self.kernel.modify(|o| {
            for k in &active {
                if let Some(p) = o.device.peers.get_mut(k) {
                    p.rx_bytes += 1000;
                    p.last_handshake = Some(wall);
                }
            }
        });
    }

    pub fn has(&self, k: Key) -> bool {
        self.kernel.state().device.peers.contains_key(&k)
    }

    /// Runs the machine's actions, feeding each outcome back, until it has none.
    pub fn drain(&mut self) {
        while let Some(action) = self.machine.poll_action() {
            self.trace.push(kind(&action));
            if let Some(outcome) = self.execute(action) {
                let now = self.now();
                self.machine.handle_outcome(outcome, now);
            }
        }
    }

    /// Executes one action as the store, the kernel and the Core would.
    pub fn execute(&mut self, action: Action) -> Option<Outcome> {
        Some(match action {
            Action::RunHook(h) => {
                let state = self.kernel.state();
                self.hooks
                    .push((h, state.link.is_some(), state.device.peers.len()));
                return None;
            }
            Action::CheckBackend => Outcome::BackendChecked(Ok(None)),
            Action::Read { mut into, .. } if self.fail_reads => {
                let mut refresh = into.model().refresh();
                if let Some(first) = self.kernel.state().device.peers.into_values().next() {
                    refresh.peer(first);
                }
                drop(refresh);
                Outcome::Read(into, Err("read failed midway".into()))
            }
            Action::Read { mut into, .. } => {
                let read = self.kernel.observe_into(into.model());
                Outcome::Read(into, read.map_err(|e| e.to_string()))
            }
            Action::Apply { trigger, plan } => {
                let removed = plan
                    .steps
                    .iter()
                    .filter_map(|s| match &s.op {
                        gatehouse::plan::Op::RemovePeer(k) => Some(*k),
                        _ => None,
                    })
                    .collect();
                self.removals.push((removed, self.saves.len()));
                let (done, outcomes) = execute_phases(&mut self.kernel, plan, &trigger);
                Outcome::Applied {
                    applied: done.applied,
                    outcomes,
                }
            }
            Action::Firewall { .. } | Action::FirewallPeers { .. } | Action::FirewallOff { .. } => {
                Outcome::Firewall(self.fail_firewall.clone().map_or(Ok(()), Err))
            }
            Action::Save => {
                let state = Box::new(self.machine.persisted());
                // The store writes the borrowed view: the same JSON as the owned state.
                let written =
                    serde_json::to_vec(&self.machine.state_to_save()).expect("state encodes");
                assert!(
                    written == serde_json::to_vec(&*state).expect("state encodes"),
                    "the saved view serializes as the persisted state"
                );
                if self.fail_saves {
                    // As the store: the files on disk stay, appends wait for a save that
                    // succeeds.
                    self.journal_open = false;
                    Outcome::Saved(Err("disk full".into()))
                } else {
                    let bytes = written.len();
                    self.writes.push(Write::Full(bytes));
                    self.base = Some(*state);
                    self.journal.clear();
                    self.journal_open = true;
                    self.saves.extend(self.last_save());
                    Outcome::Saved(Ok(()))
                }
            }
            Action::Append(records) => {
                let base = self
                    .base
                    .as_ref()
                    .map_or(0, |b| serde_json::to_vec(b).expect("state encodes").len());
                if self.base.is_none() || !self.journal_open {
                    Outcome::Appended(Err(AppendError::Failed("no journal".into())))
                } else if self.journal_bytes() > base {
                    Outcome::Appended(Err(AppendError::Compact))
                } else if self.fail_saves || self.fail_appends {
                    Outcome::Appended(Err(AppendError::Failed("disk full".into())))
                } else {
                    let mut buf = vec![];
                    journal::encode(&records, &mut buf).expect("records encode");
                    self.writes.push(Write::Append(buf.len()));
                    self.journal.extend(records);
                    self.saves.extend(self.last_save());
                    Outcome::Appended(Ok(buf.len() as u64))
                }
            }
            Action::Send { messages, .. } => {
                if !self.core.up {
                    return Some(Outcome::Sent(0));
                }
                let n = messages.len();
                for m in messages {
                    self.core.receive(m);
                }
                Outcome::Sent(n)
            }
            Action::SendStats(report) => {
                if !self.core.up || self.refuse_stats {
                    return Some(Outcome::StatsRefused(report));
                }
                for stats in report {
                    self.core.receive(v1::GatewayMessage {
                        kind: Some(Out::Stats(stats)),
                    });
                }
                Outcome::Sent(1)
            }
            Action::Kick(batch) => {
                Outcome::Kicked(self.kernel.kick(&batch).map_err(|e| e.to_string()))
            }
            Action::InstallSourceRoutes { .. } => Outcome::RoutesInstalled(Ok(0)),
            Action::ClearSourceRoutes => Outcome::RoutesCleared(Ok(())),
            Action::Publish(s) => {
                self.status = *s;
                return None;
            }
            Action::PublishDiff { .. } => return None,
            Action::PublishPeers(table) => {
                self.peers = *table;
                return None;
            }
            Action::RemoveInterface => {
                let _ = self.kernel.remove();
                return None;
            }
        })
    }

    /// How many actions of the trace since `from` start with `prefix`.
    pub fn count_since(&self, from: usize, prefix: &str) -> usize {
        self.trace[from..]
            .iter()
            .filter(|t| t.starts_with(prefix))
            .count()
    }
}
