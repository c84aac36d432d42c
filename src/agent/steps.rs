//! Applying a plan step by step, and what failed. The rule (design §4): peer removals go
//! first and on their own; a failing link, address, device or firewall step is recorded,
//! reported (`Applied`, `/status`, `/readyz`) and retried (with backoff, and by every
//! reconcile), and never keeps a removed peer in the interface.
//!
//! [`StepErrors`] is the one record of failed steps. The plan's steps are set by
//! [`execute`] at each reconcile; any other fallible step (the firewall) records its own
//! outcome with [`StepErrors::record`] under its own [`ApplyStep`] and is reported the
//! same way.

use std::collections::BTreeMap;
use std::fmt;

use gatehouse_proto::v1;
use serde::{Deserialize, Serialize};
use tracing::{debug, error};

use crate::backend::Backend;
use crate::peer_limit::Refused;
use crate::plan::{Phase, Plan};

/// A step of an apply that can fail on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyStep {
    PeerRemovals,
    Link,
    Addresses,
    Peers,
    Device,
    Firewall,
    /// Desired peers beyond the backend's limit ([`crate::peer_limit`]).
    PeerLimit,
}

impl ApplyStep {
    /// The steps that [`execute`] owns (the plan's phases).
    const PLAN: [ApplyStep; 5] = [
        ApplyStep::PeerRemovals,
        ApplyStep::Link,
        ApplyStep::Addresses,
        ApplyStep::Peers,
        ApplyStep::Device,
    ];

    fn of(phase: Phase) -> Self {
        match phase {
            Phase::PeerRemovals => ApplyStep::PeerRemovals,
            Phase::Link => ApplyStep::Link,
            Phase::Addresses => ApplyStep::Addresses,
            Phase::Peers => ApplyStep::Peers,
            Phase::Device => ApplyStep::Device,
        }
    }

    /// Whether a failure of this step means the gateway cannot carry traffic as
    /// configured. Addresses and the firewall are reasons in `/readyz`'s body only: the
    /// peers are in place, and one bad address (an IPv6 address on a host without IPv6)
    /// or one bad rule must not eject every gateway of a location at once.
    pub fn blocks_readiness(self) -> bool {
        !matches!(
            self,
            ApplyStep::Addresses | ApplyStep::Firewall | ApplyStep::PeerLimit
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            ApplyStep::PeerRemovals => "peer removals",
            ApplyStep::Link => "link",
            ApplyStep::Addresses => "addresses",
            ApplyStep::Peers => "peers",
            ApplyStep::Device => "device",
            ApplyStep::Firewall => "firewall",
            ApplyStep::PeerLimit => "peer limit",
        }
    }
}

impl fmt::Display for ApplyStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The steps whose last attempt failed, with the error.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepErrors(BTreeMap<ApplyStep, String>);

