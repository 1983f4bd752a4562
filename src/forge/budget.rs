//! The request budget of one API host and token: what Sentry may still send to a forge
//! before the forge's own limits would throttle it.
//!
//! GitHub enforces *secondary* limits that a `304 Not Modified` does not escape: at most
//! 100 requests in flight, 900 REST points per minute (GET/HEAD 1 point, other methods 5),
//! 2,000 GraphQL points per minute. A [`Budget`] keeps Sentry under them instead of
//! being throttled: every request the HTTP layer sends first takes a [`Permit`].
//!
//! # Interface
//!
//! ```text
//! Budget::new(host, BudgetLimits) -> Budget
//! Budget::acquire(&self, cost: Cost) -> impl Future<Output = Permit>
//!     waits for a concurrency slot, then for `cost` points in the sliding window of its
//!     kind; FIFO per window. Drop the permit when the answer is read.
//! Cost::Rest { points }      REST request; Cost::for_method(&Method, write_points)
//! Cost::GraphQl { points }   GraphQL query; the caller states its cost
//! Budget::observe_primary(remaining, limit, reset)   from x-ratelimit-* headers
//! Budget::throttled()        a 403/429 secondary-limit answer arrived (should stay 0)
//! Budget::snapshot() -> BudgetSnapshot   used/limit per kind, in flight, primary quota
//! ```
//!
//! The HTTP layer (`http.rs`) owns one budget per (API host, token) — tokens are told
//! apart by an in-memory hash of their header, never stored — and charges every attempt:
//! `Http::get` and `Http::post` with [`Cost::for_method`], `Http::post_costed` with the
//! caller's [`Cost`] (a GraphQL query states `Cost::GraphQl { points }`).
//!
//! A cost above its window's whole limit is charged as the whole limit, so it waits for an
//! empty window instead of forever. The primary (hourly) quota is only observed here: the
//! forge reports it in headers, `304`s do not spend it, and the HTTP layer pauses a host
//! whose quota is exhausted; the observed values feed the metrics. The monitor's pacing
//! (`monitor/pacing.rs`) plans sweeps from the same [`BudgetLimits`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// What one request costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cost {
    /// A REST request: GitHub counts GET/HEAD as 1 point, other methods as 5.
    Rest { points: u32 },
    /// A GraphQL query; its point cost is the caller's (GitHub: connections / 100, at
    /// least 1). Constructed by the GraphQL client (issue #20, branch scale-graphql).
    #[allow(dead_code)]
    GraphQl { points: u32 },
}

impl Cost {
    /// The REST cost of `method`: 1 for GET/HEAD, `write_points` otherwise.
    pub fn for_method(method: &reqwest::Method, write_points: u32) -> Cost {
        let points = if method == reqwest::Method::GET || method == reqwest::Method::HEAD {
            1
        } else {
            write_points.max(1)
        };
        Cost::Rest { points }
    }
}

/// The limits one budget enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BudgetLimits {
    /// Requests in flight at once (REST and GraphQL together).
    pub concurrency: usize,
    /// REST points per `window`.
    pub rest_points_per_minute: u32,
    /// GraphQL points per `window`.
    pub graphql_points_per_minute: u32,
    /// Points a REST request other than GET/HEAD costs.
    pub write_points: u32,
    /// The sliding window the per-minute limits apply to: one minute, shorter only in
    /// tests and benches (`rate_limits.<host>.window`).
    pub window: Duration,
}

impl BudgetLimits {
    /// How long a point stays spent: the window plus 5 %. The forge counts a request when
    /// it arrives, Sentry when it sends; a request delayed on its way (connection set-up,
    /// a busy proxy) stays in the forge's window after it left Sentry's, and without the
    /// margin the next one could be its 901st (the scale benchmark saw 7–8 such 403s a run).
    pub fn hold(&self) -> Duration {
        self.window + self.window / 20
    }

    /// GitHub's documented secondary limits.
    pub const GITHUB: BudgetLimits = BudgetLimits {
        concurrency: 100,
        rest_points_per_minute: 900,
        graphql_points_per_minute: 2000,
        write_points: 5,
        window: Duration::from_secs(60),
    };

    /// gitlab.com's published limit for authenticated API traffic (2,000 requests per
    /// minute per user, REST and GraphQL alike); GitLab counts requests, not points, and
    /// publishes no concurrency limit (100 keeps Sentry polite).
    pub const GITLAB: BudgetLimits = BudgetLimits {
        concurrency: 100,
        rest_points_per_minute: 2000,
        graphql_points_per_minute: 2000,
        write_points: 1,
        window: Duration::from_secs(60),
    };
}

/// What a budget has spent and knows, for metrics and the status API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BudgetSnapshot {
    pub host: String,
    pub limits: BudgetLimits,
    /// REST points spent in the current window.
    pub rest_used: u32,
    /// GraphQL points spent in the current window.
    pub graphql_used: u32,
    pub in_flight: usize,
    /// Points charged since start, per kind.
    pub rest_total: u64,
    pub graphql_total: u64,
    /// Secondary-limit answers (403/429 rate limits) received since start.
    pub throttled: u64,
    /// The primary quota as the forge last reported it.
    pub primary_remaining: Option<u64>,
    pub primary_limit: Option<u64>,
    pub primary_reset: Option<SystemTime>,
}

