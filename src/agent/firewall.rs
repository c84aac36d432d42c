//! The agent's firewall step (contract §7), run after the peer changes of every apply and
//! at every resync: decide the table from the held location (pure: [`desired`]), read the
//! kernel's table back, and write only when it differs (one batch), then cut the flows
//! that the new policy denies and those of removed peers.
//!
//! - `firewall.enabled = false` locally: nftables is never written, except that a table
//!   of ours left from before is removed once, at the first step after start.
//! - No policy, or a policy with `enabled = false` from the Core: no table (unless local
//!   masquerade wants one).
//! - A failure leaves the last good table in place and is reported (state `error`); it
//!   never blocks the peer changes, which ran before.
//! - A change of peers alone ([`FirewallStep::run_peers`], the machine's scoped change)
//!   changes no input of the table: the table is neither read nor written, the kept VPN
//!   addresses take the change and a removed peer's flows are cut. It runs only on a table
//!   a full step left in sync; anything else is an error that the next full step repairs.

use std::collections::BTreeSet;

use gatehouse_proto::v1;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::firewall::conntrack::{self, Cut};
use crate::firewall::diff::differences;
use crate::firewall::nft::{self, Image, WriteStats};
use crate::firewall::policy::{span_of_net, Span};
use crate::firewall::vpn::VpnChange;
use crate::firewall::{from_proto, render, table_name, Inputs, Policy, PolicyError, Ruleset};
use crate::model::Desired;

/// The `[firewall]` settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FirewallSettings {
    /// False: never touch nftables (the default only for embedders and tests).
    pub enabled: bool,
    pub masquerade: bool,
}

/// The firewall as `/status` and `gatehouse status/diff` show it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FirewallStatus {
    /// `disabled`, `in sync`, `drift` (found, being repaired), `error`, or empty before the
    /// first step.
    pub state: String,
    /// The error, or the differences last found.
    pub detail: Vec<String>,
    pub table: String,
    /// Rules and set elements of the table the agent wants (0 and 0: no table).
    pub rules: usize,
    pub set_elements: usize,
    /// Batches written since start, and repairs of a table changed outside gatehouse.
    pub writes: u64,
    pub repairs: u64,
    /// Messages in the last batch written.
    pub last_batch_messages: usize,
    /// Connections cut since start (denied by a new policy, or of removed peers).
    pub flows_cut: u64,
    /// Changes of peers taken without reading or writing the table (scoped changes).
    #[serde(default)]
    pub peer_changes: u64,
}

impl FirewallStatus {
    pub fn error(&self) -> Option<String> {
        (self.state == "error").then(|| self.detail.join("; "))
    }
}

/// Errors of the step.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("firewall policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("firewall: {0}")]
    Nft(#[from] nft::NftError),
    /// A change of peers reached a step with no table known in sync.
    #[error(
        "firewall: no table known in sync for a change of peers (the next full step repairs it)"
    )]
    NotInSync,
}

/// The kernel side, behind a trait so the step's decisions are tested without root.
pub trait Tables: Send {
    fn read(&mut self, table: &str) -> Result<Option<Image>, nft::NftError>;
    fn replace(&mut self, rs: &Ruleset) -> Result<WriteStats, nft::NftError>;
    fn remove(&mut self, table: &str) -> Result<WriteStats, nft::NftError>;
    /// Deletes the tracked flows `cut` selects; how many went.
    fn cut(&mut self, cut: &Cut) -> std::io::Result<usize>;
}

/// nftables and conntrack of the agent's network namespace.
pub struct Kernel;

impl Tables for Kernel {
    fn read(&mut self, table: &str) -> Result<Option<Image>, nft::NftError> {
        nft::Socket::open()?.read(table)
    }
    fn replace(&mut self, rs: &Ruleset) -> Result<WriteStats, nft::NftError> {
        nft::Socket::open()?.replace(rs)
    }
    fn remove(&mut self, table: &str) -> Result<WriteStats, nft::NftError> {
        nft::Socket::open()?.remove(table)
    }
    fn cut(&mut self, cut: &Cut) -> std::io::Result<usize> {
        let entries = conntrack::dump()?;
        let chosen: Vec<&conntrack::Entry> = conntrack::select(&entries, cut)
            .into_iter()
            .map(|i| &entries[i])
            .collect();
        conntrack::delete(&chosen)
    }
}

/// The table wanted for a location (pure). `Ok(None)`: no table.
pub fn desired(
    interface: &str,
    settings: FirewallSettings,
    policy: Option<&Policy>,
    listen_port: u16,
) -> Option<Ruleset> {
    render(&Inputs {
        interface,
        listen_port,
        policy,
        masquerade: settings.masquerade,
    })
}

