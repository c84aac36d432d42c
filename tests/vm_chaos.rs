//! The chaos drill's shorter kernel variant (issue 13), in the VM: the same world and
//! checks as `tests/e2e_chaos.rs`, with the agents on the kernel backend and kernel
//! WireGuard clients, and 6 crashes by default (the VM emulates its CPU in software).
//!
//! `tests/vm/run-kernel-tests.sh --test vm_chaos`; more crashes with
//! `GATEHOUSE_CHAOS_CRASHES=N`, a replay with `GATEHOUSE_CHAOS_SEED=<seed>`.

#[path = "chaos/mod.rs"]
mod chaos;

use chaos::{drill, Backend};

#[test]
#[ignore = "needs kernel WireGuard: tests/vm/run-kernel-tests.sh --test vm_chaos"]
fn chaos_drill_on_kernel_wireguard_loses_nothing() {
    drill::run("vc", Backend::Kernel, 6);
}
