//! Group runs in `watch`: at most one run in progress and one pending per group, and the
//! units that could not run, held until they do.
//!
//! Changes that arrive while a group runs merge into its pending run, the newest SHA per
//! branch winning; when the run ends, the pending one starts. Different groups run
//! concurrently.
//!
//! A unit's life: a change is *handled* — its stored SHA advances — only when its commands
//! ran to an outcome ([`crate::deploy::UnitStatus::is_handled`]). A unit that could not run
//! (setup failed: clone, checkout directory, changes file) or was skipped (an earlier unit
//! failed, `global_timeout` passed) is *deferred*: it stays in flight for the monitor, is
//! recorded as pending in the state with its reason, joins the next run of its group, and
//! a timer starts such a run after a jittered backoff (`pending_retry`: doubling from
//! `initial` to `max` for setup failures, `initial` for skips) even if nothing else moves.
//! A unit cancelled by shutdown stays pending in the state; the next start finds it again.
//!
//! The state and metrics hear of units through [`StateObserver`], one of the run observers.
//! A queued or deferred unit that a newer SHA of its branch replaces before it ran is
//! reported to the observers as superseded (commit statuses mark it so).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::config::{Config, DeployScope, Group, PendingRetry};
use crate::deploy::{
    Admission, Deployer, GroupResult, GroupRun, Observers, RunObserver, RunRef, Trigger, Unit,
    UnitResult, UnitStatus, expand_scope, new_run_id,
};
use crate::forge::Sha;
use crate::shutdown::Shutdown;
use crate::telemetry::metrics::Metrics;

use super::state::{
    BranchState, Claim, DeployRecord, PendingRecord, StateError, StateStore, now_rfc3339,
};

type BranchKey = (String, String);

#[derive(Default)]
struct Slot {
    running: Option<BTreeMap<BranchKey, Sha>>,
    pending: Option<Pending>,
    /// Units that could not run, waiting for the group's next run.
    deferred: BTreeMap<BranchKey, Deferred>,
    /// Setup failures in a row per branch, until one of its units is handled; kept apart
    /// from `deferred`, which empties whenever the group runs.
    setup_failures: BTreeMap<BranchKey, u32>,
    /// When the armed retry timer fires, if one is armed.
    timer: Option<Instant>,
}

struct Pending {
    units: BTreeMap<BranchKey, Unit>,
    trigger: Trigger,
}

struct Deferred {
    unit: Unit,
    not_before: Instant,
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    deployer: Deployer,
    state: Arc<StateStore>,
    shutdown: Shutdown,
    slots: Mutex<HashMap<String, Slot>>,
    tracker: TaskTracker,
    failed_runs: AtomicUsize,
    /// Metrics, audit and any other observers; the state observer is added per run.
    observers: Observers,
    metrics: Arc<Metrics>,
}

impl Scheduler {
    pub fn new(
        config: Arc<Config>,
        deployer: Deployer,
        state: Arc<StateStore>,
        shutdown: Shutdown,
        observers: Observers,
        metrics: Arc<Metrics>,
    ) -> Scheduler {
        deployer.set_admission(Arc::new(ClaimGate {
            state: state.clone(),
        }));
        Scheduler {
            inner: Arc::new(Inner {
                config,
                deployer,
                state,
                shutdown,
                slots: Mutex::new(HashMap::new()),
                tracker: TaskTracker::new(),
                failed_runs: AtomicUsize::new(0),
                observers,
                metrics,
            }),
        }
    }

    /// The newest SHA of a branch that is pending, being deployed, or waiting for a retry.
    pub fn in_flight(&self, repo: &str, branch: &str) -> Option<Sha> {
        let key = (repo.to_owned(), branch.to_owned());
        self.inner.with_slots(|slots| {
            slots.values().find_map(|slot| {
                let pending = slot.pending.as_ref().and_then(|p| p.units.get(&key));
                pending
                    .map(|u| u.sha.clone())
                    .or_else(|| slot.running.as_ref()?.get(&key).cloned())
                    .or_else(|| slot.deferred.get(&key).map(|d| d.unit.sha.clone()))
            })
        })
    }

