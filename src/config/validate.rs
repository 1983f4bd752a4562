//! From the parsed document to a checked [`Config`], gathering every problem on the way.
//!
//! Each section (the top level, each group, each repository) is extracted on its own, so
//! a wrong type in one repository still lets every other one be checked. Each string is
//! expanded (`${VAR}`) here, field by field, except `deploy.commands`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde_yaml::Value as Yaml;

use super::GithubLookup;
use super::expand::{self, Env, ExpandError};
use super::raw::{
    RawAuth, RawConfig, RawDeploy, RawDuration, RawExecutor, RawGithubApp, RawGroup, RawInheritEnv,
    RawMonitor, RawNotify, RawPendingRetry, RawProxy, RawRateLimit, RawReport, RawRepository,
    RawSsh, RawTls,
};
use super::schema_keys::{check_unknown_keys, suggest};
use super::ssh_url;
use super::{
    Auth, BranchPattern, BranchSpec, Config, Deploy, DeployScope, Diagnostic, ExecutorKind,
    GithubApp, Group, GroupReport, InheritEnv, KubernetesExecutorConfig, Monitor, NotifyEvent,
    NotifyKind, NotifyTarget, PendingRetry, ProxyConfig, RateLimitOverride, RepoType, Report,
    Repository, ServerConfig, SshAuth, Strategy, WebhookConfig, from_value,
};
#[cfg(test)]
use super::{LeaderElection, StateConfig};
use crate::forge::app::AppKey;
use crate::forge::kind;

/// `auth.github_app` as read, before the repository's URL says which API it is for.
struct AppParts {
    /// Its config path, for messages.
    path: String,
    app_id: u64,
    installation_id: Option<u64>,
    private_key_file: PathBuf,
    key: AppKey,
}

/// Durations beyond this are a typo (an hour count written as seconds, say), not a plan.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_RETRIES: i64 = 10;

pub(super) fn validate(doc: &Yaml, env: &Env, out: &mut Vec<Diagnostic>) -> Option<Config> {
    let Some(top) = doc.as_mapping() else {
        let what = if doc.is_null() {
            "the file is empty"
        } else {
            "the top level must be a mapping"
        };
        out.push(Diagnostic::error(
            "",
            format!("{what}; expected keys such as `groups:` and `repositories:`"),
        ));
        return None;
    };
    check_unknown_keys(doc, out);
    let errors = out.iter().filter(|d| d.is_error()).count();
    let mut cx = Checker {
        env,
        out,
        errors,
        referenced_groups: Vec::new(),
        allow_insecure_http: false,
        known_hosts: Err(None),
        http_proxy: None,
    };

    let mut rest = top.clone();
    let groups_value = rest.remove("groups");
    let repos_value = rest.remove("repositories");
    let mut raw: RawConfig = cx.extract("", Yaml::Mapping(rest)).unwrap_or_default();
    cx.allow_insecure_http = raw.allow_insecure_http.unwrap_or(false);
    cx.known_hosts = cx.known_hosts(raw.ssh.take().unwrap_or_default());
    cx.http_proxy = match &raw.proxy {
        Some(p) if p.url.is_some() => Some("proxy.url"),
        _ => ["http_proxy", "HTTP_PROXY"]
            .into_iter()
            .find(|v| cx.env.get(v).is_some_and(|x| !x.is_empty())),
    };

    let (groups, group_names) = cx.groups(groups_value);
    let repositories = cx.repositories(repos_value, &group_names, &groups);

    for name in &group_names {
        if !cx.referenced_groups.contains(name) {
            cx.warn(format!("groups.{name}"), "no repository uses this group");
        }
    }
    cx.top_level(raw, groups, repositories)
}

struct Checker<'a> {
    env: &'a Env,
    out: &'a mut Vec<Diagnostic>,
    /// Errors in `out`, kept as they are pushed: counting them on every check made
    /// validation quadratic in the number of diagnostics.
    errors: usize,
    /// Groups named by repositories, valid or not, so that a broken repository does not
    /// also make its group look unused.
    referenced_groups: Vec<String>,
    /// `allow_insecure_http`: a token over plain http is then a warning, not an error.
    allow_insecure_http: bool,
    /// The known_hosts file for SSH remotes, or why there is none (`None`: reported at
    /// `ssh.known_hosts_file` already).
    known_hosts: Result<PathBuf, Option<String>>,
    /// Where a proxy for plain-http Git comes from (`proxy.url`, `HTTP_PROXY`), which
    /// libgit2 cannot honour.
    http_proxy: Option<&'static str>,
}

