//! Benchmark 1, quota: what polling costs against GitHub's primary rate limit.
//!
//! 1,000 repositories × 2 branches (every tenth watching `release/*`), one cold cycle, then
//! 10 cycles each after 1 % of the watched branches moved, then one quiet cycle. Target:
//! in every moving cycle the counted requests (authenticated, not 304) equal the URLs
//! whose answer changed — one per moved branch, or per listing page holding one — and a
//! quiet cycle is counted for nothing. The naive poller (one uncached request per branch
//! per cycle, as Rancher Fleet's poller does) is computed from the same numbers.

use anyhow::Result;
use serde_json::json;

use crate::cycles::{self, CycleRow, Plan, of_kind};
use crate::fake_github::FakeGitHub;
use crate::report::{Report, num};
use crate::workload::{estate, watched_count};
use crate::{Ctx, mean};

/// A user token's primary rate limit per hour.
const TOKEN_QUOTA_PER_HOUR: f64 = 5000.0;
/// The polling interval the capacity is computed for.
const INTERVAL_SECONDS: f64 = 60.0;
const MOVE_FRACTION: f64 = 0.01;

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let repos = estate(ctx.sizes.quota_repos);
    let branches = watched_count(&repos);
    let fake = ctx.rt.block_on(FakeGitHub::start(&repos, 5000))?;
    let run = cycles::run(
        &fake,
        &Plan {
            repos: &repos,
            polling_interval: "1s",
            moving: ctx.sizes.quota_cycles,
            quiet: 1,
            fraction: MOVE_FRACTION,
        },
    )?;
    let rows = &run.rows;
    let moving = of_kind(rows, "moving");
    let quiet = of_kind(rows, "quiet");
    let exact = moving
        .iter()
        .filter(|r| r.counted == r.expected_counted as u64)
        .count();
    let counted = mean(moving.iter().map(|r| r.counted as f64));
    let moved = mean(moving.iter().map(|r| r.moved as f64));
    let quiet_counted: u64 = quiet.iter().map(|r| r.counted).sum();

    let name = "1 quota";
    let shape = format!("{branches} branches, {} repos", repos.len());
    if let Some(cold) = rows.first() {
        report.info(
            name,
            format!("cold cycle ({shape}): requests / counted"),
            format!("{} / {}", cold.requests, cold.counted),
        );
    }
    report.judged(
        name,
        format!("counted per moving cycle (mean of {})", moving.len()),
        format!(
            "{} counted for {} moved; exact in {exact}/{}",
            num(counted),
            num(moved),
            moving.len()
        ),
        "= changed URLs (moved + changed pages)",
        exact == moving.len() && !moving.is_empty(),
    );
    report.info(
        name,
        "requests / 304s per moving cycle (mean)",
        format!(
            "{} / {}",
            num(mean(moving.iter().map(|r| r.requests as f64))),
            num(mean(moving.iter().map(|r| r.not_modified as f64)))
        ),
    );
    report.judged(
        name,
        "counted in a quiet cycle",
        quiet_counted.to_string(),
        "0",
        quiet_counted == 0 && !quiet.is_empty(),
    );
    let (naive, sentry) = capacity(counted / branches as f64);
    report.info(
        name,
        "branches one 5,000/h token sustains at 60 s, 1 %/cycle moving",
        format!(
            "naive {} vs Sentry {} ({}×)",
            num(naive),
            num(sentry),
            num(sentry / naive)
        ),
    );
    report.sections.push(cycle_table(rows, &shape));
    report.detail(
        "quota",
        json!({
            "repositories": repos.len(),
            "branches": branches,
            "move_fraction": MOVE_FRACTION,
            "naive_sustainable_branches": naive,
            "sentry_sustainable_branches": sentry,
            "peak_rss_kib": run.peak_rss_kib,
            "cycles": rows,
        }),
    );
    Ok(())
}

/// Branches one token sustains at the interval: naive (every branch counted every cycle)
/// and Sentry (`counted_per_branch` counted requests per branch per cycle).
fn capacity(counted_per_branch: f64) -> (f64, f64) {
    let cycles_per_hour = 3600.0 / INTERVAL_SECONDS;
    let naive = TOKEN_QUOTA_PER_HOUR / cycles_per_hour;
    let sentry = if counted_per_branch > 0.0 {
        TOKEN_QUOTA_PER_HOUR / (cycles_per_hour * counted_per_branch)
    } else {
        f64::INFINITY
    };
    (naive, sentry)
}

fn cycle_table(rows: &[CycleRow], shape: &str) -> String {
    let mut md = format!(
        "Quota, per cycle ({shape}):\n\n| cycle | kind | moved | requests | 304 | counted | changed URLs | wall ms |\n|---|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.index,
            r.kind,
            r.moved,
            r.requests,
            r.not_modified,
            r.counted,
            r.expected_counted,
            num(r.wall_ms)
        ));
    }
    md
}