    /// Starts a run of `units` (plus the group's deferred units) for `group`, or merges
    /// them into its pending run.
    pub fn submit(&self, group: &str, units: Vec<Unit>, trigger: Trigger) {
        if units.is_empty() || self.inner.shutdown.is_requested() {
            return;
        }
        let start = self.inner.with_slots(|slots| {
            let slot = slots.entry(group.to_owned()).or_default();
            if slot.running.is_some() {
                let pending = slot.pending.get_or_insert_with(|| Pending {
                    units: BTreeMap::new(),
                    trigger: trigger.clone(),
                });
                for unit in units {
                    if let Some((old, by)) = merge(&mut pending.units, unit) {
                        // Observers only queue work, so calling them under the lock is quick.
                        self.inner.observers.unit_superseded(group, &old, &by);
                    }
                }
                tracing::info!(
                    group,
                    pending = pending.units.len(),
                    "group is running; changes queued for the next run"
                );
                self.inner.metrics.set_pending(group, true);
                None
            } else {
                let mut merged = BTreeMap::new();
                for unit in units {
                    if let Some((old, by)) = merge(&mut merged, unit) {
                        self.inner.observers.unit_superseded(group, &old, &by);
                    }
                }
                Some((self.inner.start(group, slot, merged), trigger))
            }
        });
        if let Some((units, trigger)) = start {
            self.inner.spawn_run(group, units, trigger);
        }
    }

    /// Waits until every run, pending ones included, has ended. Deferred units whose retry
    /// is not due do not count: `watch --once` does not wait for a backoff.
    pub async fn wait_idle(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        self.inner.tracker.reopen();
    }

    /// How many group runs ended unsuccessfully since start.
    pub fn failed_runs(&self) -> usize {
        self.inner.failed_runs.load(Ordering::Relaxed)
    }

    /// Groups with a run in progress and groups with a pending run.
    pub fn load(&self) -> (Vec<String>, Vec<String>) {
        self.inner.with_slots(|slots| {
            let running = slots
                .iter()
                .filter(|(_, s)| s.running.is_some())
                .map(|(g, _)| g.clone())
                .collect();
            let pending = slots
                .iter()
                .filter(|(_, s)| s.pending.is_some())
                .map(|(g, _)| g.clone())
                .collect();
            (running, pending)
        })
    }
}

/// A unit as the live view shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnitRef {
    pub repository: String,
    pub branch: String,
    pub sha: String,
}

/// One group's units in the scheduler, read at one instant.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupSnapshot {
    /// Units of the run in progress that have not ended yet.
    pub running: Vec<UnitRef>,
    /// Changes merged into the group's next run, and what triggered it.
    pub pending: Vec<UnitRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_trigger: Option<String>,
    /// Units that could not run, each with the seconds until its retry is due.
    pub deferred: Vec<DeferredRef>,
}

/// A unit that could not run, waiting for its retry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeferredRef {
    #[serde(flatten)]
    pub unit: UnitRef,
    pub retry_in_secs: u64,
}

impl Scheduler {
    /// What every group with something in flight holds; a copy taken under the lock,
    /// which is released before it returns (callers may then await freely).
    pub fn snapshot(&self) -> BTreeMap<String, GroupSnapshot> {
        let now = Instant::now();
        let unit_ref = |(repo, branch): &BranchKey, sha: &Sha| UnitRef {
            repository: repo.clone(),
            branch: branch.clone(),
            sha: sha.as_str().to_owned(),
        };
        self.inner.with_slots(|slots| {
            slots
                .iter()
                .map(|(group, slot)| {
                    let snapshot = GroupSnapshot {
                        running: slot
                            .running
                            .iter()
                            .flatten()
                            .map(|(k, s)| unit_ref(k, s))
                            .collect(),
                        pending: slot
                            .pending
                            .iter()
                            .flat_map(|p| p.units.iter())
                            .map(|(k, u)| unit_ref(k, &u.sha))
                            .collect(),
                        pending_trigger: slot
                            .pending
                            .as_ref()
                            .map(|p| p.trigger.as_str().to_owned()),
                        deferred: slot
                            .deferred
                            .iter()
                            .map(|(k, d)| DeferredRef {
                                unit: unit_ref(k, &d.unit.sha),
                                retry_in_secs: d
                                    .not_before
                                    .saturating_duration_since(now)
                                    .as_secs(),
                            })
                            .collect(),
                    };
                    (group.clone(), snapshot)
                })
                .collect()
        })
    }
}

