//! A fake GitHub REST API on 127.0.0.1 that serves ETags, honours `If-None-Match` with
//! `304 Not Modified`, counts requests, and moves branches when told to.
//!
//! Routes (everything else is `404`):
//! - `GET /repos/{o}/{r}/commits/refs/heads/{branch}`: the bare 40-hex SHA with
//!   `Accept: application/vnd.github.sha`, else `{"sha": …}`; ETag `"<sha>"`; `422` for a
//!   missing branch, as GitHub does.
//! - `GET /repos/{o}/{r}/branches?per_page=100[&page=N]`: the branches sorted by name, 100
//!   per page, with `Link: <…>; rel="next"` while more pages follow; a weak ETag that is a
//!   hash of the page body (so a page changes only when one of its branches moved).
//!
//! Counting follows GitHub's primary rate limit: a request is *counted* when it carries an
//! `Authorization` header and is not answered `304`. Rate-limit headers report
//! `remaining = limit - counted` (the limit is per instance, so no benchmark can run out).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::workload::RepoSpec;

const PER_PAGE: usize = 100;
const ACCEPT_SHA: &str = "application/vnd.github.sha";

/// Request counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub not_modified: u64,
    /// Authenticated and not `304`: what GitHub counts against the primary rate limit.
    pub counted: u64,
    pub unauthenticated: u64,
    /// `4xx`/`5xx` answers (unknown repository or branch).
    pub errors: u64,
}

impl Counts {
    /// What happened between `before` and `self`.
    pub fn since(&self, before: &Counts) -> Counts {
        Counts {
            total: self.total - before.total,
            not_modified: self.not_modified - before.not_modified,
            counted: self.counted - before.counted,
            unauthenticated: self.unauthenticated - before.unauthenticated,
            errors: self.errors - before.errors,
        }
    }
}

/// What one round of moves changed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Moves {
    pub branches: usize,
    /// Distinct URLs whose answer changed: one per moved exact branch, one per listing
    /// page holding a moved pattern branch. A perfect conditional poller spends exactly this.
    pub changed_urls: usize,
}

/// The running fake; stops when dropped.
pub struct FakeGitHub {
    url: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    model: RwLock<Model>,
    rate_limit: u64,
    total: AtomicU64,
    not_modified: AtomicU64,
    counted: AtomicU64,
    unauthenticated: AtomicU64,
    errors: AtomicU64,
}

struct Model {
    base: String,
    repos: Vec<FakeRepo>,
    index: HashMap<String, usize>,
    /// Every watched (repository, branch), for picking moves.
    watched: Vec<(usize, String)>,
    next_sha: u64,
    rng: u64,
}

struct FakeRepo {
    path: String,
    /// Watches a pattern: its branches are checked through the listing.
    pattern: bool,
    branches: BTreeMap<String, String>,
    pages: Vec<PageBody>,
}

#[derive(Clone)]
struct PageBody {
    body: Bytes,
    etag: String,
    link: Option<String>,
}

impl FakeGitHub {
    /// Serves `repos` on `127.0.0.1:0`; `rate_limit` is the quota the headers report.
    pub async fn start(repos: &[RepoSpec], rate_limit: u64) -> std::io::Result<FakeGitHub> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let model = Model::new(&url, repos);
        let shared = Arc::new(Shared {
            model: RwLock::new(model),
            rate_limit,
            total: AtomicU64::new(0),
            not_modified: AtomicU64::new(0),
            counted: AtomicU64::new(0),
            unauthenticated: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("fake github: {e}");
            }
        });
        Ok(FakeGitHub { url, shared, task })
    }

    /// `http://127.0.0.1:PORT`, the `api_url` of the generated configurations.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn counts(&self) -> Counts {
        let s = &self.shared;
        Counts {
            total: s.total.load(Ordering::SeqCst),
            not_modified: s.not_modified.load(Ordering::SeqCst),
            counted: s.counted.load(Ordering::SeqCst),
            unauthenticated: s.unauthenticated.load(Ordering::SeqCst),
            errors: s.errors.load(Ordering::SeqCst),
        }
    }

    /// Moves `fraction` of the watched branches (at least one) to new SHAs.
    pub fn move_fraction(&self, fraction: f64) -> Moves {
        let mut model = self
            .shared
            .model
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let count = ((model.watched.len() as f64 * fraction).round() as usize)
            .clamp(1, model.watched.len());
        let picks = model.pick(count);
        let mut urls = HashSet::new();
        for (repo, branch) in &picks {
            urls.insert(model.changed_url(*repo, branch));
            model.advance(*repo, branch);
        }
        for repo in picks.iter().map(|(r, _)| *r).collect::<HashSet<_>>() {
            model.rebuild_pages(repo);
        }
        Moves {
            branches: picks.len(),
            changed_urls: urls.len(),
        }
    }

    /// Moves one branch; returns its new SHA.
    pub fn move_branch(&self, path: &str, branch: &str) -> Option<String> {
        let mut model = self
            .shared
            .model
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let repo = *model.index.get(path)?;
        let sha = model.advance(repo, branch);
        model.rebuild_pages(repo);
        Some(sha)
    }
}

