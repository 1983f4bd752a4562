//! One attempt at one unit: check out the QA repository, run its commands in order, each in
//! its own process group, stream their output, and clean up whatever the attempt left.
//!
//! Architecture invariant: when [`run_attempt`] returns, every process group it started has
//! been signalled until empty (SIGTERM, `shutdown_grace`, SIGKILL) and the checkout directory
//! and changes file are gone (unless `keep_workdir`). Remote data (branch, SHAs) reaches the
//! commands only through `SENTRY_*` variables, never through the command string.

use std::io::{IsTerminal as _, Write as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::checkout::{self, CheckoutError, CloneProgress, CloneRequest};
use super::executor::Outcome;
use super::mask::{Masker, Tail};
use super::{Trigger, Unit, UnitStatus};
use crate::config::{Config, GithubApp, InheritEnv, Repository};
use crate::shutdown::Shutdown;
use secrecy::{ExposeSecret as _, SecretString};

/// Bytes of output kept per unit.
pub const TAIL_BYTES: usize = 64 * 1024;

/// A longer line is handed on in pieces of this size.
const MAX_LINE: usize = 64 * 1024;

/// How long a clone may take to notice a stop request before it is abandoned.
const CLONE_STOP_SLACK: Duration = Duration::from_secs(10);

/// How long output readers get to drain after their command ended.
const READER_SETTLE: Duration = Duration::from_secs(1);

/// How often clone progress is logged, and redrawn as a bar on a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);
const BAR_EVERY: Duration = Duration::from_millis(200);

/// How often a process group is checked for leftovers while waiting for it to empty.
const GROUP_POLL: Duration = Duration::from_millis(50);

/// What every unit of one group run shares.
#[derive(Debug)]
pub struct RunInfo {
    pub group: String,
    pub run_id: String,
    pub trigger: Trigger,
    /// Content of `SENTRY_CHANGES_FILE`.
    pub changes_json: String,
    /// End of the group's `global_timeout`.
    pub deadline: Instant,
    pub extra_env: Vec<(String, String)>,
    pub keep_workdir: bool,
}

/// Where a unit's output goes: masked, then logged, optionally printed, and kept.
pub struct OutputSink {
    repo: String,
    /// `repo@branch`, the prefix of live lines.
    label: String,
    masker: Masker,
    live: bool,
    /// Draw clone progress as a bar on stderr (live output to a terminal).
    bar: bool,
    /// When clone progress was last shown.
    progress: Mutex<Option<std::time::Instant>>,
    tail: Mutex<Tail>,
}

impl OutputSink {
    pub fn new(unit: &Unit, masker: Masker, live: bool) -> OutputSink {
        OutputSink {
            repo: unit.repository.clone(),
            label: format!("{}@{}", unit.repository, unit.branch),
            masker,
            live,
            bar: live && std::io::stderr().is_terminal(),
            progress: Mutex::new(None),
            tail: Mutex::new(Tail::new(TAIL_BYTES)),
        }
    }

    /// A stream masker for output read in pieces (see `spawn_reader`).
    fn mask_stream(&self) -> super::mask::MaskStream {
        self.masker.stream()
    }

    /// One line of output from elsewhere (a pod's log), masked here.
    pub fn output_line(&self, line: &str) {
        self.masked_line(&self.masker.mask(line));
    }

    /// One line of command output, already masked.
    fn masked_line(&self, line: &str) {
        if self.live {
            // Shown on stdout already; the log keeps it at debug to avoid doubling it.
            tracing::debug!(target: "sentry::deploy::output", repository = %self.repo, "{line}");
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "[{}] {line}", self.label);
        } else {
            tracing::info!(target: "sentry::deploy::output", repository = %self.repo, "{line}");
        }
        self.keep(line);
    }

    /// A message of Sentry's own about the unit (clone errors, retries), kept in the tail.
    pub fn note(&self, message: &str) {
        let message = self.masker.mask(message);
        tracing::warn!(repository = %self.repo, "{message}");
        if self.live {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "[{}] sentry: {message}", self.label);
        }
        self.keep(&format!("sentry: {message}"));
    }

    /// A clone's progress: a bar on a terminal with live output (`trigger`), else a log
    /// line every few seconds, so a long clone is never silent.
    pub fn clone_progress(&self, p: CloneProgress, started: std::time::Instant) {
        let now = std::time::Instant::now();
        let mut last = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        let every = if self.bar { BAR_EVERY } else { LOG_EVERY };
        // A clone shorter than `every` stays quiet.
        if p.total_objects == 0 || now.duration_since(last.unwrap_or(started)) < every {
            return;
        }
        *last = Some(now);
        let detail = progress_detail(p, now.duration_since(started));
        if self.bar {
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r[{}] cloning {}{detail}\x1b[K",
                self.label,
                progress_bar(p)
            );
            let _ = err.flush();
        } else {
            tracing::info!("cloning the QA repository: {detail}");
        }
    }

    /// Ends the progress bar's line, if one was drawn.
    pub fn clone_done(&self, started: std::time::Instant) {
        let drew = self
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .is_some();
        if self.bar && drew {
            let _ = writeln!(std::io::stderr().lock());
        }
        tracing::debug!("clone ended after {:.1}s", started.elapsed().as_secs_f64());
    }

    fn keep(&self, line: &str) {
        self.tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_line(line);
    }

    pub fn tail(&self) -> String {
        self.tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .into_string()
    }
}

