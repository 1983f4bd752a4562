//! The one HTTP client every forge shares: per-host concurrency limits, rate-limit pauses,
//! in-call retries with backoff and jitter, and the ETag cache.
//!
//! [`Http::get`] is the only way a forge module talks HTTP. For one URL it
//! 1. refuses at once with [`ForgeError::RateLimited`] while the host is paused (nothing sent);
//! 2. waits for a permit of the host's semaphore, then for the request budget of its host and
//!    token ([`super::budget`]: concurrency and points per sliding minute);
//! 3. sends `If-None-Match` when the URL has a cached ETag, and turns a `304` into the cached
//!    value ([`Reply::Cached`]);
//! 4. reads rate-limit headers; on a `403`/`429` that is a rate limit it pauses the whole host;
//! 5. retries 5xx, timeouts, connection errors and truncated bodies (3 tries, ~200 ms doubling,
//!    with jitter, abandoned when `cancel` fires), then gives up with `Transient`.
//!
//! What a `2xx` body means, and what a `404` means, is the forge module's business: it parses
//! the body and calls [`Http::remember`] so the next request can be conditional.
//!
//! [`Http::post`] is the one write (commit statuses): the same pause, semaphore and rate-limit
//! reading, no ETag, sent once (a write that timed out may have happened; the caller's queue
//! retries), and spaced out per host because writes cost more of a secondary limit than reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::budget::{Budget, BudgetLimits, BudgetSnapshot, Cost};
use super::validators::{StoredValue, Validator, Validators, storable};
use super::{ForgeError, ForgeEvents, ForgeStats, RateLimitInfo, Sha};

/// Tries per call for retryable failures (5xx, timeouts, connection errors).
const TRIES: u32 = 3;
/// First delay between tries; doubles each time, with ±50 % jitter.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
/// Pause after a rate limit that says nothing about when it ends; doubles on each repeat.
const UNKNOWN_PAUSE_MIN: Duration = Duration::from_secs(60);
const UNKNOWN_PAUSE_MAX: Duration = Duration::from_secs(3600);
/// No forge answer we ask for is anywhere near this; anything bigger is broken.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// A value an ETag stood for, replayed on `304 Not Modified`.
#[derive(Debug, Clone)]
pub(crate) enum Cached {
    Sha(Sha),
    Page(Arc<Page>),
}

/// One page of a branch listing: its branches and the link to the next page.
#[derive(Debug)]
pub(crate) struct Page {
    pub branches: Vec<(String, Sha)>,
    pub next: Option<Url>,
}

/// One GET as a forge module describes it.
pub(crate) struct Call<'a> {
    /// The repository's config name, for messages.
    pub repo: &'a str,
    pub url: Url,
    /// Forge headers (auth, `Accept`, API version), built once per repository;
    /// `User-Agent` is the client's.
    pub headers: &'a HeaderMap,
    /// Whether `headers` carry a token, to word a 401 correctly.
    pub has_token: bool,
    pub cancel: &'a CancellationToken,
}

/// A response the forge module has to interpret.
#[derive(Debug)]
pub(crate) enum Reply {
    /// `2xx`.
    Fresh {
        body: Vec<u8>,
        headers: HeaderMap,
        etag: Option<HeaderValue>,
    },
    /// `304` for a URL whose ETag we sent: the value it stood for.
    Cached(Cached),
    /// Any other status that is neither retryable nor a rate limit nor 401/403 (404, 422, 3xx).
    Refused { status: StatusCode, body: Vec<u8> },
}

/// Shared client state; one per [`super::Forges`].
pub(crate) struct Http {
    client: reqwest::Client,
    /// Hosts of repositories with their own `tls.ca_file`: a client that trusts those CAs
    /// too (one client per distinct set of CA files, shared by the hosts that use it).
    host_clients: HashMap<String, reqwest::Client>,
    /// `proxy:` for every client built (the shared one and those per host).
    proxy: Option<reqwest::Proxy>,
    request_timeout: Duration,
    max_per_host: usize,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
    /// URL → (ETag exactly as received, the value it stood for). Both are cheap to clone
    /// (a shared buffer, an `Arc` or an inline SHA), so a hit allocates nothing.
    cache: Mutex<HashMap<String, CacheEntry>>,
    /// Bumped whenever the cache changes in a way worth persisting.
    cache_generation: AtomicU64,
    requests: AtomicU64,
    not_modified: AtomicU64,
    errors: AtomicU64,
    events: RwLock<Option<Arc<dyn ForgeEvents>>>,
    /// GitHub App installation tokens, per installation.
    apps: super::app::AppTokens,
    /// The budget limits per API host (`host` or `host:port`); hosts not listed get
    /// [`BudgetLimits::GITHUB`], the strictest known.
    budget_limits: RwLock<HashMap<String, BudgetLimits>>,
    /// One budget per (API host, hash of the token's headers); the hash is in memory only.
    budgets: Mutex<HashMap<(String, u64), Arc<Budget>>>,
    token_hasher: std::hash::RandomState,
}

/// One ETag cache entry.
struct CacheEntry {
    /// The repository it was asked for (config name), to prune what is no longer configured.
    repo: Arc<str>,
    etag: HeaderValue,
    value: Cached,
    /// Asked for or stored since start (or since it was loaded).
    touched: bool,
}

/// One API host (or Git host): its concurrency limit and what we know of its rate limit.
pub(crate) struct Host {
    name: String,
    semaphore: Arc<Semaphore>,
    limits: Mutex<Limits>,
    /// When the next write to this host may be sent.
    next_write: Mutex<Option<tokio::time::Instant>>,
}

