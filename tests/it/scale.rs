//! Scale (issue #20): ETag validators survive a restart, so a second `watch --once` on
//! unchanged branches costs no primary quota; the state files hold no token.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::support::{
    Background, FakeForge, FakeReply, http, qa_repo, run, sentry, tempdir, wait_until, write,
};

const TOKEN: &str = "ghp_SCALECANARY_7d3e1f0b9a";
const REPOS: usize = 6;
const BRANCHES: usize = 100;

fn sha_of(repo: usize, branch: usize, version: u32) -> String {
    format!(
        "{:040x}",
        (repo * 1_000 + branch) as u128 * 1_000 + u128::from(version)
    )
}

/// A fake GitHub answering `commits/refs/heads/bNNN` of `octo/rNN` with a SHA and a
/// per-branch ETag, `304` when `If-None-Match` matches.
fn fake_github(versions: Arc<Mutex<Vec<u32>>>) -> FakeForge {
    FakeForge::start(move |request| {
        let parse = || -> Option<(usize, usize)> {
            let rest = request.target.strip_prefix("/repos/octo/r")?;
            let (repo, rest) = rest.split_once('/')?;
            let branch = rest.strip_prefix("commits/refs/heads/b")?;
            Some((repo.parse().ok()?, branch.parse().ok()?))
        };
        let Some((repo, branch)) = parse().filter(|(r, b)| *r < REPOS && *b < BRANCHES) else {
            return FakeReply::status(404, "application/json", r#"{"message":"Not Found"}"#);
        };
        let version = versions.lock().expect("versions")[repo * BRANCHES + branch];
        let etag = format!("\"r{repo}b{branch}v{version}\"");
        let headers = vec![
            ("etag".to_owned(), etag.clone()),
            ("x-ratelimit-limit".to_owned(), "5000".to_owned()),
            ("x-ratelimit-remaining".to_owned(), "4000".to_owned()),
        ];
        if request.header("if-none-match") == Some(etag.as_str()) {
            return FakeReply::Http {
                status: 304,
                headers,
                body: Vec::new(),
            };
        }
        FakeReply::Http {
            status: 200,
            headers,
            body: sha_of(repo, branch, version).into_bytes(),
        }
    })
}

/// Requests that cost primary quota: authenticated and not answered `304`. The fake
/// answers 304 exactly when `If-None-Match` carries the current ETag.
fn counted(forge: &FakeForge, versions: &[u32], from: usize) -> usize {
    forge.requests()[from..]
        .iter()
        .filter(|r| r.header("authorization").is_some())
        .filter(|r| {
            let current = r
                .target
                .strip_prefix("/repos/octo/r")
                .and_then(|rest| rest.split_once('/'))
                .and_then(|(repo, rest)| {
                    let repo: usize = repo.parse().ok()?;
                    let branch: usize = rest.strip_prefix("commits/refs/heads/b")?.parse().ok()?;
                    let v = versions[repo * BRANCHES + branch];
                    Some(format!("\"r{repo}b{branch}v{v}\""))
                });
            r.header("if-none-match") != current.as_deref()
        })
        .count()
}

#[test]
fn second_watch_once_on_600_unchanged_branches_costs_no_primary_quota() {
    let dir = tempdir();
    let root = dir.path();
    let versions = Arc::new(Mutex::new(vec![1u32; REPOS * BRANCHES]));
    let forge = fake_github(versions.clone());
    qa_repo(&root.join("qa"), "#!/bin/sh\ntrue\n");
    let mut yaml = format!(
        // REST polling is what this measures (600 branches a minute would make `auto` try GraphQL).
        "polling_interval: 60s\ngithub_lookup: rest\nstate_file: {root}/state.json\nwork_dir: {root}/work\nserver: {{enabled: false}}\ngroups:\n  g: {{}}\nrepositories:\n",
        root = root.display()
    );
    let branches: Vec<String> = (0..BRANCHES).map(|b| format!("b{b:03}")).collect();
    for r in 0..REPOS {
        yaml.push_str(&format!(
            "  - name: r{r:02}\n    group: g\n    monitor: {{repo_url: \"https://github.com/octo/r{r:02}\", repo_type: github, api_url: \"{}\", branches: [{}], auth: {{token: \"${{FORGE_TOKEN}}\"}}}}\n    deploy: {{qa_repo_url: \"file://{root}/qa\", qa_repo_branch: main, commands: [\"true\"]}}\n",
            forge.uri(),
            branches.join(", "),
            root = root.display()
        ));
    }
    let config = write(root, "sentry.yaml", &yaml);
    let watch_once = || {
        run(sentry(root)
            .env("FORGE_TOKEN", TOKEN)
            .arg("-c")
            .arg(&config)
            .args(["watch", "--once"]))
    };

    let first = watch_once();
    assert_eq!(first.code, Some(0), "{}", first.all());
    let after_first = forge.count();
    let now = versions.lock().expect("versions").clone();
    assert_eq!(
        counted(&forge, &now, 0),
        REPOS * BRANCHES,
        "the first run asks every branch in full"
    );
    let validators = root.join("state.json.validators.json");
    assert!(validators.exists(), "validators persisted beside the state");

    let second = watch_once();
    assert_eq!(second.code, Some(0), "{}", second.all());
    let asked = forge.count() - after_first;
    assert_eq!(asked, REPOS * BRANCHES, "every branch is still checked");
    eprintln!(
        "first watch --once: {after_first} requests, {} counted; second: {asked} requests, {} counted",
        counted(&forge, &now, 0),
        counted(&forge, &now, after_first)
    );
    assert_eq!(
        counted(&forge, &now, after_first),
        0,
        "the second run costs no primary quota:\n{}",
        second.all()
    );
    assert!(
        second.all().contains("600 branches checked"),
        "{}",
        second.all()
    );

    // One branch moves: the third run asks it in full and sees the change.
    versions.lock().expect("versions")[3 * BRANCHES + 7] = 2;
    let before_third = forge.count();
    let third = watch_once();
    assert_eq!(third.code, Some(0), "{}", third.all());
    let now = versions.lock().expect("versions").clone();
    assert_eq!(counted(&forge, &now, before_third), 1, "{}", third.all());
    assert!(third.all().contains("1 changes"), "{}", third.all());

    // Nothing Sentry keeps holds the token.
    for entry in std::fs::read_dir(root).expect("dir").flatten() {
        let path = entry.path();
        if path.is_file() {
            let text = String::from_utf8_lossy(&std::fs::read(&path).expect("read")).into_owned();
            assert!(!text.contains(TOKEN), "{} holds the token", path.display());
        }
    }
    let text = std::fs::read_to_string(&validators).expect("validators");
    assert!(text.contains("r3b7v2"), "the new ETag is persisted");
}

#[test]
fn validators_of_a_repository_no_longer_configured_are_dropped() {
    let dir = tempdir();
    let root = dir.path();
    let versions = Arc::new(Mutex::new(vec![1u32; REPOS * BRANCHES]));
    let forge = fake_github(versions);
    let config_for = |repos: &[usize]| {
        let mut yaml = format!(
            "state_file: {root}/state.json\nwork_dir: {root}/work\nserver: {{enabled: false}}\ngroups:\n  g: {{}}\nrepositories:\n",
            root = root.display()
        );
        for r in repos {
            yaml.push_str(&format!(
                "  - name: r{r:02}\n    group: g\n    monitor: {{repo_url: \"https://github.com/octo/r{r:02}\", repo_type: github, api_url: \"{}\", branches: [b000, b001], auth: {{token: \"${{FORGE_TOKEN}}\"}}}}\n    deploy: {{qa_repo_url: \"file://{root}/qa\", qa_repo_branch: main, commands: [\"true\"]}}\n",
                forge.uri(),
                root = root.display()
            ));
        }
        write(root, "sentry.yaml", &yaml)
    };
    let watch_once = |config: &std::path::Path| {
        let out = run(sentry(root)
            .env("FORGE_TOKEN", TOKEN)
            .arg("-c")
            .arg(config)
            .args(["watch", "--once"]));
        assert_eq!(out.code, Some(0), "{}", out.all());
    };
    watch_once(&config_for(&[0, 1]));
    let validators = root.join("state.json.validators.json");
    let text = std::fs::read_to_string(&validators).expect("validators");
    assert!(text.contains("\"r01\""), "{text}");
    watch_once(&config_for(&[0]));
    let text = std::fs::read_to_string(&validators).expect("validators");
    assert!(text.contains("\"r00\""), "{text}");
    assert!(!text.contains("\"r01\""), "r01 is pruned: {text}");
}

/// A `watch` config of `repos` repositories × `branches` exact branches on `forge`, with
/// the server on a free port and a GitHub webhook secret; `extra` goes at the top.
fn watch_config(
    root: &std::path::Path,
    forge: &FakeForge,
    repos: usize,
    branches: usize,
    extra: &str,
) -> std::path::PathBuf {
    qa_repo(&root.join("qa"), "#!/bin/sh\ntrue\n");
    // REST pacing is what these measure (`auto` would try GraphQL at these rates first).
    let mut yaml = format!(
        "{extra}polling_interval: 1s\ngithub_lookup: rest\nstate_file: {root}/state.json\nwork_dir: {root}/work\nserver: {{listen: \"127.0.0.1:0\"}}\nwebhooks: {{github_secret: \"{WEBHOOK_SECRET}\"}}\ngroups:\n  g: {{}}\nrepositories:\n",
        root = root.display()
    );
    let names: Vec<String> = (0..branches).map(|b| format!("b{b:03}")).collect();
    for r in 0..repos {
        yaml.push_str(&format!(
            "  - name: r{r:02}\n    group: g\n    monitor: {{repo_url: \"https://github.com/octo/r{r:02}\", repo_type: github, api_url: \"{}\", branches: [{}], auth: {{token: \"${{FORGE_TOKEN}}\"}}}}\n    deploy: {{qa_repo_url: \"file://{root}/qa\", qa_repo_branch: main, commands: [\"true\"]}}\n",
            forge.uri(),
            names.join(", "),
            root = root.display()
        ));
    }
    write(root, "sentry.yaml", &yaml)
}

const WEBHOOK_SECRET: &str = "scale-webhook-secret";

/// Posts a signed GitHub push webhook for `octo/{repo}` `branch` → `after`; the HTTP status.
fn push_webhook(port: u16, repo: &str, branch: &str, after: &str, delivery: &str) -> u16 {
    let body = serde_json::json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "0".repeat(40),
        "after": after,
        "created": false,
        "deleted": false,
        "repository": {"full_name": format!("octo/{repo}"), "clone_url": format!("https://github.com/octo/{repo}.git")},
    })
    .to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let (code, _) = http(
        "POST",
        port,
        "/webhooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", delivery),
            ("X-Hub-Signature-256", &signature),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    );
    code
}

fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = http("GET", port, "/metrics", &[], b"");
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_sweep_beyond_the_budget_is_paced_and_the_interval_stretches() {
    let dir = tempdir();
    let root = dir.path();
    let forge = fake_github(Arc::new(Mutex::new(vec![1u32; REPOS * BRANCHES])));
    let host = forge.uri().trim_start_matches("http://").to_owned();
    // 30 branches, 10 points per 2 s window: a sweep needs 6.3 s (with the budget's
    // margin), not the 1 s interval.
    let config = watch_config(
        root,
        &forge,
        1,
        30,
        &format!("rate_limits:\n  \"{host}\": {{rest_points_per_minute: 10, window: 2s}}\n"),
    );
    let watch = Background::spawn(
        sentry(root)
            .env("FORGE_TOKEN", TOKEN)
            .arg("-c")
            .arg(&config)
            .arg("watch"),
    );
    let port = watch.http_port();
    let warned = watch.wait_for_line("cannot cover a sweep", Duration::from_secs(30));
    assert!(
        warned.contains("30 branches (30 points) every 1s: sweeping every 6s instead"),
        "{warned}"
    );
    // Three sweeps' worth of requests.
    wait_until(Duration::from_secs(60), || {
        (forge.count() >= 75).then_some(())
    })
    .unwrap_or_else(|| panic!("too few requests: {}\n{}", forge.count(), watch.log()));
    // 30 points at 10 per 2.1 s (the window and the budget's 5 % margin).
    let effective = metric(port, "sentry_sweep_effective_interval_seconds").unwrap_or_default();
    assert!((effective - 6.3).abs() < 0.01, "{effective}");
    let times: Vec<Instant> = forge.requests().iter().map(|r| r.at).collect();
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|t| t.duration_since(*start) < Duration::from_millis(1900))
            .count();
        assert!(
            in_window <= 10,
            "{in_window} requests within one 2 s window"
        );
    }
    assert_eq!(
        watch.log().matches("cannot cover a sweep").count(),
        1,
        "logged once"
    );
    assert!(
        metric(port, "sentry_request_budget_remaining{host=").is_some(),
        "budget metrics exposed"
    );
    assert_eq!(
        metric(port, "sentry_secondary_rate_limited_total"),
        None,
        "never throttled"
    );
    // The status API shows the budget and the effective interval too.
    let (_, body) = http("GET", port, "/api/v1/status", &[], b"");
    let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    let secs = status["effective_interval_secs"]
        .as_f64()
        .unwrap_or_default();
    assert!((secs - 6.3).abs() < 0.01, "{status}");
    let budget = &status["budgets"][0];
    assert_eq!(budget["host"], host.as_str(), "{status}");
    assert_eq!(
        (
            &budget["rest_limit"],
            &budget["window_secs"],
            &budget["throttled"]
        ),
        (
            &serde_json::json!(10),
            &serde_json::json!(2.0),
            &serde_json::json!(0)
        )
    );
    assert!(!body.contains(TOKEN));
}

