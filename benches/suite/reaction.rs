//! Benchmark 6, reaction: a signed GitHub push webhook → the first deploy command started.
//!
//! `sentry watch` watches the 2,000-branch estate on the fake GitHub with a one-hour
//! polling interval, so only the webhook can find a change. For each push the suite moves
//! `main` of the next exact repository (`bench/r0001`, `bench/r0002`, …) on the fake,
//! takes the time, and POSTs a push payload signed with
//! `X-Hub-Signature-256`; the deploy command (`date +%s%N >> FILE`) writes when it started.
//! The reaction is that stamp minus the time before the POST: verification, the forge
//! check, the scheduler, the QA checkout (a local repository) and the process start.
//! Pushes are 300 ms apart so that each group run has ended, each for another repository:
//! the server asks for at most one check per repository every `HINT_MIN_GAP` (5 s), so
//! pushes to one repository 300 ms apart would measure that gap, not the reaction.
//! Target: p50 ≤ 100 ms.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::Ctx;
use crate::fake_github::FakeGitHub;
use crate::report::{Report, num};
use crate::support::{Sentry, median, percentile, tiny_qa_repo};
use crate::workload::{self, ConfigOptions, estate};

const MAX_P50_MS: f64 = 100.0;
const SECRET: &str = "bench-webhook-secret";
const GAP: Duration = Duration::from_millis(300);
const STAMP_TIMEOUT: Duration = Duration::from_secs(20);

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let repos = estate(ctx.sizes.reaction_repos);
    let fake = ctx.rt.block_on(FakeGitHub::start(&repos, 1_000_000))?;
    let dir = tempfile::Builder::new()
        .prefix("sentry-bench-react-")
        .tempdir()?;
    let stamps = dir.path().join("stamps.txt");
    let qa = tiny_qa_repo(dir.path())?;
    let command = format!("date +%s%N >> '{}'", stamps.display());
    let yaml = workload::sentry_yaml(
        &repos,
        &ConfigOptions {
            api_url: fake.url(),
            polling_interval: "1h",
            dir: dir.path(),
            qa_repo: &qa,
            command: &command,
            webhook_secret: Some(SECRET),
            server: true,
        },
    );
    let config = dir.path().join("sentry.yaml");
    std::fs::write(&config, yaml)?;

    let mut sentry = Sentry::watch(dir.path(), &config, &["--listen", "127.0.0.1:0"])?;
    let addr = sentry.wait_listening(Duration::from_secs(30))?;
    sentry.next_cycle(Duration::from_secs(180))?;
    let url = format!("http://{addr}/webhooks/github");
    let client = reqwest::Client::new();

    let mut reactions = Vec::new();
    let targets: Vec<&str> = repos
        .iter()
        .filter(|r| !r.pattern && r.watched.iter().any(|b| b == "main"))
        .map(|r| r.path.as_str())
        .collect();
    ensure!(!targets.is_empty(), "no repository watches main");
    for push in 0..ctx.sizes.reaction_pushes {
        let repo = targets[push % targets.len()];
        let sha = fake.move_branch(repo, "main").context("no such branch")?;
        let body = payload(repo, &sha);
        let signature = sign(&body);
        let sent = now_ns();
        let status = ctx.rt.block_on(
            client
                .post(&url)
                .header("x-github-event", "push")
                .header("x-hub-signature-256", signature)
                .header("content-type", "application/json")
                .body(body)
                .send(),
        )?;
        ensure!(
            status.status().as_u16() == 202,
            "webhook answered {}",
            status.status()
        );
        let started = wait_for_stamp(&stamps, push + 1, &sentry)?;
        reactions.push((started.saturating_sub(sent)) as f64 / 1e6);
        std::thread::sleep(GAP);
    }
    let (p50, p95) = (median(&reactions), percentile(&reactions, 95.0));
    report.judged(
        "6 reaction",
        format!(
            "signed webhook → deploy command started ({} pushes)",
            reactions.len()
        ),
        format!("p50 {} ms, p95 {} ms", num(p50), num(p95)),
        format!("p50 ≤ {MAX_P50_MS} ms"),
        p50 <= MAX_P50_MS,
    );
    report.detail(
        "reaction",
        json!({ "pushes": reactions.len(), "p50_ms": p50, "p95_ms": p95, "ms": reactions }),
    );
    Ok(())
}

fn payload(repo: &str, sha: &str) -> Vec<u8> {
    json!({
        "ref": "refs/heads/main",
        "before": "0".repeat(40),
        "after": sha,
        "created": false,
        "deleted": false,
        "repository": {
            "full_name": repo,
            "clone_url": format!("https://github.com/{repo}.git"),
        },
    })
    .to_string()
    .into_bytes()
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Waits until the stamp file has `lines` lines; returns the last stamp (ns since epoch).
fn wait_for_stamp(path: &Path, lines: usize, sentry: &Sentry) -> Result<u64> {
    let deadline = Instant::now() + STAMP_TIMEOUT;
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let stamps: Vec<&str> = text.lines().collect();
        if stamps.len() >= lines {
            return stamps[lines - 1]
                .trim()
                .parse()
                .with_context(|| format!("bad stamp {:?}", stamps[lines - 1]));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!(
        "no deploy started within {STAMP_TIMEOUT:?}\n{}",
        sentry.tail_text()
    )
}