/// The budget of one API host and token. Cheap to share (`Arc`).
#[derive(Debug)]
pub(crate) struct Budget {
    host: String,
    limits: BudgetLimits,
    slots: Arc<Semaphore>,
    rest: tokio::sync::Mutex<Window>,
    graphql: tokio::sync::Mutex<Window>,
    /// Mirrors of the windows' spending, readable without waiting for a queued acquirer.
    rest_seen: Mutex<Window>,
    graphql_seen: Mutex<Window>,
    rest_total: AtomicU64,
    graphql_total: AtomicU64,
    throttled: AtomicU64,
    primary: Mutex<Primary>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Primary {
    remaining: Option<u64>,
    limit: Option<u64>,
    reset: Option<SystemTime>,
}

/// Held while a request is in flight; dropping it frees the concurrency slot. The points
/// stay spent until they leave the window.
#[derive(Debug)]
pub(crate) struct Permit {
    _slot: Option<OwnedSemaphorePermit>,
}

impl Budget {
    pub fn new(host: &str, limits: BudgetLimits) -> Budget {
        let limits = BudgetLimits {
            concurrency: limits.concurrency.max(1),
            rest_points_per_minute: limits.rest_points_per_minute.max(1),
            graphql_points_per_minute: limits.graphql_points_per_minute.max(1),
            write_points: limits.write_points.max(1),
            window: limits.window.max(Duration::from_millis(1)),
        };
        let rest = Window::new(limits.rest_points_per_minute, limits.hold());
        let graphql = Window::new(limits.graphql_points_per_minute, limits.hold());
        Budget {
            host: host.to_owned(),
            limits,
            slots: Arc::new(Semaphore::new(limits.concurrency)),
            rest_seen: Mutex::new(rest.clone()),
            graphql_seen: Mutex::new(graphql.clone()),
            rest: tokio::sync::Mutex::new(rest),
            graphql: tokio::sync::Mutex::new(graphql),
            rest_total: AtomicU64::new(0),
            graphql_total: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            primary: Mutex::default(),
        }
    }

    pub fn limits(&self) -> BudgetLimits {
        self.limits
    }

    /// Waits until a request of `cost` may be sent: a concurrency slot first, then the
    /// points in the sliding window of the cost's kind (acquirers of one kind are served
    /// in order). Cancel by dropping the future.
    pub async fn acquire(&self, cost: Cost) -> Permit {
        // The semaphore is never closed, so this only waits.
        let slot = self.slots.clone().acquire_owned().await.ok();
        let (window, seen, total, points) = match cost {
            Cost::Rest { points } => (&self.rest, &self.rest_seen, &self.rest_total, points),
            Cost::GraphQl { points } => (
                &self.graphql,
                &self.graphql_seen,
                &self.graphql_total,
                points,
            ),
        };
        let mut window = window.lock().await;
        loop {
            match window.take(Instant::now(), points) {
                Ok(charged) => {
                    total.fetch_add(u64::from(charged), Ordering::Relaxed);
                    *seen.lock().unwrap_or_else(PoisonError::into_inner) = window.clone();
                    break;
                }
                Err(at) => tokio::time::sleep_until(at).await,
            }
        }
        Permit { _slot: slot }
    }

    /// The primary quota as a response's headers report it.
    pub fn observe_primary(
        &self,
        remaining: Option<u64>,
        limit: Option<u64>,
        reset: Option<SystemTime>,
    ) {
        let mut primary = self.primary.lock().unwrap_or_else(PoisonError::into_inner);
        if remaining.is_some() {
            primary.remaining = remaining;
        }
        if limit.is_some() {
            primary.limit = limit;
        }
        if reset.is_some() {
            primary.reset = reset;
        }
    }

    /// Counts a secondary-limit answer (403/429 that is a rate limit).
    pub fn throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BudgetSnapshot {
        let now = Instant::now();
        let used = |w: &Mutex<Window>| {
            let mut w = w.lock().unwrap_or_else(PoisonError::into_inner);
            w.prune(now);
            w.used
        };
        let primary = *self.primary.lock().unwrap_or_else(PoisonError::into_inner);
        BudgetSnapshot {
            host: self.host.clone(),
            limits: self.limits,
            rest_used: used(&self.rest_seen),
            graphql_used: used(&self.graphql_seen),
            in_flight: self.limits.concurrency - self.slots.available_permits(),
            rest_total: self.rest_total.load(Ordering::Relaxed),
            graphql_total: self.graphql_total.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            primary_remaining: primary.remaining,
            primary_limit: primary.limit,
            primary_reset: primary.reset,
        }
    }
}

/// A sliding window of spent points. Pure: every method takes `now`.
#[derive(Debug, Clone)]
struct Window {
    limit: u32,
    span: Duration,
    spent: VecDeque<(Instant, u32)>,
    used: u32,
}

impl Window {
    fn new(limit: u32, span: Duration) -> Window {
        Window {
            limit,
            span,
            spent: VecDeque::new(),
            used: 0,
        }
    }