/// `45% (900/2000 objects, 12.3 MiB, 7s)`.
fn progress_detail(p: CloneProgress, elapsed: Duration) -> String {
    format!(
        "{}% ({}/{} objects, {:.1} MiB, {:.0}s)",
        percent(p),
        p.received_objects,
        p.total_objects,
        p.received_bytes as f64 / (1024.0 * 1024.0),
        elapsed.as_secs_f64()
    )
}

/// `[#########-----------] `: 20 cells, one per 5 %.
fn progress_bar(p: CloneProgress) -> String {
    let filled = (percent(p) / 5).min(20);
    format!("[{}{}] ", "#".repeat(filled), "-".repeat(20 - filled))
}

fn percent(p: CloneProgress) -> usize {
    (p.received_objects * 100)
        .checked_div(p.total_objects)
        .unwrap_or(0)
        .min(100)
}

/// Everything one attempt needs.
pub(super) struct Attempt<'a> {
    pub config: &'a Config,
    /// Values of Sentry's own secrets: variables holding them are not inherited.
    pub own_secrets: &'a [String],
    pub repo: &'a Repository,
    pub unit: &'a Unit,
    pub run: &'a RunInfo,
    pub shutdown: &'a Shutdown,
    pub sink: &'a Arc<OutputSink>,
}

/// Why a command or clone was stopped from outside.
#[derive(Debug, Clone, Copy)]
enum Interrupt {
    TimedOut,
    Cancelled,
}

impl Interrupt {
    fn status(self) -> UnitStatus {
        match self {
            Interrupt::TimedOut => UnitStatus::TimedOut,
            Interrupt::Cancelled => UnitStatus::Cancelled,
        }
    }
}

/// Process groups and output readers an attempt started; cleaned up when it ends.
#[derive(Default)]
struct Leftovers {
    groups: Vec<Pid>,
    readers: Vec<JoinHandle<()>>,
}

/// Runs one attempt of a unit to the end and cleans up after it.
pub(super) async fn run_attempt(a: &Attempt<'_>) -> Outcome {
    let work_dir = a.config.work_dir.clone();
    let (run_id, repo) = (a.run.run_id.clone(), a.repo.name.clone());
    let created = tokio::task::spawn_blocking(move || {
        checkout::create_checkout_dir(&work_dir, &run_id, &repo)
    })
    .await;
    let dir = match created {
        Ok(Ok(dir)) => dir,
        Ok(Err(e)) => return setup_failed(a, &format!("cannot create a checkout directory: {e}")),
        Err(e) => return setup_failed(a, &format!("cannot create a checkout directory: {e}")),
    };
    let mut leftovers = Leftovers::default();
    let outcome = prepare_and_run(a, &dir, &mut leftovers).await;
    clean_up(a, &dir, leftovers).await;
    outcome
}

/// Sentry could not get as far as the first command; the change stays pending.
fn setup_failed(a: &Attempt<'_>, message: &str) -> Outcome {
    a.sink.note(message);
    Outcome::new(UnitStatus::SetupFailed, None)
}

