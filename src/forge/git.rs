//! Any Git host (`repo_type: git`), `file://` URLs and local paths: `ls-remote` through git2.
//!
//! One `ls-remote` per check answers both the exact branches and the patterns: libgit2
//! receives every ref the server advertises, of which only `refs/heads/*` count. It runs in
//! `spawn_blocking`, bounded by the host's concurrency limit and `request_timeout`, and is
//! retried like an HTTP request when the failure looks transient.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use git2::{CredentialType, Direction, ErrorClass, ErrorCode};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use super::http::{Http, cancelled, retry_delay};
use super::kind::Kind;
use super::{ForgeError, Observation, Sha, assemble};
use crate::config::{RepoType, Repository};

/// Any Git host: no API, so no project rule, no rate-limit headers and no webhooks.
pub(crate) static KIND: Kind = Kind {
    repo_type: RepoType::Git,
    name: "git",
    clone_username: "git",
    project: None,
    default_api: |_, _| None,
    owns_host: |_| false,
    budget: None,
    rate_limit_headers: None,
    // A Git host has no API, so nowhere to put a status.
    status_spacing: None,
    webhook: None,
    // A plain Git host has no known web UI.
    commit_url: |_, _| None,
};

const TRIES: u32 = 3;
/// Username sent with a token when none is configured; GitLab needs `oauth2` for OAuth
/// tokens, and GitHub and GitLab accept any name with a personal access token.
const DEFAULT_USERNAME: &str = "oauth2";

pub(crate) async fn observe(
    http: Arc<Http>,
    repo: Arc<Repository>,
    cancel: &CancellationToken,
) -> Observation {
    let listed = ls_remote(&http, &repo, cancel).await;
    let monitor = &repo.monitor;
    let exact = monitor
        .exact_branches()
        .map(|branch| (branch.to_owned(), pick(&repo, &listed, branch)))
        .collect();
    let listing = monitor.patterns().next().map(|_| {
        listed.clone().map(|heads| {
            heads
                .into_iter()
                .filter(|(name, _)| monitor.patterns().any(|p| p.matches(name)))
                .collect::<Vec<_>>()
        })
    });
    assemble(exact, listing)
}

pub(crate) async fn branch_head(
    http: Arc<Http>,
    repo: Arc<Repository>,
    branch: &str,
    cancel: &CancellationToken,
) -> Result<Sha, ForgeError> {
    let listed = ls_remote(&http, &repo, cancel).await;
    pick(&repo, &listed, branch)
}

/// The full SHA an abbreviated one names, among the heads the remote advertises: the Git
/// protocol cannot look up an arbitrary commit, only what the server lists.
pub(crate) async fn commit(
    http: Arc<Http>,
    repo: Arc<Repository>,
    prefix: &str,
    cancel: &CancellationToken,
) -> Result<Sha, ForgeError> {
    let heads = ls_remote(&http, &repo, cancel).await?;
    let mut found: Vec<&Sha> = heads
        .values()
        .filter(|sha| sha.as_str().starts_with(prefix))
        .collect();
    found.dedup();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(ForgeError::NotFound(format!(
            "{}: {prefix} is not the head of any branch of {}; a plain Git host can resolve only those, so give the full 40-hex SHA",
            repo.name,
            redact(&repo.monitor.repo_url)
        ))),
        _ => Err(ForgeError::NotFound(format!(
            "{}: {prefix} names more than one branch head; give more characters",
            repo.name
        ))),
    }
}

fn pick(
    repo: &Repository,
    listed: &Result<BTreeMap<String, Sha>, ForgeError>,
    branch: &str,
) -> Result<Sha, ForgeError> {
    match listed {
        Ok(heads) => heads.get(branch).cloned().ok_or_else(|| {
            ForgeError::NotFound(format!(
                "{}: branch {branch} does not exist in {}",
                repo.name,
                redact(&repo.monitor.repo_url)
            ))
        }),
        Err(error) => Err(error.clone()),
    }
}

