//! The state in Kubernetes ConfigMaps (`state.backend: kubernetes`): the same JSON as the
//! file backend, written with the `resourceVersion` this replica last read or wrote. A
//! write that fails with `409` means another replica wrote since — this one was deposed —
//! and it stands down ([`StateError::Fenced`]).
//!
//! A state that fits keeps to one ConfigMap, `<name>`, under the key `state.json`. A
//! larger one (a ConfigMap holds at most 1 MiB) is *sharded*: its JSON is cut into parts
//! kept in `<name>-a-0`, `<name>-a-1`, … or `<name>-b-…`, and `<name>` only says which slot
//! and how many parts. A save writes the slot not in use, then switches `<name>` to it:
//! the switch is the commit, so a reader sees the old state or the new one, never a mix.
//! Every part is written with its own `resourceVersion` precondition (all parts are read
//! at load), so a deposed leader cannot overwrite the parts of the current one either.
//!
//! The ETag validators are a document of their own with the same layout under
//! `<name>-validators` (sharded as `<name>-validators-a-0`, …), so that the state stays
//! small and 10,000 branches of validators (a few MiB) fit.
//!
//! The writer lock is the Lease: only the leader opens this backend, so [`lock`] has
//! nothing more to take. The [`StateBackend`] calls are blocking (the store calls them
//! from `spawn_blocking`); each one runs its requests on the runtime and waits for them.
//!
//! [`lock`]: StateBackend::lock

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use tokio::runtime::Handle;

use super::{State, StateBackend, StateError, Validators, WriterLock, parse};
use crate::cluster;

/// The key of an unsharded state in the ConfigMap's `data`.
const KEY: &str = "state.json";
/// Keys of a sharded state: the slot in use, how many parts; and the key of a part.
const SLOT_KEY: &str = "slot";
const PARTS_KEY: &str = "parts";
const PART_KEY: &str = "part";
/// What one ConfigMap carries here: below the 1 MiB object limit, with room for metadata.
const OBJECT_BYTES: usize = 900 * 1024;
/// At most this many parts per slot (about 14 MiB of state).
const MAX_PARTS: usize = 16;
/// Bounds every request: a stalled API server must not hold a deploy task for ever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct ConfigMapBackend {
    api: Api<ConfigMap>,
    name: String,
    what: String,
    runtime: Handle,
    seen: Mutex<Seen>,
    /// The backend of the validators document (`<name>-validators`), made on first use.
    validators: std::sync::OnceLock<Box<ConfigMapBackend>>,
}

/// What this replica last read or wrote: the `resourceVersion` of every object (absent
/// before the object exists) and the slot in use.
#[derive(Debug, Default)]
struct Seen {
    versions: HashMap<String, String>,
    slot: Option<Slot>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    A,
    B,
}

