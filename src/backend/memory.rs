//! An in-memory interface for tests: the plan is executed with [`crate::plan::simulate`],
//! the WireGuard model the property test checks. Clones share one interface, so a test can
//! keep a handle, inspect what the agent did and change the "kernel" behind its back, and
//! make any phase of an apply fail (fault injection).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Backend, BackendError, Kick, WriteCounters};
use crate::model::{Observed, PeerState};
use crate::plan::{simulate, Op, Phase, Plan};

/// A shared simulated interface.
#[derive(Clone, Debug)]
pub struct MemoryBackend {
    name: String,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Observed,
    counters: WriteCounters,
    applied: Vec<Op>,
    kicks: Vec<Kick>,
    fail_next: Option<String>,
    /// Every apply holding an operation of one of these phases fails with the message.
    failing: BTreeMap<Phase, String>,
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
        self.lock().state.clone()
    }

    /// Changes the interface behind the agent's back (drift, traffic, handshakes).
    pub fn modify(&self, f: impl FnOnce(&mut Observed)) {
        f(&mut self.lock().state)
    }

    /// Every operation applied so far, in order.
    pub fn applied_ops(&self) -> Vec<Op> {
        self.lock().applied.clone()
    }

    /// Every kick executed so far, in order (skipped ones included).
    pub fn kicks(&self) -> Vec<Kick> {
        self.lock().kicks.clone()
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

    /// Ends every fault set by [`MemoryBackend::fail_phase`].
    pub fn clear_faults(&self) {
        self.lock().failing.clear();
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
        Ok(self.lock().state.clone())
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
        simulate(&mut inner.state, plan);
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

    fn remove(&mut self) -> Result<(), BackendError> {
        self.lock().state = Observed::default();
        Ok(())
    }

    /// Sets the endpoint of each peer present; a re-created one starts afresh (no
    /// handshake, counters at 0), as a removed and re-added peer of a real device does.
    fn kick(&mut self, kicks: &[Kick]) -> Result<(), BackendError> {
        let mut inner = self.lock();
        for kick in kicks {
            if let Some(peer) = inner.state.device.peers.get_mut(&kick.peer.public_key) {
                if kick.recreate {
                    let mut config = kick.peer.clone();
                    config.endpoint = Some(kick.endpoint);
                    *peer = PeerState::fresh(config);
                } else {
                    peer.config.endpoint = Some(kick.endpoint);
                }
            }
            inner.kicks.push(kick.clone());
        }
        if !kicks.is_empty() {
            inner.counters.device_writes += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Key, PeerSpec};
    use std::time::SystemTime;

    #[test]
    fn kick_sets_endpoints_resets_recreated_peers_and_skips_absent_ones() {
        let mut b = MemoryBackend::new("wg0");
        let spec = |n: u8| PeerSpec::new(Key([n; 32]), [format!("10.0.0.{n}/32").parse().unwrap()]);
        b.modify(|o| {
            for n in [1, 2] {
                let mut p = PeerState::fresh(spec(n));
                p.rx_bytes = 100;
                p.last_handshake = Some(SystemTime::UNIX_EPOCH);
                o.device.peers.insert(p.config.public_key, p);
            }
        });
        let at = |port: u16| std::net::SocketAddr::from(([192, 0, 2, 9], port));
        let kicks = [
            Kick {
                peer: spec(1),
                endpoint: at(1),
                recreate: false,
            },
            Kick {
                peer: spec(2),
                endpoint: at(2),
                recreate: true,
            },
            Kick {
                peer: spec(3),
                endpoint: at(3),
                recreate: true,
            },
        ];
        b.kick(&kicks).unwrap();
        let peers = b.state().device.peers;
        assert_eq!(peers.len(), 2, "an absent peer is not created");
        let one = &peers[&Key([1; 32])];
        assert_eq!((one.config.endpoint, one.rx_bytes), (Some(at(1)), 100));
        assert!(one.last_handshake.is_some());
        let two = &peers[&Key([2; 32])];
        assert_eq!((two.config.endpoint, two.rx_bytes), (Some(at(2)), 0));
        assert_eq!(two.last_handshake, None);
        assert_eq!(b.kicks(), kicks.to_vec());
        assert_eq!(b.counters().device_writes, 1);
    }
}