/// Every branch head the remote advertises, retrying transient failures.
async fn ls_remote(
    http: &Http,
    repo: &Arc<Repository>,
    cancel: &CancellationToken,
) -> Result<BTreeMap<String, Sha>, ForgeError> {
    let host = http.host(&host_of(&repo.monitor.repo_url));
    let mut last = None;
    for attempt in 1..=TRIES {
        let result = {
            let Some(_permit) = host.permit(cancel).await else {
                return Err(cancelled(&repo.name));
            };
            let started = std::time::Instant::now();
            let result = once(http, repo, cancel).await;
            http.count_other(host.name(), result.is_ok());
            tracing::debug!(
                repo = %repo.name,
                url = %redact(&repo.monitor.repo_url),
                host = host.name(),
                ok = result.is_ok(),
                ms = started.elapsed().as_millis() as u64,
                "git ls-remote"
            );
            result
        };
        match result {
            Err(error @ ForgeError::Transient(_)) if attempt < TRIES && !cancel.is_cancelled() => {
                last = Some(error);
                tokio::select! {
                    () = cancel.cancelled() => return Err(cancelled(&repo.name)),
                    () = tokio::time::sleep(retry_delay(attempt)) => {}
                }
            }
            other => return other,
        }
    }
    Err(last.unwrap_or_else(|| cancelled(&repo.name)))
}

/// Sets libgit2's process-wide options once, before Sentry's first clone or ls-remote:
/// - network timeouts: libgit2 waits forever on a server that stops answering;
/// - no second hash check of every object read: a clone's objects were hashed as the pack
///   was indexed, and hashing them again during the checkout cost about an eighth of a
///   20,000-file clone's CPU (git does not re-check either).
///
/// Deferred to that point rather than done at start because libgit2's start-up loads
/// OpenSSL and the system's CA bundle: about 4 MiB a watcher of API forges does not need
/// until its first deployment.
pub fn prepare_libgit2() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        git2::opts::strict_hash_verification(false);
        // SAFETY: these write two libgit2 globals that only its socket streams read. Every
        // network operation of Sentry's calls this first and blocks until it has returned,
        // so no clone or ls-remote reads them while they are written.
        let set = unsafe {
            git2::opts::set_server_connect_timeout_in_milliseconds(10_000)
                .and_then(|()| git2::opts::set_server_timeout_in_milliseconds(60_000))
        };
        if let Err(e) = set {
            tracing::debug!("cannot set libgit2 network timeouts: {e}");
        }
        for file in super::tls::git_ca_files() {
            // SAFETY: as above, no network operation runs while this is written.
            if let Err(e) = unsafe { super::tls::add_git_ca_file(file) } {
                tracing::warn!("cannot add the CA file {} for Git: {e}", file.display());
            }
        }
    });
}

/// One ls-remote in a blocking thread, abandoned (left to finish on its own) on cancel or
/// after the request timeout.
async fn once(
    http: &Http,
    repo: &Arc<Repository>,
    cancel: &CancellationToken,
) -> Result<BTreeMap<String, Sha>, ForgeError> {
    let task = tokio::task::spawn_blocking({
        let repo = repo.clone();
        move || list_heads(&repo)
    });
    let timeout = http.request_timeout();
    tokio::select! {
        () = cancel.cancelled() => Err(cancelled(&repo.name)),
        joined = tokio::time::timeout(timeout, task) => match joined {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(ForgeError::Transient(format!("{}: ls-remote failed: {e}", repo.name))),
            Err(_) => Err(ForgeError::Transient(format!(
                "{}: ls-remote of {} timed out after {}",
                repo.name,
                redact(&repo.monitor.repo_url),
                humantime::format_duration(timeout)
            ))),
        },
    }
}

