//! This module owns [`FakeKube`]: a fake Kubernetes API server on 127.0.0.1 serving
//! `coordination.k8s.io/v1` Leases and `v1` ConfigMaps — GET, POST (create) and PUT
//! (replace) — with real `resourceVersion` semantics: one counter for every write, a PUT
//! carrying a stale version answers `409 Conflict`, a POST of an existing name `409
//! AlreadyExists`, a missing object `404`. Not Server-Side Apply, not watches.
//!
//! Each client (one `sentry watch` replica) gets its own listener, so faults can be aimed
//! at one client: [`FakeKube::stall`] holds its requests unanswered, [`FakeKube::fail`]
//! answers them `500`. [`FakeKube::lease_writes`] is the record of every successful Lease
//! write, to check that two holders were never valid at once. One listener can serve TLS
//! with a self-signed CA (see [`FakeKube::start_with_tls`]).
//!
//! It runs on its own thread and runtime, so that plain `#[test]`s can use it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// What a client's requests get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Never answered (until the fault is lifted).
    Stall,
    /// `500 Internal Server Error`.
    Fail,
}

/// One successful write of a Lease, as the fake saw it.
#[derive(Debug, Clone)]
pub struct LeaseWrite {
    pub at: Instant,
    pub client: String,
    pub holder: Option<String>,
    pub duration: Duration,
}

#[derive(Default)]
struct Store {
    version: u64,
    /// (kind, namespace, name) → object.
    objects: HashMap<(String, String, String), Value>,
    lease_writes: Vec<LeaseWrite>,
    faults: HashMap<String, Fault>,
}

type Shared = Arc<Mutex<Store>>;

pub struct FakeKube {
    store: Shared,
    ports: HashMap<String, u16>,
    tls: HashMap<String, String>,
    dir: PathBuf,
    _thread: std::thread::JoinHandle<()>,
}

#[derive(Clone)]
struct Client {
    store: Shared,
    name: String,
}

impl FakeKube {
    /// Starts a fake with one plain-http listener per client name; kubeconfigs go in `dir`.
    pub fn start(dir: &Path, clients: &[&str]) -> FakeKube {
        FakeKube::start_with_tls(dir, clients, &[])
    }

    /// Like [`FakeKube::start`], plus clients served over TLS with a fresh self-signed CA
    /// that their kubeconfig trusts through `certificate-authority-data`.
    pub fn start_with_tls(dir: &Path, clients: &[&str], tls_clients: &[&str]) -> FakeKube {
        let store: Shared = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let names: Vec<(String, bool)> = clients
            .iter()
            .map(|c| (c.to_string(), false))
            .chain(tls_clients.iter().map(|c| (c.to_string(), true)))
            .collect();
        let shared = store.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let mut ports = HashMap::new();
                let mut tls = HashMap::new();
                for (name, secure) in names {
                    let app = router(Client {
                        store: shared.clone(),
                        name: name.clone(),
                    });
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind");
                    ports.insert(name.clone(), listener.local_addr().expect("addr").port());
                    if secure {
                        let ca = super::fake_kube_tls::serve(listener, app);
                        tls.insert(name, ca);
                    } else {
                        tokio::spawn(async move {
                            axum::serve(listener, app).await.expect("serve");
                        });
                    }
                }
                tx.send((ports, tls)).expect("send ports");
                std::future::pending::<()>().await;
            });
        });
        let (ports, tls) = rx.recv().expect("fake kube started");
        FakeKube {
            store,
            ports,
            tls,
            dir: dir.to_owned(),
            _thread: thread,
        }
    }

    /// Writes a kubeconfig for `client` (namespace `qa`) and returns its path.
    pub fn kubeconfig(&self, client: &str) -> PathBuf {
        let port = self.ports[client];
        let cluster = match self.tls.get(client) {
            Some(ca) => format!(
                "    server: https://localhost:{port}\n    certificate-authority-data: {ca}\n"
            ),
            None => format!("    server: http://127.0.0.1:{port}\n"),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n{cluster}\
             users:\n- name: fake\n  user:\n    token: fake-token\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: qa\n\
             current-context: fake\n"
        );
        let path = self.dir.join(format!("kubeconfig-{client}"));
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    pub fn set_fault(&self, client: &str, fault: Fault) {
        self.store
            .lock()
            .expect("store")
            .faults
            .insert(client.to_owned(), fault);
    }

    pub fn stall(&self, client: &str) {
        self.set_fault(client, Fault::Stall);
    }

    pub fn fail(&self, client: &str) {
        self.set_fault(client, Fault::Fail);
    }

    pub fn heal(&self, client: &str) {
        self.set_fault(client, Fault::None);
    }

    pub fn lease_writes(&self) -> Vec<LeaseWrite> {
        self.store.lock().expect("store").lease_writes.clone()
    }

    /// The stored object, if any.
    pub fn object(&self, kind: &str, name: &str) -> Option<Value> {
        let store = self.store.lock().expect("store");
        store
            .objects
            .get(&(kind.to_owned(), "qa".to_owned(), name.to_owned()))
            .cloned()
    }

    /// The current holder of Lease `name`.
    pub fn holder(&self, name: &str) -> Option<String> {
        self.object("leases", name)?["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_owned)
    }

    /// The state JSON kept in ConfigMap `name`.
    pub fn state(&self, name: &str) -> Option<Value> {
        let cm = self.object("configmaps", name)?;
        serde_json::from_str(cm["data"]["state.json"].as_str()?).ok()
    }

    /// The state JSON, following a sharded head to its parts.
    pub fn state_sharded(&self, name: &str) -> Option<Value> {
        let head = self.object("configmaps", name)?;
        let Some(slot) = head["data"]["slot"].as_str() else {
            return self.state(name);
        };
        let parts: usize = head["data"]["parts"].as_str()?.parse().ok()?;
        let mut text = String::new();
        for i in 0..parts {
            let part = self.object("configmaps", &format!("{name}-{slot}-{i}"))?;
            text.push_str(part["data"]["part"].as_str()?);
        }
        serde_json::from_str(&text).ok()
    }

    /// Panics if the record shows a holder change while the previous holder's last write
    /// was still valid (written less than its lease duration before), give or take
    /// `slack` for scheduling.
    pub fn assert_never_two_holders(&self, slack: Duration) {
        let writes = self.lease_writes();
        let mut last: Option<&LeaseWrite> = None;
        for w in &writes {
            if let Some(prev) = last {
                if let (Some(a), Some(b)) = (&prev.holder, &w.holder) {
                    if a != b {
                        let gap = w.at.duration_since(prev.at);
                        assert!(
                            gap + slack >= prev.duration,
                            "{b} took the Lease {gap:?} after {a}'s last renewal, within its {:?} lease",
                            prev.duration
                        );
                    }
                }
            }
            last = Some(w);
        }
    }
}

fn router(client: Client) -> Router {
    Router::new()
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
            post(create_lease),
        )
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
            get(get_lease).put(put_lease),
        )
        .route("/api/v1/namespaces/{ns}/configmaps", post(create_cm))
        .route(
            "/api/v1/namespaces/{ns}/configmaps/{name}",
            get(get_cm).put(put_cm),
        )
        .fallback(|method: Method, uri: axum::http::Uri| async move {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{method} {uri}"),
            )
        })
        .with_state(client)
}

