//! Group strategies: run a group run's units one at a time (`sequential`) or at most
//! `max_parallel` at once (`parallel`), under `continue_on_error`, `deploy.retries` and the
//! group's `global_timeout`, and report each unit's result as it ends.
//!
//! Both strategies share one driver: units start in configuration order, each after taking
//! a permit from a semaphore (one permit for `sequential`). Before a unit starts the driver
//! decides whether it may: after shutdown it is `cancelled`; after the deadline, or after a
//! failure without `continue_on_error`, it is `skipped`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::executor::{Executor, Job, Outcome};
use super::mask::Masker;
use super::observer::{Admission, Observers, RunObserver, RunRef};
use super::runner::{OutputSink, RunInfo};
use super::{DeployOptions, GroupResult, GroupRun, Trigger, Unit, UnitResult, UnitStatus};
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
    executor: Arc<dyn Executor>,
    /// `max_concurrent_units`: one permit per unit running anywhere, across groups.
    slots: Arc<Semaphore>,
    /// Asked before each unit starts; set once by `watch` (see [`Deployer::set_admission`]).
    admission: std::sync::OnceLock<Arc<dyn Admission>>,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer")
            .field("work_dir", &self.inner.config.work_dir)
            .finish_non_exhaustive()
    }
}

impl Deployer {
    /// A deployer that runs commands locally ([`LocalExecutor`]).
    pub fn new(config: Arc<Config>, options: DeployOptions) -> Deployer {
        let executor = Arc::new(super::kubernetes::GroupExecutor::new(config.clone()));
        Deployer::with_executor(config, options, executor)
    }