async fn prepare_and_run(a: &Attempt<'_>, dir: &Path, leftovers: &mut Leftovers) -> Outcome {
    let changes = checkout::changes_file(dir);
    if let Err(e) = checkout::write_changes_file(&changes, a.run.changes_json.as_bytes()).await {
        return setup_failed(a, &format!("cannot write {}: {e}", changes.display()));
    }
    if let Err(outcome) = clone(a, dir).await {
        return outcome;
    }
    let mut env = command_env(a, dir, &changes);
    match commands_app_token(a).await {
        Ok(Some(token)) => env.push((
            APP_TOKEN_VARIABLE.to_owned(),
            token.expose_secret().to_owned(),
        )),
        Ok(None) => {}
        Err(outcome) => return outcome,
    }
    run_commands(a, dir, &env, leftovers).await
}

/// The variable that hands commands a GitHub App installation token.
pub const APP_TOKEN_VARIABLE: &str = "SENTRY_GITHUB_TOKEN";

/// The installation token commands get when the repository authenticates as a GitHub App:
/// the monitor's App (the watched repository), else the deploy's (the QA repository).
/// Fresh for at least `forge::app::REFRESH_MARGIN`.
async fn commands_app_token(a: &Attempt<'_>) -> Result<Option<SecretString>, Outcome> {
    let app = a
        .repo
        .monitor
        .auth
        .github_app
        .as_ref()
        .or(a.repo.deploy.auth.github_app.as_ref());
    let Some(app) = app else { return Ok(None) };
    app_token(a, app).await.map(Some)
}

/// An installation token of `app`, or the unit's end as "could not run".
async fn app_token(a: &Attempt<'_>, app: &GithubApp) -> Result<SecretString, Outcome> {
    let cancel = tokio_util::sync::CancellationToken::new();
    let token = tokio::select! {
        token = crate::forge::app::installation_token(app, &a.repo.name, &cancel) => token,
        _ = interrupted(a) => {
            cancel.cancel();
            return Err(if a.shutdown.is_requested() {
                Outcome::new(UnitStatus::Cancelled, None)
            } else {
                setup_failed(a, "no GitHub App installation token before the group's global_timeout")
            });
        }
    };
    token.map_err(|e| {
        setup_failed(
            a,
            &format!("cannot get a GitHub App installation token: {e}"),
        )
    })
}

/// Clones the QA repository into `dir`; with a GitHub App, with its installation token,
/// minted again once if the server refuses it.
async fn clone(a: &Attempt<'_>, dir: &Path) -> Result<(), Outcome> {
    let mut req = CloneRequest::new(&a.repo.deploy, dir.to_owned());
    let Some(app) = a.repo.deploy.auth.github_app.clone() else {
        return clone_with(a, req).await.map_err(|e| clone_failed(a, e));
    };
    let mut refreshed = false;
    loop {
        let token = app_token(a, &app).await?;
        req.token = Some(token.clone());
        match clone_with(a, req.clone()).await {
            Err(Ok(CheckoutError::Auth { .. })) if !refreshed => {
                refreshed = true;
                tracing::info!(repository = %a.repo.name, "the QA host refused the App installation token; minting a new one");
                crate::forge::app::forget_installation_token(&app, &token).await;
            }
            other => return other.map_err(|e| clone_failed(a, e)),
        }
    }
}

fn clone_failed(a: &Attempt<'_>, error: Result<CheckoutError, Outcome>) -> Outcome {
    if let Ok(CheckoutError::Certificate { url, .. }) = &error {
        crate::forge::count_tls_error(url);
    }
    match error {
        Ok(e) => setup_failed(a, &e.to_string()),
        Err(outcome) => outcome,
    }
}

