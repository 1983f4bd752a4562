//! The HTTP server of `watch`: liveness, readiness, Prometheus metrics, and webhooks.
//!
//! Webhooks are hints, never the truth: a verified push for a watched repository and
//! branch only asks the monitor to check that repository now, through the forge API.
//! Nothing from a payload (SHA, branch, URL) reaches a deployment. Each webhook endpoint
//! answers 404 unless its secret is configured; signatures and tokens are compared in
//! constant time.
//!
//! The server faces strangers, so every resource a client can hold is bounded: the time to
//! send headers (`server.header_timeout`) and to finish a request
//! (`server.request_timeout`), the connections per listener (`server.max_connections`),
//! and the webhook bodies buffered at once ([`MAX_BODY_READS`]). A webhook request without
//! its signature or token header is refused before its body is read. Verified deliveries
//! seen before are dropped, and hints for one repository are coalesced to one per
//! [`HINT_MIN_GAP`]. With `server.webhook_listen`, webhooks get a listener of their own
//! and the main one serves only probes and metrics.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RepoType, ServerConfig};
use crate::forge::kind::{self, Kind};
use crate::monitor::Health;
use crate::shutdown::Shutdown;
use crate::telemetry::metrics::Metrics;

/// Webhook bodies beyond this are refused with 413.
pub const MAX_WEBHOOK_BODY: usize = 5 * 1024 * 1024;

/// Webhook bodies read at once; more requests wait (within the request timeout), so that
/// strangers cannot make Sentry buffer more than this many times [`MAX_WEBHOOK_BODY`].
pub const MAX_BODY_READS: usize = 4;

/// At most one check per repository is asked for within this gap; hints inside it are
/// merged into one check at its end.
pub const HINT_MIN_GAP: Duration = Duration::from_secs(5);

/// Delivery ids remembered to drop replays (oldest forgotten first).
const MAX_DELIVERIES: usize = 4096;

/// At most one WARN line per endpoint per this period for rejected webhooks; the others
/// are counted and logged at debug.
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// Repositories to check now.
    pub hints: mpsc::Sender<Vec<String>>,
    pub started: Instant,
    /// The status API and dashboard (`crate::api`), mounted when set. Only the main
    /// listener may carry them: a webhook-only listener is built without.
    pub live: Option<crate::api::LiveSlot>,
}

/// What the handlers share: the application state and the server's own bookkeeping.
struct Shared {
    app: AppState,
    body_reads: Semaphore,
    deliveries: Mutex<Deliveries>,
    hints: Mutex<HintGate>,
    /// One limiter per forge kind's rejected-webhook warnings, in `kind::all()` order.
    rejected_warn: Vec<RateLimitedWarn>,
}

type S = Arc<Shared>;

fn shared(state: AppState) -> S {
    Arc::new(Shared {
        app: state,
        body_reads: Semaphore::new(MAX_BODY_READS),
        deliveries: Mutex::new(Deliveries::default()),
        hints: Mutex::new(HintGate::default()),
        rejected_warn: kind::all()
            .iter()
            .map(|_| RateLimitedWarn::default())
            .collect(),
    })
}

/// Every endpoint on one router.
pub fn router(state: AppState) -> Router {
    let timeout = state.config.server.request_timeout;
    let s = shared(state);
    let live = live(&s);
    with_live(timed(probes(s.clone()).merge(webhooks(s)), timeout), live)
}

/// The status API and dashboard (`crate::api`) when the state carries them. Mounted
/// outside the request timeout: its event stream stays open (a connection still ends
/// after its lifetime bound, and EventSource reconnects).
fn live(s: &S) -> Option<Router> {
    let read_token = s.app.config.server.read_token.clone();
    s.app
        .live
        .clone()
        .map(|live| crate::api::router(live, read_token))
}

fn with_live(app: Router, live: Option<Router>) -> Router {
    match live {
        Some(live) => app.merge(live),
        None => app,
    }
}

fn probes(s: S) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(s)
}

