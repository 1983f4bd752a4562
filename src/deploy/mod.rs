//! Deploying: check out a repository's QA repo and run its commands for every unit of a
//! group run, under the group's strategy, and report each unit's result.
//!
//! Code map: [`checkout`] clones the QA repository (git2, in `spawn_blocking`) and owns the
//! checkout directories; [`executor`] is the seam for how one unit's commands run, with
//! [`LocalExecutor`] (`runner`: commands in their own process groups, output streaming,
//! timeouts, clean-up) as today's implementation; [`strategy`] holds [`Deployer`], which
//! drives a whole group run under its strategy; [`observer`] is the seam through which
//! metrics, the audit trail and the state hear of runs and units; [`mask`] masks secrets
//! in output; [`plan`] renders the `--dry-run` plan.

pub mod checkout;
pub mod executor;
pub mod kubernetes;
pub mod mask;
pub mod observer;
pub mod plan;
mod runner;
pub mod strategy;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, DeployScope, Group};
use crate::forge::Sha;

pub use observer::{Admission, Observers, RunObserver, RunRef};
pub use plan::plan;
pub use strategy::{Deployer, format_duration};

/// How a [`Deployer`] runs units.
#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    /// Keep QA checkouts (and changes files) in `work_dir` for debugging.
    pub keep_workdir: bool,
    /// Print each output line to stdout prefixed `[repo] ` (what `trigger` does); the log
    /// then carries the lines at debug level instead of info.
    pub live_output: bool,
    /// Extra environment for commands (the env file's variables), before `deploy.env`.
    pub extra_env: Vec<(String, String)>,
}

/// A new run id: UTC time and a random suffix, e.g. `20261104T101500Z-3f9a1c`; safe in
/// file names and unique per group run.
pub fn new_run_id() -> String {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let compact: String = now.chars().filter(|c| !matches!(c, '-' | ':')).collect();
    format!("{compact}-{:06x}", rand::random::<u32>() & 0x00ff_ffff)
}

/// Splits units by their repository's group, groups in configuration order, each group's
/// units in the order given; units of unknown repositories are dropped. The one place
/// where changes (`watch`) and manual selections (`trigger`) become per-group work.
pub fn by_group(config: &Config, units: Vec<Unit>) -> Vec<(&Group, Vec<Unit>)> {
    let mut groups: Vec<(&Group, Vec<Unit>)> =
        config.groups.iter().map(|g| (g, Vec::new())).collect();
    for unit in units {
        let Some(repo) = config.repository(&unit.repository) else {
            continue;
        };
        if let Some((_, mine)) = groups.iter_mut().find(|(g, _)| g.name == repo.group) {
            mine.push(unit);
        }
    }
    groups.retain(|(_, units)| !units.is_empty());
    groups
}

/// Applies the group's `deploy_scope` to the changed units of a group run and puts them in
/// configuration order (repositories as listed, each repository's units as given).
///
/// With `deploy_scope: all`, every repository of the group is added at each of its exact
/// watched branches that has no changed unit, at its current head from `current_heads`
/// (keyed by repository name and branch; a branch missing there is left out), with
/// `previous_sha` equal to that head; exact branches come in watched order, then changed
/// pattern branches. With `changed`, only the order changes.
pub fn expand_scope(
    config: &Config,
    group: &Group,
    units: Vec<Unit>,
    current_heads: &BTreeMap<(String, String), Sha>,
) -> Vec<Unit> {
    let mut rest = units;
    let mut out = Vec::with_capacity(rest.len());
    for repo in config.repositories_in(&group.name) {
        let (mut mine, others): (Vec<Unit>, Vec<Unit>) =
            rest.into_iter().partition(|u| u.repository == repo.name);
        rest = others;
        if group.deploy_scope == DeployScope::All {
            for branch in repo.monitor.exact_branches() {
                if let Some(pos) = mine.iter().position(|u| u.branch == branch) {
                    out.push(mine.remove(pos));
                } else if let Some(sha) = current_heads.get(&(repo.name.clone(), branch.to_owned()))
                {
                    out.push(Unit {
                        repository: repo.name.clone(),
                        branch: branch.to_owned(),
                        previous_sha: Some(sha.clone()),
                        sha: sha.clone(),
                    });
                }
            }
        }
        out.extend(mine);
    }
    out.extend(rest);
    out
}

/// One thing to deploy: a repository at a branch's commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unit {
    /// Repository name from the configuration.
    pub repository: String,
    pub branch: String,
    /// Last handled SHA of the branch; `None` for a new branch or a manual run without state.
    pub previous_sha: Option<Sha>,
    pub sha: Sha,
}

/// What started a group run; reaches commands as `SENTRY_TRIGGER`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Poll,
    Webhook,
    /// A retry of units that could not run (setup failed or skipped), after a backoff.
    Retry,
    /// By hand, with the local user's name for the audit trail.
    Manual {
        user: String,
    },
}

impl Trigger {
    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::Poll => "poll",
            Trigger::Webhook => "webhook",
            Trigger::Retry => "retry",
            Trigger::Manual { .. } => "manual",
        }
    }
}

/// A group's units to deploy together.
#[derive(Debug, Clone)]
pub struct GroupRun {
    pub group: String,
    /// In configuration order.
    pub units: Vec<Unit>,
    pub trigger: Trigger,
    /// Unique per group run; reaches commands as `SENTRY_RUN_ID`.
    pub run_id: String,
}

