//! Group strategies: run a group run's units one at a time (`sequential`) or at most
//! `max_parallel` at once (`parallel`), under `continue_on_error`, `deploy.retries` and the
//! group's `global_timeout`, and report each unit's result as it ends.
//!
//! Both strategies share one driver: units start in configuration order, each after taking
//! a permit from a semaphore (one permit for `sequential`). Before a unit starts the driver
//! decides whether it may: after shutdown it is `cancelled`; after the deadline, or after a
//! failure without `continue_on_error`, it is `skipped`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::mask::Masker;
use super::runner::{self, Attempt, OutputSink, RunInfo};
use super::{
    DeployOptions, GroupResult, GroupRun, Trigger, Unit, UnitHook, UnitResult, UnitStatus,
};
use crate::config::{Config, Group, Strategy};
use crate::shutdown::Shutdown;

/// Longest wait between two attempts of a failed unit.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(60);

/// Runs group runs; cheap to clone, shareable across tasks.
#[derive(Clone)]
pub struct Deployer {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    options: DeployOptions,
    masker: Masker,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer")
            .field("work_dir", &self.inner.config.work_dir)
            .finish_non_exhaustive()
    }
}

impl Deployer {
    pub fn new(config: Arc<Config>, options: DeployOptions) -> Deployer {
        let masker = Masker::new(config.secrets());
        Deployer {
            inner: Arc::new(Inner {
                config,
                options,
                masker,
            }),
        }
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.inner.config
    }

    /// At startup: removes leftover checkout directories (and their changes files) of a
    /// crashed run from `work_dir`; only names starting with `sentry-checkout-` are touched.
    /// Returns how many entries were removed. Blocking: call before the runtime gets busy
    /// or inside `spawn_blocking`.
    pub fn sweep_work_dir(&self) -> std::io::Result<usize> {
        super::checkout::sweep(&self.inner.config.work_dir)
    }

    /// Runs one group run to the end; calls `on_unit_end` as each unit ends (any status,
    /// including skipped and cancelled). Never panics.
    pub async fn run_group(
        &self,
        run: GroupRun,
        shutdown: &Shutdown,
        on_unit_end: UnitHook,
    ) -> GroupResult {
        let started = Instant::now();
        let config = &self.inner.config;
        let Some(group) = config.group(&run.group).cloned() else {
            return self.unknown_group(run, &on_unit_end, started);
        };
        let info = Arc::new(self.run_info(&run, &group, started));
        let results = Driver {
            deployer: self.clone(),
            info,
            group: &group,
            shutdown,
            hook: &on_unit_end,
        }
        .run(&run.units)
        .await;
        let result = GroupResult {
            run_id: run.run_id,
            group: run.group,
            trigger: run.trigger,
            units: results,
            duration: started.elapsed(),
        };
        log_summary(&result);
        result
    }

    fn run_info(&self, run: &GroupRun, group: &Group, started: Instant) -> RunInfo {
        RunInfo {
            group: run.group.clone(),
            run_id: run.run_id.clone(),
            trigger: run.trigger.clone(),
            changes_json: changes_json(&self.inner.config, run),
            deadline: started + group.global_timeout,
            extra_env: self.inner.options.extra_env.clone(),
            keep_workdir: self.inner.options.keep_workdir,
        }
    }

    fn unknown_group(&self, run: GroupRun, hook: &UnitHook, started: Instant) -> GroupResult {
        tracing::error!(group = %run.group, "no group of this name in the configuration; nothing runs");
        let units = run
            .units
            .iter()
            .map(|unit| {
                let mut result = not_started(unit, UnitStatus::Failed);
                result.output_tail = format!("sentry: no group named \"{}\"\n", run.group);
                hook(&result);
                result
            })
            .collect();
        GroupResult {
            run_id: run.run_id,
            group: run.group,
            trigger: run.trigger,
            units,
            duration: started.elapsed(),
        }
    }