/// `/webhooks/<endpoint>` for every forge kind that has push webhooks.
fn webhooks(s: S) -> Router {
    let mut router = Router::new();
    for kind in kind::all() {
        if let Some(hook) = &kind.webhook {
            let path = format!("/webhooks/{}", hook.endpoint);
            router = router.route(
                &path,
                post(move |State(s): State<S>, req: Request| webhook(s, kind, req)),
            );
        }
    }
    router.with_state(s)
}

/// Answers 408 when a request (body included) takes longer than `limit`.
async fn limit_time(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => StatusCode::REQUEST_TIMEOUT.into_response(),
    }
}

/// `app` with every request bounded by `limit`.
fn timed(app: Router, limit: Duration) -> Router {
    app.layer(axum::middleware::from_fn_with_state(limit, limit_time))
}

/// Binds the listener(s) and serves until `stop` is cancelled. Returns the main bound
/// address (useful with port 0) once listening; serving continues in a spawned task.
pub async fn serve(
    addr: SocketAddr,
    state: AppState,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let limits = state.config.server.clone();
    let timeout = limits.request_timeout;
    let s = shared(state);
    let live = live(&s);
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let mut tasks = Vec::new();
    let main_app = match limits.webhook_listen {
        Some(hook_addr) => {
            let hooks = TcpListener::bind(hook_addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("server.webhook_listen {hook_addr}: {e}"))
            })?;
            tracing::info!("webhook server listening on {}", hooks.local_addr()?);
            let app = timed(webhooks(s.clone()), timeout);
            tasks.push(tokio::spawn(accept_loop(
                hooks,
                app,
                limits.clone(),
                stop.clone(),
            )));
            probes(s)
        }
        None => probes(s.clone()).merge(webhooks(s)),
    };
    tracing::info!("http server listening on {bound}");
    // Only the main listener serves the live view: never the webhook listener.
    let app = with_live(timed(main_app, timeout), live);
    tasks.push(tokio::spawn(accept_loop(listener, app, limits, stop)));
    let handle = tokio::spawn(async move {
        for task in tasks {
            let _ = task.await;
        }
    });
    Ok((bound, handle))
}

/// Accepts at most `max_connections` connections at once and serves each with HTTP/1.1,
/// a header-read timeout and a bound on its lifetime.
async fn accept_loop(
    listener: TcpListener,
    app: Router,
    limits: ServerConfig,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // A keep-alive connection lives at most this long, so a slow client cannot hold a
    // slot by trickling requests.
    let lifetime = limits.request_timeout * 4;
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::debug!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(lifetime, connection).await;
        });
    }
    drop(listener);
    // Requests in flight get a moment to finish.
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

