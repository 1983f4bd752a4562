//! Benchmark: scale against GitHub's secondary limits.
//!
//! For each size (1,000, 10,000 and 50,000 watched branches in full mode), three pollers
//! each get their own fake GitHub that *enforces* the documented limits
//! ([`crate::limited_github`]: 100 requests in flight, 900 REST points and 2,000 GraphQL
//! points per sliding minute, 5,000 primary points per hour, `403` when exceeded):
//!
//! - **Sentry** as shipped (`github_lookup: auto`, which picks GraphQL at these sizes);
//! - **REST-only Sentry** (`github_lookup: rest`): one conditional request per branch, paced
//!   by its request budget;
//! - **the naive poller**: one unconditional `GET` per branch per cycle, 8 in flight, that
//!   gives up the rest of a cycle at the first `403` (Rancher Fleet's pattern).
//!
//! Time is not scaled: the interval is the real 60 s and the limits' windows the real minute,
//! because Sentry's request budget (branch scale-core) has no window setting yet and a
//! shorter fake window would make REST-only Sentry look slower than it is. Each run lasts
//! [`crate::Sizes::scale_run`] seconds; branches move from `scale_moves_start` on, 1 % per
//! interval (per minute at 60 s), for
//! `scale_moving` seconds; every run of every size goes at once (each with its own fake), so
//! the benchmark takes one run's time. Hourly figures are the measured rate × 3,600 s, over
//! the span between the first and the last completed cycle (the cold first cycle excluded),
//! or over the whole run when fewer than two cycles completed.
//!
//! Latency is measured twice for Sentry: move → its "change:" log line read by the suite
//! (detection) and move → deploy command started (its own `date +%s%N`, after the QA
//! clone and the group's queue); for the naive poller, move → the answer that showed the
//! new SHA (it deploys nothing).
//! Moves not seen (or not deployed) by the end of the run count as +∞; a percentile that
//! falls on them is reported as "not reached".

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde_json::json;

use crate::Ctx;
use crate::limited_github::{LimitedGitHub, Limits, Meter, Repo};
use crate::report::{Report, num};
use crate::support::{Event, Sentry, tiny_qa_repo};

const TOKEN: &str = "bench-scale-token-not-a-secret";
/// Moved per polling interval: 1 % per minute at the full run's 60 s interval.
const MOVE_PER_INTERVAL: f64 = 0.01;
/// Branches per repository; every tenth repository watches `release/*` instead.
const PER_REPO: usize = 10;

/// The estate for `branches` watched branches.
fn estate(branches: usize) -> Vec<Repo> {
    let repos = branches.div_ceil(PER_REPO);
    (0..repos)
        .map(|i| {
            let path = format!("scale/r{i:05}");
            if i % 10 == 9 {
                let watched: Vec<String> = (0..PER_REPO).map(|b| format!("release/{b}")).collect();
                let mut all: Vec<String> = (0..95).map(|b| format!("feature/{b:03}")).collect();
                all.extend(watched.iter().cloned());
                Repo {
                    branches: all.into_iter().map(|b| (b, sha_of(i, 0))).collect(),
                    path,
                    watched,
                    pattern: true,
                }
            } else {
                let watched: Vec<String> = (0..PER_REPO).map(|b| format!("b{b}")).collect();
                Repo {
                    branches: watched.iter().map(|b| (b.clone(), sha_of(i, 0))).collect(),
                    path,
                    watched,
                    pattern: false,
                }
            }
        })
        .collect()
}

fn sha_of(repo: usize, n: u64) -> String {
    format!("{:020x}{:020x}", repo + 1, n)
}

