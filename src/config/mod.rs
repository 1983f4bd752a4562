//! The configuration model: loading `sentry.yaml`, expanding `${VAR}`, and validating it
//! into checked types that the rest of Sentry can trust.
//!
//! Loading is two-phase. [`raw`] mirrors the file; [`validate`] checks it and resolves
//! durations, URLs, secrets and group references, gathering *every* problem with its path
//! (`repositories[1].group`) instead of stopping at the first. All YAML parsing lives in
//! [`parse_yaml`], the one place that knows about `serde_yaml`.

pub mod expand;
mod locate;
pub mod pod;
pub mod raw;
mod schema_keys;
mod ssh_url;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde::Serialize;

pub use expand::Env;
pub(crate) use validate::check_branch_name;

/// A validated configuration. Every field holds a checked value.
#[derive(Debug, Clone)]
pub struct Config {
    pub polling_interval: Duration,
    pub state_file: PathBuf,
    pub work_dir: PathBuf,
    pub shutdown_grace: Duration,
    pub audit_log: Option<PathBuf>,
    pub request_timeout: Duration,
    pub max_requests_per_host: usize,
    /// `rate_limits:` overrides of the request budget, per API host (`host` or `host:port`).
    pub rate_limits: BTreeMap<String, RateLimitOverride>,
    /// How often a repository whose webhooks arrive is polled; `polling_interval` unless set.
    pub webhook_poll_interval: Duration,
    /// Units deploying at once across all groups.
    pub max_concurrent_units: usize,
    pub pending_retry: PendingRetry,
    /// PEM bundles of extra certificate authorities: `tls.ca_file`, then `GIT_SSL_CAINFO`.
    /// Added to the system roots for the API client and for Git.
    pub ca_files: Vec<PathBuf>,
    /// `proxy:`; `None`: the environment's `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`.
    pub proxy: Option<ProxyConfig>,
    pub server: ServerConfig,
    pub webhooks: WebhookConfig,
    pub leader_election: LeaderElection,
    pub state: StateConfig,
    /// In the order of the file.
    pub groups: Vec<Group>,
    /// In the order of the file.
    pub repositories: Vec<Arc<Repository>>,
    /// Values masked in command output besides tokens and `deploy.env` secrets: every value
    /// the env file supplied, and the values of the variables named in `secret_env`.
    pub masked_values: Vec<SecretString>,
    /// How the heads of GitHub branches are asked for (`github_lookup`).
    pub github_lookup: GithubLookup,
}

/// `github_lookup:` — one REST request per branch, or GraphQL queries that batch many
/// repositories and branches (see `forge::github::graphql`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GithubLookup {
    /// GraphQL for an API host whose REST polling would use more than half of GitHub's
    /// secondary REST limit (900 points a minute); REST otherwise.
    #[default]
    Auto,
    Rest,
    Graphql,
}

/// A forward proxy for the API client, ls-remote and clones (`proxy:`).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// `http://` or `https://` URL; a password in it came from an environment variable.
    pub url: SecretString,
    /// The password of `url`, masked in command output.
    pub password: Option<SecretString>,
    /// Hosts reached directly (curl's `NO_PROXY` rules).
    pub no_proxy: Vec<String>,
}

/// One host's `rate_limits:` entry; unset fields keep the forge kind's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitOverride {
    pub concurrency: Option<usize>,
    pub rest_points_per_minute: Option<u32>,
    pub graphql_points_per_minute: Option<u32>,
    pub window: Option<Duration>,
}

/// Backoff for units that could not run: `initial`, doubling up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingRetry {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for PendingRetry {
    fn default() -> Self {
        PendingRetry {
            initial: Duration::from_secs(60),
            max: Duration::from_secs(30 * 60),
        }
    }
}

