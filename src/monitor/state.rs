//! The persisted state: per (repository, branch) the last handled SHA, when it was seen,
//! the last deployment's outcome, and — apart from those — the change still pending and
//! why (a unit that could not run, or was skipped or cancelled).
//!
//! Where it is kept is the [`StateBackend`] seam: load, save, and the exclusive writer
//! lock that makes `watch` the one writer. [`FileBackend`] (a JSON file written atomically
//! — temp file, fsync, rename — beside a `flock`ed `<file>.lock`) is the default;
//! [`configmap::ConfigMapBackend`] keeps it in a ConfigMap for replicated `watch`.
//!
//! A unit that is running is *claimed* in the state (`claims`, with the leader's identity)
//! before its commands start and unclaimed when it ends, so that a new leader can tell an
//! interrupted unit from one that never started.

pub mod configmap;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::forge::Sha;
use crate::forge::validators::{self, Validators};
pub use crate::telemetry::now_rfc3339;

const FORMAT_VERSION: u32 = 1;

/// Names of the temp files a save writes before renaming them over the state file.
const TEMP_PREFIX: &str = ".state-";
const TEMP_SUFFIX: &str = ".tmp";

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
    /// Branches with a change that is not handled yet, and why; kept apart from
    /// `branches` so that the handled SHA never moves before the commands ran.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pending: BTreeMap<String, PendingRecord>,
    /// Units running now, per branch: who runs them. Left behind only by a replica that
    /// died or was deposed mid-unit.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, Claim>,
}

/// A unit claimed by the replica that runs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    pub sha: Sha,
    /// The identity of the replica (`POD_NAME`, else host and pid).
    pub holder: String,
    pub run_id: String,
    /// When the unit started (RFC 3339).
    pub since: String,
}

/// A change that did not run to an outcome yet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PendingRecord {
    pub sha: Sha,
    /// `skipped: a@main failed`, the clone error, `cancelled: Sentry is shutting down`.
    pub reason: String,
    /// Tries that could not run, in a row.
    pub tries: u32,
    /// When it is tried again (RFC 3339), unless the group runs earlier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_try_at: Option<String>,
    /// When it became pending (RFC 3339).
    pub since: String,
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
    #[error(
        "another sentry watch{} holds the lock {lock}: only one watch may use the state file {state}; \
         stop it, or give this one its own state_file",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Locked {
        lock: PathBuf,
        state: PathBuf,
        holder: Option<u32>,
    },
    #[error("cannot lock {lock}: {source}")]
    Lock {
        lock: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {action} the state in {what}: {reason}")]
    Cluster {
        what: String,
        action: &'static str,
        reason: String,
    },
    #[error(
        "the state in {what} was written by another replica since this one read it: this \
         replica is no longer the leader and stops"
    )]
    Fenced { what: String },
}

/// Where the state is kept. One implementation per kind of storage.
pub trait StateBackend: Send + Sync + std::fmt::Debug {
    /// For messages: `state file .sentry/state.json`.
    fn describe(&self) -> String;
    /// The stored state; `None` when nothing was stored yet.
    fn load(&self) -> Result<Option<State>, StateError>;
    /// Replaces the stored state with `state`, atomically. Blocking.
    fn save(&self, state: &State) -> Result<(), StateError>;
    /// Takes the exclusive writer lock, held until the returned guard is dropped; fails at
    /// once (never waits) when another process holds it.
    fn lock(&self) -> Result<WriterLock, StateError>;
    /// The persisted ETag validators, a document apart from the state; `None` when none
    /// are stored, or when this backend keeps none (the default). Blocking.
    fn load_validators(&self) -> Result<Option<Validators>, StateError> {
        Ok(None)
    }
    /// Replaces the stored validators. Blocking. The default keeps none.
    fn save_validators(&self, _validators: &Validators) -> Result<(), StateError> {
        Ok(())
    }
}

/// Proof of the writer lock; released on drop (or when the process dies).
pub struct WriterLock(#[allow(dead_code)] Box<dyn Send + Sync>);

impl std::fmt::Debug for WriterLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriterLock")
    }
}

/// The state as a JSON file, with `<file>.lock` beside it.
#[derive(Debug, Clone)]
pub struct FileBackend {
    path: PathBuf,
}

impl FileBackend {
    pub fn new(path: &Path) -> FileBackend {
        FileBackend {
            path: path.to_owned(),
        }
    }

