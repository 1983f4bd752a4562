//! `sentry watch` end to end: real local Git repositories (`repo_type: git`), a QA repo
//! whose command appends what it was given to a log file, and the real binary.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::{
    Background, TempDir, commit, git, init_repo, lines_of, qa_repo, run, sentry, tempdir,
    wait_until, write,
};

/// Records one line per unit: repo branch sha previous trigger.
const DEPLOY_SH: &str = "#!/bin/sh\nsleep \"${DEPLOY_SLEEP:-0}\"\necho \"$SENTRY_REPO_NAME $SENTRY_BRANCH $SENTRY_COMMIT_SHA ${SENTRY_PREVIOUS_SHA:-none} $SENTRY_TRIGGER\" >> \"$DEPLOY_LOG\"\n";

pub struct Fixture {
    pub dir: TempDir,
    pub watched: PathBuf,
    pub log: PathBuf,
    pub config: PathBuf,
}

impl Fixture {
    /// One watched repository `app` (branches: main and `release/*`) in group `g`.
    pub fn new(extra_top: &str, deploy_sleep: u32) -> Fixture {
        let dir = tempdir();
        let root = dir.path().to_owned();
        let watched = init_repo(&root.join("app"));
        let qa = qa_repo(&root.join("qa"), DEPLOY_SH);
        let log = root.join("deploys.log");
        let yaml = format!(
            "polling_interval: 1s\nstate_file: {root}/state/state.json\nwork_dir: {root}/work\nshutdown_grace: 2s\n\
             audit_log: {root}/state/audit.jsonl\n{extra_top}\
             groups:\n  g:\n    execution_strategy: sequential\n\
             repositories:\n  - name: app\n    group: g\n    monitor:\n      repo_url: file://{watched}\n      branches: [main, \"release/*\"]\n      repo_type: git\n\
             \x20   deploy:\n      qa_repo_url: file://{qa}\n      qa_repo_branch: main\n      commands: [\"./deploy.sh\"]\n      env: {{DEPLOY_LOG: \"{log}\", DEPLOY_SLEEP: \"{deploy_sleep}\"}}\n",
            root = root.display(),
            watched = watched.display(),
            qa = qa.display(),
            log = log.display(),
        );
        let config = write(&root, "sentry.yaml", &yaml);
        Fixture {
            dir,
            watched,
            log,
            config,
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn once(&self) -> crate::support::Run {
        run(sentry(self.root())
            .arg("-c")
            .arg(&self.config)
            .args(["watch", "--once"]))
    }

    pub fn watch(&self) -> Background {
        Background::spawn(sentry(self.root()).arg("-c").arg(&self.config).args([
            "watch",
            "--listen",
            "127.0.0.1:0",
        ]))
    }

    pub fn deploys(&self) -> Vec<String> {
        lines_of(&self.log)
    }

    pub fn state(&self) -> serde_json::Value {
        let text =
            std::fs::read_to_string(self.root().join("state/state.json")).expect("state file");
        serde_json::from_str(&text).expect("state parses")
    }
}

#[test]
fn first_cycle_is_a_baseline_then_moves_deploy_once() {
    let f = Fixture::new("server: {enabled: false}\n", 0);
    let first = f.once();
    assert_eq!(first.code, Some(0), "{first:?}");
    assert!(f.deploys().is_empty(), "baseline deployed something");
    let old = git(&f.watched, &["rev-parse", "HEAD"]);

    // A move while Sentry is not running is deployed by the next start, exactly once.
    let new = commit(&f.watched, "second");
    let second = f.once();
    assert_eq!(second.code, Some(0), "{second:?}");
    assert_eq!(f.deploys(), [format!("app main {new} {old} poll")]);
    assert_eq!(
        f.state()["repositories"]["app"]["branches"]["main"]["sha"],
        new.as_str()
    );
    assert_eq!(
        f.state()["repositories"]["app"]["branches"]["main"]["last_deploy"]["result"],
        "succeeded"
    );

    let third = f.once();
    assert_eq!(third.code, Some(0));
    assert_eq!(
        f.deploys().len(),
        1,
        "an unchanged branch was deployed again"
    );
}

#[test]
fn new_branch_under_a_pattern_deploys_with_empty_previous() {
    let f = Fixture::new("server: {enabled: false}\n", 0);
    git(&f.watched, &["branch", "release/1.0"]);
    assert_eq!(f.once().code, Some(0));
    assert!(f.deploys().is_empty());
    git(&f.watched, &["branch", "release/2.0"]);
    git(&f.watched, &["branch", "feature/x"]);
    assert_eq!(f.once().code, Some(0));
    let head = git(&f.watched, &["rev-parse", "HEAD"]);
    assert_eq!(f.deploys(), [format!("app release/2.0 {head} none poll")]);
    // A vanished pattern branch is dropped from state, and deploys nothing.
    git(&f.watched, &["branch", "-D", "release/1.0"]);
    assert_eq!(f.once().code, Some(0));
    assert!(
        f.state()["repositories"]["app"]["branches"]
            .get("release/1.0")
            .is_none()
    );
    assert_eq!(f.deploys().len(), 1);
}

#[test]
fn failed_deploy_exits_1_with_once_and_still_advances() {
    let f = Fixture::new("server: {enabled: false}\n", 0);
    assert_eq!(f.once().code, Some(0));
    let new = commit(&f.watched, "second");
    // Make the QA command fail through its environment: an unwritable log path.
    let text = std::fs::read_to_string(&f.config)
        .unwrap()
        .replace(&f.log.display().to_string(), "/nonexistent/dir/log");
    std::fs::write(&f.config, text).unwrap();
    let out = f.once();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(
        f.state()["repositories"]["app"]["branches"]["main"]["sha"],
        new.as_str()
    );
    assert_eq!(
        f.state()["repositories"]["app"]["branches"]["main"]["last_deploy"]["result"],
        "failed"
    );
}

#[test]
fn unreachable_repository_makes_once_exit_1_without_state_change() {
    let f = Fixture::new("server: {enabled: false}\n", 0);
    assert_eq!(f.once().code, Some(0));
    let before = f.state();
    std::fs::rename(&f.watched, f.root().join("moved")).unwrap();
    let out = f.once();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(f.state(), before);
    assert!(f.deploys().is_empty());
}

#[test]
fn corrupt_state_file_is_a_startup_error() {
    let f = Fixture::new("server: {enabled: false}\n", 0);
    write(f.root(), "state/state.json", "{ not json");
    let out = f.once();
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("state.json") && out.stderr.contains("corrupt"),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::read_to_string(f.root().join("state/state.json")).unwrap(),
        "{ not json"
    );
}

#[test]
fn sigterm_stops_an_idle_watch_within_a_second() {
    let f = Fixture::new("", 0);
    let mut bg = f.watch();
    bg.wait_for_line("cycle:", Duration::from_secs(30));
    let sent = Instant::now();
    bg.signal(Signal::SIGTERM);
    let code = bg.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", bg.log());
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "took {:?}",
        sent.elapsed()
    );
    assert!(f.root().join("state/state.json").exists());
}

