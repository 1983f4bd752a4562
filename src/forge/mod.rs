//! Forge clients: ask GitHub, GitLab or any Git host for the head SHA of watched branches.
//!
//! One [`Forges`] value per process holds the shared HTTP client, the per-host concurrency
//! limits and rate-limit pauses, and the ETag cache. It never decides what a change is:
//! it reports what the forge said ([`Observation`]), and the monitor compares.
//!
//! Where things are: `github` and `gitlab` build the REST requests and read the answers
//! (`github::graphql` batches GitHub lookups into GraphQL queries);
//! `git` runs ls-remote through libgit2; `http` is the shared client (per-host semaphore,
//! rate-limit pauses, retries, ETag cache). This file holds the types, the [`Forges`] facade,
//! the orchestration of one check (exact branches and the listing concurrently), and the
//! pagination shared by both APIs (`Link: rel="next"`, GitLab's `x-next-page`), and
//! [`Forges::post_status`], which hands a [`CommitStatus`] to the repository's forge
//! (each forge's file builds its request).
//!
//! Invariants: a body that is not a 40-hex SHA is an error, never a head; a token only ever
//! travels in a sensitive header (never in a URL, a log line or a message); no request is
//! sent to a host while it is paused for a rate limit.

pub(crate) mod app;
pub(crate) mod budget;
mod git;
mod github;
mod gitlab;
mod http;
pub mod kind;
pub(crate) mod proxy;
pub(crate) mod ssh;
pub(crate) mod tls;
pub(crate) mod validators;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use futures_util::future::join_all;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::HeaderValue;
use reqwest::{StatusCode, Url};
use tokio_util::sync::CancellationToken;

use crate::config::{BranchPattern, Config, Monitor, RepoType, Repository};
pub use git::{is_certificate_error, prepare_libgit2, same_origin};
use http::{Cached, Call, Http, Page, Reply};

/// A full 40-hex commit SHA, checked on construction: lowercase ASCII held inline, so a
/// SHA is copied, compared and cached without a heap allocation.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha([u8; 40]);

impl std::fmt::Debug for Sha {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Sha").field(&self.as_str()).finish()
    }
}

impl Sha {
    pub fn parse(text: &str) -> Option<Sha> {
        let hex: [u8; 40] = text.trim().as_bytes().try_into().ok()?;
        hex.iter()
            .all(u8::is_ascii_hexdigit)
            .then(|| Sha(hex.map(|b| b.to_ascii_lowercase())))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored (see `parse`), so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The first 8 characters, for log lines.
    pub fn short(&self) -> &str {
        &self.as_str()[..8]
    }
}

impl std::fmt::Display for Sha {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for Sha {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Sha::parse(&value).ok_or_else(|| format!("not a 40-hex commit SHA: {value:?}"))
    }
}

impl From<Sha> for String {
    fn from(sha: Sha) -> String {
        sha.as_str().to_owned()
    }
}

/// What a forge said about one repository's watched branches in one check.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Head of every watched branch the forge answered for (exact names and pattern matches).
    pub heads: BTreeMap<String, Sha>,
    /// Watched branches that could not be checked; `branch: None` means the listing that
    /// serves the patterns failed.
    pub failures: Vec<BranchFailure>,
    /// True when the listing behind the patterns succeeded, so a pattern branch absent
    /// from `heads` really is gone. False when the repository has no patterns.
    pub listing_complete: bool,
}

#[derive(Debug, Clone)]
pub struct BranchFailure {
    pub branch: Option<String>,
    pub error: ForgeError,
}

/// Why a forge could not answer, by what the caller should do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForgeError {
    /// Back off: every request to this host waits until `until`.
    #[error("rate limited by {host} until {}", humantime::format_rfc3339_seconds(*.until))]
    RateLimited { host: String, until: SystemTime },
    /// Give up on this repository for now (401, 403 that is no rate limit): fix the token.
    #[error("{0}")]
    Auth(String),
    /// Give up on this repository or branch for now (404): renamed, or missing branch.
    #[error("{0}")]
    NotFound(String),
    /// Retry soon: 5xx, timeout, connection error (after the in-cycle retries).
    #[error("{0}")]
    Transient(String),
    /// The answer was not what the API promises (no SHA, bad JSON).
    #[error("{0}")]
    Malformed(String),
    /// The forge refused a write (400, 422): sending it again will not help.
    #[error("{0}")]
    Rejected(String),
    /// The server's TLS certificate was refused: a configuration problem (wrong host, a
    /// private CA missing from the trust store) or an interception. Not retried.
    #[error("{0}")]
    Certificate(String),
}