/// One clone of `req` into its `dest`, stopping on shutdown or the group deadline. A
/// checkout error is handed back to the caller to word (or retry); an interruption is
/// already the unit's outcome.
async fn clone_with(
    a: &Attempt<'_>,
    req: CloneRequest,
) -> Result<(), Result<CheckoutError, Outcome>> {
    let shutdown = a.shutdown.clone();
    let deadline = a.run.deadline.into_std();
    tracing::info!(repository = %a.repo.name, url = %req.url, branch = %req.branch, "cloning the QA repository");
    let sink = Arc::clone(a.sink);
    let span = tracing::Span::current();
    let started = std::time::Instant::now();
    let mut handle = tokio::task::spawn_blocking(move || {
        let stop = move || shutdown.is_requested() || std::time::Instant::now() >= deadline;
        let progress = |p| span.in_scope(|| sink.clone_progress(p, started));
        let cloned = checkout::clone_blocking(&req, &stop, &progress);
        span.in_scope(|| sink.clone_done(started));
        cloned
    });
    let joined = tokio::select! {
        joined = &mut handle => Some(joined),
        _ = interrupted(a) => tokio::time::timeout(CLONE_STOP_SLACK, &mut handle).await.ok(),
    };
    match joined {
        Some(Ok(Ok(()))) => Ok(()),
        Some(Ok(Err(CheckoutError::Stopped { .. }))) | None => Err(Err(clone_interrupted(a))),
        Some(Ok(Err(e))) => Err(Ok(e)),
        Some(Err(e)) => Err(Err(setup_failed(a, &format!("the clone task failed: {e}")))),
    }
}

/// Completes on shutdown or at the group deadline.
async fn interrupted(a: &Attempt<'_>) {
    tokio::select! {
        _ = a.shutdown.requested() => {}
        _ = tokio::time::sleep_until(a.run.deadline) => {}
    }
}

/// A clone stopped by shutdown is cancelled; one cut off by the group deadline never
/// reached a command, so the change stays pending.
fn clone_interrupted(a: &Attempt<'_>) -> Outcome {
    if a.shutdown.is_requested() {
        Outcome::new(UnitStatus::Cancelled, None)
    } else {
        setup_failed(
            a,
            "the clone did not finish before the group's global_timeout",
        )
    }
}

/// Sentry's environment, then the env file's, then `deploy.env`, then the `SENTRY_*` variables.
fn command_env(a: &Attempt<'_>, dir: &Path, changes: &Path) -> Vec<(String, String)> {
    let unit = a.unit;
    let deploy = &a.repo.deploy;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let sentry = [
        ("SENTRY_GROUP", a.run.group.clone()),
        ("SENTRY_REPO_NAME", a.repo.name.clone()),
        ("SENTRY_REPO_URL", a.repo.monitor.repo_url.clone()),
        ("SENTRY_BRANCH", unit.branch.clone()),
        ("SENTRY_COMMIT_SHA", unit.sha.to_string()),
        (
            "SENTRY_PREVIOUS_SHA",
            unit.previous_sha
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        ),
        ("SENTRY_PROJECT_NAME", deploy.project_name.clone()),
        ("SENTRY_TRIGGER", a.run.trigger.as_str().to_owned()),
        ("SENTRY_RUN_ID", a.run.run_id.clone()),
        ("SENTRY_QA_DIR", path(dir)),
        ("SENTRY_CHANGES_FILE", path(changes)),
    ];
    // The env file counts as Sentry's environment: the same rule and the same filter.
    let sentry_env = utf8_env().chain(a.run.extra_env.iter().cloned());
    let mut env = inherited_env(&deploy.inherit_env, a.own_secrets, sentry_env);
    env.extend(deploy.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(sentry.into_iter().map(|(k, v)| (k.to_owned(), v)));
    env
}

/// Sentry's environment, without the variables that are not UTF-8 (`std::env::vars`
/// would panic on them; a command cannot have been given one through the config).
fn utf8_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
}

/// What commands get of Sentry's own environment (`deploy.inherit_env`): never a variable
/// holding one of Sentry's own secrets — a forge token, a webhook secret — whatever its
/// name, so QA code gets only what it is given.
fn inherited_env(
    rule: &InheritEnv,
    own_secrets: &[String],
    sentry_env: impl Iterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    let allowed = |name: &str| match rule {
        InheritEnv::AllButSecrets => true,
        InheritEnv::Only(names) => {
            InheritEnv::BASIC.contains(&name) || names.iter().any(|n| n == name)
        }
    };
    sentry_env
        .filter(|(name, value)| allowed(name) && !own_secrets.iter().any(|s| s == value))
        .collect()
}

/// The names of the variables [`command_env`] sets, for the dry-run plan.
pub const SENTRY_VARIABLES: &[&str] = &[
    "SENTRY_GROUP",
    "SENTRY_REPO_NAME",
    "SENTRY_REPO_URL",
    "SENTRY_BRANCH",
    "SENTRY_COMMIT_SHA",
    "SENTRY_PREVIOUS_SHA",
    "SENTRY_PROJECT_NAME",
    "SENTRY_TRIGGER",
    "SENTRY_RUN_ID",
    "SENTRY_QA_DIR",
    "SENTRY_CHANGES_FILE",
];