/// Lease leader election (`leader_election:`); off unless enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderElection {
    pub enabled: bool,
    pub lease_name: String,
    /// `None`: the namespace of the pod or the kubeconfig context.
    pub namespace: Option<String>,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for LeaderElection {
    fn default() -> Self {
        LeaderElection {
            enabled: false,
            lease_name: "sentry-leader".into(),
            namespace: None,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Where the state is kept (`state:`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StateConfig {
    /// `state_file`.
    #[default]
    File,
    /// A ConfigMap, written with `resourceVersion` preconditions.
    Kubernetes {
        configmap: String,
        namespace: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Webhooks on a listener of their own; `None`: on `listen`.
    pub webhook_listen: Option<SocketAddr>,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
    /// Bearer token for the status API and the dashboard; `None` leaves them open.
    pub read_token: Option<SecretString>,
    /// Where people reach Sentry, without a trailing slash; links point below it.
    pub public_url: Option<String>,
}

impl ServerConfig {
    /// The link for a group run, when `public_url` is set.
    pub fn run_url(&self, run_id: &str) -> Option<String> {
        self.public_url
            .as_ref()
            .map(|base| format!("{base}/runs/{run_id}"))
    }
}

/// Commit statuses for one repository (its own `report`, else its group's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub commit_status: bool,
    /// GitHub `context`, GitLab `name`.
    pub context: String,
}

/// A group's `report`, before each repository's own settings are laid over it.
#[derive(Debug, Clone, Default)]
pub struct GroupReport {
    pub commit_status: Option<bool>,
    pub context: Option<String>,
}

/// One `notify:` target of a group.
#[derive(Debug, Clone)]
pub struct NotifyTarget {
    pub kind: NotifyKind,
    /// A secret: webhook URLs carry their own credentials (Slack's do).
    pub url: SecretString,
    /// Signs webhook bodies.
    pub secret: Option<SecretString>,
    pub on: Vec<NotifyEvent>,
    /// `groups.<name>.notify[<i>]`: how logs name the target, never by its URL.
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyKind {
    Webhook,
    Slack,
}

impl NotifyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyKind::Webhook => "webhook",
            NotifyKind::Slack => "slack",
        }
    }
}

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyEvent {
    /// A group run ended and not every unit succeeded.
    Failure,
    /// A group run succeeded after the group's previous run (in this process) failed.
    Recovery,
    /// A group run succeeded.
    Success,
    /// A group run started.
    Started,
}

impl NotifyEvent {
    pub const ALL: [NotifyEvent; 4] = [
        NotifyEvent::Failure,
        NotifyEvent::Recovery,
        NotifyEvent::Success,
        NotifyEvent::Started,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::Failure => "failure",
            NotifyEvent::Recovery => "recovery",
            NotifyEvent::Success => "success",
            NotifyEvent::Started => "started",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct WebhookConfig {
    pub github_secret: Option<SecretString>,
    pub gitlab_token: Option<SecretString>,
}

impl WebhookConfig {
    /// The configured secret of a forge kind's webhook endpoint; `None`: not served.
    pub fn secret(&self, kind: RepoType) -> Option<&SecretString> {
        match kind {
            RepoType::Github => self.github_secret.as_ref(),
            RepoType::Gitlab => self.gitlab_token.as_ref(),
            RepoType::Git => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Parallel,
    Sequential,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployScope {
    Changed,
    All,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub execution_strategy: Strategy,
    /// Units at once with `parallel` (default 4); `None` with `sequential`.
    pub max_parallel: Option<usize>,
    pub continue_on_error: bool,
    pub global_timeout: Duration,
    pub deploy_scope: DeployScope,
    pub report: GroupReport,
    pub notify: Vec<NotifyTarget>,
    pub executor: ExecutorKind,
}

/// `groups.<name>.executor`: where the group's units run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ExecutorKind {
    /// Child processes of Sentry.
    #[default]
    Local,
    /// One Kubernetes Job per unit.
    Kubernetes(Box<KubernetesExecutorConfig>),
}

/// The checked `executor: {kind: kubernetes, …}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesExecutorConfig {
    pub namespace: String,
    pub image: String,
    pub service_account_name: Option<String>,
    /// The ConfigMap (in `namespace`) the pod reads the configuration from.
    pub config_map: String,
    pub node_selector: BTreeMap<String, String>,
    /// Container resource requests and limits, by resource name.
    pub requests: BTreeMap<String, String>,
    pub limits: BTreeMap<String, String>,
    /// Names of Secrets handed to the container with `envFrom` (never their values).
    pub env_from_secrets: Vec<String>,
    /// Tolerations, mounted Secrets and ConfigMaps, variables from Secret keys.
    pub pod: pod::PodTemplate,
    pub start_timeout: Duration,
    pub keep_failed: Duration,
    pub ttl_after_finished: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RepoType {
    Github,
    Gitlab,
    Git,
}

impl RepoType {
    /// As written in `repo_type:`.
    pub fn as_str(self) -> &'static str {
        crate::forge::kind::of(self).name
    }
}

/// `deploy.inherit_env`: which of Sentry's own environment variables commands get.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum InheritEnv {
    /// All of them except those holding Sentry's own secrets (see [`Config::own_secrets`]).
    #[default]
    AllButSecrets,
    /// Only [`InheritEnv::BASIC`] and these names (empty: `inherit_env: false`).
    Only(Vec<String>),
}

impl InheritEnv {
    /// What a shell needs to behave; always inherited.
    pub const BASIC: [&'static str; 7] = ["PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR"];
}

#[derive(Debug, Clone)]
pub struct Repository {
    pub name: String,
    pub group: String,
    pub monitor: Monitor,
    pub deploy: Deploy,
    pub report: Report,
    /// `tls.ca_file` of this repository: trusted for its hosts besides `Config::ca_files`.
    pub ca_files: Vec<PathBuf>,
}

impl Repository {
    /// The branch a manual run deploys when none is given: the first exact watched branch.
    pub fn default_branch(&self) -> Option<&str> {
        self.monitor.exact_branches().next()
    }
}

/// Why a manual selection names nothing deployable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("unknown group {group:?}; valid groups: {}", .valid.join(", "))]
    UnknownGroup { group: String, valid: Vec<String> },
    #[error("group {0:?} has no repositories")]
    EmptyGroup(String),
    #[error(
        "unknown repository {}; valid repositories: {}",
        .unknown.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", "),
        .valid.join(", ")
    )]
    UnknownRepositories {
        unknown: Vec<String>,
        valid: Vec<String>,
    },
    #[error("give --repo NAME (repeatable) or --group NAME")]
    NothingSelected,
}

#[derive(Debug, Clone)]
pub struct Monitor {
    /// As configured (after expansion).
    pub repo_url: String,
    pub repo_type: RepoType,
    /// API root for `github`/`gitlab`; `None` for `git`.
    pub api_url: Option<url::Url>,
    /// `owner/repo` (GitHub) or `group/sub/project` (GitLab); empty for `git`.
    pub project_path: String,
    pub branches: Vec<BranchSpec>,
    pub auth: Auth,
}

impl Monitor {
    pub fn exact_branches(&self) -> impl Iterator<Item = &str> {
        self.branches.iter().filter_map(|b| match b {
            BranchSpec::Exact(name) => Some(name.as_str()),
            BranchSpec::Pattern(_) => None,
        })
    }

    pub fn patterns(&self) -> impl Iterator<Item = &BranchPattern> {
        self.branches.iter().filter_map(|b| match b {
            BranchSpec::Pattern(p) => Some(p),
            BranchSpec::Exact(_) => None,
        })
    }

    /// Whether `branch` is watched, exactly or through a pattern.
    pub fn watches(&self, branch: &str) -> bool {
        self.branches.iter().any(|b| b.matches(branch))
    }
}

#[derive(Debug, Clone)]
pub enum BranchSpec {
    Exact(String),
    Pattern(BranchPattern),
}

impl BranchSpec {
    pub fn matches(&self, branch: &str) -> bool {
        match self {
            BranchSpec::Exact(name) => name == branch,
            BranchSpec::Pattern(p) => p.matches(branch),
        }
    }
}

/// A glob over branch names: `*` stays within one `/` segment, `**` crosses them.
#[derive(Debug, Clone)]
pub struct BranchPattern {
    pub glob: String,
    matcher: globset::GlobMatcher,
}

impl BranchPattern {
    pub fn new(glob: &str) -> Result<Self, globset::Error> {
        let matcher = globset::GlobBuilder::new(glob)
            .literal_separator(true)
            .backslash_escape(true)
            .build()?
            .compile_matcher();
        Ok(BranchPattern {
            glob: glob.to_owned(),
            matcher,
        })
    }

    pub fn matches(&self, branch: &str) -> bool {
        self.matcher.is_match(branch)
    }

    /// The literal text before the first glob character, for server-side filtering.
    pub fn literal_prefix(&self) -> &str {
        let end = self
            .glob
            .find(['*', '?', '[', '{', '\\'])
            .unwrap_or(self.glob.len());
        &self.glob[..end]
    }

    pub fn is_pattern(text: &str) -> bool {
        text.contains(['*', '?', '['])
    }
}

#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub username: Option<String>,
    pub token: Option<SecretString>,
    /// Set for SSH URLs (`ssh://`, `user@host:path`) only.
    pub ssh: Option<Arc<SshAuth>>,
    /// `auth.github_app`: installation tokens minted at run time instead of `token`.
    pub github_app: Option<Arc<GithubApp>>,
}