impl ForgeError {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ForgeError::RateLimited { .. } => "rate_limited",
            ForgeError::Auth(_) => "auth",
            ForgeError::NotFound(_) => "not_found",
            ForgeError::Transient(_) => "transient",
            ForgeError::Malformed(_) => "malformed",
            ForgeError::Rejected(_) => "rejected",
            ForgeError::Certificate(_) => "certificate",
        }
    }

    /// Errors that call for per-repository backoff across cycles.
    pub fn backs_off_repository(&self) -> bool {
        matches!(
            self,
            ForgeError::Auth(_) | ForgeError::NotFound(_) | ForgeError::Certificate(_)
        )
    }
}

/// Cumulative counters since start, for the per-cycle log line and metrics.
///
/// `requests` counts every request sent (HTTP attempts, retries included, and one per Git
/// ls-remote); `errors` those that failed (transport error or a 4xx/5xx status).
#[derive(Debug, Clone, Default)]
pub struct ForgeStats {
    pub requests: u64,
    pub not_modified: u64,
    pub errors: u64,
    /// Per API host (`host` or `host:port`) that sent rate-limit headers or is paused: last
    /// seen remaining quota and reset time.
    pub rate_limits: BTreeMap<String, RateLimitInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitInfo {
    pub remaining: Option<u64>,
    pub reset: Option<SystemTime>,
    /// Set while every request to the host is paused.
    pub paused_until: Option<SystemTime>,
}

/// Observer hook (metrics): called for every request and every rate-limit reading.
pub trait ForgeEvents: Send + Sync {
    /// `status` is the HTTP status code as text (`"200"`, `"304"`, …), `"error"` for a
    /// transport failure, or `"ok"` for a Git ls-remote that succeeded.
    fn request(&self, _host: &str, _status: &str) {}
    fn rate_limit(&self, _host: &str, _remaining: Option<u64>, _reset: Option<SystemTime>) {}
    /// A server's TLS certificate was refused (`host` or `host:port`).
    fn tls_error(&self, _host: &str) {}
    /// A 403/429 rate-limit answer arrived from `host` (a secondary limit, or the primary
    /// quota exhausted).
    fn rate_limited(&self, _host: &str) {}
}

/// Counts a refused certificate of the server at `url` (a clone's) in the process's
/// forge events (`sentry_tls_errors_total`).
pub fn count_tls_error(url: &str) {
    if let Some(http) = app::process_http() {
        http.tls_error(&git::host_of(url));
    }
}

/// Every forge client behind one cheap-to-clone handle (one per process).
#[derive(Clone)]
pub struct Forges {
    http: Arc<Http>,
}

impl Forges {
    /// Builds the one HTTP client (rustls, HTTP/2 allowed, connect timeout 10 s, request
    /// timeout `config.request_timeout`, Sentry's `User-Agent`, pooled connections).
    pub fn new(config: &Config) -> anyhow::Result<Forges> {
        let roots = tls::certificates(&config.ca_files)?;
        proxy::set_git_proxy(config.proxy.as_ref());
        let api_proxy = config
            .proxy
            .as_ref()
            .map(proxy::reqwest_proxy)
            .transpose()
            .map_err(|_| anyhow::anyhow!("cannot use proxy.url as the API client's proxy"))?;
        let mut http = Http::new(
            config.request_timeout,
            config.max_requests_per_host,
            roots,
            api_proxy,
        )
        .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
        // Per-repository CAs: per host, the top-level files and those of every repository
        // that talks to it; one client per distinct set. libgit2's trust is process-wide:
        // it gets the union of every file.
        let mut git_files = config.ca_files.clone();
        let mut per_host: BTreeMap<String, Vec<std::path::PathBuf>> = BTreeMap::new();
        for repo in &config.repositories {
            for file in &repo.ca_files {
                for host in tls::repository_hosts(repo) {
                    let files = per_host
                        .entry(host)
                        .or_insert_with(|| config.ca_files.clone());
                    if !files.contains(file) {
                        files.push(file.clone());
                    }
                }
                if !git_files.contains(file) {
                    git_files.push(file.clone());
                }
            }
        }
        let mut by_set: BTreeMap<Vec<std::path::PathBuf>, Vec<String>> = BTreeMap::new();
        for (host, mut files) in per_host {
            files.sort();
            by_set.entry(files).or_default().push(host);
        }
        for (files, hosts) in by_set {
            let roots = tls::certificates(&files)?;
            http = http
                .with_host_roots(hosts, roots)
                .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
        }
        tls::set_git_ca_files(&git_files);
        http.set_budget_limits(budget_limits(config));
        let http = Arc::new(http);
        app::set_process_http(&http);
        Ok(Forges { http })
    }

    /// Feeds request and rate-limit events to `events` (replaces any earlier observer).
    pub fn with_events(self, events: Arc<dyn ForgeEvents>) -> Self {
        self.http.set_events(events);
        self
    }

