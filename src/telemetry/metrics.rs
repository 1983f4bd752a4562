//! Prometheus metrics (prometheus-client), and the one place that names them.
//!
//! Label values come only from the configuration (group and repository names, API hosts)
//! or from small fixed sets (HTTP status codes, results), so cardinality stays bounded
//! whatever the forges answer.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::deploy::{GroupResult, RunObserver, RunRef, Unit, UnitResult};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostStatus {
    host: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Host {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostKind {
    host: String,
    kind: String,
}

/// Where the request budgets are read at each scrape (the forge clients).
pub(crate) type BudgetSource = dyn Fn() -> Vec<crate::forge::budget::BudgetSnapshot> + Send + Sync;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RepoKind {
    repository: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Repo {
    repository: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupResultLabels {
    group: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Group {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RepoResult {
    repository: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForgeOutcome {
    forge: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeOutcome {
    r#type: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Queue {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Content type of the OpenMetrics exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text exposition.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites OpenMetrics text into the classic format: a counter family is named after its
/// `_total` sample, an info family becomes a gauge named `<name>_info`, and the
/// OpenMetrics-only `# UNIT` and `# EOF` lines go. Samples are unchanged (the encoder
/// writes no exemplars or `_created` series).
fn to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (classic_name, classic_kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gaugehistogram" | "stateset" | "unknown" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            if let Some((help_name, text)) = help.take() {
                if help_name == name {
                    out.push_str(&format!("# HELP {classic_name} {text}\n"));
                }
            }
            out.push_str(&format!("# TYPE {classic_name} {classic_kind}\n"));
            continue;
        }
        if let Some((name, text)) = help.take() {
            out.push_str(&format!("# HELP {name} {text}\n"));
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

pub struct Metrics {
    registry: Registry,
    poll_cycles: Counter,
    poll_cycle_duration: Histogram,
    forge_requests: Family<HostStatus, Counter>,
    forge_errors: Family<RepoKind, Counter>,
    rate_limit_remaining: Family<Host, Gauge>,
    rate_limit_reset: Family<Host, Gauge>,
    branch_changes: Family<Repo, Counter>,
    deployments: Family<GroupResultLabels, Counter>,
    deployment_duration: Family<Group, Histogram>,
    unit_runs: Family<RepoResult, Counter>,
    deployments_in_progress: Family<Group, Gauge>,
    pending_runs: Family<Group, Gauge>,
    pending_units: Family<Group, Gauge>,
    unit_retries: Family<RepoResult, Counter>,
    last_successful_cycle: FloatGauge,
    status_posts: Family<ForgeOutcome, Counter>,
    notifications: Family<TypeOutcome, Counter>,
    report_dropped: Family<Queue, Counter>,
    budget_used: Family<HostKind, Gauge>,
    budget_remaining: Family<HostKind, Gauge>,
    budget_in_flight: Family<Host, Gauge>,
    secondary_rate_limited: Family<Host, Counter>,
    sweep_effective_interval: FloatGauge,
    budget_source: std::sync::RwLock<Option<std::sync::Arc<BudgetSource>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sentry");
        let m = Metrics {
            poll_cycles: Counter::default(),
            poll_cycle_duration: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            forge_requests: Family::default(),
            forge_errors: Family::default(),
            rate_limit_remaining: Family::default(),
            rate_limit_reset: Family::default(),
            branch_changes: Family::default(),
            deployments: Family::default(),
            deployment_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 2.0, 14))
            }),
            unit_runs: Family::default(),
            deployments_in_progress: Family::default(),
            pending_runs: Family::default(),
            pending_units: Family::default(),
            unit_retries: Family::default(),
            last_successful_cycle: FloatGauge::default(),
            status_posts: Family::default(),
            notifications: Family::default(),
            report_dropped: Family::default(),
            budget_used: Family::default(),
            budget_remaining: Family::default(),
            budget_in_flight: Family::default(),
            secondary_rate_limited: Family::default(),
            sweep_effective_interval: FloatGauge::default(),
            budget_source: std::sync::RwLock::new(None),
            registry: Registry::default(),
        };
        registry.register(
            "poll_cycles",
            "Completed poll cycles",
            m.poll_cycles.clone(),
        );
        registry.register(
            "poll_cycle_duration_seconds",
            "Wall time of one poll cycle",
            m.poll_cycle_duration.clone(),
        );
        registry.register("forge_requests", "HTTP requests to forge APIs by host and status (304 = not modified, error = no response)", m.forge_requests.clone());
        registry.register(
            "forge_errors",
            "Branch checks that failed, by repository and kind",
            m.forge_errors.clone(),
        );
        registry.register(
            "rate_limit_remaining",
            "Remaining API quota last reported by the host",
            m.rate_limit_remaining.clone(),
        );
        registry.register(
            "rate_limit_reset_timestamp_seconds",
            "When the host's API quota resets (Unix seconds)",
            m.rate_limit_reset.clone(),
        );
        registry.register(
            "branch_changes",
            "Branch moves detected, by repository",
            m.branch_changes.clone(),
        );
        registry.register(
            "deployments",
            "Group runs that ended, by group and result",
            m.deployments.clone(),
        );
        registry.register(
            "deployment_duration_seconds",
            "Wall time of a group run",
            m.deployment_duration.clone(),
        );
        registry.register(
            "unit_runs",
            "Units that ended, by repository and status",
            m.unit_runs.clone(),
        );
        registry.register(
            "deployments_in_progress",
            "Group runs in progress",
            m.deployments_in_progress.clone(),
        );
        registry.register(
            "pending_runs",
            "Group runs waiting for the running one to end",
            m.pending_runs.clone(),
        );
        registry.register(
            "pending_units",
            "Units that could not run (setup failed, skipped) and wait for a retry, by group",
            m.pending_units.clone(),
        );
        registry.register(
            "unit_retries_scheduled",
            "Retries scheduled for units that could not run, by repository and the status that caused them",
            m.unit_retries.clone(),
        );
        registry.register(
            "last_successful_cycle_timestamp_seconds",
            "When the last poll cycle without errors ended (Unix seconds)",
            m.last_successful_cycle.clone(),
        );
        registry.register(
            "commit_status_posts",
            "Commit-status requests, by forge kind and outcome (created, already_set, rate_limited, error, rejected, gave_up)",
            m.status_posts.clone(),
        );
        registry.register(
            "notifications",
            "Notification deliveries, by type and outcome (sent, error, rejected, gave_up)",
            m.notifications.clone(),
        );
        registry.register(
            "report_dropped",
            "Commit statuses and notifications dropped because their queue was full, by queue",
            m.report_dropped.clone(),
        );
        registry.register(
            "request_budget_used",
            "Request budget points spent in the current window, by API host and kind (rest, graphql), summed over tokens",
            m.budget_used.clone(),
        );
        registry.register(
            "request_budget_remaining",
            "Request budget points left in the current window, by API host and kind (rest, graphql), summed over tokens",
            m.budget_remaining.clone(),
        );
        registry.register(
            "request_budget_in_flight",
            "Requests in flight to the API host under its budget",
            m.budget_in_flight.clone(),
        );
        registry.register(
            "secondary_rate_limited",
            "Rate-limit answers (403/429) received, by API host; the request budget keeps this at 0",
            m.secondary_rate_limited.clone(),
        );
        registry.register(
            "sweep_effective_interval_seconds",
            "Time between the starts of two sweeps: polling_interval, or longer when a request budget cannot cover a sweep in it",
            m.sweep_effective_interval.clone(),
        );
        // A gauge fixed at 1 rather than an OpenMetrics `info` family: the same
        // `sentry_build_info` sample, and a family classic parsers (promtool) accept.
        let build_info: Family<BuildLabels, Gauge> = Family::default();
        build_info
            .get_or_create(&BuildLabels {
                version: crate::build_info::VERSION.to_owned(),
                commit: crate::build_info::COMMIT.to_owned(),
            })
            .set(1);
        registry.register(
            "build_info",
            "Version and commit of this binary (always 1)",
            build_info,
        );
        Metrics { registry, ..m }
    }

    /// Reads the request budgets from `source` at every scrape.
    pub(crate) fn set_budget_source(&self, source: std::sync::Arc<BudgetSource>) {
        *self
            .budget_source
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(source);
    }

    /// Sets the budget gauges from the budgets' snapshots (several tokens of one host add up).
    fn refresh_budgets(&self) {
        let source = self
            .budget_source
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let Some(source) = source else { return };
        let mut sums: std::collections::BTreeMap<(String, &str), (i64, i64)> =
            std::collections::BTreeMap::new();
        let mut in_flight: std::collections::BTreeMap<String, i64> =
            std::collections::BTreeMap::new();
        for b in source() {
            let rest = sums.entry((b.host.clone(), "rest")).or_default();
            rest.0 += i64::from(b.rest_used);
            rest.1 += i64::from(b.limits.rest_points_per_minute);
            let graphql = sums.entry((b.host.clone(), "graphql")).or_default();
            graphql.0 += i64::from(b.graphql_used);
            graphql.1 += i64::from(b.limits.graphql_points_per_minute);
            *in_flight.entry(b.host).or_default() += i64::try_from(b.in_flight).unwrap_or(0);
        }
        for ((host, kind), (used, limit)) in sums {
            let key = HostKind {
                host,
                kind: kind.to_owned(),
            };
            self.budget_used.get_or_create(&key).set(used);
            self.budget_remaining
                .get_or_create(&key)
                .set((limit - used).max(0));
        }
        for (host, n) in in_flight {
            self.budget_in_flight.get_or_create(&Host { host }).set(n);
        }
    }

    /// The effective interval of the sweep just planned.
    pub fn sweep_effective_interval(&self, interval: Duration) {
        self.sweep_effective_interval.set(interval.as_secs_f64());
    }

    /// The registry in the OpenMetrics text format (what Prometheus asks for in `Accept`).
    pub fn encode(&self) -> String {
        self.refresh_budgets();
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The registry in the classic Prometheus text format (0.0.4), which `promtool`,
    /// Telegraf, Vector and older scrapers read.
    pub fn encode_classic(&self) -> String {
        to_classic(&self.encode())
    }

    /// The body and its content type for a scraper that sent `accept`: OpenMetrics only
    /// when it asks for it, the classic text format otherwise.
    pub fn negotiate(&self, accept: Option<&str>) -> (&'static str, String) {
        if accept.is_some_and(|a| {
            a.to_ascii_lowercase()
                .contains("application/openmetrics-text")
        }) {
            (OPENMETRICS_CONTENT_TYPE, self.encode())
        } else {
            (CLASSIC_CONTENT_TYPE, self.encode_classic())
        }
    }

    pub fn cycle(&self, duration: Duration, errors: usize) {
        self.poll_cycles.inc();
        self.poll_cycle_duration.observe(duration.as_secs_f64());
        if errors == 0 {
            self.last_successful_cycle
                .set(unix_seconds(SystemTime::now()));
        }
    }

    pub fn forge_request(&self, host: &str, status: &str) {
        self.forge_requests
            .get_or_create(&HostStatus {
                host: host.to_owned(),
                status: status.to_owned(),
            })
            .inc();
    }

    pub fn forge_error(&self, repository: &str, kind: &str) {
        self.forge_errors
            .get_or_create(&RepoKind {
                repository: repository.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn rate_limit(&self, host: &str, remaining: Option<u64>, reset: Option<SystemTime>) {
        let key = Host {
            host: host.to_owned(),
        };
        if let Some(remaining) = remaining {
            self.rate_limit_remaining
                .get_or_create(&key)
                .set(i64::try_from(remaining).unwrap_or(i64::MAX));
        }
        if let Some(reset) = reset {
            self.rate_limit_reset
                .get_or_create(&key)
                .set(unix_seconds(reset) as i64);
        }
    }

    pub fn branch_change(&self, repository: &str) {
        self.branch_changes
            .get_or_create(&Repo {
                repository: repository.to_owned(),
            })
            .inc();
    }

    pub fn group_run_started(&self, group: &str) {
        self.deployments_in_progress
            .get_or_create(&group_label(group))
            .inc();
    }

    pub fn group_run_ended(&self, group: &str, succeeded: bool, duration: Duration) {
        let result = if succeeded { "succeeded" } else { "failed" };
        self.deployments_in_progress
            .get_or_create(&group_label(group))
            .dec();
        self.deployments
            .get_or_create(&GroupResultLabels {
                group: group.to_owned(),
                result: result.to_owned(),
            })
            .inc();
        self.deployment_duration
            .get_or_create(&group_label(group))
            .observe(duration.as_secs_f64());
    }

    pub fn unit_ended(&self, repository: &str, result: &str) {
        self.unit_runs
            .get_or_create(&RepoResult {
                repository: repository.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn set_pending(&self, group: &str, pending: bool) {
        self.pending_runs
            .get_or_create(&group_label(group))
            .set(i64::from(pending));
    }

    /// How many units of `group` wait for a retry.
    pub fn set_pending_units(&self, group: &str, count: usize) {
        self.pending_units
            .get_or_create(&group_label(group))
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// One commit-status request to a `forge` kind ended with `outcome`.
    pub fn status_post(&self, forge: &str, outcome: &str) {
        self.status_posts
            .get_or_create(&ForgeOutcome {
                forge: forge.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// One delivery attempt of a notification of type `kind` ended with `outcome`.
    pub fn notification(&self, kind: &str, outcome: &str) {
        self.notifications
            .get_or_create(&TypeOutcome {
                r#type: kind.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A message for `queue` (`status`, `notify`) was dropped: the queue was full.
    pub fn report_dropped(&self, queue: &str) {
        self.report_dropped
            .get_or_create(&Queue {
                queue: queue.to_owned(),
            })
            .inc();
    }

    /// A retry was scheduled for a unit of `repository` that ended with `status`.
    pub fn retry_scheduled(&self, repository: &str, status: &str) {
        self.unit_retries
            .get_or_create(&RepoResult {
                repository: repository.to_owned(),
                result: status.to_owned(),
            })
            .inc();
    }
}

/// Deployments feed the in-progress gauge, the run and unit counters and the durations.
impl RunObserver for Metrics {
    fn group_started(&self, run: RunRef<'_>, _units: &[Unit]) {
        self.group_run_started(run.group);
    }

    fn unit_ended(&self, _run: RunRef<'_>, result: &UnitResult) {
        Metrics::unit_ended(self, &result.unit.repository, result.status.as_str());
    }

    fn group_ended(&self, result: &GroupResult) {
        self.group_run_ended(&result.group, result.succeeded(), result.duration);
    }
}

/// The forge clients report every request and rate-limit header here.
impl crate::forge::ForgeEvents for Metrics {
    fn request(&self, host: &str, status: &str) {
        self.forge_request(host, status);
    }

    fn rate_limit(&self, host: &str, remaining: Option<u64>, reset: Option<SystemTime>) {
        Metrics::rate_limit(self, host, remaining, reset);
    }

    fn rate_limited(&self, host: &str) {
        self.secondary_rate_limited
            .get_or_create(&Host {
                host: host.to_owned(),
            })
            .inc();
    }
}

fn group_label(group: &str) -> Group {
    Group {
        group: group.to_owned(),
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_families_after_their_samples() {
        let m = Metrics::new();
        m.forge_request("api.github.com", "200");
        let classic = m.encode_classic();
        assert!(!classic.contains("# EOF"), "{classic}");
        assert!(
            classic.contains("# TYPE sentry_poll_cycles_total counter\n"),
            "{classic}"
        );
        assert!(
            classic.contains("# HELP sentry_poll_cycles_total Completed poll cycles.\n"),
            "{classic}"
        );
        assert!(
            classic.contains("# TYPE sentry_build_info gauge\n"),
            "{classic}"
        );
        assert!(
            classic.contains(
                "sentry_forge_requests_total{host=\"api.github.com\",status=\"200\"} 1\n"
            ),
            "{classic}"
        );
        let (ct, om) = m.negotiate(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        ));
        assert_eq!(ct, OPENMETRICS_CONTENT_TYPE);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert_eq!(m.negotiate(Some("text/plain")).0, CLASSIC_CONTENT_TYPE);
        assert_eq!(m.negotiate(None).0, CLASSIC_CONTENT_TYPE);
    }

    #[test]
    fn encodes_every_family_with_expected_names() {
        let m = Metrics::new();
        m.cycle(Duration::from_millis(30), 0);
        m.forge_request("api.github.com", "304");
        m.forge_error("rag", "not_found");
        m.rate_limit("api.github.com", Some(4999), Some(SystemTime::now()));
        m.branch_change("rag");
        m.group_run_started("g");
        m.group_run_ended("g", true, Duration::from_secs(3));
        m.unit_ended("rag", "succeeded");
        m.set_pending("g", false);
        m.status_post("github", "created");
        m.notification("slack", "sent");
        m.report_dropped("notify");
        crate::forge::ForgeEvents::rate_limited(&m, "api.github.com");
        m.sweep_effective_interval(Duration::from_secs(133));
        m.set_budget_source(std::sync::Arc::new(|| {
            use crate::forge::budget::{Budget, BudgetLimits, Cost};
            let budget = Budget::new("api.github.com", BudgetLimits::GITHUB);
            futures_util::FutureExt::now_or_never(budget.acquire(Cost::Rest { points: 5 }));
            vec![budget.snapshot(), budget.snapshot()]
        }));
        let text = m.encode();
        for name in [
            "sentry_request_budget_used{host=\"api.github.com\",kind=\"rest\"} 10",
            "sentry_request_budget_remaining{host=\"api.github.com\",kind=\"rest\"} 1790",
            "sentry_request_budget_remaining{host=\"api.github.com\",kind=\"graphql\"} 4000",
            "sentry_request_budget_in_flight{host=\"api.github.com\"} 0",
            "sentry_secondary_rate_limited_total{host=\"api.github.com\"} 1",
            "sentry_sweep_effective_interval_seconds 133",
            "sentry_poll_cycles_total 1",
            "sentry_poll_cycle_duration_seconds_bucket",
            "sentry_forge_requests_total{host=\"api.github.com\",status=\"304\"} 1",
            "sentry_forge_errors_total{repository=\"rag\",kind=\"not_found\"} 1",
            "sentry_rate_limit_remaining{host=\"api.github.com\"} 4999",
            "sentry_rate_limit_reset_timestamp_seconds{host=\"api.github.com\"}",
            "sentry_branch_changes_total{repository=\"rag\"} 1",
            "sentry_deployments_total{group=\"g\",result=\"succeeded\"} 1",
            "sentry_deployment_duration_seconds_sum{group=\"g\"} 3",
            "sentry_unit_runs_total{repository=\"rag\",result=\"succeeded\"} 1",
            "sentry_deployments_in_progress{group=\"g\"} 0",
            "sentry_pending_runs{group=\"g\"} 0",
            "sentry_last_successful_cycle_timestamp_seconds ",
            "sentry_build_info{version=",
            "sentry_commit_status_posts_total{forge=\"github\",outcome=\"created\"} 1",
            "sentry_notifications_total{type=\"slack\",outcome=\"sent\"} 1",
            "sentry_report_dropped_total{queue=\"notify\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