/// The blocking part: connect, list, keep `refs/heads/*`.
fn list_heads(repo: &Repository) -> Result<BTreeMap<String, Sha>, ForgeError> {
    prepare_libgit2();
    let url = &repo.monitor.repo_url;
    let auth = &repo.monitor.auth;
    let rejected = Arc::new(AtomicBool::new(false));
    let asked_without_token = Arc::new(AtomicBool::new(false));

    let mut callbacks = git2::RemoteCallbacks::new();
    let (mut offered, mut calls) = (false, 0u32);
    let (flag_rejected, flag_no_token) = (rejected.clone(), asked_without_token.clone());
    callbacks.credentials(move |asked_url, username_from_url, allowed| {
        calls += 1;
        // A redirect to another origin gets nothing: the token is for `url` alone.
        if !same_origin(url, asked_url) {
            flag_rejected.store(true, Ordering::Relaxed);
            return Err(git2::Error::from_str(
                "credentials refused to a server of another origin (redirect)",
            ));
        }
        // SSH first asks for a user name alone; that is no attempt, but bound it too.
        if allowed.contains(CredentialType::USERNAME) && calls <= 2 {
            return git2::Cred::username(username_from_url.unwrap_or("git"));
        }
        // libgit2 asks again after every rejection, forever: offer credentials once.
        if offered || calls > 3 {
            flag_rejected.store(true, Ordering::Relaxed);
            return Err(git2::Error::from_str("credentials rejected"));
        }
        offered = true;
        let user = auth
            .username
            .as_deref()
            .or(username_from_url)
            .unwrap_or(DEFAULT_USERNAME);
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            if let Some(token) = &auth.token {
                return git2::Cred::userpass_plaintext(user, token.expose_secret());
            }
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            return git2::Cred::ssh_key_from_agent(username_from_url.unwrap_or("git"));
        }
        flag_no_token.store(true, Ordering::Relaxed);
        Err(git2::Error::from_str("no credentials configured"))
    });

    let result = (|| {
        let mut remote = git2::Remote::create_detached(url.as_str())?;
        let connection = remote.connect_auth(Direction::Fetch, Some(callbacks), None)?;
        let mut heads = BTreeMap::new();
        for head in connection.list()? {
            if let Some(branch) = head.name().strip_prefix("refs/heads/") {
                if let Some(sha) = Sha::parse(&head.oid().to_string()) {
                    heads.insert(branch.to_owned(), sha);
                }
            }
        }
        Ok::<_, git2::Error>(heads)
    })();

    result.map_err(|e| {
        classify(
            repo,
            &e,
            rejected.load(Ordering::Relaxed),
            asked_without_token.load(Ordering::Relaxed),
        )
    })
}

fn classify(repo: &Repository, error: &git2::Error, rejected: bool, no_token: bool) -> ForgeError {
    let name = &repo.name;
    let url = redact(&repo.monitor.repo_url);
    let mut message = error.message().to_owned();
    if let Some(token) = &repo.monitor.auth.token {
        let token = token.expose_secret();
        if !token.is_empty() {
            message = message.replace(token, "***");
        }
    }
    let lower = message.to_ascii_lowercase();
    if is_certificate_error(error) {
        return ForgeError::Certificate(format!(
            "{name}: the TLS certificate of {url} was refused ({message}); check the URL and the trust (tls.ca_file, GIT_SSL_CAINFO, SSL_CERT_FILE)"
        ));
    }
    if rejected || error.code() == ErrorCode::Auth {
        return ForgeError::Auth(format!(
            "{name}: {url} rejected the credentials (bad or expired token)"
        ));
    }
    if no_token || lower.contains("authentication required") {
        return ForgeError::Auth(format!(
            "{name}: {url} requires credentials; set monitor.auth.token"
        ));
    }
    if local_path_missing(&repo.monitor.repo_url)
        || error.code() == ErrorCode::NotFound
        || lower.contains("not found")
        || lower.contains("404")
        || lower.contains("does not appear to be a git repository")
        || lower.contains("could not find repository")
        || (error.class() == ErrorClass::Os && lower.contains("no such file"))
    {
        return ForgeError::NotFound(format!(
            "{name}: no Git repository at {url} — renamed, moved, or private without a token ({message})"
        ));
    }
    ForgeError::Transient(format!("{name}: ls-remote of {url} failed: {message}"))
}

