//! A fake GitHub that *enforces* GitHub's documented limits, for the scale benchmark.
//!
//! Routes: `GET /repos/{o}/{r}/commits/refs/heads/{branch}` (bare SHA, ETag `"<sha>"`,
//! `304` on a match), `GET /repos/{o}/{r}/branches?per_page=100[&page=N]` (with `Link`
//! `rel="next"` and a weak ETag), and `POST /graphql` (evaluated by the integration tests'
//! `graphql_eval`: aliases, variables, `ref`, paginated `refs`).
//!
//! Limits, per instance (one instance per token in the benchmark):
//! - at most `concurrency` requests in flight (REST and GraphQL together);
//! - REST: at most `rest_points` points per sliding `window` (GET 1 point, other methods 5),
//!   `304`s included;
//! - GraphQL: at most `graphql_points` points per sliding `window`, a query costing what
//!   GitHub's formula gives for it (computed here from the parsed query);
//! - primary: `primary_per_hour` counted REST requests (authenticated, not `304`) and as many
//!   GraphQL points per fixed hour from the start, reported in `x-ratelimit-*` headers.
//!
//! A request over a secondary limit is answered `403` "You have exceeded a secondary rate
//! limit" with `retry-after: 60`; over the primary quota, `403` with
//! `x-ratelimit-remaining: 0` and the reset time. Neither is charged. Every such answer is
//! counted as a throttling response.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::Response;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::graphql_eval::{Access, evaluate};

/// GitHub's documented limits for one user token.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    pub concurrency: usize,
    pub rest_points: u64,
    pub graphql_points: u64,
    pub window: Duration,
    pub primary_per_hour: u64,
}

impl Limits {
    pub const GITHUB: Limits = Limits {
        concurrency: 100,
        rest_points: 900,
        graphql_points: 2000,
        window: Duration::from_secs(60),
        primary_per_hour: 5000,
    };
}

/// What the fake saw, cumulative.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Meter {
    pub rest_requests: u64,
    pub rest_not_modified: u64,
    /// REST requests charged to the primary quota (authenticated, not `304`).
    pub rest_counted: u64,
    pub rest_points: u64,
    pub graphql_queries: u64,
    pub graphql_points: u64,
    pub throttled_secondary: u64,
    pub throttled_primary: u64,
    pub max_in_flight: u64,
}

impl Meter {
    pub fn since(&self, b: &Meter) -> Meter {
        Meter {
            rest_requests: self.rest_requests - b.rest_requests,
            rest_not_modified: self.rest_not_modified - b.rest_not_modified,
            rest_counted: self.rest_counted - b.rest_counted,
            rest_points: self.rest_points - b.rest_points,
            graphql_queries: self.graphql_queries - b.graphql_queries,
            graphql_points: self.graphql_points - b.graphql_points,
            throttled_secondary: self.throttled_secondary - b.throttled_secondary,
            throttled_primary: self.throttled_primary - b.throttled_primary,
            max_in_flight: self.max_in_flight,
        }
    }

    pub fn throttled(&self) -> u64 {
        self.throttled_secondary + self.throttled_primary
    }
}

/// One repository of the model.
#[derive(Debug, Clone)]
pub struct Repo {
    pub path: String,
    pub branches: BTreeMap<String, String>,
    /// Branches a poller watches (exact names, or what its pattern matches).
    pub watched: Vec<String>,
    /// Watches a pattern (`release/*`) rather than exact names.
    pub pattern: bool,
}

struct Windows {
    rest: VecDeque<(Instant, u64)>,
    rest_used: u64,
    graphql: VecDeque<(Instant, u64)>,
    graphql_used: u64,
    hour_start: Instant,
    hour_start_wall: SystemTime,
    primary_rest: u64,
    primary_graphql: u64,
}

