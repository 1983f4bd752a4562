//! Trust for HTTPS: the extra certificate authorities (`tls.ca_file`, `GIT_SSL_CAINFO`)
//! added to the system roots, for the API client (rustls) and for libgit2 (OpenSSL).
//!
//! libgit2 keeps one OpenSSL context per process, so its extra roots are process-wide:
//! they are recorded here once, when the forge clients are built, and loaded into
//! libgit2 by `git::prepare_libgit2` before its first network operation.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The CA files for libgit2, recorded by the first `Forges::new` of the process.
static GIT_CA_FILES: OnceLock<Vec<PathBuf>> = OnceLock::new();

/// Why a CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("cannot read the CA file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the CA file {path} holds no usable PEM certificate: {message}")]
    Pem { path: String, message: String },
}

/// The certificates of `files` for reqwest, merged with the system roots by the caller.
pub(crate) fn certificates(files: &[PathBuf]) -> Result<Vec<reqwest::Certificate>, TlsError> {
    let mut out = Vec::new();
    for file in files {
        let path = file.display().to_string();
        let pem = std::fs::read(file).map_err(|source| TlsError::Read {
            path: path.clone(),
            source,
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| TlsError::Pem {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if certs.is_empty() {
            return Err(TlsError::Pem {
                path,
                message: "no certificate found".to_owned(),
            });
        }
        out.extend(certs);
    }
    Ok(out)
}

/// The hosts (`host` or `host:port`, as the HTTP client keys them) a repository talks to:
/// its API, its watched repository, its QA repository and the APIs of its GitHub Apps.
pub(crate) fn repository_hosts(repo: &crate::config::Repository) -> Vec<String> {
    let mut urls: Vec<String> = vec![
        repo.monitor.repo_url.clone(),
        repo.deploy.qa_repo_url.clone(),
    ];
    urls.extend(repo.monitor.api_url.iter().map(|u| u.to_string()));
    for auth in [&repo.monitor.auth, &repo.deploy.auth] {
        urls.extend(auth.github_app.iter().map(|app| app.api_url.clone()));
    }
    let mut hosts: Vec<String> = urls
        .iter()
        .filter_map(|u| reqwest::Url::parse(u).ok())
        .filter(|u| u.has_host())
        .map(|u| super::http::host_key(&u).to_owned())
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Records `files` for libgit2 (the first call wins; one configuration per process).
pub(crate) fn set_git_ca_files(files: &[PathBuf]) {
    let _ = GIT_CA_FILES.set(files.to_vec());
}

/// The files recorded by [`set_git_ca_files`].
pub(crate) fn git_ca_files() -> &'static [PathBuf] {
    GIT_CA_FILES.get().map(Vec::as_slice).unwrap_or(&[])
}

/// Adds `file` to libgit2's trusted roots (besides the system's).
///
/// # Safety
/// Writes libgit2's process-wide OpenSSL context: no clone or ls-remote may run at the
/// same time (see `git::prepare_libgit2`).
pub(crate) unsafe fn add_git_ca_file(file: &Path) -> Result<(), git2::Error> {
    // SAFETY: the caller guarantees no network operation of libgit2 runs concurrently.
    unsafe { git2::opts::set_ssl_cert_file(file) }
}
