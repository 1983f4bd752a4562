//! How cost grows with the estate (full mode only): 100, 1,000 and 5,000 watched branches,
//! each a cold cycle, 5 cycles with 1 % moving, and 3 quiet cycles; requests, counted
//! requests, wall and CPU time per cycle, and RSS.

use anyhow::Result;
use serde_json::{Value, json};

use crate::cycles::{self, Plan, of_kind};
use crate::fake_github::FakeGitHub;
use crate::report::{Report, num};
use crate::support::median;
use crate::workload::estate;
use crate::{Ctx, mean};

pub fn run(ctx: &Ctx, report: &mut Report, sizes: &[usize]) -> Result<()> {
    let mut md = String::from(
        "Growth (cold cycle, then 5 cycles with 1 % moving, then 3 quiet cycles):\n\n\
         | branches | repos | cold requests | cold wall ms | requests / cycle | counted / moving cycle | changed URLs / moving cycle | quiet wall ms | quiet CPU ms | RSS MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut details = Vec::new();
    for &branches in sizes {
        let (line, detail) = one(ctx, branches)?;
        md.push_str(&line);
        details.push(detail);
    }
    report.sections.push(md);
    report.detail("growth", Value::Array(details));
    Ok(())
}

fn one(ctx: &Ctx, branches: usize) -> Result<(String, Value)> {
    let repos = estate(branches / 2);
    let fake = ctx.rt.block_on(FakeGitHub::start(&repos, 10_000_000))?;
    let run = cycles::run(
        &fake,
        &Plan {
            repos: &repos,
            polling_interval: "1s",
            moving: 5,
            quiet: 3,
            fraction: 0.01,
        },
    )?;
    let rows = &run.rows;
    let cold = &rows[0];
    let moving = of_kind(rows, "moving");
    let quiet = of_kind(rows, "quiet");
    let requests = mean(rows[1..].iter().map(|r| r.requests as f64));
    let counted = mean(moving.iter().map(|r| r.counted as f64));
    let changed = mean(moving.iter().map(|r| r.expected_counted as f64));
    let quiet_wall = median(&quiet.iter().map(|r| r.wall_ms).collect::<Vec<_>>());
    let quiet_cpu = median(&quiet.iter().map(|r| r.cpu_ms).collect::<Vec<_>>());
    let rss = rows.last().map_or(0.0, |r| r.rss_kib as f64 / 1024.0);
    let line = format!(
        "| {branches} | {} | {} | {} | {} | {} | {} | {} | {} | {rss:.1} |\n",
        repos.len(),
        cold.requests,
        num(cold.wall_ms),
        num(requests),
        num(counted),
        num(changed),
        num(quiet_wall),
        num(quiet_cpu),
    );
    let detail = json!({
        "branches": branches,
        "repositories": repos.len(),
        "cycles": rows,
        "peak_rss_kib": run.peak_rss_kib,
    });
    Ok((line, detail))
}