/// 503 once the last completed cycle is older than 3 polling intervals (effective ones,
/// when the request budget stretches the sweep) plus the request timeout: the loop has
/// stalled and the pod should be restarted.
async fn healthz(State(s): State<S>) -> Response {
    let s = &s.app;
    let interval = s
        .health
        .effective_interval()
        .map_or(s.config.polling_interval, |e| {
            e.max(s.config.polling_interval)
        });
    let limit = interval * 3 + s.config.request_timeout;
    let (healthy, last, age) = match s.health.last_cycle_end() {
        Some(last) => {
            let age = SystemTime::now().duration_since(last).unwrap_or_default();
            (age <= limit, Some(last), age)
        }
        // Before the first cycle, allow the same time since start.
        None => (s.started.elapsed() <= limit, None, s.started.elapsed()),
    };
    let body = json!({
        "status": if healthy { "ok" } else { "stalled" },
        "last_cycle": last.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        "age_seconds": age.as_secs(),
        "limit_seconds": limit.as_secs(),
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

async fn readyz(State(s): State<S>) -> Response {
    let s = &s.app;
    let ready = s.health.is_ready() && !s.shutdown.is_requested();
    let (code, status) = if ready {
        (StatusCode::OK, "ready")
    } else if s.shutdown.is_requested() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first cycle",
        )
    };
    (code, axum::Json(json!({ "status": status }))).into_response()
}

/// Classic Prometheus text unless the scraper asks for OpenMetrics in `Accept`.
async fn metrics(State(s): State<S>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = s.app.metrics.negotiate(accept);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// One forge kind's push webhook: proof first (from the headers alone where the kind
/// allows, so a stranger costs a header parse, not a body), then the body, the replay
/// check, and the event.
async fn webhook(s: S, kind: &'static Kind, req: Request) -> Response {
    let (Some(hook), Some(secret)) = (&kind.webhook, s.app.config.webhooks.secret(kind.repo_type))
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let secret = secret.expose_secret().as_bytes();
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let proof = header_str(headers, hook.proof.header());
    let refused = |what: &str| {
        s.warn_for(kind).warn(&format!(
            "{} webhook rejected: {what} {}",
            kind.name,
            hook.proof.header()
        ));
        StatusCode::UNAUTHORIZED.into_response()
    };
    if !hook.proof.plausible(secret, proof) {
        return refused("missing or wrong");
    }
    let body = match read_body(&s, headers, body).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    if !hook.proof.verify(secret, proof, &body) {
        return refused("wrong");
    }
    if s.replayed(header_str(headers, hook.delivery_header)) {
        return ignored("delivery already received");
    }
    match header_str(headers, hook.event_header).unwrap_or_default() {
        event if Some(event) == hook.ping_event => {
            (StatusCode::OK, axum::Json(json!({ "status": "pong" }))).into_response()
        }
        event if event == hook.push_event => match serde_json::from_slice::<Value>(&body) {
            Ok(payload) => schedule(&s, &payload, kind),
            Err(_) => bad_json(),
        },
        other => ignored(&format!("event {other:?} is not a push")),
    }
}

/// Reads a webhook body of at most [`MAX_WEBHOOK_BODY`] bytes, at most
/// [`MAX_BODY_READS`] at once.
async fn read_body(s: &Shared, headers: &HeaderMap, body: Body) -> Result<Bytes, Response> {
    let declared = header_str(headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_WEBHOOK_BODY as u64) {
        return Err(StatusCode::PAYLOAD_TOO_LARGE.into_response());
    }
    let Ok(_permit) = s.body_reads.acquire().await else {
        return Err(StatusCode::SERVICE_UNAVAILABLE.into_response());
    };
    axum::body::to_bytes(body, MAX_WEBHOOK_BODY)
        .await
        .map_err(|_| StatusCode::PAYLOAD_TOO_LARGE.into_response())
}

impl Shared {
    fn warn_for(&self, kind: &'static Kind) -> &RateLimitedWarn {
        let index = kind::all()
            .iter()
            .position(|k| std::ptr::eq(*k, kind))
            .unwrap_or_default();
        &self.rejected_warn[index.min(self.rejected_warn.len().saturating_sub(1))]
    }

    /// Whether a verified delivery id was seen before (then it is dropped).
    fn replayed(&self, id: Option<&str>) -> bool {
        let Some(id) = id.filter(|id| !id.is_empty() && id.len() <= 128) else {
            return false;
        };
        let replayed = !self
            .deliveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id);
        if replayed {
            tracing::debug!(delivery = %id.escape_debug(), "webhook delivery replayed; dropped");
        }
        replayed
    }
}

/// The last [`MAX_DELIVERIES`] delivery ids.
#[derive(Default)]
struct Deliveries {
    order: VecDeque<String>,
    seen: HashSet<String>,
}

impl Deliveries {
    /// Remembers `id`; false when it was already there.
    fn insert(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() >= MAX_DELIVERIES {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        self.order.push_back(id.to_owned());
        self.seen.insert(id.to_owned());
        true
    }
}

/// Per-repository coalescing of webhook hints: a repository is asked for at most once per
/// [`HINT_MIN_GAP`]; hints inside the gap are merged into one at its end.
#[derive(Default)]
struct HintGate {
    last: HashMap<String, Instant>,
    pending: BTreeSet<String>,
    flush_scheduled: bool,
}

impl HintGate {
    /// Splits `repos` into those to check now and those deferred; returns the first and
    /// whether a flush must be scheduled.
    fn offer(&mut self, repos: Vec<String>, now: Instant) -> (Vec<String>, bool) {
        let mut due = Vec::new();
        for repo in repos {
            let recent = self
                .last
                .get(&repo)
                .is_some_and(|at| now.duration_since(*at) < HINT_MIN_GAP);
            if recent {
                self.pending.insert(repo);
            } else {
                self.last.insert(repo.clone(), now);
                due.push(repo);
            }
        }
        let schedule = !self.pending.is_empty() && !self.flush_scheduled;
        if schedule {
            self.flush_scheduled = true;
        }
        (due, schedule)
    }

    /// The deferred repositories, now due.
    fn flush(&mut self, now: Instant) -> Vec<String> {
        self.flush_scheduled = false;
        let due: Vec<String> = std::mem::take(&mut self.pending).into_iter().collect();
        for repo in &due {
            self.last.insert(repo.clone(), now);
        }
        due
    }
}

/// Sends `repos` to the monitor through the hint gate.
fn send_hints(s: &S, repos: Vec<String>) {
    let (due, schedule) = s
        .hints
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .offer(repos, Instant::now());
    if !due.is_empty() && s.app.hints.try_send(due).is_err() {
        tracing::warn!("webhook: check queue is full; polling will catch up");
    }
    if schedule {
        let s = s.clone();
        tokio::spawn(async move {
            tokio::time::sleep(HINT_MIN_GAP).await;
            let due = s
                .hints
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .flush(Instant::now());
            if !due.is_empty() && s.app.hints.try_send(due).is_err() {
                tracing::debug!("webhook: check queue is full; polling will catch up");
            }
        });
    }
}

/// A WARN line at most once per [`WARN_EVERY`]; the rest at debug, counted.
#[derive(Default)]
struct RateLimitedWarn {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimitedWarn {
    fn warn(&self, message: &str) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("{message}");
            return;
        }
        *last = Some(now);
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        if suppressed > 0 {
            tracing::warn!("{message} ({suppressed} more since the last such line)");
        } else {
            tracing::warn!("{message}");
        }
    }
}

/// Finds the configured repositories a push names, and asks for an immediate check of
/// those that watch the pushed branch.
fn schedule(shared: &S, payload: &Value, kind: &'static Kind) -> Response {
    let forge = kind.repo_type;
    let ids = kind.webhook.as_ref().map_or(&[][..], |w| w.ids);
    let Some(branch) = payload
        .get("ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("refs/heads/"))
    else {
        return ignored("not a branch push");
    };
    let names: Vec<&str> = ids
        .iter()
        .filter_map(|(obj, key)| payload.get(*obj)?.get(*key)?.as_str())
        .collect();
    let s = &shared.app;
    let repos: Vec<String> = s
        .config
        .repositories
        .iter()
        .filter(|r| names.iter().any(|n| identifies(r, forge, n)))
        .filter(|r| r.monitor.watches(branch))
        .map(|r| r.name.clone())
        .collect();
    if repos.is_empty() {
        return ignored("no configured repository watches this branch");
    }
    tracing::info!(
        branch = %branch.escape_debug(),
        "webhook: checking {} now",
        repos.join(", ")
    );
    send_hints(shared, repos.clone());
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "checking": repos })),
    )
        .into_response()
}

