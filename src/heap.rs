//! The process's allocator settings: one glibc arena.
//!
//! The agent's state has one owner (the event loop), but glibc gives each thread that
//! allocates its own arena (up to eight per core): the runtime's workers, the blocking
//! threads that apply and read the interface and the HTTP server each keep freed memory
//! of their own that the others cannot reuse. Measured at 50,000 peers (BENCHMARKS.md,
//! "Peak RSS of the agent"): 70.2 MiB peak RSS with the default arenas, 65.1 with two,
//! 61.2 with one, for the same heap. An operator's `MALLOC_ARENA_MAX` wins.

/// Limits glibc to one arena unless `MALLOC_ARENA_MAX` is set. Call before any thread is
/// started. Elsewhere than glibc: nothing.
pub fn one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no thread has started yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
