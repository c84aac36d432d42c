//! The machine's model of the interface: the last read with every successful apply carried
//! over by the kernel's rule, with the index of who holds each allowed IP built once per
//! read and kept by each apply ([`crate::plan::KernelModel`], the same model the in-memory
//! backend runs on): an apply of k peer changes costs O(k log N).
//!
//! A read is made into the model itself ([`ReadInto`], lent with [`super::Action::Read`]
//! and given back with [`super::Outcome::Read`]): one copy of the interface, also while a
//! tick reads it.

pub(super) use crate::plan::KernelModel as Model;

/// The machine's model lent to a read, to be refreshed in place by the backend
/// ([`crate::backend::Backend::observe_into`]) and given back with the read's outcome.
pub struct ReadInto {
    model: Model,
    /// The machine knew the interface before the read (else the model starts empty, and
    /// a read that fails leaves it unknown).
    known: bool,
}

impl ReadInto {
    /// Lends `model` (None: unknown, an empty model is read into).
    pub(super) fn lend(model: Option<Model>) -> Self {
        ReadInto {
            known: model.is_some(),
            model: model.unwrap_or_default(),
        }
    }

    /// The model the read goes into.
    pub fn model(&mut self) -> &mut Model {
        &mut self.model
    }

    /// The model after a read: the read's after a success; after a failure the last one
    /// with what the read changed (see [`crate::plan::Refresh`]), or unknown if it was.
    pub(super) fn give_back(self, read_ok: bool) -> Option<Model> {
        (read_ok || self.known).then_some(self.model)
    }
}

/// Short: not every peer in a log line.
impl std::fmt::Debug for ReadInto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadInto")
            .field("peers", &self.model.device.peers.len())
            .field("known", &self.known)
            .finish()
    }
}
