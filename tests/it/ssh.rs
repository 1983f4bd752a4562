//! SSH remotes through the real binary against a real OpenSSH server on 127.0.0.1: a
//! deploy key (with a passphrase from the environment) for `watch --once` and the QA
//! clone, host keys checked against a known_hosts file (hashed by `ssh-keygen -H`), and
//! the refusals: a wrong key, an unknown host, a changed host key.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::sshd::{Sshd, fingerprint, keygen, public_key};
use crate::support::{Run, commit, git, init_repo, qa_repo, run, sentry, tempdir, write};

const PASSPHRASE: &str = "tr0ub4dor-and-3";

/// A YAML single-quoted scalar.
fn q(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Bare copies of a watched repository and a QA repository under `root/served`, and the
/// working copy of the watched one (to push new commits from).
fn served(root: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let work = init_repo(&root.join("app-work"));
    let app = root.join("served/app.git");
    git(
        root,
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            app.to_str().unwrap(),
        ],
    );
    git(&work, &["remote", "add", "origin", app.to_str().unwrap()]);
    let qa_work = qa_repo(
        &root.join("qa-work"),
        "#!/bin/sh\necho \"deployed $SENTRY_REPO_NAME $SENTRY_COMMIT_SHA\"\n",
    );
    let qa = root.join("served/qa.git");
    git(
        root,
        &[
            "clone",
            "-q",
            "--bare",
            qa_work.to_str().unwrap(),
            qa.to_str().unwrap(),
        ],
    );
    (work, app, qa)
}

/// Watches `app` and clones `qa`, both over SSH with `key` (and the passphrase variable
/// when `with_passphrase`), checking host keys against `known_hosts`.
fn config(
    root: &Path,
    sshd: &Sshd,
    key: &Path,
    with_passphrase: bool,
    known_hosts: &Path,
) -> String {
    let pass = if with_passphrase {
        "\n        ssh_key_passphrase_env: SENTRY_TEST_KEY_PASS"
    } else {
        ""
    };
    let auth = format!(
        "auth:\n        ssh_key_file: {}{pass}",
        q(&key.to_string_lossy())
    );
    format!(
        "work_dir: {}\nstate_file: {}\nshutdown_grace: 1s\nrequest_timeout: 20s\nssh:\n  known_hosts_file: {}\nserver:\n  enabled: false\ngroups:\n  g:\n    execution_strategy: sequential\nrepositories:\n  - name: app\n    group: g\n    monitor:\n      repo_url: {}\n      repo_type: git\n      branches: [main]\n      {auth}\n    deploy:\n      qa_repo_url: {}\n      qa_repo_branch: main\n      commands: ['./deploy.sh']\n      {auth}\n",
        q(&root.join("work").to_string_lossy()),
        q(&root.join("state.json").to_string_lossy()),
        q(&known_hosts.to_string_lossy()),
        q(&sshd.url(&root.join("served/app.git"))),
        q(&sshd.url(&root.join("served/qa.git"))),
    )
}

fn sentry_run(root: &Path, args: &[&str]) -> Run {
    let mut cmd = sentry(root);
    cmd.args(["-c", "sentry.yaml"])
        .args(args)
        .env("SENTRY_TEST_KEY_PASS", PASSPHRASE)
        // libgit2 must not fall back to the agent or ~/.ssh of whoever runs the tests.
        .env_remove("SSH_AUTH_SOCK");
    run(&mut cmd)
}