    /// `repo`'s client, prepared once (URLs, headers, patterns) for checks every cycle.
    pub fn watcher(&self, repo: &Arc<Repository>) -> Watcher {
        let repo = repo.clone();
        let client = match repo.monitor.repo_type {
            RepoType::Git => Ok(Client::Git),
            RepoType::Github => {
                github::GitHub::new(self.http.clone(), repo.clone()).map(Client::GitHub)
            }
            RepoType::Gitlab => {
                gitlab::GitLab::new(self.http.clone(), repo.clone()).map(Client::GitLab)
            }
        };
        Watcher(Arc::new(WatcherInner {
            http: self.http.clone(),
            patterns: repo.monitor.patterns().cloned().collect(),
            repo,
            client,
            matches: Mutex::default(),
        }))
    }

    /// Current heads of every watched branch of `repo`: a one-off [`Watcher::observe`].
    pub async fn observe(&self, repo: &Repository, cancel: &CancellationToken) -> Observation {
        self.watcher(&Arc::new(repo.clone())).observe(cancel).await
    }

    /// Head of any one branch (watched or not), for `sentry trigger` and webhooks.
    pub async fn branch_head(&self, repo: &Repository, branch: &str) -> Result<Sha, ForgeError> {
        let repo = Arc::new(repo.clone());
        let cancel = CancellationToken::new();
        match repo.monitor.repo_type {
            RepoType::Git => git::branch_head(self.http.clone(), repo, branch, &cancel).await,
            RepoType::Github => {
                github::GitHub::new(self.http.clone(), repo)?
                    .head(branch, &cancel)
                    .await
            }
            RepoType::Gitlab => {
                gitlab::GitLab::new(self.http.clone(), repo)?
                    .head(branch, &cancel)
                    .await
            }
        }
    }

    /// The full SHA of the commit `prefix` (7 to 39 hex characters) names in `repo`, for
    /// `sentry trigger --sha abc1234`.
    pub async fn resolve_commit(&self, repo: &Repository, prefix: &str) -> Result<Sha, ForgeError> {
        let repo = Arc::new(repo.clone());
        let cancel = CancellationToken::new();
        let prefix = prefix.to_ascii_lowercase();
        match repo.monitor.repo_type {
            RepoType::Git => git::commit(self.http.clone(), repo, &prefix, &cancel).await,
            RepoType::Github => {
                github::GitHub::new(self.http.clone(), repo)?
                    .commit(&prefix, &cancel)
                    .await
            }
            RepoType::Gitlab => {
                gitlab::GitLab::new(self.http.clone(), repo)?
                    .commit(&prefix, &cancel)
                    .await
            }
        }
    }

    /// Puts `status` on a commit of `repo`'s watched repository, with the monitor's
    /// token, through the shared HTTP layer (rate-limit pauses, per-host semaphore, writes
    /// spaced per the forge kind). Sent once; the caller retries.
    pub async fn post_status(
        &self,
        repo: &Arc<Repository>,
        status: &CommitStatus,
        cancel: &CancellationToken,
    ) -> Result<Posted, ForgeError> {
        let http = self.http.clone();
        match repo.monitor.repo_type {
            RepoType::Github => {
                github::GitHub::new(http, repo.clone())?
                    .post_status(status, cancel)
                    .await
            }
            RepoType::Gitlab => {
                gitlab::GitLab::new(http, repo.clone())?
                    .post_status(status, cancel)
                    .await
            }
            RepoType::Git => Err(ForgeError::Rejected(format!(
                "{}: plain Git hosts have no commit statuses",
                repo.name
            ))),
        }
    }

    /// For each of `watchers`, whether its heads are asked through batched GitHub GraphQL
    /// queries rather than REST (`github_lookup`; see `github::graphql::plan`).
    pub fn batched(&self, config: &Config, watchers: &[Watcher]) -> Vec<bool> {
        github::graphql::plan(config, watchers)
    }

    /// Current heads of every watched branch of `watchers` (those [`Forges::batched`]
    /// chose), through as few GraphQL queries as the batch limits allow; in their order.
    /// With `fallback`, a repository whose API host has no GraphQL API is asked through REST
    /// and flagged `true` (ask it through REST from now on).
    pub async fn observe_batched(
        &self,
        watchers: &[Watcher],
        fallback: bool,
        cancel: &CancellationToken,
    ) -> Vec<(Observation, bool)> {
        github::graphql::observe(watchers, fallback, cancel).await
    }