    fn lock_path(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".lock");
        PathBuf::from(name)
    }

    /// `<state_file>.validators.json`: the ETag validators.
    pub fn validators_path(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".validators.json");
        PathBuf::from(name)
    }
}

impl StateBackend for FileBackend {
    fn describe(&self) -> String {
        format!("state file {}", self.path.display())
    }

    fn load(&self) -> Result<Option<State>, StateError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => parse(&bytes)
                .map(Some)
                .map_err(|reason| StateError::Corrupt {
                    path: self.path.clone(),
                    reason,
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn save(&self, state: &State) -> Result<(), StateError> {
        let write_error = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        let bytes =
            serde_json::to_vec_pretty(state).map_err(|e| write_error(std::io::Error::other(e)))?;
        write_atomically(&self.path, &bytes).map_err(write_error)
    }

    fn lock(&self) -> Result<WriterLock, StateError> {
        let lock = self.lock_path();
        let failed = |source| StateError::Lock {
            lock: lock.clone(),
            source,
        };
        if let Some(dir) = lock.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(failed)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .map_err(failed)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                return Err(StateError::Locked {
                    holder: holder_pid(&mut file),
                    lock,
                    state: self.path.clone(),
                });
            }
            Err((_, errno)) => return Err(failed(errno.into())),
        };
        sweep_temp_files(&self.path);
        // The pid is for the message a second watch prints; the lock itself is the flock.
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.flush());
        if let Err(e) = written {
            tracing::warn!("cannot write the pid into {}: {e}", lock.display());
        }
        Ok(WriterLock(Box::new(file)))
    }

    fn load_validators(&self) -> Result<Option<Validators>, StateError> {
        let path = self.validators_path();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let parsed: Validators =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if parsed.version != validators::FORMAT_VERSION {
                    return Err(StateError::Corrupt {
                        path,
                        reason: format!(
                            "format version {} is not the supported version {}",
                            parsed.version,
                            validators::FORMAT_VERSION
                        ),
                    });
                }
                Ok(Some(parsed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    fn save_validators(&self, validators: &Validators) -> Result<(), StateError> {
        let path = self.validators_path();
        let write_error = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        // Compact: 10,000 branches of validators are a few MiB pretty-printed.
        let bytes =
            serde_json::to_vec(validators).map_err(|e| write_error(std::io::Error::other(e)))?;
        write_atomically(&path, &bytes).map_err(write_error)
    }
}

/// Removes temp files a killed writer left beside the state file. Only the lock holder
/// calls this: no other writer can be halfway through a save.
fn sweep_temp_files(state: &Path) {
    let dir = match state.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!("cannot remove the stale temp file {name}: {e}");
            }
        }
    }
}

fn holder_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// The state shared by the poll loop and the deploy observers, and its backend.
#[derive(Debug)]
pub struct StateStore {
    backend: Box<dyn StateBackend>,
    /// Who claims units in this state: the replica's identity.
    holder: String,
    /// Cancelled when a write found that another replica wrote since (the backend's
    /// fencing): from then on nothing is written, and `watch` stands down.
    fenced: tokio_util::sync::CancellationToken,
    state: Mutex<State>,
    /// Serialises writers so that an older snapshot never lands after a newer one.
    write_lock: Mutex<()>,
    /// The ETag validators loaded at start, until the forges take them.
    loaded_validators: Mutex<Option<Validators>>,
}

impl StateStore {
    /// Reads the state file at `path` ([`FileBackend`]); a missing file is an empty state,
    /// an unreadable or corrupt one an error.
    pub fn load(path: &Path) -> Result<StateStore, StateError> {
        StateStore::open(Box::new(FileBackend::new(path)))
    }

    /// Reads the state from `backend`; nothing stored yet is an empty state.
    pub fn open(backend: Box<dyn StateBackend>) -> Result<StateStore, StateError> {
        let loaded = backend.load()?;
        Ok(StateStore::with_loaded(backend, loaded))
    }

    /// A store over `backend` holding `loaded`, what `backend.load()` returned.
    pub fn with_loaded(backend: Box<dyn StateBackend>, loaded: Option<State>) -> StateStore {
        let state = loaded.unwrap_or_else(|| State {
            version: FORMAT_VERSION,
            ..State::default()
        });
        StateStore {
            backend,
            holder: crate::leader::identity(),
            fenced: tokio_util::sync::CancellationToken::new(),
            state: Mutex::new(state),
            write_lock: Mutex::new(()),
            loaded_validators: Mutex::new(None),
        }
    }

