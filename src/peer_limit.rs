//! A location larger than the backend can hold (wireguard-go refuses more than 65,536
//! peers). The rule: the desired peers are cut to the backend's limit before planning, so
//! every removal and every peer within the limit is still applied, the peers beyond it are
//! refused with one error naming the limit and the kernel backend, and the next reconcile
//! plans nothing new (no apply that fails again and again).
//!
//! Which peers are kept is deterministic: the desired peers already in the device first
//! (no peer that carries traffic is dropped for a newcomer), then the others by public key.
//! Pure: desired and observed in, the desired state to plan for and the refusal out.

use std::borrow::Cow;
use std::collections::BTreeSet;

use thiserror::Error;

use crate::backend::PeerLimit;
use crate::model::{Desired, Key, Observed};

/// The desired state cut to the backend's limit.
#[derive(Debug)]
pub struct Fitted<'a> {
    pub desired: Cow<'a, Desired>,
    pub refused: Option<Refused>,
}

/// Peers refused because the backend holds no more.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error(
    "{wanted} peers wanted but {} holds at most {}: {refused} peers not applied (the first: \
     {first}); use the kernel backend (gateway.backend = \"kernel\") for a location this large",
    limit.backend,
    limit.max
)]
pub struct Refused {
    pub limit: PeerLimit,
    /// Desired peers.
    pub wanted: usize,
    /// Desired peers left out.
    pub refused: usize,
    /// The first peer left out (by key).
    pub first: Key,
}