/// Whether `id` (a project path like `org/repo` or a URL) names `repo`.
fn identifies(repo: &crate::config::Repository, forge: RepoType, id: &str) -> bool {
    let monitor = &repo.monitor;
    if id.contains("://") {
        return normalize_url(id) == normalize_url(&monitor.repo_url);
    }
    monitor.repo_type == forge
        && !monitor.project_path.is_empty()
        && monitor.project_path.eq_ignore_ascii_case(id)
}

/// `https://Host/org/repo.git/` → `host/org/repo`.
fn normalize_url(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.trim_end_matches('/');
    let rest = rest.strip_suffix(".git").unwrap_or(rest);
    rest.to_ascii_lowercase()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok()
}

fn ignored(reason: &str) -> Response {
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "ignored": reason })),
    )
        .into_response()
}

fn bad_json() -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": "body is not valid JSON" })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn state(health: Health) -> AppState {
        let yaml = "polling_interval: 10s\nrequest_timeout: 5s\ngroups: {g: }\nrepositories:\n  - name: r\n    group: g\n    monitor: {repo_url: /x, branches: [main], repo_type: git}\n    deploy: {qa_repo_url: /q, qa_repo_branch: main, commands: [x]}\n";
        let config = crate::config::load_str(
            yaml,
            &crate::config::Env::fixed::<[(&str, &str); 0], _, _>([]),
        )
        .config
        .expect("valid config");
        AppState {
            config: Arc::new(config),
            health: Arc::new(health),
            metrics: Arc::new(Metrics::new()),
            shutdown: Shutdown::new(),
            hints: mpsc::channel(1).0,
            started: Instant::now(),
            live: None,
        }
    }

    #[tokio::test]
    async fn healthz_fails_when_the_loop_stalls() {
        let health = Health::default();
        health.cycle_completed_at(SystemTime::now() - Duration::from_secs(10));
        assert_eq!(
            healthz(State(shared(state(health)))).await.status(),
            StatusCode::OK
        );
        // 3 × 10 s + 5 s = 35 s; a cycle 40 s ago means the loop stalled.
        let stalled = Health::default();
        stalled.cycle_completed_at(SystemTime::now() - Duration::from_secs(40));
        assert_eq!(
            healthz(State(shared(state(stalled)))).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn healthz_allows_a_sweep_the_budget_stretched() {
        // The budget stretched the 10 s interval to 60 s: 3 × 60 s + 5 s before it is a stall.
        let stretched = Health::default();
        stretched.set_effective_interval(Duration::from_secs(60));
        stretched.cycle_completed_at(SystemTime::now() - Duration::from_secs(120));
        assert_eq!(
            healthz(State(shared(state(stretched)))).await.status(),
            StatusCode::OK
        );
        let stalled = Health::default();
        stalled.set_effective_interval(Duration::from_secs(60));
        stalled.cycle_completed_at(SystemTime::now() - Duration::from_secs(200));
        assert_eq!(
            healthz(State(shared(state(stalled)))).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn readyz_follows_first_cycle_and_shutdown() {
        let s = shared(state(Health::default()));
        assert_eq!(
            readyz(State(s.clone())).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        s.app.health.set_ready(true);
        assert_eq!(readyz(State(s.clone())).await.status(), StatusCode::OK);
        s.app.shutdown.request();
        assert_eq!(
            readyz(State(s)).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn deliveries_are_remembered_within_a_bound() {
        let mut d = Deliveries::default();
        assert!(d.insert("a"));
        assert!(!d.insert("a"));
        for i in 0..MAX_DELIVERIES {
            d.insert(&i.to_string());
        }
        assert_eq!(d.order.len(), MAX_DELIVERIES);
        assert_eq!(d.seen.len(), MAX_DELIVERIES);
        assert!(d.insert("a"), "the oldest id was forgotten");
    }

    #[test]
    fn hints_for_one_repository_are_coalesced() {
        let mut gate = HintGate::default();
        let t0 = Instant::now();
        let (due, schedule) = gate.offer(vec!["a".into(), "b".into()], t0);
        assert_eq!((due.len(), schedule), (2, false));
        let (due, schedule) = gate.offer(vec!["a".into()], t0 + Duration::from_secs(1));
        assert_eq!((due.len(), schedule), (0, true));
        let (due, schedule) = gate.offer(vec!["a".into()], t0 + Duration::from_secs(2));
        assert_eq!(
            (due.len(), schedule),
            (0, false),
            "one flush for many hints"
        );
        assert_eq!(gate.flush(t0 + HINT_MIN_GAP), ["a"]);
        let (due, _) = gate.offer(vec!["b".into()], t0 + HINT_MIN_GAP);
        assert_eq!(due, ["b"]);
    }

    #[test]
    fn urls_normalize() {
        assert_eq!(
            normalize_url("https://GitHub.com/Org/Repo.git/"),
            "github.com/org/repo"
        );
        assert_eq!(
            normalize_url("http://github.com/org/repo"),
            "github.com/org/repo"
        );
    }
}
