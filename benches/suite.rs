//! Sentry's benchmark suite (`make bench`, `make bench-smoke`): what polling and deploying
//! cost, each measured side by side with its floor in the same run.
//!
//! Everything runs on 127.0.0.1 against servers this process starts: a fake GitHub
//! ([`fake_github`]) and a Git smart-HTTP server (the integration tests' [`git_http`]). The
//! real release binary (`target/release/sentry`, or `$SENTRY_BIN`) is driven through
//! generated configurations; its JSON cycle log lines and `/proc` give the numbers.
//!
//! Benchmarks: [`quota`], [`speed`], [`memory`], [`clone`], [`validate`], [`reaction`],
//! [`jobs`] (the kubernetes executor on the tests' fake kubelet), [`growth`] (full mode only), and
//! [`scale`] (against a fake GitHub that enforces GitHub's secondary limits, [`limited_github`]).
//! Each returns its numbers into a [`report::Report`], which
//! prints a Markdown table and writes `target/bench/results.json`. A benchmark that fails
//! is reported as failed and the others still run.
//!
//! Usage: `cargo bench --bench suite [-- --smoke] [--only NAME,NAME]`. Without `--bench`
//! (as `cargo test --all-targets` runs it) the binary does nothing and exits 0.

// The harness may unwrap: a panic is a failed benchmark. Library code may not (Cargo.toml [lints]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "suite/clone.rs"]
mod clone;
#[path = "suite/cycles.rs"]
mod cycles;
#[path = "suite/fake_github.rs"]
mod fake_github;
#[path = "suite/floor.rs"]
mod floor;
// The integration tests' server; its unit tests compile to nothing here.
#[allow(unused_imports)]
#[path = "../tests/it/support/git_http.rs"]
mod git_http;
// The integration tests' GraphQL evaluator, for the limit-enforcing fake GitHub.
#[path = "../tests/it/support/graphql_eval.rs"]
mod graphql_eval;
#[path = "suite/growth.rs"]
mod growth;
#[path = "suite/jobs.rs"]
mod jobs;
// The integration tests' fake API server and kubelet, for the kubernetes executor.
#[allow(dead_code)]
#[path = "../tests/it/support/fake_kube.rs"]
mod fake_kube;
#[allow(dead_code)]
#[path = "../tests/it/support/fake_kube_tls.rs"]
mod fake_kube_tls;
#[path = "suite/limited_github.rs"]
mod limited_github;
#[path = "suite/memory.rs"]
mod memory;
#[path = "suite/quota.rs"]
mod quota;
#[path = "suite/reaction.rs"]
mod reaction;
#[path = "suite/report.rs"]
mod report;
#[path = "suite/scale.rs"]
mod scale;
#[path = "suite/speed.rs"]
mod speed;
#[path = "suite/support.rs"]
mod support;
#[path = "suite/validate.rs"]
mod validate;
#[path = "suite/workload.rs"]
mod workload;

use std::process::ExitCode;
use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use report::Report;

/// Sizes of every benchmark; full mode follows the issue, smoke mode is tiny.
#[derive(Debug, Clone, Serialize)]
pub struct Sizes {
    pub quota_repos: usize,
    pub quota_cycles: usize,
    pub speed_repos: usize,
    pub speed_cycles: usize,
    pub memory_repos: usize,
    pub memory_cycles: usize,
    pub clone_files: usize,
    pub clone_commits: usize,
    pub clone_runs: usize,
    pub validate_repos: usize,
    pub validate_runs: usize,
    pub reaction_repos: usize,
    pub reaction_pushes: usize,
    /// Watched branches of each growth run; empty skips it.
    pub growth: Vec<usize>,
    /// Units of the group run on the local and the kubernetes executor, and runs of each.
    pub jobs_units: usize,
    pub jobs_runs: usize,
    /// Watched branches of each scale run (all run at once); empty skips it.
    pub scale: Vec<usize>,
    /// The scale runs' polling interval, when moves start, how long they go on, and how
    /// long each run lasts, in seconds.
    pub scale_interval: u64,
    pub scale_moves_start: u64,
    pub scale_moving: u64,
    pub scale_run: u64,
}

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            quota_repos: 1000,
            quota_cycles: 10,
            speed_repos: 1000,
            speed_cycles: 15,
            memory_repos: 1000,
            memory_cycles: 1000,
            clone_files: 20_000,
            clone_commits: 200,
            clone_runs: 10,
            validate_repos: 1000,
            validate_runs: 30,
            reaction_repos: 1000,
            reaction_pushes: 50,
            growth: vec![100, 1000, 5000],
            jobs_units: 20,
            jobs_runs: 3,
            scale: vec![1000, 10_000, 50_000],
            scale_interval: 60,
            scale_moves_start: 15,
            scale_moving: 90,
            scale_run: 175,
        }
    }

    fn smoke() -> Sizes {
        Sizes {
            quota_repos: 50,
            quota_cycles: 3,
            speed_repos: 50,
            speed_cycles: 3,
            memory_repos: 50,
            memory_cycles: 30,
            clone_files: 500,
            clone_commits: 20,
            clone_runs: 3,
            validate_repos: 1000,
            validate_runs: 5,
            reaction_repos: 50,
            reaction_pushes: 5,
            growth: Vec::new(),
            jobs_units: 4,
            jobs_runs: 1,
            scale: vec![100],
            scale_interval: 2,
            scale_moves_start: 3,
            scale_moving: 6,
            scale_run: 14,
        }
    }
}

