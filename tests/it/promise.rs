//! The delivery promise end to end: no change lost when a unit cannot run (QA host down,
//! checkout directory unusable, skipped after a failure), one writer per state file, and
//! manual runs audited with the real user. Real binary, real local Git repositories.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::{
    Background, TempDir, commit, git, init_repo, lines_of, qa_repo, run, sentry, tempdir,
    wait_until, write,
};

/// Appends `repo branch sha trigger` per unit; fails while `$FAIL_FLAG` exists.
const DEPLOY_SH: &str = "#!/bin/sh\nif [ -e \"$FAIL_FLAG\" ]; then echo \"failing on purpose\"; exit 3; fi\necho \"$SENTRY_REPO_NAME $SENTRY_BRANCH $SENTRY_COMMIT_SHA $SENTRY_TRIGGER\" >> \"$DEPLOY_LOG\"\n";

const LONG: Duration = Duration::from_secs(60);

/// Two watched repositories `a` and `b` in one sequential group `g`, each deployed with
/// the QA repository at `qa` (a's may point elsewhere).
struct Fixture {
    dir: TempDir,
    a: PathBuf,
    b: PathBuf,
    qa: PathBuf,
    log: PathBuf,
    fail_flag: PathBuf,
    config: PathBuf,
}

impl Fixture {
    fn new(a_qa: Option<&str>, pending_retry_initial: &str) -> Fixture {
        let dir = tempdir();
        let root = dir.path().to_owned();
        let a = init_repo(&root.join("a"));
        let b = init_repo(&root.join("b"));
        let qa = qa_repo(&root.join("qa"), DEPLOY_SH);
        let log = root.join("deploys.log");
        let fail_flag = root.join("fail-a");
        let a_qa = a_qa.map_or_else(
            || qa.display().to_string(),
            |p| root.join(p).display().to_string(),
        );
        let deploy = |qa_url: &str, flag: &str| {
            format!(
                "    deploy:\n      qa_repo_url: file://{qa_url}\n      qa_repo_branch: main\n      commands: [\"./deploy.sh\"]\n      env: {{DEPLOY_LOG: \"{}\", FAIL_FLAG: \"{flag}\"}}\n",
                log.display()
            )
        };
        let yaml = format!(
            "polling_interval: 1s\nstate_file: {root}/state/state.json\nwork_dir: {root}/work\nshutdown_grace: 2s\n\
             audit_log: {root}/state/audit.jsonl\npending_retry: {{initial: {pending_retry_initial}, max: 8s}}\n\
             groups:\n  g:\n    execution_strategy: sequential\n\
             repositories:\n\
             \x20 - name: a\n    group: g\n    monitor: {{repo_url: \"file://{a}\", branches: [main], repo_type: git}}\n{deploy_a}\
             \x20 - name: b\n    group: g\n    monitor: {{repo_url: \"file://{b}\", branches: [main], repo_type: git}}\n{deploy_b}",
            root = root.display(),
            a = a.display(),
            b = b.display(),
            deploy_a = deploy(&a_qa, &fail_flag.display().to_string()),
            deploy_b = deploy(
                &qa.display().to_string(),
                &root.join("never").display().to_string()
            ),
        );
        let config = write(&root, "sentry.yaml", &yaml);
        Fixture {
            dir,
            a,
            b,
            qa,
            log,
            fail_flag,
            config,
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn sentry(&self) -> std::process::Command {
        let mut cmd = sentry(self.root());
        cmd.arg("-c").arg(&self.config);
        cmd
    }

    fn watch(&self) -> Background {
        Background::spawn(self.sentry().args(["watch", "--listen", "127.0.0.1:0"]))
    }

    fn state(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.root().join("state/state.json")).expect("state");
        serde_json::from_str(&text).expect("state json")
    }

    fn handled(&self, repo: &str) -> String {
        self.state()["repositories"][repo]["branches"]["main"]["sha"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Deploy log lines for `repo` at `sha`.
    fn deploys_of(&self, repo: &str, sha: &str) -> Vec<String> {
        lines_of(&self.log)
            .into_iter()
            .filter(|l| l.starts_with(&format!("{repo} main {sha} ")))
            .collect()
    }

    fn wait_for_deploy(&self, repo: &str, sha: &str) -> String {
        wait_until(LONG, || self.deploys_of(repo, sha).into_iter().next()).unwrap_or_else(|| {
            panic!(
                "{repo}@{sha} was never deployed; log: {:?}",
                lines_of(&self.log)
            )
        })
    }
}

#[test]
fn a_change_whose_qa_host_is_down_is_retried_and_deployed_when_it_returns() {
    let f = Fixture::new(Some("qa-down"), "1s");
    let before = git(&f.a, &["rev-parse", "HEAD"]);
    let bg = f.watch();
    bg.wait_for_line("baseline: a main", LONG);
    let moved = commit(&f.a, "second");
    bg.wait_for_line("a@main stays pending", LONG);
    // Pending, and never handled while the host is down, however many tries fail.
    let pending = wait_until(LONG, || {
        let state = f.state();
        let p = &state["repositories"]["a"]["pending"]["main"];
        (p["tries"].as_u64() >= Some(2)).then(|| p.clone())
    })
    .expect("a second try that could not run");
    assert_eq!(pending["sha"], moved.as_str(), "{pending}");
    assert!(
        pending["reason"].as_str().unwrap_or("").contains("qa-down"),
        "{pending}"
    );
    assert_eq!(
        f.handled("a"),
        before,
        "never handled while the clone fails"
    );
    assert!(f.deploys_of("a", &moved).is_empty());

    // The host comes back: the next retry deploys, with no new push.
    git(
        f.root(),
        &["clone", "-q", &f.qa.display().to_string(), "qa-down"],
    );
    let line = f.wait_for_deploy("a", &moved);
    assert!(line.ends_with(" retry"), "{line}");
    wait_until(LONG, || (f.handled("a") == moved).then_some(())).expect("handled after the deploy");
    assert!(
        f.state()["repositories"]["a"]["pending"]
            .get("main")
            .is_none()
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(f.deploys_of("a", &moved).len(), 1, "deployed once");
}

#[test]
fn a_unit_skipped_after_a_failure_stays_pending_and_is_deployed_by_the_next_run() {
    let f = Fixture::new(None, "6s");
    let baseline = run(f.sentry().args(["watch", "--once"]));
    assert_eq!(baseline.code, Some(0), "{baseline:?}");
    std::fs::write(&f.fail_flag, "").expect("fail flag");
    let a_new = commit(&f.a, "a moves");
    let b_new = commit(&f.b, "b moves");
    let b_before = f.handled("b");
    let bg = f.watch();
    bg.wait_for_line("b@main stays pending (skipped: a@main failed)", LONG);
    std::fs::remove_file(&f.fail_flag).expect("fail flag");

    let status = run(f.sentry().args(["status", "--format", "json"]));
    assert_eq!(status.code, Some(0), "{status:?}");
    let rows: serde_json::Value = serde_json::from_str(&status.stdout).expect("status json");
    let b = rows
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["repository"] == "b"))
        .expect("a row for b");
    assert_eq!(b["pending"]["sha"], b_new.as_str(), "{b}");
    assert_eq!(b["pending"]["reason"], "skipped: a@main failed", "{b}");
    assert_eq!(b["sha"], b_before.as_str(), "b is not handled yet: {b}");
    assert_eq!(f.handled("a"), a_new, "a's failure is an outcome: handled");

    let line = f.wait_for_deploy("b", &b_new);
    assert!(line.ends_with(" retry"), "{line}");
    wait_until(LONG, || (f.handled("b") == b_new).then_some(())).expect("b handled");
    assert!(
        f.deploys_of("a", &a_new).is_empty(),
        "a is not deployed again"
    );
}

#[test]
fn a_failure_before_the_first_command_is_pending_and_retried_not_handled() {
    let f = Fixture::new(None, "1s");
    let before = git(&f.a, &["rev-parse", "HEAD"]);
    let bg = f.watch();
    bg.wait_for_line("baseline: a main", LONG);
    // The checkout directory cannot be created: a file stands where work_dir should be.
    let work = f.root().join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::write(&work, "not a directory").expect("block work_dir");
    let moved = commit(&f.a, "second");
    bg.wait_for_line(
        "a@main stays pending (cannot create a checkout directory",
        LONG,
    );
    assert_eq!(f.handled("a"), before);
    std::fs::remove_file(&work).expect("unblock work_dir");
    let line = f.wait_for_deploy("a", &moved);
    assert!(line.ends_with(" retry"), "{line}");
    wait_until(LONG, || (f.handled("a") == moved).then_some(())).expect("handled");
}

#[test]
fn a_second_watch_on_the_same_state_exits_2_at_once_and_the_first_deploys_once() {
    let f = Fixture::new(None, "1s");
    let first = f.watch();
    first.wait_for_line("baseline: b main", LONG);
    let started = Instant::now();
    let second = run(f.sentry().args(["watch", "--listen", "127.0.0.1:0"]));
    let took = started.elapsed();
    assert_eq!(second.code, Some(2), "{second:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        second.stderr.contains("state.json.lock"),
        "{}",
        second.stderr
    );
    assert!(
        second.stderr.contains(&format!("pid {}", first.child.id())),
        "names the holder: {}",
        second.stderr
    );
    let once = run(f.sentry().args(["watch", "--once"]));
    assert_eq!(once.code, Some(2), "watch --once is a writer too: {once:?}");
    // Readers keep working beside the writer.
    assert_eq!(run(f.sentry().arg("status")).code, Some(0));

    let moved = commit(&f.b, "second");
    f.wait_for_deploy("b", &moved);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(f.deploys_of("b", &moved).len(), 1, "exactly once");
}

#[test]
fn trigger_audits_manual_runs_with_the_real_user() {
    let f = Fixture::new(None, "1s");
    let sha = git(&f.b, &["rev-parse", "HEAD"]);
    let out = run(f
        .sentry()
        .env("USER", "someone-else")
        .env_remove("SUDO_USER")
        .args(["trigger", "--repo", "b", "--sha", &sha]));
    assert_eq!(out.code, Some(0), "{out:?}");
    let whoami = std::process::Command::new("id")
        .arg("-un")
        .output()
        .expect("id -un");
    let user = String::from_utf8_lossy(&whoami.stdout).trim().to_owned();
    let records: Vec<serde_json::Value> = lines_of(&f.root().join("state/audit.jsonl"))
        .iter()
        .map(|l| serde_json::from_str(l).expect("audit json"))
        .collect();
    let kinds: Vec<&str> = records.iter().filter_map(|r| r["kind"].as_str()).collect();
    assert_eq!(kinds, ["unit", "group_run"], "{records:#?}");
    for r in &records {
        assert_eq!(r["trigger"], "manual", "{r}");
        assert_eq!(r["user"], user.as_str(), "{r}");
    }
    assert_eq!(records[0]["repository"], "b");
    assert_eq!(records[0]["result"], "succeeded");
}