/// The policy enforced for a location (pure): None without one or when disabled.
pub fn policy_of(fw: Option<&v1::FirewallPolicy>) -> Result<Option<Policy>, PolicyError> {
    match fw {
        Some(p) => from_proto(p),
        None => Ok(None),
    }
}

/// The peers' addresses as spans (pure).
pub fn peer_spans(desired: &Desired) -> Vec<Span> {
    let mut v: Vec<Span> = desired
        .peers
        .values()
        .flat_map(|p| p.allowed_ips.iter().map(span_of_net))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The firewall step and what it remembers between runs.
pub struct FirewallStep {
    interface: String,
    settings: FirewallSettings,
    tables: Box<dyn Tables>,
    status: FirewallStatus,
    /// The policy of the last table written or found equal (cuts flows when it changes).
    enforced: Option<Option<Policy>>,
    /// The peers' addresses at the last step (removed peers' flows are cut).
    last_peers: Option<BTreeSet<Span>>,
    /// A disabled firewall has looked for (and removed) a table of ours.
    cleaned_up: bool,
    /// The last step's error: a step that fails again alike (the machine retries it with
    /// backoff) is logged at DEBUG.
    failing: Option<String>,
}

impl FirewallStep {
    pub fn new(interface: &str, settings: FirewallSettings, tables: Box<dyn Tables>) -> Self {
        FirewallStep {
            interface: interface.to_string(),
            settings,
            tables,
            status: FirewallStatus {
                state: if settings.enabled {
                    String::new()
                } else {
                    "disabled".into()
                },
                table: table_name(interface),
                ..Default::default()
            },
            enforced: None,
            last_peers: None,
            cleaned_up: false,
            failing: None,
        }
    }

    pub fn status(&self) -> &FirewallStatus {
        &self.status
    }

    /// The VPN addresses kept since the last step (None before the first).
    pub fn vpn_addresses(&self) -> Option<&BTreeSet<Span>> {
        self.last_peers.as_ref()
    }

    /// A change of peers alone (the policy, the interface and the table's other inputs are
    /// those of the last step): the kept addresses take `change` and the flows of removed
    /// addresses are cut; the table is neither read nor written.
    pub fn run_peers(&mut self, trigger: &str, change: &VpnChange) -> Result<(), FirewallError> {
        if !self.settings.enabled {
            self.clean_up_once();
            return Ok(());
        }
        let in_sync = self.status.state == "in sync" && self.enforced.is_some();
        let kept = match (in_sync, self.last_peers.as_mut()) {
            (true, Some(kept)) => kept,
            _ => {
                let e = FirewallError::NotInSync;
                self.failed(trigger, &e);
                return Err(e);
            }
        };
        self.failing = None;
        change.apply(kept);
        self.status.peer_changes += 1;
        if !change.removed.is_empty() {
            // The policy is the one enforced: what it denies was cut when it came.
            self.cut(
                trigger,
                &Cut {
                    policy: None,
                    vpn: &[],
                    local: &[],
                    removed: &change.removed,
                },
            );
        }
        Ok(())
    }

    /// The firewall is off in the settings (the machine builds no desired state then): a
    /// table of ours left from before goes, once. With the firewall on: nothing.
    pub fn run_off(&mut self, trigger: &str) {
        if self.settings.enabled {
            warn!(
                trigger,
                "firewall step without its inputs while the firewall is on: skipped"
            );
            return;
        }
        self.clean_up_once();
    }

    /// Deletes the tracked flows `cut` selects; a failure is logged (the table is right,
    /// and a flow not cut now is cut at the next change).
    fn cut(&mut self, trigger: &str, cut: &Cut) {
        match self.tables.cut(cut) {
            Ok(0) => {}
            Ok(n) => {
                self.status.flows_cut += n as u64;
                info!(
                    trigger,
                    flows = n,
                    "firewall: connections cut (denied now, or of removed peers)"
                );
            }
            Err(e) => warn!(trigger, error = %e, "firewall: cannot cut tracked connections"),
        }
    }

    /// Brings the table in line with the location: `fw` is its policy, `desired` the
    /// effective peers and interface. Returns the error also kept in the status.
    pub fn run(
        &mut self,
        trigger: &str,
        fw: Option<&v1::FirewallPolicy>,
        desired: &Desired,
    ) -> Result<(), FirewallError> {
        if !self.settings.enabled {
            self.clean_up_once();
            return Ok(());
        }
        match self.step(trigger, fw, desired) {
            Ok(()) => {
                self.failing = None;
                Ok(())
            }
            Err(e) => {
                self.failed(trigger, &e);
                Err(e)
            }
        }
    }

    /// A failed step: in the status, and logged when the failure starts or changes.
    fn failed(&mut self, trigger: &str, e: &FirewallError) {
        let text = e.to_string();
        if self.failing.as_ref() == Some(&text) {
            debug!(trigger, error = %text, "firewall step failed again");
        } else {
            warn!(trigger, error = %text, "firewall step failed; the last good table stays");
        }
        self.status.state = "error".into();
        self.status.detail = vec![text.clone()];
        self.failing = Some(text);
    }

    fn step(
        &mut self,
        trigger: &str,
        fw: Option<&v1::FirewallPolicy>,
        desired_state: &Desired,
    ) -> Result<(), FirewallError> {
        let policy = policy_of(fw)?;
        let table = table_name(&self.interface);
        let (want, diffs) = self.compare(policy.as_ref(), desired_state)?;
        self.status.rules = want.as_ref().map_or(0, |r| r.rule_count());
        self.status.set_elements = want.as_ref().map_or(0, |r| r.element_count());
        let peers = peer_spans(desired_state);
        let policy_changed = self.enforced.as_ref() != Some(&policy);
        if !diffs.is_empty() {
            // Drift: the table differs although the policy is the one last enforced.
            let drift = !policy_changed;
            for d in &diffs {
                if self.failing.is_some() {
                    // The same differences, tried again after a failure.
                    debug!(trigger, table = %table, difference = %d, "firewall: applying again");
                } else if drift {
                    warn!(trigger, table = %table, difference = %d, "firewall drift: repairing");
                } else {
                    info!(trigger, table = %table, change = %d, "firewall: applying");
                }
            }
            self.status.state = "drift".into();
            self.status.detail = diffs.clone();
            let stats = match &want {
                Some(rs) => self.tables.replace(rs)?,
                None => self.tables.remove(&table)?,
            };
            self.status.writes += 1;
            self.status.last_batch_messages = stats.messages;
            if drift {
                self.status.repairs += 1;
            }
            info!(
                trigger,
                table = %table,
                messages = stats.messages,
                bytes = stats.bytes,
                rules = self.status.rules,
                set_elements = self.status.set_elements,
                "firewall table written in one batch"
            );
        }
        // Flows: those the new policy denies, and those of peers that went away.
        let removed: Vec<Span> = match &self.last_peers {
            Some(before) => before
                .iter()
                .filter(|s| peers.binary_search(s).is_err())
                .copied()
                .collect(),
            None => vec![],
        };
        if (policy_changed && policy.is_some()) || !removed.is_empty() {
            let local: Vec<std::net::IpAddr> = desired_state
                .interface
                .addresses
                .iter()
                .map(|n| n.addr())
                .collect();
            let cut = Cut {
                policy: policy.as_ref(),
                vpn: &peers,
                local: &local,
                removed: &removed,
            };
            self.cut(trigger, &cut);
        }
        self.enforced = Some(policy);
        self.last_peers = Some(peers.into_iter().collect());
        self.status.state = "in sync".into();
        self.status.detail = vec![];
        Ok(())
    }

    /// Disabled locally: a table of ours left from before goes, once.
    fn clean_up_once(&mut self) {
        if self.cleaned_up {
            return;
        }
        self.cleaned_up = true;
        let table = table_name(&self.interface);
        match self.tables.read(&table) {
            Ok(None) => {}
            Ok(Some(_)) => match self.tables.remove(&table) {
                Ok(_) => info!(table = %table, "firewall disabled: removed the agent's table"),
                Err(e) => {
                    warn!(table = %table, error = %e, "firewall disabled: cannot remove the agent's table")
                }
            },
            // No nftables here at all: nothing of ours to remove.
            Err(e) => info!(error = %e, "firewall disabled; nftables not readable"),
        }
    }

    /// The table the policy wants (none: no table) and how the kernel's differs from it.
    fn compare(
        &mut self,
        policy: Option<&Policy>,
        desired_state: &Desired,
    ) -> Result<(Option<Ruleset>, Vec<String>), FirewallError> {
        let table = table_name(&self.interface);
        let want = desired(
            &self.interface,
            self.settings,
            policy,
            desired_state.interface.listen_port,
        );
        let want_image = want.as_ref().map(nft::image).transpose()?;
        let have = self.tables.read(&table)?;
        let diffs = differences(&table, want_image.as_ref(), have.as_ref());
        Ok((want, diffs))
    }

    /// The differences the next step would repair (for `/diff`); empty when in sync.
    pub fn diff(
        &mut self,
        fw: Option<&v1::FirewallPolicy>,
        desired_state: &Desired,
    ) -> Vec<String> {
        if !self.settings.enabled {
            return vec![];
        }
        let result = policy_of(fw)
            .map_err(FirewallError::from)
            .and_then(|policy| self.compare(policy.as_ref(), desired_state));
        match result {
            Ok((_, d)) => d.into_iter().map(|l| format!("firewall: {l}")).collect(),
            Err(e) => vec![format!("firewall: cannot compare: {e}")],
        }
    }
}

#[cfg(test)]
mod tests;