impl Inner {
    fn with_slots<R>(&self, f: impl FnOnce(&mut HashMap<String, Slot>) -> R) -> R {
        let mut guard = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Marks `slot` running with `units` plus every deferred unit of the group (a newer SHA
    /// of the same branch wins); returns the run's units in configuration order.
    fn start(
        &self,
        group: &str,
        slot: &mut Slot,
        mut units: BTreeMap<BranchKey, Unit>,
    ) -> Vec<Unit> {
        for (key, deferred) in std::mem::take(&mut slot.deferred) {
            let newer = units.remove(&key);
            let mut unit = deferred.unit;
            if let Some(newer) = newer {
                if newer.sha != unit.sha {
                    self.observers.unit_superseded(group, &unit, &newer.sha);
                }
                unit.sha = newer.sha;
            }
            units.insert(key, unit);
        }
        self.metrics.set_pending_units(group, 0);
        let units = self.in_config_order(group, units.into_values().collect());
        slot.running = Some(running_set(&units));
        units
    }

    fn spawn_run(self: &Arc<Self>, group: &str, units: Vec<Unit>, trigger: Trigger) {
        let inner = self.clone();
        let group = group.to_owned();
        self.tracker
            .spawn(async move { inner.run_until_idle(group, units, trigger).await });
    }

    async fn run_until_idle(
        self: Arc<Self>,
        group: String,
        mut units: Vec<Unit>,
        mut trigger: Trigger,
    ) {
        loop {
            let run = GroupRun {
                group: group.clone(),
                units,
                trigger,
                run_id: new_run_id(),
            };
            let observers = self.observers.with(Arc::new(StateObserver {
                inner: self.clone(),
            }));
            let result = self
                .deployer
                .run_group(run, &self.shutdown, &observers)
                .await;
            if !result.succeeded() {
                self.failed_runs.fetch_add(1, Ordering::Relaxed);
            }
            let next = self.with_slots(|slots| {
                let slot = slots.entry(group.clone()).or_default();
                match slot.pending.take() {
                    Some(p) if !self.shutdown.is_requested() => {
                        Some((self.start(&group, slot, p.units), p.trigger))
                    }
                    _ => {
                        slot.running = None;
                        None
                    }
                }
            });
            self.metrics.set_pending(&group, false);
            self.state.save_async().await;
            match next {
                Some((u, t)) => (units, trigger) = (u, t),
                None => {
                    self.arm_retry(&group);
                    return;
                }
            }
        }
    }

    /// Arms the group's retry timer for its earliest deferred unit, unless an earlier
    /// timer is armed already or nothing is deferred.
    fn arm_retry(self: &Arc<Self>, group: &str) {
        if self.shutdown.is_requested() {
            return;
        }
        let at = self.with_slots(|slots| {
            let slot = slots.get_mut(group)?;
            let due = slot.deferred.values().map(|d| d.not_before).min()?;
            if slot.timer.is_some_and(|t| t <= due) {
                return None;
            }
            slot.timer = Some(due);
            Some(due)
        });
        let Some(at) = at else { return };
        let inner = self.clone();
        let group = group.to_owned();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => inner.retry_due(&group, at),
                _ = inner.shutdown.requested() => {}
            }
        });
    }

    /// The retry timer armed for `at` fired: start a run of the deferred units if the
    /// group is idle (a running group takes them into its next run, or re-arms).
    fn retry_due(self: &Arc<Self>, group: &str, at: Instant) {
        if self.shutdown.is_requested() {
            return;
        }
        enum Next {
            Nothing,
            /// The units were re-deferred later than this timer (an earlier run took them
            /// and failed again): wait for their own backoff.
            Rearm,
            Start(Vec<Unit>),
        }
        let next = self.with_slots(|slots| {
            let Some(slot) = slots.get_mut(group) else {
                return Next::Nothing;
            };
            if slot.timer != Some(at) {
                return Next::Nothing; // superseded by an earlier timer
            }
            slot.timer = None;
            if slot.running.is_some() {
                return Next::Nothing; // the run's end re-arms
            }
            match slot.deferred.values().map(|d| d.not_before).min() {
                None => Next::Nothing,
                Some(due) if due > Instant::now() => Next::Rearm,
                Some(_) => Next::Start(self.start(group, slot, BTreeMap::new())),
            }
        });
        let start = match next {
            Next::Nothing => None,
            Next::Rearm => {
                self.arm_retry(group);
                None
            }
            Next::Start(units) => Some(units),
        };
        if let Some(units) = start {
            tracing::info!(
                group,
                units = units.len(),
                "retrying units that could not run"
            );
            self.spawn_run(group, units, Trigger::Retry);
        }
    }

    /// Units in the order of `repositories:` (scope expansion already happened).
    fn in_config_order(&self, group: &str, units: Vec<Unit>) -> Vec<Unit> {
        match self.config.group(group) {
            Some(g) => {
                let changed_only = Group {
                    deploy_scope: DeployScope::Changed,
                    ..g.clone()
                };
                expand_scope(&self.config, &changed_only, units, &BTreeMap::new())
            }
            None => units,
        }
    }

    /// A handled unit: its SHA becomes the stored one, with the deployment's record.
    fn handled(&self, run: RunRef<'_>, result: &UnitResult) {
        let unit = &result.unit;
        let key = (unit.repository.clone(), unit.branch.clone());
        self.with_slots(|slots| {
            if let Some(slot) = slots.get_mut(run.group) {
                slot.setup_failures.remove(&key);
            }
        });
        self.state.with(|state| {
            let repo = state
                .repositories
                .entry(unit.repository.clone())
                .or_default();
            let now = now_rfc3339();
            repo.branches.insert(
                unit.branch.clone(),
                BranchState {
                    sha: unit.sha.clone(),
                    seen_at: now.clone(),
                    last_deploy: Some(DeployRecord {
                        sha: unit.sha.clone(),
                        result: result.status.as_str().to_owned(),
                        at: now,
                        run_id: run.run_id.to_owned(),
                    }),
                },
            );
            repo.pending.remove(&unit.branch);
        });
    }

    /// A unit that did not run to an outcome: held for a retry (unless shutting down) and
    /// recorded as pending.
    fn not_handled(&self, run: RunRef<'_>, result: &UnitResult) {
        let unit = &result.unit;
        let reason = result
            .reason
            .clone()
            .unwrap_or_else(|| result.status.as_str().to_owned());
        let key = (unit.repository.clone(), unit.branch.clone());
        let retry =
            (result.status != UnitStatus::Cancelled && !self.shutdown.is_requested()).then(|| {
                self.with_slots(|slots| {
                    let slot = slots.entry(run.group.to_owned()).or_default();
                    let tries = slot.setup_failures.entry(key.clone()).or_default();
                    *tries += u32::from(result.status == UnitStatus::SetupFailed);
                    let tries = *tries;
                    let delay = retry_delay(self.config.pending_retry, tries);
                    slot.deferred.insert(
                        key.clone(),
                        Deferred {
                            unit: unit.clone(),
                            not_before: Instant::now() + delay,
                        },
                    );
                    self.metrics
                        .set_pending_units(run.group, slot.deferred.len());
                    (tries, delay)
                })
            });
        if let Some((tries, delay)) = retry {
            self.metrics
                .retry_scheduled(&unit.repository, result.status.as_str());
            tracing::warn!(
                repository = %unit.repository, branch = %unit.branch, sha = %unit.sha.short(),
                "{}@{} stays pending ({reason}); next try in {} unless the group runs earlier{}",
                unit.repository, unit.branch, humantime::format_duration(round_secs(delay)),
                if tries > 1 { format!(" ({tries} tries could not run)") } else { String::new() },
            );
        }
        let next_try_at = retry.map(|(_, delay)| {
            humantime::format_rfc3339_seconds(std::time::SystemTime::now() + delay).to_string()
        });
        self.state.with(|state| {
            let repo = state
                .repositories
                .entry(unit.repository.clone())
                .or_default();
            let since = repo
                .pending
                .get(&unit.branch)
                .map_or_else(now_rfc3339, |p| p.since.clone());
            repo.pending.insert(
                unit.branch.clone(),
                PendingRecord {
                    sha: unit.sha.clone(),
                    reason,
                    tries: retry.map_or(0, |(tries, _)| tries),
                    next_try_at,
                    since,
                },
            );
        });
    }
}