impl Checker<'_> {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.out.push(Diagnostic::error(path, message));
        self.errors += 1;
    }

    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.out.push(Diagnostic::warning(path, message));
    }

    fn errors(&self) -> usize {
        self.errors
    }

    fn extract<T: serde::de::DeserializeOwned>(&mut self, path: &str, value: Yaml) -> Option<T> {
        match from_value::<T>(value) {
            Ok(v) => Some(v),
            Err((inner, message)) => {
                let full = match (path.is_empty(), inner.is_empty()) {
                    (_, true) => path.to_owned(),
                    (true, false) => inner,
                    (false, false) => format!("{path}.{inner}"),
                };
                self.error(full, message);
                None
            }
        }
    }

    /// Expands `${VAR}` in one field; an unset variable is reported with the field's path.
    fn expand(&mut self, path: &str, value: &str) -> Option<String> {
        match expand::expand(value, self.env) {
            Ok(v) => Some(v),
            Err(errors) => {
                for e in errors {
                    let hint = match &e {
                        ExpandError::Unset(_) => {
                            " (set it, put it in the env file, or write `${NAME:-default}`)"
                        }
                        _ => "",
                    };
                    self.error(path, format!("{e}{hint}"));
                }
                None
            }
        }
    }

    fn required<T>(&mut self, path: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.error(path, "required field is missing");
        }
        value
    }

    /// A required, expanded, non-empty string.
    fn required_text(&mut self, path: &str, value: Option<String>) -> Option<String> {
        let value = self.required(path, value)?;
        let value = self.expand(path, &value)?;
        if value.trim().is_empty() {
            self.error(path, "must not be empty");
            return None;
        }
        Some(value)
    }

    /// `tls.ca_file` and `GIT_SSL_CAINFO`: each must be a readable PEM file holding at least
    /// one certificate, so that a wrong path fails at start, not at the first clone.
    fn ca_files(&mut self, tls: RawTls) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let configured = self
            .optional_text("tls.ca_file", tls.ca_file)
            .filter(|p| !p.is_empty());
        let from_env = self.env.get("GIT_SSL_CAINFO").filter(|p| !p.is_empty());
        for (path, file) in [
            ("tls.ca_file".to_owned(), configured),
            ("GIT_SSL_CAINFO (environment)".to_owned(), from_env),
        ] {
            let Some(file) = file else { continue };
            if let Some(file) = self.ca_file(&path, file) {
                if !files.contains(&file) {
                    files.push(file);
                }
            }
        }
        files
    }

    /// A readable PEM file holding at least one certificate, reported at `path` otherwise.
    fn ca_file(&mut self, path: &str, file: String) -> Option<PathBuf> {
        match std::fs::read(&file) {
            Ok(bytes) if contains_pem_certificate(&bytes) => Some(PathBuf::from(file)),
            Ok(_) => {
                self.error(
                    path,
                    format!("{file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
                );
                None
            }
            Err(e) => {
                self.error(path, format!("cannot read {file}: {e}"));
                None
            }
        }
    }

    fn optional_text(&mut self, path: &str, value: Option<String>) -> Option<String> {
        value.and_then(|v| self.expand(path, &v))
    }

    fn duration(&mut self, path: &str, value: Option<RawDuration>, default: Duration) -> Duration {
        value
            .and_then(|v| self.parse_duration(path, v))
            .unwrap_or(default)
    }

    fn parse_duration(&mut self, path: &str, value: RawDuration) -> Option<Duration> {
        let parsed = match value {
            RawDuration::Seconds(s) if s < 0 => {
                Err(format!("{s} is negative; durations must be positive"))
            }
            RawDuration::Seconds(s) => Ok(Duration::from_secs(s.unsigned_abs())),
            RawDuration::Text(text) => {
                let text = self.expand(path, &text)?;
                let trimmed = text.trim();
                if trimmed.starts_with('-') {
                    Err(format!(
                        "\"{trimmed}\" is negative; durations must be positive"
                    ))
                } else if let Ok(secs) = trimmed.parse::<u64>() {
                    Ok(Duration::from_secs(secs))
                } else {
                    humantime::parse_duration(trimmed)
                        .map_err(|e| format!("\"{trimmed}\" is not a duration ({e}); write integer seconds or text such as \"90s\", \"15m\", \"1h\""))
                }
            }
        };
        match parsed {
            Ok(d) if d.is_zero() => self.error(path, "must be greater than zero"),
            Ok(d) if d > MAX_DURATION => self.error(
                path,
                format!(
                    "{} is longer than the limit of 7 days",
                    humantime::format_duration(d)
                ),
            ),
            Ok(d) => return Some(d),
            Err(message) => self.error(path, message),
        }
        None
    }

    fn groups(&mut self, value: Option<Yaml>) -> (Vec<Group>, Vec<String>) {
        let mut groups = Vec::new();
        let mut names = Vec::new();
        let map = match value {
            None | Some(Yaml::Null) => {
                self.error(
                    "groups",
                    "no groups are defined; every repository needs a `group` from here",
                );
                return (groups, names);
            }
            Some(Yaml::Mapping(map)) => map,
            Some(_) => {
                self.error("groups", "must be a mapping of group name to its settings");
                return (groups, names);
            }
        };
        for (key, value) in map {
            let Some(name) = key.as_str().map(str::to_owned) else {
                self.error("groups", "group names must be strings");
                continue;
            };
            let path = format!("groups.{name}");
            check_name(self, &path, &name, "group");
            names.push(name.clone());
            let raw: Option<RawGroup> = if value.is_null() {
                Some(RawGroup::default())
            } else {
                self.extract(&path, value)
            };
            if let Some(raw) = raw {
                if let Some(group) = self.group(&path, name, raw) {
                    groups.push(group);
                }
            }
        }
        (groups, names)
    }

    fn group(&mut self, path: &str, name: String, raw: RawGroup) -> Option<Group> {
        let before = self.errors();
        let strategy_path = format!("{path}.execution_strategy");
        let execution_strategy = match self
            .optional_text(&strategy_path, raw.execution_strategy)
            .as_deref()
        {
            None | Some("parallel") => Strategy::Parallel,
            Some("sequential") => Strategy::Sequential,
            Some(other) => {
                self.error(
                    strategy_path,
                    format!("\"{other}\" is not a strategy; use \"parallel\" or \"sequential\""),
                );
                Strategy::Parallel
            }
        };
        let explicit = match raw.max_parallel {
            Some(n) if n < 1 => {
                self.error(
                    format!("{path}.max_parallel"),
                    format!("{n} is less than 1"),
                );
                None
            }
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => None,
        };
        if explicit.is_some() && execution_strategy == Strategy::Sequential {
            self.warn(
                format!("{path}.max_parallel"),
                "ignored with execution_strategy \"sequential\"",
            );
        }
        // A finite default: forty pattern branches moving at once must not mean forty
        // clones and shells (max_concurrent_units bounds all groups together as well).
        let max_parallel =
            explicit.or((execution_strategy == Strategy::Parallel).then_some(DEFAULT_MAX_PARALLEL));
        let scope_path = format!("{path}.deploy_scope");
        let deploy_scope = match self.optional_text(&scope_path, raw.deploy_scope).as_deref() {
            None | Some("changed") => DeployScope::Changed,
            Some("all") => DeployScope::All,
            Some(other) => {
                self.error(
                    scope_path,
                    format!("\"{other}\" is not a deploy scope; use \"changed\" or \"all\""),
                );
                DeployScope::Changed
            }
        };
        let global_timeout = self.duration(
            &format!("{path}.global_timeout"),
            raw.global_timeout,
            Duration::from_secs(3600),
        );
        let report = self.group_report(&format!("{path}.report"), raw.report);
        let notify = self.notify(&format!("{path}.notify"), raw.notify.unwrap_or_default());
        let executor = self.executor(&format!("{path}.executor"), raw.executor);
        (self.errors() == before).then_some(Group {
            name,
            execution_strategy,
            max_parallel,
            continue_on_error: raw.continue_on_error.unwrap_or(false),
            global_timeout,
            deploy_scope,
            report,
            notify,
            executor,
        })
    }

    fn executor(&mut self, path: &str, raw: Option<RawExecutor>) -> ExecutorKind {
        let Some(raw) = raw else {
            return ExecutorKind::Local;
        };
        let kind_path = format!("{path}.kind");
        match self.optional_text(&kind_path, raw.kind.clone()).as_deref() {
            None | Some("local") => {
                if raw.namespace.is_some() || raw.image.is_some() {
                    self.warn(path, "namespace and image are ignored with kind \"local\"");
                }
                ExecutorKind::Local
            }
            Some("kubernetes") => self.kubernetes_executor(path, raw),
            Some(other) => {
                self.error(
                    kind_path,
                    format!("\"{other}\" is not an executor; use \"local\" or \"kubernetes\""),
                );
                ExecutorKind::Local
            }
        }
    }

    fn kubernetes_executor(&mut self, path: &str, raw: RawExecutor) -> ExecutorKind {
        let namespace = self.required_text(&format!("{path}.namespace"), raw.namespace);
        let image = self.required_text(&format!("{path}.image"), raw.image);
        for (i, secret) in raw.env_from_secrets.iter().flatten().enumerate() {
            if !is_dns_label(secret) && !is_dns_subdomain(secret) {
                self.error(
                    format!("{path}.env_from_secrets[{i}]"),
                    format!("\"{secret}\" is not a Secret name"),
                );
            }
        }
        if let Some(ns) = &namespace {
            if !is_dns_label(ns) {
                self.error(
                    format!("{path}.namespace"),
                    format!("\"{ns}\" is not a namespace name (lower-case letters, digits, '-')"),
                );
            }
        }
        let start_timeout = self.duration(
            &format!("{path}.start_timeout"),
            raw.start_timeout,
            Duration::from_secs(300),
        );
        let keep_failed = self.duration(
            &format!("{path}.keep_failed"),
            raw.keep_failed,
            Duration::from_secs(3600),
        );
        let ttl_after_finished = self.duration(
            &format!("{path}.ttl_after_finished"),
            raw.ttl_after_finished,
            Duration::from_secs(86_400),
        );
        let pod = self.pod_template(path, raw.tolerations, raw.env_secret_keys, raw.volumes);
        match (namespace, image) {
            (Some(namespace), Some(image)) => {
                ExecutorKind::Kubernetes(Box::new(KubernetesExecutorConfig {
                    namespace,
                    image,
                    service_account_name: raw.service_account_name,
                    config_map: raw.config_map.unwrap_or_else(|| "sentry-config".to_owned()),
                    node_selector: raw.node_selector.unwrap_or_default(),
                    requests: raw
                        .resources
                        .as_ref()
                        .and_then(|r| r.requests.clone())
                        .unwrap_or_default(),
                    limits: raw
                        .resources
                        .as_ref()
                        .and_then(|r| r.limits.clone())
                        .unwrap_or_default(),
                    env_from_secrets: raw.env_from_secrets.unwrap_or_default(),
                    pod,
                    start_timeout,
                    keep_failed,
                    ttl_after_finished,
                }))
            }
            _ => ExecutorKind::Local,
        }
    }

    fn group_report(&mut self, path: &str, raw: Option<RawReport>) -> GroupReport {
        let raw = raw.unwrap_or_default();
        GroupReport {
            commit_status: raw.commit_status,
            context: raw
                .context
                .and_then(|c| self.required_text(&format!("{path}.context"), Some(c))),
        }
    }

    /// A repository's `report` laid over its group's. Plain Git has nowhere to put a
    /// status, so asking for one there is an error at whichever path asked.
    fn report(
        &mut self,
        path: &str,
        raw: Option<RawReport>,
        group: Option<&Group>,
        repo: (&str, Option<&Monitor>),
    ) -> Report {
        let own = self.group_report(&format!("{path}.report"), raw);
        let inherited = group.map(|g| g.report.clone()).unwrap_or_default();
        let commit_status = own.commit_status.or(inherited.commit_status);
        let (name, monitor) = repo;
        let repo_type = monitor.map(|m| m.repo_type);
        if commit_status == Some(true)
            && let Some(m) = monitor
            && !m.auth.has_credentials()
            && kind::of(m.repo_type).status_spacing.is_some()
        {
            self.warn(
                format!("{path}.monitor.auth.token"),
                "commit statuses are posted with the monitor's token, and none is set: the forge will refuse them",
            );
        }
        if commit_status == Some(true)
            && let Some(repo_type) = repo_type
            && kind::of(repo_type).status_spacing.is_none()
        {
            let asked_at = match (own.commit_status, group) {
                (Some(_), _) | (None, None) => format!("{path}.report.commit_status"),
                (None, Some(g)) => format!("groups.{}.report.commit_status", g.name),
            };
            self.error(
                asked_at,
                format!(
                    "repository \"{name}\" has repo_type \"{}\", which has no commit statuses; \
                     use repo_type github or gitlab, or set {path}.report.commit_status: false",
                    repo_type.as_str()
                ),
            );
        }
        let group_name = group.map_or("", |g| g.name.as_str());
        Report {
            commit_status: commit_status.unwrap_or(false),
            context: own
                .context
                .or(inherited.context)
                .unwrap_or_else(|| format!("sentry/{group_name}")),
        }
    }

    fn notify(&mut self, path: &str, raw: Vec<RawNotify>) -> Vec<NotifyTarget> {
        raw.into_iter()
            .enumerate()
            .filter_map(|(i, item)| self.notify_target(&format!("{path}[{i}]"), item))
            .collect()
    }

    /// One notification target. Messages never quote the URL or the secret.
    fn notify_target(&mut self, path: &str, raw: RawNotify) -> Option<NotifyTarget> {
        let before = self.errors();
        let type_path = format!("{path}.type");
        let kind = match self.required_text(&type_path, raw.kind).as_deref() {
            Some("webhook") => Some(NotifyKind::Webhook),
            Some("slack") => Some(NotifyKind::Slack),
            Some(other) => {
                self.error(
                    &type_path,
                    format!("\"{other}\" is not a notification type; use \"webhook\" or \"slack\""),
                );
                None
            }
            None => None,
        };
        let url_path = format!("{path}.url");
        let url = self.required_text(&url_path, raw.url);
        if let Some(url) = &url {
            match url::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "https" | "http") && u.has_host() => {
                    if u.scheme() == "http" && !is_loopback(&u) {
                        self.warn(
                            &url_path,
                            "notifications would travel unencrypted over plain http; use https",
                        );
                    }
                }
                Ok(_) => self.error(&url_path, "must be an https:// (or http://) URL"),
                Err(e) => self.error(&url_path, format!("not a valid URL: {e}")),
            }
        }
        let secret = self
            .optional_text(&format!("{path}.secret"), raw.secret)
            .filter(|s| !s.is_empty())
            .map(SecretString::from);
        if secret.is_some() && kind == Some(NotifyKind::Slack) {
            self.warn(
                format!("{path}.secret"),
                "ignored: Slack incoming webhooks are not signed (the URL is the secret)",
            );
        }
        let on = self.notify_events(&format!("{path}.on"), raw.on);
        if self.errors() != before {
            return None;
        }
        Some(NotifyTarget {
            kind: kind?,
            url: SecretString::from(url?),
            secret,
            on,
            path: path.to_owned(),
        })
    }

    fn notify_events(&mut self, path: &str, raw: Option<Vec<String>>) -> Vec<NotifyEvent> {
        let Some(raw) = raw else {
            return vec![NotifyEvent::Failure, NotifyEvent::Recovery];
        };
        if raw.is_empty() {
            self.error(
                path,
                "must name at least one of failure, recovery, success, started (or leave `on` out)",
            );
        }
        let mut events = Vec::new();
        for (i, text) in raw.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let Some(text) = self.expand(&item_path, text) else {
                continue;
            };
            match NotifyEvent::ALL.into_iter().find(|e| e.as_str() == text) {
                Some(event) if !events.contains(&event) => events.push(event),
                Some(_) => {}
                None => self.error(
                    item_path,
                    format!(
                        "\"{text}\" is not an event; use failure, recovery, success or started"
                    ),
                ),
            }
        }
        events
    }

    fn repositories(
        &mut self,
        value: Option<Yaml>,
        group_names: &[String],
        groups: &[Group],
    ) -> Vec<Arc<Repository>> {
        let items = match value {
            None | Some(Yaml::Null) => {
                self.error(
                    "repositories",
                    "no repositories are configured; add at least one",
                );
                return Vec::new();
            }
            Some(Yaml::Sequence(items)) => items,
            Some(_) => {
                self.error(
                    "repositories",
                    "must be a list of repositories (each item starting with `- name:`)",
                );
                return Vec::new();
            }
        };
        if items.is_empty() {
            self.error(
                "repositories",
                "no repositories are configured; add at least one",
            );
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut repositories = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let path = format!("repositories[{i}]");
            let Some(raw) = self.extract::<RawRepository>(&path, item) else {
                continue;
            };
            if let Some(name) = &raw.name {
                if let Some(first) = seen.insert(name.clone(), i) {
                    self.error(
                        format!("{path}.name"),
                        format!("duplicate repository name \"{name}\" (first used by repositories[{first}])"),
                    );
                }
            }
            if let Some(repo) = self.repository(&path, raw, group_names, groups) {
                repositories.push(Arc::new(repo));
            }
        }
        repositories
    }

    fn repository(
        &mut self,
        path: &str,
        raw: RawRepository,
        group_names: &[String],
        groups: &[Group],
    ) -> Option<Repository> {
        let before = self.errors();
        let name = self.required_text(&format!("{path}.name"), raw.name);
        if let Some(name) = &name {
            check_name(self, &format!("{path}.name"), name, "repository");
        }
        let group_path = format!("{path}.group");
        let group = self.required_text(&group_path, raw.group);
        if let Some(group) = &group {
            self.referenced_groups.push(group.clone());
            if !group_names.iter().any(|g| g == group) {
                let hint = match suggest(group, group_names.iter().map(String::as_str)) {
                    Some(best) => format!("; did you mean \"{best}\"?"),
                    None if group_names.is_empty() => "; define it under `groups:`".to_owned(),
                    None => format!("; defined groups: {}", group_names.join(", ")),
                };
                self.error(group_path, format!("no group named \"{group}\"{hint}"));
            }
        }
        let monitor_path = format!("{path}.monitor");
        let monitor = self
            .required(&monitor_path, raw.monitor)
            .and_then(|m| self.monitor(&monitor_path, m));
        let deploy_path = format!("{path}.deploy");
        let deploy = self
            .required(&deploy_path, raw.deploy)
            .and_then(|d| self.deploy(&deploy_path, d, name.as_deref().unwrap_or_default()));
        let own_group = group
            .as_deref()
            .and_then(|g| groups.iter().find(|known| known.name == g));
        let repo = (name.as_deref().unwrap_or_default(), monitor.as_ref());
        let report = self.report(path, raw.report, own_group, repo);
        if let Some(g) = own_group.filter(|g| matches!(g.executor, ExecutorKind::Kubernetes(_))) {
            let apps = [
                (&monitor_path, monitor.as_ref().map(|m| &m.auth)),
                (&deploy_path, deploy.as_ref().map(|d| &d.auth)),
            ];
            for (side, auth) in apps {
                if auth.is_some_and(|a| a.github_app.is_some()) {
                    self.error(
                        format!("{side}.auth.github_app"),
                        format!("group {} runs units as Kubernetes Jobs, whose pods mint no GitHub App tokens (they would need the private key); use a token, or the local executor", g.name),
                    );
                }
            }
        }
        let tls_path = format!("{path}.tls.ca_file");
        let ca_file = raw.tls.unwrap_or_default().ca_file;
        let ca_files = self
            .optional_text(&tls_path, ca_file)
            .filter(|p| !p.is_empty())
            .and_then(|file| self.ca_file(&tls_path, file))
            .into_iter()
            .collect();
        if self.errors() != before {
            return None;
        }
        Some(Repository {
            name: name?,
            group: group?,
            monitor: monitor?,
            deploy: deploy?,
            report,
            ca_files,
        })
    }

    fn repo_type(&mut self, path: &str, value: Option<String>) -> Option<RepoType> {
        let name = self.optional_text(path, value)?;
        match kind::by_name(&name) {
            Some(kind) => Some(kind.repo_type),
            None => {
                let valid: Vec<String> = kind::all()
                    .iter()
                    .map(|k| format!("\"{}\"", k.name))
                    .collect();
                self.error(
                    path,
                    format!("unknown repo_type \"{name}\"; use {}", valid.join(", ")),
                );
                None
            }
        }
    }

    fn monitor(&mut self, path: &str, raw: RawMonitor) -> Option<Monitor> {
        let before = self.errors();
        let type_path = format!("{path}.repo_type");
        let repo_type = self
            .required(&type_path, raw.repo_type.clone())
            .and_then(|_| self.repo_type(&type_path, raw.repo_type));
        let url_path = format!("{path}.repo_url");
        let repo_url = self.required_text(&url_path, raw.repo_url);
        let auth_path = format!("{path}.auth");
        let (mut auth, app, ssh_key) = self.auth(&auth_path, raw.auth);
        let credentials = auth.token.is_some() || app.is_some();
        let branches = self.branches(&format!("{path}.branches"), raw.branches);
        let (repo_type, repo_url) = (repo_type?, repo_url?);

        let remote = match parse_remote(&repo_url) {
            Ok(remote) => remote,
            Err(message) => {
                self.error(url_path, message);
                return None;
            }
        };
        let (api_url, project_path) = match &kind::of(repo_type).project {
            None => {
                self.ssh_auth(&auth_path, &url_path, &remote, ssh_key, &mut auth);
                self.warn_git_http_proxy(&url_path, &remote);
                self.warn_plain_http(&url_path, &remote, credentials);
                let web = match &remote {
                    Remote::Http(web) => Some(web),
                    Remote::Local | Remote::Ssh(_) => None,
                };
                self.attach_app(&mut auth, app, web, None);
                (None, String::new())
            }
            Some(rule) => {
                let Remote::Http(web) = &remote else {
                    self.error(&url_path, format!("a {} repo_url must be an https:// (or http://) URL; use repo_type \"git\" for SSH, file:// and local paths", repo_type.as_str()));
                    return None;
                };
                self.ssh_auth(&auth_path, &url_path, &remote, ssh_key, &mut auth);
                let project = project_path(web);
                if !rule.accepts(&project) {
                    self.error(&url_path, rule.hint);
                }
                let api_path = format!("{path}.api_url");
                let api = match self.optional_text(&api_path, raw.api_url) {
                    Some(text) => match parse_remote(&text) {
                        Ok(Remote::Http(u)) => Some(u),
                        Ok(_) => {
                            self.error(&api_path, "must be an https:// (or http://) URL");
                            None
                        }
                        Err(message) => {
                            self.error(&api_path, message);
                            None
                        }
                    },
                    None => default_api_url(repo_type, web),
                };
                if let Some(api) = &api {
                    self.warn_plain_http(&api_path, &Remote::Http(api.clone()), credentials);
                }
                if app.is_some() && repo_type != RepoType::Github {
                    self.error(
                        format!("{path}.auth.github_app"),
                        format!(
                            "a GitHub App authenticates to GitHub only, and repo_type is {}",
                            repo_type.as_str()
                        ),
                    );
                } else {
                    self.attach_app(&mut auth, app, Some(web), api.as_ref());
                }
                (api, project)
            }
        };
        if self.errors() != before {
            return None;
        }
        Some(Monitor {
            repo_url,
            repo_type,
            api_url,
            project_path,
            branches: branches?,
            auth,
        })
    }

    fn branches(&mut self, path: &str, value: Option<Vec<String>>) -> Option<Vec<BranchSpec>> {
        let value = self.required(path, value)?;
        if value.is_empty() {
            self.error(path, "must list at least one branch or pattern");
            return None;
        }
        let before = self.errors();
        let mut specs = Vec::new();
        let mut seen = BTreeMap::new();
        for (i, raw) in value.into_iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let Some(text) = self.expand(&item_path, &raw) else {
                continue;
            };
            if let Some(first) = seen.insert(text.clone(), i) {
                self.error(
                    &item_path,
                    format!("duplicate branch \"{text}\" (also at {path}[{first}])"),
                );
                continue;
            }
            if BranchPattern::is_pattern(&text) {
                match BranchPattern::new(&text) {
                    Ok(p) => specs.push(BranchSpec::Pattern(p)),
                    Err(e) => self.error(
                        &item_path,
                        format!("invalid pattern \"{text}\": {}", e.kind()),
                    ),
                }
            } else if let Err(why) = check_branch_name(&text) {
                self.error(
                    &item_path,
                    format!("\"{text}\" is not a valid branch name: {why}"),
                );
            } else {
                specs.push(BranchSpec::Exact(text));
            }
        }
        (self.errors() == before).then_some(specs)
    }

    /// `auth`; its `github_app` is read into [`AppParts`] and attached by the caller once
    /// the repository's URL says which API and repository it is for; its SSH key is
    /// checked by the caller once the URL says whether it is an SSH remote.
    fn auth(&mut self, path: &str, raw: Option<RawAuth>) -> (Auth, Option<AppParts>, RawSshKey) {
        let raw = raw.unwrap_or_default();
        let key = RawSshKey {
            key_file: self
                .optional_text(&format!("{path}.ssh_key_file"), raw.ssh_key_file)
                .filter(|f| !f.is_empty()),
            passphrase_env: raw.ssh_key_passphrase_env.filter(|n| !n.is_empty()),
        };
        let username = self
            .optional_text(&format!("{path}.username"), raw.username)
            .filter(|u| !u.is_empty());
        let token = self
            .optional_text(&format!("{path}.token"), raw.token)
            .filter(|t| !t.is_empty())
            .map(SecretString::from);
        let app = raw
            .github_app
            .and_then(|app| self.app_parts(&format!("{path}.github_app"), app));
        if token.is_some() && app.is_some() {
            self.error(
                format!("{path}.github_app"),
                format!("set either {path}.token or {path}.github_app, not both"),
            );
        }
        let auth = Auth {
            username,
            token,
            ssh: None,
            github_app: None,
        };
        (auth, app, key)
    }

    /// `auth.github_app` as written: an App ID and a readable RSA private key.
    fn app_parts(&mut self, path: &str, raw: RawGithubApp) -> Option<AppParts> {
        let app_id = self.required(&format!("{path}.app_id"), raw.app_id);
        if app_id == Some(0) {
            self.error(
                format!("{path}.app_id"),
                "must be the App's ID (a positive number)",
            );
        }
        if raw.installation_id == Some(0) {
            self.error(
                format!("{path}.installation_id"),
                "must be a positive number (or left out to find it from the repository)",
            );
        }
        let key_path = format!("{path}.private_key_file");
        let file = self.required_text(&key_path, raw.private_key_file)?;
        let key = match std::fs::read(&file) {
            Ok(pem) => match AppKey::from_pem(&pem) {
                Ok(key) => Some(key),
                Err(why) => {
                    self.error(&key_path, format!("{file} {why}"));
                    None
                }
            },
            Err(e) => {
                self.error(&key_path, format!("cannot read {file}: {e}"));
                None
            }
        };
        Some(AppParts {
            path: path.to_owned(),
            app_id: app_id.filter(|id| *id > 0)?,
            installation_id: raw.installation_id.filter(|id| *id > 0),
            private_key_file: PathBuf::from(file),
            key: key?,
        })
    }

    /// Attaches `parts` to `auth` for the GitHub repository at `web` (its API at `api`,
    /// else GitHub's default for the host).
    fn attach_app(
        &mut self,
        auth: &mut Auth,
        parts: Option<AppParts>,
        web: Option<&url::Url>,
        api: Option<&url::Url>,
    ) {
        let Some(parts) = parts else { return };
        let Some(web) = web else {
            self.error(
                &parts.path,
                "a GitHub App authenticates to GitHub over https:// only; this repository's URL is not an http(s) URL",
            );
            return;
        };
        let project = project_path(web);
        if project.split('/').count() != 2 {
            self.error(
                &parts.path,
                format!("a GitHub App needs a repository URL naming OWNER/REPO, not \"{project}\""),
            );
            return;
        }
        let api = api
            .cloned()
            .or_else(|| default_api_url(RepoType::Github, web));
        let Some(mut api) = api else {
            self.error(
                &parts.path,
                "cannot tell the GitHub API root from the repository URL",
            );
            return;
        };
        api.set_query(None);
        api.set_fragment(None);
        auth.github_app = Some(Arc::new(GithubApp {
            app_id: parts.app_id,
            installation_id: parts.installation_id,
            private_key_file: parts.private_key_file,
            key: parts.key,
            api_url: api.as_str().trim_end_matches('/').to_owned(),
            project,
        }));
    }

    /// `ssh.known_hosts_file` (which must be readable and well formed), else
    /// `~/.ssh/known_hosts` if it exists.
    fn known_hosts(&mut self, raw: RawSsh) -> Result<PathBuf, Option<String>> {
        let path = "ssh.known_hosts_file";
        let Some(file) = self
            .optional_text(path, raw.known_hosts_file)
            .filter(|f| !f.is_empty())
        else {
            let home = self.env.get("HOME").filter(|h| !h.is_empty());
            let default = home.as_deref().map(crate::forge::ssh::default_known_hosts);
            return match default {
                Some(file) if file.is_file() => Ok(file),
                _ => Err(Some("this SSH URL's host key cannot be checked: there is no known_hosts file; set ssh.known_hosts_file (the default ~/.ssh/known_hosts does not exist)".to_owned())),
            };
        };
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let (_, bad) = crate::forge::ssh::KnownHosts::parse(&text);
                for line in &bad {
                    self.error(path, format!("{file} line {}: {}", line.line, line.problem));
                }
                if bad.is_empty() {
                    Ok(PathBuf::from(file))
                } else {
                    Err(None)
                }
            }
            Err(e) => {
                self.error(path, format!("cannot read {file}: {e}"));
                Err(None)
            }
        }
    }

    /// `proxy:`: an http(s) URL whose password, if any, is an environment variable.
    fn proxy(&mut self, raw: RawProxy) -> Option<ProxyConfig> {
        let path = "proxy.url";
        let written = raw.url.clone().unwrap_or_default();
        let text = self.required_text(path, raw.url)?;
        let url = match url::Url::parse(&text) {
            Ok(url) => url,
            Err(e) => {
                // The text may hold a password: say what is wrong, not what it is.
                self.error(path, format!("not a valid URL: {e}"));
                return None;
            }
        };
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            self.error(
                path,
                "must be an http:// or https:// URL with a host (libgit2 speaks to no other proxy)",
            );
            return None;
        }
        let password = url.password().map(|p| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned()
        });
        let userinfo = written.split('@').next().unwrap_or_default();
        if password.is_some() && (!written.contains('@') || !userinfo.contains("${")) {
            self.error(path, "the proxy password is written in the file; take it from the environment: http://user:${PROXY_PASSWORD}@host:port");
            return None;
        }
        let mut no_proxy = Vec::new();
        for (i, entry) in raw.no_proxy.unwrap_or_default().into_iter().enumerate() {
            let entry_path = format!("proxy.no_proxy[{i}]");
            let Some(entry) = self.expand(&entry_path, &entry) else {
                continue;
            };
            if entry.trim().is_empty() || entry.contains([',', ' ', '/']) {
                self.error(
                    entry_path,
                    "one host, domain (.example.com), IP address or `*` per entry",
                );
            } else {
                no_proxy.push(entry.trim().to_owned());
            }
        }
        if password.as_deref().is_some_and(|p| !p.is_empty()) {
            self.warn(path, "libgit2 1.9 cannot send Git traffic (ls-remote, clones) through a proxy that asks for a password: after the 407 it reuses a closed connection (libgit2 issue #7081); exempt the Git hosts with proxy.no_proxy, or let Sentry through without a password (the API client is not affected)");
        }
        Some(ProxyConfig {
            url: SecretString::from(text),
            password: password.filter(|p| !p.is_empty()).map(SecretString::from),
            no_proxy,
        })
    }

    /// The SSH part of `auth` for a remote: only an SSH URL takes `ssh_key_file`, and
    /// it takes no token.
    fn ssh_auth(
        &mut self,
        path: &str,
        url_path: &str,
        remote: &Remote,
        key: RawSshKey,
        auth: &mut Auth,
    ) {
        let Remote::Ssh(target) = remote else {
            for (name, set) in [
                ("ssh_key_file", key.key_file.is_some()),
                ("ssh_key_passphrase_env", key.passphrase_env.is_some()),
            ] {
                if set {
                    self.error(format!("{path}.{name}"), format!("is for SSH remotes (ssh://user@host/path or user@host:path), and {url_path} is not one"));
                }
            }
            return;
        };
        if auth.token.is_some() {
            self.error(format!("{path}.token"), format!("a token is not used over SSH; {url_path} is an SSH URL: give a key in {path}.ssh_key_file, or use the https:// URL with the token"));
        }
        let key_path = format!("{path}.ssh_key_file");
        if let Some(file) = &key.key_file {
            match std::fs::read(file) {
                Ok(bytes) if contains(&bytes, b"PRIVATE KEY-----") => {}
                Ok(_) => self.error(&key_path, format!("{file} is not a private key (no -----BEGIN … PRIVATE KEY----- line); give the private half of the deploy key, not the .pub")),
                Err(e) => self.error(&key_path, format!("cannot read {file}: {e}")),
            }
        }
        let pass_path = format!("{path}.ssh_key_passphrase_env");
        let passphrase = match &key.passphrase_env {
            None => None,
            Some(_) if key.key_file.is_none() => {
                self.error(
                    &pass_path,
                    format!("there is no {key_path} for this passphrase"),
                );
                None
            }
            Some(name) if !expand::is_var_name(name) => {
                self.error(
                    &pass_path,
                    format!("\"{name}\" is not an environment variable name"),
                );
                None
            }
            Some(name) => match self.env.get(name).filter(|v| !v.is_empty()) {
                Some(value) => Some(SecretString::from(value)),
                None => {
                    self.error(&pass_path, format!("environment variable {name} is not set (it should hold the key's passphrase)"));
                    None
                }
            },
        };
        let known_hosts = match &self.known_hosts {
            Ok(file) => file.clone(),
            Err(None) => return,
            Err(Some(message)) => {
                let message = message.clone();
                self.error(url_path, message);
                return;
            }
        };
        let user = target
            .user
            .clone()
            .or_else(|| auth.username.clone())
            .unwrap_or_else(|| "git".to_owned());
        auth.ssh = Some(Arc::new(SshAuth {
            user,
            host: target.host.clone(),
            port: target.port,
            key_file: key.key_file.map(PathBuf::from),
            passphrase,
            known_hosts,
        }));
    }

    /// A plain `http://` Git remote while a proxy is configured: libgit2 1.9 sends such
    /// requests straight to the server (it proxies only https, with CONNECT).
    fn warn_git_http_proxy(&mut self, path: &str, remote: &Remote) {
        if let (Remote::Http(url), Some(source)) = (remote, self.http_proxy) {
            if url.scheme() == "http" {
                self.warn(path, format!("ls-remote and clones of a plain http:// URL do not go through the proxy ({source}): libgit2 proxies only https:// remotes and connects to this one directly; use https://"));
            }
        }
    }

    /// A token over plain http to a host that is not loopback: anyone on the path reads
    /// it. An error unless `allow_insecure_http: true`, then a warning.
    fn warn_plain_http(&mut self, path: &str, remote: &Remote, credentials: bool) {
        if let Remote::Http(url) = remote {
            if url.scheme() == "http" && credentials && !is_loopback(url) {
                if self.allow_insecure_http {
                    self.warn(path, "a token travels unencrypted over plain http to a host that is not loopback (allow_insecure_http: true); use https");
                } else {
                    self.error(path, "a token would travel unencrypted over plain http to a host that is not loopback; use https, or set allow_insecure_http: true");
                }
            }
        }
    }

    fn deploy(&mut self, path: &str, raw: RawDeploy, repo_name: &str) -> Option<Deploy> {
        let before = self.errors();
        let url_path = format!("{path}.qa_repo_url");
        let qa_repo_url = self.required_text(&url_path, raw.qa_repo_url);
        let qa_repo_branch =
            self.required_text(&format!("{path}.qa_repo_branch"), raw.qa_repo_branch);
        if let Some(branch) = &qa_repo_branch {
            if let Err(why) = check_branch_name(branch) {
                self.error(
                    format!("{path}.qa_repo_branch"),
                    format!("\"{branch}\" is not a valid branch name: {why}"),
                );
            }
        }
        let explicit_type = self.repo_type(&format!("{path}.repo_type"), raw.repo_type);
        let auth_path = format!("{path}.auth");
        let (mut auth, app, ssh_key) = self.auth(&auth_path, raw.auth);
        let credentials = auth.token.is_some() || app.is_some();
        let mut repo_type = RepoType::Git;
        if let Some(url) = &qa_repo_url {
            match parse_remote(url) {
                Ok(remote) => {
                    self.ssh_auth(&auth_path, &url_path, &remote, ssh_key, &mut auth);
                    self.warn_git_http_proxy(&url_path, &remote);
                    self.warn_plain_http(&url_path, &remote, credentials);
                    let web = match &remote {
                        Remote::Http(web) => Some(web),
                        Remote::Local | Remote::Ssh(_) => None,
                    };
                    self.attach_app(&mut auth, app, web, None);
                    repo_type = explicit_type.unwrap_or_else(|| infer_repo_type(&remote));
                }
                Err(message) => self.error(&url_path, message),
            }
        }
        let commands = self.commands(&format!("{path}.commands"), raw.commands);
        let raw_env = raw.env.unwrap_or_default();
        let secret_env = self.secret_env(path, &raw_env, raw.secret_env.unwrap_or_default());
        let inherit_env = self.inherit_env(&format!("{path}.inherit_env"), raw.inherit_env);
        let env = self.command_env(&format!("{path}.env"), raw_env);
        let timeout = raw
            .timeout
            .and_then(|t| self.parse_duration(&format!("{path}.timeout"), t));
        let retries = match raw.retries {
            Some(n) if !(0..=MAX_RETRIES).contains(&n) => {
                self.error(
                    format!("{path}.retries"),
                    format!("{n} is out of range; use 0 to {MAX_RETRIES}"),
                );
                0
            }
            Some(n) => u32::try_from(n).unwrap_or(0),
            None => 0,
        };
        let shell = match raw.shell {
            Some(s) => self.required_text(&format!("{path}.shell"), Some(s)),
            None => Some("/bin/sh".to_owned()),
        };
        let project_name = self
            .optional_text(&format!("{path}.project_name"), raw.project_name)
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| repo_name.to_owned());
        if self.errors() != before {
            return None;
        }
        Some(Deploy {
            qa_repo_url: qa_repo_url?,
            qa_repo_branch: qa_repo_branch?,
            repo_type,
            auth,
            project_name,
            commands: commands?,
            env,
            secret_env,
            inherit_env,
            timeout,
            retries,
            shell: shell?,
        })
    }

    fn inherit_env(&mut self, path: &str, raw: Option<RawInheritEnv>) -> InheritEnv {
        match raw {
            None | Some(RawInheritEnv::All(true)) => InheritEnv::AllButSecrets,
            Some(RawInheritEnv::All(false)) => InheritEnv::Only(Vec::new()),
            Some(RawInheritEnv::Names(names)) => {
                for (i, name) in names.iter().enumerate() {
                    if !is_env_name(name) {
                        self.error(
                            format!("{path}[{i}]"),
                            format!("\"{name}\" is not a valid environment variable name"),
                        );
                    }
                }
                InheritEnv::Only(names)
            }
        }
    }

    /// Commands are kept verbatim: `$VAR` in them is the shell's business.
    fn commands(&mut self, path: &str, value: Option<Vec<String>>) -> Option<Vec<String>> {
        let commands = self.required(path, value)?;
        if commands.is_empty() {
            self.error(path, "must list at least one command");
            return None;
        }
        let blank: Vec<usize> = (0..commands.len())
            .filter(|&i| commands[i].trim().is_empty())
            .collect();
        for i in &blank {
            self.error(format!("{path}[{i}]"), "command is empty");
        }
        blank.is_empty().then_some(commands)
    }

    /// The names of `deploy.env` entries to mask: the listed ones (which must exist) and
    /// those whose value is a single `${VAR}` reference.
    fn secret_env(
        &mut self,
        path: &str,
        env: &BTreeMap<String, String>,
        listed: Vec<String>,
    ) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for (i, name) in listed.into_iter().enumerate() {
            if env.contains_key(&name) {
                names.insert(name);
            } else {
                self.error(
                    format!("{path}.secret_env[{i}]"),
                    format!("\"{name}\" is not a name in {path}.env"),
                );
            }
        }
        names.extend(
            env.iter()
                .filter(|(_, value)| expand::is_single_reference(value))
                .map(|(name, _)| name.clone()),
        );
        names
    }

    fn command_env(
        &mut self,
        path: &str,
        raw: BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for (key, value) in raw {
            let key_path = format!("{path}.{key}");
            if !expand::is_var_name(&key) {
                self.error(&key_path, "not a valid environment variable name (letters, digits and `_`, not starting with a digit)");
            } else if key.starts_with("SENTRY_") {
                self.error(
                    &key_path,
                    "names starting with SENTRY_ are reserved for the variables Sentry sets",
                );
            } else if let Some(value) = self.expand(&key_path, &value) {
                env.insert(key, value);
            }
        }
        env
    }

    fn github_lookup(&mut self, raw: Option<String>) -> GithubLookup {
        match self.optional_text("github_lookup", raw).as_deref() {
            None | Some("auto") => GithubLookup::Auto,
            Some("rest") => GithubLookup::Rest,
            Some("graphql") => GithubLookup::Graphql,
            Some(other) => {
                self.error(
                    "github_lookup",
                    format!("{other:?} is not a lookup; use auto, rest or graphql"),
                );
                GithubLookup::Auto
            }
        }
    }

    fn top_level(
        &mut self,
        raw: RawConfig,
        groups: Vec<Group>,
        repositories: Vec<Arc<Repository>>,
    ) -> Option<Config> {
        let polling_interval = self.duration(
            "polling_interval",
            raw.polling_interval,
            Duration::from_secs(60),
        );
        let shutdown_grace = self.duration(
            "shutdown_grace",
            raw.shutdown_grace,
            Duration::from_secs(20),
        );
        let request_timeout = self.duration(
            "request_timeout",
            raw.request_timeout,
            Duration::from_secs(30),
        );
        let state_file = self.path_or("state_file", raw.state_file, || {
            PathBuf::from(".sentry/state.json")
        });
        let home = self.env.get("HOME");
        let work_dir = self.path_or("work_dir", raw.work_dir, || {
            default_work_dir(home.as_deref())
        });
        let audit_log = self
            .optional_text("audit_log", raw.audit_log)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let max_requests_per_host = match raw.max_requests_per_host {
            Some(0) => {
                self.error("max_requests_per_host", "must be at least 1");
                1
            }
            Some(n) if n > 1024 => {
                self.error(
                    "max_requests_per_host",
                    format!("{n} is more than the limit of 1024"),
                );
                1
            }
            Some(n) => n as usize,
            None => 8,
        };
        let rate_limits = self.rate_limits(raw.rate_limits.unwrap_or_default(), &repositories);
        let webhook_poll_interval = self.duration(
            "webhook_poll_interval",
            raw.webhook_poll_interval,
            polling_interval,
        );
        if webhook_poll_interval < polling_interval {
            self.error(
                "webhook_poll_interval",
                format!(
                    "{} is shorter than polling_interval ({}); it is how much less often webhook-covered repositories are polled",
                    humantime::format_duration(webhook_poll_interval),
                    humantime::format_duration(polling_interval)
                ),
            );
        }
        let max_concurrent_units = match raw.max_concurrent_units {
            Some(0) => {
                self.error("max_concurrent_units", "must be at least 1");
                1
            }
            Some(n) => n as usize,
            None => default_concurrent_units(),
        };
        let pending_retry = self.pending_retry(raw.pending_retry.unwrap_or_default());
        let ca_files = self.ca_files(raw.tls.unwrap_or_default());
        let proxy = raw.proxy.and_then(|p| self.proxy(p));
        let server = raw.server.unwrap_or_default();
        let listen = match self.optional_text("server.listen", server.listen) {
            None => Some(SocketAddr::from(([0, 0, 0, 0], 8080))),
            Some(text) => self.socket_addr("server.listen", &text),
        };
        let webhook_listen = self
            .optional_text("server.webhook_listen", server.webhook_listen)
            .filter(|t| !t.is_empty())
            .and_then(|text| self.socket_addr("server.webhook_listen", &text));
        let header_timeout = self.duration(
            "server.header_timeout",
            server.header_timeout,
            Duration::from_secs(10),
        );
        let server_request_timeout = self.duration(
            "server.request_timeout",
            server.request_timeout,
            Duration::from_secs(30),
        );
        let max_connections = match server.max_connections {
            Some(n) if !(1..=65_536).contains(&n) => {
                self.error(
                    "server.max_connections",
                    format!("{n} is out of range; use 1 to 65536"),
                );
                1
            }
            Some(n) => usize::try_from(n).unwrap_or(1),
            None => 256,
        };
        let public_url = self.public_url(server.public_url);
        let hooks = raw.webhooks.unwrap_or_default();
        let secret = |cx: &mut Self, path: &str, v: Option<String>| {
            cx.optional_text(path, v)
                .filter(|s| !s.is_empty())
                .map(SecretString::from)
        };
        let webhooks = WebhookConfig {
            github_secret: secret(self, "webhooks.github_secret", hooks.github_secret),
            gitlab_token: secret(self, "webhooks.gitlab_token", hooks.gitlab_token),
        };
        let masked_values = self.masked_values(raw.secret_env.unwrap_or_default());
        let leader_election = self.leader_election(raw.leader_election.unwrap_or_default());
        let state = self.state_config(raw.state.unwrap_or_default(), &leader_election);
        let read_token = secret(self, "server.read_token", server.read_token);
        let github_lookup = self.github_lookup(raw.github_lookup);
        if self.errors() > 0 {
            return None;
        }
        Some(Config {
            polling_interval,
            state_file,
            work_dir,
            shutdown_grace,
            audit_log,
            request_timeout,
            max_requests_per_host,
            rate_limits,
            webhook_poll_interval,
            max_concurrent_units,
            pending_retry,
            ca_files,
            proxy,
            server: ServerConfig {
                enabled: server.enabled.unwrap_or(true),
                listen: listen?,
                read_token,
                public_url,
                webhook_listen,
                header_timeout,
                request_timeout: server_request_timeout,
                max_connections,
            },
            webhooks,
            leader_election,
            state,
            groups,
            repositories,
            masked_values,
            github_lookup,
        })
    }

    /// `rate_limits:`: each key must be the API host (`host` or `host:port`) of a
    /// configured repository, each number at least 1.
    fn rate_limits(
        &mut self,
        raw: BTreeMap<String, RawRateLimit>,
        repositories: &[Arc<Repository>],
    ) -> BTreeMap<String, RateLimitOverride> {
        let hosts: std::collections::BTreeSet<String> = repositories
            .iter()
            .filter_map(|r| r.monitor.api_url.as_ref())
            .filter_map(|u| {
                let host = u.host_str()?;
                Some(match u.port() {
                    Some(port) => format!("{host}:{port}"),
                    None => host.to_owned(),
                })
            })
            .collect();
        let mut out = BTreeMap::new();
        for (host, limit) in raw {
            let path = format!("rate_limits.{host}");
            if !hosts.contains(&host) {
                let known = if hosts.is_empty() {
                    "no repository has an API host".to_owned()
                } else {
                    format!(
                        "the API hosts of the repositories are: {}",
                        hosts.iter().cloned().collect::<Vec<_>>().join(", ")
                    )
                };
                self.error(
                    &path,
                    format!("\"{host}\" is no repository's API host (write host or host:port as in api_url); {known}"),
                );
                continue;
            }
            let positive = |cx: &mut Self, key: &str, v: Option<u32>| match v {
                Some(0) => {
                    cx.error(format!("{path}.{key}"), "must be at least 1");
                    None
                }
                v => v,
            };
            let concurrency = positive(self, "concurrency", limit.concurrency);
            if let Some(n) = concurrency.filter(|n| *n > 1000) {
                self.error(
                    format!("{path}.concurrency"),
                    format!("{n} is more than the limit of 1000"),
                );
            }
            let rest = positive(self, "rest_points_per_minute", limit.rest_points_per_minute);
            let graphql = positive(
                self,
                "graphql_points_per_minute",
                limit.graphql_points_per_minute,
            );
            let window_path = format!("{path}.window");
            let window = limit
                .window
                .and_then(|w| self.parse_duration(&window_path, w));
            out.insert(
                host,
                RateLimitOverride {
                    concurrency: concurrency.map(|n| n as usize),
                    rest_points_per_minute: rest,
                    graphql_points_per_minute: graphql,
                    window,
                },
            );
        }
        out
    }

    /// `server.public_url` without a trailing slash, so links join with one `/`.
    fn public_url(&mut self, raw: Option<String>) -> Option<String> {
        let text = self
            .optional_text("server.public_url", raw)
            .filter(|t| !t.trim().is_empty())?;
        match url::Url::parse(text.trim()) {
            Ok(u) if matches!(u.scheme(), "https" | "http") && u.has_host() => {
                Some(u.as_str().trim_end_matches('/').to_owned())
            }
            Ok(_) => {
                self.error("server.public_url", "must be an https:// (or http://) URL");
                None
            }
            Err(e) => {
                self.error("server.public_url", format!("not a valid URL: {e}"));
                None
            }
        }
    }

    fn pending_retry(&mut self, raw: RawPendingRetry) -> PendingRetry {
        let default = PendingRetry::default();
        let initial = self.duration("pending_retry.initial", raw.initial, default.initial);
        let max = self.duration("pending_retry.max", raw.max, default.max.max(initial));
        if max < initial {
            self.error(
                "pending_retry.max",
                format!(
                    "{} is shorter than pending_retry.initial ({})",
                    humantime::format_duration(max),
                    humantime::format_duration(initial)
                ),
            );
        }
        PendingRetry { initial, max }
    }

    /// Every env-file value, and the values of the variables `secret_env` names (which must
    /// be valid names; an unset one is skipped: nothing to mask).
    fn masked_values(&mut self, names: Vec<String>) -> Vec<SecretString> {
        let mut values: Vec<SecretString> = self
            .env
            .file_values()
            .map(|v| SecretString::from(v.as_str()))
            .collect();
        for (i, name) in names.iter().enumerate() {
            if !expand::is_var_name(name) {
                self.error(
                    format!("secret_env[{i}]"),
                    "not a valid environment variable name (letters, digits and `_`, not starting with a digit)",
                );
            } else if let Some(value) = self.env.get(name) {
                values.push(SecretString::from(value));
            }
        }
        values
    }

    /// `IP:PORT`, or `:PORT` for every IPv4 interface.
    fn socket_addr(&mut self, path: &str, text: &str) -> Option<SocketAddr> {
        let text = if text.starts_with(':') {
            format!("0.0.0.0{text}")
        } else {
            text.to_owned()
        };
        match text.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(
                    path,
                    format!(
                        "\"{text}\" is not a socket address; write IP:PORT such as \"0.0.0.0:8080\""
                    ),
                );
                None
            }
        }
    }

    fn path_or(
        &mut self,
        path: &str,
        value: Option<String>,
        default: impl FnOnce() -> PathBuf,
    ) -> PathBuf {
        match value {
            Some(v) => self
                .required_text(path, Some(v))
                .map(PathBuf::from)
                .unwrap_or_default(),
            None => default(),
        }
    }
}

