//! The gateway's HA role (design §12), decided from facts: which configured floating
//! addresses are present on the host, and what the operator said last.
//!
//! Rules:
//! - Active when the operator said `activate`, standby when they said `deactivate`;
//!   otherwise active exactly while a configured VIP is present.
//! - The operator's word lasts until the VIPs' presence changes (none present ↔ some
//!   present): an address that appears is keepalived moving it here, an address that goes
//!   ends the active role, whatever was said before.
//! - Each transition to active starts one takeover round; activating an active gateway is
//!   no transition. One exception: a floating address that appears while the gateway is
//!   active by the operator's word with none present (keepalived's notify came before its
//!   address) is a transition too: the round that ran had no address to send from, so the
//!   clients behind NAT never saw it; this one leaves from the floating address.
//! - Drain is orthogonal to the role: a draining gateway keeps its role and every peer.
//! - The inputs are kept across restarts ([`RoleState::resume`]): an agent restarted while
//!   its floating address stays is still active, with no new round (a restart causes no
//!   peer churn); one that finds the address arrived while it was down takes over.
//!
//! Pure: inputs in, the transition out; the caller measures time and acts.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Active carries the floating address's traffic; standby keeps every peer and waits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Active,
    #[default]
    Standby,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Active => "active",
            Role::Standby => "standby",
        })
    }
}

/// What the operator (or a keepalived notify script) said last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operator {
    Activate,
    Deactivate,
}

/// One input of the role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoleInput {
    /// The configured VIPs now present on the host (from the address watcher).
    VipsPresent(BTreeSet<IpAddr>),
    Operator(Operator),
}

/// A change of role, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub to: Role,
    pub reason: String,
}

/// The role's inputs so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleState {
    vips_present: BTreeSet<IpAddr>,
    operator: Option<Operator>,
    draining: bool,
}

impl RoleState {
    /// A gateway that starts standby, draining or not (drain is kept across restarts).
    pub fn new(draining: bool) -> Self {
        RoleState {
            draining,
            ..Default::default()
        }
    }

    /// The state a previous run left (see the module doc).
    pub fn resume(
        draining: bool,
        vips_present: BTreeSet<IpAddr>,
        operator: Option<Operator>,
    ) -> Self {
        RoleState {
            vips_present,
            operator,
            draining,
        }
    }

    /// What the operator said last, while it still holds.
    pub fn operator(&self) -> Option<Operator> {
        self.operator
    }

    pub fn role(&self) -> Role {
        match self.operator {
            Some(Operator::Activate) => Role::Active,
            Some(Operator::Deactivate) => Role::Standby,
            None if self.vips_present.is_empty() => Role::Standby,
            None => Role::Active,
        }
    }

    pub fn vips_present(&self) -> &BTreeSet<IpAddr> {
        &self.vips_present
    }

    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Sets drain; true when it changed.
    pub fn set_draining(&mut self, draining: bool) -> bool {
        std::mem::replace(&mut self.draining, draining) != draining
    }

    /// Takes one input; the transition it causes, if any.
    pub fn handle(&mut self, input: RoleInput) -> Option<Transition> {
        let before = self.role();
        let mut source_arrived = false;
        let reason = match input {
            RoleInput::VipsPresent(present) => {
                source_arrived =
                    before == Role::Active && self.vips_present.is_empty() && !present.is_empty();
                if present.is_empty() != self.vips_present.is_empty() {
                    // The address moved: whatever the operator said before is superseded.
                    self.operator = None;
                }
                let reason = if present.is_empty() {
                    "no floating address on this host".to_string()
                } else {
                    format!("floating address present: {}", join(&present))
                };
                self.vips_present = present;
                reason
            }
            RoleInput::Operator(op) => {
                self.operator = Some(op);
                match op {
                    Operator::Activate => "activated by the operator".to_string(),
                    Operator::Deactivate => "deactivated by the operator".to_string(),
                }
            }
        };
        let after = self.role();
        (after != before || source_arrived).then_some(Transition { to: after, reason })
    }
}