impl Slot {
    fn parse(text: &str) -> Option<Slot> {
        match text {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

enum RequestError {
    Conflict,
    Other(StateError),
}

impl ConfigMapBackend {
    /// Connects the standard way (see [`cluster::connect`]). Call inside the runtime.
    pub async fn connect(name: &str, namespace: Option<&str>) -> Result<Self, StateError> {
        let (client, namespace) =
            cluster::connect(namespace)
                .await
                .map_err(|e| StateError::Cluster {
                    what: format!("ConfigMap {name}"),
                    action: "reach",
                    reason: e.to_string(),
                })?;
        Ok(ConfigMapBackend {
            api: Api::namespaced(client, &namespace),
            name: name.to_owned(),
            what: format!("ConfigMap {namespace}/{name}"),
            runtime: Handle::current(),
            seen: Mutex::default(),
            validators: std::sync::OnceLock::new(),
        })
    }

    /// The backend of the validators document, beside this one.
    fn validators_backend(&self) -> &ConfigMapBackend {
        self.validators.get_or_init(|| {
            let name = format!("{}-validators", self.name);
            Box::new(ConfigMapBackend {
                api: self.api.clone(),
                what: format!("{} (ETag validators)", self.what.replace(&self.name, &name)),
                name,
                runtime: self.runtime.clone(),
                seen: Mutex::default(),
                validators: std::sync::OnceLock::new(),
            })
        })
    }

    /// The stored document's JSON, whole or sharded; `None` when nothing is stored.
    fn load_text(&self) -> Result<Option<String>, StateError> {
        self.read_all_parts()?;
        let Some(head) = self.read(&self.name)? else {
            return Ok(None);
        };
        let data = head.data.unwrap_or_default();
        let text = match (
            data.get(KEY),
            data.get(SLOT_KEY).and_then(|s| Slot::parse(s)),
        ) {
            (Some(text), _) => text.clone(),
            (None, Some(slot)) => {
                let parts = data
                    .get(PARTS_KEY)
                    .and_then(|p| p.parse().ok())
                    .filter(|&p| p <= MAX_PARTS)
                    .ok_or_else(|| self.error("read", "the number of parts is not valid"))?;
                self.seen().slot = Some(slot);
                self.load_parts(slot, parts)?
            }
            (None, None) => return Ok(None),
        };
        Ok(Some(text))
    }

    /// Replaces the stored document with `text`: in the head object when it fits, else in
    /// the slot not in use, then the head switched to it.
    fn save_text(&self, text: &str) -> Result<(), StateError> {
        if text.len() <= OBJECT_BYTES {
            self.write(
                &self.name,
                BTreeMap::from([(KEY.to_owned(), text.to_owned())]),
            )?;
            self.seen().slot = None;
            return Ok(());
        }
        let parts = split(text, OBJECT_BYTES);
        if parts.len() > MAX_PARTS {
            return Err(self.error(
                "write",
                format!(
                    "{} bytes need more than {MAX_PARTS} ConfigMaps of {OBJECT_BYTES} bytes",
                    text.len()
                ),
            ));
        }
        let current = self.seen().slot;
        let slot = current.map_or(Slot::A, Slot::other);
        for (index, part) in parts.iter().enumerate() {
            let data = BTreeMap::from([(PART_KEY.to_owned(), (*part).to_owned())]);
            self.write(&self.part_name(slot, index), data)?;
        }
        // The commit: readers follow the head to the new slot.
        let head = BTreeMap::from([
            (SLOT_KEY.to_owned(), slot.as_str().to_owned()),
            (PARTS_KEY.to_owned(), parts.len().to_string()),
        ]);
        self.write(&self.name, head)?;
        self.seen().slot = Some(slot);
        Ok(())
    }

    fn error(&self, action: &'static str, reason: impl ToString) -> StateError {
        StateError::Cluster {
            what: self.what.clone(),
            action,
            reason: reason.to_string(),
        }
    }

    fn fenced(&self) -> StateError {
        StateError::Fenced {
            what: self.what.clone(),
        }
    }

    fn part_name(&self, slot: Slot, index: usize) -> String {
        format!("{}-{}-{index}", self.name, slot.as_str())
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one request on the runtime and waits for it, bounded by [`REQUEST_TIMEOUT`].
    fn block_on<T>(
        &self,
        action: &'static str,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, RequestError> {
        self.runtime
            .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, request).await })
            .map_err(|_| RequestError::Other(self.error(action, "timed out")))?
            .map_err(|e| {
                if cluster::is_conflict(&e) {
                    RequestError::Conflict
                } else {
                    RequestError::Other(self.error(action, e))
                }
            })
    }

    /// GETs `name`, remembering its `resourceVersion`.
    fn read(&self, name: &str) -> Result<Option<ConfigMap>, StateError> {
        let found = match self.block_on("read", self.api.get_opt(name)) {
            Ok(found) => found,
            Err(RequestError::Conflict) => return Err(self.error("read", "conflict")),
            Err(RequestError::Other(e)) => return Err(e),
        };
        if let Some(version) = found
            .as_ref()
            .and_then(|cm| cm.metadata.resource_version.clone())
        {
            self.seen().versions.insert(name.to_owned(), version);
        }
        Ok(found)
    }

    /// Creates or replaces `name` with `data`, with the `resourceVersion` last seen as the
    /// precondition (creating when none was seen): any `409` is [`StateError::Fenced`].
    fn write(&self, name: &str, data: BTreeMap<String, String>) -> Result<(), StateError> {
        let version = self.seen().versions.get(name).cloned();
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                resource_version: version.clone(),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/name".to_owned(),
                    "sentry".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..ConfigMap::default()
        };
        let pp = PostParams::default();
        let written = match version {
            None => self.block_on("create", self.api.create(&pp, &cm)),
            Some(_) => self.block_on("write", self.api.replace(name, &pp, &cm)),
        };
        match written {
            Ok(cm) => {
                if let Some(version) = cm.metadata.resource_version {
                    self.seen().versions.insert(name.to_owned(), version);
                }
                Ok(())
            }
            Err(RequestError::Conflict) => Err(self.fenced()),
            Err(RequestError::Other(e)) => Err(e),
        }
    }