#[test]
fn webhook_covered_repositories_are_polled_less_often() {
    let dir = tempdir();
    let root = dir.path();
    let forge = fake_github(Arc::new(Mutex::new(vec![1u32; REPOS * BRANCHES])));
    let config = watch_config(root, &forge, 2, 5, "webhook_poll_interval: 1h\n");
    let watch = Background::spawn(
        sentry(root)
            .env("FORGE_TOKEN", TOKEN)
            .arg("-c")
            .arg(&config)
            .arg("watch"),
    );
    let port = watch.http_port();
    watch.wait_for_line("cycle:", Duration::from_secs(30));
    let code = push_webhook(port, "r00", "b000", &sha_of(0, 0, 1), "scale-1");
    assert!((200..300).contains(&code), "{code}");
    let of = |repo: &str| {
        forge
            .requests()
            .iter()
            .filter(|r| r.target.starts_with(&format!("/repos/octo/{repo}/")))
            .count()
    };
    // The hint's own check of r00 comes first; then r00 waits an hour, r01 does not.
    std::thread::sleep(Duration::from_secs(2));
    let (r00, r01) = (of("r00"), of("r01"));
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        of("r00"),
        r00,
        "r00 is covered by webhooks:\n{}",
        watch.log()
    );
    assert!(
        of("r01") >= r01 + 3 * 5,
        "r01 is still polled every second: {} then {}",
        r01,
        of("r01")
    );
}

