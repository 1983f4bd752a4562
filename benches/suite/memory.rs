//! Benchmark 3, memory: resident memory (`VmRSS`) of `sentry watch` over 2,000 branches
//! after the first cycle and after many fast cycles (`polling_interval: 10ms`, every
//! request a 304). Targets: ≤ 25 MiB, and growth between the two ≤ 1 MiB.

use anyhow::{Result, ensure};
use serde_json::json;

use crate::Ctx;
use crate::cycles::{self, Plan};
use crate::fake_github::FakeGitHub;
use crate::report::{Report, num};
use crate::workload::{estate, watched_count};

const MAX_RSS_MIB: f64 = 25.0;
const MAX_GROWTH_MIB: f64 = 1.0;

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let repos = estate(ctx.sizes.memory_repos);
    let branches = watched_count(&repos);
    let n = ctx.sizes.memory_cycles;
    let fake = ctx.rt.block_on(FakeGitHub::start(&repos, 1_000_000))?;
    let run = cycles::run(
        &fake,
        &Plan {
            repos: &repos,
            polling_interval: "10ms",
            moving: 0,
            quiet: n,
            fraction: 0.0,
        },
    )?;
    let rss = |i: usize| run.rows.get(i).map_or(f64::NAN, |r| mib(r.rss_kib));
    let (first, tenth, last) = (rss(0), rss(10.min(n)), rss(n));
    ensure!(first.is_finite() && last.is_finite(), "no RSS samples");
    let growth = last - first;
    let peak = mib(run.peak_rss_kib);

    let name = "3 memory";
    report.judged(
        name,
        format!(
            "RSS after cycle 1 / after {} cycles ({branches} branches)",
            n + 1
        ),
        format!("{} / {} MiB", mib_text(first), mib_text(last)),
        format!("≤ {MAX_RSS_MIB} MiB"),
        first.max(last) <= MAX_RSS_MIB,
    );
    report.judged(
        name,
        "growth (last − first)",
        format!("{:+.2} MiB (peak {})", growth, mib_text(peak)),
        format!("≤ {MAX_GROWTH_MIB} MiB"),
        growth <= MAX_GROWTH_MIB,
    );
    let wall: f64 = run.rows[1..].iter().map(|r| r.wall_ms).sum::<f64>() / n.max(1) as f64;
    report.info(
        name,
        "mean quiet cycle wall during the run",
        format!("{} ms", num(wall)),
    );
    let samples: Vec<(usize, u64)> = run
        .rows
        .iter()
        .filter(|r| r.index % 50 == 0 || r.index == n)
        .map(|r| (r.index, r.rss_kib))
        .collect();
    report.detail(
        "memory",
        json!({
            "branches": branches,
            "cycles": n + 1,
            "rss_mib_first": first,
            "rss_mib_tenth": tenth,
            "rss_mib_last": last,
            "growth_mib": growth,
            "peak_mib": peak,
            "rss_kib_every_50_cycles": samples,
        }),
    );
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn mib_text(mib: f64) -> String {
    format!("{mib:.1}")
}
