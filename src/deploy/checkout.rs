//! The QA checkout: a fresh clone of `deploy.qa_repo_url` at `deploy.qa_repo_branch` in a
//! recognisably named directory under `work_dir`, and the sweep of leftovers at startup.
//!
//! Cloning is blocking libgit2 work: [`clone_blocking`] must run in `spawn_blocking`.
//! Over http(s) it fetches one branch at depth 1; over `file://` and local paths a full
//! clone of that one branch (libgit2 cannot fetch shallow locally); when a server refuses
//! shallow it falls back to a full clone. Credentials reach libgit2 only through the
//! credentials callback, which gives up after one rejected attempt. Network failures are
//! tried three times with backoff; authentication failures are not retried.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use git2::build::RepoBuilder;
use git2::{Cred, CredentialType, ErrorClass, FetchOptions, RemoteCallbacks, RemoteRedirect};
use secrecy::{ExposeSecret, SecretString};

#[cfg(test)]
use crate::config::RepoType;
use crate::config::{Deploy, SshAuth};
use crate::forge::ssh;

/// Every checkout directory (and its changes file) starts with this; the startup sweep
/// removes nothing else.
pub const CHECKOUT_PREFIX: &str = "sentry-checkout-";

/// Suffix of the changes file that sits beside its checkout directory.
const CHANGES_SUFFIX: &str = ".changes.json";

/// Attempts of a clone that fails on the network.
const NETWORK_TRIES: u32 = 3;

/// What to clone, where, and as whom.
#[derive(Clone)]
pub struct CloneRequest {
    pub url: String,
    pub branch: String,
    pub username: String,
    pub token: Option<SecretString>,
    /// For an SSH URL: user, deploy key and known_hosts (`deploy.auth`).
    pub ssh: Option<Arc<SshAuth>>,
    pub dest: PathBuf,
}

impl CloneRequest {
    pub fn new(deploy: &Deploy, dest: PathBuf) -> CloneRequest {
        CloneRequest {
            url: deploy.qa_repo_url.clone(),
            branch: deploy.qa_repo_branch.clone(),
            username: clone_username(deploy),
            token: deploy.auth.token.clone(),
            ssh: deploy.auth.ssh.clone(),
            dest,
        }
    }
}

/// The user name sent with the token: the configured one, else what the host expects.
pub fn clone_username(deploy: &Deploy) -> String {
    if let Some(user) = &deploy.auth.username {
        return user.clone();
    }
    // An App's installation token goes with GitHub's user name, whatever the URL's kind.
    let repo_type = if deploy.auth.github_app.is_some() {
        crate::config::RepoType::Github
    } else {
        deploy.repo_type
    };
    crate::forge::kind::of(repo_type).clone_username.to_owned()
}

/// Why a clone failed, by what the caller does about it.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// The credentials were missing or rejected; retrying will not help.
    #[error("authentication to {url} failed: {message}")]
    Auth { url: String, message: String },
    /// The server's TLS certificate was refused; retrying will not help.
    #[error(
        "the TLS certificate of {url} was refused: {message} (check the URL and the trust: tls.ca_file, GIT_SSL_CAINFO, SSL_CERT_FILE)"
    )]
    Certificate { url: String, message: String },
    /// The SSH server's host key is unknown or changed; retrying will not help.
    #[error("{message}")]
    HostKey { url: String, message: String },
    /// The network failed on every try.
    #[error("cannot reach {url} after {tries} tries: {message}")]
    Network {
        url: String,
        tries: u32,
        message: String,
    },
    /// Stopped from outside (shutdown or deadline) through the progress callback.
    #[error("the clone of {url} was stopped")]
    Stopped { url: String },
    /// Anything else: a missing branch, a broken repository, a full disk.
    #[error("cannot clone {url} at branch {branch}: {message}")]
    Other {
        url: String,
        branch: String,
        message: String,
    },
}

/// Whether the URL goes over http(s), where shallow single-branch fetches work.
pub fn is_http(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
}

/// How far a clone's transfer is, as libgit2 reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneProgress {
    pub received_objects: usize,
    pub total_objects: usize,
    pub received_bytes: usize,
}

