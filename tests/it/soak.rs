//! Soak (ignored by default; `make soak`): 2,000 branches — 20 GitHub repositories with 100
//! branches each under the pattern `b/*` — polled every second for `SENTRY_SOAK_SECS`
//! (default 600) against a fake forge with ETags, where 1 % of the branches move per cycle
//! and 1 % of the answers are `500`s. Warm-up lasts until every branch has moved (and been
//! deployed) once, so the state holds its full size. Afterwards: resident memory grew by at
//! most 2 MiB and the number of open file descriptors other than TCP connections did not
//! grow (both compared between the first minute after warm-up and the last), TCP
//! connections stayed within the HTTP pool's bound (2 × `max_requests_per_host`), and
//! every move was deployed exactly once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::{Background, FakeForge, FakeReply, git, lines_of, sentry, tempdir, write};

const REPOS: usize = 20;
const BRANCHES: usize = 100;
const MOVES_PER_CYCLE: usize = (REPOS * BRANCHES) / 100;
/// Requests in flight to the fake forge, and so pooled connections, at most.
const MAX_REQUESTS_PER_HOST: usize = 4;
/// Seconds the mover takes to move every branch once.
const SWEEP_SECS: u64 = (REPOS * BRANCHES / MOVES_PER_CYCLE) as u64;
/// A branch does not move again for this long, so no move is merged into a later one.
const COOLDOWN: Duration = Duration::from_secs(30);

struct Repo {
    version: u64,
    shas: Vec<String>,
    moved_at: Vec<Option<Instant>>,
}

fn sha_for(n: u64) -> String {
    format!("{n:040x}")
}