#[test]
fn moves_during_a_running_deploy_lead_to_one_more_run_with_the_newest_sha() {
    let f = Fixture::new("", 6);
    let mut bg = f.watch();
    bg.wait_for_line("cycle:", Duration::from_secs(30));
    let first = commit(&f.watched, "one");
    bg.wait_for_line(&format!("→ {}", &first[..8]), Duration::from_secs(30));
    // While the 6-second deploy of `first` runs, three more moves.
    let mut newest = String::new();
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(800));
        newest = commit(&f.watched, &format!("more {i}"));
    }
    let done = wait_until(Duration::from_secs(60), || {
        (f.deploys().len() >= 2).then_some(())
    });
    assert!(
        done.is_some(),
        "second run never came: {:?}\n{}",
        f.deploys(),
        bg.log()
    );
    std::thread::sleep(Duration::from_secs(3));
    let deploys = f.deploys();
    assert_eq!(deploys.len(), 2, "{deploys:?}");
    assert!(
        deploys[0].starts_with(&format!("app main {first} ")),
        "{deploys:?}"
    );
    assert!(
        deploys[1].starts_with(&format!("app main {newest} {first} ")),
        "{deploys:?}"
    );
    bg.signal(Signal::SIGTERM);
    assert_eq!(bg.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn status_prints_state_in_both_formats() {
    let f = Fixture::new("server: {enabled: false}\n", 0);
    assert_eq!(f.once().code, Some(0));
    let new = commit(&f.watched, "second");
    assert_eq!(f.once().code, Some(0));
    let text = run(sentry(f.root()).arg("-c").arg(&f.config).arg("status"));
    assert_eq!(text.code, Some(0));
    assert!(
        text.stdout.contains("REPOSITORY")
            && text.stdout.contains(&new[..8])
            && text.stdout.contains("succeeded"),
        "{}",
        text.stdout
    );
    let json = run(sentry(f.root())
        .arg("-c")
        .arg(&f.config)
        .args(["status", "--format", "json"]));
    let rows: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(rows[0]["repository"], "app");
    assert_eq!(rows[0]["sha"], new.as_str());
    assert_eq!(rows[0]["last_deploy"]["result"], "succeeded");
}

#[test]
fn audit_log_has_a_record_per_unit_and_group_run() {
    let f = Fixture::new("server: {enabled: false}\n", 0);
    assert_eq!(f.once().code, Some(0));
    let new = commit(&f.watched, "second");
    assert_eq!(f.once().code, Some(0));
    let records: Vec<serde_json::Value> = lines_of(&f.root().join("state/audit.jsonl"))
        .iter()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["kind"], "unit");
    assert_eq!(records[0]["sha"], new.as_str());
    assert_eq!(records[0]["trigger"], "poll");
    assert_eq!(records[0]["result"], "succeeded");
    assert_eq!(records[0]["exit_code"], 0);
    assert_eq!(records[1]["kind"], "group_run");
    assert_eq!(records[1]["run_id"], records[0]["run_id"]);
}
