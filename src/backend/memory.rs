//! An in-memory interface for tests: the plan is executed on a [`KernelModel`], the
//! WireGuard model the property tests check (O(k log N) for an apply of k peer changes). Clones share one interface, so a test can
//! keep a handle, inspect what the agent did and change the "kernel" behind its back, and
//! make any phase of an apply fail (fault injection). Takeover kicks set the endpoint,
//! restart a re-created peer's counters and handshake, and are recorded for the test.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Backend, BackendError, Kick, PeerLimit, WriteCounters};
use crate::model::{Observed, PeerState};
use crate::plan::{KernelModel, Op, Phase, Plan};

/// A shared simulated interface.
#[derive(Clone, Debug)]
pub struct MemoryBackend {
    name: String,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    state: KernelModel,
    counters: WriteCounters,
    applied: Vec<Op>,
    fail_next: Option<String>,
    /// Every apply holding an operation of one of these phases fails with the message.
    failing: BTreeMap<Phase, String>,
    /// Every kick call, in order (one entry per call).
    kicks: Vec<Vec<Kick>>,
    /// Every kick call fails with this message while set.
    failing_kicks: Option<String>,
    /// An apply that would leave more peers fails whole, as wireguard-go's would.
    peer_limit: Option<PeerLimit>,
}

impl MemoryBackend {
    pub fn new(name: impl Into<String>) -> Self {
        MemoryBackend {
            name: name.into(),
            inner: Arc::default(),
        }
    }

    /// The interface as it is now.
    pub fn state(&self) -> Observed {
        Observed::clone(&self.lock().state)
    }

    /// Changes the interface behind the agent's back (drift, traffic, handshakes).
    pub fn modify(&self, f: impl FnOnce(&mut Observed)) {
        self.lock().state.modify(f)
    }

    /// Every operation applied so far, in order.
    pub fn applied_ops(&self) -> Vec<Op> {
        self.lock().applied.clone()
    }

    /// Forgets the applied-operation log.
    pub fn clear_log(&self) {
        self.lock().applied.clear()
    }

    /// Makes the next `apply` fail with this message (before changing anything).
    pub fn fail_next_apply(&self, message: impl Into<String>) {
        self.lock().fail_next = Some(message.into());
    }

    /// Makes every apply that holds an operation of `phase` fail (before changing
    /// anything) until [`MemoryBackend::clear_faults`].
    pub fn fail_phase(&self, phase: Phase, message: impl Into<String>) {
        self.lock().failing.insert(phase, message.into());
    }

    /// Gives the interface a peer limit (None: none).
    pub fn set_peer_limit(&self, limit: Option<PeerLimit>) {
        self.lock().peer_limit = limit;
    }

    /// Ends every fault set by [`MemoryBackend::fail_phase`] and
    /// [`MemoryBackend::fail_kicks`].
    pub fn clear_faults(&self) {
        let mut inner = self.lock();
        inner.failing.clear();
        inner.failing_kicks = None;
    }

    /// The kick calls so far, one batch per call, in order.
    pub fn kick_batches(&self) -> Vec<Vec<Kick>> {
        self.lock().kicks.clone()
    }

    /// Every kick so far, flattened.
    pub fn kicks(&self) -> Vec<Kick> {
        self.lock().kicks.iter().flatten().cloned().collect()
    }

    /// Makes every kick call fail (changing nothing) until [`MemoryBackend::clear_faults`].
    pub fn fail_kicks(&self, message: impl Into<String>) {
        self.lock().failing_kicks = Some(message.into());
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for MemoryBackend {
    fn interface(&self) -> &str {
        &self.name
    }

    fn observe(&mut self) -> Result<Observed, BackendError> {
        Ok(Observed::clone(&self.lock().state))
    }

    fn apply(&mut self, plan: &Plan) -> Result<(), BackendError> {
        let mut inner = self.lock();
        if let Some(message) = inner.fail_next.take() {
            return Err(BackendError::Operation {
                op: "apply".into(),
                message,
            });
        }
        if let Some(message) = plan
            .steps
            .iter()
            .find_map(|s| inner.failing.get(&s.op.phase()))
        {
            return Err(BackendError::Operation {
                op: "apply".into(),
                message: message.clone(),
            });
        }
        if let Some(limit) = inner.peer_limit {
            let mut next = inner.state.clone();
            next.apply(plan);
            if next.device.peers.len() > limit.max {
                return Err(BackendError::Operation {
                    op: "apply".into(),
                    message: "too many peers".into(),
                });
            }
        }
        inner.state.apply(plan);
        let mut device_ops = 0;
        for step in &plan.steps {
            match step.op.phase() {
                Phase::Link | Phase::Addresses => inner.counters.link_writes += 1,
                _ => device_ops += 1,
            }
            inner.applied.push(step.op.clone());
        }
        if device_ops > 0 {
            inner.counters.device_writes += 1;
        }
        Ok(())
    }

    fn counters(&self) -> WriteCounters {
        self.lock().counters
    }

    fn peer_limit(&self) -> Option<PeerLimit> {
        self.lock().peer_limit
    }

    fn remove(&mut self) -> Result<(), BackendError> {
        self.lock().state = KernelModel::default();
        Ok(())
    }

    /// Peers not on the interface are skipped; a re-created peer starts afresh (no
    /// handshake, counters at zero) with the kick's endpoint, as after the kernel's
    /// remove and re-add; the others keep their session and get the endpoint.
    fn kick(&mut self, kicks: &[Kick]) -> Result<(), BackendError> {
        let mut inner = self.lock();
        if let Some(message) = inner.failing_kicks.clone() {
            return Err(BackendError::Operation {
                op: format!("kick {} peers", kicks.len()),
                message,
            });
        }
        // A re-created peer may come back with other allowed IPs: re-indexed once per call.
        inner.state.modify(|state| {
            for kick in kicks {
                let Some(peer) = state.device.peers.get_mut(&kick.peer.public_key) else {
                    continue;
                };
                if kick.recreate {
                    *peer = PeerState::fresh(kick.peer.clone());
                }
                Arc::make_mut(&mut peer.config).endpoint = Some(kick.endpoint);
            }
        });
        inner.counters.device_writes += 1;
        inner.kicks.push(kicks.to_vec());
        Ok(())
    }
}