/// Clones `req` into `req.dest` (an existing, empty directory). `stop` is polled by the
/// transfer callbacks and between tries; when it returns true the clone is abandoned.
/// `progress` hears every transfer update (many per second: it must be cheap).
pub fn clone_blocking(
    req: &CloneRequest,
    stop: &(dyn Fn() -> bool + Sync),
    progress: &(dyn Fn(CloneProgress) + Sync),
) -> Result<(), CheckoutError> {
    crate::forge::prepare_libgit2();
    let mut shallow = is_http(&req.url);
    let mut tries = 0;
    loop {
        tries += 1;
        reset_dir(&req.dest).map_err(|e| other(req, &e.to_string()))?;
        let attempt = clone_once(req, shallow, stop, progress);
        let error = match attempt {
            Ok(()) => return Ok(()),
            Err(_) if stop() => {
                return Err(CheckoutError::Stopped {
                    url: req.url.clone(),
                });
            }
            Err(Failure::Auth(message)) => {
                return Err(CheckoutError::Auth {
                    url: req.url.clone(),
                    message,
                });
            }
            Err(Failure::HostKey(message)) => {
                return Err(CheckoutError::HostKey {
                    url: req.url.clone(),
                    message,
                });
            }
            Err(Failure::Git(e)) => e,
        };
        if let Some(why) = req
            .ssh
            .as_ref()
            .and_then(|s| ssh::key_unusable(s, &error, "deploy"))
        {
            return Err(CheckoutError::Auth {
                url: req.url.clone(),
                message: why,
            });
        }
        if shallow && refuses_shallow(&error) {
            tracing::info!(url = %req.url, "the server refused a shallow fetch; cloning in full");
            shallow = false;
            tries -= 1;
            continue;
        }
        if crate::forge::is_certificate_error(&error) {
            return Err(CheckoutError::Certificate {
                url: req.url.clone(),
                message: error.message().to_owned(),
            });
        }
        if !is_network(&error) {
            return Err(other(req, error.message()));
        }
        if tries >= NETWORK_TRIES {
            return Err(CheckoutError::Network {
                url: req.url.clone(),
                tries,
                message: error.message().to_owned(),
            });
        }
        let backoff = Duration::from_secs(1 << (tries - 1));
        tracing::warn!(url = %req.url, try_ = tries, "clone failed ({}); retrying in {}s", error.message(), backoff.as_secs());
        if sleep_unless_stopped(backoff, stop) {
            return Err(CheckoutError::Stopped {
                url: req.url.clone(),
            });
        }
    }
}

enum Failure {
    /// The credentials callback gave up.
    Auth(String),
    /// The SSH host key was refused.
    HostKey(String),
    Git(git2::Error),
}

fn clone_once(
    req: &CloneRequest,
    shallow: bool,
    stop: &(dyn Fn() -> bool + Sync),
    progress: &(dyn Fn(CloneProgress) + Sync),
) -> Result<(), Failure> {
    let auth_failure = std::sync::Mutex::new(None::<String>);
    let refusal = ssh::Refusal::default();
    let result = {
        let mut fetch = FetchOptions::new();
        let mut cb = callbacks(req, stop, progress, &auth_failure);
        if let Some(ssh_auth) = &req.ssh {
            cb.certificate_check(ssh::certificate_check(ssh_auth.clone(), refusal.clone()));
        }
        fetch.remote_callbacks(cb);
        fetch.proxy_options(crate::forge::proxy::git_options(&req.url));
        // libgit2 follows a redirect to another host on the first request by default; a
        // QA host must not be able to send the clone (and its token) elsewhere.
        fetch.follow_redirects(RemoteRedirect::None);
        if shallow {
            fetch.depth(1);
        }
        let refspec = format!("+refs/heads/{0}:refs/remotes/origin/{0}", req.branch);
        let mut builder = RepoBuilder::new();
        builder
            .branch(&req.branch)
            .fetch_options(fetch)
            .remote_create(move |repo, name, url| repo.remote_with_fetch(name, url, &refspec));
        builder.clone(&req.url, &req.dest).map(drop)
    };
    if let (Err(_), Some(refused)) = (&result, ssh::take_refusal(&refusal)) {
        return Err(Failure::HostKey(refused.to_string()));
    }
    let auth = auth_failure.lock().ok().and_then(|mut g| g.take());
    match (result, auth) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(message)) => Err(Failure::Auth(message)),
        (Err(e), None) => Err(Failure::Git(e)),
    }
}