impl Auth {
    /// Whether requests carry credentials (a token, or a GitHub App's installation token).
    pub fn has_credentials(&self) -> bool {
        self.token.is_some() || self.github_app.is_some()
    }
}

/// A GitHub App that authenticates for one repository (`auth.github_app`), with the API
/// and the repository it asks about resolved from the repository's URL.
#[derive(Debug, Clone)]
pub struct GithubApp {
    pub app_id: u64,
    /// `None`: found from the repository (`GET /repos/{owner}/{repo}/installation`).
    pub installation_id: Option<u64>,
    pub private_key_file: PathBuf,
    pub key: crate::forge::app::AppKey,
    /// The API root, without a trailing slash (`https://api.github.com`, `https://HOST/api/v3`).
    pub api_url: String,
    /// `owner/repo`.
    pub project: String,
}

/// How to reach one SSH remote: the user (from the URL, else `auth.username`, else
/// `git`), its host and port for the host-key check, the deploy key and the known_hosts
/// file the host key must be in.
#[derive(Debug, Clone)]
pub struct SshAuth {
    pub user: String,
    pub host: String,
    pub port: u16,
    /// `auth.ssh_key_file`; `None`: the SSH agent's keys.
    pub key_file: Option<PathBuf>,
    /// The value of the variable `auth.ssh_key_passphrase_env` names.
    pub passphrase: Option<SecretString>,
    /// `ssh.known_hosts_file`, else `~/.ssh/known_hosts`.
    pub known_hosts: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Deploy {
    pub qa_repo_url: String,
    pub qa_repo_branch: String,
    pub repo_type: RepoType,
    pub auth: Auth,
    pub project_name: String,
    pub commands: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Names in `env` whose values are masked: `deploy.secret_env` and the values written
    /// as a single `${VAR}` reference.
    pub secret_env: std::collections::BTreeSet<String>,
    /// What commands get of Sentry's own environment.
    pub inherit_env: InheritEnv,
    pub timeout: Option<Duration>,
    pub retries: u32,
    pub shell: String,
}

impl Config {
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    pub fn repository(&self, name: &str) -> Option<&Repository> {
        self.repositories
            .iter()
            .map(Arc::as_ref)
            .find(|r| r.name == name)
    }

