//! The poll loop: ask the forges for every watched branch, compare with what is known,
//! and hand the changes, grouped by the repositories' groups, to the scheduler.
//!
//! [`Monitor::poll_once`] is one cycle; [`run`] is the thin loop around it (interval with
//! jitter, immediate checks asked for by webhooks, shutdown). The monitor never advances
//! a stored SHA for a change: only a deployment's end does (see [`scheduler`]). It does
//! record baselines (first sight) and drop vanished pattern branches.

pub mod detect;
pub(crate) mod pacing;
pub mod scheduler;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::{FutureExt, StreamExt, stream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Repository};
use crate::deploy::{Trigger, Unit, by_group, expand_scope};
use crate::forge::{Forges, Observation, Sha, Watcher};
use crate::shutdown::Shutdown;
use crate::telemetry::metrics::Metrics;

use detect::{Change, Detection, detect};
use scheduler::Scheduler;
use state::{
    BranchState, FileBackend, StateBackend, StateError, StateStore, WriterLock, now_rfc3339,
};

/// How many repositories are observed at once (the forges bound requests per host too).
const OBSERVE_CONCURRENCY: usize = 64;

/// The least time between two saves of the ETag validators by the poll loop.
const VALIDATORS_SAVE_SPACING: Duration = Duration::from_secs(60);

/// Which repositories a cycle checks.
#[derive(Debug, Clone)]
pub enum Scope {
    /// Every repository not backing off after an error.
    All,
    /// These, now, backoff or not (a webhook said they moved).
    Repositories(Vec<String>),
}

/// What one cycle saw, for its log line and for `watch --once`.
#[derive(Debug, Clone, Default)]
pub struct CycleReport {
    pub branches_checked: usize,
    pub changes: usize,
    /// Branches or listings that could not be checked.
    pub errors: usize,
    /// Repositories skipped because they are backing off after errors.
    pub backing_off: usize,
    pub duration: Duration,
    pub requests: u64,
    pub not_modified: u64,
    /// The lowest remaining API quota across hosts, when a forge reported one.
    pub rate_limit_remaining: Option<u64>,
    /// Repositories left out because their webhooks arrive and they were polled less
    /// than `webhook_poll_interval` ago.
    pub webhook_covered: usize,
}

/// Liveness and readiness facts the HTTP server reports.
#[derive(Debug, Default)]
pub struct Health {
    /// Unix seconds of the last completed cycle; 0 before the first.
    last_cycle_end: AtomicU64,
    ready: AtomicBool,
    /// The effective interval of the current sweep in milliseconds; 0 before the first.
    effective_interval_ms: AtomicU64,
}

impl Health {
    pub fn last_cycle_end(&self) -> Option<SystemTime> {
        match self.last_cycle_end.load(Ordering::Relaxed) {
            0 => None,
            secs => Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)),
        }
    }

    /// The time between two sweeps: `polling_interval`, or longer when a request budget
    /// cannot cover a sweep in it; `None` before the first sweep was planned.
    pub fn effective_interval(&self) -> Option<Duration> {
        match self.effective_interval_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    pub fn set_effective_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.effective_interval_ms.store(ms, Ordering::Relaxed);
    }

    /// Ready once the first cycle has completed, until shutdown begins.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Records that a cycle completed at `at`.
    pub fn cycle_completed_at(&self, at: SystemTime) {
        let secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1);
        self.last_cycle_end.store(secs.max(1), Ordering::Relaxed);
    }
}

/// Per-repository backoff across cycles after errors that retrying will not fix soon.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    delay: Duration,
}

pub struct Monitor {
    config: Arc<Config>,
    forges: Forges,
    /// One prepared forge client per repository, in `config.repositories` order.
    watchers: Vec<Watcher>,
    /// Per repository: asked through batched GitHub GraphQL queries (`github_lookup`);
    /// cleared under `auto` when its API host turns out to have no GraphQL API.
    batched: Vec<AtomicBool>,
    state: Arc<StateStore>,
    scheduler: Scheduler,
    backoff: Mutex<HashMap<String, Backoff>>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// The ETag cache generation last persisted (`u64::MAX`: never, save at the first cycle).
    validators_saved: AtomicU64,
    /// Pacing: when each repository was last polled, when a webhook for it last arrived,
    /// and the sweep plan's over-budget hosts as last logged.
    cadence: Mutex<Cadence>,
    /// Held from detection to submission, so that a webhook's check and a paced sweep
    /// (which run side by side) detect one at a time; per repository, when the poll whose
    /// observation was applied last started — an older observation is stale and dropped.
    applied: tokio::sync::Mutex<HashMap<String, Instant>>,
}

