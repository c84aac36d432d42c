//! The chaos drill's end checks, each returning what still differs (`Err`) so the drill
//! can wait for convergence and report the last difference:
//!
//! - every gateway's kernel equals its location's desired state in the Core: interface key
//!   and port, tunnel address, peers with their allowed IPs, preshared keys (the session's
//!   own, where the drill saw it) and keepalive, and the firewall table as the agent
//!   renders the Core's policy;
//! - each MFA expiry event is stored once, and every session that ended without the drill
//!   ending it has one;
//! - the Core's stats totals equal the kernels' counters for peers never re-created;
//! - pings of the clients (pure: from the ping logs).

use std::collections::{BTreeMap, BTreeSet};

use gatehouse::firewall::diff::differences;
use gatehouse::firewall::nft::{image, Socket};
use gatehouse::firewall::{from_proto, render, Inputs};
use gatehouse_core::api::PeerView;

use super::schedule::{gateway_label, location_of, GATEWAYS};
use super::timeline::Answer;
use super::wg::Dump;
use super::{tunnel_address, World, LISTEN_PORT};

/// What one client's pings did over a period.
#[derive(Clone, Debug, PartialEq)]
pub struct PingFigures {
    pub sent: u64,
    pub lost: u64,
    /// The longest time without an answer (seconds).
    pub longest_gap: f64,
}

/// The pings sent from `from` to `to` (unix seconds) and how many went unanswered: the
/// sequence numbers between the first and the last answer of the period that have no
/// answer, plus the silence before the first and after the last answer counted at the
/// probe interval. Pure.
pub fn ping_figures(answers: &[Answer], from: f64, to: f64, interval: f64) -> PingFigures {
    let within: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.at >= from && a.at <= to)
        .collect();
    let expected = ((to - from) / interval).floor().max(0.0) as u64;
    let Some((first, last)) = within.first().zip(within.last()) else {
        return PingFigures {
            sent: expected,
            lost: expected,
            longest_gap: to - from,
        };
    };
    let seqs: BTreeSet<u64> = within.iter().map(|a| a.seq).collect();
    let span = last.seq.saturating_sub(first.seq) + 1;
    let missing_inside = span - seqs.len() as u64;
    let edge = ((first.at - from).max(0.0) / interval).floor() as u64
        + ((to - last.at).max(0.0) / interval).floor() as u64;
    PingFigures {
        sent: span + edge,
        lost: missing_inside + edge,
        longest_gap: super::timeline::longest_gap(answers, from, to),
    }
}

impl World {
    /// The Core's active peers of location `l`, by public key.
    async fn desired_peers(&self, l: usize) -> Result<BTreeMap<String, PeerView>, String> {
        let peers = self
            .admin
            .peers(self.locations[l].id)
            .await
            .map_err(|e| format!("peers of l{l}: {e}"))?;
        Ok(peers
            .into_iter()
            .filter(|p| p.active)
            .map(|p| (p.public_key.clone(), p))
            .collect())
    }

    /// `wg show <if> dump` of gateway `gw`.
    async fn dump(&self, gw: usize) -> Result<Dump, String> {
        self.gws[gw]
            .dump()
            .await
            .ok_or_else(|| format!("{}: no interface", gateway_label(gw)))
    }

