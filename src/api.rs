//! The read-only status API of `watch` (`/api/v1/…`): the live view of groups,
//! repositories, backoffs and rate limits, the run history, and server-sent events for
//! run and unit transitions. The dashboard ([`crate::dashboard`]) renders the same views.
//!
//! Every answer is built from snapshots taken under short locks (state, scheduler,
//! monitor backoffs, forge stats, history) and released before anything is awaited, so
//! no request can hold up the poll loop or a deployment. When `server.read_token` is set,
//! every route here requires it (bearer header, or a cookie set by `?token=`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::config::{BranchSpec, Config};
use crate::history::{History, RunRecord};
use crate::monitor::Monitor;
use crate::monitor::scheduler::GroupSnapshot;
use crate::monitor::state::{DeployRecord, PendingRecord, State as Stored};

/// Cookie that carries the read token for a browser after `?token=`.
const TOKEN_COOKIE: &str = "sentry_read_token";
/// Runs per answer of `/api/v1/runs` unless `limit` says otherwise, and at most.
const DEFAULT_RUNS: usize = 50;
const MAX_RUNS: usize = 500;

/// What the API and the dashboard read from.
#[derive(Clone)]
pub struct Live {
    pub monitor: Arc<Monitor>,
    pub history: Arc<History>,
    /// Cancelled when the server stops: open event streams end then, or the graceful
    /// shutdown would wait for every browser tab to close.
    pub stop: CancellationToken,
    /// This replica's identity when it leads under leader election.
    pub leader: Option<String>,
}

/// Where the live view is, once there is one: a single `watch` fills it at start; a
/// replica only when it becomes the leader (a standby answers 503 and names no monitor).
#[derive(Clone, Default)]
pub struct LiveSlot(Arc<std::sync::OnceLock<Live>>);

impl LiveSlot {
    pub fn ready(live: Live) -> LiveSlot {
        let slot = LiveSlot::default();
        slot.set(live);
        slot
    }

    /// Fills the slot; a second call keeps the first view.
    pub fn set(&self, live: Live) {
        let _ = self.0.set(live);
    }
}

/// The live view, for a handler; a standby answers 503 before the handler runs.
pub struct Leading(pub Live);

impl axum::extract::FromRequestParts<LiveSlot> for Leading {
    type Rejection = Response;

    async fn from_request_parts(
        _parts: &mut axum::http::request::Parts,
        slot: &LiveSlot,
    ) -> Result<Self, Self::Rejection> {
        slot.0.get().cloned().map(Leading).ok_or_else(|| {
            let body = "this replica is a standby: the leader serves the live view\n";
            (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
        })
    }
}

/// `/api/v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub generated_at: String,
    /// When the last poll cycle completed.
    pub last_cycle: Option<String>,
    /// The leader's identity when Sentry runs with leader election (this replica, which
    /// answers because it leads); `None` for a single `watch`.
    pub leader: Option<String>,
    pub groups: Vec<GroupView>,
    pub repositories: Vec<RepoView>,
    pub rate_limits: Vec<RateLimitView>,
    /// The request budget of each API host and token (issue #20).
    #[serde(default)]
    pub budgets: Vec<BudgetView>,
    /// Seconds between the starts of two sweeps: `polling_interval`, or longer when a
    /// request budget cannot cover a sweep in it; `None` before the first sweep.
    #[serde(default)]
    pub effective_interval_secs: Option<f64>,
}