    pub fn repositories_in<'a>(&'a self, group: &'a str) -> impl Iterator<Item = &'a Repository> {
        self.repositories
            .iter()
            .map(Arc::as_ref)
            .filter(move |r| r.group == group)
    }

    /// Every secret value in the configuration, for masking command output: tokens,
    /// webhook secrets, the `deploy.env` values marked secret, every env-file value and the
    /// variables named in the top-level `secret_env`.
    pub fn secrets(&self) -> Vec<SecretString> {
        let secret_env = self.repositories.iter().flat_map(|r| {
            r.deploy
                .secret_env
                .iter()
                .filter_map(|name| r.deploy.env.get(name))
                .map(|value| SecretString::from(value.as_str()))
        });
        self.own_secrets()
            .into_iter()
            .chain(secret_env)
            .chain(self.masked_values.iter().cloned())
            .collect()
    }

    /// The secrets Sentry itself uses — forge tokens, webhook secrets, notification URLs
    /// and secrets — which QA commands never inherit from its environment.
    pub fn own_secrets(&self) -> Vec<SecretString> {
        let auths = self
            .repositories
            .iter()
            .flat_map(|r| [&r.monitor.auth, &r.deploy.auth]);
        let passphrases = auths
            .clone()
            .filter_map(|a| a.ssh.as_ref().and_then(|s| s.passphrase.clone()));
        auths
            .filter_map(|a| a.token.clone())
            .chain(passphrases)
            .chain(self.proxy.as_ref().and_then(|p| p.password.clone()))
            .chain(self.webhooks.github_secret.clone())
            .chain(self.webhooks.gitlab_token.clone())
            .chain(self.server.read_token.clone())
            .chain(self.groups.iter().flat_map(|g| &g.notify).flat_map(|t| {
                [Some(t.url.clone()), t.secret.clone()]
                    .into_iter()
                    .flatten()
            }))
            .collect()
    }