    /// Ok when every gateway is synced and its kernel and firewall equal the desired state.
    pub async fn kernels_equal_desired(&self) -> Result<(), String> {
        let mut problems = vec![];
        for gw in 0..GATEWAYS {
            if let Err(e) = self.synced(gw).await {
                problems.push(e);
                continue;
            }
            if let Err(e) = self.kernel_equals_desired(gw).await {
                problems.push(e);
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    async fn kernel_equals_desired(&self, gw: usize) -> Result<(), String> {
        let l = location_of(gw);
        let label = gateway_label(gw);
        let loc = self
            .admin
            .location(self.locations[l].id)
            .await
            .map_err(|e| format!("location l{l}: {e}"))?;
        let desired = self.desired_peers(l).await?;
        let dump = self.dump(gw).await?;
        let mut diff = vec![];
        if dump.public_key != loc.public_key {
            diff.push(format!(
                "interface key {}, want {}",
                dump.public_key, loc.public_key
            ));
        }
        if dump.listen_port != loc.listen_port {
            diff.push(format!(
                "port {}, want {}",
                dump.listen_port, loc.listen_port
            ));
        }
        let iface = &self.gws[gw].paths.interface;
        let addrs = self.gws[gw]
            .exec("ip", &["-o", "addr", "show", "dev", iface])
            .await;
        let want_addr = format!(" {}/24 ", tunnel_address(l));
        if !String::from_utf8_lossy(&addrs.stdout).contains(&want_addr) {
            diff.push(format!("address{want_addr}missing"));
        }
        let have: BTreeSet<&String> = dump.peers.keys().collect();
        let want: BTreeSet<&String> = desired.keys().collect();
        for k in have.difference(&want) {
            diff.push(format!("peer {k} should not be there"));
        }
        for k in want.difference(&have) {
            diff.push(format!("peer {k} (id {}) is missing", desired[*k].id));
        }
        for (key, p) in &desired {
            let Some(k) = dump.peers.get(key) else {
                continue;
            };
            let mut allowed = p.allowed_ips.clone();
            allowed.sort();
            if k.config.allowed_ips != allowed {
                diff.push(format!(
                    "peer {} allowed IPs {:?}, want {allowed:?}",
                    p.id, k.config.allowed_ips
                ));
            }
            let keepalive = match p.persistent_keepalive {
                0 => "off".to_string(),
                n => n.to_string(),
            };
            if k.config.persistent_keepalive != keepalive {
                diff.push(format!(
                    "peer {} keepalive {}, want {keepalive}",
                    p.id, k.config.persistent_keepalive
                ));
            }
            let has_psk = k.config.preshared_key != "(none)";
            match p
                .mfa_session
                .as_ref()
                .and_then(|s| self.model.sessions.get(&s.id))
            {
                Some(s) => {
                    if k.config.preshared_key != s.preshared_key {
                        diff.push(format!(
                            "peer {}: not the preshared key of its session",
                            p.id
                        ));
                    }
                }
                None => {
                    let want_psk = p.has_preshared_key || p.mfa_session.is_some();
                    if has_psk != want_psk {
                        diff.push(format!(
                            "peer {}: preshared key {has_psk}, want {want_psk}",
                            p.id
                        ));
                    }
                }
            }
        }

        // The firewall table, as the agent renders the Core's policy (no masquerade).
        let pb = gatehouse_core::firewall_pb(loc.firewall.as_ref());
        let policy = from_proto(&pb).map_err(|e| format!("l{l} policy: {e}"))?;
        let rs = render(&Inputs {
            interface: iface,
            listen_port: LISTEN_PORT,
            policy: policy.as_ref(),
            masquerade: false,
        });
        let table = gatehouse::firewall::table_name(iface);
        let want_image = rs
            .as_ref()
            .map(image)
            .transpose()
            .map_err(|e| format!("image: {e}"))?;
        let have_image = self.nets.gws[gw]
            .enter(|| Socket::open().and_then(|mut s| s.read(&table)))
            .map_err(|e| format!("{label}: nft read: {e}"))?;
        diff.extend(differences(
            &table,
            want_image.as_ref(),
            have_image.as_ref(),
        ));

        if diff.is_empty() {
            Ok(())
        } else {
            Err(format!("{label}: {}", diff.join("; ")))
        }
    }

    /// Ok when no peer of the MFA location other than the clients has a session: every
    /// churn session ended, by the drill or by expiry.
    pub async fn churn_sessions_ended(&self) -> Result<(), String> {
        let l = 1;
        let clients: BTreeSet<u64> = self.clients.iter().map(|c| c.peer_id).collect();
        let peers = self
            .admin
            .peers(self.locations[l].id)
            .await
            .map_err(|e| format!("peers: {e}"))?;
        let open: Vec<String> = peers
            .iter()
            .filter(|p| !clients.contains(&p.id))
            .filter_map(|p| {
                p.mfa_session
                    .as_ref()
                    .map(|s| format!("peer {} session {}", p.id, s.id))
            })
            .collect();
        let lost: Vec<String> = peers
            .iter()
            .filter(|p| clients.contains(&p.id) && p.mfa_session.is_none())
            .map(|p| format!("client peer {} lost its session", p.id))
            .collect();
        if !lost.is_empty() {
            // Not a wait: a client's session must never end (it pings all along).
            panic!("{}", lost.join("; "));
        }
        if open.is_empty() {
            Ok(())
        } else {
            Err(format!("sessions still open: {}", open.join(", ")))
        }
    }

    /// Each MFA expiry event stored once (per gateway and sequence number, and per gateway
    /// and session), none ending a client's session, and every session the drill started and did not
    /// end has at least one. Returns (events, sessions expired).
    pub async fn events_once(&self) -> Result<(usize, usize), String> {
        let l = 1;
        let events = self
            .admin
            .events(self.locations[l].id)
            .await
            .map_err(|e| format!("events: {e}"))?;
        let mut problems = vec![];
        let mut by_seq = BTreeSet::new();
        let mut by_session = BTreeSet::new();
        let mut sessions_with_event = BTreeSet::new();
        let clients: BTreeSet<&str> = self.clients.iter().map(|c| c.public_key.as_str()).collect();
        for e in &events {
            if !by_seq.insert((e.gateway_id.clone(), e.seq)) {
                problems.push(format!("event {} of {} stored twice", e.seq, e.gateway_id));
            }
            if e.reason != "mfa_inactive" {
                problems.push(format!(
                    "event {} of {}: reason {}",
                    e.seq, e.gateway_id, e.reason
                ));
                continue;
            }
            // A client looks idle on its sibling gateway, which may expire it when no sign
            // of life was relayed in time (the Core or the client's gateway away); the Core
            // must then renew the session, never end it.
            if clients.contains(e.public_key.as_str()) && e.outcome == "session_ended" {
                problems.push(format!(
                    "event {} of {}: a client's session ({}) ended",
                    e.seq, e.gateway_id, e.public_key
                ));
            }
            if !by_session.insert((e.gateway_id.clone(), e.mfa_session, e.public_key.clone())) {
                problems.push(format!(
                    "session {} expired twice on {}",
                    e.mfa_session, e.gateway_id
                ));
            }
            sessions_with_event.insert(e.mfa_session);
        }
        let mut expired = 0;
        for (id, s) in &self.model.sessions {
            if s.ended_by_drill {
                continue;
            }
            expired += 1;
            if !sessions_with_event.contains(id) {
                problems.push(format!(
                    "session {id} (peer {}) ended without an expiry event",
                    s.peer_id
                ));
            }
        }
        if problems.is_empty() {
            Ok((events.len(), expired))
        } else {
            Err(problems.join("\n"))
        }
    }

    /// Ok when, on every gateway, the Core's totals equal the kernel's counters for the
    /// clients' peers and for every churn peer never re-created (a missing row is zero).
    /// Returns the bytes compared.
    pub async fn stats_equal_kernels(&self) -> Result<u64, String> {
        let mut problems = vec![];
        let mut bytes = 0;
        for gw in 0..GATEWAYS {
            let l = location_of(gw);
            let label = gateway_label(gw);
            let view = self
                .gateway_view(gw)
                .await
                .ok_or_else(|| format!("{label} unknown to the Core"))?;
            let rows = self
                .admin
                .stats(self.locations[l].id)
                .await
                .map_err(|e| format!("stats: {e}"))?;
            let totals: BTreeMap<String, (u64, u64)> = rows
                .iter()
                .filter(|r| r.gateway_id == view.gateway_id)
                .map(|r| (r.public_key.clone(), (r.total_rx, r.total_tx)))
                .collect();
            let dump = self.dump(gw).await?;
            let recreated: BTreeSet<String> = self
                .model
                .churn
                .get(&l)
                .map(|m| {
                    m.values()
                        .filter(|c| self.model.recreated.contains(&c.id))
                        .map(|c| c.public_key.clone())
                        .collect()
                })
                .unwrap_or_default();
            for (key, p) in &dump.peers {
                if recreated.contains(key) {
                    continue;
                }
                let core = totals.get(key).copied().unwrap_or((0, 0));
                bytes += p.rx_bytes + p.tx_bytes;
                if core != (p.rx_bytes, p.tx_bytes) {
                    problems.push(format!(
                        "{label} peer {key}: Core totals rx {} tx {}, kernel rx {} tx {}",
                        core.0, core.1, p.rx_bytes, p.tx_bytes
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(bytes)
        } else {
            Err(problems.join("\n"))
        }
    }
}