/// Credentials once, then an error; progress callbacks that abort when `stop` says so.
fn callbacks<'a>(
    req: &'a CloneRequest,
    stop: &'a (dyn Fn() -> bool + Sync),
    progress: &'a (dyn Fn(CloneProgress) + Sync),
    auth_failure: &'a std::sync::Mutex<Option<String>>,
) -> RemoteCallbacks<'a> {
    let calls = AtomicU32::new(0);
    let key_offered = AtomicBool::new(false);
    let mut cb = RemoteCallbacks::new();
    cb.credentials(move |asked_url, _user, allowed| {
        let call = calls.fetch_add(1, Ordering::SeqCst);
        if let Some(ssh_auth) = &req.ssh {
            return ssh_credentials(ssh_auth, call, allowed, &key_offered, auth_failure);
        }
        // Same-host redirects to another port are followed by libgit2 even with
        // `RemoteRedirect::None`; the token still goes only to the configured origin.
        let foreign = !crate::forge::same_origin(&req.url, asked_url);
        let refusal = match (&req.token, call) {
            _ if foreign => {
                Some("a server of another origin (a redirect) asked for credentials; refused")
            }
            (None, _) => Some("the server asks for credentials and deploy.auth.token is not set"),
            (Some(_), 0) if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) => None,
            (Some(_), 0) => Some("the server does not accept a user name and token"),
            (Some(_), _) => Some("the server rejected deploy.auth's user name and token"),
        };
        match (refusal, &req.token) {
            (None, Some(token)) => Cred::userpass_plaintext(&req.username, token.expose_secret()),
            (refusal, _) => {
                let message = refusal.unwrap_or("no credentials").to_owned();
                if let Ok(mut slot) = auth_failure.lock() {
                    *slot = Some(message.clone());
                }
                Err(git2::Error::from_str(&message))
            }
        }
    });
    cb.transfer_progress(move |p| {
        progress(CloneProgress {
            received_objects: p.received_objects(),
            total_objects: p.total_objects(),
            received_bytes: p.received_bytes(),
        });
        !stop()
    });
    cb.sideband_progress(move |_| !stop());
    cb
}

/// SSH: the user name when libgit2 asks for it alone, then the deploy key once.
fn ssh_credentials(
    ssh_auth: &SshAuth,
    call: u32,
    allowed: CredentialType,
    key_offered: &AtomicBool,
    auth_failure: &std::sync::Mutex<Option<String>>,
) -> Result<Cred, git2::Error> {
    if allowed.contains(CredentialType::USERNAME) && call == 0 {
        return Cred::username(&ssh_auth.user);
    }
    // The key once; libgit2 asks again after a rejection, and again, forever.
    if allowed.contains(CredentialType::SSH_KEY)
        && call <= 1
        && !key_offered.swap(true, Ordering::SeqCst)
    {
        return ssh::key_credentials(ssh_auth);
    }
    let message = ssh::key_rejected(ssh_auth, "deploy");
    if let Ok(mut slot) = auth_failure.lock() {
        *slot = Some(message.clone());
    }
    Err(git2::Error::from_str(&message))
}

/// Server answers that mean "no shallow fetches here".
fn refuses_shallow(error: &git2::Error) -> bool {
    let message = error.message().to_ascii_lowercase();
    message.contains("shallow") || message.contains("deepen")
}

fn is_network(error: &git2::Error) -> bool {
    matches!(
        error.class(),
        ErrorClass::Net | ErrorClass::Http | ErrorClass::Ssl | ErrorClass::Os
    )
}

fn other(req: &CloneRequest, message: &str) -> CheckoutError {
    CheckoutError::Other {
        url: req.url.clone(),
        branch: req.branch.clone(),
        message: message.to_owned(),
    }
}

/// Sleeps `total` in short slices; returns true when `stop` cut it short.
fn sleep_unless_stopped(total: Duration, stop: &(dyn Fn() -> bool + Sync)) -> bool {
    let slice = Duration::from_millis(100);
    let mut slept = Duration::ZERO;
    while slept < total {
        if stop() {
            return true;
        }
        std::thread::sleep(slice);
        slept += slice;
    }
    stop()
}

/// Empties `dir` (a previous try may have left files) and makes sure it exists, mode 0700.
fn reset_dir(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

/// Makes sure `work_dir` is private: created 0700 when missing (its parents as usual);
/// an existing one must be a real directory (not a symlink) owned by the effective user
/// and writable by no one else, or it is refused — on a shared host another user could
/// otherwise read tokens from checkouts or plant files in them. Blocking.
pub fn ensure_private_dir(work_dir: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(work_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = work_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(work_dir) {
                // Created meanwhile by someone else: check what is there now.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                other => other?,
            }
        }
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    check_private(work_dir)
}

fn check_private(dir: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing work_dir {}: {why}", dir.display()),
        ))
    };
    if !meta.file_type().is_dir() {
        return refuse("it is not a directory (a symlink?)".into());
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return refuse(format!(
            "it belongs to uid {}, not to Sentry's uid {euid}",
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return refuse(format!(
            "its mode {mode:o} lets others write in it; chmod 700 it"
        ));
    }
    Ok(())
}

/// Writes the changes file: mode 0600, created new (an existing file or a symlink planted
/// at its path is an error, never followed).
pub async fn write_changes_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .await?;
    file.write_all(contents).await?;
    file.flush().await
}

/// Creates `work_dir` when missing (see [`ensure_private_dir`]) and a fresh
/// `sentry-checkout-<run_id>-<repo>-<random>` directory (mode 0700) inside it. Blocking.
pub fn create_checkout_dir(work_dir: &Path, run_id: &str, repo: &str) -> io::Result<PathBuf> {
    ensure_private_dir(work_dir)?;
    let prefix = format!(
        "{CHECKOUT_PREFIX}{}-{}-",
        file_safe(run_id),
        file_safe(repo)
    );
    let dir = tempfile::Builder::new()
        .prefix(&prefix)
        .rand_bytes(6)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(work_dir)?;
    Ok(dir.keep())
}

