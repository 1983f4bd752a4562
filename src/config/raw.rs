//! The configuration file as written: serde types that mirror the YAML one to one.
//!
//! Nothing here is trusted yet: strings still hold `${VAR}` references, durations are
//! still numbers or text, URLs are unparsed. `validate` turns these into the checked
//! types of the parent module. The JSON Schema shipped as `sentry.schema.json` is derived
//! from these types, so schema and parser cannot drift apart. Unknown keys are denied by
//! the schema and reported by `schema_keys`, not by serde, so that one typo does not hide
//! the other problems of an item.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

/// Top level of `sentry.yaml`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[schemars(title = "Sentry configuration")]
pub struct RawConfig {
    /// How often every watched branch is checked. Default `60s`.
    pub polling_interval: Option<RawDuration>,
    /// Where the last handled SHA of every branch is kept. Default `.sentry/state.json`.
    pub state_file: Option<String>,
    /// Directory for in-flight QA checkouts, private to Sentry's user. Default
    /// `$HOME/.cache/sentry/work`, else `<system temp dir>/sentry-<uid>`.
    pub work_dir: Option<String>,
    /// How long running commands get to stop after SIGTERM before they are killed. Default `20s`.
    pub shutdown_grace: Option<RawDuration>,
    /// Optional path of an append-only JSON-lines audit log of every deployment.
    pub audit_log: Option<String>,
    /// Timeout of one HTTP request to a forge API. Default `30s`.
    pub request_timeout: Option<RawDuration>,
    /// At most this many requests in flight to one API host. Default 8.
    pub max_requests_per_host: Option<u32>,
    /// Request budget overrides per API host (`host` or `host:port`, as in `api_url`). The
    /// defaults are the forge's published limits: GitHub 100 concurrent, 900 REST points
    /// and 2,000 GraphQL points per minute; GitLab 100 concurrent, 2,000 per minute.
    pub rate_limits: Option<BTreeMap<String, RawRateLimit>>,
    /// How often a repository whose push webhooks arrive is still polled (the safety net
    /// in case a webhook is lost). Default: `polling_interval` (webhooks change nothing).
    pub webhook_poll_interval: Option<RawDuration>,
    /// At most this many units deploy at once, across all groups. Default 2 × CPUs.
    pub max_concurrent_units: Option<u32>,
    /// When a unit could not run (clone failed, checkout directory, skipped), how soon it
    /// is tried again without a new push.
    pub pending_retry: Option<RawPendingRetry>,
    /// `true` lets a token travel over plain `http://` to a host that is not loopback (a
    /// warning then); otherwise that is an error. Default `false`.
    pub allow_insecure_http: Option<bool>,
    /// Names of environment variables (for example the keys of a Kubernetes Secret passed
    /// with `envFrom`) whose values are masked in command output like tokens.
    pub secret_env: Option<Vec<String>>,
    /// How GitHub heads are asked for: `rest` (one request per branch, conditional),
    /// `graphql` (batched queries, many repositories and branches each) or `auto` (GraphQL
    /// for an API host whose REST polling would use more than half of GitHub's secondary
    /// limit of 900 REST points a minute). Default `auto`.
    pub github_lookup: Option<String>,
    /// Trust for HTTPS: extra certificate authorities for the forge APIs, ls-remote and clones.
    pub tls: Option<RawTls>,
    /// SSH remotes: the known host keys.
    pub ssh: Option<RawSsh>,
    /// A forward proxy for API requests, ls-remote and clones, instead of the
    /// environment's `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`.
    pub proxy: Option<RawProxy>,
    /// The HTTP server for health, metrics and webhooks.
    pub server: Option<RawServer>,
    /// Webhook secrets; an endpoint whose secret is unset or empty answers 404.
    pub webhooks: Option<RawWebhooks>,
    /// Several replicas on Kubernetes: only the holder of a Lease polls and deploys.
    pub leader_election: Option<RawLeaderElection>,
    /// Where the state is kept: `state_file` (the default), or a ConfigMap.
    pub state: Option<RawStateConfig>,
    /// Groups of repositories that are deployed together, by name.
    // Here for the schema: `validate` extracts each group and repository on its own, so
    // that one wrong type does not hide the problems of the others.
    #[allow(dead_code)]
    pub groups: Option<BTreeMap<String, RawGroup>>,
    /// The watched repositories.
    #[allow(dead_code)]
    pub repositories: Option<Vec<RawRepository>>,
}

