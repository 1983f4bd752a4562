//! Commit statuses and notifications end to end: the real binary (`watch`, `trigger`)
//! against fake GitHub and GitLab APIs that enforce the real rules
//! (`support::status_forge`), and webhook / Slack receivers on 127.0.0.1. The watched
//! SHAs are real commits of local repositories; the QA repository is a local `file://` one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::support::status_forge::StatusForge;
use crate::support::{
    Background, FakeForge, FakeReply, TempDir, commit, git, init_repo, lines_of, run, sentry,
    tempdir, wait_until, write,
};

const LONG: Duration = Duration::from_secs(60);
const TOKEN: &str = "forge-t0ken-value";

/// Waits while `$GATE` exists; fails while `$FAIL_FLAG` exists; logs `repo sha`.
const DEPLOY_SH: &str = "#!/bin/sh\nwhile [ -e \"$GATE\" ]; do sleep 0.1; done\nif [ -e \"$FAIL_FLAG\" ]; then echo \"failing on purpose\"; exit 3; fi\necho \"$SENTRY_REPO_NAME $SENTRY_COMMIT_SHA\" >> \"$DEPLOY_LOG\"\n";

/// Watched repositories (`a`, and `b` when asked) on one fake forge, in group `g`, with
/// commit statuses on, deployed by `deploy.sh` from a local QA repository.
struct Fixture {
    dir: TempDir,
    forge: StatusForge,
    /// A local repository whose commits give real SHAs.
    source: PathBuf,
    config: PathBuf,
    log: PathBuf,
    gate: PathBuf,
}