/// The changes file of a checkout: beside it, outside the clone, removed with it.
pub fn changes_file(checkout: &Path) -> PathBuf {
    let mut name = checkout.as_os_str().to_owned();
    name.push(CHANGES_SUFFIX);
    PathBuf::from(name)
}

/// Removes a checkout directory and its changes file; what is already gone is fine. Blocking.
pub fn remove_checkout(checkout: &Path) -> io::Result<()> {
    let dir = remove_if_present(checkout, true);
    let file = remove_if_present(&changes_file(checkout), false);
    dir.and(file)
}

fn remove_if_present(path: &Path, is_dir: bool) -> io::Result<()> {
    let removed = if is_dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes every leftover checkout directory and changes file in `work_dir`; returns how
/// many entries it removed. A missing `work_dir` has nothing to sweep. Blocking.
pub fn sweep(work_dir: &Path) -> io::Result<usize> {
    match std::fs::symlink_metadata(work_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
        Ok(_) => check_private(work_dir)?,
    }
    let entries = std::fs::read_dir(work_dir)?;
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(CHECKOUT_PREFIX) {
            continue;
        }
        let is_dir = entry.file_type()?.is_dir();
        remove_if_present(&entry.path(), is_dir)?;
        removed += 1;
    }
    Ok(removed)
}

/// Keeps letters, digits, `.`, `_` and `-`; anything else becomes `_`.
fn file_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkout_names_are_recognisable_and_safe() {
        let work = tempfile::tempdir().unwrap();
        let dir = create_checkout_dir(&work.path().join("new"), "run/1 x", "repo-a").unwrap();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("sentry-checkout-run_1_x-repo-a-"),
            "{name}"
        );
        std::fs::write(changes_file(&dir), "[]").unwrap();
        std::fs::create_dir(work.path().join("new/other")).unwrap();
        assert_eq!(sweep(&work.path().join("new")).unwrap(), 2);
        assert!(work.path().join("new/other").exists());
        assert!(!dir.exists());
    }

    #[test]
    fn work_dirs_are_private_and_foreign_ones_refused() {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("a/b/work");
        let dir = create_checkout_dir(&work, "r", "x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&work), 0o700);
        assert_eq!(mode(&dir), 0o700);
        reset_dir(&dir).unwrap();
        assert_eq!(
            mode(&dir),
            0o700,
            "a retried clone's directory stays private"
        );

        let open = root.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = ensure_private_dir(&open).unwrap_err();
        assert!(error.to_string().contains("lets others write"), "{error}");
        assert!(sweep(&open).is_err());

        if nix::unistd::geteuid().is_root() {
            let foreign = root.path().join("foreign");
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&foreign)
                .unwrap();
            std::os::unix::fs::chown(&foreign, Some(12345), None).unwrap();
            let error = ensure_private_dir(&foreign).unwrap_err();
            assert!(
                error.to_string().contains("belongs to uid 12345"),
                "{error}"
            );
        }

        let link = root.path().join("link");
        std::os::unix::fs::symlink(&work, &link).unwrap();
        let error = ensure_private_dir(&link).unwrap_err();
        assert!(error.to_string().contains("not a directory"), "{error}");
    }

    #[tokio::test]
    async fn changes_files_are_0600_and_never_follow_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("c.changes.json");
        write_changes_file(&path, b"[]").await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            write_changes_file(&path, b"[]").await.is_err(),
            "create_new"
        );
        let target = root.path().join("target");
        let planted = root.path().join("planted.changes.json");
        std::os::unix::fs::symlink(&target, &planted).unwrap();
        assert!(write_changes_file(&planted, b"[]").await.is_err());
        assert!(!target.exists(), "the symlink was followed");
    }

    #[test]
    fn usernames_follow_the_host() {
        let mut deploy = Deploy {
            qa_repo_url: "https://gitlab.example/qa".into(),
            qa_repo_branch: "main".into(),
            repo_type: RepoType::Gitlab,
            auth: Default::default(),
            project_name: "p".into(),
            commands: vec!["true".into()],
            env: Default::default(),
            secret_env: Default::default(),
            inherit_env: Default::default(),
            timeout: None,
            retries: 0,
            shell: "/bin/sh".into(),
        };
        assert_eq!(clone_username(&deploy), "oauth2");
        deploy.repo_type = RepoType::Github;
        assert_eq!(clone_username(&deploy), "x-access-token");
        deploy.repo_type = RepoType::Git;
        assert_eq!(clone_username(&deploy), "git");
        deploy.auth.username = Some("alice".into());
        assert_eq!(clone_username(&deploy), "alice");
    }
}
