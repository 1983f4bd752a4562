//! `sentry trigger`: deploy repositories by hand, under their group's strategy.
//!
//! The selection (`--repo`, repeatable, or `--group`; [`Config::select`]) becomes one
//! group run per group ([`deploy::by_group`]); runs of several groups go one after another
//! in configuration order, so live output stays readable and a shutdown cancels the ones
//! not yet started. Each unit's branch is `--branch` or the repository's first exact
//! branch; its SHA is `--sha` or the branch's current head from the forge. Output is shown
//! live (`[repo@branch] line`), then a summary table (or one JSON document with
//! `--format json`). Manual runs are audited like any other, with the user of the process
//! (its uid's name, plus `SUDO_USER`). The state file is neither read nor written.
//! Commit statuses and notifications are reported as `watch` reports them (unless
//! `--no-report`), and the command waits a bounded time for their delivery before exiting.
//!
//! Exit codes: 0 every unit succeeded; 1 a unit did not; 2 usage or configuration errors
//! (unknown names, bad branch or SHA, invalid config) and forge errors while resolving SHAs.

use std::sync::Arc;

use anyhow::{Context as _, bail};

use crate::Exit;
use crate::cli::{Cli, OutputFormat, TriggerArgs};
use crate::config::{Config, Env, Repository};
use crate::deploy::{
    self, DeployOptions, Deployer, GroupResult, GroupRun, Observers, Trigger, Unit, UnitStatus,
    format_duration,
};
use crate::forge::{Forges, Sha};
use crate::report::Reporting;
use crate::shutdown::Shutdown;
use crate::telemetry::audit::Audit;
use crate::telemetry::metrics::Metrics;

/// How long the command waits for statuses and notifications before it exits.
const FLUSH: std::time::Duration = std::time::Duration::from_secs(30);

use super::{load_config, print_columns, runtime};

/// Runs `sentry trigger`; builds its own tokio runtime.
pub fn trigger(cli: &Cli, args: &TriggerArgs, env: &Env) -> anyhow::Result<Exit> {
    let config = load_config(&cli.config, env)?;
    let targets = select(&config, args)?;
    let options = DeployOptions {
        keep_workdir: args.keep_workdir,
        // JSON on stdout must stay one document: command output then goes to the log only.
        live_output: args.format == OutputFormat::Text,
        extra_env: env
            .file_only_vars()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    runtime()?.block_on(trigger_async(Arc::new(config), targets, args, options))
}

/// One repository to deploy, before its SHA is known.
#[derive(Debug, Clone)]
struct Target {
    repository: String,
    branch: String,
    sha: Commit,
}

/// What `--sha` says.
#[derive(Debug, Clone)]
enum Commit {
    /// Not given: the branch's head.
    Head,
    Full(Sha),
    /// 7 to 39 hex characters, resolved through the forge.
    Abbreviated(String),
}

impl Commit {
    fn parse(text: Option<&str>) -> anyhow::Result<Commit> {
        let Some(text) = text else {
            return Ok(Commit::Head);
        };
        if let Some(sha) = Sha::parse(text) {
            return Ok(Commit::Full(sha));
        }
        let text = text.trim();
        if (7..40).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Commit::Abbreviated(text.to_ascii_lowercase()));
        }
        bail!("--sha {text:?} is not a commit SHA: give 7 to 40 hex characters")
    }
}

async fn trigger_async(
    config: Arc<Config>,
    targets: Vec<Target>,
    args: &TriggerArgs,
    options: DeployOptions,
) -> anyhow::Result<Exit> {
    let forges = Forges::new(&config)?;
    let units = resolve_shas(&config, &forges, targets).await?;
    let trigger = Trigger::Manual { user: local_user() };
    let runs: Vec<GroupRun> = deploy::by_group(&config, units)
        .into_iter()
        .map(|(group, units)| GroupRun {
            group: group.name.clone(),
            units,
            trigger: trigger.clone(),
            run_id: deploy::new_run_id(),
        })
        .collect();
    if args.dry_run {
        crate::out!("{}", deploy::plan(&config, &runs, &options));
        return Ok(Exit::Success);
    }
    let shutdown = Shutdown::new();
    shutdown
        .listen_for_signals()
        .context("cannot install signal handlers")?;
    let audit = Audit::open(config.audit_log.as_deref()).context("cannot open audit_log")?;
    let reporting = if args.no_report {
        Reporting::off()
    } else {
        // Nobody scrapes a trigger's metrics; the reporters count into a registry of their own.
        Reporting::start(&config, &forges, &Arc::new(Metrics::new()))
            .context("cannot start reporting")?
    };
    let mut list: Vec<Arc<dyn deploy::RunObserver>> = vec![Arc::new(audit)];
    list.extend(reporting.observers());
    let observers = Observers::new(list);
    let deployer = Deployer::new(config, options);
    let mut results = Vec::with_capacity(runs.len());
    for run in runs {
        results.push(deployer.run_group(run, &shutdown, &observers).await);
    }
    match args.format {
        OutputFormat::Text => print_summary(&results),
        OutputFormat::Json => crate::outln!("{:#}", serde_json::json!({ "runs": results })),
    }
    // After the summary: a forge that is down delays the exit, not the result.
    reporting.flush(FLUSH).await;
    Ok(if results.iter().all(GroupResult::succeeded) {
        Exit::Success
    } else {
        Exit::JobFailed
    })
}