impl Fixture {
    fn new(forge: StatusForge, repos: &[&str], group: &str, commands: &str) -> Fixture {
        let dir = tempdir();
        let root = dir.path().to_owned();
        let source = init_repo(&root.join("source"));
        let qa = crate::support::qa_repo(&root.join("qa"), DEPLOY_SH);
        let log = root.join("deploys.log");
        let gate = root.join("gate");
        let mut yaml = format!(
            "polling_interval: 1s\nstate_file: {root}/state.json\nwork_dir: {root}/work\nshutdown_grace: 2s\n\
             pending_retry: {{initial: 1s, max: 2s}}\nserver: {{public_url: 'https://sentry.example.com/'}}\n\
             groups:\n  g:\n{group}    report: {{commit_status: true}}\nrepositories:\n",
            root = root.display()
        );
        for name in repos {
            let (url, api) = match forge.kind() {
                "github" => (format!("https://github.com/octo/{name}"), forge.api_url()),
                _ => (
                    format!("https://gitlab.example.com/grp/{name}"),
                    forge.api_url(),
                ),
            };
            yaml.push_str(&format!(
                "  - name: {name}\n    group: g\n    monitor:\n      repo_url: {url}\n      repo_type: {kind}\n      api_url: {api}\n      branches: [main]\n      auth: {{token: {TOKEN}}}\n\
                 \x20   deploy:\n      qa_repo_url: file://{qa}\n      qa_repo_branch: main\n      commands: [{commands}]\n\
                 \x20     env: {{DEPLOY_LOG: '{log}', GATE: '{gate}', FAIL_FLAG: '{root}/fail-{name}'}}\n",
                kind = forge.kind(),
                qa = qa.display(),
                log = log.display(),
                gate = gate.display(),
                root = root.display(),
            ));
        }
        let config = write(&root, "sentry.yaml", &yaml);
        Fixture {
            dir,
            forge,
            source,
            config,
            log,
            gate,
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn project(&self, name: &str) -> String {
        match self.forge.kind() {
            "github" => format!("octo/{name}"),
            _ => format!("grp/{name}"),
        }
    }

    /// A new real commit, made the head of `name`'s `main` on the fake forge.
    fn push(&self, name: &str, msg: &str) -> String {
        let sha = commit(&self.source, msg);
        self.forge.set_head(&self.project(name), &sha);
        sha
    }

    fn fail(&self, name: &str, failing: bool) {
        let flag = self.root().join(format!("fail-{name}"));
        if failing {
            write(self.root(), &format!("fail-{name}"), "");
        } else {
            let _ = std::fs::remove_file(flag);
        }
    }

    fn watch(&self) -> Background {
        let mut cmd = sentry(self.root());
        cmd.arg("-c").arg(&self.config).args([
            "--log-level",
            "debug",
            "watch",
            "--listen",
            "127.0.0.1:0",
        ]);
        Background::spawn(&mut cmd)
    }

    /// `watch` with every repository at a first commit, baselined.
    fn watch_from_baseline(&self, repos: &[&str]) -> Background {
        for name in repos {
            self.push(name, &format!("base {name}"));
        }
        let watch = self.watch();
        for name in repos {
            watch.wait_for_line(&format!("baseline: {name} main"), LONG);
        }
        watch
    }

    fn deployed(&self, name: &str, sha: &str) -> bool {
        lines_of(&self.log).contains(&format!("{name} {sha}"))
    }

    fn wait_deployed(&self, name: &str, sha: &str) {
        wait_until(LONG, || self.deployed(name, sha).then_some(()))
            .unwrap_or_else(|| panic!("{name}@{sha} never deployed: {:?}", lines_of(&self.log)));
    }

    /// What `watch` logs about a status, to check that nothing was refused.
    fn assert_no_refusals(&self) {
        assert!(
            self.forge.refused().is_empty(),
            "the forge refused: {:?}",
            self.forge.refused()
        );
    }
}

fn stop(mut watch: Background) -> String {
    watch.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(watch.wait_exit(LONG).is_some(), "watch did not stop");
    watch.log()
}

/// A unit that succeeds shows exactly `pending` then `success` on its commit, with the
/// group's context, the monitor's token and a link to the run.
fn success_shows_pending_then_success(forge: StatusForge) {
    let f = Fixture::new(forge, &["a"], "", "./deploy.sh");
    let watch = f.watch_from_baseline(&["a"]);
    let sha = f.push("a", "change");
    let states = f.forge.wait_states(&sha, 2, LONG);
    assert_eq!(states, ["pending", "success"]);
    // Nothing more arrives later.
    std::thread::sleep(Duration::from_millis(1500));
    let posts = f.forge.posts();
    assert_eq!(
        posts.len(),
        2,
        "only the changed commit gets statuses: {posts:?}"
    );
    for post in &posts {
        assert_eq!(post.project, f.project("a"));
        assert_eq!(post.context, "sentry/g");
        let url = post.target_url.as_deref().unwrap_or_default();
        assert!(url.starts_with("https://sentry.example.com/runs/"), "{url}");
        assert!(post.token.as_deref().unwrap_or_default().contains(TOKEN));
    }
    assert_eq!(posts[0].description, "Sentry: deploying to g");
    assert!(
        posts[1]
            .description
            .starts_with("Sentry: deployed to g in "),
        "{posts:?}"
    );
    if f.forge.kind() == "gitlab" {
        assert_eq!(posts[0].git_ref.as_deref(), Some("main"));
    }
    f.assert_no_refusals();
    assert!(f.deployed("a", &sha));
    stop(watch);
}

#[test]
fn github_success_shows_pending_then_success() {
    success_shows_pending_then_success(StatusForge::github());
}

#[test]
fn gitlab_success_shows_pending_then_success() {
    success_shows_pending_then_success(StatusForge::gitlab());
}

/// A failing unit shows `pending` then the forge's failure state; a description longer
/// than GitHub's 140 characters is cut rather than refused.
fn failure_shows_pending_then_failure(forge: StatusForge) {
    let long = format!("./deploy.sh --{}", "very-long-option-".repeat(10));
    let f = Fixture::new(forge, &["a"], "", &format!("'{long}'"));
    let watch = f.watch_from_baseline(&["a"]);
    f.fail("a", true);
    let sha = f.push("a", "breaks");
    let states = f.forge.wait_states(&sha, 2, LONG);
    assert_eq!(states, ["pending", f.forge.failure_state()]);
    let failure = &f.forge.posts_for(&sha)[1];
    assert!(
        failure
            .description
            .starts_with("Sentry: [1] ./deploy.sh --very-long"),
        "{failure:?}"
    );
    assert!(failure.description.contains("failed (exit 3)") || failure.description.ends_with('…'));
    assert!(failure.description.chars().count() <= 140 || f.forge.kind() == "gitlab");
    f.assert_no_refusals();
    stop(watch);
}

#[test]
fn github_failure_shows_pending_then_failure() {
    failure_shows_pending_then_failure(StatusForge::github());
}

#[test]
fn gitlab_failure_shows_pending_then_failed() {
    failure_shows_pending_then_failure(StatusForge::gitlab());
}

/// While `a`'s first change deploys, two more arrive: the middle one is queued, then
/// replaced by the last before it ran — it shows `error` (GitHub) / `canceled` (GitLab)
/// "superseded by …", and only the last one deploys.
fn superseded_unit_is_marked(forge: StatusForge) {
    let f = Fixture::new(forge, &["a"], "", "./deploy.sh");
    let watch = f.watch_from_baseline(&["a"]);
    write(f.root(), "gate", "");
    let first = f.push("a", "first");
    f.forge.wait_states(&first, 1, LONG);
    let middle = f.push("a", "middle");
    watch.wait_for_line("changes queued for the next run", LONG);
    let last = f.push("a", "last");
    let states = f.forge.wait_states(&middle, 1, LONG);
    std::fs::remove_file(&f.gate).unwrap();
    assert_eq!(states, [f.forge.superseded_state()]);
    let description = &f.forge.posts_for(&middle)[0].description;
    assert_eq!(
        description,
        &format!("Sentry: superseded by {}", &last[..7])
    );
    assert_eq!(f.forge.wait_states(&first, 2, LONG), ["pending", "success"]);
    assert_eq!(f.forge.wait_states(&last, 2, LONG), ["pending", "success"]);
    f.wait_deployed("a", &last);
    assert!(
        !f.deployed("a", &middle),
        "the superseded commit never deploys"
    );
    assert_eq!(f.forge.states_for(&middle), [f.forge.superseded_state()]);
    f.assert_no_refusals();
    stop(watch);
}

#[test]
fn github_superseded_unit_shows_error() {
    superseded_unit_is_marked(StatusForge::github());
}

#[test]
fn gitlab_superseded_unit_shows_canceled() {
    superseded_unit_is_marked(StatusForge::gitlab());
}

/// A unit whose QA repository cannot be cloned shows `error` and is deferred; a newer
/// commit of its branch then takes its place (the scheduler's deferred path), which shows
/// on the old commit as superseded, and the newer one deploys once the QA repository exists.
#[test]
fn github_deferred_unit_replaced_by_a_newer_commit_is_superseded() {
    let f = Fixture::new(StatusForge::github(), &["a"], "", "./deploy.sh");
    let config = std::fs::read_to_string(&f.config).unwrap();
    let missing = f.root().join("qa-later");
    let qa_line = config
        .lines()
        .find(|l| l.contains("qa_repo_url"))
        .unwrap()
        .to_owned();
    let moved = config.replace(
        &qa_line,
        &format!("      qa_repo_url: file://{}", missing.display()),
    );
    std::fs::write(&f.config, moved).unwrap();
    let watch = f.watch_from_baseline(&["a"]);
    let old = f.push("a", "cannot run yet");
    wait_until(LONG, || {
        f.forge
            .posts_for(&old)
            .iter()
            .any(|p| p.state == "error" && p.description.starts_with("Sentry could not run it"))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no error status: {:?}", f.forge.posts()));
    let new = f.push("a", "newer");
    wait_until(LONG, || {
        (f.forge.posts_for(&old).last()?.description
            == format!("Sentry: superseded by {}", &new[..7]))
        .then_some(())
    })
    .unwrap_or_else(|| panic!("old commit not superseded: {:?}", f.forge.posts()));
    // Now the QA repository appears: the newer commit deploys and succeeds.
    let qa = f.root().join("qa");
    std::fs::rename(&qa, &missing).unwrap();
    f.wait_deployed("a", &new);
    let states = f.forge.wait_states(&new, 2, LONG);
    assert_eq!(
        states.last().map(String::as_str),
        Some("success"),
        "{states:?}"
    );
    assert!(!f.deployed("a", &old));
    assert_eq!(f.forge.posts_for(&old).last().unwrap().state, "error");
    f.assert_no_refusals();
    stop(watch);
}

/// Sequential group: `a` fails, so `b` is skipped and shows `pending` with the reason;
/// when the scheduler retries `b` it starts without posting `pending` again (GitLab would
/// answer 400) and ends `success`.
#[test]
fn gitlab_skipped_unit_stays_pending_without_repeating_it() {
    let f = Fixture::new(
        StatusForge::gitlab(),
        &["a", "b"],
        "    execution_strategy: sequential\n",
        "./deploy.sh",
    );
    let watch = f.watch_from_baseline(&["a", "b"]);
    f.fail("a", true);
    let a = f.push("a", "a breaks");
    let b = f.push("b", "b fine");
    assert_eq!(f.forge.wait_states(&a, 2, LONG), ["pending", "failed"]);
    let first = f.forge.wait_states(&b, 1, LONG);
    assert_eq!(first, ["pending"]);
    assert!(
        f.forge.posts_for(&b)[0]
            .description
            .contains("waiting to retry"),
        "{:?}",
        f.forge.posts_for(&b)
    );
    f.wait_deployed("b", &b);
    assert_eq!(f.forge.wait_states(&b, 2, LONG), ["pending", "success"]);
    f.assert_no_refusals();
    stop(watch);
}

/// The status POSTs are dropped for a while, then rate limited once (`403` with
/// `retry-after`): the deployment happens as if nothing were wrong, and the statuses
/// arrive, in order, once the forge takes them.
#[test]
fn an_unreachable_forge_changes_nothing_and_statuses_arrive_later() {
    let f = Fixture::new(StatusForge::github(), &["a"], "", "./deploy.sh");
    let watch = f.watch_from_baseline(&["a"]);
    f.forge.set_outage(true);
    let sha = f.push("a", "during outage");
    f.wait_deployed("a", &sha);
    let state: serde_json::Value = wait_until(LONG, || {
        let text = std::fs::read_to_string(f.root().join("state.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        (v["repositories"]["a"]["branches"]["main"]["sha"] == sha.as_str()).then_some(v)
    })
    .expect("the change is handled while the forge is down");
    assert_eq!(
        state["repositories"]["a"]["branches"]["main"]["last_deploy"]["result"],
        "succeeded"
    );
    assert!(f.forge.posts().is_empty());
    wait_until(LONG, || (f.forge.disturbed() >= 2).then_some(()))
        .expect("statuses were tried during the outage");
    f.forge.rate_limit_next();
    f.forge.set_outage(false);
    assert_eq!(f.forge.wait_states(&sha, 2, LONG), ["pending", "success"]);
    f.assert_no_refusals();
    let log = stop(watch);
    assert!(
        log.contains("rate limited"),
        "the 403 paused the host: {log}"
    );
    assert!(!log.contains(TOKEN), "the token never reaches the log");
}

/// `trigger` reports like `watch`, before it exits; `--no-report` posts nothing.
#[test]
fn trigger_posts_statuses_unless_no_report() {
    let f = Fixture::new(StatusForge::github(), &["a"], "", "./deploy.sh");
    let sha = commit(&f.source, "manual");
    let mut cmd = sentry(f.root());
    cmd.arg("-c")
        .arg(&f.config)
        .args(["trigger", "--repo", "a", "--sha", &sha]);
    let out = run(&mut cmd);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(f.forge.states_for(&sha), ["pending", "success"]);

    let other = commit(&f.source, "quiet");
    let mut cmd = sentry(f.root());
    cmd.arg("-c")
        .arg(&f.config)
        .args(["trigger", "--no-report", "--repo", "a", "--sha", &other]);
    let out = run(&mut cmd);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(f.deployed("a", &other));
    assert!(
        f.forge.states_for(&other).is_empty(),
        "{:?}",
        f.forge.posts()
    );
    assert_eq!(
        f.forge.server.count(),
        2,
        "no request at all with --no-report"
    );
}

// ---- notifications -------------------------------------------------------------------

const HOOK_SECRET: &str = "h00k-s3cret-value";

/// A receiver that records every POST and answers 200 (or `status`).
fn receiver(status: u16) -> FakeForge {
    FakeForge::start(move |_| FakeReply::status(status, "text/plain", "ok"))
}

/// A repository deployed by `trigger` (plain Git, no statuses) whose group notifies the
/// given targets (YAML list items).
fn notify_setup(targets: &str, commands: &str) -> (TempDir, PathBuf, String) {
    let dir = tempdir();
    let root = dir.path().to_owned();
    let watched = init_repo(&root.join("w"));
    let qa = init_repo(&root.join("qa"));
    let sha = git(&watched, &["rev-parse", "HEAD"]);
    let yaml = format!(
        "state_file: {root}/state.json\nwork_dir: {root}/work\nserver: {{enabled: false, public_url: 'https://sentry.example.com'}}\n\
         groups:\n  g:\n    notify:\n{targets}\
         repositories:\n  - name: app\n    group: g\n    monitor: {{repo_url: 'file://{w}', branches: [main], repo_type: git}}\n\
         \x20   deploy: {{qa_repo_url: 'file://{qa}', qa_repo_branch: main, commands: [{commands}]}}\n",
        root = root.display(),
        w = watched.display(),
        qa = qa.display(),
    );
    let config = write(&root, "sentry.yaml", &yaml);
    (dir, config, sha)
}

fn trigger(dir: &Path, config: &Path, sha: &str) -> crate::support::Run {
    let mut cmd = sentry(dir);
    cmd.env("HOOK_SECRET", HOOK_SECRET)
        .arg("-c")
        .arg(config)
        .args([
            "--log-level",
            "debug",
            "trigger",
            "--repo",
            "app",
            "--sha",
            sha,
        ]);
    run(&mut cmd)
}

fn json_body(request: &crate::support::FakeRequest) -> serde_json::Value {
    serde_json::from_slice(&request.body).expect("a JSON body")
}

#[test]
fn webhook_is_signed_and_describes_the_run() {
    let hook = receiver(200);
    let targets = format!(
        "      - {{type: webhook, url: '{}/hook?k=url-secret-part', secret: '${{HOOK_SECRET}}', on: [started, failure]}}\n",
        hook.uri()
    );
    let (dir, config, sha) = notify_setup(&targets, "'echo nope; exit 4'");
    let out = trigger(dir.path(), &config, &sha);
    assert_eq!(out.code, Some(1), "{out:?}");
    let requests = hook.requests();
    assert_eq!(requests.len(), 2, "started and failure: {requests:?}");
    for request in &requests {
        assert_eq!(request.method, "POST");
        assert_eq!(request.target, "/hook?k=url-secret-part");
        let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
        mac.update(&request.body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(
            request.header("x-sentry-signature"),
            Some(expected.as_str())
        );
        assert_eq!(request.header("content-type"), Some("application/json"));
    }
    let started = json_body(&requests[0]);
    assert_eq!(started["event"], "started");
    assert_eq!(started["units"][0]["status"], "running");
    let failure = json_body(&requests[1]);
    assert_eq!(failure["event"], "failure");
    assert_eq!(failure["group"], "g");
    assert_eq!(failure["trigger"], "manual");
    let run_id = failure["run_id"].as_str().unwrap();
    assert_eq!(
        failure["url"],
        format!("https://sentry.example.com/runs/{run_id}")
    );
    let unit = &failure["units"][0];
    assert_eq!(unit["repository"], "app");
    assert_eq!(unit["branch"], "main");
    assert_eq!(unit["sha"], sha.as_str());
    assert_eq!(unit["status"], "failed");
    assert_eq!(unit["exit_code"], 4);
    assert!(unit["duration_seconds"].as_f64().is_some());
    let all = out.all();
    assert!(!all.contains(HOOK_SECRET), "secret logged: {all}");
    assert!(!all.contains("url-secret-part"), "URL logged: {all}");
    assert!(
        all.contains("groups.g.notify[0]"),
        "targets are named by path: {all}"
    );
}

#[test]
fn slack_gets_a_readable_message_and_success_is_not_sent_by_default() {
    let slack = receiver(200);
    let quiet = receiver(200);
    let targets = format!(
        "      - {{type: slack, url: '{}/services/T0/B0/XYZ', on: [success]}}\n      - {{type: webhook, url: '{}/default'}}\n",
        slack.uri(),
        quiet.uri()
    );
    let (dir, config, sha) = notify_setup(&targets, "'true'");
    let out = trigger(dir.path(), &config, &sha);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        quiet.count(),
        0,
        "a webhook without `on` hears of failures and recoveries only"
    );
    let requests = slack.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(requests[0].header("x-sentry-signature").is_none());
    let body = json_body(&requests[0]);
    let text = body["text"].as_str().unwrap();
    assert!(text.contains("g deployment succeeded"), "{text}");
    let blocks = body["blocks"].as_array().unwrap();
    assert!(
        blocks
            .iter()
            .all(|b| b["type"] == "section" && b["text"]["type"] == "mrkdwn")
    );
    let headline = blocks[0]["text"]["text"].as_str().unwrap();
    assert!(
        headline.contains("*g*") && headline.contains("<https://sentry.example.com/runs/"),
        "{headline}"
    );
    let units = blocks[1]["text"]["text"].as_str().unwrap();
    assert!(
        units.contains(&format!("*app* `main` `{}`", &sha[..8])),
        "{units}"
    );
    assert!(units.contains("succeeded"), "{units}");
}

#[test]
fn a_refusing_receiver_does_not_change_the_run() {
    let hook = receiver(500);
    let targets = format!(
        "      - {{type: webhook, url: '{}/h', on: [success]}}\n",
        hook.uri()
    );
    let (dir, config, sha) = notify_setup(&targets, "'true'");
    let started = std::time::Instant::now();
    let out = trigger(dir.path(), &config, &sha);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("1 of 1 unit(s) succeeded"), "{out:?}");
    assert!(hook.count() >= 2, "5xx is retried");
    assert!(started.elapsed() < Duration::from_secs(40));
    assert!(
        out.stderr.contains("notification given up"),
        "{}",
        out.stderr
    );
}
