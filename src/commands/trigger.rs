//! `sentry trigger`: deploy repositories by hand, under their group's strategy.
//!
//! The selection (`--repo`, repeatable, or `--group`) becomes one group run per group; runs
//! of several groups go one after another in configuration order, so live output stays
//! readable and a shutdown cancels the ones not yet started. Each unit's branch is
//! `--branch` or the repository's first exact branch; its SHA is `--sha` or the branch's
//! current head from the forge. Output is shown live (`[repo] line`), then a summary table.
//! The state file is neither read nor written.
//!
//! Exit codes: 0 every unit succeeded; 1 a unit did not; 2 usage or configuration errors
//! (unknown names, bad branch or SHA, invalid config) and forge errors while resolving SHAs.

use std::sync::Arc;

use crate::Exit;
use crate::cli::{Cli, TriggerArgs};
use crate::config::{Config, Env, Repository};
use crate::deploy::{
    self, DeployOptions, Deployer, GroupResult, GroupRun, Trigger, Unit, format_duration,
};
use crate::forge::{Forges, Sha};
use crate::shutdown::Shutdown;

use super::{load_config, print_columns, runtime};

/// Runs `sentry trigger`; builds its own tokio runtime.
pub fn trigger(cli: &Cli, args: &TriggerArgs, env: &Env) -> Exit {
    let config = match load_config(&cli.config, env) {
        Ok(config) => config,
        Err(exit) => return exit,
    };
    let targets = match select(&config, args) {
        Ok(targets) => targets,
        Err(message) => {
            eprintln!("error: {message}");
            return Exit::CannotRun;
        }
    };
    let options = DeployOptions {
        keep_workdir: args.keep_workdir,
        live_output: true,
        extra_env: env
            .file_only_vars()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    match runtime() {
        Ok(rt) => rt.block_on(trigger_async(
            Arc::new(config),
            targets,
            args.dry_run,
            options,
        )),
        Err(exit) => exit,
    }
}

/// One repository to deploy, before its SHA is known.
#[derive(Debug, Clone)]
struct Target {
    repository: String,
    group: String,
    branch: String,
    sha: Option<Sha>,
}

async fn trigger_async(
    config: Arc<Config>,
    targets: Vec<Target>,
    dry_run: bool,
    options: DeployOptions,
) -> Exit {
    let units = match resolve_shas(&config, targets).await {
        Ok(units) => units,
        Err(message) => {
            eprintln!("error: {message}");
            return Exit::CannotRun;
        }
    };
    let runs = group_runs(&config, units, &local_user());
    if dry_run {
        print!("{}", deploy::plan(&config, &runs, &options));
        return Exit::Success;
    }
    let shutdown = Shutdown::new();
    if let Err(e) = shutdown.listen_for_signals() {
        eprintln!("error: cannot install signal handlers: {e}");
        return Exit::CannotRun;
    }
    let deployer = Deployer::new(config, options);
    let mut results = Vec::with_capacity(runs.len());
    for run in runs {
        results.push(deployer.run_group(run, &shutdown, deploy::no_hook()).await);
    }
    print_summary(&results);
    if results.iter().all(GroupResult::succeeded) {
        Exit::Success
    } else {
        Exit::JobFailed
    }
}

/// Checks the selection against the configuration; every target in configuration order.
fn select(config: &Config, args: &TriggerArgs) -> Result<Vec<Target>, String> {
    let repos = selected_repositories(config, args)?;
    let sha = match &args.sha {
        None => None,
        Some(text) => Some(
            Sha::parse(text)
                .ok_or_else(|| format!("--sha {text:?} is not a full 40-hex commit SHA"))?,
        ),
    };
    if sha.is_some() && repos.len() > 1 {
        return Err(format!(
            "--sha names one commit, but {} repositories are selected; give it with a single --repo",
            repos.len()
        ));
    }
    repos
        .into_iter()
        .map(|repo| {
            Ok(Target {
                repository: repo.name.clone(),
                group: repo.group.clone(),
                branch: branch_for(repo, args.branch.as_deref())?,
                sha: sha.clone(),
            })
        })
        .collect()
}

fn selected_repositories<'a>(
    config: &'a Config,
    args: &TriggerArgs,
) -> Result<Vec<&'a Repository>, String> {
    if let Some(group) = &args.group {
        if config.group(group).is_none() {
            let valid: Vec<&str> = config.groups.iter().map(|g| g.name.as_str()).collect();
            return Err(format!(
                "unknown group {group:?}; valid groups: {}",
                valid.join(", ")
            ));
        }
        let repos: Vec<&Repository> = config
            .repositories
            .iter()
            .map(AsRef::as_ref)
            .filter(|r: &&Repository| r.group == *group)
            .collect();
        if repos.is_empty() {
            return Err(format!("group {group:?} has no repositories"));
        }
        return Ok(repos);
    }
    let unknown: Vec<&str> = args
        .repos
        .iter()
        .filter(|name| config.repository(name).is_none())
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        let valid: Vec<&str> = config
            .repositories
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        return Err(format!(
            "unknown repository {}; valid repositories: {}",
            unknown
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            valid.join(", ")
        ));
    }
    if args.repos.is_empty() {
        return Err("give --repo NAME (repeatable) or --group NAME".to_owned());
    }
    // Configuration order, each repository once.
    Ok(config
        .repositories
        .iter()
        .map(AsRef::as_ref)
        .filter(|r: &&Repository| args.repos.contains(&r.name))
        .collect())
}