/// Whether libgit2 refused the server's certificate: a configuration error, not retried.
pub fn is_certificate_error(error: &git2::Error) -> bool {
    error.code() == ErrorCode::Certificate
        || (error.class() == ErrorClass::Ssl
            && error.message().to_ascii_lowercase().contains("certificate"))
}

/// The host part of a Git URL (`host` or `host:port`), `local` for paths and `file://`.
fn host_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) if u.scheme() == "file" => "local".to_owned(),
        Ok(u) if u.host_str().is_some() => super::http::host_key(&u).to_owned(),
        // scp-like `git@host:path`
        _ if !url.starts_with('/') && !url.starts_with('.') && url.contains(':') => url
            .split(':')
            .next()
            .and_then(|h| h.rsplit('@').next())
            .unwrap_or("local")
            .to_owned(),
        _ => "local".to_owned(),
    }
}

/// Whether `url` is a local path or `file://` URL naming nothing (libgit2 then reports
/// "unsupported URL protocol", which would read like a transient problem).
fn local_path_missing(url: &str) -> bool {
    let path = match url::Url::parse(url) {
        Ok(u) if u.scheme() == "file" => match u.to_file_path() {
            Ok(path) => path,
            Err(()) => return false,
        },
        Ok(u) if u.scheme().len() > 1 => return false,
        _ if host_of(url) != "local" => return false,
        _ => std::path::PathBuf::from(url),
    };
    !path.exists()
}

/// Whether libgit2 may hand credentials configured for `configured` to `asked`, the URL of
/// the server that wants them. Over http(s) only the same scheme, host and port qualify:
/// a server that redirects elsewhere (even to another port of the same host, which
/// libgit2 does not count as "off-site") must not receive the token. Other transports
/// (SSH, local) cannot redirect, so they always qualify.
pub fn same_origin(configured: &str, asked: &str) -> bool {
    let Ok(configured) = url::Url::parse(configured) else {
        return true;
    };
    if !matches!(configured.scheme(), "http" | "https") {
        return true;
    }
    let Ok(asked) = url::Url::parse(asked) else {
        return false;
    };
    configured.scheme() == asked.scheme()
        && configured.host_str().map(str::to_ascii_lowercase)
            == asked.host_str().map(str::to_ascii_lowercase)
        && configured.port_or_known_default() == asked.port_or_known_default()
}

/// The URL without any password it may carry, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_git_urls() {
        assert_eq!(
            host_of("https://git.example.com/a/b.git"),
            "git.example.com"
        );
        assert_eq!(host_of("http://127.0.0.1:9000/a.git"), "127.0.0.1:9000");
        assert_eq!(host_of("git@github.com:a/b.git"), "github.com");
        assert_eq!(host_of("file:///srv/git/a.git"), "local");
        assert_eq!(host_of("/srv/git/a.git"), "local");
    }

    #[test]
    fn credentials_stay_with_their_origin() {
        let url = "https://git.example.com/a/b.git";
        assert!(same_origin(
            url,
            "https://git.example.com/a/b.git/info/refs"
        ));
        assert!(same_origin(url, "https://GIT.example.com:443/other"));
        assert!(!same_origin(url, "https://evil.example.com/a/b.git"));
        assert!(!same_origin(url, "http://git.example.com/a/b.git"));
        assert!(!same_origin(url, "https://git.example.com:8443/a/b.git"));
        assert!(!same_origin(
            "http://127.0.0.1:9000/a.git",
            "http://127.0.0.1:9001/a.git"
        ));
        assert!(!same_origin(url, "not a url"));
        assert!(same_origin(
            "git@github.com:a/b.git",
            "git@github.com:a/b.git"
        ));
        assert!(same_origin("/srv/git/a.git", "/srv/git/a.git"));
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("https://me:s3cret@host/a.git"),
            "https://me:***@host/a.git"
        );
        assert_eq!(redact("/srv/a.git"), "/srv/a.git");
    }
}