fn yaml(
    repos: &[Repo],
    api: &str,
    interval: u64,
    lookup: &str,
    dir: &Path,
    qa: &Path,
    out: &Path,
) -> String {
    let mut y = format!(
        "polling_interval: {interval}s\ngithub_lookup: {lookup}\nstate_file: {d}/state.json\n\
         work_dir: {d}/work\nrequest_timeout: 30s\nmax_requests_per_host: 8\nmax_concurrent_units: 16\n\
         server: {{enabled: false}}\ngroups:\n  scale: {{execution_strategy: parallel, max_parallel: 16, \
         continue_on_error: true}}\nrepositories:\n",
        d = dir.display()
    );
    let command = format!(
        "echo \"$SENTRY_REPO_NAME $SENTRY_BRANCH $SENTRY_COMMIT_SHA $(date +%s%N)\" >> '{}'",
        out.display()
    );
    let command = serde_json::to_string(&command).unwrap_or_default();
    for repo in repos {
        let branches = if repo.pattern {
            "[\"release/*\"]".to_owned()
        } else {
            format!("[{}]", repo.watched.join(", "))
        };
        y.push_str(&format!(
            "  - name: {}\n    group: scale\n    monitor: {{repo_url: \"https://github.com/{}\", repo_type: github, \
             api_url: \"{api}\", branches: {branches}, auth: {{token: {TOKEN}}}}}\n    deploy: {{qa_repo_url: \
             \"{}\", qa_repo_branch: main, commands: [{command}]}}\n",
            repo.path.replace('/', "-"),
            repo.path,
            qa.display()
        ));
    }
    y
}

/// What one poller did in one run.
#[derive(Debug, Default, Clone)]
struct Outcome {
    /// Move → deploy command started (Sentry), or → the answer showing it (naive).
    latencies: Vec<f64>,
    /// Move → Sentry logged the change (Sentry only).
    detections: Vec<f64>,
    moves: usize,
    /// (when, meter) at each completed cycle.
    cycles: Vec<(Instant, Meter)>,
    start: Option<(Instant, Meter)>,
    end: Option<(Instant, Meter)>,
    first_cycle_s: Option<f64>,
}

impl Outcome {
    /// Steady per-hour rates and the span they come from.
    fn hourly(&self) -> (Meter, f64, bool) {
        let (from, to, steady) = if self.cycles.len() >= 2 {
            (self.cycles[0], self.cycles[self.cycles.len() - 1], true)
        } else {
            match (self.start, self.end) {
                (Some(s), Some(e)) => (s, e, false),
                _ => return (Meter::default(), 0.0, false),
            }
        };
        let span = to.0.duration_since(from.0).as_secs_f64();
        (to.1.since(&from.1), span, steady)
    }

    /// (p50, p95) of `values` with the moves missing from them as +∞.
    fn percentiles(&self, values: &[f64]) -> (f64, f64) {
        let mut all = values.to_vec();
        all.resize(self.moves.max(all.len()), f64::INFINITY);
        all.sort_by(f64::total_cmp);
        let at = |p: f64| {
            if all.is_empty() {
                return f64::NAN;
            }
            let rank = ((p / 100.0) * all.len() as f64).ceil() as usize;
            all[rank.clamp(1, all.len()) - 1]
        };
        (at(50.0), at(95.0))
    }
}

fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs one Sentry until `deadline`, recording the fake's meter at each cycle line.
fn run_sentry(
    fake: &LimitedGitHub,
    dir: &Path,
    config: &Path,
    deadline: Instant,
    started: Instant,
) -> Result<Outcome> {
    let mut sentry = Sentry::watch(dir, config, &[])?;
    let mut out = Outcome {
        start: Some((Instant::now(), fake.meter())),
        ..Outcome::default()
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match sentry.next_any(left) {
            Ok(Event::Cycle(_)) => {
                let now = Instant::now();
                if out.first_cycle_s.is_none() {
                    out.first_cycle_s = Some(now.duration_since(started).as_secs_f64());
                }
                out.cycles.push((now, fake.meter()));
            }
            Ok(Event::Change {
                repository,
                branch,
                at,
            }) => {
                let repo = repository.replacen('-', "/", 1);
                if let Some(moved) = fake.moved_at_any(&repo, &branch) {
                    out.detections.push(epoch_secs(at) - epoch_secs(moved));
                }
            }
            Ok(Event::Listening(_)) => {}
            Err(_) if Instant::now() >= deadline => break,
            Err(e) => return Err(e),
        }
    }
    out.end = Some((Instant::now(), fake.meter()));
    drop(sentry);
    Ok(out)
}

