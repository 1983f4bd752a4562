//! The ETag validators as they are persisted beside the state, so that a restarted `watch`
//! (or the next `watch --once` of a CronJob) asks conditionally from its first request and
//! a `304` costs no primary quota.
//!
//! One entry per request URL: the repository it was asked for (to prune what is no longer
//! configured), the ETag exactly as received, and the value it stood for — a head SHA or
//! one page of a branch listing. Nothing secret is in it: tokens travel in headers only,
//! and URLs with credentials are never written (configuration refuses them anyway). The
//! document is separate from the state so that the state stays small; the state backend
//! stores it (`FileBackend`: `<state_file>.validators.json`).

use serde::{Deserialize, Serialize};

use super::Sha;

pub(crate) const FORMAT_VERSION: u32 = 1;

/// The persisted validators.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validators {
    pub version: u32,
    pub entries: Vec<Validator>,
}

/// One cached answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validator {
    /// The repository's config name.
    pub repo: String,
    pub url: String,
    /// As the forge sent it, quotes included.
    pub etag: String,
    pub value: StoredValue,
}

/// What an ETag stood for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StoredValue {
    Sha(Sha),
    Page {
        branches: Vec<(String, Sha)>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
}

impl Validators {
    pub fn new(entries: Vec<Validator>) -> Validators {
        Validators {
            version: FORMAT_VERSION,
            entries,
        }
    }
}

/// Whether `url` may be written down: http(s), and no user name or password in it.
pub(crate) fn storable(url: &url::Url) -> bool {
    matches!(url.scheme(), "https" | "http")
        && url.username().is_empty()
        && url.password().is_none()
}