fn join(set: &BTreeSet<IpAddr>) -> String {
    set.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vips(list: &[&str]) -> RoleInput {
        RoleInput::VipsPresent(list.iter().map(|s| s.parse().unwrap()).collect())
    }

    fn to(t: Option<Transition>) -> Option<Role> {
        t.map(|t| t.to)
    }

    #[test]
    fn a_vip_that_appears_makes_active_and_one_that_goes_makes_standby() {
        let mut r = RoleState::new(false);
        assert_eq!(r.role(), Role::Standby);
        assert_eq!(to(r.handle(vips(&["192.0.2.10"]))), Some(Role::Active));
        // A second VIP appearing is no new transition (no second takeover round).
        assert_eq!(to(r.handle(vips(&["192.0.2.10", "2001:db8::10"]))), None);
        assert_eq!(to(r.handle(vips(&["2001:db8::10"]))), None);
        assert_eq!(to(r.handle(vips(&[]))), Some(Role::Standby));
        assert_eq!(to(r.handle(vips(&[]))), None);
    }

    #[test]
    fn the_operator_decides_until_the_address_moves() {
        let mut r = RoleState::new(false);
        assert_eq!(
            to(r.handle(RoleInput::Operator(Operator::Activate))),
            Some(Role::Active)
        );
        // Activating an active gateway is no transition.
        assert_eq!(to(r.handle(RoleInput::Operator(Operator::Activate))), None);
        // The address arrives while activated without one: a second round, from it.
        assert_eq!(to(r.handle(vips(&["192.0.2.10"]))), Some(Role::Active));
        // A second address is no new round.
        assert_eq!(to(r.handle(vips(&["192.0.2.10", "192.0.2.11"]))), None);
        // Deactivate wins over a present address.
        assert_eq!(
            to(r.handle(RoleInput::Operator(Operator::Deactivate))),
            Some(Role::Standby)
        );
        // The address goes: standby stays; it comes back: active again.
        assert_eq!(to(r.handle(vips(&[]))), None);
        assert_eq!(to(r.handle(vips(&["192.0.2.10"]))), Some(Role::Active));
        // Losing the address ends an operator's activation too.
        r.handle(RoleInput::Operator(Operator::Activate));
        let t = r.handle(vips(&[])).unwrap();
        assert_eq!(t.to, Role::Standby);
        assert!(t.reason.contains("no floating address"), "{}", t.reason);
    }

    #[test]
    fn a_resumed_state_takes_over_only_when_the_address_arrived_meanwhile() {
        let here: BTreeSet<IpAddr> = ["192.0.2.10".parse().unwrap()].into();
        // Active before the restart, the address still here: no transition, no round.
        let mut r = RoleState::resume(false, here.clone(), None);
        assert_eq!(r.role(), Role::Active);
        assert_eq!(to(r.handle(vips(&["192.0.2.10"]))), None);
        // Standby before, the address here now: a takeover.
        let mut r = RoleState::resume(false, BTreeSet::new(), None);
        assert_eq!(to(r.handle(vips(&["192.0.2.10"]))), Some(Role::Active));
        // Activated by the operator before: still active, and the word still holds.
        let r = RoleState::resume(true, BTreeSet::new(), Some(Operator::Activate));
        assert_eq!((r.role(), r.draining()), (Role::Active, true));
    }

    #[test]
    fn drain_is_orthogonal_to_the_role() {
        let mut r = RoleState::new(true);
        assert!(r.draining());
        assert_eq!(to(r.handle(vips(&["192.0.2.10"]))), Some(Role::Active));
        assert!(r.draining());
        assert!(r.set_draining(false));
        assert!(!r.set_draining(false));
        assert_eq!(r.role(), Role::Active);
    }
}