impl Http {
    /// `extra_roots` are trusted besides the system's (`tls.ca_file`, `GIT_SSL_CAINFO`).
    pub fn new(
        request_timeout: Duration,
        max_per_host: usize,
        extra_roots: Vec<reqwest::Certificate>,
        proxy: Option<reqwest::Proxy>,
    ) -> reqwest::Result<Http> {
        let client = build_client(request_timeout, max_per_host, extra_roots, proxy.clone())?;
        Ok(Http {
            client,
            host_clients: HashMap::new(),
            proxy,
            request_timeout,
            max_per_host: max_per_host.max(1),
            hosts: Mutex::default(),
            cache: Mutex::default(),
            cache_generation: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            not_modified: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            events: RwLock::new(None),
            apps: super::app::AppTokens::default(),
            budget_limits: RwLock::default(),
            budgets: Mutex::default(),
            token_hasher: std::hash::RandomState::new(),
        })
    }

    /// The budget limits of each API host; budgets made before keep theirs.
    pub fn set_budget_limits(&self, limits: HashMap<String, BudgetLimits>) {
        *self
            .budget_limits
            .write()
            .unwrap_or_else(PoisonError::into_inner) = limits;
    }

    /// The budget of host `key` for the token in `headers`, created on first use.
    pub fn budget(&self, key: &str, headers: &HeaderMap) -> Arc<Budget> {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut hasher = self.token_hasher.build_hasher();
        for value in headers.values().filter(|v| v.is_sensitive()) {
            value.as_bytes().hash(&mut hasher);
        }
        let token = hasher.finish();
        let mut budgets = self.budgets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(budget) = budgets.get(&(key.to_owned(), token)) {
            return budget.clone();
        }
        let limits = self
            .budget_limits
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
            .unwrap_or(BudgetLimits::GITHUB);
        budgets
            .entry((key.to_owned(), token))
            .or_insert_with(|| Arc::new(Budget::new(key, limits)))
            .clone()
    }

    /// What every budget has spent and knows, by host (several tokens on one host are
    /// several entries).
    pub fn budgets(&self) -> Vec<BudgetSnapshot> {
        let budgets: Vec<Arc<Budget>> = self
            .budgets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut snaps: Vec<BudgetSnapshot> = budgets.iter().map(|b| b.snapshot()).collect();
        snaps.sort_by(|a, b| a.host.cmp(&b.host));
        snaps
    }

    /// The budget limits of host `key` (as [`Http::budget`] would make them).
    pub fn budget_limits(&self, key: &str) -> BudgetLimits {
        self.budget_limits
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
            .unwrap_or(BudgetLimits::GITHUB)
    }

    /// Requests to each host of `hosts` go through a client that trusts `roots` besides the
    /// system's (the top-level CAs and a repository's own, chosen by the caller).
    pub fn with_host_roots(
        mut self,
        hosts: Vec<String>,
        roots: Vec<reqwest::Certificate>,
    ) -> reqwest::Result<Http> {
        let client = build_client(
            self.request_timeout,
            self.max_per_host,
            roots,
            self.proxy.clone(),
        )?;
        for host in hosts {
            self.host_clients.insert(host, client.clone());
        }
        Ok(self)
    }

    fn client_for(&self, host: &str) -> &reqwest::Client {
        self.host_clients.get(host).unwrap_or(&self.client)
    }

    /// Tells the events observer that `host` refused a TLS certificate.
    pub fn tls_error(&self, host: &str) {
        if let Some(events) = self.events() {
            events.tls_error(host);
        }
    }

