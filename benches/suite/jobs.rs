//! Benchmark 7, units as Kubernetes Jobs: one group of N units (`parallel`,
//! `max_parallel: 4`, each unit clones a tiny QA repository and runs `sleep 0.5`) run by
//! `sentry trigger --group` on the local executor, then on the kubernetes executor against
//! the integration tests' fake API server (`tests/it/support/fake_kube.rs`), whose fake
//! kubelet runs each Job's container at once as a local `sentry exec-unit` process.
//!
//! What the difference measures: Sentry's own cost of a unit as a Job — creating the Job,
//! polling it and its pod (every 500 ms), following the pod's log, deleting the Job — plus
//! a second process start and configuration load (`exec-unit`) per unit. What it cannot
//! measure: a real cluster's scheduling, image pulls, container start and API latency,
//! which add seconds per unit (docs/en/benchmarks.md). No target: the numbers are reported.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::fake_kube::{FakeKube, Kubelet};
use crate::report::{Report, num};
use crate::support::{git, median, sentry_bin, sentry_command, tiny_qa_repo};
use crate::{Ctx, mean};

/// Units at once, as the issue asks.
const MAX_PARALLEL: usize = 4;
/// Each unit's command: long enough for the units to overlap, short next to the clone.
const COMMAND: &str = "sleep 0.5";

/// One `trigger --group` run: its wall time and each unit's duration.
struct Sample {
    wall_s: f64,
    unit_s: Vec<f64>,
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let (units, runs) = (ctx.sizes.jobs_units, ctx.sizes.jobs_runs);
    let root = tempfile::Builder::new()
        .prefix("sentry-bench-jobs-")
        .tempdir()?;
    let dir = root.path();
    let watched = dir.join("app");
    std::fs::create_dir_all(&watched)?;
    git(&watched, &["init", "-q", "-b", "main"])?;
    git(
        &watched,
        &[
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@example.com",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "init",
        ],
    )?;
    let qa = tiny_qa_repo(dir)?;
    let local = std::fs::write(
        dir.join("local.yaml"),
        config(dir, &watched, &qa, units, None),
    )
    .map(|()| dir.join("local.yaml"))?;
    let kube_yaml = dir.join("kubernetes.yaml");
    std::fs::write(
        &kube_yaml,
        config(
            dir,
            &watched,
            &qa,
            units,
            Some(
                "{kind: kubernetes, namespace: sentry-jobs, image: registry.example.com/qa/sentry:bench}",
            ),
        ),
    )?;
    let kube = FakeKube::start(dir, &["bench"]);
    kube.set_kubelet(Kubelet {
        binary: sentry_bin()?,
        config: kube_yaml.clone(),
        secrets: Default::default(),
        start_after: Some(Duration::ZERO),
        never_reason: "ErrImagePull".to_owned(),
    });
    let kubeconfig = kube.kubeconfig("bench");

    // Alternated, so that a drift in the machine's load affects both sides.
    let (mut on_local, mut on_kube) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        on_local.push(trigger(dir, &local, None, units)?);
        on_kube.push(trigger(dir, &kube_yaml, Some(&kubeconfig), units)?);
    }
    let created = kube.jobs_created();
    if created != units * runs {
        bail!("{created} Jobs created for {} units", units * runs);
    }

    let wall = |s: &[Sample]| median(&s.iter().map(|s| s.wall_s).collect::<Vec<_>>());
    let unit = |s: &[Sample]| mean(s.iter().flat_map(|s| s.unit_s.iter().copied()));
    let (local_wall, kube_wall) = (wall(&on_local), wall(&on_kube));
    let (local_unit, kube_unit) = (unit(&on_local), unit(&on_kube));
    let name = "7 units as Jobs";
    report.info(
        name,
        format!("group of {units} units, max_parallel {MAX_PARALLEL}: wall (median of {runs})"),
        format!(
            "local {} s vs kubernetes on the fake kubelet {} s = {:.2}×",
            secs(local_wall),
            secs(kube_wall),
            kube_wall / local_wall
        ),
    );
    report.info(
        name,
        format!("overhead per unit (mean unit duration, `{COMMAND}`)"),
        format!(
            "+{} ms (local {} ms, kubernetes {} ms)",
            num((kube_unit - local_unit) * 1000.0),
            num(local_unit * 1000.0),
            num(kube_unit * 1000.0)
        ),
    );
    report.detail(
        "jobs",
        json!({
            "units": units,
            "runs": runs,
            "max_parallel": MAX_PARALLEL,
            "command": COMMAND,
            "local_wall_s": on_local.iter().map(|s| s.wall_s).collect::<Vec<_>>(),
            "kubernetes_wall_s": on_kube.iter().map(|s| s.wall_s).collect::<Vec<_>>(),
            "local_unit_s_mean": local_unit,
            "kubernetes_unit_s_mean": kube_unit,
            "jobs_created": created,
        }),
    );
    Ok(())
}

fn secs(s: f64) -> String {
    format!("{s:.2}")
}

/// A configuration of one group `g` of `units` repositories, all watching `main` of the
/// same repository and deploying the same QA repository.
fn config(dir: &Path, watched: &Path, qa: &Path, units: usize, executor: Option<&str>) -> String {
    let mut y = format!(
        "work_dir: {dir}/work\nstate_file: {dir}/state.json\nserver:\n  enabled: false\n\
         groups:\n  g:\n    execution_strategy: parallel\n    max_parallel: {MAX_PARALLEL}\n    global_timeout: 30m\n",
        dir = dir.display()
    );
    if let Some(e) = executor {
        y.push_str(&format!("    executor: {e}\n"));
    }
    y.push_str("repositories:\n");
    for i in 0..units {
        y.push_str(&format!(
            "  - name: u{i:02}\n    group: g\n    monitor: {{repo_url: \"file://{}\", branches: [main], repo_type: git}}\n    \
             deploy: {{qa_repo_url: \"file://{}\", qa_repo_branch: main, commands: [\"{COMMAND}\"]}}\n",
            watched.display(),
            qa.display()
        ));
    }
    y
}

/// Runs `sentry trigger --group g -o json` and reads each unit's duration.
fn trigger(dir: &Path, config: &Path, kubeconfig: Option<&Path>, units: usize) -> Result<Sample> {
    let mut cmd = sentry_command(dir)?;
    cmd.arg("-c")
        .arg(config)
        .args(["trigger", "--group", "g", "--no-report", "-o", "json"]);
    match kubeconfig {
        Some(k) => cmd.env("KUBECONFIG", k),
        None => cmd.env_remove("KUBECONFIG"),
    };
    let started = Instant::now();
    let out = cmd.output().context("cannot run sentry trigger")?;
    let wall_s = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "sentry trigger failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let doc: Value = serde_json::from_slice(&out.stdout).context("trigger -o json")?;
    let unit_s: Vec<f64> = doc["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["units"].as_array().cloned().unwrap_or_default())
        .map(|u| {
            if u["status"] != "succeeded" {
                bail!("a unit did not succeed: {u}");
            }
            u["duration"].as_f64().context("unit duration")
        })
        .collect::<Result<_>>()?;
    if unit_s.len() != units {
        bail!("{} units ran, {units} expected", unit_s.len());
    }
    Ok(Sample { wall_s, unit_s })
}
