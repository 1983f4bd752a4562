//! Benchmark 2, cycle speed: the wall and CPU time of a poll cycle over 2,000 branches,
//! against the floor client ([`crate::floor`]) measured in the same run on the same server.
//!
//! Sentry runs one cold cycle and N quiet cycles (every request a 304: the steady state of
//! a poller); the floor runs the same before and after Sentry, paced like Sentry's polling
//! interval, and its two runs are pooled so a drift during the run affects both sides.
//! Targets: the median quiet cycle ≤ 1.5× the floor's; CPU per quiet cycle ≤ 0.3 s (utime +
//! stime of the `sentry` process between two cycle lines, interval idle included).

use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use crate::cycles::{self, Plan, of_kind};
use crate::fake_github::FakeGitHub;
use crate::floor::{self, FloorCycle};
use crate::report::{Report, num};
use crate::support::median;
use crate::workload::{estate, watched_count};
use crate::{Ctx, mean};

const MAX_RATIO: f64 = 1.5;
const MAX_CPU_MS: f64 = 300.0;
/// Sentry's polling interval, and the floor's pause between cycles.
const INTERVAL: Duration = Duration::from_millis(500);

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let repos = estate(ctx.sizes.speed_repos);
    let branches = watched_count(&repos);
    let n = ctx.sizes.speed_cycles;
    let fake = ctx.rt.block_on(FakeGitHub::start(&repos, 1_000_000))?;

    let floor_before = floor::run(fake.url(), &repos, 1 + n, INTERVAL)?;
    let sentry = cycles::run(
        &fake,
        &Plan {
            repos: &repos,
            polling_interval: &humantime::format_duration(INTERVAL).to_string(),
            moving: 0,
            quiet: n,
            fraction: 0.0,
        },
    )?;
    let floor_after = floor::run(fake.url(), &repos, 1 + n, INTERVAL)?;
    // For the record: the floor with no pause at all, warmer than any poller can be.
    let unpaced = floor::run(fake.url(), &repos, 1 + n, Duration::ZERO)?;
    let unpaced_wall = median(&unpaced[1..].iter().map(|c| c.wall_ms).collect::<Vec<_>>());

    let quiet = of_kind(&sentry.rows, "quiet");
    let sentry_wall = median(&quiet.iter().map(|r| r.wall_ms).collect::<Vec<_>>());
    let sentry_cpu = mean(quiet.iter().map(|r| r.cpu_ms));
    let warm_floor: Vec<&FloorCycle> = floor_before[1..].iter().chain(&floor_after[1..]).collect();
    let floor_wall = median(&warm_floor.iter().map(|c| c.wall_ms).collect::<Vec<_>>());
    let floor_cpu = mean(warm_floor.iter().map(|c| c.cpu_ms));
    let cold_sentry = sentry.rows.first().map_or(f64::NAN, |r| r.wall_ms);
    let cold_floor = median(&[floor_before[0].wall_ms, floor_after[0].wall_ms]);
    let ratio = sentry_wall / floor_wall;

    let name = "2 cycle speed";
    report.judged(
        name,
        format!("quiet cycle wall, {branches} branches (median of {n})"),
        format!(
            "Sentry {} ms vs floor {} ms = {:.2}×",
            num(sentry_wall),
            num(floor_wall),
            ratio
        ),
        format!("≤ {MAX_RATIO}×"),
        ratio <= MAX_RATIO,
    );
    report.judged(
        name,
        "CPU per quiet cycle (mean)",
        format!(
            "Sentry {} ms (floor client {} ms)",
            num(sentry_cpu),
            num(floor_cpu)
        ),
        format!("≤ {} ms", MAX_CPU_MS),
        sentry_cpu <= MAX_CPU_MS,
    );
    report.info(
        name,
        "quiet cycle wall vs the floor run back to back (no pause)",
        format!(
            "Sentry {} ms vs floor {} ms = {:.2}×",
            num(sentry_wall),
            num(unpaced_wall),
            sentry_wall / unpaced_wall
        ),
    );
    report.info(
        name,
        "cold cycle wall (no ETags yet)",
        format!(
            "Sentry {} ms vs floor {} ms = {:.2}×",
            num(cold_sentry),
            num(cold_floor),
            cold_sentry / cold_floor
        ),
    );
    report.detail(
        "speed",
        json!({
            "branches": branches,
            "quiet_cycles": n,
            "ratio": ratio,
            "sentry_quiet_wall_ms_median": sentry_wall,
            "floor_quiet_wall_ms_median": floor_wall,
            "sentry_cpu_ms_per_quiet_cycle": sentry_cpu,
            "floor_cpu_ms_per_quiet_cycle": floor_cpu,
            "sentry_cycles": sentry.rows,
            "floor_before": floor_before,
            "floor_after": floor_after,
            "floor_unpaced": unpaced,
        }),
    );
    Ok(())
}
