//! Process memory: tunes glibc's malloc so that a long-running poller's resident memory
//! follows what is live instead of creeping up. A no-op on other C libraries.

/// Tunes the allocator; call first thing in `main`, before any thread exists.
/// - each thread that allocates gets its own arena, and tokio's blocking pool (clones,
///   ls-remote, state writes) keeps creating threads: one arena is plenty for a poller
///   whose two workers mostly wait on the network;
/// - after freeing a large block (the serialised state file grows with the state) glibc
///   raises its mmap threshold to that size, so later large blocks come from the heap and
///   fragment it. A fixed threshold (which also fixes the trim threshold) keeps blocks of
///   128 KiB and more in their own mappings, returned to the system when freed.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
