//! Shared helpers for the integration tests: running the `sentry` binary, temporary
//! directories, and Git repositories built with the `git` command line.

#![allow(dead_code)]

pub mod browser;
pub mod fake_github_api;
pub mod fake_github_app;
pub mod fake_kube;
pub mod fake_kube_tls;
pub mod git_http;
pub mod graphql_eval;
pub mod sshd;
pub mod status_forge;
pub mod tinyproxy;

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

/// A QA repository at `path` whose one commit on `main` holds an executable `deploy.sh`
/// with `script` as its text.
pub fn qa_repo(path: &Path, script: &str) -> PathBuf {
    std::fs::create_dir_all(path).expect("qa dir");
    git(path, &["init", "-q"]);
    write(path, "deploy.sh", script);
    git(path, &["add", "."]);
    git(path, &["update-index", "--chmod=+x", "deploy.sh"]);
    git(path, &["commit", "-q", "-m", "qa"]);
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

/// A `sentry` process running in the background, with its stderr collected line by line.
pub struct Background {
    pub child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Background {
    /// Spawns `cmd` with stderr piped into a collector thread; stdout is discarded.
    pub fn spawn(cmd: &mut Command) -> Background {
        use std::io::BufRead;
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sentry");
        let stderr = child.stderr.take().expect("stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().expect("lines").push(line);
            }
        });
        Background { child, lines }
    }

    pub fn log(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    /// Waits until a stderr line contains `needle`; returns that line.
    pub fn wait_for_line(&self, needle: &str, timeout: std::time::Duration) -> String {
        let found = wait_until(timeout, || {
            self.lines
                .lock()
                .expect("lines")
                .iter()
                .find(|l| l.contains(needle))
                .cloned()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no line containing {needle:?} within {timeout:?}; log:\n{}",
                self.log()
            )
        })
    }

    /// The port from the "http server listening on ADDR" line.
    pub fn http_port(&self) -> u16 {
        let line = self.wait_for_line(
            "http server listening on",
            std::time::Duration::from_secs(30),
        );
        let addr = line.rsplit(' ').next().expect("address");
        addr.rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .expect("port")
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal");
    }

    /// Waits for exit up to `timeout`; returns the exit code, or None if still running.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<i32> {
        wait_until(timeout, || self.child.try_wait().ok().flatten()).map(|s| s.code().unwrap_or(-1))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 50 ms until it returns Some or `timeout` passes.
pub fn wait_until<T>(
    timeout: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Lines of a file, or none when it does not exist yet.
pub fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// A blocking HTTP request to 127.0.0.1:`port`; returns (status, body).
pub fn http(
    method: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    stream.write_all(body).expect("write body");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, dechunk(&body))
}

/// Sends only `head` (request line and headers, without the closing blank line unless it
/// is included) and returns what the server answered within `wait`: the raw response, or
/// `None` when it neither answered nor closed the connection in time.
pub fn http_raw(port: u16, head: &str, wait: std::time::Duration) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(wait)).expect("timeout");
    stream.write_all(head.as_bytes()).expect("write");
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Some(String::from_utf8_lossy(&response).into_owned()),
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (!response.is_empty())
                    .then(|| String::from_utf8_lossy(&response).into_owned());
            }
            Err(_) => return Some(String::from_utf8_lossy(&response).into_owned()),
        }
    }
}

/// Undoes chunked transfer encoding when present (axum chunks bodies of unknown length).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if n == 0 || after.len() < n {
            return if out.is_empty() && n != 0 {
                body.to_owned()
            } else {
                out
            };
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

// ---------------------------------------------------------------------------------------
// Reliability helpers (faults, crash, hostile, secrets, soak): a raw fake forge that can
// misbehave at the TCP level, process scans by an environment marker, and rlimits.

/// What [`FakeForge`] does with one request.
#[derive(Debug, Clone)]
pub enum FakeReply {
    /// A complete HTTP/1.1 response; `Connection: close` and `Content-Length` are added.
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Sends nothing for this long, then closes the connection.
    Hang(std::time::Duration),
    /// Closes the connection at once without answering.
    Drop,
    /// Announces `declared` bytes in `Content-Length`, sends `body`, and closes.
    Truncated { declared: usize, body: Vec<u8> },
}

impl FakeReply {
    pub fn status(status: u16, content_type: &str, body: &str) -> FakeReply {
        FakeReply::Http {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body: body.as_bytes().to_vec(),
        }
    }

    pub fn json(body: &str) -> FakeReply {
        FakeReply::status(200, "application/json", body)
    }

