//! Forge clients: ask GitHub, GitLab or any Git host for the head SHA of watched branches.
//!
//! One [`Forges`] value per process holds the shared HTTP client, the per-host concurrency
//! limits and rate-limit pauses, and the ETag cache. It never decides what a change is:
//! it reports what the forge said ([`Observation`]), and the monitor compares.

use std::collections::BTreeMap;
use std::time::SystemTime;

/// A full 40-hex commit SHA, checked on construction.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Sha(String);

impl Sha {
    pub fn parse(text: &str) -> Option<Sha> {
        let text = text.trim();
        (text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Sha(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 8 characters, for log lines.
    pub fn short(&self) -> &str {
        &self.0[..8]
    }
}

impl std::fmt::Display for Sha {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Sha {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Sha::parse(&value).ok_or_else(|| format!("not a 40-hex commit SHA: {value:?}"))
    }
}

impl From<Sha> for String {
    fn from(sha: Sha) -> String {
        sha.0
    }
}

/// What a forge said about one repository's watched branches in one check.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Head of every watched branch the forge answered for (exact names and pattern matches).
    pub heads: BTreeMap<String, Sha>,
    /// Watched branches that could not be checked; `branch: None` means the listing that
    /// serves the patterns failed.
    pub failures: Vec<BranchFailure>,
    /// True when the listing behind the patterns succeeded, so a pattern branch absent
    /// from `heads` really is gone. False when the repository has no patterns.
    pub listing_complete: bool,
}

#[derive(Debug, Clone)]
pub struct BranchFailure {
    pub branch: Option<String>,
    pub error: ForgeError,
}

/// Why a forge could not answer, by what the caller should do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForgeError {
    /// Back off: every request to this host waits until `until`.
    #[error("rate limited by {host} until {}", humantime::format_rfc3339_seconds(*.until))]
    RateLimited { host: String, until: SystemTime },
    /// Give up on this repository for now (401, 403 that is no rate limit): fix the token.
    #[error("{0}")]
    Auth(String),
    /// Give up on this repository or branch for now (404): renamed, or missing branch.
    #[error("{0}")]
    NotFound(String),
    /// Retry soon: 5xx, timeout, connection error (after the in-cycle retries).
    #[error("{0}")]
    Transient(String),
    /// The answer was not what the API promises (no SHA, bad JSON).
    #[error("{0}")]
    Malformed(String),
}

impl ForgeError {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ForgeError::RateLimited { .. } => "rate_limited",
            ForgeError::Auth(_) => "auth",
            ForgeError::NotFound(_) => "not_found",
            ForgeError::Transient(_) => "transient",
            ForgeError::Malformed(_) => "malformed",
        }
    }

    /// Errors that call for per-repository backoff across cycles.
    pub fn backs_off_repository(&self) -> bool {
        matches!(self, ForgeError::Auth(_) | ForgeError::NotFound(_))
    }
}