/// One request budget (API host and token; the token is never shown).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetView {
    pub host: String,
    pub concurrency: usize,
    pub in_flight: usize,
    /// Points spent in the current window, and the window's limit.
    pub rest_used: u32,
    pub rest_limit: u32,
    pub graphql_used: u32,
    pub graphql_limit: u32,
    pub window_secs: f64,
    /// Rate-limit answers (403/429) received since start.
    pub throttled: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupView {
    pub name: String,
    pub strategy: String,
    /// `running`, `retry_waiting` (units wait for their retry) or `idle`.
    pub state: String,
    /// The id of the run in progress.
    pub running_run: Option<String>,
    #[serde(flatten)]
    pub units: GroupSnapshot,
    pub repositories: usize,
    pub last_run: Option<RunSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub run_id: String,
    pub status: String,
    pub trigger: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub duration_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoView {
    pub name: String,
    pub group: String,
    pub repo_type: String,
    /// Seconds until the next check while the repository backs off after errors.
    pub backoff_secs: Option<u64>,
    pub branches: Vec<BranchView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BranchView {
    pub branch: String,
    /// The handled SHA; `None` before the branch was seen or while its first change is
    /// pending.
    pub sha: Option<String>,
    pub commit_url: Option<String>,
    /// When the handled SHA was recorded.
    pub seen_at: Option<String>,
    pub last_deploy: Option<DeployRecord>,
    pub pending: Option<PendingRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateLimitView {
    pub host: String,
    pub remaining: Option<u64>,
    pub reset: Option<String>,
    /// Set while every request to the host is paused.
    pub paused_until: Option<String>,
}

/// The routes, wrapped by the read-token check when a token is configured.
pub fn router(live: LiveSlot, read_token: Option<SecretString>) -> Router {
    let routes = Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/runs", get(runs))
        .route("/api/v1/runs/{run_id}", get(run))
        .route("/api/v1/events", get(events))
        .merge(crate::dashboard::routes())
        .with_state(live);
    match read_token {
        Some(token) => routes.layer(middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        )),
        None => routes,
    }
}

/// Builds the status view from snapshots; no lock is held when it returns.
pub fn status_view(live: &Live) -> StatusView {
    let monitor = &live.monitor;
    let config = monitor.config();
    let stored = monitor.state().snapshot();
    let scheduled = monitor.scheduler().snapshot();
    let backoffs = monitor.backoffs();
    let latest = live.history.latest();
    let stats = monitor.forges().stats();
    StatusView {
        version: crate::build_info::VERSION.to_owned(),
        generated_at: crate::telemetry::now_rfc3339(),
        last_cycle: monitor.health().last_cycle_end().map(rfc3339),
        leader: live.leader.clone(),
        groups: group_views(config, scheduled, &latest),
        repositories: repo_views(config, &stored, &backoffs),
        rate_limits: stats
            .rate_limits
            .into_iter()
            .map(|(host, l)| RateLimitView {
                host,
                remaining: l.remaining,
                reset: l.reset.map(rfc3339),
                paused_until: l.paused_until.map(rfc3339),
            })
            .collect(),
        budgets: monitor
            .forges()
            .budgets()
            .into_iter()
            .map(|b| BudgetView {
                host: b.host,
                concurrency: b.limits.concurrency,
                in_flight: b.in_flight,
                rest_used: b.rest_used,
                rest_limit: b.limits.rest_points_per_minute,
                graphql_used: b.graphql_used,
                graphql_limit: b.limits.graphql_points_per_minute,
                window_secs: b.limits.window.as_secs_f64(),
                throttled: b.throttled,
            })
            .collect(),
        effective_interval_secs: monitor
            .health()
            .effective_interval()
            .map(|d| d.as_secs_f64()),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

type Latest = HashMap<String, (Option<String>, Option<Arc<RunRecord>>)>;

fn group_views(
    config: &Config,
    mut scheduled: BTreeMap<String, GroupSnapshot>,
    latest: &Latest,
) -> Vec<GroupView> {
    let mut sizes: HashMap<&str, usize> = HashMap::new();
    for repo in &config.repositories {
        *sizes.entry(repo.group.as_str()).or_default() += 1;
    }
    config
        .groups
        .iter()
        .map(|group| {
            let units = scheduled.remove(&group.name).unwrap_or_default();
            let (running_run, last) = latest.get(&group.name).cloned().unwrap_or_default();
            let state = if running_run.is_some() || !units.running.is_empty() {
                "running"
            } else if !units.deferred.is_empty() {
                "retry_waiting"
            } else {
                "idle"
            };
            GroupView {
                name: group.name.clone(),
                strategy: format!("{:?}", group.execution_strategy).to_lowercase(),
                state: state.to_owned(),
                running_run,
                units,
                repositories: sizes.get(group.name.as_str()).copied().unwrap_or(0),
                last_run: last.map(|r| summary(&r)),
            }
        })
        .collect()
}

pub fn summary(r: &RunRecord) -> RunSummary {
    RunSummary {
        run_id: r.run_id.clone(),
        status: r.status.clone(),
        trigger: r.trigger.clone(),
        started_at: r.started_at.clone(),
        ended_at: r.ended_at.clone(),
        duration_secs: r.duration_secs,
    }
}

fn repo_views(
    config: &Config,
    stored: &Stored,
    backoffs: &HashMap<String, Duration>,
) -> Vec<RepoView> {
    config
        .repositories
        .iter()
        .map(|repo| {
            let state = stored.repositories.get(&repo.name);
            // Stored branches (handled or pending), then exact watched ones not seen yet.
            let mut names: Vec<&str> = state
                .map(|s| {
                    s.branches
                        .keys()
                        .chain(s.pending.keys())
                        .map(String::as_str)
                        .collect()
                })
                .unwrap_or_default();
            for spec in &repo.monitor.branches {
                if let BranchSpec::Exact(b) = spec {
                    names.push(b);
                }
            }
            names.sort_unstable();
            names.dedup();
            let branches = names
                .into_iter()
                .map(|branch| {
                    let handled = state.and_then(|s| s.branches.get(branch));
                    let sha = handled.map(|b| b.sha.as_str().to_owned());
                    BranchView {
                        branch: branch.to_owned(),
                        commit_url: sha
                            .as_deref()
                            .and_then(|s| crate::forge::kind::commit_url(repo, s)),
                        sha,
                        seen_at: handled.map(|b| b.seen_at.clone()),
                        last_deploy: handled.and_then(|b| b.last_deploy.clone()),
                        pending: state.and_then(|s| s.pending.get(branch).cloned()),
                    }
                })
                .collect();
            RepoView {
                name: repo.name.clone(),
                group: repo.group.clone(),
                repo_type: crate::forge::kind::of(repo.monitor.repo_type)
                    .name
                    .to_owned(),
                backoff_secs: backoffs.get(&repo.name).map(|d| d.as_secs().max(1)),
                branches,
            }
        })
        .collect()
}

async fn status(Leading(live): Leading) -> Response {
    axum::Json(status_view(&live)).into_response()
}

#[derive(Debug, Deserialize)]
pub struct RunsQuery {
    group: Option<String>,
    limit: Option<usize>,
}

async fn runs(Leading(live): Leading, Query(q): Query<RunsQuery>) -> Response {
    let limit = q.limit.unwrap_or(DEFAULT_RUNS).clamp(1, MAX_RUNS);
    let group = q.group.as_deref().filter(|g| !g.is_empty());
    if let Some(g) = group
        && live.monitor.config().group(g).is_none()
    {
        return not_found(&format!("no group {g:?}"));
    }
    let runs = live.history.runs(group, limit);
    axum::Json(serde_json::json!({ "runs": runs })).into_response()
}

async fn run(Leading(live): Leading, Path(run_id): Path<String>) -> Response {
    match live.history.run(&run_id) {
        Some(run) => axum::Json(run).into_response(),
        None => not_found(&format!("no run {run_id:?} in the history")),
    }
}

fn not_found(message: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

/// Server-sent events: one per run or unit transition, named by its kind, with the JSON
/// event as data. A subscriber that fell behind gets a `lagged` event (reload the view).
async fn events(Leading(live): Leading) -> Response {
    let rx = live.history.subscribe();
    let stream = futures_util::stream::unfold((rx, live.stop), |(mut rx, stop)| async move {
        let received = tokio::select! {
            r = rx.recv() => r,
            () = stop.cancelled() => return None,
        };
        let event = match received {
            Ok(e) => SseEvent::default()
                .event(e.kind)
                .json_data(&e)
                .unwrap_or_else(|_| SseEvent::default().comment("unencodable event")),
            Err(RecvError::Lagged(n)) => SseEvent::default()
                .event("lagged")
                .data(format!("{{\"missed\":{n}}}")),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(event), (rx, stop)))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Lets a request through with the read token as a bearer header or cookie; `?token=`
/// is accepted too and then set as a cookie, so that a browser (and its EventSource,
/// which cannot send headers) needs it once.
async fn require_token(
    State(token): State<Arc<SecretString>>,
    request: Request,
    next: Next,
) -> Response {
    let expected = token.expose_secret().as_bytes();
    let headers = request.headers();
    let from_query = query_token(request.uri().query());
    let ok = |given: Option<&str>| given.is_some_and(|g| g.as_bytes().ct_eq(expected).into());
    if ok(bearer(headers)) || ok(cookie(headers, TOKEN_COOKIE)) {
        return next.run(request).await;
    }
    if ok(from_query.as_deref()) {
        let mut response = next.run(request).await;
        let cookie = format!(
            "{TOKEN_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
            token.expose_secret()
        );
        if let Ok(value) = header::HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        return response;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "a read token is required: Authorization: Bearer TOKEN (server.read_token)\n",
    )
        .into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix('='))
}

fn query_token(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::{GroupResult, RunObserver, RunRef, Trigger, Unit, UnitResult, UnitStatus};
    use crate::forge::Sha;
    use crate::monitor::state::{BranchState, StateStore};

    /// The whole path of a dashboard answer for 1,000 repositories (10 groups, 50 runs of
    /// 10 units each in the history): the status snapshot plus the rendered pages.
    /// `cargo test --release --lib api::tests::dashboard_answers -- --nocapture` prints it.
    #[tokio::test]
    async fn dashboard_answers_for_1000_repositories_take_milliseconds() {
        let mut yaml = String::from("groups:\n");
        for g in 0..10 {
            yaml.push_str(&format!("  g{g}: {{}}\n"));
        }
        yaml.push_str("repositories:\n");
        for i in 0..1000 {
            yaml.push_str(&format!(
                "  - {{name: r{i}, group: g{}, monitor: {{repo_url: 'https://github.com/o/r{i}', branches: [main], repo_type: github}}, \
                 deploy: {{qa_repo_url: 'file:///qa', qa_repo_branch: main, commands: ['true']}}}}\n",
                i % 10
            ));
        }
        let env = crate::config::Env::fixed([("HOME", "/")]);
        let config = Arc::new(crate::config::load_str(&yaml, &env).config.unwrap());
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(StateStore::load(&dir.path().join("state.json")).unwrap());
        let sha = Sha::parse(&"a".repeat(40)).unwrap();
        state.with(|s| {
            for i in 0..1000 {
                s.repositories
                    .entry(format!("r{i}"))
                    .or_default()
                    .branches
                    .insert(
                        "main".into(),
                        BranchState {
                            sha: sha.clone(),
                            seen_at: "2026-11-29T10:00:00Z".into(),
                            last_deploy: None,
                        },
                    );
            }
        });
        let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
        let deployer = crate::deploy::Deployer::new(config.clone(), Default::default());
        let shutdown = crate::shutdown::Shutdown::new();
        let history = Arc::new(History::in_memory(config.clone()));
        let scheduler = crate::monitor::scheduler::Scheduler::new(
            config.clone(),
            deployer,
            state.clone(),
            shutdown,
            Default::default(),
            metrics.clone(),
        );
        let forges = crate::forge::Forges::new(&config).unwrap();
        let monitor = Arc::new(Monitor::new(
            config.clone(),
            forges,
            state,
            scheduler,
            metrics,
        ));
        for n in 0..50 {
            let run_id = format!("20261129T10{n:04}Z-abcdef");
            let trigger = Trigger::Poll;
            let units: Vec<Unit> = (0..10)
                .map(|i| Unit {
                    repository: format!("r{i}0"),
                    branch: "main".into(),
                    previous_sha: None,
                    sha: sha.clone(),
                })
                .collect();
            history.group_started(
                RunRef {
                    group: "g0",
                    run_id: &run_id,
                    trigger: &trigger,
                },
                &units,
            );
            let results: Vec<UnitResult> = units
                .into_iter()
                .map(|unit| UnitResult {
                    unit,
                    status: UnitStatus::Failed,
                    exit_code: Some(1),
                    duration: Duration::from_secs(3),
                    output_tail: "x".repeat(4096),
                    attempts: 1,
                    failed_command: None,
                    reason: None,
                })
                .collect();
            history.group_ended(&GroupResult {
                run_id,
                group: "g0".into(),
                trigger,
                units: results,
                duration: Duration::from_secs(30),
            });
        }
        let live = Live {
            monitor,
            history: history.clone(),
            stop: CancellationToken::new(),
            leader: None,
        };
        let start = std::time::Instant::now();
        let view = status_view(&live);
        let index = crate::dashboard::render_index(&view);
        let runs = history.runs(Some("g0"), 20);
        let group = crate::dashboard::render_group(&view, "g0", &runs).unwrap();
        let run = crate::dashboard::render_run(&runs[0]);
        let json = serde_json::to_vec(&view).unwrap();
        let took = start.elapsed();
        println!(
            "status snapshot + JSON + index, group and run pages for 1,000 repositories: {took:?} ({} bytes)",
            index.len() + group.len() + run.len() + json.len()
        );
        assert_eq!(view.repositories.len(), 1000);
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    #[test]
    fn tokens_are_read_from_header_cookie_and_query() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        headers.insert(
            header::COOKIE,
            "a=b; sentry_read_token=c00kie".parse().unwrap(),
        );
        assert_eq!(bearer(&headers), Some("s3cret"));
        assert_eq!(cookie(&headers, TOKEN_COOKIE), Some("c00kie"));
        assert_eq!(query_token(Some("x=1&token=q%20t")).as_deref(), Some("q t"));
        assert_eq!(query_token(Some("x=1")), None);
    }
}