    /// One unit with its retries.
    async fn run_unit(&self, info: &RunInfo, unit: &Unit, shutdown: &Shutdown) -> UnitResult {
        let started = Instant::now();
        let config = &self.inner.config;
        let sink = Arc::new(OutputSink::new(
            &unit.repository,
            self.inner.masker.clone(),
            self.inner.options.live_output,
        ));
        let Some(repo) = config.repository(&unit.repository) else {
            sink.note(&format!("no repository named \"{}\"", unit.repository));
            let mut result = not_started(unit, UnitStatus::Failed);
            result.output_tail = sink.tail();
            return result;
        };
        tracing::info!(
            group = %info.group, run_id = %info.run_id, repository = %unit.repository,
            branch = %unit.branch, sha = %unit.sha.short(), "unit starting"
        );
        let attempt = Attempt {
            config,
            repo,
            unit,
            run: info,
            shutdown,
            sink: &sink,
        };
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            let outcome = runner::run_attempt(&attempt).await;
            if outcome.status != UnitStatus::Failed || attempts > repo.deploy.retries {
                break outcome;
            }
            let backoff = retry_backoff(attempts);
            sink.note(&format!(
                "attempt {attempts} failed; retrying in {}s",
                backoff.as_secs()
            ));
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.requested() => break outcome,
                _ = tokio::time::sleep_until(info.deadline) => break outcome,
            }
        };
        let result = UnitResult {
            unit: unit.clone(),
            status: outcome.status,
            exit_code: outcome.exit_code,
            duration: started.elapsed(),
            output_tail: sink.tail(),
            attempts,
        };
        log_unit_end(info, &result);
        result
    }
}

/// 1s, 2s, 4s, … up to [`MAX_RETRY_BACKOFF`].
fn retry_backoff(failed_attempts: u32) -> Duration {
    let exp = failed_attempts.saturating_sub(1).min(6);
    Duration::from_secs(1 << exp).min(MAX_RETRY_BACKOFF)
}

/// A unit that never started.
fn not_started(unit: &Unit, status: UnitStatus) -> UnitResult {
    UnitResult {
        unit: unit.clone(),
        status,
        exit_code: None,
        duration: Duration::ZERO,
        output_tail: String::new(),
        attempts: 0,
    }
}

/// The state of one group run while its units run.
struct Driver<'a> {
    deployer: Deployer,
    info: Arc<RunInfo>,
    group: &'a Group,
    shutdown: &'a Shutdown,
    hook: &'a UnitHook,
}

impl Driver<'_> {
    async fn run(self, units: &[Unit]) -> Vec<UnitResult> {
        let limit = match self.group.execution_strategy {
            Strategy::Sequential => 1,
            Strategy::Parallel => self.group.max_parallel.unwrap_or(units.len()),
        };
        let semaphore = Arc::new(Semaphore::new(limit.max(1)));
        let failed = Arc::new(AtomicBool::new(false));
        let mut results: Vec<Option<UnitResult>> = vec![None; units.len()];
        let mut tasks = JoinSet::new();
        let mut task_index = HashMap::new();
        for (index, unit) in units.iter().enumerate() {
            let permit = self.permit(&semaphore).await;
            match (permit, self.refusal(&failed)) {
                (Some(permit), None) => {
                    let handle =
                        tasks.spawn(self.unit_task(unit.clone(), permit, Arc::clone(&failed)));
                    task_index.insert(handle.id(), index);
                }
                (_, refusal) => {
                    let status = refusal.unwrap_or(UnitStatus::Skipped);
                    let result = not_started(unit, status);
                    log_unit_end(&self.info, &result);
                    (self.hook)(&result);
                    results[index] = Some(result);
                }
            }
        }
        while let Some(joined) = tasks.join_next_with_id().await {
            match joined {
                Ok((id, result)) => {
                    if let Some(&i) = task_index.get(&id) {
                        results[i] = Some(result);
                    }
                }
                Err(e) => {
                    tracing::error!(group = %self.info.group, "a unit task failed: {e}");
                    if let Some(&i) = task_index.get(&e.id()) {
                        let mut result = not_started(&units[i], UnitStatus::Failed);
                        result.output_tail = format!("sentry: internal error: {e}\n");
                        (self.hook)(&result);
                        results[i] = Some(result);
                    }
                }
            }
        }
        results
            .into_iter()
            .zip(units)
            .map(|(r, unit)| r.unwrap_or_else(|| not_started(unit, UnitStatus::Failed)))
            .collect()
    }

    /// Waits for a slot; `None` when shutdown or the deadline came first.
    async fn permit(&self, semaphore: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
        if self.refusal_now().is_some() {
            return None;
        }
        tokio::select! {
            biased;
            _ = self.shutdown.requested() => None,
            _ = tokio::time::sleep_until(self.info.deadline) => None,
            permit = Arc::clone(semaphore).acquire_owned() => permit.ok(),
        }
    }

    /// Why the next unit may not start, if it may not.
    fn refusal(&self, failed: &AtomicBool) -> Option<UnitStatus> {
        self.refusal_now().or_else(|| {
            (failed.load(Ordering::SeqCst) && !self.group.continue_on_error)
                .then_some(UnitStatus::Skipped)
        })
    }

    fn refusal_now(&self) -> Option<UnitStatus> {
        if self.shutdown.is_requested() {
            Some(UnitStatus::Cancelled)
        } else if Instant::now() >= self.info.deadline {
            Some(UnitStatus::Skipped)
        } else {
            None
        }
    }

    fn unit_task(
        &self,
        unit: Unit,
        permit: OwnedSemaphorePermit,
        failed: Arc<AtomicBool>,
    ) -> impl Future<Output = UnitResult> + Send + use<> {
        let deployer = self.deployer.clone();
        let info = Arc::clone(&self.info);
        let shutdown = self.shutdown.clone();
        let hook = Arc::clone(self.hook);
        async move {
            let result = deployer.run_unit(&info, &unit, &shutdown).await;
            if matches!(result.status, UnitStatus::Failed | UnitStatus::TimedOut) {
                failed.store(true, Ordering::SeqCst);
            }
            hook(&result);
            // The next unit starts only after this one is fully reported.
            drop(permit);
            result
        }
    }
}

