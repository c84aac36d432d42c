//! The chaos drill's acts as they run: crashes and restarts, cuts (nftables drops in the
//! gateway's namespace), admin changes through the Core's API and drift made by hand.
//! Each act notes what it did, or why it could not, in the timeline. What the drill knows
//! of the world (its churn peers, the MFA sessions it started and their preshared keys)
//! is the [`Model`]; it changes only on answers the Core gave, and the end checks read
//! the Core, not the model, for what is desired.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use gatehouse_core::api::{
    FirewallPolicy, FirewallRule, NewPeer, PeerPatch, PortRange, Protocol, Verdict,
};

use super::schedule::{gateway_label, location_of, Act, Admin, Drift, Rng, Target};
use super::{World, CORE_GRPC_PORT, CORE_WAN};

/// How long an admin call may take before the drill gives up on it (the Core may be
/// SIGKILLed under it).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A churn peer the drill added (no client behind it).
#[derive(Clone, Debug)]
pub struct Churn {
    pub id: u64,
    pub public_key: String,
    pub allowed_ips: Vec<String>,
    /// The MFA session the drill started for it, if any and not ended by the drill.
    pub session: Option<u64>,
}

/// An MFA session the drill started.
#[derive(Clone, Debug)]
pub struct Session {
    pub location: usize,
    pub peer_id: u64,
    pub preshared_key: String,
    /// The drill ended it (end session, peer removed or re-keyed), or a call that would
    /// have ended it went unanswered: it may end without an expiry event.
    pub ended_by_drill: bool,
}

/// What the drill knows it made.
#[derive(Default)]
pub struct Model {
    /// Per location: its churn peers by id.
    pub churn: BTreeMap<usize, BTreeMap<u64, Churn>>,
    /// Every session the drill started, by id.
    pub sessions: BTreeMap<u64, Session>,
    /// Peers (by id) the drill removed or re-keyed, or may have (unanswered calls): their
    /// counters are not compared.
    pub recreated: BTreeSet<u64>,
    /// The next fresh address for a churn peer's allowed IPs.
    next_address: u32,
    /// Counts by outcome, for the summary.
    pub done: BTreeMap<&'static str, u64>,
    pub failed: BTreeMap<&'static str, u64>,
}

impl Model {
    /// A fresh /32 for a churn peer of location `l`: 10.(77+l).(1..).(1..250), never reused.
    fn fresh_address(&mut self, l: usize) -> String {
        let n = self.next_address;
        self.next_address += 1;
        format!("10.{}.{}.{}/32", 77 + l, 1 + n / 250, 1 + n % 250)
    }

    fn pick(&self, l: usize, pick: u64, want: impl Fn(&Churn) -> bool) -> Option<&Churn> {
        let list: Vec<&Churn> = self.churn.get(&l)?.values().filter(|c| want(c)).collect();
        if list.is_empty() {
            return None;
        }
        Some(list[(pick % list.len() as u64) as usize])
    }
}