#[derive(Debug, Default)]
struct Cadence {
    last_polled: HashMap<String, Instant>,
    webhook_seen: HashMap<String, Instant>,
    over_budget: Vec<pacing::OverBudget>,
    effective_interval: Option<Duration>,
    validators_saved_at: Option<Instant>,
}

impl Monitor {
    pub fn new(
        config: Arc<Config>,
        forges: Forges,
        state: Arc<StateStore>,
        scheduler: Scheduler,
        metrics: Arc<Metrics>,
    ) -> Monitor {
        let watchers: Vec<Watcher> = config
            .repositories
            .iter()
            .map(|r| forges.watcher(r))
            .collect();
        let batched: Vec<AtomicBool> = forges
            .batched(&config, &watchers)
            .into_iter()
            .map(AtomicBool::new)
            .collect();
        let count = batched.iter().filter(|b| b.load(Ordering::Relaxed)).count();
        if count > 0 {
            tracing::info!(
                "GitHub heads of {count} repositories are asked through batched GraphQL queries (github_lookup: {:?})",
                config.github_lookup
            );
        }
        let mut validators_saved = forges.validators_generation();
        if let Some(validators) = state.take_validators() {
            let count = validators.entries.len();
            let dropped = forges.import_validators(validators, &config);
            tracing::debug!(
                "loaded {} saved ETag validators ({dropped} dropped: no longer configured)",
                count - dropped
            );
            if dropped > 0 {
                validators_saved = u64::MAX;
            } else {
                validators_saved = forges.validators_generation();
            }
        }
        Monitor {
            config,
            forges,
            watchers,
            batched,
            state,
            scheduler,
            backoff: Mutex::new(HashMap::new()),
            health: Arc::new(Health::default()),
            metrics,
            validators_saved: AtomicU64::new(validators_saved),
            cadence: Mutex::default(),
            applied: tokio::sync::Mutex::default(),
        }
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Reports to `health` instead of its own: a replica's server is up, and reporting,
    /// before it leads and builds its monitor.
    pub fn with_health(mut self, health: Arc<Health>) -> Monitor {
        self.health = health;
        self
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn state(&self) -> &Arc<StateStore> {
        &self.state
    }

    pub fn forges(&self) -> &Forges {
        &self.forges
    }

    /// Repositories backing off after errors, with the time left until their next check.
    pub fn backoffs(&self) -> HashMap<String, Duration> {
        let now = Instant::now();
        let backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        backoff
            .iter()
            .filter(|(_, b)| b.until > now)
            .map(|(name, b)| (name.clone(), b.until - now))
            .collect()
    }

    /// One cycle: observe, detect, record baselines, submit changes to the scheduler. The
    /// checks start at once (`watch --once`, webhook hints).
    pub async fn poll_once(
        &self,
        scope: Scope,
        trigger: Trigger,
        cancel: &CancellationToken,
    ) -> CycleReport {
        self.poll(scope, trigger, cancel, false).await
    }

    /// One sweep of the poll loop: the repositories that are due, their checks spread
    /// across the interval (see [`pacing`]). Returns the report and the effective interval
    /// until the next sweep.
    pub async fn poll_paced(&self, cancel: &CancellationToken) -> (CycleReport, Duration) {
        let report = self.poll(Scope::All, Trigger::Poll, cancel, true).await;
        let interval = self
            .cadence()
            .effective_interval
            .unwrap_or(self.config.polling_interval);
        (report, interval)
    }

    /// Notes that verified webhooks named `repos`: from now on they are polled every
    /// `webhook_poll_interval` only.
    pub fn webhook_seen(&self, repos: &[String]) {
        let now = Instant::now();
        let mut cadence = self.cadence();
        for repo in repos {
            cadence.webhook_seen.insert(repo.clone(), now);
        }
    }

    fn cadence(&self) -> std::sync::MutexGuard<'_, Cadence> {
        self.cadence.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn poll(
        &self,
        scope: Scope,
        trigger: Trigger,
        cancel: &CancellationToken,
        paced: bool,
    ) -> CycleReport {
        let started = Instant::now();
        let stats_before = self.forges.stats();
        let (repos, backing_off, webhook_covered) = self.select(&scope);
        let offsets = paced.then(|| self.pace(&repos));
        let observations = self.observe_all(&repos, offsets, cancel).await;
        {
            let now = Instant::now();
            let mut cadence = self.cadence();
            for (index, _) in &observations {
                let name = &self.config.repositories[*index].name;
                cadence.last_polled.insert(name.clone(), now);
            }
        }

        let mut report = CycleReport {
            backing_off,
            webhook_covered,
            ..CycleReport::default()
        };
        let mut changes: Vec<Change> = Vec::new();
        let mut current: HashMap<&str, BTreeMap<String, Sha>> = HashMap::new();
        let mut state_changed = false;
        let mut applied = self.applied.lock().await;
        for (index, observation) in observations {
            let repo = &self.config.repositories[index];
            // A webhook's check that started after this poll has already been applied: this
            // observation may be older than the head it saw, and must not undo it.
            if applied.get(&repo.name).is_some_and(|at| *at > started) {
                tracing::debug!(repository = %repo.name, "a newer check was applied meanwhile; dropping this one");
                continue;
            }
            applied.insert(repo.name.clone(), started);
            report.branches_checked += observation.heads.len();
            report.errors += observation.failures.len();
            self.note_failures(repo, &observation);
            // In flight first, stored state second: a unit that ends in between has already
            // advanced the stored SHA (see the scheduler's unit hook).
            let in_flight: HashMap<&str, Sha> = observation
                .heads
                .keys()
                .filter_map(|b| Some((b.as_str(), self.scheduler.in_flight(&repo.name, b)?)))
                .collect();
            let detection = self.state.with(|s| {
                detect(repo, &observation, s.repositories.get(&repo.name), |b| {
                    in_flight.get(b).cloned()
                })
            });
            state_changed |= self.record(repo, &detection);
            for c in &detection.changes {
                let old = c.previous.as_ref().map_or("(new branch)", Sha::short);
                tracing::info!(repository = %c.repository, branch = %c.branch, "change: {} {} {old} → {}", c.repository, c.branch, c.sha.short());
            }
            for c in &detection.changes {
                self.metrics.branch_change(&c.repository);
            }
            changes.extend(detection.changes);
            current.insert(&repo.name, observation.heads);
        }
        report.changes = changes.len();
        if state_changed {
            self.save_state().await;
        }
        self.save_validators(paced).await;
        self.submit(changes, &current, trigger);
        drop(applied);

        let stats = self.forges.stats();
        report.requests = stats.requests.saturating_sub(stats_before.requests);
        report.not_modified = stats.not_modified.saturating_sub(stats_before.not_modified);
        report.rate_limit_remaining = stats.rate_limits.values().filter_map(|r| r.remaining).min();
        report.duration = started.elapsed();
        self.health.cycle_completed_at(SystemTime::now());
        self.metrics.cycle(report.duration, report.errors);
        log_cycle(&report);
        report
    }

    /// Indices of the repositories to observe, how many were skipped for backoff, and how
    /// many because webhooks cover them and they are not due yet.
    fn select(&self, scope: &Scope) -> (Vec<usize>, usize, usize) {
        let now = Instant::now();
        let backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let cadence = self.cadence();
        let mut skipped = 0;
        let mut covered = 0;
        let repos = self
            .config
            .repositories
            .iter()
            .enumerate()
            .filter(|(_, repo)| match scope {
                Scope::Repositories(names) => names.contains(&repo.name),
                Scope::All => {
                    let waiting = backoff.get(&repo.name).is_some_and(|b| b.until > now);
                    skipped += usize::from(waiting);
                    let due = pacing::due(
                        now,
                        cadence.webhook_seen.get(&repo.name).copied(),
                        cadence.last_polled.get(&repo.name).copied(),
                        self.config.webhook_poll_interval,
                    );
                    covered += usize::from(!waiting && !due);
                    !waiting && due
                }
            })
            .map(|(i, _)| i)
            .collect();
        (repos, skipped, covered)
    }

    /// Plans the sweep of `repos` (indices): their start offsets. Logs when the budget of a
    /// host cannot cover a sweep in one interval (once, and again when that changes), and
    /// reports the effective interval.
    fn pace(&self, repos: &[usize]) -> Vec<Duration> {
        let mut demands: Vec<pacing::Demand> = repos
            .iter()
            .map(|&i| {
                let repo = &self.config.repositories[i];
                let exact = repo.monitor.exact_branches().count();
                let listing = usize::from(repo.monitor.patterns().next().is_some());
                pacing::Demand {
                    // Batched through GraphQL: no REST request (scale-graphql).
                    host: if self.batched[i].load(Ordering::Relaxed) {
                        None
                    } else {
                        Forges::budget_host(repo)
                    },
                    requests: (exact + listing) as u64,
                    branches: exact + listing,
                }
            })
            .collect();
        // A listing costs one request per page: as many as the last one had.
        for (demand, &i) in demands.iter_mut().zip(repos) {
            demand.requests = self.watchers[i].expected_requests();
        }
        let plan = pacing::plan(&demands, self.config.polling_interval, |host| {
            self.forges.budget_limits(host)
        });
        self.metrics
            .sweep_effective_interval(plan.effective_interval);
        self.health.set_effective_interval(plan.effective_interval);
        let mut cadence = self.cadence();
        if cadence.over_budget != plan.over_budget {
            for o in &plan.over_budget {
                tracing::warn!(
                    host = %o.host,
                    branches = o.branches,
                    points = o.points,
                    effective_interval_s = o.sweep_time.as_secs(),
                    "the request budget of {} cannot cover a sweep of {} branches ({} points) every {}: sweeping every {} instead (raise rate_limits.\"{}\" only if the forge allows more, \
                     or use webhooks and webhook_poll_interval)",
                    o.host,
                    o.branches,
                    o.points,
                    humantime::format_duration(self.config.polling_interval),
                    humantime::format_duration(Duration::from_secs(o.sweep_time.as_secs())),
                    o.host
                );
            }
            if plan.over_budget.is_empty() && !cadence.over_budget.is_empty() {
                tracing::info!(
                    "the request budgets cover a sweep every {} again",
                    humantime::format_duration(self.config.polling_interval)
                );
            }
            cadence.over_budget = plan.over_budget.clone();
        }
        // The first sweep after a start is not spread: the baseline (and readiness) should
        // not wait most of an interval — with `polling_interval: 1h`, 54 minutes. The
        // request budget still paces its requests.
        let first = cadence.effective_interval.is_none();
        cadence.effective_interval = Some(plan.effective_interval);
        if first {
            return vec![Duration::ZERO; plan.offsets.len()];
        }
        plan.offsets
    }

    /// Observes `repos` (indices), at most [`OBSERVE_CONCURRENCY`] at once, all within the
    /// calling task: every check waits on the network, so a task per repository would only
    /// add wake-ups. A repository whose check panics is logged and left out.
    ///
    /// With `offsets` (pacing), repository `repos[i]` starts `offsets[i]` after now; the
    /// checks are queued in the order they start. Repositories batched through GraphQL are
    /// asked at once, in as few queries as the batch limits allow (the GraphQL budget paces
    /// those queries).
    async fn observe_all(
        &self,
        repos: &[usize],
        offsets: Option<Vec<Duration>>,
        cancel: &CancellationToken,
    ) -> Vec<(usize, Observation)> {
        let offsets = offsets.unwrap_or_else(|| vec![Duration::ZERO; repos.len()]);
        let (mut batched, mut single) = (Vec::new(), Vec::new());
        for (&index, offset) in repos.iter().zip(offsets) {
            if self.batched[index].load(Ordering::Relaxed) {
                batched.push(index);
            } else {
                single.push((offset, index));
            }
        }
        let (mut answers, batch) = tokio::join!(
            self.observe_each(single, cancel),
            self.observe_batch(batched, cancel)
        );
        answers.extend(batch);
        let mut results = Vec::with_capacity(answers.len());
        for (index, answer) in answers {
            match answer {
                Some(observation) => results.push((index, observation)),
                None => tracing::error!(
                    "observing {} failed unexpectedly (a bug: please report it)",
                    self.config.repositories[index].name
                ),
            }
        }
        results.sort_by_key(|(i, _)| *i);
        results
    }

    /// Observes each of `repos` on its own, at most [`OBSERVE_CONCURRENCY`] at once, each
    /// starting at its offset (pacing) after now, queued in the order they start; `None` for
    /// a check that panicked.
    async fn observe_each(
        &self,
        repos: Vec<(Duration, usize)>,
        cancel: &CancellationToken,
    ) -> Vec<(usize, Option<Observation>)> {
        let start = tokio::time::Instant::now();
        let mut order = repos;
        order.sort_by_key(|(offset, _)| *offset);
        let checks = order.into_iter().map(|(offset, index)| {
            AssertUnwindSafe(async move {
                if !offset.is_zero() {
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        () = tokio::time::sleep_until(start + offset) => {}
                    }
                }
                self.watchers[index].observe(cancel).await
            })
            .catch_unwind()
            .map(move |result| (index, result.ok()))
        });
        stream::iter(checks)
            .buffer_unordered(OBSERVE_CONCURRENCY)
            .collect()
            .await
    }

    /// Observes `repos` through batched GraphQL queries; `None` for each if that panicked.
    async fn observe_batch(
        &self,
        repos: Vec<usize>,
        cancel: &CancellationToken,
    ) -> Vec<(usize, Option<Observation>)> {
        if repos.is_empty() {
            return Vec::new();
        }
        let watchers: Vec<Watcher> = repos.iter().map(|&i| self.watchers[i].clone()).collect();
        let fallback = self.config.github_lookup == crate::config::GithubLookup::Auto;
        let answer = AssertUnwindSafe(self.forges.observe_batched(&watchers, fallback, cancel))
            .catch_unwind()
            .await;
        match answer {
            Ok(observations) => repos
                .into_iter()
                .zip(observations)
                .map(|(index, (observation, rest_from_now))| {
                    if rest_from_now {
                        self.batched[index].store(false, Ordering::Relaxed);
                    }
                    (index, Some(observation))
                })
                .collect(),
            Err(_) => repos.into_iter().map(|i| (i, None)).collect(),
        }
    }

    fn note_failures(&self, repo: &Repository, observation: &Observation) {
        for failure in &observation.failures {
            self.metrics.forge_error(&repo.name, failure.error.kind());
            let what = failure.branch.as_deref().unwrap_or("(branch listing)");
            tracing::warn!(repository = %repo.name, branch = what, kind = failure.error.kind(), "cannot check {} {what}: {}", repo.name, failure.error);
        }
        let mut backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        if observation
            .failures
            .iter()
            .any(|f| f.error.backs_off_repository())
        {
            let interval = self.config.polling_interval;
            let delay = backoff
                .get(&repo.name)
                .map_or(interval * 2, |b| (b.delay * 2).min(interval * 10));
            backoff.insert(
                repo.name.clone(),
                Backoff {
                    until: Instant::now() + delay,
                    delay,
                },
            );
            tracing::warn!(repository = %repo.name, "backing off {}: next check in {}", repo.name, humantime::format_duration(delay));
        } else if observation.failures.is_empty() && backoff.remove(&repo.name).is_some() {
            tracing::info!(repository = %repo.name, "{} recovered", repo.name);
        }
    }

    /// Applies baselines, vanished branches and pattern baselines; true if state changed.
    fn record(&self, repo: &Repository, detection: &Detection) -> bool {
        if detection.baselines.is_empty()
            && detection.gone.is_empty()
            && detection.patterns_baselined.is_empty()
        {
            return false;
        }
        for (branch, sha) in &detection.baselines {
            tracing::info!(repository = %repo.name, branch = %branch, "baseline: {} {branch} at {}", repo.name, sha.short());
        }
        for branch in &detection.gone {
            tracing::info!(repository = %repo.name, branch = %branch, "branch {branch} of {} is gone; dropped from state", repo.name);
        }
        self.state.with(|state| {
            let entry = state.repositories.entry(repo.name.clone()).or_default();
            for (branch, sha) in &detection.baselines {
                entry.branches.insert(
                    branch.clone(),
                    BranchState {
                        sha: sha.clone(),
                        seen_at: now_rfc3339(),
                        last_deploy: None,
                    },
                );
            }
            for branch in &detection.gone {
                entry.branches.remove(branch);
                entry.pending.remove(branch);
            }
            entry
                .baselined_patterns
                .extend(detection.patterns_baselined.iter().cloned());
        });
        true
    }

    /// Groups the changes and, for `deploy_scope: all`, adds every other repository of
    /// the group at its current head (this cycle's answer, else the stored SHA).
    fn submit(
        &self,
        changes: Vec<Change>,
        current: &HashMap<&str, BTreeMap<String, Sha>>,
        trigger: Trigger,
    ) {
        let units = changes
            .into_iter()
            .map(|change| Unit {
                repository: change.repository,
                branch: change.branch,
                previous_sha: change.previous,
                sha: change.sha,
            })
            .collect();
        for (group, units) in by_group(&self.config, units) {
            let heads = self.current_heads(&group.name, current);
            let units = expand_scope(&self.config, group, units, &heads);
            self.scheduler.submit(&group.name, units, trigger.clone());
        }
    }

    /// Heads of the group's exact branches: observed this cycle, else stored.
    fn current_heads(
        &self,
        group: &str,
        current: &HashMap<&str, BTreeMap<String, Sha>>,
    ) -> BTreeMap<(String, String), Sha> {
        let mut heads = BTreeMap::new();
        for repo in self.config.repositories_in(group) {
            for branch in repo.monitor.exact_branches() {
                let observed = current
                    .get(repo.name.as_str())
                    .and_then(|h| h.get(branch))
                    .cloned();
                if let Some(sha) =
                    observed.or_else(|| self.state.branch(&repo.name, branch).map(|b| b.sha))
                {
                    heads.insert((repo.name.clone(), branch.to_owned()), sha);
                }
            }
        }
        heads
    }

    /// Persists the ETag validators when they changed since the last save, off the async
    /// threads; a failure is logged (they are a cache: the next save tries again).
    ///
    /// In the poll loop (`spaced`) they are written at most every
    /// [`VALIDATORS_SAVE_SPACING`]: at 10,000 branches they are a few MiB, and what a crash
    /// loses is only a few full answers after the restart.
    async fn save_validators(&self, spaced: bool) {
        if self.forges.validators_generation() == self.validators_saved.load(Ordering::Relaxed)
            || self.state.fenced().is_cancelled()
        {
            return;
        }
        {
            let mut cadence = self.cadence();
            let now = Instant::now();
            if spaced
                && cadence
                    .validators_saved_at
                    .is_some_and(|at| now.duration_since(at) < VALIDATORS_SAVE_SPACING)
            {
                return;
            }
            cadence.validators_saved_at = Some(now);
        }
        let (generation, validators) = self.forges.export_validators();
        let state = self.state.clone();
        match tokio::task::spawn_blocking(move || state.save_validators(&validators)).await {
            Ok(Ok(())) => self.validators_saved.store(generation, Ordering::Relaxed),
            Ok(Err(e)) => tracing::warn!("cannot save the ETag validators: {e}"),
            Err(e) => tracing::warn!("the ETag validators save task failed: {e}"),
        }
    }

    /// Persists the ETag validators if they changed, however recently they were saved (at
    /// the end of `watch`).
    pub async fn save_validators_now(&self) {
        self.save_validators(false).await;
    }

    /// Writes the state file; logs and returns false when it could not be written.
    pub async fn save_state(&self) -> bool {
        self.state.save_async().await
    }
}

/// Opens the state for `watch`, its one writer: takes the writer lock first (so that a
/// second `watch` fails before it reads anything), loads, and drops what the
/// configuration no longer watches. The lock is held until the returned guard is dropped.
pub fn open_state_for_watch(config: &Config) -> Result<(Arc<StateStore>, WriterLock), StateError> {
    open_state_with(config, Box::new(FileBackend::new(&config.state_file)))
}

/// [`open_state_for_watch`] on any backend. Blocking. A `watch` in a pod that starts with an
/// empty file state is warned loudly: without persistence every restart re-baselines
/// and the moves made meanwhile are never deployed.
pub fn open_state_with(
    config: &Config,
    backend: Box<dyn StateBackend>,
) -> Result<(Arc<StateStore>, WriterLock), StateError> {
    let lock = backend.lock()?;
    let loaded = backend.load()?;
    if loaded.is_none() && config.state == crate::config::StateConfig::File && in_a_pod() {
        tracing::warn!(
            "!!! {} is empty and this watch runs in a Kubernetes pod: unless the file is on a \
             persistent volume, every restart starts from scratch and moves made while Sentry \
             was down are never deployed. Use state.backend: kubernetes (with leader_election) \
             or persistence.enabled in the chart. !!!",
            backend.describe()
        );
    }
    let state = StateStore::with_loaded(backend, loaded);
    state.load_validators();
    let claims = state.take_foreign_claims();
    if !claims.is_empty() {
        tracing::warn!(
            "units interrupted by a replica that stopped mid-unit; they run again (at-least-once): {}",
            claims.join("; ")
        );
    }
    let dropped = state.retain_configured(config);
    if !dropped.is_empty() {
        tracing::info!(
            "dropped from state (no longer configured): {}",
            dropped.join(", ")
        );
        state.save()?;
    }
    Ok((Arc::new(state), lock))
}

fn in_a_pod() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty())
}

