//! Group runs in `watch`: at most one run in progress and one pending per group.
//!
//! Changes that arrive while a group runs merge into its pending run, the newest SHA per
//! branch winning; when the run ends, the pending one starts. Different groups run
//! concurrently. A unit's stored SHA advances when the unit ends (see
//! [`crate::deploy::UnitStatus::ends_change`]), never before, so a crash mid-run deploys
//! it again after a restart. On shutdown nothing new starts; pending runs are dropped
//! (their SHAs were never stored, so the next start finds them again).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::task::TaskTracker;

use crate::config::{Config, DeployScope, Group};
use crate::deploy::{
    Deployer, GroupRun, Trigger, Unit, UnitHook, UnitResult, expand_scope, new_run_id,
};
use crate::forge::Sha;
use crate::shutdown::Shutdown;
use crate::telemetry::audit::Audit;
use crate::telemetry::metrics::Metrics;

use super::state::{BranchState, DeployRecord, StateStore, now_rfc3339};

type BranchKey = (String, String);

#[derive(Default)]
struct Slot {
    running: Option<BTreeMap<BranchKey, Sha>>,
    pending: Option<Pending>,
}

struct Pending {
    units: BTreeMap<BranchKey, Unit>,
    trigger: Trigger,
}

/// Where group runs and units are reported as they end.
#[derive(Clone, Default)]
pub struct Observers {
    pub metrics: Arc<Metrics>,
    pub audit: Arc<Audit>,
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
    observers: Observers,
}

impl Scheduler {
    pub fn new(
        config: Arc<Config>,
        deployer: Deployer,
        state: Arc<StateStore>,
        shutdown: Shutdown,
        observers: Observers,
    ) -> Scheduler {
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
            }),
        }
    }

    /// The newest SHA of a branch that is pending or being deployed, if any.
    pub fn in_flight(&self, repo: &str, branch: &str) -> Option<Sha> {
        let key = (repo.to_owned(), branch.to_owned());
        self.inner.with_slots(|slots| {
            slots.values().find_map(|slot| {
                let pending = slot.pending.as_ref().and_then(|p| p.units.get(&key));
                pending
                    .map(|u| u.sha.clone())
                    .or_else(|| slot.running.as_ref()?.get(&key).cloned())
            })
        })
    }

    /// Starts a run of `units` for `group`, or merges them into its pending run.
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
                    merge(&mut pending.units, unit);
                }
                tracing::info!(
                    group,
                    pending = pending.units.len(),
                    "group is running; changes queued for the next run"
                );
                self.inner.observers.metrics.set_pending(group, true);
                None
            } else {
                let units = self.inner.in_config_order(group, units);
                slot.running = Some(running_set(&units));
                Some((units, trigger))
            }
        });
        if let Some((units, trigger)) = start {
            let inner = self.inner.clone();
            let group = group.to_owned();
            self.inner
                .tracker
                .spawn(async move { inner.run_until_idle(group, units, trigger).await });
        }
    }

    /// Waits until every run, pending ones included, has ended.
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

impl Inner {
    fn with_slots<R>(&self, f: impl FnOnce(&mut HashMap<String, Slot>) -> R) -> R {
        let mut guard = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    async fn run_until_idle(
        self: Arc<Self>,
        group: String,
        mut units: Vec<Unit>,
        mut trigger: Trigger,
    ) {
        loop {
            let run_id = new_run_id();
            let hook = self.unit_hook(&group, &run_id, &trigger);
            let run = GroupRun {
                group: group.clone(),
                units,
                trigger,
                run_id,
            };
            let metrics = &self.observers.metrics;
            metrics.group_run_started(&group);
            let result = self.deployer.run_group(run, &self.shutdown, hook).await;
            metrics.group_run_ended(&group, result.succeeded(), result.duration);
            self.observers.audit.group_run(&result);
            if !result.succeeded() {
                self.failed_runs.fetch_add(1, Ordering::Relaxed);
            }
            let next = self.with_slots(|slots| {
                let slot = slots.entry(group.clone()).or_default();
                match slot.pending.take() {
                    Some(p) if !self.shutdown.is_requested() => {
                        let units = self.in_config_order(&group, p.units.into_values().collect());
                        slot.running = Some(running_set(&units));
                        Some((units, p.trigger))
                    }
                    _ => {
                        slot.running = None;
                        None
                    }
                }
            });
            metrics.set_pending(&group, false);
            self.state.save_async().await;
            match next {
                Some((u, t)) => (units, trigger) = (u, t),
                None => return,
            }
        }
    }

    /// Records each ended unit in the state (and on disk) as it ends.
    fn unit_hook(self: &Arc<Self>, group: &str, run_id: &str, trigger: &Trigger) -> UnitHook {
        let inner = self.clone();
        let group = group.to_owned();
        let run_id = run_id.to_owned();
        let trigger = trigger.clone();
        Arc::new(move |result: &UnitResult| {
            let unit = &result.unit;
            inner
                .observers
                .metrics
                .unit_ended(&unit.repository, result.status.as_str());
            inner
                .observers
                .audit
                .unit(&run_id, &group, &trigger, result);
            // The stored SHA advances before the unit stops being in flight: the monitor
            // reads "in flight" before the stored state, so between the two it sees one of
            // them, never neither (which deployed the same move twice).
            let key = (unit.repository.clone(), unit.branch.clone());
            let not_in_flight = || {
                inner.with_slots(|slots| {
                    if let Some(running) = slots.get_mut(&group).and_then(|s| s.running.as_mut()) {
                        running.remove(&key);
                    }
                })
            };
            if !result.status.ends_change() {
                not_in_flight();
                return;
            }
            inner.state.with(|state| {
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
                            run_id: run_id.clone(),
                        }),
                    },
                );
            });
            not_in_flight();
            let state = inner.state.clone();
            tokio::spawn(async move { state.save_async().await });
        })
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
}

/// The newest SHA wins; the previous SHA stays the one before the first queued move.
fn merge(pending: &mut BTreeMap<BranchKey, Unit>, unit: Unit) {
    let key = (unit.repository.clone(), unit.branch.clone());
    match pending.get_mut(&key) {
        Some(existing) => existing.sha = unit.sha,
        None => {
            pending.insert(key, unit);
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
        merge(&mut pending, unit("main", 'b', Some('a')));
        merge(&mut pending, unit("main", 'c', Some('b')));
        merge(&mut pending, unit("main", 'd', Some('c')));
        merge(&mut pending, unit("dev", 'e', None));
        assert_eq!(pending.len(), 2);
        let main = &pending[&("r".to_string(), "main".to_string())];
        assert_eq!(main.sha, unit("main", 'd', None).sha);
        assert_eq!(main.previous_sha, unit("main", 'a', Some('a')).previous_sha);
    }
}