/// Deploy lines → latencies of the moves they deployed.
fn deployed_latencies(fake: &LimitedGitHub, out: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let mut seen = HashMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [name, branch, sha, ns] = parts[..] else {
            continue;
        };
        let repo = name.replacen('-', "/", 1);
        let Ok(ns) = ns.parse::<u64>() else { continue };
        if let Some(at) = fake.moved_at(&repo, branch, sha) {
            let latency = ns as f64 / 1e9 - epoch_secs(at);
            seen.entry((repo, branch.to_owned()))
                .and_modify(|l: &mut f64| *l = l.min(latency))
                .or_insert(latency);
        }
    }
    seen.into_values().collect()
}

/// The naive poller: every `interval`, one unconditional GET per watched branch, 8 in flight,
/// the rest of the cycle given up at the first 403.
async fn naive(
    fake: Arc<LimitedGitHub>,
    repos: Arc<Vec<Repo>>,
    interval: Duration,
    deadline: Instant,
    started: Instant,
    result: Arc<Mutex<Outcome>>,
) {
    use futures_util::StreamExt;
    let client = reqwest::Client::new();
    let mut known: HashMap<(String, String), String> = HashMap::new();
    let stop = Arc::new(AtomicBool::new(false));
    result.lock().unwrap().start = Some((Instant::now(), fake.meter()));
    while Instant::now() < deadline {
        let cycle_start = tokio::time::Instant::now();
        stop.store(false, Ordering::SeqCst);
        let urls: Vec<(String, String)> = repos
            .iter()
            .flat_map(|r| r.watched.iter().map(move |b| (r.path.clone(), b.clone())))
            .collect();
        let answers: Vec<((String, String), Option<String>, SystemTime)> =
            futures_util::stream::iter(urls)
                .map(|(repo, branch)| {
                    let client = client.clone();
                    let stop = stop.clone();
                    let url = format!("{}/repos/{repo}/commits/refs/heads/{branch}", fake.url());
                    async move {
                        if stop.load(Ordering::SeqCst) {
                            return ((repo, branch), None, SystemTime::now());
                        }
                        let reply = client
                            .get(url)
                            .header("authorization", format!("Bearer {TOKEN}"))
                            .header("accept", "application/vnd.github.sha")
                            .header("user-agent", "naive-poller")
                            .send()
                            .await;
                        let sha = match reply {
                            Ok(r) if r.status().is_success() => r.text().await.ok(),
                            Ok(r) if r.status() == reqwest::StatusCode::FORBIDDEN => {
                                stop.store(true, Ordering::SeqCst);
                                None
                            }
                            _ => None,
                        };
                        ((repo, branch), sha, SystemTime::now())
                    }
                })
                .buffer_unordered(8)
                .collect()
                .await;
        {
            let mut out = result.lock().unwrap();
            for (key, sha, at) in answers {
                let Some(sha) = sha else { continue };
                if let Some(old) = known.insert(key.clone(), sha.clone()) {
                    if old != sha {
                        if let Some(moved) = fake.moved_at(&key.0, &key.1, &sha) {
                            out.latencies.push(epoch_secs(at) - epoch_secs(moved));
                        }
                    }
                }
            }
            let now = Instant::now();
            if out.first_cycle_s.is_none() {
                out.first_cycle_s = Some(now.duration_since(started).as_secs_f64());
            }
            out.cycles.push((now, fake.meter()));
        }
        tokio::time::sleep_until(cycle_start + interval).await;
    }
    result.lock().unwrap().end = Some((Instant::now(), fake.meter()));
}