impl Drop for FakeGitHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Model {
    fn new(base: &str, specs: &[RepoSpec]) -> Model {
        let mut model = Model {
            base: base.to_owned(),
            repos: Vec::with_capacity(specs.len()),
            index: HashMap::with_capacity(specs.len()),
            watched: Vec::new(),
            next_sha: 1,
            rng: 0x5eed_0f5e_a7c4_u64,
        };
        for (i, spec) in specs.iter().enumerate() {
            let branches = spec
                .branches
                .iter()
                .map(|b| (b.clone(), model.new_sha()))
                .collect();
            model.repos.push(FakeRepo {
                path: spec.path.clone(),
                pattern: spec.pattern,
                branches,
                pages: Vec::new(),
            });
            model.index.insert(spec.path.clone(), i);
            model
                .watched
                .extend(spec.watched.iter().map(|b| (i, b.clone())));
            model.rebuild_pages(i);
        }
        model
    }

    fn new_sha(&mut self) -> String {
        self.next_sha += 1;
        format!("{:040x}", self.next_sha.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// xorshift64*: deterministic, so every run moves the same branches.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `count` distinct watched branches (partial Fisher–Yates).
    fn pick(&mut self, count: usize) -> Vec<(usize, String)> {
        let mut order: Vec<usize> = (0..self.watched.len()).collect();
        for i in 0..count {
            let j = i + (self.random() % (order.len() - i) as u64) as usize;
            order.swap(i, j);
        }
        order[..count]
            .iter()
            .map(|&i| self.watched[i].clone())
            .collect()
    }

    fn advance(&mut self, repo: usize, branch: &str) -> String {
        let sha = self.new_sha();
        self.repos[repo]
            .branches
            .insert(branch.to_owned(), sha.clone());
        sha
    }

    /// The URL whose answer changes when `branch` moves: its commits URL, or for a pattern
    /// repository its listing page.
    fn changed_url(&self, repo: usize, branch: &str) -> String {
        let r = &self.repos[repo];
        if !r.pattern {
            return format!("{}/commits/refs/heads/{branch}", r.path);
        }
        let position = r.branches.keys().position(|b| b == branch).unwrap_or(0);
        format!("{}/branches/{}", r.path, position / PER_PAGE + 1)
    }

    fn rebuild_pages(&mut self, repo: usize) {
        let base = self.base.clone();
        let r = &mut self.repos[repo];
        let items: Vec<(&String, &String)> = r.branches.iter().collect();
        let last = items.len().div_ceil(PER_PAGE).max(1);
        let listing = format!("{base}/repos/{}/branches?per_page={PER_PAGE}", r.path);
        let mut pages = Vec::with_capacity(last);
        for (n, chunk) in items.chunks(PER_PAGE).enumerate() {
            let body = page_json(&base, &r.path, chunk);
            let page = n + 1;
            let link = (page < last).then(|| {
                format!(
                    "<{listing}&page={}>; rel=\"next\", <{listing}&page={last}>; rel=\"last\"",
                    page + 1
                )
            });
            pages.push(PageBody {
                etag: weak_etag(body.as_bytes()),
                body: Bytes::from(body),
                link,
            });
        }
        r.pages = pages;
    }
}

fn page_json(base: &str, path: &str, items: &[(&String, &String)]) -> String {
    let entries: Vec<String> = items
        .iter()
        .map(|(name, sha)| {
            format!(
                r#"{{"name":"{name}","commit":{{"sha":"{sha}","url":"{base}/repos/{path}/commits/{sha}"}},"protected":false}}"#
            )
        })
        .collect();
    format!("[{}]", entries.join(","))
}

fn weak_etag(body: &[u8]) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    format!("W/\"{:016x}\"", hasher.finish())
}

/// What a request resolved to, before conditional handling.
enum Answer {
    Found {
        body: Bytes,
        etag: String,
        link: Option<String>,
    },
    Missing(StatusCode),
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.total.fetch_add(1, Ordering::SeqCst);
    let headers = request.headers();
    let authenticated = headers.contains_key(header::AUTHORIZATION);
    let answer = resolve(
        &shared,
        request.uri().path(),
        request.uri().query(),
        headers,
    );
    let (status, body, etag, link) = match answer {
        Answer::Found { body, etag, link } => {
            let matches = headers
                .get(header::IF_NONE_MATCH)
                .is_some_and(|v| v.as_bytes() == etag.as_bytes());
            if matches {
                (StatusCode::NOT_MODIFIED, Bytes::new(), Some(etag), None)
            } else {
                (StatusCode::OK, body, Some(etag), link)
            }
        }
        Answer::Missing(status) => (status, Bytes::from_static(b"{}"), None, None),
    };
    count(&shared, status, authenticated);
    respond(&shared, status, body, etag, link)
}

fn count(shared: &Shared, status: StatusCode, authenticated: bool) {
    if status == StatusCode::NOT_MODIFIED {
        shared.not_modified.fetch_add(1, Ordering::SeqCst);
    } else if authenticated {
        shared.counted.fetch_add(1, Ordering::SeqCst);
    }
    if !authenticated {
        shared.unauthenticated.fetch_add(1, Ordering::SeqCst);
    }
    if status.is_client_error() || status.is_server_error() {
        shared.errors.fetch_add(1, Ordering::SeqCst);
    }
}

fn resolve(shared: &Shared, path: &str, query: Option<&str>, headers: &HeaderMap) -> Answer {
    let Some(rest) = path.strip_prefix("/repos/") else {
        return Answer::Missing(StatusCode::NOT_FOUND);
    };
    let mut parts = rest.splitn(3, '/');
    let (Some(owner), Some(name), Some(tail)) = (parts.next(), parts.next(), parts.next()) else {
        return Answer::Missing(StatusCode::NOT_FOUND);
    };
    let model = shared.model.read().unwrap_or_else(PoisonError::into_inner);
    let Some(repo) = model.index.get(&format!("{owner}/{name}")) else {
        return Answer::Missing(StatusCode::NOT_FOUND);
    };
    let repo = &model.repos[*repo];
    if let Some(branch) = tail.strip_prefix("commits/refs/heads/") {
        let branch = percent_encoding::percent_decode_str(branch).decode_utf8_lossy();
        let Some(sha) = repo.branches.get(branch.as_ref()) else {
            return Answer::Missing(StatusCode::UNPROCESSABLE_ENTITY);
        };
        let wants_sha = headers
            .get(header::ACCEPT)
            .is_some_and(|v| v.as_bytes() == ACCEPT_SHA.as_bytes());
        let body = if wants_sha {
            sha.clone()
        } else {
            format!(r#"{{"sha":"{sha}"}}"#)
        };
        return Answer::Found {
            body: Bytes::from(body),
            etag: format!("\"{sha}\""),
            link: None,
        };
    }
    if tail == "branches" {
        let page = page_number(query);
        return match repo.pages.get(page.saturating_sub(1)) {
            Some(p) => Answer::Found {
                body: p.body.clone(),
                etag: p.etag.clone(),
                link: p.link.clone(),
            },
            None => Answer::Found {
                body: Bytes::from_static(b"[]"),
                etag: weak_etag(b"[]"),
                link: None,
            },
        };
    }
    Answer::Missing(StatusCode::NOT_FOUND)
}

fn page_number(query: Option<&str>) -> usize {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "page")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(1)
}

fn respond(
    shared: &Shared,
    status: StatusCode,
    body: Bytes,
    etag: Option<String>,
    link: Option<String>,
) -> Response {
    let reset = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() + 3600);
    let used = shared.counted.load(Ordering::SeqCst);
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header("x-ratelimit-limit", shared.rate_limit)
        .header(
            "x-ratelimit-remaining",
            shared.rate_limit.saturating_sub(used),
        )
        .header("x-ratelimit-used", used)
        .header("x-ratelimit-reset", reset);
    if let Some(etag) = etag {
        builder = builder.header(header::ETAG, etag);
    }
    if let Some(link) = link {
        builder = builder.header(header::LINK, link);
    }
    builder.body(Body::from(body)).unwrap_or_else(|_| {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}
