//! The executor seam: how one attempt at one unit runs — check out the QA repository and
//! run its commands — once the strategy has decided that it runs.
//!
//! [`LocalExecutor`] runs the commands as child processes of Sentry (the `runner`
//! module). Another executor (a Kubernetes Job, a fake in tests) implements [`Executor`]
//! and is handed to [`super::Deployer::with_executor`]; the strategy code (ordering,
//! `max_parallel`, `continue_on_error`, retries, `global_timeout`) is the same for all.
//!
//! Contract: `execute` returns only when everything the attempt started has stopped; it
//! honours `job.shutdown` and `job.run.deadline`; it reports a failure before the first
//! command as [`UnitStatus::SetupFailed`] so that the change stays pending.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::runner::{self, Attempt, OutputSink, RunInfo};
use super::{Unit, UnitStatus};
use crate::config::{Config, Repository};
use crate::shutdown::Shutdown;

/// Everything one attempt needs.
pub struct Job<'a> {
    pub repo: &'a Repository,
    pub unit: &'a Unit,
    pub run: &'a RunInfo,
    pub shutdown: &'a Shutdown,
    /// Where output lines and Sentry's own notes about the unit go.
    pub sink: &'a Arc<OutputSink>,
    /// 1 for the first attempt, counting retries of failed commands.
    pub attempt: u32,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: UnitStatus,
    /// Exit code of the last command that ran, when it exited by itself.
    pub exit_code: Option<i32>,
    /// The command that failed or timed out, as `[2] make test`, secrets masked.
    pub failed_command: Option<String>,
}

impl Outcome {
    pub fn new(status: UnitStatus, exit_code: Option<i32>) -> Outcome {
        Outcome {
            status,
            exit_code,
            failed_command: None,
        }
    }
}

/// Runs one attempt at one unit.
pub trait Executor: Send + Sync {
    fn execute<'a>(&'a self, job: Job<'a>) -> BoxFuture<'a, Outcome>;
}

/// Runs commands with `deploy.shell -c` as child processes of Sentry, each in its own
/// process group, in a fresh clone under `work_dir`.
pub struct LocalExecutor {
    config: Arc<Config>,
    /// Sentry's own secrets, which commands never inherit (`deploy.inherit_env`).
    own_secrets: Vec<String>,
}

impl LocalExecutor {
    pub fn new(config: Arc<Config>) -> LocalExecutor {
        let own_secrets = config
            .own_secrets()
            .iter()
            .map(|s| secrecy::ExposeSecret::expose_secret(s).to_owned())
            .collect();
        LocalExecutor {
            config,
            own_secrets,
        }
    }
}

impl Executor for LocalExecutor {
    fn execute<'a>(&'a self, job: Job<'a>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let attempt = Attempt {
                config: &self.config,
                own_secrets: &self.own_secrets,
                repo: job.repo,
                unit: job.unit,
                run: job.run,
                shutdown: job.shutdown,
                sink: job.sink,
            };
            runner::run_attempt(&attempt).await
        })
    }
}
