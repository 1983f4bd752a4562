//! Benchmark 5, validate: wall time of `sentry validate` on a generated 1,000-repository
//! configuration (process start to exit), median of N runs after one warm-up. Target ≤ 50 ms.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, ensure};
use serde_json::json;

use crate::Ctx;
use crate::report::{Report, num};
use crate::support::{median, percentile, sentry_command};
use crate::workload::{self, ConfigOptions, estate};

const MAX_MS: f64 = 50.0;

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("sentry-bench-validate-")
        .tempdir()?;
    let repos = estate(ctx.sizes.validate_repos);
    let yaml = workload::sentry_yaml(
        &repos,
        &ConfigOptions {
            api_url: "http://127.0.0.1:9",
            polling_interval: "60s",
            dir: dir.path(),
            qa_repo: Path::new("/srv/qa"),
            command: "./run.sh",
            webhook_secret: Some("bench-secret"),
            server: true,
        },
    );
    let config = dir.path().join("sentry.yaml");
    std::fs::write(&config, &yaml)?;

    validate_once(dir.path(), &config)?;
    let mut times = Vec::with_capacity(ctx.sizes.validate_runs);
    for _ in 0..ctx.sizes.validate_runs {
        times.push(validate_once(dir.path(), &config)?);
    }
    let m = median(&times);
    report.judged(
        "5 validate",
        format!(
            "`sentry validate`, {} repositories, {} KiB (median of {})",
            repos.len(),
            yaml.len() / 1024,
            times.len()
        ),
        format!("{} ms (p95 {} ms)", num(m), num(percentile(&times, 95.0))),
        format!("≤ {MAX_MS} ms"),
        m <= MAX_MS,
    );
    report.detail(
        "validate",
        json!({ "repositories": repos.len(), "bytes": yaml.len(), "ms": times }),
    );
    Ok(())
}

/// One `sentry validate` run; its wall time in ms. It must succeed.
fn validate_once(dir: &Path, config: &Path) -> Result<f64> {
    let mut cmd = sentry_command(dir)?;
    cmd.arg("-c").arg(config).arg("validate");
    let started = Instant::now();
    let out = cmd.output()?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    ensure!(
        out.status.success(),
        "sentry validate failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(ms)
}
