//! Benchmark 4, clone: Sentry's QA checkout against `git clone --depth 1 --single-branch`
//! of the same URL, served over local smart HTTP by `git http-backend`.
//!
//! The QA repository is generated with `git fast-import`: N small files, M commits each
//! changing 100 of them, and a few branches, then repacked like a hosted repository.
//! Sentry's side calls `sentry::testing::clone_blocking` — the function every
//! deployment uses — in this process; git's side runs the `git` CLI. Runs alternate which
//! goes first; both clones must be shallow and hold the files. Target: median ≤ 1.1× git.
//! User CPU time is reported beside the wall time: most of a clone's wall time is the
//! kernel creating 20,000 files, which both sides pay alike and which varies several-fold
//! with the file system's state (ext4's inode allocator slows down after mass deletions);
//! user time is what each client computes itself.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde_json::json;

use sentry::testing::{CloneRequest, clone_blocking};

use crate::Ctx;
use crate::git_http::GitHttpServer;
use crate::report::{Report, num};
use crate::support::{git, median};

const MAX_RATIO: f64 = 1.1;
const FILES_PER_DIR: usize = 200;
const CHANGES_PER_COMMIT: usize = 100;

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let (files, commits, runs) = (
        ctx.sizes.clone_files,
        ctx.sizes.clone_commits,
        ctx.sizes.clone_runs,
    );
    let root = tempfile::Builder::new()
        .prefix("sentry-bench-clone-")
        .tempdir()?;
    let generated = Instant::now();
    make_repo(&root.path().join("qa.git"), files, commits)?;
    let generate_s = generated.elapsed().as_secs_f64();
    settle();
    let server = ctx.rt.block_on(GitHttpServer::start(root.path(), None))?;
    let url = server.url("qa.git");
    let work = tempfile::Builder::new()
        .prefix("sentry-bench-dest-")
        .tempdir()?;

    let (sentry, git) = measure(&url, work.path(), files, runs)?;
    let (s, g) = (median(&sentry.wall_ms), median(&git.wall_ms));
    let ratio = s / g;
    let (s_cpu, g_cpu) = (median(&sentry.user_cpu_ms), median(&git.user_cpu_ms));
    let name = "4 clone";
    report.judged(
        name,
        format!(
            "shallow single-branch checkout, {files} files, {commits} commits (median of {runs})"
        ),
        format!("Sentry {} ms vs git {} ms = {ratio:.2}×", num(s), num(g)),
        format!("≤ {MAX_RATIO}×"),
        ratio <= MAX_RATIO,
    );
    report.info(
        name,
        "user CPU time of the same clones (median)",
        format!(
            "Sentry {} ms vs git {} ms = {:.2}×",
            num(s_cpu),
            num(g_cpu),
            s_cpu / g_cpu
        ),
    );
    report.detail(
        "clone",
        json!({
            "files": files,
            "commits": commits,
            "runs": runs,
            "generate_seconds": generate_s,
            "sentry_ms": sentry.wall_ms,
            "git_ms": git.wall_ms,
            "sentry_cpu_ms": sentry.user_cpu_ms,
            "git_cpu_ms": git.user_cpu_ms,
            "ratio": ratio,
            "server_requests": server.requests(),
        }),
    );
    Ok(())
}

/// One side's clones: wall and user CPU milliseconds.
#[derive(Default)]
struct Side {
    wall_ms: Vec<f64>,
    user_cpu_ms: Vec<f64>,
}

impl Side {
    fn push(&mut self, (wall, cpu): (f64, f64)) {
        self.wall_ms.push(wall);
        self.user_cpu_ms.push(cpu);
        settle();
    }
}

/// `runs` clones each way, alternating who goes first; every clone is kept (in `work`)
/// and written back before the next one starts (deleting and writing back 20,000 files
/// right before a clone slowed that clone down several times over). Returns (Sentry, git).
fn measure(url: &str, work: &Path, files: usize, runs: usize) -> Result<(Side, Side)> {
    let (mut sentry, mut git) = (Side::default(), Side::default());
    for i in 0..runs {
        let dest_git = work.join(format!("git-{i}"));
        let dest_sentry = work.join(format!("sentry-{i}"));
        if i % 2 == 0 {
            git.push(git_clone(url, &dest_git)?);
            sentry.push(sentry_clone(url, &dest_sentry)?);
        } else {
            sentry.push(sentry_clone(url, &dest_sentry)?);
            git.push(git_clone(url, &dest_git)?);
        }
        for dest in [&dest_git, &dest_sentry] {
            check_checkout(dest, files)?;
        }
    }
    Ok((sentry, git))
}