/// Cuts `desired` to `limit`, keeping the desired peers that `observed` holds first, then
/// the others by key. Borrows `desired` when it fits.
pub fn fit<'a>(desired: &'a Desired, observed: &Observed, limit: Option<PeerLimit>) -> Fitted<'a> {
    let within = |desired| Fitted {
        desired: Cow::Borrowed(desired),
        refused: None,
    };
    let Some(limit) = limit.filter(|l| desired.peers.len() > l.max) else {
        return within(desired);
    };
    let present = desired
        .peers
        .keys()
        .filter(|k| observed.device.peers.contains_key(k));
    let absent = desired
        .peers
        .keys()
        .filter(|k| !observed.device.peers.contains_key(k));
    let mut order = present.chain(absent);
    let keep: BTreeSet<Key> = order.by_ref().take(limit.max).copied().collect();
    let Some(first) = order.next().copied() else {
        return within(desired);
    };
    let mut cut = desired.clone();
    cut.peers.retain(|k, _| keep.contains(k));
    Fitted {
        desired: Cow::Owned(cut),
        refused: Some(Refused {
            limit,
            wanted: desired.peers.len(),
            refused: desired.peers.len() - limit.max,
            first,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::steps::{execute, ApplyStep, StepErrors};
    use crate::backend::memory::MemoryBackend;
    use crate::backend::Backend;
    use crate::model::{InterfaceSpec, PeerSpec, SecretKey};
    use crate::plan::{plan, Op};

    fn desired(peers: &[u8]) -> Desired {
        Desired {
            interface: InterfaceSpec {
                private_key: SecretKey::new([7; 32]),
                listen_port: 51820,
                addresses: ["10.0.0.1/24".parse().unwrap()].into_iter().collect(),
                mtu: None,
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

    const LIMIT: PeerLimit = PeerLimit {
        max: 3,
        backend: "the test backend",
    };

    fn keys(d: &Desired) -> Vec<u8> {
        d.peers.keys().map(|k| k.0[0]).collect()
    }

    /// One reconcile as the agent does it: fit, record, plan, execute.
    fn reconcile(b: &mut MemoryBackend, d: &Desired, errors: &mut StepErrors) -> usize {
        let observed = b.observe().unwrap();
        let fitted = fit(d, &observed, b.peer_limit());
        errors.record_peer_limit(fitted.refused.as_ref());
        let p = plan(&fitted.desired, &observed);
        let ops = p.len();
        execute(b, p, "test", errors);
        ops
    }

    #[test]
    fn within_the_limit_nothing_changes() {
        let d = desired(&[1, 2, 3]);
        let f = fit(&d, &Observed::default(), Some(LIMIT));
        assert!(matches!(f.desired, Cow::Borrowed(_)) && f.refused.is_none());
        assert!(fit(&desired(&[1, 2, 3, 4]), &Observed::default(), None)
            .refused
            .is_none());
    }

    #[test]
    fn peers_in_the_device_first_then_by_key() {
        let mut observed = Observed::default();
        let held = desired(&[5, 9]);
        for (k, spec) in &held.peers {
            observed
                .device
                .peers
                .insert(*k, crate::model::PeerState::fresh(spec.clone()));
        }
        let d = desired(&[1, 2, 3, 5, 9]);
        let f = fit(&d, &observed, Some(LIMIT));
        assert_eq!(keys(&f.desired), vec![1, 5, 9]);
        let refused = f.refused.unwrap();
        assert_eq!((refused.wanted, refused.refused), (5, 2));
        assert_eq!(refused.first, Key([2; 32]));
        let text = refused.to_string();
        assert!(
            text.contains("at most 3") && text.contains("kernel backend"),
            "{text}"
        );
    }

    /// The backend refuses a plan beyond its limit; cut to it, the apply succeeds, removals
    /// and the peers within the limit are applied, the refusal is recorded once, and the
    /// next reconcile writes nothing and fails nothing.
    #[test]
    fn over_the_limit_removals_and_the_fitting_peers_apply_and_the_next_reconcile_is_a_no_op() {
        let over = desired(&[2, 3, 4, 5, 6]);
        // Without the cut the backend refuses the peer step, at every reconcile.
        let mut raw = MemoryBackend::new("wgr");
        raw.set_peer_limit(Some(LIMIT));
        let mut raw_errors = StepErrors::default();
        for _ in 0..2 {
            let unfitted = plan(&over, &raw.observe().unwrap());
            execute(&mut raw, unfitted, "t", &mut raw_errors);
            assert_eq!(raw_errors.reasons(), vec!["peers: apply: too many peers"]);
        }

        let mut b = MemoryBackend::new("wgt");
        let mut errors = StepErrors::default();
        assert!(reconcile(&mut b, &desired(&[1, 2]), &mut errors) > 0);
        b.set_peer_limit(Some(LIMIT));

        // Peer 1 revoked, four added: 1 goes, 2 stays, 3 and 4 come, 5 and 6 are refused.
        b.clear_log();
        reconcile(&mut b, &over, &mut errors);
        let state: Vec<u8> = b.state().device.peers.keys().map(|k| k.0[0]).collect();
        assert_eq!(state, vec![2, 3, 4]);
        assert!(b.applied_ops().contains(&Op::RemovePeer(Key([1; 32]))));
        assert_eq!(errors.reasons().len(), 1, "{:?}", errors.reasons());
        assert!(errors.reasons()[0].starts_with("peer limit: 5 peers wanted"));
        assert!(
            !errors.blocking(),
            "the peers within the limit carry traffic"
        );
        let applied = errors.to_apply_error().unwrap();
        assert_eq!(applied.rejected[0].item, "step.peer_limit");

        b.clear_log();
        assert_eq!(
            reconcile(&mut b, &over, &mut errors),
            0,
            "next reconcile plans nothing"
        );
        assert!(b.applied_ops().is_empty());
        assert_eq!(
            errors.reasons().len(),
            1,
            "the same one refusal, no new failure"
        );

        // A removal makes room: the first refused peer by key comes in.
        reconcile(&mut b, &desired(&[3, 4, 5, 6]), &mut errors);
        let state: Vec<u8> = b.state().device.peers.keys().map(|k| k.0[0]).collect();
        assert_eq!(state, vec![3, 4, 5]);
        // Within the limit again: the refusal clears.
        reconcile(&mut b, &desired(&[3, 4, 6]), &mut errors);
        assert!(errors.is_empty(), "{:?}", errors.reasons());
        assert_eq!(b.state().device.peers.len(), 3);
        assert!(ApplyStep::PeerLimit.name().contains("limit"));
    }
}