/// Advances stored SHAs and keeps pending ones as units end. Added to every run's
/// observers by the scheduler.
struct StateObserver {
    inner: Arc<Inner>,
}

impl RunObserver for StateObserver {
    fn unit_ended(&self, run: RunRef<'_>, result: &UnitResult) {
        let inner = &self.inner;
        inner.state.with(|s| {
            if let Some(repo) = s.repositories.get_mut(&result.unit.repository) {
                repo.claims.remove(&result.unit.branch);
            }
        });
        if result.status.is_handled() {
            inner.handled(run, result);
        } else {
            inner.not_handled(run, result);
        }
        // The stored (or deferred) SHA is in place before the unit stops being in flight:
        // the monitor reads "in flight" before the stored state, so between the two it sees
        // one of them, never neither (which deployed the same move twice).
        let key = (result.unit.repository.clone(), result.unit.branch.clone());
        inner.with_slots(|slots| {
            if let Some(running) = slots.get_mut(run.group).and_then(|s| s.running.as_mut()) {
                running.remove(&key);
            }
        });
        let state = inner.state.clone();
        tokio::spawn(async move { state.save_async().await });
    }

    fn group_ended(&self, _result: &GroupResult) {}
}

/// Claims each unit in the state, under this replica's identity, before it starts — so
/// that a leader taking over after a crash can tell an interrupted unit from one that
/// never started ([`StateStore::take_foreign_claims`]) — and refuses the unit when the
/// state's backend says another replica owns the state now (fenced): a deposed leader
/// starts nothing. Other write failures are logged and do not stop deployments (the
/// claim is then only in memory).
struct ClaimGate {
    state: Arc<StateStore>,
}

