//! Pacing of the poll loop: when each repository of a sweep is checked, how long a sweep
//! really takes under the request budget, and which repositories are due at all.
//!
//! A sweep's requests are spread across the polling interval instead of leaving in one
//! burst at its start: each repository starts at an offset proportional to the requests
//! the repositories of its API host before it need. When a host's budget
//! (`rest_points_per_minute` per `window`) cannot cover a full sweep within one interval,
//! the sweep is spread over the time the budget needs and the *effective interval*
//! stretches to it, rather than letting the forge throttle Sentry. Repositories whose
//! webhooks arrive are polled only every `webhook_poll_interval` (the safety net never
//! stops). Pure functions: the monitor feeds them the configuration and the clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::forge::budget::BudgetLimits;

/// The share of the interval a sweep is spread over, so that it ends before the next one.
const SPREAD: f64 = 0.9;

/// One repository of a sweep as pacing sees it.
#[derive(Debug, Clone)]
pub(crate) struct Demand {
    /// The budget key of its API host (`host` or `host:port`); `None` for plain Git.
    pub host: Option<String>,
    /// REST requests one check needs (an estimate: one per exact branch, plus the pages
    /// of the repository's last listing).
    pub requests: u64,
    pub branches: usize,
}

/// A host whose budget cannot cover a sweep within one interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OverBudget {
    pub host: String,
    pub branches: usize,
    pub points: u64,
    /// The least time the budget needs for one sweep of this host.
    pub sweep_time: Duration,
}

/// When each repository starts, and how long the sweep really takes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    /// Per repository of the input, in order: how long after the sweep's start it starts.
    pub offsets: Vec<Duration>,
    /// `interval`, or longer when a host's budget needs longer for a sweep.
    pub effective_interval: Duration,
    pub over_budget: Vec<OverBudget>,
}

/// Plans one sweep of `repos` over `interval`, with each host's budget `limits`.
pub(crate) fn plan(
    repos: &[Demand],
    interval: Duration,
    limits: impl Fn(&str) -> BudgetLimits,
) -> Plan {
    let mut hosts: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
    for d in repos {
        if let Some(host) = &d.host {
            let entry = hosts.entry(host).or_default();
            entry.0 += d.requests;
            entry.1 += d.branches;
        }
    }
    let mut over_budget = Vec::new();
    let mut spreads: BTreeMap<&str, Duration> = BTreeMap::new();
    for (host, &(points, branches)) in &hosts {
        let l = limits(host);
        let per_window = u64::from(l.rest_points_per_minute.max(1));
        let sweep_time = l.hold().mul_f64(points as f64 / per_window as f64);
        if sweep_time > interval {
            over_budget.push(OverBudget {
                host: (*host).to_owned(),
                branches,
                points,
                sweep_time,
            });
        }
        spreads.insert(host, interval.mul_f64(SPREAD).max(sweep_time));
    }
    let effective_interval = over_budget
        .iter()
        .map(|o| o.sweep_time)
        .fold(interval, Duration::max);
    let mut spent: BTreeMap<&str, u64> = BTreeMap::new();
    let offsets = repos
        .iter()
        .map(|d| {
            let Some(host) = d.host.as_deref() else {
                return Duration::ZERO;
            };
            let total = hosts.get(host).map_or(1, |h| h.0.max(1));
            let before = spent.entry(host).or_default();
            let offset = spreads
                .get(host)
                .copied()
                .unwrap_or_default()
                .mul_f64(*before as f64 / total as f64);
            *before += d.requests;
            offset
        })
        .collect();
    Plan {
        offsets,
        effective_interval,
        over_budget,
    }
}

/// Whether a repository is due in a sweep at `now`: always, unless its webhooks arrive
/// (`webhook_seen`) and it was polled less than `webhook_poll_interval` ago.
pub(crate) fn due(
    now: Instant,
    webhook_seen: Option<Instant>,
    last_polled: Option<Instant>,
    webhook_poll_interval: Duration,
) -> bool {
    match (webhook_seen, last_polled) {
        (Some(_), Some(polled)) => now.saturating_duration_since(polled) >= webhook_poll_interval,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(host: &str, requests: u64) -> Demand {
        Demand {
            host: Some(host.to_owned()),
            requests,
            branches: requests as usize,
        }
    }

    #[test]
    fn a_sweep_within_budget_is_spread_over_most_of_the_interval() {
        let repos = vec![demand("gh", 100), demand("gh", 100), demand("gh", 200)];
        let plan = plan(&repos, Duration::from_secs(60), |_| BudgetLimits::GITHUB);
        assert_eq!(plan.effective_interval, Duration::from_secs(60));
        assert!(plan.over_budget.is_empty());
        // 54 s (90 %) spread by requests: 0, 100/400 and 200/400 of it.
        assert_eq!(
            plan.offsets,
            [
                Duration::ZERO,
                Duration::from_millis(13_500),
                Duration::from_secs(27)
            ]
        );
    }

    #[test]
    fn a_sweep_beyond_budget_stretches_the_interval() {
        // 2,000 branches at 900 points per 63 s (a minute and the budget's margin): 140 s,
        // not 60.
        let repos: Vec<Demand> = (0..20).map(|_| demand("gh", 100)).collect();
        let plan = plan(&repos, Duration::from_secs(60), |_| BudgetLimits::GITHUB);
        assert_eq!(plan.effective_interval.as_secs(), 140);
        assert_eq!(
            plan.over_budget,
            [OverBudget {
                host: "gh".into(),
                branches: 2000,
                points: 2000,
                sweep_time: plan.effective_interval,
            }]
        );
        // Spread evenly over the whole stretched sweep: 100 requests every 7 s is the
        // budget's own rate (900 per 63 s), not a burst the budget would have to hold back.
        let step = plan.effective_interval.as_secs_f64() / 20.0;
        for (i, offset) in plan.offsets.iter().enumerate() {
            let expected = step * i as f64;
            assert!(
                (offset.as_secs_f64() - expected).abs() < 0.001,
                "{i}: {offset:?}"
            );
        }
        assert_eq!(plan.offsets.last().unwrap().as_secs(), 133);
    }

    #[test]
    fn hosts_are_paced_separately_and_plain_git_starts_at_once() {
        let repos = vec![
            demand("gh", 10),
            demand("gl", 10),
            Demand {
                host: None,
                requests: 1,
                branches: 1,
            },
            demand("gh", 10),
            demand("gl", 10),
        ];
        let plan = plan(&repos, Duration::from_secs(10), |_| BudgetLimits::GITLAB);
        assert_eq!(
            plan.offsets,
            [
                Duration::ZERO,
                Duration::ZERO,
                Duration::ZERO,
                Duration::from_millis(4500),
                Duration::from_millis(4500)
            ]
        );
    }

    #[test]
    fn webhook_covered_repositories_are_polled_less_often_but_still_polled() {
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        // No webhook seen: due every sweep.
        assert!(due(t0 + Duration::from_secs(1), None, Some(t0), hour));
        // Never polled: due.
        assert!(due(t0, Some(t0), None, hour));
        // Webhooks arrive: not due until the webhook interval has passed since the last poll.
        assert!(!due(t0 + Duration::from_secs(60), Some(t0), Some(t0), hour));
        assert!(!due(
            t0 + hour - Duration::from_secs(1),
            Some(t0),
            Some(t0),
            hour
        ));
        assert!(due(t0 + hour, Some(t0), Some(t0), hour));
    }
}