    /// Loads persisted ETag validators, dropping those of repositories `config` no longer
    /// has; returns how many were dropped.
    pub(crate) fn import_validators(
        &self,
        validators: validators::Validators,
        config: &Config,
    ) -> usize {
        self.http
            .import_validators(validators, |repo| config.repository(repo).is_some())
    }

    /// The ETag validators to persist, and the cache generation they are of.
    pub(crate) fn export_validators(&self) -> (u64, validators::Validators) {
        let generation = self.http.validators_generation();
        (generation, self.http.export_validators())
    }

    /// Changes whenever the validators would be persisted differently.
    pub(crate) fn validators_generation(&self) -> u64 {
        self.http.validators_generation()
    }

    /// What each request budget (API host and token) has spent and knows.
    pub(crate) fn budgets(&self) -> Vec<budget::BudgetSnapshot> {
        self.http.budgets()
    }

    /// The budget key (`host` or `host:port`) of `repo`'s API host; `None` for plain Git,
    /// which has no API.
    pub(crate) fn budget_host(repo: &Repository) -> Option<String> {
        kind::of(repo.monitor.repo_type).budget?;
        Some(http::host_key(repo.monitor.api_url.as_ref()?).to_owned())
    }

    /// The budget limits of API host `key` (`host` or `host:port`).
    pub(crate) fn budget_limits(&self, key: &str) -> budget::BudgetLimits {
        self.http.budget_limits(key)
    }

    /// Cumulative counters since start.
    pub fn stats(&self) -> ForgeStats {
        self.http.stats()
    }
}

/// The budget limits of every configured API host: its kind's defaults with the host's
/// `rate_limits:` entry over them.
fn budget_limits(config: &Config) -> std::collections::HashMap<String, budget::BudgetLimits> {
    let mut limits = std::collections::HashMap::new();
    for repo in &config.repositories {
        let (Some(api), Some(defaults)) = (
            &repo.monitor.api_url,
            kind::of(repo.monitor.repo_type).budget,
        ) else {
            continue;
        };
        limits
            .entry(http::host_key(api).to_owned())
            .or_insert(defaults);
    }
    for (host, o) in &config.rate_limits {
        let limit = limits
            .entry(host.clone())
            .or_insert(budget::BudgetLimits::GITHUB);
        limit.concurrency = o.concurrency.unwrap_or(limit.concurrency);
        limit.rest_points_per_minute = o
            .rest_points_per_minute
            .unwrap_or(limit.rest_points_per_minute);
        limit.graphql_points_per_minute = o
            .graphql_points_per_minute
            .unwrap_or(limit.graphql_points_per_minute);
        limit.window = o.window.unwrap_or(limit.window);
    }
    limits
}

/// What Sentry says about a unit on its commit, in forge-neutral words; each forge maps
/// the state to its own (GitLab has no `error`, GitHub no `canceled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusState {
    /// Deploying, or waiting to be tried again.
    Pending,
    Success,
    /// The commands failed or timed out.
    Failure,
    /// Sentry could not run the commands (the clone failed, shutdown).
    Error,
    /// A newer commit of the branch took the unit's place before it ran.
    Superseded,
}

impl StatusState {
    /// Whether nothing more will be posted for this commit after it (short of a restart).
    pub fn is_final(self) -> bool {
        matches!(self, StatusState::Success | StatusState::Failure)
    }
}

/// One commit status to post.
#[derive(Debug, Clone)]
pub struct CommitStatus {
    pub sha: Sha,
    /// The branch the commit was deployed from (GitLab's `ref`).
    pub branch: String,
    pub state: StatusState,
    /// GitHub's `context`, GitLab's `name`: `sentry/<group>` unless configured.
    pub context: String,
    /// Cut to the forge's limit by the forge's client.
    pub description: String,
    pub target_url: Option<String>,
}

/// What a forge did with a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    Created,
    /// The commit already had this state for this context (GitLab answers 400 to a repeat).
    AlreadySet,
}

/// `text` cut to at most `max` characters, ending in `…` when cut.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// One repository's forge client, built once by [`Forges::watcher`] and asked every cycle.
/// Cheap to clone.
#[derive(Clone)]
pub struct Watcher(Arc<WatcherInner>);

struct WatcherInner {
    http: Arc<Http>,
    repo: Arc<Repository>,
    patterns: Vec<BranchPattern>,
    /// The forge client, or why the repository's configuration cannot be asked at all.
    client: Result<Client, ForgeError>,
    /// The last listing and the branches of it the patterns matched: a listing answered
    /// from the ETag cache is the same pages, so it is not matched again.
    matches: Mutex<Option<Matches>>,
}

enum Client {
    Git,
    GitHub(github::GitHub),
    GitLab(gitlab::GitLab),
}

struct Matches {
    pages: Listing,
    heads: Vec<(String, Sha)>,
}

