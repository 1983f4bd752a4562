//! The deploy library end to end with real Git: QA checkouts over smart HTTP (with a token)
//! and `file://`, the variables commands get, strategies, timeouts, process-group clean-up,
//! shutdown, and the removal of checkout directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sentry::testing::Sha;
use sentry::testing::Shutdown;
use sentry::testing::{Config, Env};
use sentry::testing::{
    DeployOptions, Deployer, GroupResult, GroupRun, Observers, RunObserver, RunRef, Trigger, Unit,
    UnitResult, UnitStatus,
};

use crate::support::git_http::GitHttpServer;
use crate::support::{commit, git, init_repo, tempdir};

const SHA_A: &str = "1111111111111111111111111111111111111111";
const SHA_B: &str = "2222222222222222222222222222222222222222";

/// A YAML single-quoted scalar: no escapes except `''`.
fn q(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// One repository of a test configuration.
struct Repo {
    name: String,
    qa_url: String,
    qa_branch: String,
    commands: Vec<String>,
    /// Extra `deploy:` keys, one `key: value` per entry.
    deploy_extra: Vec<String>,
}

fn repo(name: &str, qa_url: &str, commands: &[&str]) -> Repo {
    Repo {
        name: name.to_owned(),
        qa_url: qa_url.to_owned(),
        qa_branch: "main".to_owned(),
        commands: commands.iter().map(|c| (*c).to_owned()).collect(),
        deploy_extra: Vec::new(),
    }
}

impl Repo {
    fn with(mut self, line: &str) -> Repo {
        self.deploy_extra.push(line.to_owned());
        self
    }
}

/// A validated configuration with one group `g` holding `repos`.
fn config(work: &Path, group: &[(&str, &str)], grace: &str, repos: &[Repo]) -> Config {
    let mut y = format!(
        "work_dir: {}\nstate_file: {}\nshutdown_grace: {grace}\nserver:\n  enabled: false\ngroups:\n  g:\n",
        q(&work.join("work").to_string_lossy()),
        q(&work.join("state.json").to_string_lossy()),
    );
    for (key, value) in group {
        y.push_str(&format!("    {key}: {value}\n"));
    }
    y.push_str("repositories:\n");
    for r in repos {
        y.push_str(&format!(
            "  - name: {}\n    group: g\n    monitor:\n      repo_url: {}\n      branches: [main]\n      repo_type: git\n",
            r.name,
            q(&format!("file:///nonexistent/{}", r.name)),
        ));
        y.push_str(&format!(
            "    deploy:\n      qa_repo_url: {}\n      qa_repo_branch: {}\n      commands:\n",
            q(&r.qa_url),
            q(&r.qa_branch)
        ));
        for c in &r.commands {
            y.push_str(&format!("        - {}\n", q(c)));
        }
        for line in &r.deploy_extra {
            y.push_str(&format!("      {line}\n"));
        }
    }
    let loaded = sentry::testing::load_str(&y, &Env::fixed([("HOME", "/nonexistent")]));
    match loaded.config {
        Some(config) => config,
        None => panic!("test config invalid: {:?}\n{y}", loaded.diagnostics),
    }
}

fn sha(text: &str) -> Sha {
    Sha::parse(text).expect("sha")
}

fn unit(repository: &str, branch: &str, previous: Option<&str>, new: &str) -> Unit {
    Unit {
        repository: repository.to_owned(),
        branch: branch.to_owned(),
        previous_sha: previous.map(sha),
        sha: sha(new),
    }
}

fn units(names: &[&str]) -> Vec<Unit> {
    names.iter().map(|n| unit(n, "main", None, SHA_A)).collect()
}

/// An observer that records every unit result it hears of.
struct Recorder(Arc<Mutex<Vec<UnitResult>>>);

impl RunObserver for Recorder {
    fn unit_ended(&self, _run: RunRef<'_>, result: &UnitResult) {
        self.0.lock().expect("recorder").push(result.clone());
    }
}

fn recorder() -> (Observers, Arc<Mutex<Vec<UnitResult>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let observers = Observers::new(vec![Arc::new(Recorder(Arc::clone(&seen)))]);
    (observers, seen)
}

async fn run_with(
    config: Config,
    units: Vec<Unit>,
    options: DeployOptions,
    shutdown: &Shutdown,
) -> (GroupResult, Vec<UnitResult>) {
    let (hook, seen) = recorder();
    let deployer = Deployer::new(Arc::new(config), options);
    let run = GroupRun {
        group: "g".to_owned(),
        units,
        trigger: Trigger::Poll,
        run_id: "test-run".to_owned(),
    };
    let result = deployer.run_group(run, shutdown, &hook).await;
    let seen = seen.lock().expect("hook").clone();
    (result, seen)
}

async fn run(config: Config, units: Vec<Unit>) -> GroupResult {
    run_with(config, units, DeployOptions::default(), &Shutdown::new())
        .await
        .0
}

fn statuses(result: &GroupResult) -> Vec<UnitStatus> {
    result.units.iter().map(|u| u.status).collect()
}

/// A QA repository at `root/qa` with commits on `main` and a second branch `other`.
fn qa_repo(root: &Path) -> PathBuf {
    let qa = init_repo(&root.join("qa"));
    commit(&qa, "second");
    commit(&qa, "third");
    git(&qa, &["checkout", "-q", "-b", "other"]);
    commit(&qa, "on other");
    git(&qa, &["checkout", "-q", "main"]);
    qa
}

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// Names of Sentry's checkout entries left in the work dir.
fn leftovers(root: &Path) -> Vec<String> {
    match std::fs::read_dir(root.join("work")) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("sentry-checkout-"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether `pid` is gone: no such process, or a zombie nobody has reaped yet (dead all
/// the same; reaping orphans is the init process's job).
fn process_gone(pid: i32) -> bool {
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    match kill(Pid::from_raw(pid), None) {
        Err(nix::errno::Errno::ESRCH) => true,
        _ => std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true),
    }
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

const DEFAULT_GROUP: &[(&str, &str)] = &[("execution_strategy", "sequential")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_checkout_is_shallow_and_single_branch_with_a_token() {
    let root = tempdir();
    qa_repo(root.path());
    let server = GitHttpServer::start(root.path(), Some(("qa-bot", "tok-0123456789")))
        .await
        .expect("server");
    let out = root.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    let r = repo(
        "a",
        &server.url("qa"),
        &[
            "git rev-parse --is-shallow-repository > \"$OUT/shallow\"",
            "git for-each-ref --format='%(refname)' > \"$OUT/refs\"",
            "git rev-list --count HEAD > \"$OUT/count\"",
        ],
    )
    .with("auth: {username: qa-bot, token: tok-0123456789}")
    .with(&format!("env: {{OUT: {}}}", q(&out.to_string_lossy())));
    let result = run(
        config(root.path(), DEFAULT_GROUP, "1s", &[r]),
        units(&["a"]),
    )
    .await;
    assert_eq!(statuses(&result), [UnitStatus::Succeeded], "{result:#?}");
    assert_eq!(read(&out.join("shallow")), "true");
    assert_eq!(read(&out.join("count")), "1");
    let refs = read(&out.join("refs"));
    assert!(
        !refs.contains("other"),
        "only the QA branch is fetched: {refs}"
    );
    assert!(refs.contains("refs/remotes/origin/main"), "{refs}");
    assert!(
        server.requests() > server.unauthorized(),
        "authenticated requests were made"
    );
    assert!(leftovers(root.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_fails_fast_without_looping() {
    let root = tempdir();
    qa_repo(root.path());
    let server = GitHttpServer::start(root.path(), Some(("qa-bot", "tok-0123456789")))
        .await
        .expect("server");
    let canary = root.path().join("ran");
    let r = repo(
        "a",
        &server.url("qa"),
        &[&format!("touch {}", q(&canary.to_string_lossy()))],
    )
    .with("auth: {username: qa-bot, token: wrong-token-value}");
    let started = Instant::now();
    let result = run(
        config(root.path(), DEFAULT_GROUP, "1s", &[r]),
        units(&["a"]),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(statuses(&result), [UnitStatus::SetupFailed], "{result:#?}");
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    assert!(
        server.requests() <= 6,
        "{} requests: no retry loop",
        server.requests()
    );
    let tail = &result.units[0].output_tail;
    assert!(tail.contains("authentication"), "{tail}");
    assert!(
        !tail.contains("wrong-token-value"),
        "the token is masked: {tail}"
    );
    assert!(!canary.exists(), "no command runs without a checkout");
    assert!(leftovers(root.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_url_is_a_full_clone_of_the_qa_branch() {
    let root = tempdir();
    let qa = qa_repo(root.path());
    let out = root.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    let mut r = repo(
        "a",
        &file_url(&qa),
        &[
            "git rev-parse --is-shallow-repository > \"$OUT/shallow\"",
            "git rev-parse --abbrev-ref HEAD > \"$OUT/head\"",
            "git rev-list --count HEAD > \"$OUT/count\"",
        ],
    )
    .with(&format!("env: {{OUT: {}}}", q(&out.to_string_lossy())));
    r.qa_branch = "other".to_owned();
    let result = run(
        config(root.path(), DEFAULT_GROUP, "1s", &[r]),
        units(&["a"]),
    )
    .await;
    assert_eq!(statuses(&result), [UnitStatus::Succeeded], "{result:#?}");
    assert_eq!(read(&out.join("shallow")), "false");
    assert_eq!(read(&out.join("head")), "other");
    assert_eq!(read(&out.join("count")), "4");
}

fn env_lines(path: &Path) -> BTreeMap<String, String> {
    read(path)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_variables_reach_the_commands() {
    let root = tempdir();
    let qa = qa_repo(root.path());
    let out = root.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    let script = [
        "env | grep -E '^(SENTRY_|FROM_)' | sort > \"$OUT/$SENTRY_REPO_NAME.env\"",
        "cp \"$SENTRY_CHANGES_FILE\" \"$OUT/$SENTRY_REPO_NAME.changes.json\"",
        "pwd -P > \"$OUT/$SENTRY_REPO_NAME.pwd\"",
    ];
    let out_env = format!(
        "env: {{OUT: {}, FROM_DEPLOY: deploy-value}}",
        q(&out.to_string_lossy())
    );
    let repos = [
        repo("a", &file_url(&qa), &script)
            .with(&out_env)
            .with("project_name: proj-a"),
        repo("b", &file_url(&qa), &script).with(&out_env),
    ];
    let options = DeployOptions {
        extra_env: vec![("FROM_ENV_FILE".to_owned(), "file-value".to_owned())],
        ..DeployOptions::default()
    };
    let units = vec![
        unit("a", "main", Some(SHA_B), SHA_A),
        unit("b", "release/1.0", None, SHA_B),
    ];
    let (result, _) = run_with(
        config(root.path(), DEFAULT_GROUP, "1s", &repos),
        units,
        options,
        &Shutdown::new(),
    )
    .await;
    assert!(result.succeeded(), "{result:#?}");

    let a = env_lines(&out.join("a.env"));
    let expect = [
        ("SENTRY_GROUP", "g"),
        ("SENTRY_REPO_NAME", "a"),
        ("SENTRY_REPO_URL", "file:///nonexistent/a"),
        ("SENTRY_BRANCH", "main"),
        ("SENTRY_COMMIT_SHA", SHA_A),
        ("SENTRY_PREVIOUS_SHA", SHA_B),
        ("SENTRY_PROJECT_NAME", "proj-a"),
        ("SENTRY_TRIGGER", "poll"),
        ("SENTRY_RUN_ID", "test-run"),
        ("FROM_DEPLOY", "deploy-value"),
        ("FROM_ENV_FILE", "file-value"),
    ];
    for (key, value) in expect {
        assert_eq!(
            a.get(key).map(String::as_str),
            Some(value),
            "{key} in {a:#?}"
        );
    }
    let qa_dir = &a["SENTRY_QA_DIR"];
    assert!(
        !Path::new(qa_dir).exists(),
        "the checkout is gone after the unit"
    );
    assert!(Path::new(qa_dir).starts_with(root.path().join("work")));
    assert!(qa_dir.contains("sentry-checkout-test-run-a-"), "{qa_dir}");
    let pwd = read(&out.join("a.pwd"));
    assert!(
        pwd.ends_with(Path::new(qa_dir).file_name().unwrap().to_str().unwrap()),
        "{pwd} vs {qa_dir}"
    );
    let changes = &a["SENTRY_CHANGES_FILE"];
    assert!(
        !Path::new(changes).starts_with(qa_dir),
        "outside the checkout: {changes}"
    );

    let b = env_lines(&out.join("b.env"));
    assert_eq!(b["SENTRY_BRANCH"], "release/1.0");
    assert_eq!(b["SENTRY_PREVIOUS_SHA"], "");
    assert_eq!(
        b["SENTRY_PROJECT_NAME"], "b",
        "defaults to the repository name"
    );

    let json: serde_json::Value =
        serde_json::from_str(&read(&out.join("a.changes.json"))).expect("changes json");
    let units = json["units"].as_array().expect("units");
    assert_eq!(units.len(), 2, "{json:#}");
    assert_eq!(units[0]["repository"], "a");
    assert_eq!(units[0]["previous_sha"], SHA_B);
    assert_eq!(units[0]["sha"], SHA_A);
    assert_eq!(units[0]["repo_url"], "file:///nonexistent/a");
    assert_eq!(units[1]["branch"], "release/1.0");
    assert!(units[1]["previous_sha"].is_null());
    assert!(
        leftovers(root.path()).is_empty(),
        "changes files are removed too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_branch_name_runs_nothing() {
    let root = tempdir();
    let qa = qa_repo(root.path());
    let canary = root.path().join("p");
    let branch = format!("x;touch$IFS{}", canary.display());
    let out = root.path().join("branch.txt");
    let r = repo(
        "a",
        &file_url(&qa),
        &[&format!(
            "printf '%s' \"$SENTRY_BRANCH\" > {}",
            q(&out.to_string_lossy())
        )],
    );
    let result = run(
        config(root.path(), DEFAULT_GROUP, "1s", &[r]),
        vec![unit("a", &branch, None, SHA_A)],
    )
    .await;
    assert!(result.succeeded(), "{result:#?}");
    assert_eq!(std::fs::read_to_string(&out).expect("branch"), branch);
    assert!(!canary.exists(), "the branch name was executed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_parallel_two_never_runs_more_than_two() {
    let root = tempdir();
    let qa = qa_repo(root.path());
    let out = root.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    // Each unit marks itself running, records how many are, waits (bounded) until it has
    // company, records again, and unmarks itself.
    let script = "mkdir \"$OUT/running.$SENTRY_REPO_NAME\"; \
        count() { ls -d \"$OUT\"/running.* | wc -l; }; \
        echo $(count) >> \"$OUT/counts\"; \
        i=0; while [ $(count) -lt 2 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
        echo $(count) >> \"$OUT/counts\"; sleep 0.3; \
        echo $(count) >> \"$OUT/counts\"; \
        rmdir \"$OUT/running.$SENTRY_REPO_NAME\"";
    let env = format!("env: {{OUT: {}}}", q(&out.to_string_lossy()));
    let names = ["a", "b", "c", "d"];
    let repos: Vec<Repo> = names
        .iter()
        .map(|n| repo(n, &file_url(&qa), &[script]).with(&env))
        .collect();
    let group = [("execution_strategy", "parallel"), ("max_parallel", "2")];
    let result = run(config(root.path(), &group, "1s", &repos), units(&names)).await;
    assert!(result.succeeded(), "{result:#?}");
    let counts: Vec<usize> = read(&out.join("counts"))
        .lines()
        .map(|l| l.trim().parse().expect("count"))
        .collect();
    assert_eq!(counts.len(), 12, "{counts:?}");
    assert_eq!(
        counts.iter().max(),
        Some(&2),
        "never more than 2, and 2 at some point: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_runs_units_one_after_another_in_order() {
    let root = tempdir();
    let qa = qa_repo(root.path());
    let log = root.path().join("log");
    let script = format!(
        "echo \"start $SENTRY_REPO_NAME\" >> {0}; sleep 0.2; echo \"end $SENTRY_REPO_NAME\" >> {0}",
        q(&log.to_string_lossy())
    );
    let names = ["c", "a", "b"];
    let repos: Vec<Repo> = names
        .iter()
        .map(|n| repo(n, &file_url(&qa), &[&script]))
        .collect();
    let (result, seen) = run_with(
        config(root.path(), DEFAULT_GROUP, "1s", &repos),
        units(&names),
        DeployOptions::default(),
        &Shutdown::new(),
    )
    .await;
    assert!(result.succeeded(), "{result:#?}");
    assert_eq!(
        read(&log).lines().collect::<Vec<_>>(),
        ["start c", "end c", "start a", "end a", "start b", "end b"]
    );
    let hooked: Vec<&str> = seen.iter().map(|r| r.unit.repository.as_str()).collect();
    assert_eq!(
        hooked,
        ["c", "a", "b"],
        "the hook sees each unit as it ends"
    );
}

async fn with_a_failing_unit(continue_on_error: &str) -> (GroupResult, Vec<UnitResult>) {
    let root = tempdir();
    let qa = qa_repo(root.path());
    let repos = [
        repo("a", &file_url(&qa), &["echo a-ran"]),
        repo(
            "b",
            &file_url(&qa),
            &["echo b-ran", "exit 3", "echo not-reached"],
        ),
        repo("c", &file_url(&qa), &["echo c-ran"]),
    ];
    let group = [
        ("execution_strategy", "sequential"),
        ("continue_on_error", continue_on_error),
    ];
    let config = config(root.path(), &group, "1s", &repos);
    let out = run_with(
        config,
        units(&["a", "b", "c"]),
        DeployOptions::default(),
        &Shutdown::new(),
    )
    .await;
    assert!(leftovers(root.path()).is_empty());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_continue_on_error_units_after_a_failure_are_skipped() {
    let (result, seen) = with_a_failing_unit("false").await;
    assert_eq!(
        statuses(&result),
        [
            UnitStatus::Succeeded,
            UnitStatus::Failed,
            UnitStatus::Skipped
        ]
    );
    let b = &result.units[1];
    assert_eq!(b.exit_code, Some(3));
    assert!(
        b.output_tail.contains("b-ran") && !b.output_tail.contains("not-reached"),
        "{}",
        b.output_tail
    );
    assert_eq!(result.units[2].attempts, 0);
    assert!(!result.succeeded());
    assert_eq!(seen.len(), 3, "the hook hears about skipped units too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_continue_on_error_every_unit_runs() {
    let (result, _) = with_a_failing_unit("true").await;
    assert_eq!(
        statuses(&result),
        [
            UnitStatus::Succeeded,
            UnitStatus::Failed,
            UnitStatus::Succeeded
        ]
    );
    assert!(result.units[2].output_tail.contains("c-ran"));
    assert!(!result.succeeded());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_run_a_failed_unit_again() {
    let root = tempdir();
    let qa = qa_repo(root.path());
    let marker = root.path().join("once");
    let script = format!(
        "if [ -e {0} ]; then echo second; else touch {0}; echo first; exit 1; fi",
        q(&marker.to_string_lossy())
    );
    let r = repo("a", &file_url(&qa), &[&script]).with("retries: 2");
    let result = run(
        config(root.path(), DEFAULT_GROUP, "1s", &[r]),
        units(&["a"]),
    )
    .await;
    let a = &result.units[0];
    assert_eq!(a.status, UnitStatus::Succeeded, "{a:#?}");
    assert_eq!(a.attempts, 2);
    assert!(a.output_tail.contains("first") && a.output_tail.contains("second"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_timeout_kills_the_command_and_its_background_child() {
    let root = tempdir();
    let qa = qa_repo(root.path());
    let pid_file = root.path().join("child.pid");
    let script = format!(
        "sleep 300 & echo $! > {}; echo started; sleep 300",
        q(&pid_file.to_string_lossy())
    );
    let repos = [
        repo("a", &file_url(&qa), &[&script]),
        repo("b", &file_url(&qa), &["echo never"]),
    ];
    let group = [
        ("execution_strategy", "sequential"),
        ("global_timeout", "3s"),
    ];
    let started = Instant::now();
    let result = run(
        config(root.path(), &group, "1s", &repos),
        units(&["a", "b"]),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        statuses(&result),
        [UnitStatus::TimedOut, UnitStatus::Skipped],
        "{result:#?}"
    );
    let pid: i32 = read(&pid_file).parse().expect("pid");
    assert!(
        wait_until(Duration::from_secs(10), || process_gone(pid)),
        "background child {pid} outlived its unit"
    );
    assert!(
        leftovers(root.path()).is_empty(),
        "{:?}",
        leftovers(root.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_timeout_times_the_unit_out() {
    let root = tempdir();
    let qa = qa_repo(root.path());
    let r = repo("a", &file_url(&qa), &["echo before", "sleep 60"]).with("timeout: 1s");
    let started = Instant::now();
    let result = run(
        config(root.path(), DEFAULT_GROUP, "1s", &[r]),
        units(&["a"]),
    )
    .await;
    assert_eq!(statuses(&result), [UnitStatus::TimedOut]);
    assert_eq!(result.units[0].exit_code, None);
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_children_of_a_finished_command_do_not_outlive_the_unit() {
    let root = tempdir();
    let qa = qa_repo(root.path());
    let pid_file = root.path().join("child.pid");
    let script = format!(
        "sleep 300 > /dev/null 2>&1 & echo $! > {}; exit 0",
        q(&pid_file.to_string_lossy())
    );
    let r = repo("a", &file_url(&qa), &[&script]);
    let result = run(
        config(root.path(), DEFAULT_GROUP, "1s", &[r]),
        units(&["a"]),
    )
    .await;
    assert!(result.succeeded(), "{result:#?}");
    let pid: i32 = read(&pid_file).parse().expect("pid");
    assert!(
        wait_until(Duration::from_secs(10), || process_gone(pid)),
        "{pid} still runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_are_removed_after_success_failure_and_timeout_and_kept_on_request() {
    let root = tempdir();
    let qa = qa_repo(root.path());
    let group = [
        ("execution_strategy", "sequential"),
        ("global_timeout", "2s"),
    ];
    for command in ["true", "exit 1", "sleep 60"] {
        let r = repo("a", &file_url(&qa), &[command]);
        let result = run(config(root.path(), &group, "1s", &[r]), units(&["a"])).await;
        assert_eq!(result.units.len(), 1);
        assert!(
            leftovers(root.path()).is_empty(),
            "after {command:?}: {:?}",
            leftovers(root.path())
        );
    }
    let r = repo("a", &file_url(&qa), &["true"]);
    let config = config(root.path(), &group, "1s", &[r]);
    let options = DeployOptions {
        keep_workdir: true,
        ..DeployOptions::default()
    };
    let (result, _) = run_with(config.clone(), units(&["a"]), options, &Shutdown::new()).await;
    assert!(result.succeeded());
    assert_eq!(
        leftovers(root.path()).len(),
        2,
        "checkout and changes file are kept"
    );
    std::fs::write(root.path().join("work/unrelated"), "x").expect("write");
    let deployer = Deployer::new(Arc::new(config), DeployOptions::default());
    assert_eq!(deployer.sweep_work_dir().expect("sweep"), 2);
    assert!(leftovers(root.path()).is_empty());
    assert!(
        root.path().join("work/unrelated").exists(),
        "only Sentry's own entries are swept"
    );
}

/// Starts a group run in the background and waits until its first command is running.
async fn start_blocking_run(
    root: &Path,
    command: &str,
    grace: &str,
    shutdown: &Shutdown,
) -> tokio::task::JoinHandle<(GroupResult, Vec<UnitResult>)> {
    let qa = qa_repo(root);
    let ready = root.join("ready");
    let script = format!("echo ready > {}; {command}", q(&ready.to_string_lossy()));
    let repos = [
        repo("a", &file_url(&qa), &[&script]),
        repo("b", &file_url(&qa), &["echo never"]),
    ];
    let config = config(root, DEFAULT_GROUP, grace, &repos);
    let shutdown_for_run = shutdown.clone();
    let handle = tokio::spawn(async move {
        run_with(
            config,
            units(&["a", "b"]),
            DeployOptions::default(),
            &shutdown_for_run,
        )
        .await
    });
    let ready_seen =
        tokio::task::spawn_blocking(move || wait_until(Duration::from_secs(60), || ready.exists()))
            .await
            .expect("wait");
    assert!(ready_seen, "the command never started");
    handle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_deploy_cancels_it_after_a_grace_period() {
    let root = tempdir();
    let shutdown = Shutdown::new();
    let command = "trap 'echo got-term; exit 7' TERM; while :; do sleep 0.1; done";
    let handle = start_blocking_run(root.path(), command, "10s", &shutdown).await;
    shutdown.request();
    let (result, seen) = tokio::time::timeout(Duration::from_secs(60), handle)
        .await
        .expect("the run ends")
        .expect("join");
    assert_eq!(
        statuses(&result),
        [UnitStatus::Cancelled, UnitStatus::Cancelled],
        "{result:#?}"
    );
    assert!(
        result.units[0].output_tail.contains("got-term"),
        "the command got SIGTERM and time to react: {}",
        result.units[0].output_tail
    );
    assert_eq!(result.units[1].attempts, 0, "nothing new starts");
    assert_eq!(seen.len(), 2);
    assert!(leftovers(root.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_shutdown_kills_at_once() {
    let root = tempdir();
    let shutdown = Shutdown::new();
    // Ignores SIGTERM (and so do its children): only SIGKILL ends it.
    let command = "trap '' TERM; while :; do sleep 0.1; done";
    let handle = start_blocking_run(root.path(), command, "300s", &shutdown).await;
    shutdown.request();
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.force();
    let (result, _) = tokio::time::timeout(Duration::from_secs(60), handle)
        .await
        .expect("a forced stop does not wait for the 300s grace")
        .expect("join");
    assert_eq!(result.units[0].status, UnitStatus::Cancelled);
    assert!(leftovers(root.path()).is_empty());
}