    pub fn with_header(mut self, name: &str, value: &str) -> FakeReply {
        if let FakeReply::Http { headers, .. } = &mut self {
            headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }
}

/// One request as [`FakeForge`] saw it.
#[derive(Debug, Clone)]
pub struct FakeRequest {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: std::time::Instant,
    pub wall: std::time::SystemTime,
}

impl FakeRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

type FakeHandler = dyn Fn(&FakeRequest) -> FakeReply + Send + Sync;

/// A fake forge API on 127.0.0.1 built on a raw `TcpListener`, one thread per connection,
/// so that it can also hang, drop connections and cut bodies short. Stops when dropped.
pub struct FakeForge {
    port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<FakeRequest>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeForge {
    pub fn start(handler: impl Fn(&FakeRequest) -> FakeReply + Send + Sync + 'static) -> FakeForge {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind fake forge");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<FakeHandler> = Arc::new(handler);
        let (log, flag) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (handler, log, flag) = (handler.clone(), log.clone(), flag.clone());
                std::thread::spawn(move || fake_serve(stream, &*handler, &log, &flag));
            }
        });
        FakeForge {
            port,
            requests,
            stop,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn uri(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<FakeRequest> {
        self.requests.lock().expect("requests").clone()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().expect("requests").len()
    }
}

impl Drop for FakeForge {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn fake_serve(
    mut stream: std::net::TcpStream,
    handler: &FakeHandler,
    log: &std::sync::Mutex<Vec<FakeRequest>>,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::io::{BufRead, BufReader, Read, Write};
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(clone);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            return;
        };
        let (method, target) = (method.to_owned(), target.to_owned());
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let length: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length.min(1 << 20)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let request = FakeRequest {
            method,
            target,
            headers,
            body,
            at: std::time::Instant::now(),
            wall: std::time::SystemTime::now(),
        };
        log.lock().expect("requests").push(request.clone());
        match handler(&request) {
            FakeReply::Http {
                status,
                headers,
                body,
            } => {
                let mut head = format!(
                    "HTTP/1.1 {status} Fake\r\nContent-Length: {}\r\n",
                    body.len()
                );
                for (k, v) in &headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                if stream.write_all(head.as_bytes()).is_err() || stream.write_all(&body).is_err() {
                    return;
                }
                // Keep-alive: serve the next request on this connection.
            }
            FakeReply::Hang(duration) => {
                let end = std::time::Instant::now() + duration;
                while std::time::Instant::now() < end
                    && !stop.load(std::sync::atomic::Ordering::SeqCst)
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                return;
            }
            FakeReply::Drop => return,
            FakeReply::Truncated { declared, body } => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
                let _ = stream.flush();
                return;
            }
        }
    }
}

/// Pids of live processes whose environment contains `marker` (as `NAME=VALUE` text).
pub fn pids_with_env(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == marker.as_bytes())
            && !is_zombie(pid)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Whether `pid` is a zombie (exited, not yet reaped).
pub fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// SIGKILLs every process whose environment holds `marker`, until none is left (bounded).
pub fn kill_all_with_env(marker: &str) {
    for _ in 0..100 {
        let pids = pids_with_env(marker);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Kills the processes carrying `marker` when dropped (a test that panics leaves none).
pub struct MarkerGuard(pub String);

impl Drop for MarkerGuard {
    fn drop(&mut self) {
        kill_all_with_env(&self.0);
    }
}

/// `RLIMIT_FSIZE` and `RLIMIT_AS` for a child, set between fork and exec.
pub mod rlimit {
    #[repr(C)]
    struct RLimit {
        cur: u64,
        max: u64,
    }

    unsafe extern "C" {
        fn setrlimit(resource: i32, limit: *const RLimit) -> i32;
    }

    /// Linux resource numbers (the same on x86_64 and aarch64).
    pub const FSIZE: i32 = 1;
    pub const AS: i32 = 9;

    /// Applies `limits` to the child `cmd` will start. With `FSIZE`, SIGXFSZ is ignored in
    /// the child so that a write past the limit fails with EFBIG, as on a full disk.
    pub fn apply(cmd: &mut std::process::Command, limits: &[(i32, u64)]) {
        use std::os::unix::process::CommandExt;
        let limits = limits.to_vec();
        // SAFETY: between fork and exec only async-signal-safe calls are made: setrlimit
        // and sigaction.
        unsafe {
            cmd.pre_exec(move || {
                for &(resource, value) in &limits {
                    let limit = RLimit {
                        cur: value,
                        max: value,
                    };
                    if setrlimit(resource, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if resource == FSIZE {
                        nix::sys::signal::signal(
                            nix::sys::signal::Signal::SIGXFSZ,
                            nix::sys::signal::SigHandler::SigIgn,
                        )
                        .map_err(std::io::Error::from)?;
                    }
                }
                Ok(())
            });
        }
    }
}

/// Runs `cmd` to its end with a time bound; kills it when the bound passes. Returns the
/// output and how long it ran, or `None` for the output when it had to be killed.
pub fn run_bounded(
    cmd: &mut Command,
    limit: std::time::Duration,
) -> (Option<Run>, std::time::Duration) {
    use std::io::Read;
    let started = std::time::Instant::now();
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let status = wait_until(limit, || child.try_wait().ok().flatten());
    let elapsed = started.elapsed();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        return (None, elapsed);
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    (
        Some(Run {
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }),
        elapsed,
    )
}

/// A stdout or stderr whose reader has already gone: every write gets `EPIPE`, as when
/// `sentry … | head -1` has exited. Deterministic, unlike racing a reader that closes.
pub fn closed_pipe() -> std::process::Stdio {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    std::process::Stdio::from(write)
}