    /// The repositories a manual run names: every repository of `group`, or the named
    /// ones; in configuration order, each once.
    pub fn select(
        &self,
        names: &[String],
        group: Option<&str>,
    ) -> Result<Vec<&Repository>, SelectError> {
        if let Some(group) = group {
            if self.group(group).is_none() {
                return Err(SelectError::UnknownGroup {
                    group: group.to_owned(),
                    valid: self.groups.iter().map(|g| g.name.clone()).collect(),
                });
            }
            let repos: Vec<&Repository> = self
                .repositories
                .iter()
                .map(Arc::as_ref)
                .filter(|r| r.group == group)
                .collect();
            if repos.is_empty() {
                return Err(SelectError::EmptyGroup(group.to_owned()));
            }
            return Ok(repos);
        }
        let unknown: Vec<String> = names
            .iter()
            .filter(|name| self.repository(name).is_none())
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(SelectError::UnknownRepositories {
                unknown,
                valid: self.repositories.iter().map(|r| r.name.clone()).collect(),
            });
        }
        if names.is_empty() {
            return Err(SelectError::NothingSelected);
        }
        Ok(self
            .repositories
            .iter()
            .map(Arc::as_ref)
            .filter(|r| names.contains(&r.name))
            .collect())
    }

    pub fn watched_branch_count(&self) -> usize {
        self.repositories
            .iter()
            .map(|r| r.monitor.branches.len())
            .sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

/// One finding about the configuration, with the path of the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Like `repositories[2].deploy.commands`; empty for the document as a whole.
    pub path: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl Diagnostic {
    pub fn error(path: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            path: path.into(),
            line: None,
            column: None,
            message: message.into(),
        }
    }

    pub fn warning(path: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(path, message)
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, "{line}:{column}: ")?;
        }
        write!(f, "{severity}: ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// The outcome of loading: a configuration when there were no errors, and every
/// diagnostic (errors and warnings) either way.
#[derive(Debug)]
pub struct Loaded {
    pub config: Option<Config>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Why a configuration could not be used at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: configuration is invalid ({count} error(s)):\n{list}")]
    Invalid {
        path: PathBuf,
        count: usize,
        list: String,
    },
}

/// Parses and validates configuration text. Never panics, whatever the input.
pub fn load_str(text: &str, env: &Env) -> Loaded {
    let mut diagnostics = Vec::new();
    let config = match parse_yaml(text) {
        Ok(value) => validate::validate(&value, env, &mut diagnostics),
        Err(diag) => {
            diagnostics.push(diag);
            None
        }
    };
    locate::add_locations(text, &mut diagnostics);
    // In file order, as a reader and an editor go through them; problems without a place
    // (unset variables found after parsing) last; errors before warnings on one spot.
    diagnostics.sort_by_key(|d| {
        (
            d.line.is_none(),
            d.line,
            d.column,
            std::cmp::Reverse(d.severity),
        )
    });
    let config = config.filter(|_| !diagnostics.iter().any(Diagnostic::is_error));
    Loaded {
        config,
        diagnostics,
    }
}

/// Reads, parses and validates a config file; invalid content becomes [`LoadError::Invalid`].
pub fn load_file(path: &Path, env: &Env) -> Result<(Config, Vec<Diagnostic>), LoadError> {
    let text = read_file(path)?;
    let loaded = load_str(&text, env);
    match loaded.config {
        Some(config) => Ok((config, loaded.diagnostics)),
        None => {
            let errors: Vec<String> = loaded
                .diagnostics
                .iter()
                .filter(|d| d.is_error())
                .map(|d| format!("  {d}"))
                .collect();
            Err(LoadError::Invalid {
                path: path.to_owned(),
                count: errors.len(),
                list: errors.join("\n"),
            })
        }
    }
}

/// The largest config file Sentry reads; anything bigger is a mistake, not a config.
const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

pub fn read_file(path: &Path) -> Result<String, LoadError> {
    let read_error = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_error)?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(read_error(std::io::Error::other(format!(
            "file is {len} bytes; the limit is {MAX_CONFIG_BYTES}"
        ))));
    }
    let bytes = std::fs::read(path).map_err(read_error)?;
    String::from_utf8(bytes).map_err(|_| {
        read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "file is not valid UTF-8",
        ))
    })
}

