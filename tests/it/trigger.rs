//! `sentry trigger` through the real binary, against local repositories (`repo_type: git`,
//! `file://`): exit codes, live output, masking, `--dry-run`, hostile branch names, and
//! SHAs resolved from the watched repository when `--sha` is not given.

use std::path::{Path, PathBuf};

use crate::support::{Run, TempDir, commit, init_repo, run, sentry, tempdir, write};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const SECRET: &str = "sup3r-s3cret-token-value";

/// A YAML single-quoted scalar.
fn q(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A temp dir with a QA repository, two watched repositories and a config whose
/// repositories `a` and `b` (group `g`) run the given commands.
struct Setup {
    dir: TempDir,
    config: PathBuf,
    watched: Vec<PathBuf>,
}

fn setup(group: &str, a: &[&str], b: &[&str]) -> Setup {
    let dir = tempdir();
    let root = dir.path();
    let qa = init_repo(&root.join("qa"));
    let watched = vec![init_repo(&root.join("wa")), init_repo(&root.join("wb"))];
    let mut y = format!(
        "work_dir: {}\nstate_file: {}\nshutdown_grace: 1s\nserver:\n  enabled: false\ngroups:\n  g:\n{group}\n  other:\n    execution_strategy: sequential\nrepositories:\n",
        q(&root.join("work").to_string_lossy()),
        q(&root.join("state.json").to_string_lossy()),
    );
    for (name, path, commands) in [("a", &watched[0], a), ("b", &watched[1], b)] {
        y.push_str(&format!(
            "  - name: {name}\n    group: g\n    monitor:\n      repo_url: {}\n      branches: [main]\n      repo_type: git\n      auth:\n        token: \"${{MY_TOKEN}}\"\n    deploy:\n      qa_repo_url: {}\n      qa_repo_branch: main\n      env:\n        TOKEN: \"${{MY_TOKEN}}\"\n      commands:\n",
            q(&format!("file://{}", path.display())),
            q(&format!("file://{}", qa.display())),
        ));
        for c in commands {
            y.push_str(&format!("        - {}\n", q(c)));
        }
    }
    let config = write(root, "sentry.yaml", &y);
    Setup {
        dir,
        config,
        watched,
    }
}

const SEQUENTIAL: &str = "    execution_strategy: sequential";

impl Setup {
    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn trigger(&self, args: &[&str]) -> Run {
        let mut cmd = sentry(self.root());
        cmd.env("MY_TOKEN", SECRET)
            .arg("-c")
            .arg(&self.config)
            .arg("trigger")
            .args(args);
        run(&mut cmd)
    }
}

#[test]
fn a_successful_trigger_streams_prefixed_output_and_exits_0() {
    let s = setup(
        SEQUENTIAL,
        &["echo hello from $SENTRY_REPO_NAME at $SENTRY_COMMIT_SHA"],
        &["true"],
    );
    let out = s.trigger(&["--repo", "a", "--sha", SHA]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("[a@main] hello from a at {SHA}")),
        "{}",
        out.stdout
    );
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with("g ") && l.contains("a@main"))
        .unwrap_or_else(|| panic!("no summary row: {}", out.stdout));
    assert!(row.contains("succeeded") && row.contains(" 0 "), "{row}");
    assert!(out.stdout.contains("STATUS") && out.stdout.contains("DURATION"));
}

