//! Drives a real `sentry watch` through poll cycles against the fake GitHub and records,
//! per cycle, what the server saw and what Sentry logged — the engine behind the quota,
//! speed, memory and growth benchmarks.
//!
//! The sequence is: one cold cycle (no ETags yet), then `moving` cycles each preceded by a
//! move of `fraction` of the watched branches, then `quiet` cycles with no move. Moves
//! happen right after a cycle's log line, while Sentry sleeps its polling interval, so
//! every request between two cycle lines belongs to the second one.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, ensure};
use serde::Serialize;

use crate::fake_github::{Counts, FakeGitHub, Moves};
use crate::support::{Cycle, Sentry, ticks_per_second, tiny_qa_repo};
use crate::workload::{self, ConfigOptions, RepoSpec};

/// How long one cycle may take before the run fails.
const CYCLE_TIMEOUT: Duration = Duration::from_secs(180);

/// What to run.
pub struct Plan<'a> {
    pub repos: &'a [RepoSpec],
    pub polling_interval: &'a str,
    pub moving: usize,
    pub quiet: usize,
    pub fraction: f64,
}

/// One cycle as the server counted it and as Sentry logged it.
#[derive(Debug, Clone, Serialize)]
pub struct CycleRow {
    /// 0 is the cold cycle.
    pub index: usize,
    pub kind: &'static str,
    /// Branches moved just before this cycle.
    pub moved: usize,
    /// URLs whose answer changed: what a perfect conditional poller is counted for.
    pub expected_counted: usize,
    pub requests: u64,
    pub not_modified: u64,
    pub counted: u64,
    pub server_errors: u64,
    /// Requests and 304s as Sentry's cycle line reports them.
    pub sentry_requests: u64,
    pub sentry_not_modified: u64,
    pub branches_checked: u64,
    pub changes: u64,
    pub errors: u64,
    pub wall_ms: f64,
    /// CPU since the previous cycle line (for the cold cycle: since start).
    pub cpu_ms: f64,
    pub rss_kib: u64,
}

/// The cycles of one run, and the process's peak RSS.
pub struct Run {
    pub rows: Vec<CycleRow>,
    pub peak_rss_kib: u64,
}

/// URLs a cold cycle must fetch: one per exact branch, every listing page of a pattern repo.
pub fn cold_urls(repos: &[RepoSpec]) -> usize {
    repos
        .iter()
        .map(|r| {
            if r.pattern {
                r.branches.len().div_ceil(100)
            } else {
                r.watched.len()
            }
        })
        .sum()
}

/// Writes the configuration for `plan` into `dir` and returns its path.
pub fn write_config(
    dir: &Path,
    fake: &FakeGitHub,
    repos: &[RepoSpec],
    interval: &str,
) -> Result<std::path::PathBuf> {
    let qa = tiny_qa_repo(dir)?;
    let yaml = workload::sentry_yaml(
        repos,
        &ConfigOptions {
            api_url: fake.url(),
            polling_interval: interval,
            dir,
            qa_repo: &qa,
            command: "true",
            webhook_secret: None,
            server: false,
        },
    );
    let path = dir.join("sentry.yaml");
    std::fs::write(&path, yaml)?;
    Ok(path)
}

/// Runs `plan` with a fresh `sentry watch` against `fake` (whose state it moves).
pub fn run(fake: &FakeGitHub, plan: &Plan<'_>) -> Result<Run> {
    let dir = tempfile::Builder::new().prefix("sentry-bench-").tempdir()?;
    let config = write_config(dir.path(), fake, plan.repos, plan.polling_interval)?;
    let mut sentry = Sentry::watch(dir.path(), &config, &[])?;
    let mut rows = Vec::new();
    let mut counts = fake.counts();
    let mut cpu = 0;
    let total = 1 + plan.moving + plan.quiet;
    let mut moves = Moves {
        branches: 0,
        changed_urls: cold_urls(plan.repos),
    };
    for index in 0..total {
        let cycle = sentry.next_cycle(CYCLE_TIMEOUT)?;
        let now = fake.counts();
        let kind = match index {
            0 => "cold",
            i if i <= plan.moving => "moving",
            _ => "quiet",
        };
        rows.push(row(index, kind, &moves, &now.since(&counts), &cycle, cpu));
        ensure!(
            cycle.errors == 0,
            "cycle {index} had {} errors:\n{}",
            cycle.errors,
            sentry.tail_text()
        );
        counts = now;
        cpu = cycle.cpu_ticks;
        moves = if index < plan.moving {
            fake.move_fraction(plan.fraction)
        } else {
            Moves::default()
        };
    }
    let peak_rss_kib = sentry.peak_rss_kib();
    Ok(Run { rows, peak_rss_kib })
}

fn row(
    index: usize,
    kind: &'static str,
    moves: &Moves,
    server: &Counts,
    cycle: &Cycle,
    cpu_before: u64,
) -> CycleRow {
    CycleRow {
        index,
        kind,
        moved: moves.branches,
        expected_counted: moves.changed_urls,
        requests: server.total,
        not_modified: server.not_modified,
        counted: server.counted,
        server_errors: server.errors,
        sentry_requests: cycle.requests,
        sentry_not_modified: cycle.not_modified,
        branches_checked: cycle.branches,
        changes: cycle.changes,
        errors: cycle.errors,
        wall_ms: cycle.duration_ms,
        cpu_ms: cycle.cpu_ticks.saturating_sub(cpu_before) as f64 * 1000.0 / ticks_per_second(),
        rss_kib: cycle.rss_kib,
    }
}

/// The rows of one kind.
pub fn of_kind<'a>(rows: &'a [CycleRow], kind: &str) -> Vec<&'a CycleRow> {
    rows.iter().filter(|r| r.kind == kind).collect()
}
