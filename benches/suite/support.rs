//! Process plumbing for the suite: the `sentry` binary as a child that is always killed
//! ([`Sentry`]), its JSON log read on a thread into [`Event`]s, and `/proc` readers for
//! CPU time (utime + stime, in clock ticks) and resident memory.
//!
//! Every wait here is bounded: [`Sentry::next_cycle`] and [`Sentry::wait_listening`] take a
//! timeout and fail with the last log lines, so a broken binary fails the run instead of
//! hanging it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How many of the last log lines are kept for error messages.
const TAIL_LINES: usize = 30;

/// Path of the release `sentry` binary: `$SENTRY_BIN`, else beside the bench's `deps/`.
pub fn sentry_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("SENTRY_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate the target directory")?;
    let bin = profile_dir.join("sentry");
    if !bin.is_file() {
        bail!(
            "{} does not exist: run `cargo build --release --locked` first (make bench does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// The cargo target directory (parent of the profile directory the bench runs from).
pub fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// A `sentry` command with Sentry's own environment variables removed.
pub fn sentry_command(dir: &Path) -> Result<Command> {
    let mut cmd = Command::new(sentry_bin()?);
    cmd.current_dir(dir);
    for var in [
        "SENTRY_CONFIG",
        "SENTRY_LOG_LEVEL",
        "SENTRY_LOG_FORMAT",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    Ok(cmd)
}

/// One completed poll cycle as `sentry watch` logged it, with `/proc` samples taken when
/// the line was read.
#[derive(Debug, Clone)]
pub struct Cycle {
    pub duration_ms: f64,
    pub branches: u64,
    pub changes: u64,
    pub errors: u64,
    pub requests: u64,
    pub not_modified: u64,
    /// utime + stime of the whole process, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_kib: u64,
}

/// What the log reader reports.
#[derive(Debug)]
pub enum Event {
    Cycle(Cycle),
    Listening(SocketAddr),
    /// A "change:" line: a branch moved, read by the suite at `at`.
    Change {
        repository: String,
        branch: String,
        at: std::time::SystemTime,
    },
}

/// A running `sentry watch`; SIGTERM, then SIGKILL, when dropped (panics included).
pub struct Sentry {
    child: Child,
    events: Receiver<Event>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Sentry {
    /// Starts `sentry --log-format json -c CONFIG watch ARGS` in `dir`.
    pub fn watch(dir: &Path, config: &Path, args: &[&str]) -> Result<Sentry> {
        let mut cmd = sentry_command(dir)?;
        cmd.arg("--log-format")
            .arg("json")
            .arg("-c")
            .arg(config)
            .arg("watch")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("cannot start sentry")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let pid = child.id();
        let (tx, events) = channel();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let reader_tail = tail.clone();
        std::thread::spawn(move || read_log(BufReader::new(stderr), pid, &tx, &reader_tail));
        Ok(Sentry {
            child,
            events,
            tail,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next completed cycle, or an error with the log's tail after `timeout`.
    pub fn next_cycle(&mut self, timeout: Duration) -> Result<Cycle> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_event(deadline)? {
                Event::Cycle(cycle) => return Ok(cycle),
                Event::Listening(_) | Event::Change { .. } => {}
            }
        }
    }

    /// The address of the HTTP server, once it logged "http server listening on ADDR".
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Event::Listening(addr) = self.next_event(deadline)? {
                return Ok(addr);
            }
        }
    }

    /// The next event of any kind, or an error with the log's tail after `timeout`.
    pub fn next_any(&mut self, timeout: Duration) -> Result<Event> {
        self.next_event(Instant::now() + timeout)
    }

    fn next_event(&mut self, deadline: Instant) -> Result<Event> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.events.recv_timeout(left) {
            Ok(event) => Ok(event),
            Err(RecvTimeoutError::Timeout) => bail!("sentry: timed out\n{}", self.tail_text()),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                bail!("sentry exited ({status:?})\n{}", self.tail_text())
            }
        }
    }

    /// The last log lines, for error messages.
    pub fn tail_text(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Peak resident memory so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:").unwrap_or(0)
    }
}

impl Drop for Sentry {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// SIGTERM, up to 5 s to exit, then SIGKILL; always reaped.
pub fn stop_child(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    for _ in 0..100 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads JSON log lines until the pipe closes; sends cycles and the listening address.
fn read_log(reader: impl BufRead, pid: u32, tx: &Sender<Event>, tail: &Mutex<VecDeque<String>>) {
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let event = parse_line(&line, pid);
        {
            let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        if let Some(event) = event {
            if tx.send(event).is_err() {
                // Nobody listens any more; keep draining so the child never blocks on stderr.
                continue;
            }
        }
    }
}

fn parse_line(line: &str, pid: u32) -> Option<Event> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    // JSON events are flattened (telemetry::init): the message and the fields sit at the
    // top level of the object.
    let fields = &value;
    let message = fields.get("message")?.as_str()?;
    if let Some(addr) = message.strip_prefix("http server listening on ") {
        return addr.trim().parse().ok().map(Event::Listening);
    }
    if message.starts_with("change:") {
        let text = |key: &str| fields.get(key).and_then(serde_json::Value::as_str);
        return Some(Event::Change {
            repository: text("repository")?.to_owned(),
            branch: text("branch")?.to_owned(),
            at: std::time::SystemTime::now(),
        });
    }
    if !message.starts_with("cycle:") {
        return None;
    }
    let number = |key: &str| fields.get(key).and_then(serde_json::Value::as_u64);
    Some(Event::Cycle(Cycle {
        duration_ms: fields
            .get("duration_ms")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN),
        branches: number("branches").unwrap_or(0),
        changes: number("changes").unwrap_or(0),
        errors: number("errors").unwrap_or(0),
        requests: number("requests").unwrap_or(0),
        not_modified: number("not_modified").unwrap_or(0),
        cpu_ticks: cpu_ticks(pid).unwrap_or(0),
        rss_kib: proc_status_kib(pid, "VmRSS:").unwrap_or(0),
    }))
}

/// utime + stime of a process (all its threads, live and exited), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime of the calling thread, in clock ticks.
pub fn thread_cpu_ticks() -> Option<u64> {
    stat_ticks(&std::fs::read_to_string("/proc/thread-self/stat").ok()?)
}

/// Fields 14 and 15 of a `stat` line; the command name may hold spaces, so count from `)`.
fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) is index 11 and stime (15) index 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`, else 100).
pub fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A `kB` line of `/proc/<pid>/status`, e.g. `VmRSS:`.
pub fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Runs `git` with a hermetic identity in `dir`; fails with its stderr.
pub fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=Sentry Bench",
            "-c",
            "user.email=bench@sentry.invalid",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_DIR")
        .output()
        .with_context(|| format!("cannot run git {args:?}"))?;
    if !out.status.success() {
        bail!(
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A one-commit repository at `dir/name` on branch `main`: the QA repository deployments
/// clone (a local path, so the clone is cheap and the benchmark measures the poller).
pub fn tiny_qa_repo(dir: &Path) -> Result<PathBuf> {
    let repo = dir.join("qa");
    std::fs::create_dir_all(&repo)?;
    git(&repo, &["init", "-q"])?;
    std::fs::write(repo.join("run.sh"), "#!/bin/sh\ntrue\n")?;
    git(&repo, &["add", "."])?;
    git(&repo, &["commit", "-q", "-m", "qa"])?;
    Ok(repo)
}

/// Median of `values` (NaN when empty).
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// Nearest-rank percentile `p` (0–100) of `values` (NaN when empty).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
