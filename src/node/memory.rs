//! What keeps a node small at rest (issue 19: <= 15 MiB idle with 100,000
//! active bans known): its runtime's threads, glibc's allocator arenas,
//! and giving back what a catch-up freed.
//!
//! - Two runtime workers at most ([`runtime`]): a node's work per ban is a
//!   few syscalls (measured in `docs/perf/`), not computation, and every
//!   extra worker is a thread stack and, with glibc, an allocator arena.
//! - At most [`ARENAS`] glibc arenas (`M_ARENA_MAX`; the default is 8 per
//!   core): each arena keeps its own freed memory, so memory freed on one
//!   thread is not reused by another and the node's resident set grows
//!   with the threads that ever allocated (the blocking pool included).
//! - After a burst of applied events (a catch-up), once the node is idle,
//!   `malloc_trim` hands the freed pages back ([`trim_when_idle`]):
//!   without it the pages a catch-up used stay resident while idle.
use std::{sync::Arc, time::Duration};

use super::position::Position;
use crate::shutdown::Shutdown;

/// Most tokio worker threads a node runs.
pub const WORKERS: usize = 2;
/// Most glibc malloc arenas in a node process.
pub const ARENAS: i32 = 2;
/// Events applied since the last trim that make the next idle tick trim.
const TRIM_AFTER: u64 = 1000;
/// How often the trim task looks whether the node went idle.
const TRIM_TICK: Duration = Duration::from_secs(2);

/// The node daemon's runtime: [`WORKERS`] workers (fewer on one core),
/// in a process whose allocator keeps at most [`ARENAS`] arenas. Call
/// before any other thread starts (arenas are made as threads allocate).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    // SAFETY: mallopt only sets an allocator parameter; it is called
    // before the runtime starts threads. (A no-op on a non-glibc libc.)
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.clamp(1, WORKERS))
        .enable_all()
        .build()
}

/// Trims the allocator's free memory once the node is idle after applying
/// at least [`TRIM_AFTER`] events: the position moved that much since the
/// last trim and did not move in the last [`TRIM_TICK`]. Costs one atomic
/// load a tick while nothing happens.
pub async fn trim_when_idle(position: Arc<Position>, mut shutdown: Shutdown) {
    let mut trimmed_at = position.get();
    let mut last = trimmed_at;
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tokio::time::sleep(TRIM_TICK) => {}
        }
        let now = position.get();
        if now == last && now >= trimmed_at + TRIM_AFTER {
            trim();
            trimmed_at = now;
        }
        last = now;
    }
}

fn trim() {
    // SAFETY: malloc_trim only releases free memory of the allocator.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}