/// What every benchmark gets: the sizes and the runtime the local servers run on.
pub struct Ctx {
    pub sizes: Sizes,
    pub rt: tokio::runtime::Runtime,
}

/// The arithmetic mean (NaN when empty).
pub fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

type Bench = fn(&Ctx, &mut Report) -> anyhow::Result<()>;

const BENCHES: [(&str, Bench); 9] = [
    ("quota", quota::run),
    ("speed", speed::run),
    ("memory", memory::run),
    ("clone", clone::run),
    ("validate", validate::run),
    ("reaction", reaction::run),
    ("jobs", jobs::run),
    ("growth", run_growth),
    ("scale", scale::run),
];

fn run_growth(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    growth::run(ctx, report, &ctx.sizes.growth)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("sentry bench suite: not run (use `make bench` or `cargo bench --bench suite`)");
        return ExitCode::SUCCESS;
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let only = only(&args);
    match run(smoke, only.as_deref()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench suite: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `--only a,b` or `--only=a,b`.
fn only(args: &[String]) -> Option<Vec<String>> {
    let value = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--only=")
            .map(str::to_owned)
            .or_else(|| (a == "--only").then(|| args.get(i + 1).cloned()).flatten())
    })?;
    Some(value.split(',').map(|s| s.trim().to_owned()).collect())
}

/// Runs the selected benchmarks; true when every one ran (targets missed are reported, not
/// failures: the numbers are the product).
fn run(smoke: bool, only: Option<&[String]>) -> anyhow::Result<bool> {
    support::sentry_bin()?;
    let sizes = if smoke { Sizes::smoke() } else { Sizes::full() };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ctx = Ctx { sizes, rt };
    let mut report = Report::default();
    let mut ran_all = true;
    let started = Instant::now();
    for (name, bench) in BENCHES {
        if only.is_some_and(|o| !o.iter().any(|n| n == name)) {
            continue;
        }
        if name == "growth" && ctx.sizes.growth.is_empty() {
            continue;
        }
        eprintln!("bench: {name} …");
        let t = Instant::now();
        if let Err(e) = bench(&ctx, &mut report) {
            eprintln!("bench: {name} failed: {e:#}");
            report.failed(name, &e);
            ran_all = false;
        }
        eprintln!("bench: {name} done in {:.1} s", t.elapsed().as_secs_f64());
    }
    let mode = if smoke { "smoke" } else { "full" };
    let machine = report::machine();
    println!(
        "\n## Sentry benchmarks ({mode}, {:.0} s)\n",
        started.elapsed().as_secs_f64()
    );
    println!("Machine: {machine}\n");
    println!("{}", report.markdown());
    let header = json!({
        "mode": mode,
        "finished_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "seconds": started.elapsed().as_secs_f64(),
        "machine": machine,
        "sizes": ctx.sizes,
        "sentry_version": sentry::testing::VERSION,
    });
    let path = report.write_json(&support::target_dir().join("bench"), header)?;
    println!("results: {}", path.display());
    Ok(ran_all)
}