#[test]
fn a_failed_unit_exits_1_and_shows_its_exit_code() {
    let s = setup(SEQUENTIAL, &["echo failing; exit 4"], &["true"]);
    let out = s.trigger(&["--repo", "a", "--sha", SHA]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let row = out
        .stdout
        .lines()
        .find(|l| l.contains("a@main ("))
        .unwrap_or_else(|| panic!("no summary row: {}", out.stdout));
    assert!(row.contains("failed") && row.contains(" 4 "), "{row}");
    assert!(
        row.contains("[1] echo failing; exit 4"),
        "the summary names the failing command: {row}"
    );
}

#[test]
fn usage_errors_exit_2_with_the_valid_names() {
    let s = setup(SEQUENTIAL, &["true"], &["true"]);
    let out = s.trigger(&["--repo", "nope", "--sha", SHA]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("\"nope\"") && out.stderr.contains("a, b"),
        "{}",
        out.stderr
    );

    let out = s.trigger(&["--group", "nogroup"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("g, other"), "{}", out.stderr);

    let out = s.trigger(&["--repo", "a", "--sha", "abc"]);
    assert_eq!(out.code, Some(2), "{out:?}");

    let out = s.trigger(&["--repo", "a", "--branch", "bad..name", "--sha", SHA]);
    assert_eq!(out.code, Some(2), "{out:?}");

    let out = s.trigger(&["--repo", "a", "--repo", "b", "--sha", SHA]);
    assert_eq!(out.code, Some(2), "one --sha for two repositories: {out:?}");
    assert!(!s.root().join("work").exists(), "nothing ran");
}

#[test]
fn secrets_in_command_output_are_masked() {
    let s = setup(
        SEQUENTIAL,
        &["echo \"token=$TOKEN\"", "echo \"again $TOKEN\" >&2"],
        &["true"],
    );
    let out = s.trigger(&["--repo", "a", "--sha", SHA]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("[a@main] token=***"), "{}", out.stdout);
    assert!(out.stdout.contains("[a@main] again ***"), "{}", out.stdout);
    assert!(
        !out.all().contains(SECRET),
        "the secret leaked: {}",
        out.all()
    );
}

#[test]
fn dry_run_prints_the_plan_and_runs_nothing() {
    let dir = tempdir();
    let canary = dir.path().join("canary");
    let touch = format!("touch {}", q(&canary.to_string_lossy()));
    let s = setup(SEQUENTIAL, &[&touch], &["true"]);
    let out = s.trigger(&["--repo", "a", "--sha", SHA, "--dry-run"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    for needle in [
        SHA,
        "SENTRY_COMMIT_SHA",
        "SENTRY_CHANGES_FILE",
        "TOKEN",
        "sequential",
        &touch,
        "Group g",
    ] {
        assert!(
            out.stdout.contains(needle),
            "{needle:?} missing from the plan:\n{}",
            out.stdout
        );
    }
    assert!(!out.stdout.contains(SECRET));
    assert!(!canary.exists(), "--dry-run ran a command");
    assert!(!s.root().join("work").exists(), "--dry-run cloned");
}

#[test]
fn a_hostile_branch_name_reaches_commands_only_as_data() {
    let dir = tempdir();
    let canary = dir.path().join("p");
    let branch = format!("x;touch$IFS{}", canary.display());
    let s = setup(
        SEQUENTIAL,
        &["printf 'branch=%s\\n' \"$SENTRY_BRANCH\""],
        &["true"],
    );
    let out = s.trigger(&["--repo", "a", "--branch", &branch, "--sha", SHA]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("[a@{branch}] branch={branch}")),
        "{}",
        out.stdout
    );
    assert!(!canary.exists(), "the branch name was executed");
}

#[test]
fn a_group_trigger_deploys_every_repository_at_its_branch_head() {
    let s = setup(
        "    execution_strategy: parallel\n    max_parallel: 2",
        &["echo sha=$SENTRY_COMMIT_SHA trigger=$SENTRY_TRIGGER"],
        &["echo sha=$SENTRY_COMMIT_SHA"],
    );
    let head_a = commit(&s.watched[0], "moved");
    let head_b = crate::support::git(&s.watched[1], &["rev-parse", "HEAD"]);
    let out = s.trigger(&["--group", "g"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("[a@main] sha={head_a} trigger=manual")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("[b@main] sha={head_b}")),
        "{}",
        out.stdout
    );
}

#[test]
fn sigterm_stops_a_trigger_gracefully() {
    let dir = tempdir();
    let ready = dir.path().join("ready");
    let script = format!(
        "trap 'echo got-term; exit 5' TERM; touch {}; while :; do sleep 0.1; done",
        q(&ready.to_string_lossy())
    );
    let s = setup(SEQUENTIAL, &[&script], &["true"]);
    let mut child = sentry(s.root())
        .env("MY_TOKEN", SECRET)
        .arg("-c")
        .arg(&s.config)
        .args(["trigger", "--repo", "a", "--sha", SHA])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sentry");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ready.exists() && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(ready.exists(), "the command never started");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    while child.try_wait().expect("try_wait").is_none() {
        assert!(std::time::Instant::now() < end, "sentry did not stop");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = Run::from(child.wait_with_output().expect("output"));
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout.contains("[a@main] got-term"),
        "grace for the command: {}",
        out.stdout
    );
    let row = out
        .stdout
        .lines()
        .find(|l| l.contains("a@main ("))
        .unwrap_or_else(|| panic!("no summary row: {}", out.stdout));
    assert!(row.contains("cancelled"), "{row}");
    assert!(
        !s.root()
            .join("work")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "checkout removed"
    );
}

#[test]
fn an_abbreviated_sha_is_resolved_to_the_branch_head_it_names() {
    let s = setup(SEQUENTIAL, &["echo sha=$SENTRY_COMMIT_SHA"], &["true"]);
    let head = commit(&s.watched[0], "moved");
    let out = s.trigger(&["--repo", "a", "--sha", &head[..9]]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!("[a@main] sha={head}")),
        "{}",
        out.stdout
    );
    // A plain Git host can resolve only what it advertises.
    let out = s.trigger(&["--repo", "a", "--sha", "abcdef0"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("give the full 40-hex SHA"),
        "{}",
        out.stderr
    );
    for bad in [
        "abc12",
        "xyz1234",
        "0123456789abcdef0123456789abcdef012345678",
    ] {
        let out = s.trigger(&["--repo", "a", "--sha", bad]);
        assert_eq!(out.code, Some(2), "{bad}: {out:?}");
        assert!(out.stderr.contains("7 to 40 hex"), "{bad}: {}", out.stderr);
    }
}

#[test]
fn format_json_prints_one_document_with_every_unit() {
    let s = setup(SEQUENTIAL, &["echo failing; exit 4"], &["echo fine"]);
    let out = s.trigger(&["--group", "g", "-o", "json"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let doc: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", out.stdout));
    let units = &doc["runs"][0]["units"];
    assert_eq!(units[0]["unit"]["repository"], "a", "{doc:#}");
    assert_eq!(units[0]["status"], "failed");
    assert_eq!(units[0]["exit_code"], 4);
    assert_eq!(units[0]["failed_command"], "[1] echo failing; exit 4");
    assert_eq!(units[1]["status"], "skipped");
    assert_eq!(units[1]["reason"], "skipped: a@main failed");
}

#[test]
fn commands_inherit_sentrys_environment_but_never_its_tokens() {
    let names = "env | cut -d= -f1 | sort | tr '\\n' ' '";
    let s = setup(SEQUENTIAL, &[&format!("echo names: $({names})")], &["true"]);
    let mut cmd = sentry(s.root());
    cmd.env("MY_TOKEN", SECRET)
        .env("QA_EXTRA", "visible")
        .arg("-c")
        .arg(&s.config)
        .args(["trigger", "--repo", "a", "--sha", SHA]);
    let out = run(&mut cmd);
    assert_eq!(out.code, Some(0), "{out:?}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("names:"))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    let names: Vec<&str> = line.split_whitespace().collect();
    assert!(names.contains(&"QA_EXTRA"), "{line}");
    assert!(
        names.contains(&"TOKEN"),
        "given explicitly in deploy.env: {line}"
    );
    assert!(
        !names.contains(&"MY_TOKEN"),
        "Sentry's own token is withheld: {line}"
    );

    // inherit_env: false leaves only what a shell needs, and what the config gives.
    let text = std::fs::read_to_string(&s.config).unwrap();
    let text = text.replace("      env:\n", "      inherit_env: false\n      env:\n");
    std::fs::write(&s.config, text).unwrap();
    let out = run(&mut cmd);
    assert_eq!(out.code, Some(0), "{out:?}");
    let line = out.stdout.lines().find(|l| l.contains("names:")).unwrap();
    let names: Vec<&str> = line.split_whitespace().collect();
    assert!(!names.contains(&"QA_EXTRA"), "{line}");
    assert!(
        names.contains(&"PATH") && names.contains(&"TOKEN"),
        "{line}"
    );
}

#[test]
fn a_token_from_the_env_file_is_not_handed_to_commands_either() {
    let names = "env | cut -d= -f1 | sort | tr '\\n' ' '";
    let s = setup(SEQUENTIAL, &[&format!("echo names: $({names})")], &["true"]);
    let env_file = write(
        s.root(),
        "sentry.env",
        &format!("MY_TOKEN={SECRET}\nQA_FROM_FILE=visible\n"),
    );
    let mut cmd = sentry(s.root());
    cmd.env_remove("MY_TOKEN")
        .arg("-c")
        .arg(&s.config)
        .arg("--env-file")
        .arg(&env_file)
        .args(["trigger", "--repo", "a", "--sha", SHA]);
    let out = run(&mut cmd);
    assert_eq!(out.code, Some(0), "{out:?}");
    let line = out.stdout.lines().find(|l| l.contains("names:")).unwrap();
    let names: Vec<&str> = line.split_whitespace().collect();
    assert!(names.contains(&"QA_FROM_FILE"), "{line}");
    assert!(
        !names.contains(&"MY_TOKEN"),
        "the env file's token is withheld: {line}"
    );
    assert!(!out.all().contains(SECRET), "never printed");
}