impl Watcher {
    /// Current heads of every watched branch (exact names and pattern matches). Never
    /// panics; errors are in `failures`. When `cancel` fires it returns promptly with what
    /// it has, the rest as `Transient` failures.
    pub async fn observe(&self, cancel: &CancellationToken) -> Observation {
        let inner = &*self.0;
        match &inner.client {
            Ok(Client::Git) => git::observe(inner.http.clone(), inner.repo.clone(), cancel).await,
            Ok(Client::GitHub(forge)) => self.observe_api(forge, cancel).await,
            Ok(Client::GitLab(forge)) => self.observe_api(forge, cancel).await,
            Err(error) => everything_failed(&inner.repo.monitor, error),
        }
    }

    /// How many requests one check is expected to send, for pacing: one per exact branch,
    /// and the pages of the last listing (one before the first listing). Plain Git: one
    /// ls-remote.
    pub fn expected_requests(&self) -> u64 {
        let inner = &*self.0;
        if matches!(inner.client, Ok(Client::Git)) {
            return 1;
        }
        let exact = inner.repo.monitor.exact_branches().count() as u64;
        let listing = if inner.patterns.is_empty() {
            0
        } else {
            inner
                .matches
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .map_or(1, |m| m.pages.len().max(1) as u64)
        };
        exact + listing
    }

    /// Checks the exact branches and the listing concurrently, within this task: the
    /// per-host semaphore bounds the requests, so nothing is gained by a task per branch.
    async fn observe_api<F: Forge>(&self, forge: &F, cancel: &CancellationToken) -> Observation {
        let monitor = &self.0.repo.monitor;
        let exact =
            join_all(monitor.exact_branches().map(|branch| async move {
                (branch.to_owned(), forge.head(branch, cancel).await)
            }));
        let listing = async {
            if self.0.patterns.is_empty() {
                None
            } else {
                Some(forge.list(&self.0.patterns, cancel).await)
            }
        };
        let (exact, listing) = tokio::join!(exact, listing);
        let listing = listing.map(|pages| pages.map(|pages| self.pattern_heads(pages)));
        assemble(exact, listing)
    }

    /// The listed branches the patterns match, matched again only when a page changed.
    fn pattern_heads(&self, pages: Listing) -> Vec<(String, Sha)> {
        let mut memo = self
            .0
            .matches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = memo.as_ref()
            && m.pages.len() == pages.len()
            && m.pages.iter().zip(&pages).all(|(a, b)| Arc::ptr_eq(a, b))
        {
            return m.heads.clone();
        }
        let heads: Vec<(String, Sha)> = pages
            .iter()
            .flat_map(|page| &page.branches)
            .filter(|(name, _)| self.0.patterns.iter().any(|p| p.matches(name)))
            .cloned()
            .collect();
        *memo = Some(Matches {
            pages,
            heads: heads.clone(),
        });
        heads
    }
}

/// A branch listing: its pages as the ETag cache holds them, shared, never copied.
pub(crate) type Listing = Vec<Arc<Page>>;

