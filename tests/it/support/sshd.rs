//! A real OpenSSH server (`sshd -D -e -f CONFIG`) on 127.0.0.1 for the SSH tests: its own
//! host key and authorized keys in a temporary directory, the current user as the only
//! user, Git served by the `git-upload-pack` the user's shell finds.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TempDir, tempdir, write};

const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    child: Child,
    pub port: u16,
    pub dir: TempDir,
}

/// Runs a helper program; panics with its stderr on failure.
fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A new ed25519 key pair at `path` (and `path.pub`), encrypted with `passphrase`.
pub fn keygen(path: &Path, passphrase: &str) -> PathBuf {
    tool(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            passphrase,
            "-C",
            "sentry-test",
            "-f",
            path.to_str().unwrap(),
        ],
    );
    path.to_owned()
}

/// The `type base64` part of a `.pub` file.
pub fn public_key(private: &Path) -> String {
    let text = std::fs::read_to_string(private.with_extension("pub")).expect("read .pub");
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `SHA256:…` of a public key file, as `ssh-keygen -l` prints it.
pub fn fingerprint(public: &Path) -> String {
    let line = tool("ssh-keygen", &["-l", "-f", public.to_str().unwrap()]);
    line.split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_owned()
}

/// The current user's name (the user the tests log in as).
pub fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .expect("current user")
}

impl Sshd {
    /// Starts sshd accepting `authorized` (public key lines). `None` only when the sshd
    /// binary is missing: that is said loudly; any other failure panics.
    pub fn start(authorized: &[String]) -> Option<Sshd> {
        if !Path::new(SSHD).exists() {
            eprintln!(
                "SKIPPED: {SSHD} is missing; install openssh-server (.ci/run does) to run the SSH tests"
            );
            return None;
        }
        let dir = tempdir();
        let host_key = dir.path().join("host_ed25519");
        keygen(&host_key, "");
        write(
            dir.path(),
            "authorized_keys",
            &(authorized.join("\n") + "\n"),
        );
        // Privilege separation needs its empty directory.
        if !Path::new("/run/sshd").exists() {
            std::fs::create_dir_all("/run/sshd").expect("create /run/sshd (sshd needs it)");
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let config = write(
            dir.path(),
            "sshd_config",
            &format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\nAllowUsers {}\nLogLevel VERBOSE\n",
                host_key.display(),
                dir.path().join("authorized_keys").display(),
                dir.path().join("sshd.pid").display(),
                current_user(),
            ),
        );
        let log = std::fs::File::create(dir.path().join("sshd.log")).expect("sshd log");
        let mut child = Command::new(SSHD)
            .args(["-D", "-e", "-f", config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sshd");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut log = String::new();
                std::fs::File::open(dir.path().join("sshd.log"))
                    .and_then(|mut f| f.read_to_string(&mut log))
                    .ok();
                panic!("sshd exited ({status}) before listening: {log}");
            }
            assert!(Instant::now() < deadline, "sshd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Sshd { child, port, dir })
    }

    /// The server's host public key file.
    pub fn host_public(&self) -> PathBuf {
        self.dir.path().join("host_ed25519.pub")
    }

    /// A known_hosts line for this server (`[127.0.0.1]:PORT type key`).
    pub fn known_hosts_line(&self) -> String {
        format!(
            "[127.0.0.1]:{} {}",
            self.port,
            public_key(&self.dir.path().join("host_ed25519"))
        )
    }

    /// `ssh://USER@127.0.0.1:PORT/ABSOLUTE/PATH`.
    pub fn url(&self, path: &Path) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            current_user(),
            self.port,
            path.display()
        )
    }

    /// What sshd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
