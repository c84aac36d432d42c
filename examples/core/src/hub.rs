//! Per-location fan-out: the broadcast of deltas to every connected gateway, the registry
//! of live streams (one per gateway id: a reconnect replaces the old stream), and the
//! fault injection hooks tests use.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use gatehouse_proto::v1 as pb;
use tokio::sync::{broadcast, oneshot};

/// Deltas a slow gateway may fall behind by before it gets a fresh snapshot instead.
const BROADCAST_CAPACITY: usize = 1024;

/// What a location's broadcast carries.
#[derive(Clone, Debug)]
pub enum Broadcast {
    /// A committed revision.
    Delta(Arc<pb::Delta>),
    /// A raw message injected by a test, sent as is.
    Raw(Arc<pb::CoreMessage>),
    /// What one gateway saw (peer activity and endpoints): sent to every other gateway.
    Relay {
        from: Arc<str>,
        msg: Arc<pb::CoreMessage>,
    },
}

/// The fan-out state of every location.
#[derive(Default)]
pub struct Hub {
    inner: Mutex<HashMap<u64, LocationHub>>,
    next_conn: std::sync::atomic::AtomicU64,
}

struct LocationHub {
    tx: broadcast::Sender<Broadcast>,
    drop_next: usize,
    streams: HashMap<String, Stream>,
}

struct Stream {
    id: u64,
    /// Dropping it tells the stream it was replaced.
    _kick: oneshot::Sender<()>,
}

/// A live stream's registration; removes itself when dropped (unless replaced meanwhile).
pub struct Registration {
    hub: Arc<Hub>,
    location: u64,
    gateway_id: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.hub.lock();
        if let Some(loc) = inner.get_mut(&self.location) {
            if loc.streams.get(&self.gateway_id).map(|s| s.id) == Some(self.id) {
                loc.streams.remove(&self.gateway_id);
            }
        }
    }
}

impl Hub {
    /// A receiver of every later broadcast of the location.
    pub fn subscribe(&self, location: u64) -> broadcast::Receiver<Broadcast> {
        self.lock()
            .entry(location)
            .or_insert_with(LocationHub::new)
            .tx
            .subscribe()
    }

    /// Sends a committed delta to every connected gateway of the location (unless a test
    /// asked to drop it). Call it while holding the store, so deltas leave in order.
    pub fn publish(&self, location: u64, delta: pb::Delta) {
        let mut inner = self.lock();
        let loc = inner.entry(location).or_insert_with(LocationHub::new);
        if loc.drop_next > 0 {
            loc.drop_next -= 1;
            tracing::warn!(
                location,
                revision = delta.revision,
                "fault injection: delta dropped"
            );
            return;
        }
        // No receivers is fine: nobody is connected.
        let _ = loc.tx.send(Broadcast::Delta(Arc::new(delta)));
    }

    /// The next `n` deltas of the location are not sent.
    pub fn drop_next(&self, location: u64, n: usize) {
        self.lock()
            .entry(location)
            .or_insert_with(LocationHub::new)
            .drop_next = n;
    }

    /// Sends what gateway `from` saw to every other connected gateway of the location.
    /// Call it while holding the store, so relays leave in the order they were stored.
    pub fn relay(&self, location: u64, from: &str, msg: pb::CoreMessage) {
        let mut inner = self.lock();
        let loc = inner.entry(location).or_insert_with(LocationHub::new);
        let _ = loc.tx.send(Broadcast::Relay {
            from: Arc::from(from),
            msg: Arc::new(msg),
        });
    }

    /// Sends a raw message to every connected gateway of the location.
    pub fn inject(&self, location: u64, msg: pb::CoreMessage) {
        let mut inner = self.lock();
        let loc = inner.entry(location).or_insert_with(LocationHub::new);
        let _ = loc.tx.send(Broadcast::Raw(Arc::new(msg)));
    }

    /// Registers a live stream of `gateway_id`, replacing (and ending) an older one. The
    /// receiver resolves when a newer stream of the same gateway replaces this one.
    pub fn register(
        self: &Arc<Self>,
        location: u64,
        gateway_id: &str,
    ) -> (Registration, oneshot::Receiver<()>) {
        let id = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (kick, kicked) = oneshot::channel();
        let old = self
            .lock()
            .entry(location)
            .or_insert_with(LocationHub::new)
            .streams
            .insert(gateway_id.to_owned(), Stream { id, _kick: kick });
        if old.is_some() {
            tracing::info!(
                location,
                gateway_id,
                "gateway reconnected: older stream replaced"
            );
        }
        let reg = Registration {
            hub: Arc::clone(self),
            location,
            gateway_id: gateway_id.to_owned(),
            id,
        };
        (reg, kicked)
    }

    /// Gateway ids with a live stream.
    pub fn connected(&self, location: u64) -> BTreeSet<String> {
        self.lock()
            .get(&location)
            .map(|l| l.streams.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, LocationHub>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LocationHub {
    fn new() -> Self {
        LocationHub {
            tx: broadcast::channel(BROADCAST_CAPACITY).0,
            drop_next: 0,
            streams: HashMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(revision: u64) -> pb::Delta {
        pb::Delta {
            revision,
            base_revision: revision - 1,
            changes: vec![],
        }
    }

    #[test]
    fn dropped_deltas_are_not_sent_and_later_ones_are() {
        let hub = Hub::default();
        let mut rx = hub.subscribe(1);
        hub.drop_next(1, 1);
        hub.publish(1, delta(2));
        hub.publish(1, delta(3));
        match rx.try_recv() {
            Ok(Broadcast::Delta(d)) => assert_eq!(d.revision, 3),
            other => panic!("unexpected {other:?}"),
        }
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_reconnect_replaces_the_older_stream() {
        let hub = Arc::new(Hub::default());
        let (first, mut kicked) = hub.register(1, "gw");
        assert!(kicked.try_recv().is_err(), "not replaced yet");
        let (second, _k2) = hub.register(1, "gw");
        assert!(matches!(
            kicked.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        drop(first); // the old stream ending must not unregister the new one
        assert!(hub.connected(1).contains("gw"));
        drop(second);
        assert!(hub.connected(1).is_empty());
    }
}
