//! The state in a Kubernetes ConfigMap (`state.backend: kubernetes`): the same JSON as the
//! file backend, under the key `state.json`, written with the `resourceVersion` this
//! replica last read or wrote. A write that fails with `409` means another replica wrote
//! since — this one was deposed — and it stands down ([`StateError::Fenced`]).
//!
//! The writer lock is the Lease: only the leader opens this backend, so [`lock`] has
//! nothing more to take. The [`StateBackend`] calls are blocking (the store calls them
//! from `spawn_blocking`); each one runs its request on the runtime and waits for it.
//!
//! [`lock`]: StateBackend::lock

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use tokio::runtime::Handle;

use super::{State, StateBackend, StateError, WriterLock, parse};
use crate::cluster;

/// The key of the state in the ConfigMap's `data`.
const KEY: &str = "state.json";
/// A ConfigMap holds at most 1 MiB; leave room for the metadata.
const MAX_BYTES: usize = 1024 * 1024 - 16 * 1024;
/// Bounds every request: a stalled API server must not hold a deploy task for ever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct ConfigMapBackend {
    api: Api<ConfigMap>,
    name: String,
    what: String,
    runtime: Handle,
    /// The `resourceVersion` last read or written; `None` before the ConfigMap exists.
    version: Mutex<Option<String>>,
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
            version: Mutex::new(None),
        })
    }

    fn error(&self, action: &'static str, reason: impl ToString) -> StateError {
        StateError::Cluster {
            what: self.what.clone(),
            action,
            reason: reason.to_string(),
        }
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

    fn set_version(&self, cm: &ConfigMap) {
        let mut version = self.version.lock().unwrap_or_else(|p| p.into_inner());
        version.clone_from(&cm.metadata.resource_version);
    }

    fn version(&self) -> Option<String> {
        self.version
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl StateBackend for ConfigMapBackend {
    fn describe(&self) -> String {
        self.what.clone()
    }

    fn load(&self) -> Result<Option<State>, StateError> {
        let found = match self.block_on("read", self.api.get_opt(&self.name)) {
            Ok(found) => found,
            Err(RequestError::Conflict) => return Err(self.error("read", "conflict")),
            Err(RequestError::Other(e)) => return Err(e),
        };
        let Some(cm) = found else {
            return Ok(None);
        };
        self.set_version(&cm);
        let Some(text) = cm.data.as_ref().and_then(|d| d.get(KEY)) else {
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
        if text.len() > MAX_BYTES {
            return Err(self.error(
                "write",
                format!("{} bytes exceed what one ConfigMap holds", text.len()),
            ));
        }
        let version = self.version();
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: version.clone(),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/name".to_owned(),
                    "sentry".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(KEY.to_owned(), text)])),
            ..ConfigMap::default()
        };
        let pp = PostParams::default();
        let written = match version {
            None => self.block_on("create", self.api.create(&pp, &cm)),
            Some(_) => self.block_on("write", self.api.replace(&self.name, &pp, &cm)),
        };
        match written {
            Ok(cm) => {
                self.set_version(&cm);
                Ok(())
            }
            Err(RequestError::Conflict) => Err(StateError::Fenced {
                what: self.what.clone(),
            }),
            Err(RequestError::Other(e)) => Err(e),
        }
    }

    fn lock(&self) -> Result<WriterLock, StateError> {
        Ok(WriterLock(Box::new(())))
    }
}