impl Windows {
    fn prune(&mut self, now: Instant, window: Duration) {
        for (queue, used) in [
            (&mut self.rest, &mut self.rest_used),
            (&mut self.graphql, &mut self.graphql_used),
        ] {
            while let Some(&(at, points)) = queue.front() {
                if now.duration_since(at) < window {
                    break;
                }
                queue.pop_front();
                *used -= points;
            }
        }
        if now.duration_since(self.hour_start) >= Duration::from_secs(3600) {
            self.hour_start = now;
            self.hour_start_wall = SystemTime::now();
            self.primary_rest = 0;
            self.primary_graphql = 0;
        }
    }

    fn reset_epoch(&self) -> u64 {
        (self.hour_start_wall + Duration::from_secs(3600))
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

struct Shared {
    limits: Limits,
    repos: RwLock<(Vec<Repo>, HashMap<String, usize>)>,
    windows: Mutex<Windows>,
    in_flight: AtomicUsize,
    meter: Mutex<Meter>,
    /// (repository, branch) → when it was moved and to what, for detection latency.
    moves: Mutex<HashMap<(String, String), (String, SystemTime)>>,
    next_sha: AtomicU64,
}

/// The running fake; stops when dropped.
pub struct LimitedGitHub {
    url: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl LimitedGitHub {
    pub async fn start(repos: Vec<Repo>, limits: Limits) -> std::io::Result<LimitedGitHub> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let index = repos
            .iter()
            .enumerate()
            .map(|(i, r)| (r.path.clone(), i))
            .collect();
        let shared = Arc::new(Shared {
            limits,
            repos: RwLock::new((repos, index)),
            windows: Mutex::new(Windows {
                rest: VecDeque::new(),
                rest_used: 0,
                graphql: VecDeque::new(),
                graphql_used: 0,
                hour_start: Instant::now(),
                hour_start_wall: SystemTime::now(),
                primary_rest: 0,
                primary_graphql: 0,
            }),
            in_flight: AtomicUsize::new(0),
            meter: Mutex::new(Meter::default()),
            moves: Mutex::new(HashMap::new()),
            next_sha: AtomicU64::new(1 << 40),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("limited github: {e}");
            }
        });
        Ok(LimitedGitHub { url, shared, task })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn meter(&self) -> Meter {
        *self
            .shared
            .meter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves `count` watched branches that have not moved yet, chosen by `pick` (an index
    /// source); returns how many moved.
    pub fn move_some(&self, count: usize, seed: &mut u64) -> usize {
        let mut guard = self
            .shared
            .repos
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let repos = &mut guard.0;
        let total: usize = repos.iter().map(|r| r.watched.len()).sum();
        let mut moves = self
            .shared
            .moves
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut moved = 0;
        let mut tries = 0;
        while moved < count && tries < count * 100 && total > 0 {
            tries += 1;
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            let mut n = (*seed % total as u64) as usize;
            let Some(repo) = repos.iter_mut().find(|r| {
                if n < r.watched.len() {
                    true
                } else {
                    n -= r.watched.len();
                    false
                }
            }) else {
                continue;
            };
            let branch = repo.watched[n].clone();
            let key = (repo.path.clone(), branch.clone());
            if moves.contains_key(&key) {
                continue;
            }
            let sha = format!(
                "{:040x}",
                self.shared.next_sha.fetch_add(1, Ordering::SeqCst)
            );
            repo.branches.insert(branch, sha.clone());
            moves.insert(key, (sha, SystemTime::now()));
            moved += 1;
        }
        moved
    }

    /// When `repo`'s `branch` was moved to `sha`, if it was.
    pub fn moved_at(&self, repo: &str, branch: &str, sha: &str) -> Option<SystemTime> {
        let moves = self
            .shared
            .moves
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        moves
            .get(&(repo.to_owned(), branch.to_owned()))
            .filter(|(s, _)| s == sha)
            .map(|(_, at)| *at)
    }

    /// When `repo`'s `branch` was moved (each branch moves at most once a run).
    pub fn moved_at_any(&self, repo: &str, branch: &str) -> Option<SystemTime> {
        let moves = self
            .shared
            .moves
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        moves
            .get(&(repo.to_owned(), branch.to_owned()))
            .map(|(_, at)| *at)
    }

    /// Every move so far.
    pub fn moves(&self) -> usize {
        self.shared
            .moves
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for LimitedGitHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Decrements the in-flight count when the answer is made.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

enum Kind {
    Rest,
    GraphQl,
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let now_in_flight = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = InFlight(&shared.in_flight);
    {
        let mut meter = shared.meter.lock().unwrap_or_else(PoisonError::into_inner);
        meter.max_in_flight = meter.max_in_flight.max(now_in_flight as u64);
    }
    let kind = if request.method() == Method::POST && request.uri().path() == "/graphql" {
        Kind::GraphQl
    } else {
        Kind::Rest
    };
    if now_in_flight > shared.limits.concurrency {
        return secondary(&shared);
    }
    match kind {
        Kind::GraphQl => graphql(&shared, request).await,
        Kind::Rest => rest(&shared, &request),
    }
}

fn secondary(shared: &Shared) -> Response {
    shared
        .meter
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .throttled_secondary += 1;
    Response::builder()
        .status(StatusCode::FORBIDDEN)
        .header(header::CONTENT_TYPE, "application/json")
        .header("retry-after", "60")
        .body(Body::from(
            r#"{"message":"You have exceeded a secondary rate limit. Please wait a few minutes before you try again."}"#,
        ))
        .unwrap_or_default()
}

fn primary_exhausted(shared: &Shared, reset: u64, resource: &str) -> Response {
    shared
        .meter
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .throttled_primary += 1;
    Response::builder()
        .status(StatusCode::FORBIDDEN)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-ratelimit-limit", shared.limits.primary_per_hour)
        .header("x-ratelimit-remaining", 0)
        .header("x-ratelimit-reset", reset)
        .header("x-ratelimit-resource", resource)
        .body(Body::from(r#"{"message":"API rate limit exceeded"}"#))
        .unwrap_or_default()
}

fn rest(shared: &Shared, request: &Request) -> Response {
    let points = if request.method() == Method::GET || request.method() == Method::HEAD {
        1
    } else {
        5
    };
    let answer = resolve(shared, request.uri().path(), request.uri().query());
    let not_modified = match &answer {
        Some((_, etag, _)) => request
            .headers()
            .get(header::IF_NONE_MATCH)
            .is_some_and(|v| v.as_bytes() == etag.as_bytes()),
        None => false,
    };
    let authenticated = request.headers().contains_key(header::AUTHORIZATION);
    let (remaining, reset) = {
        let mut w = shared
            .windows
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        w.prune(now, shared.limits.window);
        if w.rest_used + points > shared.limits.rest_points {
            drop(w);
            return secondary(shared);
        }
        let counted = authenticated && !not_modified;
        if counted && w.primary_rest >= shared.limits.primary_per_hour {
            let reset = w.reset_epoch();
            drop(w);
            return primary_exhausted(shared, reset, "core");
        }
        w.rest.push_back((now, points));
        w.rest_used += points;
        if counted {
            w.primary_rest += 1;
        }
        (
            shared.limits.primary_per_hour - w.primary_rest,
            w.reset_epoch(),
        )
    };
    {
        let mut m = shared.meter.lock().unwrap_or_else(PoisonError::into_inner);
        m.rest_requests += 1;
        m.rest_points += points;
        if not_modified {
            m.rest_not_modified += 1;
        } else if authenticated {
            m.rest_counted += 1;
        }
    }
    let builder = Response::builder()
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header("x-ratelimit-limit", shared.limits.primary_per_hour)
        .header("x-ratelimit-remaining", remaining)
        .header("x-ratelimit-reset", reset)
        .header("x-ratelimit-resource", "core");
    match answer {
        None => builder
            .status(StatusCode::UNPROCESSABLE_ENTITY)
            .body(Body::from("{}")),
        Some((_, etag, _)) if not_modified => builder
            .status(StatusCode::NOT_MODIFIED)
            .header(header::ETAG, etag)
            .body(Body::empty()),
        Some((body, etag, link)) => {
            let builder = builder.status(StatusCode::OK).header(header::ETAG, etag);
            let builder = match link {
                Some(link) => builder.header(header::LINK, link),
                None => builder,
            };
            builder.body(Body::from(body))
        }
    }
    .unwrap_or_default()
}

/// (body, ETag, next link) of a REST URL, or `None` (unknown repository or branch).
fn resolve(
    shared: &Shared,
    path: &str,
    query: Option<&str>,
) -> Option<(String, String, Option<String>)> {
    let rest = path.strip_prefix("/repos/")?;
    let mut parts = rest.splitn(3, '/');
    let (owner, name, tail) = (parts.next()?, parts.next()?, parts.next()?);
    let guard = shared.repos.read().unwrap_or_else(PoisonError::into_inner);
    let repo = &guard.0[*guard.1.get(&format!("{owner}/{name}"))?];
    if let Some(branch) = tail.strip_prefix("commits/refs/heads/") {
        let branch = percent_encoding::percent_decode_str(branch).decode_utf8_lossy();
        let sha = repo.branches.get(branch.as_ref())?;
        return Some((sha.clone(), format!("\"{sha}\""), None));
    }
    if tail == "branches" {
        let page: usize = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find(|(k, _)| k == "page")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1);
        let items: Vec<serde_json::Value> = repo
            .branches
            .iter()
            .skip((page.max(1) - 1) * 100)
            .take(100)
            .map(|(n, s)| serde_json::json!({"name": n, "commit": {"sha": s}}))
            .collect();
        let body = serde_json::Value::Array(items).to_string();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        body.hash(&mut hasher);
        let etag = format!("W/\"{:016x}\"", hasher.finish());
        let link = (page * 100 < repo.branches.len()).then(|| {
            format!(
                "</repos/{}/branches?per_page=100&page={}>; rel=\"next\"",
                repo.path,
                page + 1
            )
        });
        return Some((body, etag, link));
    }
    None
}

async fn graphql(shared: &Shared, request: Request) -> Response {
    let Ok(bytes) = to_bytes(request.into_body(), 16 << 20).await else {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Body::empty())
            .unwrap_or_default();
    };
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let query = doc["query"].as_str().unwrap_or_default().to_owned();
    let evaluated = {
        let guard = shared.repos.read().unwrap_or_else(PoisonError::into_inner);
        let lookup = |owner: &str, name: &str| match guard.1.get(&format!("{owner}/{name}")) {
            Some(&i) => Access::Found(&guard.0[i].branches),
            None => Access::NotFound,
        };
        evaluate(&query, &doc["variables"], &lookup)
    };
    let (body, cost) = match evaluated {
        Ok(e) => (e.body.to_string(), e.cost),
        Err(message) => (
            serde_json::json!({"errors": [{"message": message}]}).to_string(),
            1,
        ),
    };
    let (remaining, reset) = {
        let mut w = shared
            .windows
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        w.prune(now, shared.limits.window);
        if w.graphql_used + cost > shared.limits.graphql_points {
            drop(w);
            return secondary(shared);
        }
        if w.primary_graphql + cost > shared.limits.primary_per_hour {
            let reset = w.reset_epoch();
            drop(w);
            return primary_exhausted(shared, reset, "graphql");
        }
        w.graphql.push_back((now, cost));
        w.graphql_used += cost;
        w.primary_graphql += cost;
        (
            shared.limits.primary_per_hour - w.primary_graphql,
            w.reset_epoch(),
        )
    };
    {
        let mut m = shared.meter.lock().unwrap_or_else(PoisonError::into_inner);
        m.graphql_queries += 1;
        m.graphql_points += cost;
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header("x-ratelimit-limit", shared.limits.primary_per_hour)
        .header("x-ratelimit-remaining", remaining)
        .header("x-ratelimit-reset", reset)
        .header("x-ratelimit-resource", "graphql")
        .body(Body::from(body))
        .unwrap_or_default()
}