async fn create_lease(s: State<Client>, ns: UrlPath<String>, body: Bytes) -> Response {
    handle(s.0, "leases", ns.0, None, Some(body)).await
}
async fn get_lease(s: State<Client>, p: UrlPath<(String, String)>) -> Response {
    handle(s.0, "leases", p.0.0, Some(p.0.1), None).await
}
async fn put_lease(s: State<Client>, p: UrlPath<(String, String)>, body: Bytes) -> Response {
    handle(s.0, "leases", p.0.0, Some(p.0.1), Some(body)).await
}
async fn create_cm(s: State<Client>, ns: UrlPath<String>, body: Bytes) -> Response {
    handle(s.0, "configmaps", ns.0, None, Some(body)).await
}
async fn get_cm(s: State<Client>, p: UrlPath<(String, String)>) -> Response {
    handle(s.0, "configmaps", p.0.0, Some(p.0.1), None).await
}
async fn put_cm(s: State<Client>, p: UrlPath<(String, String)>, body: Bytes) -> Response {
    handle(s.0, "configmaps", p.0.0, Some(p.0.1), Some(body)).await
}

/// GET (`name`, no body), POST (no `name`, body) or PUT (`name` and body).
async fn handle(
    client: Client,
    kind: &str,
    ns: String,
    name: Option<String>,
    body: Option<Bytes>,
) -> Response {
    loop {
        let fault = client
            .store
            .lock()
            .expect("store")
            .faults
            .get(&client.name)
            .copied()
            .unwrap_or(Fault::None);
        match fault {
            Fault::None => break,
            Fault::Fail => {
                return status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "injected",
                );
            }
            Fault::Stall => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut store = client.store.lock().expect("store");
    let body = match body.map(|b| serde_json::from_slice::<Value>(&b)) {
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        None => None,
    };
    match (name, body) {
        (Some(name), None) => match store.objects.get(&(kind.into(), ns, name.clone())) {
            Some(obj) => (StatusCode::OK, axum::Json(obj.clone())).into_response(),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{kind} \"{name}\" not found"),
            ),
        },
        (None, Some(obj)) => {
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if store
                .objects
                .contains_key(&(kind.into(), ns.clone(), name.clone()))
            {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{kind} \"{name}\" already exists"),
                );
            }
            write(
                &mut store,
                &client.name,
                kind,
                ns,
                name,
                obj,
                StatusCode::CREATED,
            )
        }
        (Some(name), Some(obj)) => {
            let key = (kind.to_owned(), ns.clone(), name.clone());
            let Some(current) = store.objects.get(&key) else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{kind} \"{name}\" not found"),
                );
            };
            let sent = obj["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            let stored = current["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            if !sent.is_empty() && sent != stored {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                );
            }
            write(
                &mut store,
                &client.name,
                kind,
                ns,
                name,
                obj,
                StatusCode::OK,
            )
        }
        (None, None) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "list is not served",
        ),
    }
}

fn write(
    store: &mut Store,
    client: &str,
    kind: &str,
    ns: String,
    name: String,
    mut obj: Value,
    code: StatusCode,
) -> Response {
    store.version += 1;
    obj["metadata"]["resourceVersion"] = json!(store.version.to_string());
    obj["metadata"]["namespace"] = json!(ns);
    if kind == "leases" {
        let spec = &obj["spec"];
        store.lease_writes.push(LeaseWrite {
            at: Instant::now(),
            client: client.to_owned(),
            holder: spec["holderIdentity"].as_str().map(str::to_owned),
            duration: Duration::from_secs(spec["leaseDurationSeconds"].as_u64().unwrap_or(0)),
        });
    }
    store
        .objects
        .insert((kind.to_owned(), ns, name), obj.clone());
    (code, axum::Json(obj)).into_response()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    (code, axum::Json(body)).into_response()
}