    /// The GitHub App installation tokens minted through this client.
    pub fn apps(&self) -> &super::app::AppTokens {
        &self.apps
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub fn set_events(&self, events: Arc<dyn ForgeEvents>) {
        *self.events.write().unwrap_or_else(PoisonError::into_inner) = Some(events);
    }

    fn events(&self) -> Option<Arc<dyn ForgeEvents>> {
        self.events
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The state of host `key` (`host` or `host:port`), created on first use.
    pub fn host(&self, key: &str) -> Arc<Host> {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(host) = hosts.get(key) {
            return host.clone();
        }
        hosts
            .entry(key.to_owned())
            .or_insert_with(|| {
                Arc::new(Host {
                    name: key.to_owned(),
                    semaphore: Arc::new(Semaphore::new(self.max_per_host)),
                    limits: Mutex::default(),
                    next_write: Mutex::default(),
                })
            })
            .clone()
    }

    /// Counts one request that is not HTTP (a Git ls-remote), for the stats and the hook.
    pub fn count_other(&self, host: &str, ok: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(events) = self.events() {
            events.request(host, if ok { "ok" } else { "error" });
        }
    }

    pub fn stats(&self) -> ForgeStats {
        let hosts: Vec<Arc<Host>> = self
            .hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let now = SystemTime::now();
        let rate_limits: BTreeMap<String, RateLimitInfo> = hosts
            .iter()
            .filter_map(|h| {
                let l = h.limits();
                let info = RateLimitInfo {
                    remaining: l.remaining,
                    reset: l.reset,
                    paused_until: l.paused(now),
                };
                let known =
                    info.remaining.is_some() || info.reset.is_some() || info.paused_until.is_some();
                known.then(|| (h.name.clone(), info))
            })
            .collect();
        ForgeStats {
            requests: self.requests.load(Ordering::Relaxed),
            not_modified: self.not_modified.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            rate_limits,
        }
    }

    /// Stores the value a response's ETag stands for; the next GET of `url` is conditional.
    pub fn remember(&self, repo: &str, url: &Url, etag: Option<HeaderValue>, value: Cached) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        match etag {
            Some(etag) => {
                let repo = match cache.get(url.as_str()) {
                    Some(old) if &*old.repo == repo => old.repo.clone(),
                    _ => Arc::from(repo),
                };
                cache.insert(
                    url.as_str().to_owned(),
                    CacheEntry {
                        repo,
                        etag,
                        value,
                        touched: true,
                    },
                );
                self.cache_generation.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                if cache.remove(url.as_str()).is_some() {
                    self.cache_generation.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn cached(&self, url: &Url) -> Option<(HeaderValue, Cached)> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = cache.get_mut(url.as_str())?;
        entry.touched = true;
        Some((entry.etag.clone(), entry.value.clone()))
    }

    /// A number that changes whenever the ETag cache changes in a way worth persisting.
    pub fn validators_generation(&self) -> u64 {
        self.cache_generation.load(Ordering::Relaxed)
    }

    /// The ETag cache as it is persisted. An entry no request touched since start is left
    /// out when other entries of its repository were touched (a branch no longer watched,
    /// a listing page that no longer exists); a repository not asked at all (backing off)
    /// keeps its entries.
    pub fn export_validators(&self) -> Validators {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let touched_repos: std::collections::HashSet<&str> = cache
            .values()
            .filter(|e| e.touched)
            .map(|e| &*e.repo)
            .collect();
        let mut entries: Vec<Validator> = cache
            .iter()
            .filter(|(_, e)| e.touched || !touched_repos.contains(&*e.repo))
            .filter_map(|(url, e)| {
                let parsed = Url::parse(url).ok()?;
                if !storable(&parsed) {
                    return None;
                }
                let value = match &e.value {
                    Cached::Sha(sha) => StoredValue::Sha(sha.clone()),
                    Cached::Page(page) => StoredValue::Page {
                        branches: page.branches.clone(),
                        next: match &page.next {
                            Some(next) if storable(next) => Some(next.as_str().to_owned()),
                            Some(_) => return None,
                            None => None,
                        },
                    },
                };
                Some(Validator {
                    repo: e.repo.to_string(),
                    url: url.clone(),
                    etag: e.etag.to_str().ok()?.to_owned(),
                    value,
                })
            })
            .collect();
        entries.sort_by(|a, b| (&a.repo, &a.url).cmp(&(&b.repo, &b.url)));
        Validators::new(entries)
    }

    /// Loads persisted validators into the ETag cache, keeping only the entries of
    /// repositories `configured` accepts; returns how many were dropped. Entries already
    /// in the cache win.
    pub fn import_validators(
        &self,
        validators: Validators,
        configured: impl Fn(&str) -> bool,
    ) -> usize {
        let mut dropped = 0;
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let mut names: HashMap<String, Arc<str>> = HashMap::new();
        for v in validators.entries {
            let entry = (|| {
                if !configured(&v.repo) {
                    return None;
                }
                let url = Url::parse(&v.url).ok().filter(storable)?;
                let etag = HeaderValue::from_str(&v.etag).ok()?;
                let value = match v.value {
                    StoredValue::Sha(sha) => Cached::Sha(sha),
                    StoredValue::Page { branches, next } => {
                        let next = match next {
                            Some(next) => Some(
                                Url::parse(&next)
                                    .ok()
                                    .filter(|n| storable(n) && n.origin() == url.origin())?,
                            ),
                            None => None,
                        };
                        Cached::Page(Arc::new(Page { branches, next }))
                    }
                };
                let repo = names
                    .entry(v.repo.clone())
                    .or_insert_with(|| Arc::from(v.repo.as_str()))
                    .clone();
                Some((
                    url.as_str().to_owned(),
                    CacheEntry {
                        repo,
                        etag,
                        value,
                        touched: false,
                    },
                ))
            })();
            match entry {
                Some((url, entry)) => {
                    cache.entry(url).or_insert(entry);
                }
                None => dropped += 1,
            }
        }
        if dropped > 0 {
            self.cache_generation.fetch_add(1, Ordering::Relaxed);
        }
        dropped
    }

    /// One GET with everything the module header lists. Never panics.
    pub async fn get(&self, call: Call<'_>) -> Result<Reply, ForgeError> {
        let key = host_key(&call.url);
        let host = self.host(key);
        let mut last = String::new();
        for attempt in 1..=TRIES {
            match self.attempt(&host, &call).await {
                Attempt::Done(result) => return result,
                Attempt::Retry(why) => last = why,
            }
            if attempt < TRIES {
                let delay = retry_delay(attempt);
                tokio::select! {
                    () = call.cancel.cancelled() => return Err(cancelled(call.repo)),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
        Err(ForgeError::Transient(format!(
            "{}: {last} (gave up after {TRIES} tries)",
            call.repo
        )))
    }

    /// One POST of the JSON `body`, at least `spacing` after the previous write to the
    /// same host. Never panics; never retried here (see the module header).
    pub async fn post(
        &self,
        call: Call<'_>,
        body: &[u8],
        spacing: Duration,
    ) -> Result<Reply, ForgeError> {
        let host = self.host(host_key(&call.url));
        if !host.space_write(spacing, call.cancel).await {
            return Err(cancelled(call.repo));
        }
        match self.attempt_with(&host, &call, Some(body), None).await {
            Attempt::Done(result) => result,
            Attempt::Retry(why) => Err(ForgeError::Transient(format!("{}: {why}", call.repo))),
        }
    }

    /// One POST of the JSON `body` that is a read (a GraphQL query) charged `cost` against
    /// the host's budget: no write spacing, retried like a GET, never conditional. Used by
    /// the GraphQL client (issue #20, branch scale-graphql).
    #[allow(dead_code)]
    pub async fn post_costed(
        &self,
        call: Call<'_>,
        body: &[u8],
        cost: Cost,
    ) -> Result<Reply, ForgeError> {
        let host = self.host(host_key(&call.url));
        let mut last = String::new();
        for attempt in 1..=TRIES {
            match self
                .attempt_with(&host, &call, Some(body), Some(cost))
                .await
            {
                Attempt::Done(result) => return result,
                Attempt::Retry(why) => last = why,
            }
            if attempt < TRIES {
                tokio::select! {
                    () = call.cancel.cancelled() => return Err(cancelled(call.repo)),
                    () = tokio::time::sleep(retry_delay(attempt)) => {}
                }
            }
        }
        Err(ForgeError::Transient(format!(
            "{}: {last} (gave up after {TRIES} tries)",
            call.repo
        )))
    }

    async fn attempt(&self, host: &Host, call: &Call<'_>) -> Attempt {
        self.attempt_with(host, call, None, None).await
    }

    /// A GET (conditional when an ETag is cached), or a POST of `body` as JSON, charged
    /// `cost` (by default what the method costs) against the budget of host and token.
    async fn attempt_with(
        &self,
        host: &Host,
        call: &Call<'_>,
        body: Option<&[u8]>,
        cost: Option<Cost>,
    ) -> Attempt {
        if let Some(until) = host.limits().paused(SystemTime::now()) {
            return Attempt::Done(Err(rate_limited(host, until)));
        }
        let _permit = match host.permit(call.cancel).await {
            Some(p) => p,
            None => return Attempt::Done(Err(cancelled(call.repo))),
        };
        let method = if body.is_some() {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let budget = self.budget(&host.name, call.headers);
        let cost = cost.unwrap_or_else(|| Cost::for_method(&method, budget.limits().write_points));
        let _budget_permit = tokio::select! {
            () = call.cancel.cancelled() => return Attempt::Done(Err(cancelled(call.repo))),
            permit = budget.acquire(cost) => permit,
        };
        // The pause may have started while we waited for the permits.
        if let Some(until) = host.limits().paused(SystemTime::now()) {
            return Attempt::Done(Err(rate_limited(host, until)));
        }

        let cached = body.is_none().then(|| self.cached(&call.url)).flatten();
        let mut request = reqwest::Request::new(method.clone(), call.url.clone());
        *request.headers_mut() = call.headers.clone();
        if let Some((etag, _)) = &cached {
            request
                .headers_mut()
                .insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(body) = body {
            request.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            *request.body_mut() = Some(body.to_vec().into());
        }
        let started = Instant::now();
        self.requests.fetch_add(1, Ordering::Relaxed);
        let sent = tokio::select! {
            () = call.cancel.cancelled() => return Attempt::Done(Err(cancelled(call.repo))),
            sent = self.client_for(&host.name).execute(request) => sent,
        };
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                self.record(call, &method, &host.name, None, started);
                if is_certificate_error(&e) {
                    self.tls_error(&host.name);
                    // Retrying cannot fix a refused certificate: fail now, loudly.
                    return Attempt::Done(Err(ForgeError::Certificate(format!(
                        "{}: {} (check api_url and the trust: tls.ca_file, GIT_SSL_CAINFO, SSL_CERT_FILE)",
                        call.repo,
                        describe_transport(&host.name, &e)
                    ))));
                }
                return Attempt::Retry(describe_transport(&host.name, &e));
            }
        };
        let status = response.status();
        self.read_rate_limit(host, response.headers());
        observe_primary(&budget, response.headers());

        if status == StatusCode::NOT_MODIFIED {
            self.record(call, &method, &host.name, Some(status), started);
            self.not_modified.fetch_add(1, Ordering::Relaxed);
            host.limits().success();
            return Attempt::Done(match cached {
                Some((_, value)) => Ok(Reply::Cached(value)),
                None => Err(ForgeError::Malformed(format!(
                    "{}: {} answered 304 Not Modified to a request that was not conditional",
                    call.repo, host.name
                ))),
            });
        }

        let headers = response.headers().clone();
        let body = tokio::select! {
            () = call.cancel.cancelled() => return Attempt::Done(Err(cancelled(call.repo))),
            body = read_body(response) => body,
        };
        self.record(call, &method, &host.name, Some(status), started);
        let body = match body {
            Ok(b) => b,
            Err(BodyError::TooLarge) => {
                return Attempt::Done(Err(ForgeError::Malformed(format!(
                    "{}: {} sent an answer larger than {} MiB",
                    call.repo,
                    host.name,
                    MAX_BODY / (1024 * 1024)
                ))));
            }
            Err(BodyError::Transport(e)) if status.is_success() || status.is_server_error() => {
                return Attempt::Retry(format!(
                    "the answer from {} was cut short: {}",
                    host.name,
                    error_chain(&e)
                ));
            }
            Err(BodyError::Transport(_)) => Vec::new(),
        };

        if status.is_success() {
            host.limits().success();
            // A copy: a header value borrows the whole buffer the headers were read into,
            // which a cached ETag would keep alive for as long as it is cached.
            let etag = headers
                .get(header::ETAG)
                .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
            return Attempt::Done(Ok(Reply::Fresh {
                body,
                headers,
                etag,
            }));
        }
        if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
            return Attempt::Retry(format!("{} answered {}", host.name, status_text(status)));
        }
        match status {
            StatusCode::UNAUTHORIZED => Attempt::Done(Err(ForgeError::Auth(if call.has_token {
                format!(
                    "{}: bad or expired token for {}{TOKEN_REFUSED}",
                    call.repo, host.name
                )
            } else {
                format!(
                    "{}: {} requires a token (401 Unauthorized); set monitor.auth.token",
                    call.repo, host.name
                )
            }))),
            StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS => {
                let error = self.refused_403_429(host, call, status, &headers, &body);
                if matches!(error, ForgeError::RateLimited { .. }) {
                    budget.throttled();
                    if let Some(events) = self.events() {
                        events.rate_limited(&host.name);
                    }
                }
                Attempt::Done(Err(error))
            }
            _ => Attempt::Done(Ok(Reply::Refused { status, body })),
        }
    }

    /// A 403 or 429: a rate limit (pause the host) or a token without permission.
    fn refused_403_429(
        &self,
        host: &Host,
        call: &Call<'_>,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> ForgeError {
        let now = SystemTime::now();
        let signals = RateSignals::read(headers, now);
        let text = String::from_utf8_lossy(body).to_ascii_lowercase();
        let evident = status == StatusCode::TOO_MANY_REQUESTS || text.contains("rate limit");
        let mut limits = host.limits();
        match limits.pause(now, &signals, evident) {
            Some((until, newly)) => {
                drop(limits);
                if newly {
                    tracing::warn!(
                        host = %host.name,
                        until = %humantime::format_rfc3339_seconds(until),
                        status = status.as_u16(),
                        "rate limited: pausing every request to this host until then"
                    );
                }
                rate_limited(host, until)
            }
            None => ForgeError::Auth(format!(
                "{}: {} refused access (403 Forbidden): the token lacks permission for this repository",
                call.repo, host.name
            )),
        }
    }

    fn read_rate_limit(&self, host: &Host, headers: &HeaderMap) {
        let signals = RateSignals::read(headers, SystemTime::now());
        if signals.remaining.is_none() && signals.reset.is_none() {
            return;
        }
        let paused = host.limits().observe(&signals);
        if let Some(until) = paused.filter(|until| *until > SystemTime::now()) {
            tracing::warn!(
                host = %host.name,
                "{}: the primary rate limit is spent; no request until it resets in {}",
                host.name,
                humantime::format_duration(Duration::from_secs(
                    until.duration_since(SystemTime::now()).unwrap_or_default().as_secs()
                ))
            );
        }
        if let Some(events) = self.events() {
            events.rate_limit(&host.name, signals.remaining, signals.reset);
        }
    }

    /// Debug log, counters and the hook for one request that was sent.
    fn record(
        &self,
        call: &Call<'_>,
        method: &reqwest::Method,
        host: &str,
        status: Option<StatusCode>,
        started: Instant,
    ) {
        let status_label = status.map_or_else(|| "error".to_owned(), |s| s.as_u16().to_string());
        let failed = status.is_none_or(|s| s.is_client_error() || s.is_server_error());
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(
            repo = call.repo,
            method = method.as_str(),
            url = %call.url,
            host,
            status = %status_label,
            ms = started.elapsed().as_millis() as u64,
            "forge request"
        );
        if let Some(events) = self.events() {
            events.request(host, &status_label);
        }
    }
}

impl Host {
    fn limits(&self) -> std::sync::MutexGuard<'_, Limits> {
        self.limits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for this host's next write slot and books the one after it, `spacing` later;
    /// false when `cancel` fired first.
    pub async fn space_write(&self, spacing: Duration, cancel: &CancellationToken) -> bool {
        let at = {
            let mut next = self
                .next_write
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let now = tokio::time::Instant::now();
            let at = next.map_or(now, |n| n.max(now));
            *next = Some(at + spacing);
            at
        };
        tokio::select! {
            () = cancel.cancelled() => false,
            () = tokio::time::sleep_until(at) => true,
        }
    }

    /// A concurrency permit, or `None` when `cancel` fired first.
    pub async fn permit(&self, cancel: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            () = cancel.cancelled() => None,
            permit = self.semaphore.clone().acquire_owned() => permit.ok(),
        }
    }
}

enum Attempt {
    Done(Result<Reply, ForgeError>),
    Retry(String),
}

/// Feeds the primary quota a response reports (`x-ratelimit-*`, `ratelimit-*`) to `budget`.
fn observe_primary(budget: &Budget, headers: &HeaderMap) {
    let number = |names: &[&str]| {
        names.iter().find_map(|name| {
            headers
                .get(*name)?
                .to_str()
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    let remaining = number(&["x-ratelimit-remaining", "ratelimit-remaining"]);
    let limit = number(&["x-ratelimit-limit", "ratelimit-limit"]);
    let reset = number(&["x-ratelimit-reset", "ratelimit-reset"])
        .filter(|n| *n >= 1_000_000_000)
        .map(|n| UNIX_EPOCH + Duration::from_secs(n));
    if remaining.is_some() || limit.is_some() || reset.is_some() {
        budget.observe_primary(remaining, limit, reset);
    }
}

/// What one response says about the rate limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RateSignals {
    pub remaining: Option<u64>,
    pub reset: Option<SystemTime>,
    pub retry_after: Option<Duration>,
}

impl RateSignals {
    /// Every forge kind's rate-limit headers (GitHub's `x-ratelimit-*`, GitLab's
    /// `RateLimit-*`), and `Retry-After` (seconds).
    pub fn read(headers: &HeaderMap, now: SystemTime) -> RateSignals {
        let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
        let kinds = super::kind::all();
        let pairs = || kinds.iter().filter_map(|k| k.rate_limit_headers);
        let remaining = pairs().find_map(|(remaining, _)| number(remaining));
        let reset = pairs().find_map(|(_, reset)| number(reset)).map(|n| {
            // Epoch seconds as documented; small values are delta-seconds (IETF draft style).
            if n < 1_000_000_000 {
                now + Duration::from_secs(n)
            } else {
                UNIX_EPOCH + Duration::from_secs(n)
            }
        });
        let retry_after = number("retry-after").map(Duration::from_secs);
        RateSignals {
            remaining,
            reset,
            retry_after,
        }
    }
}

/// What we know of one host's rate limit. Pure: every method takes `now`, for tests.
#[derive(Debug, Default)]
pub(crate) struct Limits {
    remaining: Option<u64>,
    reset: Option<SystemTime>,
    paused_until: Option<SystemTime>,
    /// Length of the last pause that had no end time; doubles on repeats, cleared on success.
    unknown_pause: Option<Duration>,
}

impl Limits {
    /// The end of the current pause, if one is running at `now`.
    pub fn paused(&self, now: SystemTime) -> Option<SystemTime> {
        self.paused_until.filter(|until| *until > now)
    }

    /// Remembers what a response said; returns the end of a new pause when the primary
    /// quota is spent (`remaining: 0` with a reset time): no request goes out until the
    /// reset, rather than one that is answered 403.
    pub fn observe(&mut self, signals: &RateSignals) -> Option<SystemTime> {
        if signals.remaining.is_some() {
            self.remaining = signals.remaining;
        }
        if signals.reset.is_some() {
            self.reset = signals.reset;
        }
        match (signals.remaining, signals.reset) {
            (Some(0), Some(reset)) if self.paused_until.is_none_or(|until| until < reset) => {
                self.paused_until = Some(reset);
                Some(reset)
            }
            _ => None,
        }
    }

    /// A 403/429 arrived. Returns the end of the pause and whether it newly started, or
    /// `None` when the response is no rate limit at all.
    pub fn pause(
        &mut self,
        now: SystemTime,
        signals: &RateSignals,
        evident: bool,
    ) -> Option<(SystemTime, bool)> {
        let at_least_a_second = now + Duration::from_secs(1);
        let until = if let Some(after) = signals.retry_after {
            now + after.max(Duration::from_secs(1))
        } else if let (Some(0), Some(reset)) = (signals.remaining, signals.reset) {
            reset.max(at_least_a_second)
        } else if evident || signals.remaining == Some(0) {
            // An answer to a request that was already in flight when the running pause began
            // is the same rate limit, not a repeat: it must not double the pause.
            if let Some(current) = self.paused(now) {
                return Some((current, false));
            }
            let length = self
                .unknown_pause
                .map_or(UNKNOWN_PAUSE_MIN, |d| (d * 2).min(UNKNOWN_PAUSE_MAX));
            self.unknown_pause = Some(length);
            now + length
        } else {
            return None;
        };
        let newly = self.paused(now).is_none();
        let until = self.paused(now).map_or(until, |current| current.max(until));
        self.paused_until = Some(until);
        Some((until, newly))
    }

    pub fn success(&mut self) {
        self.unknown_pause = None;
    }
}

/// `host` or `host:port` (a default port is never spelled out in a parsed URL): the key
/// of per-host limits and of `ForgeStats::rate_limits`. Borrowed, as it is looked up for
/// every request.
pub(crate) fn host_key(url: &Url) -> &str {
    match url.authority().rsplit_once('@') {
        Some((_userinfo, host)) => host,
        None if url.has_host() => url.authority(),
        None => "local",
    }
}

/// Delay before try `attempt + 1`: 200 ms, 400 ms, … each scaled by a random 0.5–1.5.
pub(crate) fn retry_delay(attempt: u32) -> Duration {
    let base = FIRST_RETRY_DELAY * 2u32.saturating_pow(attempt.saturating_sub(1));
    base.mul_f64(rand::random_range(0.5..1.5))
}

pub(crate) fn cancelled(repo: &str) -> ForgeError {
    ForgeError::Transient(format!("{repo}: check cancelled (shutting down)"))
}

fn rate_limited(host: &Host, until: SystemTime) -> ForgeError {
    ForgeError::RateLimited {
        host: host.name.clone(),
        until,
    }
}

fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// The client every request shares (or one per set of extra CAs, see
/// [`Http::with_host_roots`]): rustls, HTTP/2 allowed, connect timeout 10 s, Sentry's
/// `User-Agent`, a bounded pool, redirects only within the origin.
fn build_client(
    request_timeout: Duration,
    max_per_host: usize,
    extra_roots: Vec<reqwest::Certificate>,
    proxy: Option<reqwest::Proxy>,
) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder();
    // `proxy:` replaces the environment's proxies; without it reqwest reads them.
    if let Some(proxy) = proxy {
        builder = builder.no_proxy().proxy(proxy);
    }
    builder
        .tls_certs_merge(extra_roots)
        .user_agent(crate::build_info::USER_AGENT)
        .connect_timeout(Duration::from_secs(10))
        .timeout(request_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        // At most one connection per request in flight stays open: a bounded pool.
        .pool_max_idle_per_host(max_per_host.max(1))
        .redirect(same_origin_redirects())
        .build()
}

/// How the message of a 401 to a request with a token ends (see [`is_unauthorized`]).
const TOKEN_REFUSED: &str = " (401 Unauthorized)";

/// Whether `error` is a 401 to a request that carried a token: a GitHub App token that
/// was revoked or expired early is handed back and minted again once.
pub(crate) fn is_unauthorized(error: &ForgeError) -> bool {
    matches!(error, ForgeError::Auth(m) if m.ends_with(TOKEN_REFUSED))
}

/// Whether a transport error is a refused TLS certificate (rustls reports it in the
/// error's sources).
fn is_certificate_error(error: &reqwest::Error) -> bool {
    error_chain(error)
        .to_ascii_lowercase()
        .contains("certificate")
}

fn describe_transport(host: &str, error: &reqwest::Error) -> String {
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    format!("{host}: {what}: {}", error_chain(error))
}

/// An error and its sources on one line, without the URL (it is logged separately).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

enum BodyError {
    TooLarge,
    Transport(reqwest::Error),
}

async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Follows redirects only within the same origin, so a token header (which reqwest only
/// strips for `Authorization`) never travels to another host.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let first = attempt.previous().first().map(Url::origin);
        if attempt.previous().len() >= 5 {
            attempt.error("too many redirects")
        } else if first.is_some_and(|origin| origin == attempt.url().origin()) {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn retry_after_pauses_for_that_long_and_logs_once() {
        let mut limits = Limits::default();
        let signals = RateSignals {
            retry_after: Some(Duration::from_secs(30)),
            ..RateSignals::default()
        };
        assert_eq!(limits.pause(at(0), &signals, true), Some((at(30), true)));
        assert_eq!(limits.paused(at(29)), Some(at(30)));
        assert_eq!(limits.paused(at(30)), None);
        // A second 429 during the pause extends nothing shorter and is not "new".
        assert_eq!(limits.pause(at(10), &signals, true), Some((at(40), false)));
    }

    #[test]
    fn remaining_zero_pauses_until_reset() {
        let mut limits = Limits::default();
        let signals = RateSignals {
            remaining: Some(0),
            reset: Some(at(500)),
            retry_after: None,
        };
        assert_eq!(limits.pause(at(0), &signals, false), Some((at(500), true)));
        assert!(limits.paused(at(499)).is_some());
        assert!(limits.paused(at(500)).is_none());
    }

    #[test]
    fn a_spent_quota_pauses_before_any_403() {
        let mut limits = Limits::default();
        let last = RateSignals {
            remaining: Some(0),
            reset: Some(at(500)),
            retry_after: None,
        };
        assert_eq!(limits.observe(&last), Some(at(500)));
        assert!(limits.paused(at(499)).is_some());
        assert!(limits.paused(at(500)).is_none());
        // Quota left: no pause.
        let mut limits = Limits::default();
        let some = RateSignals {
            remaining: Some(3),
            reset: Some(at(500)),
            retry_after: None,
        };
        assert_eq!(limits.observe(&some), None);
        assert!(limits.paused(at(1)).is_none());
    }

    #[test]
    fn reset_in_the_past_still_pauses_a_second() {
        let mut limits = Limits::default();
        let signals = RateSignals {
            remaining: Some(0),
            reset: Some(at(0)),
            retry_after: None,
        };
        assert_eq!(
            limits.pause(at(100), &signals, false),
            Some((at(101), true))
        );
    }

    #[test]
    fn unknown_rate_limit_backs_off_doubling_capped_and_resets_on_success() {
        let mut limits = Limits::default();
        let none = RateSignals::default();
        let mut now = at(0);
        let mut lengths = Vec::new();
        for _ in 0..8 {
            let (until, _) = limits.pause(now, &none, true).unwrap();
            lengths.push(until.duration_since(now).unwrap().as_secs());
            now = until;
        }
        assert_eq!(lengths, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        limits.success();
        let (until, _) = limits.pause(now, &none, true).unwrap();
        assert_eq!(until.duration_since(now).unwrap().as_secs(), 60);
    }

    #[test]
    fn concurrent_unknown_rate_limits_do_not_double_the_pause() {
        let mut limits = Limits::default();
        let none = RateSignals::default();
        // Two requests in flight together both come back rate limited.
        assert_eq!(limits.pause(at(0), &none, true), Some((at(60), true)));
        assert_eq!(limits.pause(at(0), &none, true), Some((at(60), false)));
        assert_eq!(limits.paused(at(59)), Some(at(60)));
        // Limited again after the pause ended: that is a repeat, and it doubles.
        let (until, newly) = limits.pause(at(60), &none, true).unwrap();
        assert_eq!((until, newly), (at(180), true));
    }

    #[test]
    fn plain_403_is_no_rate_limit() {
        let mut limits = Limits::default();
        let signals = RateSignals {
            remaining: Some(4000),
            reset: Some(at(100)),
            retry_after: None,
        };
        assert_eq!(limits.pause(at(0), &signals, false), None);
        assert_eq!(limits.paused(at(0)), None);
    }

    #[test]
    fn reads_github_and_gitlab_headers() {
        let now = at(0);
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("42"));
        h.insert("x-ratelimit-reset", HeaderValue::from_static("1800000100"));
        let s = RateSignals::read(&h, now);
        assert_eq!((s.remaining, s.reset), (Some(42), Some(at(100))));

        let mut h = HeaderMap::new();
        h.insert("RateLimit-Remaining", HeaderValue::from_static("7"));
        h.insert("RateLimit-Reset", HeaderValue::from_static("1800000060"));
        h.insert("Retry-After", HeaderValue::from_static("12"));
        let s = RateSignals::read(&h, now);
        assert_eq!(
            s,
            RateSignals {
                remaining: Some(7),
                reset: Some(at(60)),
                retry_after: Some(Duration::from_secs(12)),
            }
        );
    }

    #[test]
    fn retry_delays_grow_with_jitter() {
        for _ in 0..50 {
            let first = retry_delay(1);
            let second = retry_delay(2);
            assert!((100..=300).contains(&first.as_millis()), "{first:?}");
            assert!((200..=600).contains(&second.as_millis()), "{second:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn writes_to_one_host_are_spaced() {
        let http = Http::new(Duration::from_secs(5), 4, Vec::new(), None).unwrap();
        let host = http.host("api.github.com");
        let never = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let spacing = Duration::from_secs(1);
        for _ in 0..3 {
            assert!(host.space_write(spacing, &never).await);
        }
        // The first goes at once, each next one a second after the one before.
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        let other = http.host("gitlab.com");
        let before = tokio::time::Instant::now();
        assert!(other.space_write(spacing, &never).await);
        assert_eq!(
            before.elapsed(),
            Duration::ZERO,
            "hosts are spaced separately"
        );
    }

    #[test]
    fn validators_round_trip_and_prune() {
        let http = Http::new(Duration::from_secs(5), 4, Vec::new(), None).unwrap();
        let sha = Sha::parse(&"a".repeat(40)).unwrap();
        let head = Url::parse("https://api.github.com/repos/o/r/commits/refs/heads/main").unwrap();
        let page = Url::parse("https://api.github.com/repos/o/r/branches?per_page=100").unwrap();
        let next = Url::parse("https://api.github.com/repos/o/r/branches?page=2").unwrap();
        let gone = Url::parse("https://api.github.com/repos/o/gone/commits/refs/heads/x").unwrap();
        http.remember(
            "r",
            &head,
            Some(HeaderValue::from_static("\"h\"")),
            Cached::Sha(sha.clone()),
        );
        let listed = Arc::new(Page {
            branches: vec![("rel/1".into(), sha.clone())],
            next: Some(next.clone()),
        });
        http.remember(
            "r",
            &page,
            Some(HeaderValue::from_static("W/\"p\"")),
            Cached::Page(listed),
        );
        http.remember(
            "gone",
            &gone,
            Some(HeaderValue::from_static("\"g\"")),
            Cached::Sha(sha.clone()),
        );
        let saved = http.export_validators();
        assert_eq!(saved.entries.len(), 3);
        let text = serde_json::to_string(&saved).unwrap();
        let loaded: Validators = serde_json::from_str(&text).unwrap();

        let fresh = Http::new(Duration::from_secs(5), 4, Vec::new(), None).unwrap();
        assert_eq!(fresh.import_validators(loaded, |repo| repo == "r"), 1);
        let (etag, value) = fresh.cached(&head).expect("head validator");
        assert_eq!(etag, "\"h\"");
        assert!(matches!(value, Cached::Sha(s) if s == sha));
        let (etag, value) = fresh.cached(&page).expect("page validator");
        assert_eq!(etag, "W/\"p\"");
        let Cached::Page(p) = value else {
            panic!("a page")
        };
        assert_eq!(p.next.as_ref(), Some(&next));
        assert!(fresh.cached(&gone).is_none(), "no longer configured");

        // An entry of a repository that was asked, but not itself, is not saved again.
        let stale = Url::parse("https://api.github.com/repos/o/r/commits/refs/heads/old").unwrap();
        let more = Validators::new(vec![Validator {
            repo: "r".into(),
            url: stale.as_str().into(),
            etag: "\"s\"".into(),
            value: StoredValue::Sha(sha.clone()),
        }]);
        fresh.import_validators(more, |_| true);
        let urls: Vec<String> = fresh
            .export_validators()
            .entries
            .into_iter()
            .map(|e| e.url)
            .collect();
        assert!(!urls.contains(&stale.to_string()), "{urls:?}");
        assert_eq!(urls.len(), 2);

        // A URL with credentials is never written down.
        let secret = Url::parse("https://user:pw@api.github.com/repos/o/r/x").unwrap();
        http.remember(
            "r",
            &secret,
            Some(HeaderValue::from_static("\"x\"")),
            Cached::Sha(sha),
        );
        let text = serde_json::to_string(&http.export_validators()).unwrap();
        assert!(!text.contains("pw@"), "{text}");
    }

    /// 10,000 branches of validators: a few MiB at most (a ConfigMap shard holds 900 KiB;
    /// the state backend shards up to 16 of them).
    #[test]
    fn ten_thousand_validators_fit() {
        let http = Http::new(Duration::from_secs(5), 4, Vec::new(), None).unwrap();
        for i in 0..10_000 {
            let url = Url::parse(&format!(
                "https://api.github.com/repos/example-org/repository-{:03}/commits/refs/heads/feature/branch-{i:05}",
                i / 100
            ))
            .unwrap();
            let etag = HeaderValue::from_str(&format!("W/\"{:064x}\"", i)).unwrap();
            let sha = Sha::parse(&format!("{i:040x}")).unwrap();
            http.remember("repository", &url, Some(etag), Cached::Sha(sha));
        }
        let bytes = serde_json::to_vec(&http.export_validators()).unwrap();
        println!("10,000 validators: {} bytes", bytes.len());
        assert!(bytes.len() < 3 * 1024 * 1024, "{}", bytes.len());
    }

    #[test]
    fn host_key_keeps_ports() {
        let url = Url::parse("http://127.0.0.1:8080/x").unwrap();
        assert_eq!(host_key(&url), "127.0.0.1:8080");
        let url = Url::parse("https://api.github.com/repos").unwrap();
        assert_eq!(host_key(&url), "api.github.com");
    }
}
