//! Sentry watches Git repositories and, when a watched branch moves, deploys: it clones a
//! QA repository and runs its commands, for whole groups of repositories at once.
//!
//! The modules follow the data: [`cli`] → [`config`] → [`forge`] (asks GitHub, GitLab or any
//! Git host for branch heads) → [`monitor`] (poll loop, change detection, state) → [`deploy`]
//! (checkout, command runner, group strategies), with `server` (health, metrics, webhooks)
//! and [`telemetry`] beside them; [`report`] puts outcomes on commits and in chat. [`commands`] wires them into the subcommands, printing
//! through [`output`] (closed pipes, colour).

// Everything is crate-private: the binary calls [`main`], tests and benches reach what
// they drive through [`testing`]. So the compiler, not review, reports dead code.
pub(crate) mod api;
pub(crate) mod build_info;
pub(crate) mod cli;
pub(crate) mod cluster;
pub(crate) mod commands;
pub(crate) mod config;
pub(crate) mod dashboard;
pub(crate) mod deploy;
pub(crate) mod forge;
pub(crate) mod hardening;
pub(crate) mod history;
pub(crate) mod leader;
pub(crate) mod memory;
pub(crate) mod monitor;
pub(crate) mod output;
pub(crate) mod report;
pub(crate) mod server;
pub(crate) mod shutdown;
pub(crate) mod telemetry;
pub mod testing;

pub use commands::main;

/// How a run of Sentry ended, as the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: everything asked for was done.
    Success = 0,
    /// 1: the job failed: invalid configuration, a failed deployment.
    JobFailed = 1,
    /// 2: Sentry could not do its job at all: usage, unreadable files, I/O.
    CannotRun = 2,
    /// 3 (`exec-unit` only): the unit could not get as far as its first command.
    UnitSetupFailed = 3,
    /// 4 (`exec-unit` only): a command ran past its timeout or the group's.
    UnitTimedOut = 4,
    /// 5 (`exec-unit` only): stopped by a shutdown.
    UnitCancelled = 5,
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit as u8)
    }
}
