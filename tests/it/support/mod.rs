//! Shared helpers for the integration tests: running the `sentry` binary, temporary
//! directories, and Git repositories built with the `git` command line.

#![allow(dead_code)]

pub mod git_http;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use tempfile::TempDir;

/// Path of the binary under test, built by cargo for the integration tests.
pub fn sentry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sentry")
}

/// A `sentry` command with a clean environment for Sentry's own variables, run in `dir`.
pub fn sentry(dir: &Path) -> Command {
    let mut cmd = Command::new(sentry_bin());
    cmd.current_dir(dir);
    for var in [
        "SENTRY_CONFIG",
        "SENTRY_LOG_LEVEL",
        "SENTRY_LOG_FORMAT",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `cmd` and returns its output with stdout and stderr as text.
pub fn run(cmd: &mut Command) -> Run {
    let out = cmd.output().expect("run sentry");
    Run::from(out)
}

#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Run {
    /// stdout and stderr together, for "appears anywhere" assertions.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("sentry-it-")
        .tempdir()
        .expect("tempdir")
}

/// Runs git with a hermetic configuration; panics with git's stderr on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=Sentry Test",
            "-c",
            "user.email=test@sentry.invalid",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A new repository at `path` with one commit on `main`.
pub fn init_repo(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).expect("mkdir repo");
    git(path, &["init", "-q"]);
    commit(path, "initial");
    path.to_owned()
}

/// Commits a change to `file.txt` with message `msg`; returns the new HEAD SHA.
pub fn commit(repo: &Path, msg: &str) -> String {
    let file = repo.join("file.txt");
    let mut text = std::fs::read_to_string(&file).unwrap_or_default();
    text.push_str(msg);
    text.push('\n');
    std::fs::write(&file, text).expect("write file");
    git(repo, &["add", "file.txt"]);
    git(repo, &["commit", "-q", "-m", msg]);
    git(repo, &["rev-parse", "HEAD"])
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(&path, text).expect("write");
    path
}