    /// Learns the `resourceVersion` of every existing part of both slots, so that no save
    /// ever writes a part without a precondition.
    fn read_all_parts(&self) -> Result<(), StateError> {
        for slot in [Slot::A, Slot::B] {
            for index in 0..MAX_PARTS {
                if self.read(&self.part_name(slot, index))?.is_none() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// The JSON of a sharded state: the parts of `slot`, in order.
    fn load_parts(&self, slot: Slot, parts: usize) -> Result<String, StateError> {
        let mut text = String::new();
        for index in 0..parts {
            let name = self.part_name(slot, index);
            let part = self
                .read(&name)?
                .and_then(|cm| cm.data?.remove(PART_KEY))
                .ok_or_else(|| self.error("read", format!("part {name} is missing")))?;
            text.push_str(&part);
        }
        Ok(text)
    }
}

impl StateBackend for ConfigMapBackend {
    fn describe(&self) -> String {
        self.what.clone()
    }

    fn load(&self) -> Result<Option<State>, StateError> {
        let Some(text) = self.load_text()? else {
            return Ok(None);
        };
        parse(text.as_bytes()).map(Some).map_err(|reason| {
            self.error(
                "parse",
                format!("it is corrupt ({reason}); fix or delete it"),
            )
        })
    }

    fn save(&self, state: &State) -> Result<(), StateError> {
        let text = serde_json::to_string(state).map_err(|e| self.error("write", e))?;
        self.save_text(&text)
    }

    fn load_validators(&self) -> Result<Option<Validators>, StateError> {
        let backend = self.validators_backend();
        let Some(text) = backend.load_text()? else {
            return Ok(None);
        };
        let validators: Validators = serde_json::from_str(&text).map_err(|e| {
            backend.error(
                "parse",
                format!("it is corrupt ({e}); it is rewritten at the next save"),
            )
        })?;
        if validators.version != crate::forge::validators::FORMAT_VERSION {
            return Err(backend.error(
                "parse",
                format!("format version {} is not supported", validators.version),
            ));
        }
        Ok(Some(validators))
    }

    fn save_validators(&self, validators: &Validators) -> Result<(), StateError> {
        let backend = self.validators_backend();
        let text = serde_json::to_string(validators).map_err(|e| backend.error("write", e))?;
        backend.save_text(&text)
    }

    fn lock(&self) -> Result<WriterLock, StateError> {
        Ok(WriterLock(Box::new(())))
    }
}

/// `text` cut into pieces of at most `max` bytes, at character boundaries.
fn split(text: &str, max: usize) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(max.max(4));
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (part, tail) = rest.split_at(end);
        parts.push(part);
        rest = tail;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_characters_whole_and_loses_nothing() {
        let text = "aé€😀".repeat(1000);
        for max in [4, 5, 7, 100, 4096, 1 << 20] {
            let parts = split(&text, max);
            assert_eq!(parts.concat(), text, "max {max}");
            assert!(parts.iter().all(|p| p.len() <= max.max(4)), "max {max}");
        }
        assert!(split("", 10).is_empty());
    }

    #[test]
    fn slots_alternate() {
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(Slot::B.other(), Slot::A);
        assert_eq!(Slot::parse(Slot::B.as_str()), Some(Slot::B));
        assert_eq!(Slot::parse("c"), None);
    }
}