/// Names end up in directory names, metric labels and log lines: keep them plain.
fn check_name(cx: &mut Checker, path: &str, name: &str, what: &str) {
    let plain = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !plain {
        cx.error(
            path,
            format!(
                "{what} name \"{}\" must be 1 to 100 letters, digits, `.`, `_` or `-`",
                name.escape_debug()
            ),
        );
    }
}

/// Git's own rules for a branch name (`git check-ref-format --branch`), minus the ones
/// that only matter for creating refs.
pub(crate) fn check_branch_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.chars().any(|c| c.is_control() || c == ' ') {
        return Err("it contains a space or a control character");
    }
    if name.contains(['~', '^', ':', '\\', '?', '*', '[']) {
        return Err("it contains one of ~ ^ : \\ ? * [");
    }
    if name.contains("..") || name.contains("@{") || name.contains("//") {
        return Err("it contains `..`, `@{` or `//`");
    }
    if name.starts_with(['-', '/', '.'])
        || name.ends_with(['/', '.'])
        || name.ends_with(".lock")
        || name == "@"
    {
        return Err("it starts with `-`, `/` or `.`, ends with `/`, `.` or `.lock`, or is `@`");
    }
    Ok(())
}

/// Where a Git repository lives, as far as validation cares.
enum Remote {
    Http(url::Url),
    /// `ssh://` URLs and scp-like `user@host:path`.
    Ssh(ssh_url::SshTarget),
    /// `file://` URLs and local paths.
    Local,
}