/// With `state.backend: kubernetes`, the validators live in ConfigMap
/// `<configmap>-validators`: the next leader's first sweep of 600 unchanged branches costs
/// no primary quota either.
#[test]
fn validators_in_configmaps_survive_a_failover() {
    use crate::support::fake_kube::FakeKube;
    let dir = tempdir();
    let root = dir.path();
    let versions = Arc::new(Mutex::new(vec![1u32; REPOS * BRANCHES]));
    let forge = fake_github(versions.clone());
    let host = forge.uri().trim_start_matches("http://").to_owned();
    // A budget that covers a sweep a second, so that sweeps are not spread over 40 s.
    let config = watch_config(
        root,
        &forge,
        REPOS,
        BRANCHES,
        &format!(
            "rate_limits: {{\"{host}\": {{rest_points_per_minute: 100000}}}}\n{}",
            "leader_election: {enabled: true, lease_name: sentry-leader, lease_duration: 3s, renew_deadline: 2s, retry_period: 500ms}\nstate: {backend: kubernetes, configmap: sentry-state}\n"
        ),
    );
    let kube = FakeKube::start(root, &["r1", "r2"]);
    let replica = |pod: &str| {
        Background::spawn(
            sentry(root)
                .env("FORGE_TOKEN", TOKEN)
                .env("POD_NAME", pod)
                .env("KUBECONFIG", kube.kubeconfig(pod))
                .env_remove("KUBERNETES_SERVICE_HOST")
                .arg("-c")
                .arg(&config)
                .arg("watch"),
        )
    };
    let mut r1 = replica("r1");
    let validators = wait_until(Duration::from_secs(60), || {
        let cm = kube.object("configmaps", "sentry-state-validators")?;
        let text = cm["data"]["state.json"].as_str()?.to_owned();
        let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
        (doc["entries"].as_array()?.len() == REPOS * BRANCHES).then_some(text)
    })
    .unwrap_or_else(|| panic!("no validators ConfigMap:\n{}", r1.log()));
    assert!(!validators.contains(TOKEN));
    r1.signal(nix::sys::signal::Signal::SIGKILL);
    r1.wait_exit(Duration::from_secs(5));
    let before = forge.count();
    let r2 = replica("r2");
    r2.wait_for_line("cycle:", Duration::from_secs(60));
    let now = versions.lock().expect("versions").clone();
    assert!(forge.count() - before >= REPOS * BRANCHES, "r2 swept");
    assert_eq!(
        counted(&forge, &now, before),
        0,
        "the new leader's first sweep costs no primary quota:\n{}",
        r2.log()
    );
}