/// The one place that parses YAML (serde_yaml is deprecated upstream; swapping it out
/// should touch only this function and [`from_value`]).
pub fn parse_yaml(text: &str) -> Result<serde_yaml::Value, Diagnostic> {
    if let Some((line, column)) = too_deep(text) {
        return Err(Diagnostic {
            line: Some(line),
            column: Some(column),
            ..Diagnostic::error(
                "",
                format!("YAML syntax: collections nested deeper than {MAX_FLOW_DEPTH} levels"),
            )
        });
    }
    serde_yaml::from_str::<serde_yaml::Value>(text).map_err(|e| {
        let location = e.location();
        let message = e.to_string();
        // serde_yaml appends " at line L column C"; we report those separately.
        let message = match message.find(" at line ") {
            Some(i) if location.is_some() => message[..i].to_owned(),
            _ => message,
        };
        Diagnostic {
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            ..Diagnostic::error("", format!("YAML syntax: {message}"))
        }
    })
}

/// serde_yaml refuses documents nested deeper than 128 levels, but only after its parser has
/// read them, and that parser takes time quadratic in the depth of flow collections (`[[[…`):
/// a 600 KB file took seconds, a 16 MiB one would take hours. Deeper nesting is refused first.
const MAX_FLOW_DEPTH: usize = 128;

/// Line and column (1-based) where flow collections (`[`, `{`) outside quotes and comments
/// first nest deeper than [`MAX_FLOW_DEPTH`]. Linear; errs towards not refusing.
fn too_deep(text: &str) -> Option<(usize, usize)> {
    let (mut depth, mut line, mut column) = (0usize, 1usize, 0usize);
    let mut quote: Option<char> = None;
    let mut previous = '\n';
    // The last character that is not whitespace on this line (`\n` at its start).
    let mut last = '\n';
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        column += 1;
        match (quote, c) {
            (_, '\n') => {
                line += 1;
                column = 0;
                if depth == 0 {
                    quote = None;
                }
            }
            (Some('"'), '\\') => {
                if chars.next() == Some('\n') {
                    line += 1;
                    column = 0;
                } else {
                    column += 1;
                }
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') if !previous.is_alphanumeric() => quote = Some(c),
            (None, '#') if previous.is_whitespace() => {
                for rest in chars.by_ref() {
                    if rest == '\n' {
                        line += 1;
                        column = 0;
                        break;
                    }
                }
                previous = '\n';
                last = '\n';
                continue;
            }
            // Outside flow collections a bracket opens one only where a value starts.
            (None, '[' | '{') if depth > 0 || matches!(last, '\n' | ':' | '-' | '?') => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Some((line, column));
                }
            }
            (None, ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        previous = c;
        if c == '\n' {
            last = '\n';
        } else if !c.is_whitespace() {
            last = c;
        }
    }
    None
}

/// Typed extraction from a parsed value; on failure, the path inside the value and a message.
fn from_value<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        (path, e.into_inner().to_string())
    })
}

/// The JSON Schema of the configuration file, as shipped in `sentry.schema.json`.
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(raw::RawConfig);
    schema.to_value()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_flow_nesting_is_refused_before_parsing() {
        let deep = format!("groups: {}{}", "[".repeat(5000), "]".repeat(5000));
        let diag = parse_yaml(&deep).unwrap_err();
        assert!(diag.message.contains("nested deeper"), "{diag}");
        assert_eq!(
            (diag.line, diag.column),
            (Some(1), Some(8 + MAX_FLOW_DEPTH + 1))
        );
        let maps = format!("a: {}1{}", "{b: ".repeat(200), "}".repeat(200));
        assert!(parse_yaml(&maps).is_err());
    }

    #[test]
    fn brackets_in_quotes_and_comments_do_not_count() {
        let many = "[".repeat(300);
        let text = format!(
            "a: '{many}'\nb: \"{many}\\\"{many}\"\n# {many}\nc: don't {many}\nd: [1, [2]]\n"
        );
        assert_eq!(too_deep(&text), None);
        assert!(parse_yaml("a: [[[1]]]\nb: {c: {d: [e]}}\n").is_ok());
    }
}