/// The request budget of one API host, per token.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawRateLimit {
    /// Requests in flight at once (REST and GraphQL together).
    pub concurrency: Option<u32>,
    /// REST points per minute: a GET or HEAD costs 1, a write 5 on GitHub (1 on GitLab).
    pub rest_points_per_minute: Option<u32>,
    /// GraphQL points per minute.
    pub graphql_points_per_minute: Option<u32>,
    /// The sliding window the per-minute limits apply to. Default `60s`; shorter only for
    /// tests and benchmarks against a fake forge.
    pub window: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawTls {
    /// PEM file of certificate authorities (a corporate CA) trusted besides the system's,
    /// by the API client and by Git (ls-remote, clones). `GIT_SSL_CAINFO` adds one too.
    pub ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawProxy {
    /// `http://host:port` (or `https://`); a password must come from an environment
    /// variable: `http://user:${PROXY_PASSWORD}@host:port`.
    pub url: Option<String>,
    /// Hosts reached directly, as in `NO_PROXY`: `*`, `example.com` or `.example.com`
    /// (the domain and its subdomains), IP addresses.
    pub no_proxy: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawSsh {
    /// OpenSSH known_hosts file the host key of every SSH remote must be in (plain,
    /// hashed and `[host]:port` entries); an unknown or changed key is refused. Default
    /// `~/.ssh/known_hosts`.
    pub known_hosts_file: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawPendingRetry {
    /// Delay before the first retry; it doubles (with jitter) after each failed try. Default `1m`.
    pub initial: Option<RawDuration>,
    /// The longest delay between two tries. Default `30m`.
    pub max: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawLeaderElection {
    /// `true`: replicas elect a leader on a `coordination.k8s.io/v1` Lease. Default `false`.
    pub enabled: Option<bool>,
    /// Name of the Lease. Default `sentry-leader`.
    pub lease_name: Option<String>,
    /// Namespace of the Lease. Default: the pod's namespace (or the kubeconfig's).
    pub namespace: Option<String>,
    /// How long a lease is valid without renewal; standbys take over after it. Default `15s`.
    pub lease_duration: Option<RawDuration>,
    /// A leader that could not renew within this stops deploying. Default `10s`.
    pub renew_deadline: Option<RawDuration>,
    /// How often the lease is renewed or checked. Default `2s`.
    pub retry_period: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawStateConfig {
    /// `file` (`state_file`, the default) or `kubernetes` (a ConfigMap; needs leader election).
    pub backend: Option<String>,
    /// Name of the ConfigMap with the `kubernetes` backend. Default `sentry-state`.
    pub configmap: Option<String>,
    /// Namespace of the ConfigMap. Default: the pod's namespace (or the kubeconfig's).
    pub namespace: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawServer {
    /// `false` turns the HTTP server off. Default `true`.
    pub enabled: Option<bool>,
    /// Socket address to listen on. Default `0.0.0.0:8080`.
    pub listen: Option<String>,
    /// When set, the status API and the dashboard require it: `Authorization: Bearer
    /// TOKEN`, or `?token=TOKEN` once in a browser (kept in a cookie). Empty or absent
    /// leaves read access open; probes, metrics and webhooks never need it.
    pub read_token: Option<String>,
    /// The address people reach Sentry at (`https://sentry.example.com`); commit statuses
    /// and notifications link to `<public_url>/runs/<run id>`. Default: no link.
    pub public_url: Option<String>,
    /// A separate socket address for the webhook endpoints; `listen` then serves only
    /// health, readiness and metrics. Default: webhooks on `listen`.
    pub webhook_listen: Option<String>,
    /// Time a client has to send a request's headers. Default `10s`.
    pub header_timeout: Option<RawDuration>,
    /// Time one request may take, body included. Default `30s`.
    pub request_timeout: Option<RawDuration>,
    /// Connections open at once, per listener; more wait to be accepted. Default `256`.
    pub max_connections: Option<u64>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawWebhooks {
    /// Secret GitHub signs webhook bodies with (`X-Hub-Signature-256`).
    pub github_secret: Option<String>,
    /// Token GitLab sends in `X-Gitlab-Token`.
    pub gitlab_token: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawGroup {
    /// `parallel` (default) or `sequential`.
    pub execution_strategy: Option<String>,
    /// With `parallel`: at most this many units at once. Default 4.
    pub max_parallel: Option<i64>,
    /// Keep starting units after one failed. Default `false`.
    pub continue_on_error: Option<bool>,
    /// Bound on a whole group run (integer seconds or `15m`). Default `1h`.
    pub global_timeout: Option<RawDuration>,
    /// `changed` (default): deploy the repositories that changed; `all`: every repository of the group.
    pub deploy_scope: Option<String>,
    /// Commit statuses for the group's repositories (each repository may override).
    pub report: Option<RawReport>,
    /// Where to tell people about the group's runs: generic webhooks and Slack.
    pub notify: Option<Vec<RawNotify>>,
    /// Where the group's units run: `{kind: local}` (default, child processes of Sentry) or
    /// `{kind: kubernetes, namespace, image, …}` (one Kubernetes Job per unit).
    pub executor: Option<RawExecutor>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawResources {
    /// What the scheduler reserves, by resource name.
    pub requests: Option<BTreeMap<String, String>>,
    /// The most the container may use, by resource name.
    pub limits: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawExecutor {
    /// `local` (default) or `kubernetes`.
    pub kind: Option<String>,
    /// Kubernetes: the namespace the Jobs are created in (required). Give QA Jobs a
    /// namespace of their own: whoever can create pods there can read its Secrets.
    pub namespace: Option<String>,
    /// Kubernetes: the container image, Sentry's own (required; it runs `sentry exec-unit`).
    pub image: Option<String>,
    /// Kubernetes: the ConfigMap in `namespace` holding this configuration as `sentry.yaml`,
    /// mounted into the pod for `sentry exec-unit`. Default `sentry-config`.
    pub config_map: Option<String>,
    /// Kubernetes: the pod's service account. Default: the namespace's `default`.
    pub service_account_name: Option<String>,
    /// Kubernetes: the pod's `nodeSelector`.
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Kubernetes: the container's resource `requests` and `limits` (`cpu: 500m`, `memory: 1Gi`).
    pub resources: Option<RawResources>,
    /// Kubernetes: Secrets whose keys become the container's environment (`envFrom`).
    pub env_from_secrets: Option<Vec<String>>,
    /// Kubernetes: environment variables from single keys of Secrets (`secretKeyRef`),
    /// by variable name: `{QA_TOKEN: {secret: qa-credentials, key: token}}`.
    pub env_secret_keys: Option<BTreeMap<String, super::pod::RawSecretKey>>,
    /// Kubernetes: Secrets and ConfigMaps mounted into the container as files.
    pub volumes: Option<Vec<super::pod::RawPodVolume>>,
    /// Kubernetes: the pod's `tolerations`, to run on tainted (dedicated) nodes.
    pub tolerations: Option<Vec<super::pod::RawToleration>>,
    /// Kubernetes: a pod that has not started after this long fails the unit as setup
    /// failed (unschedulable, image pull errors). Default `5m`.
    pub start_timeout: Option<RawDuration>,
    /// Kubernetes: how long a failed Job is kept for inspection before Sentry deletes it.
    /// Default `1h`.
    pub keep_failed: Option<RawDuration>,
    /// Kubernetes: `ttlSecondsAfterFinished`, the backstop for Jobs Sentry could not delete.
    /// Default `1d`.
    pub ttl_after_finished: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawReport {
    /// Put each unit's outcome on the watched commit as a commit status (GitHub, GitLab),
    /// with the monitor's token. Default `false`.
    pub commit_status: Option<bool>,
    /// The status's name (GitHub `context`, GitLab `name`). Default `sentry/<group>`.
    pub context: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawNotify {
    /// `webhook` (JSON, signed with `secret`) or `slack` (an incoming-webhook URL).
    #[serde(rename = "type")]
    #[schemars(required)]
    pub kind: Option<String>,
    /// Where to POST; a secret (masked, never logged), usually `${VAR}`.
    #[schemars(required)]
    pub url: Option<String>,
    /// With `webhook`: signs each body, `X-Sentry-Signature: sha256=<hex HMAC-SHA256>`.
    pub secret: Option<String>,
    /// Any of `failure`, `recovery`, `success`, `started`. Default `[failure, recovery]`.
    pub on: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawRepository {
    /// Unique name; letters, digits, `.`, `_` and `-`.
    #[schemars(required)]
    pub name: Option<String>,
    /// Name of a group under `groups:`.
    #[schemars(required)]
    pub group: Option<String>,
    #[schemars(required)]
    pub monitor: Option<RawMonitor>,
    #[schemars(required)]
    pub deploy: Option<RawDeploy>,
    /// Commit statuses for this repository; overrides the group's `report`.
    pub report: Option<RawReport>,
    /// Certificate authorities trusted for this repository's hosts (its API, Git and QA
    /// hosts) besides the top-level `tls.ca_file` and the system's.
    pub tls: Option<RawTls>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawMonitor {
    /// Web or clone URL of the watched repository (`file://` and local paths with `repo_type: git`).
    #[schemars(required)]
    pub repo_url: Option<String>,
    /// Exact branch names and glob patterns (`release/*`; `*` stays within one `/` segment, `**` crosses them).
    #[schemars(required)]
    pub branches: Option<Vec<String>>,
    /// `github`, `gitlab` or `git` (any Git host, checked with ls-remote).
    #[schemars(required)]
    pub repo_type: Option<String>,
    /// API root; derived from `repo_url` when absent.
    pub api_url: Option<String>,
    pub auth: Option<RawAuth>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawDeploy {
    /// URL of the QA repository that is cloned for every deployment.
    #[schemars(required)]
    pub qa_repo_url: Option<String>,
    /// Branch of the QA repository to check out.
    #[schemars(required)]
    pub qa_repo_branch: Option<String>,
    /// `github`, `gitlab` or `git`.
    pub repo_type: Option<String>,
    pub auth: Option<RawAuth>,
    /// Free-form project name, passed to commands as `SENTRY_PROJECT_NAME`.
    pub project_name: Option<String>,
    /// Shell commands run in order in the QA checkout. `$VAR` here belongs to the shell.
    #[schemars(required)]
    pub commands: Option<Vec<String>>,
    /// Extra environment variables for the commands.
    pub env: Option<BTreeMap<String, String>>,
    /// Names of `env` entries whose values are secrets, masked in output like tokens. A value
    /// written as a single `${VAR}` reference is a secret without being listed here.
    pub secret_env: Option<Vec<String>>,
    /// What commands get of Sentry's own environment: `true` (default) all of it except
    /// the variables holding Sentry's tokens and webhook secrets; `false` only `PATH`,
    /// `HOME`, `USER`, `LANG`, `LC_ALL`, `TZ` and `TMPDIR`; a list, those plus the names given.
    pub inherit_env: Option<RawInheritEnv>,
    /// Bound on each command (integer seconds or `10m`). Default: only the group's `global_timeout`.
    pub timeout: Option<RawDuration>,
    /// Retries of a failed unit. Default 0: commands may not be idempotent.
    pub retries: Option<i64>,
    /// Shell that runs each command with `-c`. Default `/bin/sh`.
    pub shell: Option<String>,
}

/// `deploy.inherit_env`: a bool or a list of variable names.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawInheritEnv {
    All(bool),
    Names(Vec<String>),
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawAuth {
    pub username: Option<String>,
    pub token: Option<String>,
    /// Private key (a deploy key) offered to an SSH remote (`ssh://user@host/path`,
    /// `user@host:path`); without it, the SSH agent's keys.
    pub ssh_key_file: Option<String>,
    /// Name of the environment variable holding the passphrase of `ssh_key_file`.
    pub ssh_key_passphrase_env: Option<String>,
    /// Authenticate as a GitHub App installation instead of with a token: short-lived
    /// installation tokens are minted and refreshed. Excludes `token`.
    pub github_app: Option<RawGithubApp>,
}

/// `auth.github_app`: a GitHub App that is installed on the repository.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawGithubApp {
    /// The App's ID (its settings page, "App ID").
    #[schemars(required)]
    pub app_id: Option<u64>,
    /// The installation's ID; found from the repository (`GET /repos/{owner}/{repo}/installation`) when absent.
    pub installation_id: Option<u64>,
    /// PEM file of the App's RSA private key (as GitHub downloads it, or PKCS#8).
    #[schemars(required)]
    pub private_key_file: Option<String>,
}

/// A duration as written: integer seconds (`900`) or text (`90s`, `15m`, `1h30m`).
#[derive(Debug, Clone, PartialEq, JsonSchema)]
#[schemars(untagged)]
pub enum RawDuration {
    Seconds(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration: integer seconds or text such as \"90s\", \"15m\", \"1h\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawDuration, E> {
                Ok(RawDuration::Seconds(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawDuration, E> {
                Ok(RawDuration::Seconds(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration::Text(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}