fn listing(repo: &Repo) -> String {
    let items: Vec<String> = repo
        .shas
        .iter()
        .enumerate()
        .map(|(i, sha)| format!(r#"{{"name":"b/{i:03}","commit":{{"sha":"{sha}","url":"x"}}}}"#))
        .collect();
    format!("[{}]", items.join(","))
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Open file descriptors of `pid`: (TCP connections, everything else). Connections come and
/// go with the HTTP pool (bounded by `max_requests_per_host`); the rest must stay flat.
fn fd_counts(pid: u32) -> Option<(usize, usize)> {
    let mut tcp_inodes = std::collections::HashSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        // Columns: sl local rem st tx:rx tr:when retrnsmt uid timeout inode …
        tcp_inodes.extend(
            text.lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(9).map(str::to_owned)),
        );
    }
    let (mut tcp, mut other) = (0, 0);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        let inode = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'));
        match inode {
            Some(inode) if tcp_inodes.contains(inode) => tcp += 1,
            _ => other += 1,
        }
    }
    Some((tcp, other))
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

#[test]
#[ignore = "soak: minutes long; run with `make soak` (SENTRY_SOAK_SECS sets the duration)"]
fn soak_2000_branches_no_growth_every_move_deployed_once() {
    let secs: u64 = std::env::var("SENTRY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let duration = Duration::from_secs(secs);
    // The mover first moves every branch once, in order (SWEEP_SECS), so that the state
    // holds a deployment record for each before memory is compared; then at random.
    let warmup = Duration::from_secs((SWEEP_SECS + 20).min(secs / 3));
    eprintln!("soak: {secs} s, warm-up {warmup:?}, {REPOS} repositories x {BRANCHES} branches");

    let dir = tempdir();
    let root = dir.path();
    let qa = root.join("qa");
    std::fs::create_dir_all(&qa).expect("qa");
    git(&qa, &["init", "-q"]);
    write(&qa, "README", "qa\n");
    git(&qa, &["add", "."]);
    git(&qa, &["commit", "-q", "-m", "qa"]);
    let log = root.join("deploys.log");

    let counter = Arc::new(AtomicU64::new(1));
    let repos: Arc<Mutex<Vec<Repo>>> = Arc::new(Mutex::new(
        (0..REPOS)
            .map(|_| Repo {
                version: 1,
                shas: (0..BRANCHES)
                    .map(|_| sha_for(counter.fetch_add(1, Ordering::SeqCst)))
                    .collect(),
                moved_at: vec![None; BRANCHES],
            })
            .collect(),
    ));
    let failures = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let forge = {
        let (repos, failures, requests) = (repos.clone(), failures.clone(), requests.clone());
        FakeForge::start(move |request| {
            let n = requests.fetch_add(1, Ordering::SeqCst);
            // 1 % of the answers fail (a fixed pattern, spread over the run).
            if n % 100 == 37 {
                failures.fetch_add(1, Ordering::SeqCst);
                return FakeReply::status(500, "text/plain", "flaky");
            }
            let index = request
                .target
                .split("/repos/octo/r")
                .nth(1)
                .and_then(|rest| rest.get(..2))
                .and_then(|n| n.parse::<usize>().ok());
            let repos = repos.lock().expect("repos");
            let Some(repo) = index.and_then(|i| repos.get(i)) else {
                return FakeReply::status(404, "application/json", r#"{"message":"Not Found"}"#);
            };
            let etag = format!("\"v{}\"", repo.version);
            if request.header("if-none-match") == Some(etag.as_str()) {
                return FakeReply::Http {
                    status: 304,
                    headers: vec![("etag".into(), etag)],
                    body: Vec::new(),
                };
            }
            FakeReply::json(&listing(repo)).with_header("etag", &etag)
        })
    };

    let mut yaml = format!(
        "polling_interval: 1s\ngithub_lookup: rest\nrequest_timeout: 10s\nmax_requests_per_host: {MAX_REQUESTS_PER_HOST}\nstate_file: {root}/state.json\nwork_dir: {root}/work\nshutdown_grace: 5s\nserver: {{enabled: false}}\ngroups:\n",
        root = root.display()
    );
    for i in 0..REPOS {
        yaml.push_str(&format!(
            "  g{i:02}: {{execution_strategy: parallel, max_parallel: 2}}\n"
        ));
    }
    yaml.push_str("repositories:\n");
    for i in 0..REPOS {
        yaml.push_str(&format!(
            "  - name: r{i:02}\n    group: g{i:02}\n    monitor: {{repo_url: \"https://github.com/octo/r{i:02}\", repo_type: github, api_url: \"{}\", branches: [\"b/*\"]}}\n    deploy: {{qa_repo_url: \"file://{}\", qa_repo_branch: main, commands: [\"echo \\\"$SENTRY_REPO_NAME $SENTRY_BRANCH $SENTRY_COMMIT_SHA\\\" >> {}\"]}}\n",
            forge.uri(),
            qa.display(),
            log.display()
        ));
    }
    let config = write(root, "sentry.yaml", &yaml);
    let mut bg = Background::spawn(sentry(root).arg("-c").arg(&config).arg("watch"));
    let pid = bg.child.id();
    bg.wait_for_line("cycle:", Duration::from_secs(60));

    // The mover: 1 % of the branches per second.
    let stop = Arc::new(AtomicBool::new(false));
    let moves: Arc<Mutex<Vec<(usize, usize, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let mover = {
        let (repos, stop, moves, counter) =
            (repos.clone(), stop.clone(), moves.clone(), counter.clone());
        std::thread::spawn(move || {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut sweep = 0..REPOS * BRANCHES;
            while !stop.load(Ordering::SeqCst) {
                {
                    let mut repos = repos.lock().expect("repos");
                    let mut moved = 0;
                    let mut tries = 0;
                    while moved < MOVES_PER_CYCLE && tries < 10_000 {
                        tries += 1;
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let (r, b) = match sweep.next() {
                            Some(n) => (n % REPOS, n / REPOS),
                            None => (
                                (x % REPOS as u64) as usize,
                                ((x >> 20) % BRANCHES as u64) as usize,
                            ),
                        };
                        let repo = &mut repos[r];
                        if repo.moved_at[b].is_some_and(|t| t.elapsed() < COOLDOWN) {
                            continue;
                        }
                        let sha = sha_for(counter.fetch_add(1, Ordering::SeqCst));
                        repo.shas[b] = sha.clone();
                        repo.moved_at[b] = Some(Instant::now());
                        repo.version += 1;
                        moves.lock().expect("moves").push((r, b, sha));
                        moved += 1;
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };

    let started = Instant::now();
    let mut samples: Vec<(Duration, u64, (usize, usize))> = Vec::new();
    while started.elapsed() < duration {
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            bg.child.try_wait().expect("wait").is_none(),
            "sentry died:\n{}",
            bg.log()
        );
        if let (Some(rss), Some(fds)) = (vm_rss_kib(pid), fd_counts(pid)) {
            samples.push((started.elapsed(), rss, fds));
        }
    }
    stop.store(true, Ordering::SeqCst);
    mover.join().expect("mover");
    let moves = moves.lock().expect("moves").clone();

    // Drain: every move deployed.
    let drained = crate::support::wait_until(Duration::from_secs(180), || {
        (lines_of(&log).len() >= moves.len()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    bg.signal(Signal::SIGTERM);
    let code = bg.wait_exit(Duration::from_secs(60));
    assert!(
        drained.is_some(),
        "not every move was deployed: {} of {}",
        lines_of(&log).len(),
        moves.len()
    );
    assert_eq!(code, Some(0), "exit");

    let mut deployed: HashMap<String, usize> = HashMap::new();
    for line in lines_of(&log) {
        *deployed.entry(line).or_default() += 1;
    }
    let mut problems = Vec::new();
    for (r, b, sha) in &moves {
        let line = format!("r{r:02} b/{b:03} {sha}");
        match deployed.remove(&line) {
            Some(1) => {}
            Some(n) => problems.push(format!("{line}: deployed {n} times")),
            None => problems.push(format!("{line}: never deployed")),
        }
    }
    for (line, n) in &deployed {
        problems.push(format!("{line}: deployed {n} times but never moved"));
    }
    problems.truncate(20);
    assert!(
        problems.is_empty(),
        "deployments are wrong:\n{}",
        problems.join("\n")
    );

    // Memory and file descriptors: the first minute after warm-up against the last.
    let window = Duration::from_secs(60).min((duration.saturating_sub(warmup)) / 3);
    let early: Vec<&(Duration, u64, (usize, usize))> = samples
        .iter()
        .filter(|(t, ..)| *t >= warmup && *t < warmup + window)
        .collect();
    let late: Vec<&(Duration, u64, (usize, usize))> = samples
        .iter()
        .filter(|(t, ..)| *t + window >= duration)
        .collect();
    assert!(
        !early.is_empty() && !late.is_empty(),
        "too few samples: {samples:?}"
    );
    let rss_early = median(&mut early.iter().map(|s| s.1).collect::<Vec<_>>());
    let rss_late = median(&mut late.iter().map(|s| s.1).collect::<Vec<_>>());
    // Deploy commands open pipes for a moment: the fewest in a window is the baseline.
    let fds_early = early.iter().map(|s| s.2.1).min().unwrap_or(0);
    let fds_late = late.iter().map(|s| s.2.1).min().unwrap_or(0);
    let connections_max = samples.iter().map(|s| s.2.0).max().unwrap_or(0);
    let trajectory: Vec<String> = samples
        .iter()
        .step_by(5)
        .map(|(t, rss, (tcp, other))| format!("{}s:{}KiB/{}fd+{}tcp", t.as_secs(), rss, other, tcp))
        .collect();
    eprintln!("soak: samples {}", trajectory.join(" "));
    let log_text = bg.log();
    let cycles = log_text.lines().filter(|l| l.contains("cycle:")).count();
    eprintln!(
        "soak: {} moves deployed once each, {} requests ({} failed on purpose), {cycles} cycles; \
         RSS {rss_early} KiB -> {rss_late} KiB, fds other than TCP {fds_early} -> {fds_late}, \
         TCP connections at most {connections_max}",
        moves.len(),
        requests.load(Ordering::SeqCst),
        failures.load(Ordering::SeqCst),
    );
    assert!(
        rss_late <= rss_early + 2048,
        "memory grew by {} KiB (limit 2048)",
        rss_late.saturating_sub(rss_early)
    );
    assert!(
        fds_late <= fds_early,
        "file descriptors grew: {fds_early} -> {fds_late}"
    );
    // A connection either carries one of at most N requests or idles in a pool of at most N.
    assert!(
        connections_max <= 2 * MAX_REQUESTS_PER_HOST,
        "{connections_max} TCP connections open at once; at most {} are possible",
        2 * MAX_REQUESTS_PER_HOST
    );
    assert!(!log_text.contains("panicked"));
}