fn parse_remote(text: &str) -> Result<Remote, String> {
    if text.contains("://") {
        let url = url::Url::parse(text).map_err(|e| format!("not a valid URL: {e}"))?;
        if ssh_url::is_ssh_scheme(url.scheme()) {
            return ssh_url::parse_ssh_url(&url).map(Remote::Ssh);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not contain credentials; put them under `auth:`".to_owned());
        }
        return match url.scheme() {
            "https" | "http" if url.host_str().is_some_and(|h| !h.is_empty()) => {
                Ok(Remote::Http(url))
            }
            "https" | "http" => Err("URL has no host".to_owned()),
            "file" => Ok(Remote::Local),
            other => Err(format!(
                "unsupported URL scheme \"{other}\"; use https://, http://, ssh://, file:// or a local path"
            )),
        };
    }
    if looks_like_scp(text) {
        return ssh_url::parse_scp_like(text).map(Remote::Ssh);
    }
    Ok(Remote::Local)
}

/// `git@github.com:org/repo.git`: a colon before any slash, after a host-like prefix.
fn looks_like_scp(text: &str) -> bool {
    match (text.find(':'), text.find('/')) {
        (Some(colon), slash) => slash.is_none_or(|s| colon < s) && colon > 1,
        _ => false,
    }
}