/// A bare repository with `files` files, `commits` commits and four branches.
fn make_repo(repo: &Path, files: usize, commits: usize) -> Result<()> {
    std::fs::create_dir_all(repo)?;
    git(repo, &["init", "-q", "--bare"])?;
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(repo)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("cannot run git fast-import")?;
    {
        let stdin = child.stdin.as_mut().context("no stdin")?;
        let mut out = std::io::BufWriter::new(stdin);
        write_history(&mut out, files, commits)?;
        out.flush()?;
    }
    let status = child.wait()?;
    ensure!(status.success(), "git fast-import failed");
    git(repo, &["repack", "-a", "-d", "-q"])?;
    Ok(())
}

fn write_history(out: &mut impl std::io::Write, files: usize, commits: usize) -> Result<()> {
    let branches = [
        ("release/1", commits * 3 / 4),
        ("feature/a", commits / 2),
        ("feature/b", commits.saturating_sub(1)),
    ];
    for c in 1..=commits {
        let message = format!("commit {c}\n");
        writeln!(out, "commit refs/heads/main\nmark :{c}")?;
        writeln!(
            out,
            "committer Bench <bench@sentry.invalid> {} +0000",
            1_700_000_000 + c * 60
        )?;
        write!(out, "data {}\n{message}", message.len())?;
        if c > 1 {
            writeln!(out, "from :{}", c - 1)?;
        }
        let changed: Vec<usize> = if c == 1 {
            (0..files).collect()
        } else {
            (0..CHANGES_PER_COMMIT.min(files))
                .map(|k| (c * CHANGES_PER_COMMIT + k * 7) % files)
                .collect()
        };
        for f in changed {
            let body = format!(
                "file {f} at commit {c}\nsome small content so the file is not empty\n{}\n",
                "x".repeat(f % 64)
            );
            writeln!(out, "M 100644 inline {}", file_path(f))?;
            write!(out, "data {}\n{body}\n", body.len())?;
        }
        writeln!(out)?;
    }
    for (branch, at) in branches {
        writeln!(out, "reset refs/heads/{branch}\nfrom :{}\n", at.max(1))?;
    }
    Ok(())
}

fn file_path(f: usize) -> String {
    format!("src/d{:03}/f{f:05}.txt", f / FILES_PER_DIR)
}

/// Wall and user CPU milliseconds of `git clone` with the helpers it waits for
/// (remote-http, index-pack) — and not the server's processes, which this one also reaps.
fn git_clone(url: &str, dest: &Path) -> Result<(f64, f64)> {
    let started = Instant::now();
    let mut child = Command::new("git")
        .args([
            "clone",
            "-q",
            "--depth",
            "1",
            "--single-branch",
            "--branch",
            "main",
        ])
        .arg(url)
        .arg(dest)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
    }
    let (status, usage) = wait_with_usage(child.id())?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    ensure!(status == 0, "git clone failed: {stderr}");
    Ok((ms, user_ms(&usage)))
}

/// `wait4`: the exit status and the resource usage of child `pid` and what it waited for.
fn wait_with_usage(pid: u32) -> Result<(libc::c_int, libc::rusage)> {
    let pid = libc::pid_t::try_from(pid)?;
    let mut status = 0;
    // SAFETY: wait4 writes only the status and the zeroed struct it is given; `pid` is
    // our unwaited child, so no other waiter reaps it first.
    let (waited, usage) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let waited = libc::wait4(pid, &mut status, 0, &mut usage);
        (waited, usage)
    };
    ensure!(waited == pid, "wait4: {}", std::io::Error::last_os_error());
    Ok((status, usage))
}

/// Wall and user CPU milliseconds of Sentry's clone, which libgit2 does on the calling thread.
fn sentry_clone(url: &str, dest: &Path) -> Result<(f64, f64)> {
    let request = CloneRequest {
        url: url.to_owned(),
        branch: "main".to_owned(),
        username: "git".to_owned(),
        token: None,
        ssh: None,
        dest: dest.to_owned(),
    };
    let cpu = thread_user_ms();
    let started = Instant::now();
    clone_blocking(&request, &|| false, &|_| {})?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok((ms, thread_user_ms() - cpu))
}

/// User CPU milliseconds this thread has used.
fn thread_user_ms() -> f64 {
    // SAFETY: getrusage only writes the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        usage
    };
    user_ms(&usage)
}

fn user_ms(usage: &libc::rusage) -> f64 {
    usage.ru_utime.tv_sec as f64 * 1000.0 + usage.ru_utime.tv_usec as f64 / 1000.0
}

/// The clone is shallow and its work tree holds the first and the last file.
fn check_checkout(dest: &Path, files: usize) -> Result<()> {
    ensure!(
        dest.join(".git/shallow").is_file(),
        "{} is not a shallow clone",
        dest.display()
    );
    for f in [0, files - 1] {
        let path = dest.join(file_path(f));
        ensure!(path.is_file(), "{} is missing", path.display());
    }
    Ok(())
}

/// Flushes dirty pages (`sync`), untimed, so one clone's writeback does not slow the next.
fn settle() {
    let _ = Command::new("sync").status();
}
