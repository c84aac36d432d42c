//! State shared by the gRPC and HTTP sides: the store behind a mutex and the hub.
//! Store calls run on the blocking pool; a change publishes its delta before it releases
//! the store, so every gateway sees revisions in order.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use gatehouse_proto::v1 as pb;
use tokio::sync::broadcast;

use crate::error::CoreError;
use crate::hub::Hub;
use crate::store::Store;

/// Revocations a stream may fall behind by before it re-checks its token in the store.
const REVOCATIONS_CAPACITY: usize = 256;

/// The Core's state.
pub struct Shared {
    /// When this Core process started (Unix ms): right after a start its view of the
    /// gateways' activity is incomplete (protocol rule 8).
    pub started_at: i64,
    store: Arc<Mutex<Store>>,
    pub hub: Arc<Hub>,
    /// Ids of revoked gateway tokens: every stream watches it and ends when its token's
    /// id comes by (streams subscribe before their token is checked, so none is missed).
    pub revocations: broadcast::Sender<u64>,
}

impl Shared {
    pub fn new(store: Store) -> Self {
        Shared {
            started_at: now_ms(),
            store: Arc::new(Mutex::new(store)),
            hub: Arc::new(Hub::default()),
            revocations: broadcast::channel(REVOCATIONS_CAPACITY).0,
        }
    }

    /// Runs `f` on the store (blocking pool) without publishing anything.
    pub async fn read<R, F>(&self, f: F) -> Result<R, CoreError>
    where
        F: FnOnce(&mut Store) -> Result<R, CoreError> + Send + 'static,
        R: Send + 'static,
    {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&mut lock(&store)))
            .await
            .map_err(|e| CoreError::Internal(format!("store task: {e}")))?
    }

    /// Runs a change of `location` and publishes the delta it returns (if any) while the
    /// store is still held.
    pub async fn change<R, F>(&self, location: u64, f: F) -> Result<R, CoreError>
    where
        F: FnOnce(&mut Store) -> Result<(R, Option<pb::Delta>), CoreError> + Send + 'static,
        R: Send + 'static,
    {
        let store = Arc::clone(&self.store);
        let hub = Arc::clone(&self.hub);
        tokio::task::spawn_blocking(move || {
            let mut store = lock(&store);
            let (r, delta) = f(&mut store)?;
            let delta = delta.map(|d| store.served_delta(location, d)).transpose()?;
            if let Some(delta) = delta {
                tracing::debug!(
                    location,
                    revision = delta.revision,
                    changes = delta.changes.len(),
                    "new revision"
                );
                hub.publish(location, delta);
            }
            Ok(r)
        })
        .await
        .map_err(|e| CoreError::Internal(format!("store task: {e}")))?
    }

    /// Like [`Self::change`] for a change that makes several revisions: publishes each
    /// delta it returns, in order, while the store is still held.
    pub async fn change_many<R, F>(&self, location: u64, f: F) -> Result<R, CoreError>
    where
        F: FnOnce(&mut Store) -> Result<(R, Vec<pb::Delta>), CoreError> + Send + 'static,
        R: Send + 'static,
    {
        let store = Arc::clone(&self.store);
        let hub = Arc::clone(&self.hub);
        tokio::task::spawn_blocking(move || {
            let mut store = lock(&store);
            let (r, deltas) = f(&mut store)?;
            for delta in deltas {
                hub.publish(location, delta);
            }
            Ok(r)
        })
        .await
        .map_err(|e| CoreError::Internal(format!("store task: {e}")))?
    }

    /// Flushes the database (graceful stop).
    pub async fn flush(&self) -> Result<(), CoreError> {
        self.read(|s| s.checkpoint()).await
    }
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // A panic inside a store call rolled its transaction back: the store is consistent.
    store.lock().unwrap_or_else(|e| e.into_inner())
}

/// Unix milliseconds now (the edge where time enters).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