fn log_cycle(r: &CycleReport) {
    let remaining = r
        .rate_limit_remaining
        .map_or_else(|| "n/a".to_owned(), |n| n.to_string());
    tracing::info!(
        branches = r.branches_checked,
        changes = r.changes,
        errors = r.errors,
        requests = r.requests,
        not_modified = r.not_modified,
        duration_ms = r.duration.as_millis() as u64,
        "cycle: {} branches checked in {} ms, {} changes, {} errors, {} requests ({} not modified), rate limit remaining {remaining}{}{}",
        r.branches_checked,
        r.duration.as_millis(),
        r.changes,
        r.errors,
        r.requests,
        r.not_modified,
        if r.backing_off > 0 {
            format!(", {} repositories backing off", r.backing_off)
        } else {
            String::new()
        },
        if r.webhook_covered > 0 {
            format!(
                ", {} repositories covered by webhooks not due",
                r.webhook_covered
            )
        } else {
            String::new()
        },
    );
}

/// The interval plus up to 10 % (at most 5 s) of random jitter, so that many Sentries
/// started together do not poll in lockstep.
fn next_delay(interval: Duration) -> Duration {
    let max_jitter = (interval / 10).min(Duration::from_secs(5));
    interval + max_jitter.mul_f64(rand::random::<f64>())
}