    /// `state file .sentry/state.json`, for messages.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// The identity claims are made under.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Claims found at start that another replica left behind, as `repo@branch sha by
    /// holder`, and drops them: those units were interrupted, and since their SHA did not
    /// advance they run again (at-least-once).
    pub fn take_foreign_claims(&self) -> Vec<String> {
        self.with(|state| {
            let mut found = Vec::new();
            for (name, repo) in &mut state.repositories {
                for (branch, claim) in std::mem::take(&mut repo.claims) {
                    found.push(format!(
                        "{name}@{branch} {} (claimed by {} since {}, run {})",
                        claim.sha.short(),
                        claim.holder,
                        claim.since,
                        claim.run_id
                    ));
                }
            }
            found
        })
    }

    /// Reads the persisted ETag validators from the backend and keeps them until
    /// [`StateStore::take_validators`]. A missing or unreadable document is no error: the
    /// validators are a cache (an unreadable one is logged and rewritten later). Blocking.
    pub fn load_validators(&self) {
        let loaded = match self.backend.load_validators() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("ignoring the saved ETag validators: {e}");
                None
            }
        };
        *self
            .loaded_validators
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = loaded;
    }

    /// The validators [`StateStore::load_validators`] read, once.
    pub fn take_validators(&self) -> Option<Validators> {
        self.loaded_validators
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Writes the ETag validators through the backend. Blocking. Nothing is written once
    /// the state was fenced off.
    pub fn save_validators(&self, validators: &Validators) -> Result<(), StateError> {
        if self.fenced.is_cancelled() {
            return Err(StateError::Fenced {
                what: self.describe(),
            });
        }
        self.backend.save_validators(validators)
    }

    /// The writer lock of the backend; see [`StateBackend::lock`].
    pub fn lock(&self) -> Result<WriterLock, StateError> {
        self.backend.lock()
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
        if self.fenced.is_cancelled() {
            return Err(StateError::Fenced {
                what: self.describe(),
            });
        }
        let snapshot = self.snapshot();
        let saved = self.backend.save(&snapshot);
        if matches!(saved, Err(StateError::Fenced { .. })) {
            self.fenced.cancel();
        }
        saved
    }

    /// Cancelled once a write was fenced off: another replica owns the state now.
    pub fn fenced(&self) -> &tokio_util::sync::CancellationToken {
        &self.fenced
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
                repo_state
                    .pending
                    .retain(|branch, _| repo.monitor.watches(branch));
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
        .prefix(TEMP_PREFIX)
        .suffix(TEMP_SUFFIX)
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
            backend: Box::new(FileBackend::new(
                &dir.path().join("missing-parent-is-a-file/state.json"),
            )),
            holder: "test".into(),
            fenced: tokio_util::sync::CancellationToken::new(),
            state: Mutex::new(sample()),
            write_lock: Mutex::new(()),
            loaded_validators: Mutex::new(None),
        };
        std::fs::write(dir.path().join("missing-parent-is-a-file"), b"x").unwrap();
        assert!(matches!(blocked.save(), Err(StateError::Write { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn the_writer_lock_is_exclusive_and_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::new(&dir.path().join("state.json"));
        let held = backend.lock().unwrap();
        // A second open file description conflicts, as a second process would.
        let err = backend.lock().unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, StateError::Locked { holder: Some(pid), .. } if pid == std::process::id()),
            "{text}"
        );
        assert!(text.contains("state.json.lock"), "{text}");
        drop(held);
        assert!(backend.lock().is_ok(), "released on drop");
    }

    #[test]
    fn pending_records_round_trip_apart_from_the_handled_sha() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = StateStore::load(&path).unwrap();
        let mut state = sample();
        state.repositories.get_mut("rag").unwrap().pending.insert(
            "main".into(),
            PendingRecord {
                sha: sha('b'),
                reason: "skipped: a@main failed".into(),
                tries: 0,
                next_try_at: None,
                since: now_rfc3339(),
            },
        );
        store.with(|s| *s = state.clone());
        store.save().unwrap();
        let again = StateStore::load(&path).unwrap().snapshot();
        assert_eq!(again, state);
        assert_eq!(again.repositories["rag"].branches["main"].sha, sha('a'));
    }
}
