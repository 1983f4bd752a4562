//! The `sentry` binary: parse the command line, start logging, hand over to the library,
//! and turn the outcome into an exit code.

use std::process::ExitCode;

use clap::Parser;
use sentry::{Exit, cli, commands, telemetry};

fn main() -> ExitCode {
    tune_malloc();
    let args = match cli::normalize_args(std::env::args_os()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}\n\nFor more information, try '--help'.");
            return Exit::CannotRun.into();
        }
    };
    let cli = match cli::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors.
            let _ = e.print();
            return if e.use_stderr() {
                Exit::CannotRun
            } else {
                Exit::Success
            }
            .into();
        }
    };
    telemetry::init(cli.log_level, cli.log_format);
    commands::run(cli).into()
}

/// Keeps glibc's malloc from holding memory a long-running poller no longer uses:
/// - each thread that allocates gets its own arena, and tokio's blocking pool (clones,
///   ls-remote, state writes) keeps creating threads: two arenas are plenty;
/// - after freeing a large block (the serialised state file grows with the state) glibc
///   raises its mmap threshold to that size, so later large blocks come from the heap and
///   fragment it. A fixed threshold (which also fixes the trim threshold) keeps blocks of
///   128 KiB and more in their own mappings, returned to the system when freed.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called first thing, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