struct RunSpec {
    branches: usize,
    poller: &'static str,
    fake: Arc<LimitedGitHub>,
    repos: Arc<Vec<Repo>>,
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let interval = ctx.sizes.scale_interval;
    let run_for = Duration::from_secs(ctx.sizes.scale_run);
    let moving_for = Duration::from_secs(ctx.sizes.scale_moving);
    let moves_start = Duration::from_secs(ctx.sizes.scale_moves_start);
    let mut specs = Vec::new();
    for &branches in &ctx.sizes.scale {
        let repos = Arc::new(estate(branches));
        for poller in ["Sentry", "REST-only Sentry", "naive poller"] {
            let fake = ctx
                .rt
                .block_on(LimitedGitHub::start(repos.as_ref().clone(), Limits::GITHUB))?;
            specs.push(RunSpec {
                branches,
                poller,
                fake: Arc::new(fake),
                repos: repos.clone(),
            });
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("sentry-bench-scale-")
        .tempdir()?;
    let qa = tiny_qa_repo(dir.path())?;
    let started = Instant::now();
    let deadline = started + run_for;
    let outcomes: Vec<Arc<Mutex<Outcome>>> = specs
        .iter()
        .map(|_| Arc::new(Mutex::new(Outcome::default())))
        .collect();
    let mut errors = Vec::new();
    std::thread::scope(|scope| -> Result<()> {
        let mut handles = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let out = outcomes[i].clone();
            if spec.poller == "naive poller" {
                ctx.rt.spawn(naive(
                    spec.fake.clone(),
                    spec.repos.clone(),
                    Duration::from_secs(interval),
                    deadline,
                    started,
                    out,
                ));
                continue;
            }
            let lookup = if spec.poller == "Sentry" {
                "auto"
            } else {
                "rest"
            };
            let run_dir = dir.path().join(format!("run{i}"));
            std::fs::create_dir_all(&run_dir)?;
            let deploys = run_dir.join("deployed.txt");
            let config = run_dir.join("sentry.yaml");
            std::fs::write(
                &config,
                yaml(
                    &spec.repos,
                    spec.fake.url(),
                    interval,
                    lookup,
                    &run_dir,
                    &qa,
                    &deploys,
                ),
            )?;
            let fake = spec.fake.clone();
            handles.push(scope.spawn(move || -> Result<()> {
                let mut outcome = run_sentry(&fake, &run_dir, &config, deadline, started)?;
                outcome.latencies = deployed_latencies(&fake, &deploys);
                let mut slot = out.lock().unwrap();
                *slot = outcome;
                Ok(())
            }));
        }
        // The mover: 1 % of each estate's watched branches per interval, from `moves_start` on.
        std::thread::sleep(moves_start);
        let mut seeds: Vec<u64> = (0..specs.len() as u64)
            .map(|i| 0x9E37_79B9 + i * 7919)
            .collect();
        let mut owed = vec![0.0f64; specs.len()];
        let tick = Duration::from_millis(500);
        let moves_end = started + moves_start + moving_for;
        while Instant::now() < moves_end {
            for (i, spec) in specs.iter().enumerate() {
                owed[i] +=
                    spec.branches as f64 * MOVE_PER_INTERVAL * tick.as_secs_f64() / interval as f64;
                let now = owed[i].floor() as usize;
                if now > 0 {
                    owed[i] -= spec.fake.move_some(now, &mut seeds[i]) as f64;
                }
            }
            std::thread::sleep(tick);
        }
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("{e:#}")),
                Err(_) => errors.push("a Sentry run panicked".into()),
            }
        }
        Ok(())
    })?;
    // The naive pollers end at the deadline too.
    while Instant::now() < deadline + Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(200));
    }
    if !errors.is_empty() {
        anyhow::bail!("scale runs failed: {}", errors.join("; "));
    }

    let name = "7 scale";
    let mut table = format!(
        "Scale against GitHub's limits ({} s interval, 1 % moving per interval for {} s, runs of {} s, real time):\n\n\
         | branches | poller | change seen | p50 s | p95 s | deploy started | p50 s | p95 s | REST points/h | primary REST/h | GraphQL points/h | requests/h | throttled | max in flight | first cycle s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        interval,
        moving_for.as_secs(),
        run_for.as_secs()
    );
    let mut details = Vec::new();
    for (spec, outcome) in specs.iter().zip(&outcomes) {
        let mut o = outcome.lock().unwrap().clone();
        o.moves = spec.fake.moves();
        let (p50, p95) = o.percentiles(&o.latencies);
        // The naive poller's answer is its detection; it deploys nothing.
        let naive = spec.poller == "naive poller";
        let seen = if naive { &o.latencies } else { &o.detections };
        let (d50, d95) = o.percentiles(seen);
        let deployed = if naive {
            "–".to_owned()
        } else {
            format!("{}/{}", o.latencies.len(), o.moves)
        };
        let (p50, p95) = if naive {
            (f64::NAN, f64::NAN)
        } else {
            (p50, p95)
        };
        let (m, span, steady) = o.hourly();
        let per_hour = |v: u64| {
            if span > 0.0 {
                v as f64 * 3600.0 / span
            } else {
                f64::NAN
            }
        };
        let total = spec.fake.meter();
        let secs = |v: f64| {
            if v.is_nan() {
                "–".to_owned()
            } else if v.is_infinite() {
                "not reached".to_owned()
            } else {
                num(v)
            }
        };
        table.push_str(&format!(
            "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} | {} | {} | {} |\n",
            num(spec.branches as f64),
            spec.poller,
            seen.len(),
            o.moves,
            secs(d50),
            secs(d95),
            deployed,
            secs(p50),
            secs(p95),
            num(per_hour(m.rest_points)),
            num(per_hour(m.rest_counted)),
            num(per_hour(m.graphql_points)),
            num(per_hour(m.rest_requests + m.graphql_queries)),
            if steady { "" } else { " (cold)" },
            total.throttled(),
            total.max_in_flight,
            o.first_cycle_s.map_or("none".into(), num),
        ));
        if spec.poller == "Sentry" {
            report.judged(
                name,
                format!(
                    "{} branches: throttling responses",
                    num(spec.branches as f64)
                ),
                total.throttled().to_string(),
                "0",
                total.throttled() == 0,
            );
            report.info(
                name,
                format!(
                    "{} branches: move → change seen / deploy started, p50 and p95",
                    num(spec.branches as f64)
                ),
                format!(
                    "seen {} / {} s ({}/{}), deploy {} / {} s ({}/{})",
                    secs(d50),
                    secs(d95),
                    seen.len(),
                    o.moves,
                    secs(p50),
                    secs(p95),
                    o.latencies.len(),
                    o.moves
                ),
            );
            if spec.branches == 10_000 {
                report.judged(
                    name,
                    "10,000 branches: detection p95 (move → deploy start)",
                    format!(
                        "{} s (p50 {} s, {}/{} detected)",
                        secs(p95),
                        secs(p50),
                        o.latencies.len(),
                        o.moves
                    ),
                    "≤ 90 s",
                    p95 <= 90.0,
                );
                let primary = per_hour(m.rest_counted) + per_hour(m.graphql_points);
                report.judged(
                    name,
                    "10,000 branches: primary quota per hour",
                    format!("{} of 5,000", num(primary)),
                    "≤ 50 %",
                    primary <= 2500.0 && steady,
                );
            }
        }
        details.push(json!({
            "branches": spec.branches,
            "poller": spec.poller,
            "moves": o.moves,
            "seen": seen.len(),
            "seen_p50_s": d50.is_finite().then_some(d50),
            "seen_p95_s": d95.is_finite().then_some(d95),
            "deployed": o.latencies.len(),
            "p50_s": p50.is_finite().then_some(p50),
            "p95_s": p95.is_finite().then_some(p95),
            "span_s": span,
            "steady": steady,
            "window": m,
            "total": total,
            "cycles": o.cycles.len(),
            "first_cycle_s": o.first_cycle_s,
        }));
    }
    report.sections.push(table);
    report.detail(
        "scale",
        json!({
            "interval_s": interval,
            "run_s": run_for.as_secs(),
            "moving_s": moving_for.as_secs(),
            "limits": Limits::GITHUB,
            "runs": details,
        }),
    );
    Ok(())
}