/// An API forge (GitHub, GitLab): the head of one branch, and a branch listing.
trait Forge: Clone + Send + Sync + 'static {
    fn head(
        &self,
        branch: &str,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Sha, ForgeError>> + Send;

    /// Every branch the forge lists that may match one of `patterns` (it may filter on
    /// the server, or not at all; the caller matches).
    fn list(
        &self,
        patterns: &[BranchPattern],
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Listing, ForgeError>> + Send;
}

/// Builds the observation from the exact-branch answers and the listed branches the
/// patterns match (when the repository has patterns).
fn assemble(
    exact: Vec<(String, Result<Sha, ForgeError>)>,
    listing: Option<Result<Vec<(String, Sha)>, ForgeError>>,
) -> Observation {
    let mut obs = Observation::default();
    match listing {
        Some(Ok(branches)) => {
            obs.listing_complete = true;
            obs.heads
                .extend(branches.into_iter().filter(|(name, _)| valid_listed(name)));
        }
        Some(Err(error)) => obs.failures.push(BranchFailure {
            branch: None,
            error,
        }),
        None => {}
    }
    for (name, result) in exact {
        match result {
            Ok(sha) => {
                obs.heads.insert(name, sha);
            }
            // The listing may have answered for it already (an exact name a pattern matches).
            Err(_) if obs.heads.contains_key(&name) => {}
            Err(error) => obs.failures.push(BranchFailure {
                branch: Some(name),
                error,
            }),
        }
    }
    obs
}

/// Whether a branch name from a forge's listing may be used. A name Git would refuse (a
/// control character could forge log lines or terminal output) is dropped, and logged
/// escaped.
fn valid_listed(name: &str) -> bool {
    let valid = crate::config::check_branch_name(name).is_ok();
    if !valid {
        tracing::debug!(
            branch = %name.escape_debug(),
            "ignoring a listed branch whose name is not a valid branch name"
        );
    }
    valid
}

/// The same error for every watched branch (and the listing, if there are patterns).
fn everything_failed(monitor: &Monitor, error: &ForgeError) -> Observation {
    let exact = monitor
        .exact_branches()
        .map(|b| (b.to_owned(), Err(error.clone())))
        .collect();
    let listing = monitor.patterns().next().map(|_| Err(error.clone()));
    assemble(exact, listing)
}

/// Characters left as they are in a path segment or query value: RFC 3986 "unreserved".
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes `text` as ONE path segment (`release/1.0` → `release%2F1.0`).
fn encode(text: &str) -> String {
    utf8_percent_encode(text, SEGMENT).to_string()
}

/// The API root without a trailing slash, query or fragment, ready for `/repos/…`.
fn api_base(repo: &Repository) -> Result<String, ForgeError> {
    let mut api =
        repo.monitor.api_url.clone().ok_or_else(|| {
            ForgeError::NotFound(format!("{}: no api_url is configured", repo.name))
        })?;
    api.set_query(None);
    api.set_fragment(None);
    Ok(api.as_str().trim_end_matches('/').to_owned())
}

fn parse_url(repo: &Repository, text: &str) -> Result<Url, ForgeError> {
    Url::parse(text).map_err(|e| {
        ForgeError::Malformed(format!("{}: cannot build a request URL: {e}", repo.name))
    })
}

/// A header value holding a secret: marked sensitive, so it is never printed.
fn secret_header(repo: &Repository, value: &str) -> Result<HeaderValue, ForgeError> {
    let mut value = HeaderValue::from_str(value).map_err(|_| {
        ForgeError::Auth(format!(
            "{}: the token contains characters that cannot be sent in an HTTP header",
            repo.name
        ))
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The secret parts of sensitive headers (`Bearer X` → `X`), to keep them out of messages.
fn secrets_of(headers: &reqwest::header::HeaderMap) -> Vec<String> {
    headers
        .values()
        .filter(|v| v.is_sensitive())
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split_ascii_whitespace().last())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The start of a body, printable and short, for "expected X, got Y" messages; a server
/// that echoes requests must not get a token into a message.
fn snippet(body: &[u8], secrets: &[String]) -> String {
    let mut text = String::from_utf8_lossy(body).into_owned();
    for secret in secrets {
        text = text.replace(secret.as_str(), "***");
    }
    let text: String = text
        .trim()
        .chars()
        .take(40)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("{text:?}")
}

/// GETs a URL whose answer is one SHA, through the ETag cache.
async fn fetch_sha(
    http: &Http,
    call: Call<'_>,
    parse: impl Fn(&[u8]) -> Option<Sha>,
    refused: impl Fn(StatusCode, &[u8]) -> ForgeError,
) -> Result<Sha, ForgeError> {
    let (repo, url, headers) = (call.repo, call.url.clone(), call.headers);
    match http.get(call).await? {
        Reply::Fresh { body, etag, .. } => {
            let sha = parse(&body).ok_or_else(|| {
                ForgeError::Malformed(format!(
                    "{repo}: expected a 40-hex commit SHA from {}, got {}",
                    url.path(),
                    snippet(&body, &secrets_of(headers))
                ))
            })?;
            http.remember(repo, &url, etag, Cached::Sha(sha.clone()));
            Ok(sha)
        }
        Reply::Cached(Cached::Sha(sha)) => Ok(sha),
        Reply::Cached(Cached::Page(_)) => Err(cache_confusion(repo)),
        Reply::Refused { status, body } => Err(refused(status, &body)),
    }
}

fn cache_confusion(repo: &str) -> ForgeError {
    ForgeError::Malformed(format!(
        "{repo}: a 304 answer replayed a cached value of the wrong kind"
    ))
}

/// How one forge's branch listing looks.
struct ListingFormat {
    /// The key of the SHA inside each item's `commit` object (`sha` or `id`).
    sha_key: &'static str,
    /// Whether GitLab's `x-next-page` may stand in for a `Link` header.
    x_next_page: bool,
}

/// Pages through a listing from `first`, following `rel="next"` links (or `x-next-page`)
/// exactly, each page through the ETag cache: a `304` replays the cached page and its next
/// link, so the following pages are requested conditionally too.
async fn walk_listing(
    http: &Http,
    template: Call<'_>,
    format: &ListingFormat,
    refused: impl Fn(StatusCode, &[u8]) -> ForgeError,
) -> Result<Listing, ForgeError> {
    const MAX_PAGES: usize = 1000;
    let repo = template.repo;
    let first = template.url.clone();
    let mut url = first.clone();
    let mut seen = HashSet::new();
    let mut pages = Vec::new();
    loop {
        if !seen.insert(url.as_str().to_owned()) || seen.len() > MAX_PAGES {
            return Err(ForgeError::Malformed(format!(
                "{repo}: the branch listing does not end (page links loop or exceed {MAX_PAGES} pages)"
            )));
        }
        let call = Call {
            url: url.clone(),
            ..template
        };
        let page = match http.get(call).await? {
            Reply::Fresh {
                body,
                headers,
                etag,
            } => {
                let page = Arc::new(parse_page(repo, &url, &first, &body, &headers, format)?);
                http.remember(repo, &url, etag, Cached::Page(page.clone()));
                page
            }
            Reply::Cached(Cached::Page(page)) => page,
            Reply::Cached(Cached::Sha(_)) => return Err(cache_confusion(repo)),
            Reply::Refused { status, body } => return Err(refused(status, &body)),
        };
        let next = page.next.clone();
        pages.push(page);
        match next {
            Some(next) => url = next,
            None => return Ok(pages),
        }
    }
}

fn parse_page(
    repo: &str,
    url: &Url,
    first: &Url,
    body: &[u8],
    headers: &reqwest::header::HeaderMap,
    format: &ListingFormat,
) -> Result<Page, ForgeError> {
    let malformed = |what: String| ForgeError::Malformed(format!("{repo}: branch listing {what}"));
    let items: Vec<serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| malformed(format!("is not a JSON array of branches ({e})")))?;
    let mut branches = Vec::with_capacity(items.len());
    for item in &items {
        let name = item.get("name").and_then(|n| n.as_str());
        let sha = item
            .get("commit")
            .and_then(|c| c.get(format.sha_key))
            .and_then(|s| s.as_str())
            .and_then(Sha::parse);
        match (name, sha) {
            (Some(name), Some(sha)) => branches.push((name.to_owned(), sha)),
            (Some(name), None) => {
                return Err(malformed(format!("has no valid commit SHA for {name:?}")));
            }
            (None, _) => return Err(malformed("has an item without a name".to_owned())),
        }
    }
    let next = match link_next(headers) {
        Some(link) => Some(
            url.join(&link)
                .map_err(|e| malformed(format!("has a bad next link {link:?}: {e}")))?,
        ),
        None if format.x_next_page => x_next_page(url, headers),
        None => None,
    };
    if let Some(next) = &next {
        if next.origin() != first.origin() {
            return Err(malformed(format!(
                "links to another host ({}); not following it with credentials",
                next.origin().ascii_serialization()
            )));
        }
    }
    Ok(Page { branches, next })
}

/// The target of `Link: <…>; rel="next"`, if any.
fn link_next(headers: &reqwest::header::HeaderMap) -> Option<String> {
    headers
        .get_all(reqwest::header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|value| {
            let mut rest = value;
            while let Some(open) = rest.find('<') {
                let close = open + rest[open..].find('>')?;
                let target = &rest[open + 1..close];
                let params_end = rest[close..].find('<').map_or(rest.len(), |i| close + i);
                let params = &rest[close + 1..params_end];
                let params = params.split(',').next().unwrap_or_default();
                let is_next = params.split(';').any(|param| {
                    let Some((key, value)) = param.split_once('=') else {
                        return false;
                    };
                    key.trim().eq_ignore_ascii_case("rel")
                        && value
                            .trim()
                            .trim_matches('"')
                            .split_ascii_whitespace()
                            .any(|rel| rel.eq_ignore_ascii_case("next"))
                });
                if is_next {
                    return Some(target.to_owned());
                }
                rest = &rest[params_end..];
            }
            None
        })
}

/// GitLab's `x-next-page: N` (empty on the last page): the current URL with `page=N`.
fn x_next_page(url: &Url, headers: &reqwest::header::HeaderMap) -> Option<Url> {
    let page = headers.get("x-next-page")?.to_str().ok()?.trim();
    if page.is_empty() || !page.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "page")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut next = url.clone();
    next.query_pairs_mut()
        .clear()
        .extend_pairs(pairs)
        .append_pair("page", page);
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_branches_with_invalid_names_are_dropped() {
        let sha = Sha::parse(&"a".repeat(40)).expect("sha");
        let listing = vec![
            ("release/1".to_owned(), sha.clone()),
            ("release/\u{1b}[31mred".to_owned(), sha.clone()),
            ("release/x\nINFO forged line".to_owned(), sha.clone()),
            ("release/..".to_owned(), sha),
        ];
        let obs = assemble(Vec::new(), Some(Ok(listing)));
        let names: Vec<&str> = obs.heads.keys().map(String::as_str).collect();
        assert_eq!(names, ["release/1"]);
    }
    use reqwest::header::HeaderMap;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn encodes_one_segment() {
        assert_eq!(encode("release/1.0"), "release%2F1.0");
        assert_eq!(encode("grp/sub/proj"), "grp%2Fsub%2Fproj");
        assert_eq!(encode("feat/ä b#?"), "feat%2F%C3%A4%20b%23%3F");
        assert_eq!(encode("a-b_c.d~e"), "a-b_c.d~e");
    }

    #[test]
    fn finds_next_link_among_others() {
        let h = headers(&[(
            "link",
            r#"<https://api.github.com/x?page=1>; rel="prev", <https://api.github.com/x?page=3>; rel="next", <https://api.github.com/x?page=9>; rel="last""#,
        )]);
        assert_eq!(
            link_next(&h).as_deref(),
            Some("https://api.github.com/x?page=3")
        );
        let h = headers(&[("link", r#"<https://a/x?page=1>; rel="first""#)]);
        assert_eq!(link_next(&h), None);
        let h = headers(&[("Link", "<https://a/x?page=2>; rel=next")]);
        assert_eq!(link_next(&h).as_deref(), Some("https://a/x?page=2"));
    }

    #[test]
    fn x_next_page_replaces_only_page() {
        let url = Url::parse("https://gl/api/v4/projects/a%2Fb/repository/branches?per_page=100&search=%5Erel&page=2").unwrap();
        let next = x_next_page(&url, &headers(&[("x-next-page", "3")])).unwrap();
        let pairs: Vec<(String, String)> = next
            .query_pairs()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("per_page".into(), "100".into()),
                ("search".into(), "^rel".into()),
                ("page".into(), "3".into())
            ]
        );
        assert_eq!(next.path(), url.path());
        assert!(x_next_page(&url, &headers(&[("x-next-page", "")])).is_none());
    }

    #[test]
    fn sha_is_40_hex_lowercased_and_round_trips_as_text() {
        let upper = "ABCDEF0123456789ABCDEF0123456789ABCDEF01";
        let sha = Sha::parse(&format!("  {upper}\n")).unwrap();
        assert_eq!(sha.as_str(), upper.to_ascii_lowercase());
        assert_eq!(sha.short(), "abcdef01");
        assert_eq!(format!("{sha:?}"), format!("Sha({:?})", sha.as_str()));
        let json = serde_json::to_string(&sha).unwrap();
        assert_eq!(serde_json::from_str::<Sha>(&json).unwrap(), sha);
        for bad in [
            "",
            "abc",
            &upper[..39],
            &format!("{upper}0"),
            &upper.replace('A', "g"),
        ] {
            assert!(Sha::parse(bad).is_none(), "{bad:?}");
        }
        assert!(serde_json::from_str::<Sha>("\"nope\"").is_err());
        // Multi-byte text of 40 bytes is not a SHA either.
        assert!(Sha::parse(&"é".repeat(20)).is_none());
    }

    #[test]
    fn listing_item_without_sha_is_malformed() {
        let url = Url::parse("https://a/x").unwrap();
        let format = ListingFormat {
            sha_key: "sha",
            x_next_page: false,
        };
        let body = br#"[{"name":"main","commit":{"sha":"nope"}}]"#;
        let err = parse_page("r", &url, &url, body, &HeaderMap::new(), &format).unwrap_err();
        assert!(matches!(err, ForgeError::Malformed(_)), "{err:?}");
        let err = parse_page("r", &url, &url, b"<html>", &HeaderMap::new(), &format).unwrap_err();
        assert!(matches!(err, ForgeError::Malformed(_)), "{err:?}");
    }

    #[test]
    fn snippets_hide_secrets() {
        let mut h = HeaderMap::new();
        let mut v = HeaderValue::from_static("Bearer tok123");
        v.set_sensitive(true);
        h.insert("authorization", v);
        h.insert("accept", HeaderValue::from_static("text/plain"));
        let secrets = secrets_of(&h);
        assert_eq!(secrets, ["tok123"]);
        assert_eq!(
            snippet(b"Authorization: Bearer tok123\n", &secrets),
            r#""Authorization: Bearer ***""#
        );
    }

    #[test]
    fn next_link_to_another_host_is_refused() {
        let url = Url::parse("https://a/x").unwrap();
        let format = ListingFormat {
            sha_key: "sha",
            x_next_page: false,
        };
        let h = headers(&[("link", r#"<https://evil.example/x?page=2>; rel="next""#)]);
        let err = parse_page("r", &url, &url, b"[]", &h, &format).unwrap_err();
        assert!(err.to_string().contains("another host"), "{err}");
    }
}