/// `--branch` (any valid branch name) or the repository's first exact watched branch.
fn branch_for(repo: &Repository, given: Option<&str>) -> Result<String, String> {
    let branch = match given {
        Some(b) => b.to_owned(),
        None => repo
            .monitor
            .exact_branches()
            .next()
            .map(str::to_owned)
            .ok_or_else(|| {
                format!(
                    "repository {:?} watches only branch patterns; give --branch",
                    repo.name
                )
            })?,
    };
    match git2::Branch::name_is_valid(&branch) {
        Ok(true) => Ok(branch),
        _ => Err(format!("{branch:?} is not a valid branch name")),
    }
}

/// Fills in missing SHAs with the branch heads from the forge.
async fn resolve_shas(
    config: &Config,
    targets: Vec<Target>,
) -> Result<Vec<(String, Unit)>, String> {
    let mut forges = None;
    let mut units = Vec::with_capacity(targets.len());
    for t in targets {
        let sha = match t.sha {
            Some(sha) => sha,
            None => {
                let repo = config
                    .repository(&t.repository)
                    .ok_or_else(|| format!("unknown repository {:?}", t.repository))?;
                if forges.is_none() {
                    forges = Some(Forges::new(config).map_err(|e| e.to_string())?);
                }
                let Some(forges) = &forges else {
                    return Err("no forge client".to_owned());
                };
                forges.branch_head(repo, &t.branch).await.map_err(|e| {
                    format!(
                        "cannot get the head of {:?} of {}: {e}",
                        t.branch, t.repository
                    )
                })?
            }
        };
        let unit = Unit {
            repository: t.repository,
            branch: t.branch,
            previous_sha: None,
            sha,
        };
        units.push((t.group, unit));
    }
    Ok(units)
}

/// One manual group run per group, in configuration order.
fn group_runs(config: &Config, units: Vec<(String, Unit)>, user: &str) -> Vec<GroupRun> {
    config
        .groups
        .iter()
        .filter_map(|group| {
            let mine: Vec<Unit> = units
                .iter()
                .filter(|(g, _)| *g == group.name)
                .map(|(_, u)| u.clone())
                .collect();
            (!mine.is_empty()).then(|| GroupRun {
                group: group.name.clone(),
                units: mine,
                trigger: Trigger::Manual {
                    user: user.to_owned(),
                },
                run_id: deploy::new_run_id(),
            })
        })
        .collect()
}

/// `$USER`, else the name of the process's uid, else the uid itself.
fn local_user() -> String {
    if let Ok(user) = std::env::var("USER") {
        if !user.trim().is_empty() {
            return user;
        }
    }
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => format!("uid {uid}"),
    }
}

fn print_summary(results: &[GroupResult]) {
    let rows: Vec<[String; 5]> = results
        .iter()
        .flat_map(|g| {
            g.units.iter().map(|u| {
                [
                    g.group.clone(),
                    format!(
                        "{}@{} ({})",
                        u.unit.repository,
                        u.unit.branch,
                        u.unit.sha.short()
                    ),
                    u.status.as_str().to_owned(),
                    u.exit_code
                        .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                    format_duration(u.duration),
                ]
            })
        })
        .collect();
    println!();
    print_columns(["GROUP", "UNIT", "STATUS", "EXIT", "DURATION"], &rows);
    let total = rows.len();
    let ok = results
        .iter()
        .flat_map(|g| &g.units)
        .filter(|u| u.status == deploy::UnitStatus::Succeeded)
        .count();
    println!("{ok} of {total} unit(s) succeeded");
}
