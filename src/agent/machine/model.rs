//! The machine's model of the interface: the last read with every successful apply carried
//! over by the kernel's rule, with the index of who holds each allowed IP built once per
//! read and kept by each apply ([`crate::plan::KernelModel`], the same model the in-memory
//! backend runs on): an apply of k peer changes costs O(k log N).

pub(super) use crate::plan::KernelModel as Model;
