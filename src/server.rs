//! The HTTP server of `watch`: liveness, readiness, Prometheus metrics, and webhooks.
//!
//! Webhooks are hints, never the truth: a verified push for a watched repository and
//! branch only asks the monitor to check that repository now, through the forge API.
//! Nothing from a payload (SHA, branch, URL) reaches a deployment. Each webhook endpoint
//! answers 404 unless its secret is configured; signatures and tokens are compared in
//! constant time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RepoType};
use crate::monitor::Health;
use crate::shutdown::Shutdown;
use crate::telemetry::metrics::Metrics;

/// Webhook bodies beyond this are refused with 413.
pub const MAX_WEBHOOK_BODY: usize = 5 * 1024 * 1024;

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
    pub live: Option<crate::api::Live>,
}

pub fn router(state: AppState) -> Router {
    let live = state
        .live
        .clone()
        .map(|live| crate::api::router(live, state.config.server.read_token.clone()));
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/webhooks/github", post(github_webhook))
        .route("/webhooks/gitlab", post(gitlab_webhook))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY))
        .with_state(state);
    match live {
        Some(live) => app.merge(live),
        None => app,
    }
}

/// Binds `addr` and serves until `stop` is cancelled. Returns the bound address (useful
/// with port 0) once listening; serving continues in a spawned task.
pub async fn serve(
    addr: SocketAddr,
    state: AppState,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!("http server listening on {bound}");
    let app = router(state);
    let handle = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!("http server failed: {e}");
        }
    });
    Ok((bound, handle))
}

/// 503 once the last completed cycle is older than 3 polling intervals plus the request
/// timeout: the loop has stalled and the pod should be restarted.
async fn healthz(State(s): State<AppState>) -> Response {
    let limit = s.config.polling_interval * 3 + s.config.request_timeout;
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

async fn readyz(State(s): State<AppState>) -> Response {
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

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn github_webhook(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(secret) = &s.config.webhooks.github_secret else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let signature = header_str(&headers, "x-hub-signature-256");
    if !github_signature_valid(secret.expose_secret().as_bytes(), &body, signature) {
        tracing::warn!("github webhook rejected: missing or wrong X-Hub-Signature-256");
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match header_str(&headers, "x-github-event").unwrap_or_default() {
        "ping" => (StatusCode::OK, axum::Json(json!({ "status": "pong" }))).into_response(),
        "push" => match serde_json::from_slice::<Value>(&body) {
            Ok(payload) => schedule(&s, &payload, RepoType::Github).await,
            Err(_) => bad_json(),
        },
        other => ignored(&format!("event {other:?} is not a push")),
    }
}

async fn gitlab_webhook(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(expected) = &s.config.webhooks.gitlab_token else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let given = header_str(&headers, "x-gitlab-token").unwrap_or_default();
    if !bool::from(given.as_bytes().ct_eq(expected.expose_secret().as_bytes())) {
        tracing::warn!("gitlab webhook rejected: missing or wrong X-Gitlab-Token");
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match header_str(&headers, "x-gitlab-event").unwrap_or_default() {
        "Push Hook" => match serde_json::from_slice::<Value>(&body) {
            Ok(payload) => schedule(&s, &payload, RepoType::Gitlab).await,
            Err(_) => bad_json(),
        },
        other => ignored(&format!("event {other:?} is not a push hook")),
    }
}

/// `sha256=` + hex HMAC-SHA256 of the raw body, checked in constant time.
pub fn github_signature_valid(secret: &[u8], body: &[u8], signature: Option<&str>) -> bool {
    let Some(hex_sig) = signature.and_then(|s| s.strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(given) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// Finds the configured repositories a push names, and asks for an immediate check of
/// those that watch the pushed branch.
async fn schedule(s: &AppState, payload: &Value, forge: RepoType) -> Response {
    let ids = crate::forge::kind::of(forge)
        .webhook
        .as_ref()
        .map_or(&[][..], |w| w.ids);
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
    tracing::info!(branch, "webhook: checking {} now", repos.join(", "));
    if s.hints.try_send(repos.clone()).is_err() {
        tracing::warn!("webhook: check queue is full; polling will catch up");
    }
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

    #[test]
    fn github_documented_test_vector() {
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(github_signature_valid(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            Some(sig)
        ));
        assert!(!github_signature_valid(
            b"It's a Secret to Everybody",
            b"Hello, World?",
            Some(sig)
        ));
        assert!(!github_signature_valid(
            b"wrong",
            b"Hello, World!",
            Some(sig)
        ));
        assert!(!github_signature_valid(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            None
        ));
        assert!(!github_signature_valid(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            Some("sha1=abc")
        ));
        assert!(!github_signature_valid(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            Some("sha256=zz")
        ));
    }

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
        assert_eq!(healthz(State(state(health))).await.status(), StatusCode::OK);
        // 3 × 10 s + 5 s = 35 s; a cycle 40 s ago means the loop stalled.
        let stalled = Health::default();
        stalled.cycle_completed_at(SystemTime::now() - Duration::from_secs(40));
        assert_eq!(
            healthz(State(state(stalled))).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn readyz_follows_first_cycle_and_shutdown() {
        let s = state(Health::default());
        assert_eq!(
            readyz(State(s.clone())).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        s.health.set_ready(true);
        assert_eq!(readyz(State(s.clone())).await.status(), StatusCode::OK);
        s.shutdown.request();
        assert_eq!(
            readyz(State(s)).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
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
