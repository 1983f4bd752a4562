//! The persisted state: per (repository, branch) the last handled SHA, when it was seen,
//! and the last deployment's outcome. Written atomically (temp file, fsync, rename) so a
//! crash at any point leaves either the old file or the new one, never a torn one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::forge::Sha;
pub use crate::telemetry::now_rfc3339;

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    pub repositories: BTreeMap<String, RepoState>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RepoState {
    pub branches: BTreeMap<String, BranchState>,
    /// Patterns whose first listing has been taken as the baseline; a branch matching one
    /// of these that appears later is a change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub baselined_patterns: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BranchState {
    /// The last handled SHA: the baseline, or the SHA of the last deployment that ended.
    pub sha: Sha,
    /// When `sha` was recorded (RFC 3339).
    pub seen_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_deploy: Option<DeployRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeployRecord {
    pub sha: Sha,
    /// `succeeded`, `failed`, `timed_out`, `skipped`.
    pub result: String,
    /// When the unit ended (RFC 3339).
    pub at: String,
    pub run_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state file {path} is corrupt ({reason}); it was left untouched: fix or move it away \
         (without it every branch is taken as a new baseline)"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write state file {path}: {source}; the previous file is intact")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The state shared by the poll loop and the deploy hooks, and its file.
#[derive(Debug)]
pub struct StateStore {
    path: PathBuf,
    state: Mutex<State>,
    /// Serialises writers so that an older snapshot never lands after a newer one.
    write_lock: Mutex<()>,
}

impl StateStore {
    /// Reads `path`; a missing file is an empty state, an unreadable or corrupt one an error.
    pub fn load(path: &Path) -> Result<StateStore, StateError> {
        let state = match std::fs::read(path) {
            Ok(bytes) => parse(&bytes).map_err(|reason| StateError::Corrupt {
                path: path.to_owned(),
                reason,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                version: FORMAT_VERSION,
                ..State::default()
            },
            Err(source) => {
                return Err(StateError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Ok(StateStore {
            path: path.to_owned(),
            state: Mutex::new(state),
            write_lock: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the state under the lock.
    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut guard = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }

    pub fn snapshot(&self) -> State {
        self.with(|s| s.clone())
    }

    pub fn branch(&self, repo: &str, branch: &str) -> Option<BranchState> {
        self.with(|s| s.repositories.get(repo)?.branches.get(branch).cloned())
    }

    /// Writes the current state atomically. Blocking: call from `spawn_blocking` in async code.
    pub fn save(&self) -> Result<(), StateError> {
        let _writer = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = self
            .with(|s| serde_json::to_vec_pretty(s))
            .map_err(|e| StateError::Write {
                path: self.path.clone(),
                source: std::io::Error::other(e),
            })?;
        write_atomically(&self.path, &bytes).map_err(|source| StateError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// [`StateStore::save`] off the async threads; logs a failure and returns whether the
    /// state is on disk.
    pub async fn save_async(self: &Arc<Self>) -> bool {
        let store = self.clone();
        match tokio::task::spawn_blocking(move || store.save()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!("{e}");
                false
            }
            Err(e) => {
                tracing::error!("state save task failed: {e}");
                false
            }
        }
    }

    /// Drops repositories and branches that the configuration no longer watches.
    /// Returns what was dropped, as `repo` or `repo/branch`, for the log.
    pub fn retain_configured(&self, config: &Config) -> Vec<String> {
        self.with(|state| {
            let mut dropped = Vec::new();
            state.repositories.retain(|name, repo_state| {
                let Some(repo) = config.repository(name) else {
                    dropped.push(name.clone());
                    return false;
                };
                repo_state.branches.retain(|branch, _| {
                    let keep = repo.monitor.watches(branch);
                    if !keep {
                        dropped.push(format!("{name}/{branch}"));
                    }
                    keep
                });
                let patterns: Vec<&str> =
                    repo.monitor.patterns().map(|p| p.glob.as_str()).collect();
                repo_state
                    .baselined_patterns
                    .retain(|p| patterns.contains(&p.as_str()));
                true
            });
            dropped
        })
    }
}

fn parse(bytes: &[u8]) -> Result<State, String> {
    let state: State = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if state.version != FORMAT_VERSION {
        return Err(format!(
            "format version {} is not the supported version {FORMAT_VERSION}",
            state.version
        ));
    }
    Ok(state)
}

/// Temp file in the same directory, fsync, rename over the target, fsync the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".state-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(c: char) -> Sha {
        Sha::parse(&c.to_string().repeat(40)).unwrap()
    }

    fn sample() -> State {
        let mut state = State {
            version: FORMAT_VERSION,
            ..State::default()
        };
        let repo = state.repositories.entry("rag".into()).or_default();
        repo.branches.insert(
            "main".into(),
            BranchState {
                sha: sha('a'),
                seen_at: now_rfc3339(),
                last_deploy: None,
            },
        );
        state
    }

    #[test]
    fn missing_file_is_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::load(&dir.path().join("state.json")).unwrap();
        assert!(store.snapshot().repositories.is_empty());
    }

    #[test]
    fn round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        let store = StateStore::load(&path).unwrap();
        store.with(|s| *s = sample());
        store.save().unwrap();
        let again = StateStore::load(&path).unwrap();
        assert_eq!(again.snapshot(), sample());
        // No temp files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn corrupt_file_is_an_error_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let torn = b"{\"version\": 1, \"repositories\": {\"a\": ";
        std::fs::write(&path, torn).unwrap();
        let err = StateStore::load(&path).unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("state.json"));
        assert_eq!(std::fs::read(&path).unwrap(), torn);
    }

    #[test]
    fn failed_write_keeps_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = StateStore::load(&path).unwrap();
        store.with(|s| *s = sample());
        store.save().unwrap();
        let before = std::fs::read(&path).unwrap();
        // A directory where the temp file would go makes the write fail midway.
        let blocked = StateStore {
            path: dir.path().join("missing-parent-is-a-file/state.json"),
            state: Mutex::new(sample()),
            write_lock: Mutex::new(()),
        };
        std::fs::write(dir.path().join("missing-parent-is-a-file"), b"x").unwrap();
        assert!(matches!(blocked.save(), Err(StateError::Write { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
}