impl StepErrors {
    /// Records the outcome of one step: an error replaces the step's last one, success
    /// clears it.
    pub fn record<E: fmt::Display>(&mut self, step: ApplyStep, outcome: Result<(), E>) {
        match outcome {
            Ok(()) => {
                self.0.remove(&step);
            }
            Err(e) => {
                self.0.insert(step, e.to_string());
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Records the peers refused for the backend's limit (None: all fit); logged when the
    /// refusal starts or changes, not at every reconcile it stands.
    pub fn record_peer_limit(&mut self, refused: Option<&Refused>) {
        let text = refused.map(Refused::to_string);
        if let Some(text) = &text {
            if self.0.get(&ApplyStep::PeerLimit) != Some(text) {
                error!(step = %ApplyStep::PeerLimit, error = %text, "peers refused: the backend holds no more");
            }
        }
        self.record(ApplyStep::PeerLimit, text.map_or(Ok(()), Err));
    }

    /// True when a failed step is worth trying again: any but the peer limit (planning
    /// again refuses the same peers).
    pub fn retryable(&self) -> bool {
        self.0.keys().any(|s| *s != ApplyStep::PeerLimit)
    }

    /// True when a failed step keeps the gateway from carrying traffic.
    pub fn blocking(&self) -> bool {
        self.0.keys().any(|s| s.blocks_readiness())
    }

    /// One line per failed step, "step: error".
    pub fn reasons(&self) -> Vec<String> {
        self.0.iter().map(|(s, e)| format!("{s}: {e}")).collect()
    }

    /// All failures in one line, or None.
    pub fn summary(&self) -> Option<String> {
        (!self.is_empty()).then(|| self.reasons().join("; "))
    }

    /// The `Applied` error describing the failed steps (one item per step).
    pub fn to_apply_error(&self) -> Option<v1::ApplyError> {
        let message = self.summary()?;
        Some(v1::ApplyError {
            kind: v1::ApplyErrorKind::Backend as i32,
            message,
            rejected: self
                .0
                .iter()
                .map(|(s, e)| v1::Rejection {
                    item: format!("step.{}", s.name().replace(' ', "_")),
                    reason: e.clone(),
                })
                .collect(),
        })
    }
}

/// What [`execute`] did.
#[derive(Debug, Default)]
pub struct Executed {
    /// The steps that were applied (for the bookkeeping of added and removed peers).
    pub applied: Plan,
    /// Whether any step failed.
    pub failed: bool,
}

/// The outcome of each plan step of one apply (every plan step present: `Ok` when it had
/// nothing to do or succeeded).
pub type StepOutcomes = BTreeMap<ApplyStep, Result<(), String>>;

/// The outcomes of an apply with nothing to do (every plan step succeeded).
pub fn nothing_failed() -> StepOutcomes {
    ApplyStep::PLAN.iter().map(|s| (*s, Ok(()))).collect()
}

impl StepErrors {
    /// Records the outcomes of one apply's plan steps.
    pub fn record_all(&mut self, outcomes: StepOutcomes) {
        for (step, result) in outcomes {
            self.record(step, result);
        }
    }
}

/// Executes `plan` phase by phase and sets the plan steps' entries of `errors`.
///
/// Order: peer removals (alone), the link's creation (alone: when it fails nothing else is
/// tried), each link and address change on its own, peer additions and updates, device
/// settings. A failing phase does not stop the later ones.
pub fn execute(
    backend: &mut dyn Backend,
    plan: Plan,
    trigger: &str,
    errors: &mut StepErrors,
) -> Executed {
    let (executed, outcomes) = execute_phases(backend, plan, trigger);
    errors.record_all(outcomes);
    executed
}

/// [`execute`], returning each plan step's outcome instead of recording it.
pub fn execute_phases(
    backend: &mut dyn Backend,
    plan: Plan,
    trigger: &str,
) -> (Executed, StepOutcomes) {
    let mut outcome: StepOutcomes = ApplyStep::PLAN.iter().map(|s| (*s, Ok(()))).collect();
    let mut applied = Plan::default();
    let phases = plan.into_phases();
    let mut run = |part: Plan, outcome: &mut StepOutcomes| -> bool {
        let Some(first) = part.steps.first() else {
            return true;
        };
        let step = ApplyStep::of(first.op.phase());
        match backend.apply(&part) {
            Ok(()) => {
                applied.append(part);
                true
            }
            Err(e) => {
                // Each attempt at DEBUG: the machine logs when the failure starts or changes
                // (its retry runs every few seconds while the step fails).
                debug!(trigger, step = %step, error = %e, "apply step failed; retried with backoff");
                let entry = outcome.entry(step).or_insert(Ok(()));
                // The first error of a step is the one reported.
                if entry.is_ok() {
                    *entry = Err(e.to_string());
                }
                false
            }
        }
    };
    run(phases.removals, &mut outcome);
    let linked = match phases.create {
        Some(create) => run(
            Plan {
                steps: vec![create],
            },
            &mut outcome,
        ),
        None => true,
    };
    if linked {
        for step in phases.link {
            run(Plan { steps: vec![step] }, &mut outcome);
        }
        run(phases.peers, &mut outcome);
        run(phases.device, &mut outcome);
    }
    let failed = outcome.values().any(Result::is_err);
    (Executed { applied, failed }, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::model::{Desired, InterfaceSpec, Key, PeerSpec, SecretKey};
    use crate::plan::plan;

    fn desired(peers: &[u8], addresses: &[&str]) -> Desired {
        Desired {
            interface: InterfaceSpec {
                private_key: SecretKey::new([7; 32]),
                listen_port: 51820,
                addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
                mtu: Some(1420),
                fwmark: 0,
            },
            peers: peers
                .iter()
                .map(|n| {
                    let ip = format!("10.0.0.{}/32", 10 + n).parse().unwrap();
                    (Key([*n; 32]), PeerSpec::new(Key([*n; 32]), [ip]).into())
                })
                .collect(),
        }
    }

    fn converge(b: &mut MemoryBackend, d: &Desired) {
        let mut errors = StepErrors::default();
        let p = plan(d, &b.observe().unwrap());
        assert!(!execute(b, p, "test", &mut errors).failed);
    }

    /// Each phase failing on its own: the removal still happens, the failure is recorded
    /// under its step, the other phases are applied, and the next reconcile retries it.
    #[test]
    fn a_failing_step_never_keeps_a_removed_peer() {
        for phase in [Phase::Link, Phase::Addresses, Phase::Peers, Phase::Device] {
            let mut b = MemoryBackend::new("wgt");
            converge(&mut b, &desired(&[1, 2], &["10.0.0.1/24"]));
            // Peer 1 revoked, peer 3 added, an address, the MTU, the port, all at once.
            let mut next = desired(&[2, 3], &["10.0.0.1/24", "fd00::1/64"]);
            next.interface.mtu = Some(1380);
            next.interface.listen_port = 51821;
            if phase == Phase::Link {
                b.modify(|o| o.link.as_mut().unwrap().up = false);
            }
            b.fail_phase(phase, "injected");
            let mut errors = StepErrors::default();
            let p = plan(&next, &b.observe().unwrap());
            let done = execute(&mut b, p, "test", &mut errors);
            let state = b.state();
            assert!(done.failed, "{phase:?}");
            assert!(
                !state.device.peers.contains_key(&Key([1; 32])),
                "{phase:?}: revoked peer still there"
            );
            assert_eq!(
                errors.reasons(),
                vec![format!("{}: apply: injected", ApplyStep::of(phase))],
                "{phase:?}"
            );
            assert_eq!(
                state.device.peers.contains_key(&Key([3; 32])),
                phase != Phase::Peers,
                "{phase:?}: the other phases still apply"
            );
            // Retried: once the fault is gone the next reconcile completes and clears it.
            b.clear_faults();
            let p = plan(&next, &b.observe().unwrap());
            assert!(!p.is_empty());
            assert!(!execute(&mut b, p, "test", &mut errors).failed);
            assert!(errors.is_empty());
            assert!(plan(&next, &b.observe().unwrap()).is_empty());
        }
    }

    #[test]
    fn a_failing_removal_does_not_stop_the_rest_and_a_failed_create_stops_all() {
        let mut b = MemoryBackend::new("wgt");
        converge(&mut b, &desired(&[1], &["10.0.0.1/24"]));
        b.fail_phase(Phase::PeerRemovals, "gone");
        let mut errors = StepErrors::default();
        let p = plan(&desired(&[2], &["10.0.0.1/24"]), &b.observe().unwrap());
        execute(&mut b, p, "test", &mut errors);
        assert!(b.state().device.peers.contains_key(&Key([2; 32])));
        assert!(errors.blocking());

        let mut fresh = MemoryBackend::new("wgt");
        fresh.fail_phase(Phase::Link, "no module");
        let p = plan(&desired(&[2], &["10.0.0.1/24"]), &fresh.observe().unwrap());
        let done = execute(&mut fresh, p, "test", &mut errors);
        assert!(done.applied.is_empty());
        assert_eq!(fresh.applied_ops(), vec![]);
        assert_eq!(
            errors.reasons(),
            vec!["link: apply: no module".to_string()],
            "the removal error is cleared (nothing to remove), only the link is reported"
        );
    }

    #[test]
    fn other_steps_are_recorded_alongside_and_firewall_does_not_block_readiness() {
        let mut errors = StepErrors::default();
        errors.record(ApplyStep::Firewall, Err("nft: table busy"));
        assert!(!errors.blocking());
        let mut b = MemoryBackend::new("wgt");
        execute(
            &mut b,
            plan(&desired(&[1], &[]), &Observed::default()),
            "t",
            &mut errors,
        );
        assert_eq!(errors.reasons(), vec!["firewall: nft: table busy"]);
        let e = errors.to_apply_error().unwrap();
        assert_eq!(e.rejected[0].item, "step.firewall");
        errors.record::<String>(ApplyStep::Firewall, Ok(()));
        assert!(errors.to_apply_error().is_none());
    }

    use crate::model::Observed;
}