/// Checks the selection against the configuration; every target in configuration order.
fn select(config: &Config, args: &TriggerArgs) -> anyhow::Result<Vec<Target>> {
    let repos = config.select(&args.repos, args.group.as_deref())?;
    let sha = Commit::parse(args.sha.as_deref())?;
    if !matches!(sha, Commit::Head) && repos.len() > 1 {
        bail!(
            "--sha names one commit, but {} repositories are selected; give it with a single --repo",
            repos.len()
        );
    }
    repos
        .into_iter()
        .map(|repo| {
            Ok(Target {
                repository: repo.name.clone(),
                branch: branch_for(repo, args.branch.as_deref())?,
                sha: sha.clone(),
            })
        })
        .collect()
}

/// `--branch` (any valid branch name) or the repository's default branch.
fn branch_for(repo: &Repository, given: Option<&str>) -> anyhow::Result<String> {
    let branch = match given.or_else(|| repo.default_branch()) {
        Some(b) => b.to_owned(),
        None => bail!(
            "repository {:?} watches only branch patterns; give --branch",
            repo.name
        ),
    };
    match git2::Branch::name_is_valid(&branch) {
        Ok(true) => Ok(branch),
        _ => bail!("{branch:?} is not a valid branch name"),
    }
}

/// Fills in missing and abbreviated SHAs through the forge.
async fn resolve_shas(
    config: &Config,
    forges: &Forges,
    targets: Vec<Target>,
) -> anyhow::Result<Vec<Unit>> {
    let mut units = Vec::with_capacity(targets.len());
    for t in targets {
        let repo = config
            .repository(&t.repository)
            .with_context(|| format!("unknown repository {:?}", t.repository))?;
        let sha = match t.sha {
            Commit::Full(sha) => sha,
            Commit::Head => forges.branch_head(repo, &t.branch).await.with_context(|| {
                format!("cannot get the head of {:?} of {}", t.branch, t.repository)
            })?,
            Commit::Abbreviated(prefix) => forges
                .resolve_commit(repo, &prefix)
                .await
                .with_context(|| format!("cannot resolve --sha {prefix} in {}", t.repository))?,
        };
        units.push(Unit {
            repository: t.repository,
            branch: t.branch,
            previous_sha: None,
            sha,
        });
    }
    Ok(units)
}

/// Who runs this: the name of the process's real uid (not `$USER`, which anyone can
/// set), with the user who ran sudo when there is one: `root (sudo by alice)`.
fn local_user() -> String {
    let uid = nix::unistd::getuid();
    let name = match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => format!("uid {uid}"),
    };
    match std::env::var("SUDO_USER") {
        Ok(sudo) if !sudo.trim().is_empty() => format!("{name} (sudo by {sudo})"),
        _ => name,
    }
}

fn print_summary(results: &[GroupResult]) {
    let rows: Vec<[String; 6]> = results
        .iter()
        .flat_map(|g| {
            g.units.iter().map(|u| {
                let detail = u
                    .failed_command
                    .clone()
                    .or_else(|| u.reason.clone())
                    .unwrap_or_default();
                [
                    g.group.clone(),
                    format!(
                        "{}@{} ({})",
                        u.unit.repository,
                        u.unit.branch,
                        u.unit.sha.short()
                    ),
                    crate::output::paint_result(u.status.as_str()),
                    u.exit_code
                        .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                    format_duration(u.duration),
                    detail,
                ]
            })
        })
        .collect();
    crate::outln!();
    print_columns(
        [
            "GROUP",
            "UNIT",
            "STATUS",
            "EXIT",
            "DURATION",
            "FAILED COMMAND / REASON",
        ],
        &rows,
    );
    let total = rows.len();
    let ok = results
        .iter()
        .flat_map(|g| &g.units)
        .filter(|u| u.status == UnitStatus::Succeeded)
        .count();
    crate::outln!("{ok} of {total} unit(s) succeeded");
}