/// The watch loop: a sweep every interval, and right away for each webhook hint, until
/// shutdown. A paced sweep spreads over most of the interval, so it runs as a task of its
/// own and hints are served meanwhile (detection is serialized, see [`Monitor::poll`]);
/// sweeps never overlap each other.
pub async fn run(
    monitor: Arc<Monitor>,
    shutdown: Shutdown,
    mut hints: mpsc::Receiver<Vec<String>>,
) {
    let cancel = shutdown.token().clone();
    let mut next = tokio::time::Instant::now();
    let mut sweep: Option<(tokio::time::Instant, tokio::task::JoinHandle<Duration>)> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.requested() => break,
            ended = async {
                match sweep.as_mut() {
                    Some((_, handle)) => handle.await,
                    None => std::future::pending().await,
                }
            } => {
                // The next sweep is due an (effective) interval after this one started,
                // never before this one ended.
                let started = sweep.take().map_or_else(tokio::time::Instant::now, |(at, _)| at);
                let interval = ended.unwrap_or(monitor.config.polling_interval);
                monitor.health.set_ready(!shutdown.is_requested());
                next = (started + next_delay(interval)).max(tokio::time::Instant::now());
            }
            // Before hints: a due poll is never starved by a stream of webhooks.
            _ = tokio::time::sleep_until(next), if sweep.is_none() => {
                let (monitor, cancel) = (monitor.clone(), cancel.clone());
                let handle = tokio::spawn(async move { monitor.poll_paced(&cancel).await.1 });
                sweep = Some((tokio::time::Instant::now(), handle));
            }
            Some(mut repos) = hints.recv() => {
                // The hints queued meanwhile become one check.
                while let Ok(more) = hints.try_recv() {
                    repos.extend(more);
                }
                repos.sort();
                repos.dedup();
                monitor.webhook_seen(&repos);
                monitor.poll_once(Scope::Repositories(repos), Trigger::Webhook, &cancel).await;
            }
        }
    }
    // The sweep sees the cancellation and ends at its next step.
    if let Some((_, handle)) = sweep {
        let _ = handle.await;
    }
    monitor.health.set_ready(false);
}