#[test]
fn a_deploy_key_watches_and_clones_over_ssh() {
    let dir = tempdir();
    let root = dir.path();
    let key = keygen(&root.join("deploy_key"), PASSPHRASE);
    let Some(sshd) = Sshd::start(&[public_key(&key)]) else {
        return;
    };
    let (work, _app, _qa) = served(root);
    // The known_hosts entry hashed by OpenSSH itself.
    let known_hosts = write(root, "known_hosts", &(sshd.known_hosts_line() + "\n"));
    let out = std::process::Command::new("ssh-keygen")
        .args(["-H", "-f", known_hosts.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let hashed = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(hashed.starts_with("|1|"), "{hashed}");
    write(
        root,
        "sentry.yaml",
        &config(root, &sshd, &key, true, &known_hosts),
    );

    let out = sentry_run(root, &["validate"]);
    assert_eq!(out.code, Some(0), "{}", out.all());

    // First cycle: the baseline.
    let out = sentry_run(root, &["watch", "--once"]);
    assert_eq!(out.code, Some(0), "{}\nsshd: {}", out.all(), sshd.log());
    assert!(!out.all().contains("deployed"), "{}", out.all());

    // A push moves main: the next cycle sees it over SSH and deploys from the QA
    // repository cloned over SSH.
    let moved = commit(&work, "second");
    git(&work, &["push", "-q", "origin", "main"]);
    let out = sentry_run(root, &["watch", "--once"]);
    assert_eq!(out.code, Some(0), "{}\nsshd: {}", out.all(), sshd.log());
    assert!(
        out.all().contains(&format!("deployed app {moved}")),
        "{}",
        out.all()
    );
    assert!(
        !out.all().contains(PASSPHRASE),
        "the passphrase leaked: {}",
        out.all()
    );
    // sshd saw the deploy key: both the ls-remote and the clone logged in with it.
    let accepted = sshd.log().matches("Accepted publickey").count();
    assert!(accepted >= 3, "{}", sshd.log());
}

#[test]
fn a_wrong_key_fails_fast_with_a_clear_message() {
    let dir = tempdir();
    let root = dir.path();
    let authorized = keygen(&root.join("authorized_key"), "");
    let wrong = keygen(&root.join("wrong_key"), "");
    let Some(sshd) = Sshd::start(&[public_key(&authorized)]) else {
        return;
    };
    let (_work, _app, _qa) = served(root);
    let known_hosts = write(root, "known_hosts", &(sshd.known_hosts_line() + "\n"));
    write(
        root,
        "sentry.yaml",
        &config(root, &sshd, &wrong, false, &known_hosts),
    );

    let started = Instant::now();
    let out = sentry_run(root, &["watch", "--once"]);
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let all = out.all();
    assert!(all.contains("refused the key"), "{all}");
    assert!(all.contains("wrong_key"), "names the key file: {all}");
    assert!(all.contains("monitor.auth.ssh_key_file"), "{all}");

    // The clone with the wrong key: the same, for deploy.auth.
    let head = git(&root.join("served/app.git"), &["rev-parse", "main"]);
    let out = sentry_run(root, &["trigger", "--repo", "app", "--sha", &head]);
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(out.all().contains("refused the key"), "{}", out.all());
    assert!(
        out.all().contains("deploy.auth.ssh_key_file"),
        "{}",
        out.all()
    );
    assert!(!out.all().contains("deployed app"), "{}", out.all());

    // A wrong passphrase is named as such, not as a network problem.
    let locked = keygen(&root.join("locked_key"), "the real one");
    write(
        root,
        "sentry.yaml",
        &config(root, &sshd, &locked, true, &known_hosts),
    );
    let out = sentry_run(root, &["watch", "--once"]);
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(
        out.all().contains("cannot use the SSH key"),
        "{}",
        out.all()
    );
    assert!(
        out.all().contains("ssh_key_passphrase_env"),
        "{}",
        out.all()
    );
    assert!(!out.all().contains(PASSPHRASE), "{}", out.all());
}

#[test]
fn unknown_and_changed_host_keys_are_refused_with_the_fingerprint() {
    let dir = tempdir();
    let root = dir.path();
    let key = keygen(&root.join("deploy_key"), "");
    let Some(sshd) = Sshd::start(&[public_key(&key)]) else {
        return;
    };
    let (_work, _app, _qa) = served(root);
    let offered = fingerprint(&sshd.host_public());
    let head = git(&root.join("served/app.git"), &["rev-parse", "main"]);

    // Unknown: the file has entries, none for this host and port.
    let other = keygen(&root.join("other_host"), "");
    let unknown = write(
        root,
        "known_hosts_unknown",
        &format!(
            "[127.0.0.1]:1 {0}\ngit.example.com {0}\n",
            public_key(&other)
        ),
    );
    write(
        root,
        "sentry.yaml",
        &config(root, &sshd, &key, false, &unknown),
    );
    let out = sentry_run(root, &["watch", "--once"]);
    assert_ne!(out.code, Some(0), "{}", out.all());
    let all = out.all();
    assert!(all.contains("is unknown"), "{all}");
    assert!(
        all.contains(&offered),
        "names the fingerprint {offered}: {all}"
    );
    assert!(all.contains(&format!("[127.0.0.1]:{}", sshd.port)), "{all}");
    let out = sentry_run(root, &["trigger", "--repo", "app", "--sha", &head]);
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(out.all().contains(&offered), "{}", out.all());
    assert!(!out.all().contains("deployed app"), "{}", out.all());

    // Changed: this host and port, another key.
    let changed = write(
        root,
        "known_hosts_changed",
        &format!("[127.0.0.1]:{} {}\n", sshd.port, public_key(&other)),
    );
    write(
        root,
        "sentry.yaml",
        &config(root, &sshd, &key, false, &changed),
    );
    let out = sentry_run(root, &["watch", "--once"]);
    assert_ne!(out.code, Some(0), "{}", out.all());
    let all = out.all();
    assert!(all.contains("CHANGED"), "{all}");
    assert!(all.contains(&offered), "{all}");
    assert!(
        all.contains(&fingerprint(&other.with_extension("pub"))),
        "{all}"
    );
    let out = sentry_run(root, &["trigger", "--repo", "app", "--sha", &head]);
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(out.all().contains("CHANGED"), "{}", out.all());
    assert!(!out.all().contains("deployed app"), "{}", out.all());
    // Neither refusal ever reached authentication.
    assert!(!sshd.log().contains("Accepted publickey"), "{}", sshd.log());

    // And the right entry lets it through (the refusals were the host key's doing).
    let right = write(root, "known_hosts_right", &(sshd.known_hosts_line() + "\n"));
    write(
        root,
        "sentry.yaml",
        &config(root, &sshd, &key, false, &right),
    );
    let out = sentry_run(root, &["trigger", "--repo", "app", "--sha", &head]);
    assert_eq!(out.code, Some(0), "{}\nsshd: {}", out.all(), sshd.log());
    assert!(
        out.all().contains(&format!("deployed app {head}")),
        "{}",
        out.all()
    );
}
