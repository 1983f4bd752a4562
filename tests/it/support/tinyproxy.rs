//! A real forward proxy (Debian's `tinyproxy`, in the foreground with its own config in a
//! temporary directory) on 127.0.0.1, whose log shows every request and CONNECT tunnel.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TempDir, tempdir, write};

const TINYPROXY: &str = "/usr/bin/tinyproxy";

pub struct Tinyproxy {
    child: Child,
    pub port: u16,
    dir: TempDir,
}

/// A port nothing listens on (bound, then released).
pub fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Tinyproxy {
    /// Starts tinyproxy; `basic_auth` makes it require those credentials. `None` only
    /// when the binary is missing, said loudly; any other failure panics.
    pub fn start(basic_auth: Option<(&str, &str)>) -> Option<Tinyproxy> {
        if !Path::new(TINYPROXY).exists() {
            eprintln!(
                "SKIPPED: {TINYPROXY} is missing; install tinyproxy (.ci/run does) to run the proxy tests"
            );
            return None;
        }
        let dir = tempdir();
        let port = dead_port();
        let auth = basic_auth
            .map(|(user, password)| format!("BasicAuth {user} {password}\n"))
            .unwrap_or_default();
        // No ConnectPort line: CONNECT to any port (Debian's default file allows only 443
        // and 563, and the test servers listen on ephemeral ports).
        let config = write(
            dir.path(),
            "tinyproxy.conf",
            &format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 50\nLogFile \"{}\"\nLogLevel Connect\nDisableViaHeader Yes\n{auth}",
                dir.path().join("tinyproxy.log").display()
            ),
        );
        let child = Command::new(TINYPROXY)
            .args(["-d", "-c", config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tinyproxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tinyproxy did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Tinyproxy { child, port, dir })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// tinyproxy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default()
    }

    /// How many requests the log shows for `target` (`CONNECT 127.0.0.1:PORT` tunnels and
    /// `GET http://…` requests alike).
    pub fn requests_to(&self, target: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("Request (file descriptor") && l.contains(target))
            .count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