    /// Forgets what left the window by `now`.
    fn prune(&mut self, now: Instant) {
        while let Some(&(at, points)) = self.spent.front() {
            if at + self.span > now {
                break;
            }
            self.spent.pop_front();
            self.used -= points;
        }
    }

    /// Spends `points` (at most the whole limit) at `now` and returns what was charged, or
    /// tells when enough will have left the window.
    fn take(&mut self, now: Instant, points: u32) -> Result<u32, Instant> {
        let points = points.clamp(1, self.limit);
        self.prune(now);
        if self.used + points <= self.limit {
            self.spent.push_back((now, points));
            self.used += points;
            return Ok(points);
        }
        // The earliest moment when enough old spending has left.
        let mut freed = self.limit - self.used;
        for &(at, spent) in &self.spent {
            freed += spent;
            if freed >= points {
                return Err(at + self.span);
            }
        }
        Err(now + self.span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn limits(concurrency: usize, rest: u32, graphql: u32) -> BudgetLimits {
        BudgetLimits {
            concurrency,
            rest_points_per_minute: rest,
            graphql_points_per_minute: graphql,
            write_points: 5,
            window: Duration::from_secs(60),
        }
    }

    /// Whether any 60 s window of `(time, points)` spends more than `limit`.
    fn max_in_any_window(sends: &[(Duration, u32)]) -> u32 {
        let mut max = 0;
        for (i, &(start, _)) in sends.iter().enumerate() {
            let sum: u32 = sends[i..]
                .iter()
                .take_while(|(t, _)| *t < start + Duration::from_secs(60))
                .map(|(_, p)| p)
                .sum();
            max = max.max(sum);
        }
        max
    }

    #[tokio::test(start_paused = true)]
    async fn two_thousand_gets_never_exceed_900_in_any_minute() {
        let budget = Arc::new(Budget::new("api.github.com", BudgetLimits::GITHUB));
        let start = Instant::now();
        let sends = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..2000 {
            let (budget, sends, in_flight, most) = (
                budget.clone(),
                sends.clone(),
                in_flight.clone(),
                most.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let _permit = budget.acquire(Cost::Rest { points: 1 }).await;
                sends.lock().unwrap().push((start.elapsed(), 1));
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut sends = sends.lock().unwrap().clone();
        sends.sort();
        assert_eq!(sends.len(), 2000);
        assert_eq!(max_in_any_window(&sends), 900);
        assert!(most.load(Ordering::SeqCst) <= 100, "{most:?}");
        assert_eq!(most.load(Ordering::SeqCst), 100, "the slots are used");
        // 2,000 points at 900 per 63 s (the minute and its margin): the last ones go at the
        // start of the third window, not later.
        let last = sends.last().unwrap().0;
        assert!(
            last >= Duration::from_secs(126) && last < Duration::from_secs(131),
            "{last:?}"
        );
        assert_eq!(budget.snapshot().rest_total, 2000);
    }

    #[tokio::test(start_paused = true)]
    async fn writes_cost_five_and_graphql_has_its_own_window() {
        let budget = Budget::new("h", limits(10, 10, 3));
        let start = Instant::now();
        // Two writes fill the REST window (5 + 5).
        for _ in 0..2 {
            budget
                .acquire(Cost::for_method(&reqwest::Method::POST, 5))
                .await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        // GraphQL is not held back by the full REST window.
        budget.acquire(Cost::GraphQl { points: 3 }).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        let snap = budget.snapshot();
        assert_eq!((snap.rest_used, snap.graphql_used), (10, 3));
        // A GET now waits for the window to slide.
        budget
            .acquire(Cost::for_method(&reqwest::Method::GET, 5))
            .await;
        // The window plus its 5 % margin.
        assert_eq!(start.elapsed(), Duration::from_secs(63));
        // A cost above the whole limit is charged as the limit, and waits for an empty window.
        budget.acquire(Cost::GraphQl { points: 50 }).await;
        assert_eq!(start.elapsed(), Duration::from_secs(63));
        assert_eq!(budget.snapshot().graphql_total, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_permit_frees_its_slot() {
        let budget = Arc::new(Budget::new("h", limits(1, 100, 100)));
        let first = budget.acquire(Cost::Rest { points: 1 }).await;
        assert_eq!(budget.snapshot().in_flight, 1);
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let _p = budget.acquire(Cost::Rest { points: 1 }).await;
            })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished(), "one slot: the second waits");
        drop(first);
        waiting.await.unwrap();
        assert_eq!(budget.snapshot().in_flight, 0);
    }

    #[test]
    fn primary_quota_is_what_headers_said_last() {
        let budget = Budget::new("h", BudgetLimits::GITHUB);
        budget.observe_primary(Some(4999), Some(5000), None);
        budget.observe_primary(Some(4998), None, None);
        budget.throttled();
        let snap = budget.snapshot();
        assert_eq!(
            (snap.primary_remaining, snap.primary_limit, snap.throttled),
            (Some(4998), Some(5000), 1)
        );
    }
}
