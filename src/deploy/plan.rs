//! The plan that `sentry trigger --dry-run` prints: groups, units, SHAs, strategy, limits,
//! and for each unit the QA checkout, the commands with their working directory and the
//! names (never the values) of the variables they get.

use std::fmt::Write as _;

use super::checkout::{CHECKOUT_PREFIX, is_http};
use super::kubernetes::{self, UnitSpec};
use super::mask::Masker;
use super::runner::RunInfo;
use super::runner::SENTRY_VARIABLES;
use super::{DeployOptions, GroupRun, Trigger, Unit};
use crate::config::{Config, ExecutorKind, Group, KubernetesExecutorConfig, Repository, Strategy};

/// A readable multi-line description of what running `runs` would do.
pub fn plan(config: &Config, runs: &[GroupRun], options: &DeployOptions) -> String {
    let mut out = String::from("Dry run: nothing is cloned and no command runs.\n");
    for run in runs {
        out.push('\n');
        group_plan(&mut out, config, run, options);
    }
    out
}

fn group_plan(out: &mut String, config: &Config, run: &GroupRun, options: &DeployOptions) {
    let trigger = match &run.trigger {
        Trigger::Manual { user } => format!("manual by {user}"),
        other => other.as_str().to_owned(),
    };
    let _ = writeln!(
        out,
        "Group {} (run {}, trigger {trigger}, {} unit(s))",
        run.group,
        run.run_id,
        run.units.len()
    );
    match config.group(&run.group) {
        Some(group) => {
            let _ = writeln!(out, "  {}", limits(group));
        }
        None => {
            let _ = writeln!(out, "  error: no group of this name in the configuration");
        }
    }
    for (i, unit) in run.units.iter().enumerate() {
        match config.repository(&unit.repository) {
            Some(repo) => unit_plan(out, config, run, i + 1, unit, repo, options),
            None => {
                let _ = writeln!(
                    out,
                    "  {}. {}: error: no such repository",
                    i + 1,
                    unit.repository
                );
            }
        }
    }
}

fn limits(group: &Group) -> String {
    let strategy = match group.execution_strategy {
        Strategy::Sequential => {
            "sequential (one unit at a time, in configuration order)".to_owned()
        }
        Strategy::Parallel => match group.max_parallel {
            Some(n) => format!("parallel (at most {n} units at once)"),
            None => "parallel (all units at once)".to_owned(),
        },
    };
    format!(
        "strategy: {strategy}; continue_on_error: {}; global_timeout: {}",
        group.continue_on_error,
        humantime::format_duration(group.global_timeout)
    )
}

fn unit_plan(
    out: &mut String,
    config: &Config,
    run: &GroupRun,
    number: usize,
    unit: &Unit,
    repo: &Repository,
    options: &DeployOptions,
) {
    let deploy = &repo.deploy;
    let previous = unit
        .previous_sha
        .as_ref()
        .map_or_else(|| "unknown".to_owned(), ToString::to_string);
    let _ = writeln!(
        out,
        "  {number}. {} ({})",
        unit.repository, repo.monitor.repo_url
    );
    let _ = writeln!(out, "     branch:   {:?}", unit.branch);
    let _ = writeln!(out, "     sha:      {} (previous: {previous})", unit.sha);
    let fetch = if is_http(&deploy.qa_repo_url) {
        "shallow, single branch"
    } else {
        "full clone of one branch"
    };
    let _ = writeln!(
        out,
        "     checkout: {} at {} ({fetch})",
        deploy.qa_repo_url, deploy.qa_repo_branch
    );
    let _ = writeln!(
        out,
        "     into:     {}/{CHECKOUT_PREFIX}{}-{}-<random>{}",
        config.work_dir.display(),
        run.run_id,
        unit.repository,
        if options.keep_workdir {
            " (kept afterwards)"
        } else {
            " (removed afterwards)"
        }
    );
    let timeout = deploy.timeout.map_or_else(
        || "none (only global_timeout)".to_owned(),
        |t| humantime::format_duration(t).to_string(),
    );
    let _ = writeln!(
        out,
        "     run:      {} -c <command>, working directory = the checkout; timeout per command: {timeout}; retries: {}",
        deploy.shell, deploy.retries
    );
    let masker = Masker::new(config.secrets());
    for (i, command) in deploy.commands.iter().enumerate() {
        let _ = writeln!(out, "       [{}] {}", i + 1, masker.mask(command));
    }
    let _ = writeln!(out, "     variables: {}", SENTRY_VARIABLES.join(", "));
    if !deploy.env.is_empty() {
        let names: Vec<&str> = deploy.env.keys().map(String::as_str).collect();
        let _ = writeln!(out, "       from deploy.env: {}", names.join(", "));
    }
    if !options.extra_env.is_empty() {
        let names: Vec<&str> = options.extra_env.iter().map(|(k, _)| k.as_str()).collect();
        let _ = writeln!(out, "       from the env file: {}", names.join(", "));
    }
    if let Some(ExecutorKind::Kubernetes(k)) = config.group(&run.group).map(|g| &g.executor) {
        job_plan(out, k, config, run, unit, repo);
    }
}

/// The Job manifest (first attempt) the kubernetes executor would create, as JSON
/// (which is YAML too), indented under the unit.
fn job_plan(
    out: &mut String,
    k: &KubernetesExecutorConfig,
    config: &Config,
    run: &GroupRun,
    unit: &Unit,
    repo: &Repository,
) {
    let timeout = config
        .group(&run.group)
        .map_or(std::time::Duration::from_secs(3600), |g| g.global_timeout);
    let info = RunInfo {
        group: run.group.clone(),
        run_id: run.run_id.clone(),
        trigger: run.trigger.clone(),
        changes_json: super::strategy::changes_json(config, run),
        deadline: tokio::time::Instant::now() + timeout,
        extra_env: Vec::new(),
        keep_workdir: false,
    };
    let spec = UnitSpec::new(&info, unit, timeout);
    let deadline = kubernetes::active_deadline(k, repo, timeout);
    let rendered = kubernetes::job_manifest(k, &spec, 1, deadline)
        .and_then(|job| serde_json::to_string_pretty(&job));
    match rendered {
        Ok(json) => {
            let _ = writeln!(out, "     kubernetes Job (namespace {}):", k.namespace);
            for line in json.lines() {
                let _ = writeln!(out, "       {line}");
            }
        }
        Err(e) => {
            let _ = writeln!(out, "     kubernetes Job: error: {e}");
        }
    }
}
