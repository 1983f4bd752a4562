//! The floor of a poll cycle: a minimal client that sends exactly the requests Sentry sends
//! (same URLs, same `Accept`, `Authorization`, API-version and `If-None-Match` headers,
//! pages followed by `Link: rel="next"`), with the same concurrency (8 in flight), to the
//! same server — and does nothing else: no SHA or JSON parsing, no state, no logging.
//!
//! It runs on its own thread with a current-thread tokio runtime, so the thread's CPU time
//! (`/proc/thread-self/stat`) is the client's CPU time alone, without the fake server's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::support::{thread_cpu_ticks, ticks_per_second};
use crate::workload::{RepoSpec, TOKEN};

const IN_FLIGHT: usize = 8;
const MAX_PAGES: usize = 100;

/// One floor cycle.
#[derive(Debug, Clone, Serialize)]
pub struct FloorCycle {
    pub wall_ms: f64,
    pub cpu_ms: f64,
    pub requests: u64,
    pub not_modified: u64,
}

/// Runs `cycles` cycles over `repos` against `base` (the fake GitHub) on a fresh thread,
/// `pause` apart: the same pacing as Sentry's polling interval, so both sides meet a
/// server (and CPU caches) that has idled for as long between cycles.
pub fn run(
    base: &str,
    repos: &[RepoSpec],
    cycles: usize,
    pause: Duration,
) -> Result<Vec<FloorCycle>> {
    let base = base.to_owned();
    let repos = repos.to_vec();
    std::thread::spawn(move || run_on_thread(&base, &repos, cycles, pause))
        .join()
        .map_err(|_| anyhow!("the floor client panicked"))?
}

fn run_on_thread(
    base: &str,
    repos: &[RepoSpec],
    cycles: usize,
    pause: Duration,
) -> Result<Vec<FloorCycle>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = Arc::new(Floor::new()?);
        let mut out = Vec::with_capacity(cycles);
        for cycle in 0..cycles {
            if cycle > 0 {
                tokio::time::sleep(pause).await;
            }
            let cpu = thread_cpu_ticks().unwrap_or(0);
            let started = Instant::now();
            let (requests, not_modified) = client.cycle(base, repos).await?;
            out.push(FloorCycle {
                wall_ms: started.elapsed().as_secs_f64() * 1000.0,
                cpu_ms: thread_cpu_ticks().unwrap_or(0).saturating_sub(cpu) as f64 * 1000.0
                    / ticks_per_second(),
                requests,
                not_modified,
            });
        }
        Ok(out)
    })
}

struct Floor {
    client: reqwest::Client,
    limit: Arc<Semaphore>,
    /// URL → (ETag, the next-page link it stood for).
    cache: Mutex<HashMap<String, (HeaderValue, Option<String>)>>,
}

impl Floor {
    fn new() -> Result<Floor> {
        let client = reqwest::Client::builder()
            .user_agent("sentry-bench-floor")
            .build()?;
        Ok(Floor {
            client,
            limit: Arc::new(Semaphore::new(IN_FLIGHT)),
            cache: Mutex::default(),
        })
    }

    /// One cycle: every repository concurrently; returns (requests, 304s).
    async fn cycle(self: &Arc<Self>, base: &str, repos: &[RepoSpec]) -> Result<(u64, u64)> {
        let mut tasks = JoinSet::new();
        for repo in repos {
            let api = format!("{base}/repos/{}", repo.path);
            if repo.pattern {
                let me = self.clone();
                tasks.spawn(async move { me.walk(format!("{api}/branches?per_page=100")).await });
            } else {
                for branch in &repo.watched {
                    let (me, url) = (self.clone(), format!("{api}/commits/refs/heads/{branch}"));
                    tasks.spawn(async move {
                        let (_, not_modified) = me.get(&url, SHA).await?;
                        Ok((1, u64::from(not_modified)))
                    });
                }
            }
        }
        let (mut requests, mut not_modified) = (0, 0);
        while let Some(joined) = tasks.join_next().await {
            let (r, n) = joined??;
            requests += r;
            not_modified += n;
        }
        Ok((requests, not_modified))
    }

    /// Follows a listing page by page; returns (requests, 304s).
    async fn walk(&self, first: String) -> Result<(u64, u64)> {
        let (mut url, mut requests, mut not_modified) = (first, 0, 0);
        for _ in 0..MAX_PAGES {
            let (next, cached) = self.get(&url, JSON).await?;
            requests += 1;
            not_modified += u64::from(cached);
            match next {
                Some(next) => url = next,
                None => return Ok((requests, not_modified)),
            }
        }
        bail!("listing {url} does not end")
    }

    /// One conditional GET; returns the next-page link and whether it was a 304.
    async fn get(&self, url: &str, accept: &'static str) -> Result<(Option<String>, bool)> {
        let _permit = self.limit.acquire().await?;
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(url)
            .cloned();
        let mut request = self
            .client
            .get(url)
            .header(header::ACCEPT, accept)
            .header("x-github-api-version", "2022-11-28")
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
        if let Some((etag, _)) = &cached {
            request = request.header(header::IF_NONE_MATCH, etag.clone());
        }
        let response = request.send().await?;
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED {
            let (_, next) = cached.context("304 to an unconditional request")?;
            return Ok((next, true));
        }
        if !status.is_success() {
            bail!("{url}: {status}");
        }
        let next = next_link(response.headers());
        let etag = response.headers().get(header::ETAG).cloned();
        response.bytes().await?;
        if let Some(etag) = etag {
            self.cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(url.to_owned(), (etag, next.clone()));
        }
        Ok((next, false))
    }
}

const SHA: &str = "application/vnd.github.sha";
const JSON: &str = "application/vnd.github+json";

/// The `rel="next"` target of a `Link` header (the fake's simple form).
fn next_link(headers: &HeaderMap) -> Option<String> {
    let link = headers.get(header::LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params
            .contains("rel=\"next\"")
            .then(|| target.trim().trim_start_matches('<').trim_end_matches('>'))
            .map(str::to_owned)
    })
}