/// `https://github.com/owner/repo.git/` → `owner/repo`.
fn project_path(url: &url::Url) -> String {
    let path = url.path().trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    path.split('/')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

fn default_api_url(repo_type: RepoType, web: &url::Url) -> Option<url::Url> {
    let host = web.host_str()?;
    let origin = match web.port() {
        Some(port) => format!("{}://{host}:{port}", web.scheme()),
        None => format!("{}://{host}", web.scheme()),
    };
    let api = (kind::of(repo_type).default_api)(host, &origin)?;
    url::Url::parse(&api).ok()
}

fn infer_repo_type(remote: &Remote) -> RepoType {
    match remote {
        Remote::Http(url) => url
            .host_str()
            .map_or(RepoType::Git, |host| kind::for_host(host).repo_type),
        Remote::Ssh(_) | Remote::Local => RepoType::Git,
    }
}

/// A directory only this user can reach: `$HOME/.cache/sentry/work` when `HOME` is a
/// directory, else `<temp>/sentry-<euid>` (created 0700 and checked before use, so one
/// pre-created by another user is refused rather than used).
fn default_work_dir(home: Option<&str>) -> PathBuf {
    match home.map(Path::new) {
        Some(home) if home.is_absolute() && home.is_dir() => home.join(".cache/sentry/work"),
        _ => std::env::temp_dir().join(format!("sentry-{}", nix::unistd::geteuid())),
    }
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

mod cluster;
mod pod;

fn contains_pem_certificate(bytes: &[u8]) -> bool {
    bytes
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
}

#[cfg(test)]
mod tests;

/// Units of one `parallel` group at once when `max_parallel` is not set.
const DEFAULT_MAX_PARALLEL: usize = 4;

/// Twice the CPUs Sentry may use: deploy commands mostly wait on the network and on
/// child processes, but an unbounded number of clones and shells would starve the host.
fn default_concurrent_units() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
}

/// `[A-Za-z_][A-Za-z0-9_]*`, what a POSIX shell accepts as a variable name.
fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// An RFC 1123 label: what a namespace name must be.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 subdomain: what a Secret name must be.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The SSH fields of an `auth:` section, checked once the remote is known.
struct RawSshKey {
    key_file: Option<String>,
    passphrase_env: Option<String>,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