impl Admission for ClaimGate {
    fn admit<'a>(
        &'a self,
        run: RunRef<'a>,
        unit: &'a Unit,
    ) -> futures_util::future::BoxFuture<'a, Result<(), String>> {
        let claim = Claim {
            sha: unit.sha.clone(),
            holder: self.state.holder().to_owned(),
            run_id: run.run_id.to_owned(),
            since: now_rfc3339(),
        };
        self.state.with(|s| {
            let repo = s.repositories.entry(unit.repository.clone()).or_default();
            repo.claims.insert(unit.branch.clone(), claim);
        });
        let state = self.state.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || state.save()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e @ StateError::Fenced { .. })) => {
                    tracing::error!("{e}");
                    Err(format!("cancelled: not claimed ({e})"))
                }
                Ok(Err(e)) => {
                    tracing::warn!("the claim of the unit is not stored: {e}");
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!("the claim of the unit is not stored: {e}");
                    Ok(())
                }
            }
        })
    }
}

/// `initial` for a skip (0 setup failures), then doubling per setup failure up to `max`,
/// with up to 10 % jitter so that many deferred units do not retry in lockstep.
fn retry_delay(policy: PendingRetry, setup_failures: u32) -> Duration {
    let exp = setup_failures.saturating_sub(1).min(20);
    let base = policy.initial.saturating_mul(1 << exp).min(policy.max);
    base + (base / 10).mul_f64(rand::random::<f64>())
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs().max(1))
}

/// The newest SHA wins; the previous SHA stays the one before the first queued move.
/// Returns the unit a different SHA replaced, and that SHA, for the observers.
fn merge(pending: &mut BTreeMap<BranchKey, Unit>, unit: Unit) -> Option<(Unit, Sha)> {
    let key = (unit.repository.clone(), unit.branch.clone());
    match pending.get_mut(&key) {
        Some(existing) if existing.sha != unit.sha => {
            let old = existing.clone();
            existing.sha = unit.sha.clone();
            Some((old, unit.sha))
        }
        Some(_) => None,
        None => {
            pending.insert(key, unit);
            None
        }
    }
}

fn running_set(units: &[Unit]) -> BTreeMap<BranchKey, Sha> {
    units
        .iter()
        .map(|u| ((u.repository.clone(), u.branch.clone()), u.sha.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(branch: &str, sha: char, previous: Option<char>) -> Unit {
        let s = |c: char| Sha::parse(&c.to_string().repeat(40)).unwrap();
        Unit {
            repository: "r".into(),
            branch: branch.into(),
            previous_sha: previous.map(s),
            sha: s(sha),
        }
    }

    #[test]
    fn merge_keeps_newest_sha_and_first_previous() {
        let mut pending = BTreeMap::new();
        assert!(merge(&mut pending, unit("main", 'b', Some('a'))).is_none());
        let (old, by) = merge(&mut pending, unit("main", 'c', Some('b'))).unwrap();
        assert_eq!(
            (old.sha, by),
            (unit("main", 'b', None).sha, unit("main", 'c', None).sha)
        );
        assert!(
            merge(&mut pending, unit("main", 'c', Some('b'))).is_none(),
            "same SHA"
        );
        merge(&mut pending, unit("main", 'd', Some('c')));
        merge(&mut pending, unit("dev", 'e', None));
        assert_eq!(pending.len(), 2);
        let main = &pending[&("r".to_string(), "main".to_string())];
        assert_eq!(main.sha, unit("main", 'd', None).sha);
        assert_eq!(main.previous_sha, unit("main", 'a', Some('a')).previous_sha);
    }

    #[test]
    fn retry_delay_doubles_per_setup_failure_up_to_max_with_bounded_jitter() {
        let policy = PendingRetry {
            initial: Duration::from_secs(60),
            max: Duration::from_secs(30 * 60),
        };
        let within = |d: Duration, base: u64| {
            d >= Duration::from_secs(base) && d <= Duration::from_secs(base) * 11 / 10
        };
        assert!(within(retry_delay(policy, 0), 60), "a skip waits initial");
        assert!(within(retry_delay(policy, 1), 60));
        assert!(within(retry_delay(policy, 2), 120));
        assert!(within(retry_delay(policy, 3), 240));
        assert!(within(retry_delay(policy, 10), 1800));
        assert!(within(retry_delay(policy, u32::MAX), 1800));
    }
}