/// Runs the commands in order; stops at the first that does not succeed.
async fn run_commands(
    a: &Attempt<'_>,
    dir: &Path,
    env: &[(String, String)],
    leftovers: &mut Leftovers,
) -> Outcome {
    let commands = &a.repo.deploy.commands;
    let mut last_code = None;
    for (index, command) in commands.iter().enumerate() {
        if a.shutdown.is_requested() {
            return Outcome::new(UnitStatus::Cancelled, last_code);
        }
        let now = Instant::now();
        if now >= a.run.deadline {
            return Outcome::new(UnitStatus::TimedOut, last_code);
        }
        let deadline = match a.repo.deploy.timeout {
            Some(limit) => a.run.deadline.min(now + limit),
            None => a.run.deadline,
        };
        tracing::info!(
            repository = %a.repo.name,
            command = %a.sink.masker.mask(command),
            "running command {}/{}", index + 1, commands.len()
        );
        let shown = || Some(format!("[{}] {}", index + 1, a.sink.masker.mask(command)));
        match run_command(a, command, dir, env, deadline, leftovers).await {
            CommandEnd::Exited(status) if status.success() => last_code = Some(0),
            CommandEnd::Exited(status) => {
                if let Some(signal) = status.signal() {
                    a.sink.note(&format!(
                        "command {} was killed by signal {signal}",
                        index + 1
                    ));
                }
                return Outcome {
                    failed_command: shown(),
                    ..Outcome::new(UnitStatus::Failed, status.code())
                };
            }
            CommandEnd::Interrupted(why) => {
                let what = match why {
                    Interrupt::TimedOut => "timed out",
                    Interrupt::Cancelled => "was stopped by shutdown",
                };
                a.sink.note(&format!("command {} {what}", index + 1));
                return Outcome {
                    failed_command: shown(),
                    ..Outcome::new(why.status(), None)
                };
            }
            CommandEnd::SpawnFailed(e) => {
                return setup_failed(
                    a,
                    &format!(
                        "cannot start {} for command {}: {e}",
                        a.repo.deploy.shell,
                        index + 1
                    ),
                );
            }
        }
    }
    Outcome::new(UnitStatus::Succeeded, last_code)
}

enum CommandEnd {
    Exited(ExitStatus),
    Interrupted(Interrupt),
    SpawnFailed(std::io::Error),
}

/// Runs one command as the leader of its own process group and waits for it, its deadline
/// or shutdown; an interrupted command's group is terminated before this returns.
async fn run_command(
    a: &Attempt<'_>,
    command: &str,
    dir: &Path,
    env: &[(String, String)],
    deadline: Instant,
    leftovers: &mut Leftovers,
) -> CommandEnd {
    let mut cmd = tokio::process::Command::new(&a.repo.deploy.shell);
    cmd.arg("-c")
        .arg(command)
        .current_dir(dir)
        // Only what `command_env` chose: Sentry's environment is filtered there.
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return CommandEnd::SpawnFailed(e),
    };
    let Some(pgid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
    else {
        return CommandEnd::SpawnFailed(std::io::Error::other("the command has no process id"));
    };
    leftovers.groups.push(pgid);
    if let Some(out) = child.stdout.take() {
        leftovers.readers.push(spawn_reader(out, a.sink));
    }
    if let Some(err) = child.stderr.take() {
        leftovers.readers.push(spawn_reader(err, a.sink));
    }
    let waited = tokio::select! {
        status = child.wait() => Ok(status),
        _ = tokio::time::sleep_until(deadline) => Err(Interrupt::TimedOut),
        _ = a.shutdown.requested() => Err(Interrupt::Cancelled),
    };
    let end = match waited {
        Ok(Ok(status)) => CommandEnd::Exited(status),
        Ok(Err(e)) => CommandEnd::SpawnFailed(e),
        Err(why) => {
            terminate(&mut child, pgid, a.config.shutdown_grace, a.shutdown).await;
            CommandEnd::Interrupted(why)
        }
    };
    settle_readers(&mut leftovers.readers, READER_SETTLE).await;
    end
}

