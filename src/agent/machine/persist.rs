//! What the machine writes to the state store, and when: a journal record proportional to
//! the change when the store's base and journal hold everything before it, else the full
//! state (a snapshot, a trim, a restore with a journal, the first write, and after any
//! failed write).
//!
//! The rule: `Disk::held` is the held revision that the base plus journal on disk
//! describe, and `Disk::deltas` are the encoded Core deltas accepted on top of it since;
//! together they are the held location. Anything that changes the held location another
//! way (a snapshot, `keep_only`, a restore with records replayed) makes `held` unknown, so
//! the next write is full. A failed append falls back to a full save; a failed full save
//! is reported as before (and the next write is full again).

use gatehouse_proto::v1;
use tracing::{info, warn};

use super::reconcile::Wait;
use super::{Action, AppendError, Machine, Outcome};
use crate::location::{self, Update};
use crate::state::Record;

/// The machine's view of the store.
#[derive(Debug, Default)]
pub(super) struct Disk {
    /// The held revision the base and journal on disk hold; None: unknown (full save next).
    held: Option<u64>,
    /// Prost-encoded deltas accepted on top of `held`, oldest first.
    deltas: Vec<Vec<u8>>,
    /// The write in flight, and the held revision it brings the disk to.
    writing: Option<Writing>,
}

#[derive(Debug, Clone, Copy)]
enum Writing {
    Full { revision: u64 },
    Append { revision: u64 },
}

impl Disk {
    /// The store holds the state as loaded at `revision` (a base without a journal to
    /// replay).
    pub(super) fn loaded(revision: u64) -> Self {
        Disk {
            held: Some(revision),
            ..Default::default()
        }
    }

    /// The held location changed other than by deltas: the next write is full.
    pub(super) fn forget(&mut self) {
        self.held = None;
        self.deltas.clear();
    }

    /// Deltas were accepted on the held location.
    pub(super) fn deltas_accepted(&mut self, deltas: &[v1::Delta]) {
        if self.held.is_some() {
            self.deltas
                .extend(deltas.iter().map(prost::Message::encode_to_vec));
        }
    }

    /// Whether the next write must be a full save.
    pub(super) fn needs_full(&self) -> bool {
        self.held.is_none()
    }
}

/// Replays the journal's `Deltas` records on the restored location, in order, stopping at
/// the first that does not decode or does not advance it. Returns how many were replayed.
pub(super) fn replay(held: &mut location::Held, records: &[Record]) -> usize {
    let mut replayed = 0;
    for record in records {
        let Record::Deltas { revision, deltas } = record else {
            continue;
        };
        let decoded: Result<Vec<v1::Delta>, _> = deltas
            .iter()
            .map(|b| <v1::Delta as prost::Message>::decode(b.as_slice()))
            .collect();
        let decoded = match decoded {
            Ok(d) if !d.is_empty() => d,
            Ok(_) => continue,
            Err(e) => {
                warn!(revision, error = %e, "state journal: a delta does not decode; replay stops here");
                break;
            }
        };
        match location::on_deltas(Some(held), &decoded) {
            (Update::Advanced { .. }, used) if used == decoded.len() => replayed += 1,
            (update, _) => {
                warn!(
                    revision,
                    held = held.revision,
                    outcome = update_kind(&update),
                    "state journal: a record does not advance the restored location; replay stops here"
                );
                break;
            }
        }
    }
    replayed
}

fn update_kind(update: &Update) -> &'static str {
    match update {
        Update::Advanced { .. } => "advanced in part",
        Update::Accept(_) => "accept",
        Update::Gap { .. } => "gap",
        Update::Stale { .. } => "stale",
        Update::Reject { .. } => "rejected",
    }
}

impl Machine {
    /// Writes the state before `wait` goes on: `records` (with the deltas accepted since
    /// the last write in front) appended to the journal when the disk holds everything
    /// before them, else the full state.
    pub(super) fn write(&mut self, records: Vec<Record>, wait: Wait) {
        let revision = self.held.as_ref().map_or(0, |h| h.revision);
        if self.disk.needs_full() {
            return self.save_full(wait);
        }
        let mut all = Vec::with_capacity(records.len() + 1);
        if !self.disk.deltas.is_empty() {
            all.push(Record::Deltas {
                revision,
                deltas: self.disk.deltas.clone(),
            });
        }
        all.extend(records);
        if all.is_empty() {
            // Nothing changed since the last write: the disk already holds it.
            return self.resume(wait, Outcome::Saved(Ok(())));
        }
        self.disk.writing = Some(Writing::Append { revision });
        self.request(Action::Append(all), wait);
    }

    /// Writes the whole state (it compacts the journal).
    pub(super) fn save_full(&mut self, wait: Wait) {
        let revision = self.held.as_ref().map_or(0, |h| h.revision);
        self.disk.writing = Some(Writing::Full { revision });
        self.request(Action::Save, wait);
    }

    /// The outcome of a write, as the waiting work sees it (`Saved`); a refused append
    /// becomes a full save and returns None (the work waits for that one).
    pub(super) fn written(&mut self, wait: Wait, outcome: Outcome) -> Option<(Wait, Outcome)> {
        let writing = self.disk.writing.take();
        match (outcome, writing) {
            (Outcome::Appended(Ok(_)), Some(Writing::Append { revision })) => {
                self.disk.held = Some(revision);
                self.disk.deltas.clear();
                Some((wait, Outcome::Saved(Ok(()))))
            }
            (Outcome::Appended(Err(e)), _) => {
                match e {
                    AppendError::Compact => info!("state journal: compacting with a full save"),
                    AppendError::Failed(e) => {
                        warn!(error = %e, "cannot append to the state journal: writing the full state")
                    }
                }
                self.disk.forget();
                self.save_full(wait);
                None
            }
            (Outcome::Saved(result), Some(Writing::Full { revision })) => {
                self.disk.deltas.clear();
                self.disk.held = result.is_ok().then_some(revision);
                Some((wait, Outcome::Saved(result)))
            }
            (outcome, writing) => {
                self.disk.writing = writing;
                Some((wait, outcome))
            }
        }
    }
}