/// 32 bytes drawn from `rng`, in base64: a public key nobody holds (WireGuard takes any).
fn random_key(rng: &mut Rng) -> String {
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A firewall policy drawn from `pick` for location `l`: a random default verdict and up
/// to four random rules, after a first rule (priority 0, given first) that accepts ICMP
/// from the location's clients, so their pings always pass. One in eight is disabled.
pub fn random_policy(l: usize, pick: u64) -> FirewallPolicy {
    let mut rng = Rng::new(pick);
    let verdict = |rng: &mut Rng| {
        if rng.below(2) == 0 {
            Verdict::Accept
        } else {
            Verdict::Drop
        }
    };
    let mut rules = vec![FirewallRule {
        priority: 0,
        sources: vec![format!("10.{}.0.0/24", 77 + l)],
        destinations: vec![],
        ports: vec![],
        protocols: vec![Protocol::Icmp],
        verdict: Verdict::Accept,
        comment: "the drill's clients ping".into(),
    }];
    for _ in 0..rng.below(5) {
        let mut sources = vec![];
        for _ in 0..rng.below(3) {
            sources.push(format!("10.{}.{}.0/24", 77 + l, 1 + rng.below(4)));
        }
        let mut destinations = vec![];
        for _ in 0..rng.below(3) {
            let a = 1 + rng.below(200);
            destinations.push(match rng.below(3) {
                0 => format!("198.51.100.{a}"),
                1 => format!("198.51.100.{a}-198.51.100.{}", a + rng.below(50)),
                _ => format!("192.0.2.0/{}", 24 + rng.below(8)),
            });
        }
        let protocols = match rng.below(4) {
            0 => vec![Protocol::Tcp],
            1 => vec![Protocol::Udp],
            2 => vec![Protocol::Tcp, Protocol::Udp],
            _ => vec![],
        };
        let ports = if protocols.contains(&Protocol::Tcp) || protocols.contains(&Protocol::Udp) {
            (0..rng.below(3))
                .map(|_| {
                    let start = 1 + rng.below(60000) as u32;
                    PortRange {
                        start,
                        end: start + rng.below(100) as u32,
                    }
                })
                .collect()
        } else {
            vec![]
        };
        rules.push(FirewallRule {
            priority: 1 + rng.below(100) as u32,
            sources,
            destinations,
            ports,
            protocols,
            verdict: verdict(&mut rng),
            comment: String::new(),
        });
    }
    FirewallPolicy {
        enabled: rng.below(8) != 0,
        default_verdict: verdict(&mut rng),
        rules,
    }
}

impl World {
    /// Runs one act of the schedule.
    pub async fn act(&mut self, act: Act) {
        match act {
            Act::Kill(Target::Core) => {
                self.core.kill();
                self.timeline.note("core SIGKILLed");
            }
            Act::Restart(Target::Core) => {
                self.core.start_again();
                self.timeline.note("core started again");
            }
            Act::Kill(Target::Agent(gw)) => {
                self.gws[gw].kill_agent();
                self.timeline
                    .note(format!("agent {} SIGKILLed", gateway_label(gw)));
            }
            Act::Restart(Target::Agent(gw)) => {
                self.gws[gw].start_agent();
                self.timeline
                    .note(format!("agent {} started again", gateway_label(gw)));
            }
            Act::CutStart(gw) => {
                let rules = format!(
                    "table ip chaos_cut {{\n\
                     chain out {{ type filter hook output priority 0; policy accept; \
                     ip daddr {CORE_WAN} tcp dport {CORE_GRPC_PORT} drop; }}\n\
                     chain in {{ type filter hook input priority 0; policy accept; \
                     ip saddr {CORE_WAN} tcp sport {CORE_GRPC_PORT} drop; }}\n}}\n"
                );
                let ok = self.gw_nft_script(gw, &rules).await;
                self.timeline.note(format!(
                    "cut gateway {} off the Core{}",
                    gateway_label(gw),
                    if ok { "" } else { " FAILED" }
                ));
                assert!(ok, "nft could not cut gateway {}", gateway_label(gw));
            }
            Act::CutEnd(gw) => {
                let out = self.gws[gw]
                    .exec("nft", &["delete", "table", "ip", "chaos_cut"])
                    .await;
                assert!(out.status.success(), "nft: the cut table is gone");
                self.timeline.note(format!(
                    "gateway {} reaches the Core again",
                    gateway_label(gw)
                ));
            }
            Act::Admin(a) => self.admin_act(a).await,
            Act::Drift(gw, d) => self.drift(gw, d).await,
        }
    }

    async fn gw_nft_script(&self, gw: usize, script: &str) -> bool {
        use tokio::io::AsyncWriteExt as _;
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.gws[gw].ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nft");
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = stdin.write_all(script.as_bytes()).await;
        drop(stdin);
        child.wait().await.map(|s| s.success()).unwrap_or(false)
    }

    fn outcome<T, E: std::fmt::Display>(
        &mut self,
        what: &'static str,
        detail: String,
        r: &Result<Result<T, E>, tokio::time::error::Elapsed>,
    ) -> bool {
        match r {
            Ok(Ok(_)) => {
                *self.model.done.entry(what).or_default() += 1;
                self.timeline.note(format!("admin {what}: {detail}"));
                true
            }
            Ok(Err(e)) => {
                *self.model.failed.entry(what).or_default() += 1;
                self.timeline
                    .note(format!("admin {what}: {detail}: refused: {e}"));
                false
            }
            Err(_) => {
                *self.model.failed.entry(what).or_default() += 1;
                self.timeline.note(format!(
                    "admin {what}: {detail}: no answer in {CALL_TIMEOUT:?}"
                ));
                false
            }
        }
    }

    async fn admin_act(&mut self, a: Admin) {
        let t = CALL_TIMEOUT;
        match a {
            Admin::AddPeer { location: l } => {
                let key = random_key(&mut Rng::new(self.model.next_address as u64 ^ self.seed));
                let address = self.model.fresh_address(l);
                let new = NewPeer {
                    public_key: key.clone(),
                    allowed_ips: vec![address.clone()],
                    ..Default::default()
                };
                let id = self.locations[l].id;
                let r = tokio::time::timeout(t, self.admin.add_peer(id, &new)).await;
                if self.outcome("add peer", format!("l{l} {address}"), &r) {
                    if let Ok(Ok(view)) = r {
                        self.model.churn.entry(l).or_default().insert(
                            view.id,
                            Churn {
                                id: view.id,
                                public_key: key,
                                allowed_ips: vec![address],
                                session: None,
                            },
                        );
                    }
                }
            }
            Admin::ChangeAllowedIps { location: l, pick } => {
                let Some(c) = self.model.pick(l, pick, |_| true).cloned() else {
                    return;
                };
                let address = self.model.fresh_address(l);
                let patch = PeerPatch {
                    allowed_ips: Some(vec![address.clone()]),
                    ..Default::default()
                };
                let id = self.locations[l].id;
                let r = tokio::time::timeout(t, self.admin.patch_peer(id, c.id, &patch)).await;
                if self.outcome(
                    "allowed IPs",
                    format!("l{l} peer {} -> {address}", c.id),
                    &r,
                ) {
                    if let Some(m) = self.model.churn.get_mut(&l).and_then(|m| m.get_mut(&c.id)) {
                        m.allowed_ips = vec![address];
                    }
                }
            }
            Admin::Rekey { location: l, pick } => {
                let Some(c) = self.model.pick(l, pick, |_| true).cloned() else {
                    return;
                };
                let key = random_key(&mut Rng::new(pick ^ self.seed));
                let patch = PeerPatch {
                    public_key: Some(key.clone()),
                    ..Default::default()
                };
                let id = self.locations[l].id;
                let r = tokio::time::timeout(t, self.admin.patch_peer(id, c.id, &patch)).await;
                // Answered or not, the peer may now be another one in the kernel.
                self.model.recreated.insert(c.id);
                self.end_session_in_model(c.session);
                if self.outcome("rekey", format!("l{l} peer {}", c.id), &r) {
                    if let Some(m) = self.model.churn.get_mut(&l).and_then(|m| m.get_mut(&c.id)) {
                        m.public_key = key;
                    }
                }
            }
            Admin::RemovePeer { location: l, pick } => {
                let Some(c) = self.model.pick(l, pick, |_| true).cloned() else {
                    return;
                };
                let id = self.locations[l].id;
                let r = tokio::time::timeout(t, self.admin.delete_peer(id, c.id)).await;
                self.model.recreated.insert(c.id);
                self.end_session_in_model(c.session);
                if self.outcome("remove peer", format!("l{l} peer {}", c.id), &r) {
                    if let Some(m) = self.model.churn.get_mut(&l) {
                        m.remove(&c.id);
                    }
                }
            }
            Admin::StartSession { pick } => {
                let l = 1;
                let Some(c) = self.model.pick(l, pick, |c| c.session.is_none()).cloned() else {
                    return;
                };
                let id = self.locations[l].id;
                let r = tokio::time::timeout(t, self.admin.start_mfa_session(id, c.id, None)).await;
                if self.outcome("start session", format!("l{l} peer {}", c.id), &r) {
                    if let Ok(Ok(started)) = r {
                        self.model.sessions.insert(
                            started.session_id,
                            Session {
                                location: l,
                                peer_id: c.id,
                                preshared_key: started.preshared_key,
                                ended_by_drill: false,
                            },
                        );
                        if let Some(m) = self.model.churn.get_mut(&l).and_then(|m| m.get_mut(&c.id))
                        {
                            m.session = Some(started.session_id);
                        }
                    }
                }
            }
            Admin::EndSession { pick } => {
                let l = 1;
                let Some(c) = self.model.pick(l, pick, |c| c.session.is_some()).cloned() else {
                    return;
                };
                let id = self.locations[l].id;
                let r = tokio::time::timeout(t, self.admin.end_mfa_session(id, c.id)).await;
                self.end_session_in_model(c.session);
                self.outcome("end session", format!("l{l} peer {}", c.id), &r);
                if let Some(m) = self.model.churn.get_mut(&l).and_then(|m| m.get_mut(&c.id)) {
                    m.session = None;
                }
            }
            Admin::Firewall { location: l, pick } => {
                let policy = random_policy(l, pick);
                let id = self.locations[l].id;
                let r = tokio::time::timeout(t, self.admin.put_firewall(id, &policy)).await;
                self.outcome(
                    "firewall",
                    format!(
                        "l{l} enabled {} default {:?}, {} rules",
                        policy.enabled,
                        policy.default_verdict,
                        policy.rules.len()
                    ),
                    &r,
                );
            }
        }
    }

    fn end_session_in_model(&mut self, session: Option<u64>) {
        if let Some(s) = session.and_then(|s| self.model.sessions.get_mut(&s)) {
            s.ended_by_drill = true;
        }
    }

    /// Drift by hand on gateway `gw`. Never on a client's peer: the drill's clients stay
    /// untouched so their pings and counters can be checked.
    async fn drift(&mut self, gw: usize, d: Drift) {
        let iface = self.gws[gw].paths.interface.clone();
        let table = format!("gatehouse_{iface}");
        let clients: BTreeSet<String> = self.clients.iter().map(|c| c.public_key.clone()).collect();
        let kernel_churn = |out: &std::process::Output| -> Vec<String> {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|k| !k.is_empty() && !clients.contains(*k))
                .map(str::to_owned)
                .collect()
        };
        let label = gateway_label(gw);
        let (what, args): (String, Vec<String>) = match d {
            Drift::RemovePeer { pick } | Drift::ChangeAllowedIps { pick } => {
                let out = self.gws[gw].exec("wg", &["show", &iface, "peers"]).await;
                let keys = kernel_churn(&out);
                if keys.is_empty() {
                    return;
                }
                let key = keys[(pick % keys.len() as u64) as usize].clone();
                if let Some(id) = self.peer_id_by_key(location_of(gw), &key) {
                    // Its counters restart in this kernel.
                    self.model.recreated.insert(id);
                }
                if matches!(d, Drift::RemovePeer { .. }) {
                    (
                        format!("wg: peer {key} removed"),
                        vec![
                            "set".into(),
                            iface.clone(),
                            "peer".into(),
                            key,
                            "remove".into(),
                        ],
                    )
                } else {
                    let to = format!("10.99.{}.{}/32", pick % 250, (pick >> 8) % 250);
                    (
                        format!("wg: peer {key} allowed IPs -> {to}"),
                        vec![
                            "set".into(),
                            iface.clone(),
                            "peer".into(),
                            key,
                            "allowed-ips".into(),
                            to,
                        ],
                    )
                }
            }
            Drift::AddRogue { pick } => {
                let key = random_key(&mut Rng::new(pick));
                let to = format!("10.98.{}.{}/32", pick % 250, (pick >> 8) % 250);
                (
                    format!("wg: rogue peer {key} ({to}) added"),
                    vec![
                        "set".into(),
                        iface.clone(),
                        "peer".into(),
                        key,
                        "allowed-ips".into(),
                        to,
                    ],
                )
            }
            Drift::DeleteTable => (
                "nft: table deleted".into(),
                vec!["delete".into(), "table".into(), "inet".into(), table],
            ),
            Drift::FlushPolicy => (
                "nft: policy chain flushed".into(),
                vec![
                    "flush".into(),
                    "chain".into(),
                    "inet".into(),
                    table,
                    "vpn".into(),
                ],
            ),
            Drift::AddRule { pick } => (
                "nft: foreign rule added to the policy chain".into(),
                vec![
                    "add".into(),
                    "rule".into(),
                    "inet".into(),
                    table,
                    "vpn".into(),
                    "ip".into(),
                    "saddr".into(),
                    format!("10.97.{}.{}", pick % 250, (pick >> 8) % 250),
                    "drop".into(),
                ],
            ),
        };
        let program = if what.starts_with("wg") { "wg" } else { "nft" };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.gws[gw].exec(program, &args).await;
        let result = if out.status.success() {
            String::new()
        } else {
            format!(" (failed: {})", String::from_utf8_lossy(&out.stderr).trim())
        };
        *self.model.done.entry("drift").or_default() += 1;
        self.timeline
            .note(format!("drift on {label}: {what}{result}"));
    }

    /// The id of a churn peer of location `l` by its public key, as the drill knows it.
    fn peer_id_by_key(&self, l: usize, key: &str) -> Option<u64> {
        self.model
            .churn
            .get(&l)?
            .values()
            .find(|c| c.public_key == key)
            .map(|c| c.id)
    }
}