/// The JSON of `SENTRY_CHANGES_FILE`: the group run and every one of its units.
fn changes_json(config: &Config, run: &GroupRun) -> String {
    let units: Vec<serde_json::Value> = run
        .units
        .iter()
        .map(|u| {
            serde_json::json!({
                "repository": u.repository,
                "branch": u.branch,
                "previous_sha": u.previous_sha,
                "sha": u.sha,
                "repo_url": config.repository(&u.repository).map(|r| r.monitor.repo_url.as_str()),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "group": run.group,
        "run_id": run.run_id,
        "trigger": run.trigger.as_str(),
        "units": units,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".to_owned())
}

fn log_unit_end(info: &RunInfo, result: &UnitResult) {
    tracing::info!(
        group = %info.group,
        run_id = %info.run_id,
        repository = %result.unit.repository,
        branch = %result.unit.branch,
        sha = %result.unit.sha.short(),
        status = result.status.as_str(),
        exit_code = result.exit_code,
        attempts = result.attempts,
        duration = %format_duration(result.duration),
        "unit {}", result.status.as_str()
    );
}

/// The one summary line of a group run.
fn log_summary(result: &GroupResult) {
    let count = |s: UnitStatus| result.units.iter().filter(|u| u.status == s).count();
    let user = match &result.trigger {
        Trigger::Manual { user } => user.as_str(),
        _ => "",
    };
    tracing::info!(
        group = %result.group,
        run_id = %result.run_id,
        trigger = result.trigger.as_str(),
        user,
        units = result.units.len(),
        succeeded = count(UnitStatus::Succeeded),
        failed = count(UnitStatus::Failed),
        timed_out = count(UnitStatus::TimedOut),
        skipped = count(UnitStatus::Skipped),
        cancelled = count(UnitStatus::Cancelled),
        duration = %format_duration(result.duration),
        "group run {}", if result.succeeded() { "succeeded" } else { "failed" }
    );
}

/// `1.2s`, `3m05s`: short and readable.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m{:02}s", secs / 3600, secs % 3600 / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(retry_backoff(1), Duration::from_secs(1));
        assert_eq!(retry_backoff(2), Duration::from_secs(2));
        assert_eq!(retry_backoff(3), Duration::from_secs(4));
        assert_eq!(retry_backoff(30), MAX_RETRY_BACKOFF);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(format_duration(Duration::from_millis(1234)), "1.2s");
        assert_eq!(format_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(format_duration(Duration::from_secs(3725)), "1h02m05s");
    }
}
