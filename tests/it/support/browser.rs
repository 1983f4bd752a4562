//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: commands on fd 3, answers on fd 4, NUL-terminated JSON).
//! `--dump-dom` cannot wait for a live update: a page with an open EventSource never lets
//! `--virtual-time-budget` run out, so the test asks the live page for its DOM instead.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::fd::AsRawFd as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// Flags that keep Chromium quiet on a closed network and isolated from other runs.
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
];

pub fn chromium() -> &'static str {
    if std::process::Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
    {
        "chromium"
    } else {
        panic!(
            "the browser test needs Debian's `chromium` (apt-get install chromium; .ci/run installs it)"
        )
    }
}

pub struct Browser {
    child: Child,
    to: std::fs::File,
    from: BufReader<std::fs::File>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

/// One open tab, by its DevTools session.
pub struct Page(String);

impl Browser {
    pub fn launch() -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let (cmd_read, cmd_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let (ans_read, ans_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let mut cmd = Command::new(chromium());
        cmd.args(CHROMIUM_FLAGS)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--remote-debugging-pipe")
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let (r, w) = (cmd_read.as_raw_fd(), ans_write.as_raw_fd());
        // SAFETY: only fcntl and dup2 (async-signal-safe) between fork and exec; dup2
        // clears O_CLOEXEC on fds 3 and 4, so they survive exec and nothing else leaks.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                // Move both ends above 4 first: either may already be 3 or 4, and dup2
                // onto itself would keep O_CLOEXEC (or one would overwrite the other).
                let (r, w) = (
                    libc::fcntl(r, libc::F_DUPFD, 10),
                    libc::fcntl(w, libc::F_DUPFD, 10),
                );
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start chromium");
        drop((cmd_read, ans_write));
        Browser {
            child,
            to: std::fs::File::from(cmd_write),
            from: BufReader::new(std::fs::File::from(ans_read)),
            next_id: 0,
            _profile: profile,
        }
    }

    /// Sends one command and returns its result, skipping events.
    pub fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        loop {
            let mut buf = Vec::new();
            let n = self
                .from
                .read_until(0, &mut buf)
                .expect("read from chromium");
            assert!(n > 0, "chromium closed the DevTools pipe");
            buf.pop();
            let answer: Value = serde_json::from_slice(&buf).expect("DevTools JSON");
            if answer["id"] == id {
                assert!(answer.get("error").is_none(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// Opens `url` in a new tab and waits for its load.
    pub fn open(&mut self, url: &str) -> Page {
        let target = self.call(None, "Target.createTarget", json!({ "url": url }));
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        let page = Page(attached["sessionId"].as_str().expect("session").to_owned());
        let loaded = crate::support::wait_until(Duration::from_secs(30), || {
            // A new tab starts on about:blank, itself "complete".
            let state = self.eval(&page, "location.href + ' ' + document.readyState");
            (state.as_str() == Some(&format!("{url} complete"))).then_some(())
        });
        assert!(loaded.is_some(), "{url} did not load");
        page
    }

    pub fn eval(&mut self, page: &Page, expression: &str) -> Value {
        let result = self.call(
            Some(&page.0),
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        result["result"]["value"].clone()
    }

    /// The rendered DOM, as `--dump-dom` prints it.
    pub fn dom(&mut self, page: &Page) -> String {
        self.eval(page, "document.documentElement.outerHTML")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The visible text of the page (what a reader sees, without markup).
    pub fn text(&mut self, page: &Page) -> String {
        self.eval(page, "document.body.innerText")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Saves a screenshot of `url` with Chromium's own `--screenshot` (the page as it renders
/// without waiting for live updates).
pub fn screenshot(url: &str, path: &std::path::Path) {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new(chromium())
        .args(CHROMIUM_FLAGS)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", path.display()))
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("chromium --screenshot");
    assert!(
        path.exists(),
        "no screenshot of {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