/// SIGTERM to the group (SIGKILL when shutdown is forced), up to `grace` for it to empty,
/// then SIGKILL, and reaps the shell.
async fn terminate(
    child: &mut tokio::process::Child,
    pgid: Pid,
    grace: Duration,
    shutdown: &Shutdown,
) {
    if !shutdown.is_forced() {
        signal_group(pgid, Signal::SIGTERM);
        let gone = async {
            let _ = child.wait().await;
            wait_until_empty(&[pgid]).await;
        };
        tokio::select! {
            _ = tokio::time::timeout(grace, gone) => {}
            _ = shutdown.forced() => {}
        }
    }
    signal_group(pgid, Signal::SIGKILL);
    let _ = child.wait().await;
}

fn signal_group(pgid: Pid, signal: Signal) {
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(
            pgid = pgid.as_raw(),
            "cannot send {signal} to process group: {e}"
        ),
    }
}

/// Whether any process of the group still exists (zombies included).
fn group_alive(pgid: Pid) -> bool {
    !matches!(killpg(pgid, None), Err(Errno::ESRCH))
}

async fn wait_until_empty(groups: &[Pid]) {
    while groups.iter().any(|g| group_alive(*g)) {
        tokio::time::sleep(GROUP_POLL).await;
    }
}

/// Gives output readers up to `limit` to reach end of file; keeps the ones still running
/// (a background process may hold the pipe) for the final clean-up.
async fn settle_readers(readers: &mut Vec<JoinHandle<()>>, limit: Duration) {
    let until = Instant::now() + limit;
    for reader in readers.iter_mut() {
        let _ = tokio::time::timeout_at(until, reader).await;
    }
    readers.retain(|r| !r.is_finished());
}

/// Ends what the attempt left running (background children of commands that exited by
/// themselves) and removes the checkout.
async fn clean_up(a: &Attempt<'_>, dir: &Path, leftovers: Leftovers) {
    let Leftovers {
        groups,
        mut readers,
    } = leftovers;
    let alive: Vec<Pid> = groups.into_iter().filter(|g| group_alive(*g)).collect();
    if !alive.is_empty() {
        tracing::info!(repository = %a.repo.name, "stopping {} process group(s) left by the commands", alive.len());
        stop_groups(&alive, a.config.shutdown_grace, a.shutdown).await;
    }
    settle_readers(&mut readers, READER_SETTLE).await;
    for reader in readers {
        reader.abort();
    }
    if a.run.keep_workdir {
        tracing::info!(repository = %a.repo.name, dir = %dir.display(), "keeping the QA checkout");
        return;
    }
    remove_checkout(dir.to_owned()).await;
}

/// SIGTERM, up to `grace` for the groups to empty (cut short by a forced shutdown), SIGKILL.
async fn stop_groups(groups: &[Pid], grace: Duration, shutdown: &Shutdown) {
    if !shutdown.is_forced() {
        for g in groups {
            signal_group(*g, Signal::SIGTERM);
        }
        tokio::select! {
            _ = tokio::time::timeout(grace, wait_until_empty(groups)) => {}
            _ = shutdown.forced() => {}
        }
    }
    for g in groups {
        signal_group(*g, Signal::SIGKILL);
    }
}

async fn remove_checkout(dir: PathBuf) {
    let shown = dir.display().to_string();
    match tokio::task::spawn_blocking(move || checkout::remove_checkout(&dir)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(dir = %shown, "cannot remove the QA checkout: {e}"),
        Err(e) => tracing::warn!(dir = %shown, "cannot remove the QA checkout: {e}"),
    }
}

fn spawn_reader<R>(reader: R, sink: &Arc<OutputSink>) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let sink = Arc::clone(sink);
    // In the unit's span, so that every output line carries the group, run and unit.
    let span = tracing::Span::current();
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            // A line longer than MAX_LINE arrives in pieces: the stream keeps a secret that
            // straddles two pieces whole.
            let mut stream = sink.mask_stream();
            loop {
                buf.clear();
                match read_line_capped(&mut reader, &mut buf, MAX_LINE).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line_end = buf.ends_with(b"\n");
                        let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
                        let line = line.strip_suffix(b"\r").unwrap_or(line);
                        if let Some(masked) = stream.feed(line, line_end) {
                            sink.masked_line(&masked);
                        }
                    }
                }
            }
            if let Some(masked) = stream.finish() {
                sink.masked_line(&masked);
            }
        },
        span,
    ))
}