/// How a unit ended. Only the first three mean its commands ran to an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitStatus {
    /// Every command exited 0.
    Succeeded,
    /// A command exited non-zero or was killed.
    Failed,
    /// A command ran past `deploy.timeout` or the group's `global_timeout`.
    TimedOut,
    /// Sentry could not get as far as the first command: the clone, the checkout
    /// directory, the changes file or the shell failed.
    SetupFailed,
    /// Not started: an earlier unit failed (without `continue_on_error`) or the group's
    /// `global_timeout` passed.
    Skipped,
    /// Stopped or not started because Sentry is shutting down.
    Cancelled,
}

impl UnitStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UnitStatus::Succeeded => "succeeded",
            UnitStatus::Failed => "failed",
            UnitStatus::TimedOut => "timed_out",
            UnitStatus::SetupFailed => "setup_failed",
            UnitStatus::Skipped => "skipped",
            UnitStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the unit's change is handled, so its stored SHA may advance: only when its
    /// commands ran to an outcome. Everything else leaves the change pending, to be
    /// deployed again (see `monitor::scheduler`).
    pub fn is_handled(self) -> bool {
        matches!(
            self,
            UnitStatus::Succeeded | UnitStatus::Failed | UnitStatus::TimedOut
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct UnitResult {
    pub unit: Unit,
    pub status: UnitStatus,
    /// Exit code of the last command that ran, when it exited by itself.
    pub exit_code: Option<i32>,
    #[serde(with = "duration_secs")]
    pub duration: Duration,
    /// The last 64 KiB of the unit's output, secrets masked.
    pub output_tail: String,
    /// 1 + retries used.
    pub attempts: u32,
    /// The command that failed or timed out, as `[2] make test` (secrets masked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_command: Option<String>,
    /// Why a unit did not run to an outcome (`skipped: a@main failed`, the clone error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupResult {
    pub run_id: String,
    pub group: String,
    pub trigger: Trigger,
    pub units: Vec<UnitResult>,
    #[serde(with = "duration_secs")]
    pub duration: Duration,
}

impl GroupResult {
    /// A group run succeeded only when every unit did.
    pub fn succeeded(&self) -> bool {
        self.units.iter().all(|u| u.status == UnitStatus::Succeeded)
    }
}

/// Durations as fractional seconds in JSON.
mod duration_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const YAML: &str = "
groups:
  g: {deploy_scope: all}
repositories:
  - name: a
    group: g
    monitor: {repo_url: 'file:///a', branches: [main, dev, 'feat/*'], repo_type: git}
    deploy: {qa_repo_url: 'file:///qa', qa_repo_branch: main, commands: ['true']}
  - name: b
    group: g
    monitor: {repo_url: 'file:///b', branches: [main], repo_type: git}
    deploy: {qa_repo_url: 'file:///qa', qa_repo_branch: main, commands: ['true']}
";

    fn sha(c: char) -> Sha {
        Sha::parse(&c.to_string().repeat(40)).unwrap()
    }

    fn unit(repo: &str, branch: &str, new: char) -> Unit {
        Unit {
            repository: repo.into(),
            branch: branch.into(),
            previous_sha: None,
            sha: sha(new),
        }
    }

    #[test]
    fn scope_all_adds_every_repository_at_its_current_heads_in_config_order() {
        let config = crate::config::load_str(YAML, &crate::config::Env::fixed([("HOME", "/")]))
            .config
            .unwrap();
        let group = config.group("g").unwrap();
        let heads: BTreeMap<(String, String), Sha> = [
            (("a".into(), "main".into()), sha('1')),
            (("b".into(), "main".into()), sha('2')),
        ]
        .into();
        let changed = vec![unit("b", "main", '3'), unit("a", "feat/x", '4')];
        let units = expand_scope(&config, group, changed.clone(), &heads);
        let got: Vec<(&str, &str, char)> = units
            .iter()
            .map(|u| {
                let first = u.sha.as_str().chars().next().unwrap();
                (u.repository.as_str(), u.branch.as_str(), first)
            })
            .collect();
        // a/dev has no known head and is left out; b/main keeps its changed SHA.
        assert_eq!(
            got,
            [("a", "main", '1'), ("a", "feat/x", '4'), ("b", "main", '3')]
        );

        let mut changed_only = config.group("g").unwrap().clone();
        changed_only.deploy_scope = DeployScope::Changed;
        let units = expand_scope(&config, &changed_only, changed, &heads);
        let names: Vec<&str> = units.iter().map(|u| u.repository.as_str()).collect();
        assert_eq!(names, ["a", "b"], "config order");
    }

    #[test]
    fn run_ids_are_file_safe_and_distinct() {
        let (a, b) = (new_run_id(), new_run_id());
        assert_ne!(a, b);
        assert!(
            a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{a}"
        );
    }

    #[test]
    fn group_runs_can_be_spawned() {
        fn assert_send<T: Send + 'static>(_: T) {}
        let config = crate::config::load_str(YAML, &crate::config::Env::fixed([("HOME", "/")]))
            .config
            .unwrap();
        let deployer = Deployer::new(Arc::new(config), DeployOptions::default());
        let run = GroupRun {
            group: "g".into(),
            units: Vec::new(),
            trigger: Trigger::Poll,
            run_id: "r".into(),
        };
        assert_send(async move {
            deployer
                .run_group(
                    run,
                    &crate::shutdown::Shutdown::new(),
                    &Observers::default(),
                )
                .await
        });
    }
}