    pub fn with_executor(
        config: Arc<Config>,
        options: DeployOptions,
        executor: Arc<dyn Executor>,
    ) -> Deployer {
        let masker = Masker::new(config.secrets());
        let slots = Arc::new(Semaphore::new(config.max_concurrent_units.max(1)));
        Deployer {
            inner: Arc::new(Inner {
                config,
                options,
                masker,
                executor,
                slots,
                admission: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Makes every unit ask `admission` before it starts. Set once; a second call is
    /// ignored (the first one stays).
    pub fn set_admission(&self, admission: Arc<dyn Admission>) {
        let _ = self.inner.admission.set(admission);
    }

    /// `Ok` unless the admission refuses the unit.
    async fn admit(&self, run: RunRef<'_>, unit: &Unit) -> Result<(), String> {
        match self.inner.admission.get() {
            Some(admission) => admission.admit(run, unit).await,
            None => Ok(()),
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

    /// Runs one group run to the end, telling `observers` as the run and each unit start
    /// and end (every unit ends exactly once, with any status). Never panics.
    pub async fn run_group(
        &self,
        run: GroupRun,
        shutdown: &Shutdown,
        observers: &Observers,
    ) -> GroupResult {
        let span = tracing::info_span!("group_run", group = %run.group, run_id = %run.run_id);
        self.run_group_inner(run, shutdown, observers)
            .instrument(span)
            .await
    }

    async fn run_group_inner(
        &self,
        run: GroupRun,
        shutdown: &Shutdown,
        observers: &Observers,
    ) -> GroupResult {
        let started = Instant::now();
        let config = &self.inner.config;
        let meta = RunRef {
            group: &run.group,
            run_id: &run.run_id,
            trigger: &run.trigger,
        };
        observers.group_started(meta, &run.units);
        let results = match config.group(&run.group).cloned() {
            Some(group) => {
                let info = Arc::new(self.run_info(&run, &group, started));
                Driver {
                    deployer: self.clone(),
                    info,
                    group: &group,
                    shutdown,
                    observers,
                    first_failure: Arc::new(Mutex::new(None)),
                }
                .run(&run.units)
                .await
            }
            None => unknown_group(&run, observers),
        };
        let result = GroupResult {
            run_id: run.run_id,
            group: run.group,
            trigger: run.trigger,
            units: results,
            duration: started.elapsed(),
        };
        log_summary(&result);
        observers.group_ended(&result);
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

    /// One unit with its retries (`deploy.retries`, for failed commands only).
    async fn run_unit(&self, info: &RunInfo, unit: &Unit, shutdown: &Shutdown) -> UnitResult {
        let started = Instant::now();
        let config = &self.inner.config;
        let sink = Arc::new(OutputSink::new(
            unit,
            self.inner.masker.clone(),
            self.inner.options.live_output,
        ));
        let Some(repo) = config.repository(&unit.repository) else {
            let reason = format!("no repository named \"{}\"", unit.repository);
            sink.note(&reason);
            return UnitResult {
                output_tail: sink.tail(),
                ..not_started(unit, UnitStatus::SetupFailed, reason)
            };
        };
        tracing::info!("unit starting");
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            let job = Job {
                repo,
                unit,
                run: info,
                shutdown,
                sink: &sink,
                attempt: attempts,
            };
            let outcome = self.inner.executor.execute(job).await;
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
        let tail = sink.tail();
        let reason = (outcome.status == UnitStatus::SetupFailed).then(|| last_note(&tail));
        let Outcome {
            status,
            exit_code,
            failed_command,
        } = outcome;
        let result = UnitResult {
            unit: unit.clone(),
            status,
            exit_code,
            duration: started.elapsed(),
            output_tail: tail,
            attempts,
            failed_command,
            reason,
        };
        log_unit_end(&result);
        result
    }
}

/// The last line Sentry itself wrote about the unit: why it could not run.
fn last_note(tail: &str) -> String {
    tail.lines()
        .rev()
        .find_map(|l| l.strip_prefix("sentry: "))
        .unwrap_or("the unit could not run")
        .to_owned()
}

/// Every unit of a run whose group is not configured: none can run.
fn unknown_group(run: &GroupRun, observers: &Observers) -> Vec<UnitResult> {
    tracing::error!("no group of this name in the configuration; nothing runs");
    let meta = RunRef {
        group: &run.group,
        run_id: &run.run_id,
        trigger: &run.trigger,
    };
    run.units
        .iter()
        .map(|unit| {
            let reason = format!("no group named \"{}\"", run.group);
            let result = not_started(unit, UnitStatus::SetupFailed, reason);
            observers.unit_ended(meta, &result);
            result
        })
        .collect()
}

/// 1s, 2s, 4s, … up to [`MAX_RETRY_BACKOFF`].
fn retry_backoff(failed_attempts: u32) -> Duration {
    let exp = failed_attempts.saturating_sub(1).min(6);
    Duration::from_secs(1 << exp).min(MAX_RETRY_BACKOFF)
}

/// A unit that never started, and why.
fn not_started(unit: &Unit, status: UnitStatus, reason: String) -> UnitResult {
    UnitResult {
        unit: unit.clone(),
        status,
        exit_code: None,
        duration: Duration::ZERO,
        output_tail: String::new(),
        attempts: 0,
        failed_command: None,
        reason: Some(reason),
    }
}

/// Why a unit may not start.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    Shutdown,
    Deadline,
    /// The first unit that failed, as `repo@branch`.
    AfterFailure(String),
}

impl Refusal {
    fn result(&self, unit: &Unit, group: &Group) -> UnitResult {
        let (status, reason) = match self {
            Refusal::Shutdown => (
                UnitStatus::Cancelled,
                "cancelled: Sentry is shutting down".to_owned(),
            ),
            Refusal::Deadline => (
                UnitStatus::Skipped,
                format!(
                    "skipped: the group's global_timeout ({}) passed",
                    humantime::format_duration(group.global_timeout)
                ),
            ),
            Refusal::AfterFailure(first) => {
                (UnitStatus::Skipped, format!("skipped: {first} failed"))
            }
        };
        not_started(unit, status, reason)
    }
}

/// The state of one group run while its units run.
struct Driver<'a> {
    deployer: Deployer,
    info: Arc<RunInfo>,
    group: &'a Group,
    shutdown: &'a Shutdown,
    observers: &'a Observers,
    /// The first unit that failed or timed out, as `repo@branch`.
    first_failure: Arc<Mutex<Option<String>>>,
}

impl Driver<'_> {
    fn meta(&self) -> RunRef<'_> {
        RunRef {
            group: &self.info.group,
            run_id: &self.info.run_id,
            trigger: &self.info.trigger,
        }
    }

    async fn run(self, units: &[Unit]) -> Vec<UnitResult> {
        let limit = match self.group.execution_strategy {
            Strategy::Sequential => 1,
            Strategy::Parallel => self.group.max_parallel.unwrap_or(units.len()),
        };
        let semaphore = Arc::new(Semaphore::new(limit.max(1)));
        let mut results: Vec<Option<UnitResult>> = vec![None; units.len()];
        let mut tasks = JoinSet::new();
        let mut task_index = HashMap::new();
        for (index, unit) in units.iter().enumerate() {
            let permit = self.permit(&semaphore).await;
            let refusal = self.refusal();
            match (permit, refusal) {
                (Some(permit), None) => {
                    let handle = tasks.spawn(self.unit_task(unit.clone(), permit));
                    task_index.insert(handle.id(), index);
                }
                (_, refusal) => {
                    let refusal = refusal.unwrap_or(Refusal::Deadline);
                    let result = refusal.result(unit, self.group);
                    log_unit_end(&result);
                    self.observers.unit_ended(self.meta(), &result);
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
                    tracing::error!("a unit task failed (a bug: please report it): {e}");
                    if let Some(&i) = task_index.get(&e.id()) {
                        let reason = format!("sentry: internal error: {e}");
                        let result = not_started(&units[i], UnitStatus::SetupFailed, reason);
                        self.observers.unit_ended(self.meta(), &result);
                        results[i] = Some(result);
                    }
                }
            }
        }
        results
            .into_iter()
            .zip(units)
            .map(|(r, unit)| {
                r.unwrap_or_else(|| {
                    not_started(unit, UnitStatus::SetupFailed, "internal error".into())
                })
            })
            .collect()
    }

    /// Waits for a slot; `None` when shutdown or the deadline came first.
    async fn permit(&self, semaphore: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
        if self.refusal_now().is_some() {
            return None;
        }
        wait_for(Arc::clone(semaphore), self.shutdown, self.info.deadline).await
    }

    /// Why the next unit may not start, if it may not.
    fn refusal(&self) -> Option<Refusal> {
        self.refusal_now().or_else(|| {
            if self.group.continue_on_error {
                return None;
            }
            let first = self
                .first_failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            first.clone().map(Refusal::AfterFailure)
        })
    }

    fn refusal_now(&self) -> Option<Refusal> {
        if self.shutdown.is_requested() {
            Some(Refusal::Shutdown)
        } else if Instant::now() >= self.info.deadline {
            Some(Refusal::Deadline)
        } else {
            None
        }
    }

    fn unit_task(
        &self,
        unit: Unit,
        permit: OwnedSemaphorePermit,
    ) -> impl Future<Output = UnitResult> + Send + use<> {
        let deployer = self.deployer.clone();
        let info = Arc::clone(&self.info);
        let shutdown = self.shutdown.clone();
        let observers = self.observers.clone();
        let group = self.group.clone();
        let first_failure = Arc::clone(&self.first_failure);
        let span = tracing::info_span!(
            "unit",
            repository = %unit.repository,
            branch = %unit.branch,
            sha = %unit.sha.short(),
        );
        async move {
            let meta = RunRef {
                group: &info.group,
                run_id: &info.run_id,
                trigger: &info.trigger,
            };
            let slots = Arc::clone(&deployer.inner.slots);
            let result = match wait_for(slots, &shutdown, info.deadline).await {
                Some(_global) => match deployer.admit(meta, &unit).await {
                    Ok(()) => {
                        observers.unit_started(meta, &unit);
                        deployer.run_unit(&info, &unit, &shutdown).await
                    }
                    Err(reason) => {
                        let result = not_started(&unit, UnitStatus::Cancelled, reason);
                        log_unit_end(&result);
                        result
                    }
                },
                None => {
                    let refusal = if shutdown.is_requested() {
                        Refusal::Shutdown
                    } else {
                        Refusal::Deadline
                    };
                    let result = refusal.result(&unit, &group);
                    log_unit_end(&result);
                    result
                }
            };
            if matches!(result.status, UnitStatus::Failed | UnitStatus::TimedOut) {
                let mut first = first_failure.lock().unwrap_or_else(PoisonError::into_inner);
                first.get_or_insert_with(|| format!("{}@{}", unit.repository, unit.branch));
            }
            observers.unit_ended(meta, &result);
            // The next unit starts only after this one is fully reported.
            drop(permit);
            result
        }
        .instrument(span)
    }
}

/// A permit from `semaphore`, unless shutdown or `deadline` comes first.
async fn wait_for(
    semaphore: Arc<Semaphore>,
    shutdown: &Shutdown,
    deadline: Instant,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        biased;
        _ = shutdown.requested() => None,
        _ = tokio::time::sleep_until(deadline) => None,
        permit = semaphore.acquire_owned() => permit.ok(),
    }
}

/// The JSON of `SENTRY_CHANGES_FILE`: the group run and every one of its units.
pub(super) fn changes_json(config: &Config, run: &GroupRun) -> String {
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

/// Inside the unit's span, which carries the group, run, repository, branch and SHA.
fn log_unit_end(result: &UnitResult) {
    tracing::info!(
        status = result.status.as_str(),
        exit_code = result.exit_code,
        attempts = result.attempts,
        duration = %format_duration(result.duration),
        reason = result.reason.as_deref(),
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
        setup_failed = count(UnitStatus::SetupFailed),
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
    use crate::config::{Env, load_str};
    use crate::forge::Sha;
    use futures_util::future::BoxFuture;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An executor that runs nothing: each repository's attempts take the scripted time and
    /// end with the scripted status (default: 10 s, succeeded). It honours shutdown and the
    /// group deadline as the contract asks, and records when each attempt started.
    #[derive(Default)]
    struct Fake {
        script: Mutex<HashMap<String, Vec<(u64, UnitStatus)>>>,
        starts: Mutex<Vec<(String, Duration)>>,
        running: AtomicUsize,
        peak: AtomicUsize,
        epoch: Mutex<Option<Instant>>,
    }

    impl Fake {
        fn script(self, repo: &str, steps: &[(u64, UnitStatus)]) -> Fake {
            self.script
                .lock()
                .unwrap()
                .insert(repo.to_owned(), steps.to_vec());
            self
        }

        fn starts(&self) -> Vec<(String, u64)> {
            let starts = self.starts.lock().unwrap();
            starts
                .iter()
                .map(|(r, t)| (r.clone(), t.as_secs()))
                .collect()
        }
    }

    impl Executor for Fake {
        fn execute<'a>(&'a self, job: Job<'a>) -> BoxFuture<'a, Outcome> {
            Box::pin(async move {
                let epoch = *self.epoch.lock().unwrap().get_or_insert_with(Instant::now);
                let repo = job.unit.repository.clone();
                self.starts
                    .lock()
                    .unwrap()
                    .push((repo.clone(), epoch.elapsed()));
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.peak.fetch_max(now, Ordering::SeqCst);
                let (secs, status) = {
                    let mut script = self.script.lock().unwrap();
                    let steps = script.entry(repo).or_default();
                    if steps.is_empty() {
                        (10, UnitStatus::Succeeded)
                    } else {
                        steps.remove(0)
                    }
                };
                let status = tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(secs)) => status,
                    _ = job.shutdown.requested() => UnitStatus::Cancelled,
                    _ = tokio::time::sleep_until(job.run.deadline) => UnitStatus::TimedOut,
                };
                self.running.fetch_sub(1, Ordering::SeqCst);
                let code = match status {
                    UnitStatus::Succeeded => Some(0),
                    UnitStatus::Failed => Some(1),
                    _ => None,
                };
                Outcome::new(status, code)
            })
        }
    }

    fn config(group: &str, repos: &[&str], extra_top: &str, deploy_extra: &str) -> Arc<Config> {
        let mut yaml = format!("{extra_top}groups:\n  g: {{{group}}}\n  h: {{}}\nrepositories:\n");
        for (i, name) in repos.iter().enumerate() {
            let group = if name.starts_with('h') { "h" } else { "g" };
            yaml.push_str(&format!(
                "  - name: {name}\n    group: {group}\n    monitor: {{repo_url: 'file:///w{i}', branches: [main], repo_type: git}}\n    deploy: {{qa_repo_url: 'file:///qa', qa_repo_branch: main, commands: ['true']{deploy_extra}}}\n"
            ));
        }
        let loaded = load_str(&yaml, &Env::fixed([("HOME", "/")]));
        Arc::new(
            loaded
                .config
                .unwrap_or_else(|| panic!("{:?}", loaded.diagnostics)),
        )
    }

    fn run_of(group: &str, repos: &[&str]) -> GroupRun {
        let sha = Sha::parse(&"a".repeat(40)).unwrap();
        GroupRun {
            group: group.into(),
            units: repos
                .iter()
                .map(|r| Unit {
                    repository: (*r).into(),
                    branch: "main".into(),
                    previous_sha: None,
                    sha: sha.clone(),
                })
                .collect(),
            trigger: Trigger::Poll,
            run_id: "r".into(),
        }
    }

    async fn run(
        config: &Arc<Config>,
        fake: &Arc<Fake>,
        group: &str,
        repos: &[&str],
    ) -> GroupResult {
        let executor: Arc<dyn Executor> = fake.clone();
        let deployer = Deployer::with_executor(config.clone(), DeployOptions::default(), executor);
        deployer
            .run_group(
                run_of(group, repos),
                &Shutdown::new(),
                &Observers::default(),
            )
            .await
    }

    fn statuses(result: &GroupResult) -> Vec<UnitStatus> {
        result.units.iter().map(|u| u.status).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn sequential_runs_units_one_after_another_in_order() {
        let config = config("execution_strategy: sequential", &["a", "b", "c"], "", "");
        let fake = Arc::new(Fake::default());
        let result = run(&config, &fake, "g", &["a", "b", "c"]).await;
        assert_eq!(statuses(&result), [UnitStatus::Succeeded; 3]);
        assert_eq!(
            fake.starts(),
            [("a".into(), 0), ("b".into(), 10), ("c".into(), 20)]
        );
        assert_eq!(fake.peak.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn parallel_never_runs_more_than_max_parallel() {
        let names = ["a", "b", "c", "d", "e"];
        let config = config("max_parallel: 2", &names, "", "");
        let fake = Arc::new(Fake::default());
        let result = run(&config, &fake, "g", &names).await;
        assert_eq!(statuses(&result), [UnitStatus::Succeeded; 5]);
        assert_eq!(fake.peak.load(Ordering::SeqCst), 2);
        let times: Vec<u64> = fake.starts().into_iter().map(|(_, t)| t).collect();
        assert_eq!(
            times,
            [0, 0, 10, 10, 20],
            "in configuration order, two at a time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_continue_on_error_the_rest_is_skipped_with_the_reason() {
        let config = config("execution_strategy: sequential", &["a", "b", "c"], "", "");
        let fake = Arc::new(Fake::default().script("a", &[(1, UnitStatus::Failed)]));
        let result = run(&config, &fake, "g", &["a", "b", "c"]).await;
        assert_eq!(
            statuses(&result),
            [UnitStatus::Failed, UnitStatus::Skipped, UnitStatus::Skipped]
        );
        assert_eq!(
            result.units[1].reason.as_deref(),
            Some("skipped: a@main failed")
        );
        assert!(
            !result.units[1].status.is_handled(),
            "a skipped change stays pending"
        );
        assert_eq!(fake.starts().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn with_continue_on_error_every_unit_runs() {
        let group = "execution_strategy: sequential, continue_on_error: true";
        let config = config(group, &["a", "b", "c"], "", "");
        let fake = Arc::new(Fake::default().script("b", &[(1, UnitStatus::Failed)]));
        let result = run(&config, &fake, "g", &["a", "b", "c"]).await;
        assert_eq!(
            statuses(&result),
            [
                UnitStatus::Succeeded,
                UnitStatus::Failed,
                UnitStatus::Succeeded
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn global_timeout_times_out_the_running_unit_and_skips_the_rest() {
        let group = "execution_strategy: sequential, global_timeout: 15s";
        let config = config(group, &["a", "b", "c"], "", "");
        let fake = Arc::new(Fake::default());
        let started = Instant::now();
        let result = run(&config, &fake, "g", &["a", "b", "c"]).await;
        assert_eq!(
            statuses(&result),
            [
                UnitStatus::Succeeded,
                UnitStatus::TimedOut,
                UnitStatus::Skipped
            ]
        );
        assert!(
            result.units[2]
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("global_timeout")
        );
        assert_eq!(started.elapsed().as_secs(), 15);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_units_are_retried_with_doubling_backoff() {
        let config = config("", &["a"], "", ", retries: 2");
        let fail = (1, UnitStatus::Failed);
        let fake = Arc::new(Fake::default().script("a", &[fail, fail, (1, UnitStatus::Succeeded)]));
        let result = run(&config, &fake, "g", &["a"]).await;
        assert_eq!(statuses(&result), [UnitStatus::Succeeded]);
        assert_eq!(result.units[0].attempts, 3);
        // 1 s attempt, 1 s backoff, 1 s attempt, 2 s backoff, 1 s attempt.
        let times: Vec<u64> = fake.starts().into_iter().map(|(_, t)| t).collect();
        assert_eq!(times, [0, 2, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn setup_failures_are_not_retried_within_the_run() {
        let config = config("", &["a"], "", ", retries: 3");
        let fake = Arc::new(Fake::default().script("a", &[(1, UnitStatus::SetupFailed)]));
        let result = run(&config, &fake, "g", &["a"]).await;
        assert_eq!(statuses(&result), [UnitStatus::SetupFailed]);
        assert_eq!(
            result.units[0].attempts, 1,
            "the scheduler retries it with backoff"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn max_concurrent_units_bounds_units_across_groups() {
        let config = config("", &["a", "b", "h1", "h2"], "max_concurrent_units: 3\n", "");
        let fake = Arc::new(Fake::default());
        let executor: Arc<dyn Executor> = fake.clone();
        let deployer = Deployer::with_executor(config, DeployOptions::default(), executor);
        let shutdown = Shutdown::new();
        let observers = Observers::default();
        let (g, h) = tokio::join!(
            deployer.run_group(run_of("g", &["a", "b"]), &shutdown, &observers),
            deployer.run_group(run_of("h", &["h1", "h2"]), &shutdown, &observers),
        );
        assert!(g.succeeded() && h.succeeded());
        assert_eq!(fake.peak.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_cancels_units_not_yet_started() {
        let config = config("execution_strategy: sequential", &["a", "b"], "", "");
        let fake = Arc::new(Fake::default());
        let executor: Arc<dyn Executor> = fake.clone();
        let deployer = Deployer::with_executor(config, DeployOptions::default(), executor);
        let shutdown = Shutdown::new();
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stopper.request();
        });
        let result = deployer
            .run_group(run_of("g", &["a", "b"]), &shutdown, &Observers::default())
            .await;
        assert_eq!(
            statuses(&result),
            [UnitStatus::Cancelled, UnitStatus::Cancelled]
        );
        assert_eq!(fake.starts().len(), 1);
    }

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