/// A paced sweep spreads over most of the interval; a webhook that arrives meanwhile is
/// checked at once, not after the sweep (which would take 15 s more here).
#[test]
fn a_webhook_during_a_paced_sweep_is_checked_at_once() {
    let dir = tempdir();
    let root = dir.path();
    let versions = Arc::new(Mutex::new(vec![1u32; REPOS * BRANCHES]));
    let forge = fake_github(versions.clone());
    let config = watch_config(root, &forge, REPOS, 50, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("polling_interval: 1s", "polling_interval: 20s");
    std::fs::write(&config, text).unwrap();
    let watch = Background::spawn(
        sentry(root)
            .env("FORGE_TOKEN", TOKEN)
            .arg("-c")
            .arg(&config)
            .arg("watch"),
    );
    let port = watch.http_port();
    watch.wait_for_line("cycle:", Duration::from_secs(30));
    let of = |repo: &str| {
        forge
            .requests()
            .iter()
            .filter(|r| r.target.starts_with(&format!("/repos/octo/{repo}/")))
            .count()
    };
    // The second sweep has begun (r00 goes first); the last repository's turn is ~15 s away.
    let first = of("r00");
    wait_until(Duration::from_secs(40), || {
        (of("r00") > first).then_some(())
    })
    .unwrap_or_else(|| panic!("no second sweep\n{}", watch.log()));
    let last = format!("r{:02}", REPOS - 1);
    versions.lock().unwrap()[(REPOS - 1) * BRANCHES] = 2;
    let sent = Instant::now();
    let code = push_webhook(
        port,
        &last,
        "b000",
        &sha_of(REPOS - 1, 0, 2),
        "scale-paced-1",
    );
    assert!((200..300).contains(&code), "{code}");
    let needle = format!("change: {last} b000");
    wait_until(Duration::from_secs(30), || {
        watch.log().contains(&needle).then_some(())
    })
    .unwrap_or_else(|| panic!("the move was never seen\n{}", watch.log()));
    let waited = sent.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "the webhook's check waited {waited:?} for the sweep\n{}",
        watch.log()
    );
}