/// Reads up to and including the next `\n`, or `max` bytes, whichever comes first.
/// Returns the number of bytes read; 0 at end of file.
async fn read_line_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<usize> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(buf.len());
        }
        let room = max.saturating_sub(buf.len());
        let window = &available[..available.len().min(room)];
        if let Some(i) = window.iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&window[..=i]);
            reader.consume(i + 1);
            return Ok(buf.len());
        }
        let n = window.len();
        buf.extend_from_slice(window);
        reader.consume(n);
        if buf.len() >= max {
            return Ok(buf.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inherited_environment_never_carries_sentrys_secrets() {
        let sentry_env = || {
            [
                ("PATH", "/usr/bin"),
                ("GITHUB_TOKEN", "ghp_secret"),
                ("RENAMED", "ghp_secret"),
                ("QA_FLAG", "on"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        };
        let secrets = ["ghp_secret".to_owned()];
        let names = |env: Vec<(String, String)>| -> Vec<String> {
            env.into_iter().map(|(k, _)| k).collect()
        };
        let all = inherited_env(&InheritEnv::AllButSecrets, &secrets, sentry_env());
        assert_eq!(names(all), ["PATH", "QA_FLAG"]);
        let none = inherited_env(&InheritEnv::Only(Vec::new()), &secrets, sentry_env());
        assert_eq!(names(none), ["PATH"]);
        let listed = InheritEnv::Only(vec!["QA_FLAG".into(), "GITHUB_TOKEN".into()]);
        let some = inherited_env(&listed, &secrets, sentry_env());
        assert_eq!(
            names(some),
            ["PATH", "QA_FLAG"],
            "a listed secret is still withheld"
        );
    }

    #[test]
    fn clone_progress_reads_well() {
        let p = CloneProgress {
            received_objects: 900,
            total_objects: 2000,
            received_bytes: 12_900_000,
        };
        assert_eq!(
            progress_detail(p, Duration::from_secs(7)),
            "45% (900/2000 objects, 12.3 MiB, 7s)"
        );
        assert_eq!(progress_bar(p), "[#########-----------] ");
        let done = CloneProgress {
            received_objects: 2000,
            ..p
        };
        assert_eq!(progress_bar(done), format!("[{}] ", "#".repeat(20)));
        let unknown = CloneProgress {
            total_objects: 0,
            ..p
        };
        assert_eq!(percent(unknown), 0);
    }

    #[test]
    fn long_clones_report_progress_and_short_ones_stay_quiet() {
        let unit = Unit {
            repository: "r".into(),
            branch: "main".into(),
            previous_sha: None,
            sha: crate::forge::Sha::parse(&"a".repeat(40)).unwrap(),
        };
        let sink = OutputSink::new(&unit, Masker::new(Vec::new()), false);
        let p = CloneProgress {
            received_objects: 1,
            total_objects: 2,
            received_bytes: 10,
        };
        sink.clone_progress(p, std::time::Instant::now());
        assert!(
            sink.progress.lock().unwrap().is_none(),
            "a fresh clone is quiet"
        );
        let long_ago = std::time::Instant::now() - LOG_EVERY - Duration::from_secs(1);
        sink.clone_progress(p, long_ago);
        let shown = *sink.progress.lock().unwrap();
        assert!(
            shown.is_some(),
            "a clone running longer than LOG_EVERY reports"
        );
        sink.clone_progress(p, long_ago);
        assert_eq!(
            *sink.progress.lock().unwrap(),
            shown,
            "then at most every LOG_EVERY"
        );
    }

    #[tokio::test]
    async fn long_lines_are_split_and_short_ones_kept_whole() {
        let data: &[u8] = b"abcdefghij\nxy\nlast";
        let mut reader = BufReader::new(data);
        let mut lines = Vec::new();
        let mut buf = Vec::new();
        while read_line_capped(&mut reader, &mut buf, 4).await.unwrap() > 0 {
            lines.push(String::from_utf8(buf.clone()).unwrap());
            buf.clear();
        }
        assert_eq!(lines, ["abcd", "efgh", "ij\n", "xy\n", "last"]);
    }
}
