//! This module owns [`FakeKube`]: a fake Kubernetes API server on 127.0.0.1 serving
//! `coordination.k8s.io/v1` Leases and `v1` ConfigMaps — GET, POST (create) and PUT
//! (replace) — with real `resourceVersion` semantics: one counter for every write, a PUT
//! carrying a stale version answers `409 Conflict`, a POST of an existing name `409
//! AlreadyExists`, a missing object `404`. Not Server-Side Apply, not watches.
//!
//! Each client (one `sentry watch` replica) gets its own listener, so faults can be aimed
//! at one client: [`FakeKube::stall`] holds its requests unanswered, [`FakeKube::fail`]
//! answers them `500`, [`Fault::StallStateWrites`] holds only its ConfigMap writes. [`FakeKube::lease_writes`] is the record of every successful Lease
//! write, to check that two holders were never valid at once. One listener can serve TLS
//! with a self-signed CA (see [`FakeKube::start_with_tls`]).
//!
//! It runs on its own thread and runtime, so that plain `#[test]`s can use it.
//!
//! With a [`Kubelet`] set, it also serves `batch/v1` Jobs (create, get, delete) and `v1`
//! Pods (list by `job-name` label, follow a log): the fake kubelet creates a Job's pod,
//! runs the container's args as a local process of the given binary (the real `sentry
//! exec-unit`, with the ConfigMap mount replaced by a local config file and `envFrom`
//! Secrets and `secretKeyRef` keys taken from [`Kubelet::secrets`]; other volumes are not
//! mounted), serves its output as the pod log (a request
//! before the container runs answers `400`), enforces `activeDeadlineSeconds`, and sets
//! the Job's `Complete` or `Failed` condition when the process exits.

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
    /// ConfigMap writes (the state) are never answered; everything else is served.
    StallStateWrites,
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
    kubelet: Option<Kubelet>,
    /// Every Job POST that created a Job.
    jobs_created: usize,
    /// The bodies of those POSTs, as sent.
    created: Vec<Value>,
    /// Log requests answered `400` because the container had not started.
    logs_refused: usize,
    /// Pod name → its container's output so far, and whether it has ended.
    logs: HashMap<String, PodLog>,
    /// Job name → the pid of its container's process.
    pids: HashMap<String, u32>,
}

/// How the fake kubelet runs containers.
#[derive(Clone)]
pub struct Kubelet {
    /// What runs in place of the image (its args are the container's).
    pub binary: PathBuf,
    /// Replaces the ConfigMap mount path in the container's args.
    pub config: PathBuf,
    /// Secret name → its keys and values, for `envFrom`.
    pub secrets: HashMap<String, Vec<(String, String)>>,
    /// How long a container waits before it starts; `None`: it never starts, and its
    /// waiting reason is `never_reason`.
    pub start_after: Option<Duration>,
    pub never_reason: String,
}

type Shared = Arc<Mutex<Store>>;
/// A container's output so far, and whether it has ended.
type PodLog = Arc<Mutex<(Vec<u8>, bool)>>;

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

    pub fn set_kubelet(&self, kubelet: Kubelet) {
        self.store.lock().expect("store").kubelet = Some(kubelet);
    }

    /// Jobs created so far (adopting one creates none).
    pub fn jobs_created(&self) -> usize {
        self.store.lock().expect("store").jobs_created
    }

    /// The Jobs created so far, as their POSTs sent them.
    pub fn created(&self) -> Vec<Value> {
        self.store.lock().expect("store").created.clone()
    }

    /// Log requests refused because the container had not started.
    pub fn logs_refused(&self) -> usize {
        self.store.lock().expect("store").logs_refused
    }

    /// The Jobs that exist now, by name.
    pub fn jobs(&self) -> Vec<Value> {
        let store = self.store.lock().expect("store");
        store
            .objects
            .iter()
            .filter(|((kind, _, _), _)| kind == "jobs")
            .map(|(_, v)| v.clone())
            .collect()
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
        .route("/apis/batch/v1/namespaces/{ns}/jobs", post(create_job))
        .route(
            "/apis/batch/v1/namespaces/{ns}/jobs/{name}",
            get(get_job).delete(delete_job),
        )
        .route("/api/v1/namespaces/{ns}/pods", get(list_pods))
        .route("/api/v1/namespaces/{ns}/pods/{name}/log", get(pod_log))
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
            Fault::StallStateWrites if kind == "configmaps" && body.is_some() => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Fault::StallStateWrites => break,
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

async fn create_job(s: State<Client>, ns: UrlPath<String>, body: Bytes) -> Response {
    let Ok(mut job) = serde_json::from_slice::<Value>(&body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
    };
    let name = job["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut store = s.store.lock().expect("store");
    let key = ("jobs".to_owned(), ns.0.clone(), name.clone());
    if store.objects.contains_key(&key) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("jobs.batch \"{name}\" already exists"),
        );
    }
    store.version += 1;
    store.jobs_created += 1;
    store.created.push(job.clone());
    job["metadata"]["resourceVersion"] = json!(store.version.to_string());
    job["metadata"]["uid"] = json!(format!("uid-{}", store.version));
    job["status"] = json!({});
    store.objects.insert(key, job.clone());
    let pod = format!("{name}-{}", store.version);
    store.objects.insert(
        ("pods".to_owned(), ns.0.clone(), pod.clone()),
        pod_object(
            &pod,
            &name,
            json!({"waiting": {"reason": "ContainerCreating"}}),
            "Pending",
        ),
    );
    if let Some(kubelet) = store.kubelet.clone() {
        let store = s.store.clone();
        let job = job.clone();
        tokio::spawn(run_pod(store, kubelet, ns.0, name, pod, job));
    }
    (StatusCode::CREATED, axum::Json(job)).into_response()
}

fn pod_object(pod: &str, job: &str, state: Value, phase: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "labels": {"job-name": job}},
        "status": {
            "phase": phase,
            "containerStatuses": [{
                "name": "unit", "image": "sentry", "imageID": "", "ready": false,
                "restartCount": 0, "state": state,
            }],
        },
    })
}

/// Sets the pod's container state and phase, unless the Job was deleted meanwhile.
fn set_pod(store: &Shared, ns: &str, job: &str, pod: &str, state: Value, phase: &str) -> bool {
    let mut store = store.lock().expect("store");
    if !store
        .objects
        .contains_key(&("jobs".to_owned(), ns.to_owned(), job.to_owned()))
    {
        return false;
    }
    store.objects.insert(
        ("pods".to_owned(), ns.to_owned(), pod.to_owned()),
        pod_object(pod, job, state, phase),
    );
    true
}

/// The fake kubelet's life of one pod.
async fn run_pod(
    store: Shared,
    kubelet: Kubelet,
    ns: String,
    job: String,
    pod: String,
    spec: Value,
) {
    let Some(delay) = kubelet.start_after else {
        let reason = kubelet.never_reason.clone();
        set_pod(
            &store,
            &ns,
            &job,
            &pod,
            json!({"waiting": {"reason": reason}}),
            "Pending",
        );
        return;
    };
    tokio::time::sleep(delay).await;
    let container = &spec["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|a| {
            if a == "/etc/sentry/sentry.yaml" {
                kubelet.config.to_string_lossy().into_owned()
            } else {
                a.to_owned()
            }
        })
        .collect();
    let mut cmd = tokio::process::Command::new(&kubelet.binary);
    cmd.args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // `env` wins over `envFrom`, as in Kubernetes.
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let secret = from["secretRef"]["name"].as_str().unwrap_or_default();
        for (k, v) in kubelet.secrets.get(secret).into_iter().flatten() {
            cmd.env(k, v);
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default();
        let key_ref = &e["valueFrom"]["secretKeyRef"];
        if key_ref.is_object() {
            let secret = key_ref["name"].as_str().unwrap_or_default();
            let key = key_ref["key"].as_str().unwrap_or_default();
            let value = kubelet
                .secrets
                .get(secret)
                .and_then(|keys| keys.iter().find(|(k, _)| k == key))
                .map(|(_, v)| v.clone());
            let Some(value) = value else {
                // As the kubelet does for a missing non-optional key.
                set_pod(
                    &store,
                    &ns,
                    &job,
                    &pod,
                    json!({"waiting": {"reason": "CreateContainerConfigError"}}),
                    "Pending",
                );
                return;
            };
            cmd.env(name, value);
        } else {
            cmd.env(name, e["value"].as_str().unwrap_or_default());
        }
    }
    let Ok(mut child) = cmd.spawn() else {
        set_pod(
            &store,
            &ns,
            &job,
            &pod,
            json!({"waiting": {"reason": "RunContainerError"}}),
            "Pending",
        );
        return;
    };
    let log: PodLog = Arc::default();
    {
        let mut s = store.lock().expect("store");
        s.logs.insert(pod.clone(), log.clone());
        if let Some(pid) = child.id() {
            s.pids.insert(job.clone(), pid);
        }
    }
    let running = json!({"running": {"startedAt": "2026-11-29T00:00:00Z"}});
    if !set_pod(&store, &ns, &job, &pod, running, "Running") {
        let _ = child.kill().await;
        return;
    }
    let readers = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    ];
    let mut copies = Vec::new();
    for reader in readers.into_iter().flatten() {
        let log = log.clone();
        copies.push(tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut reader = reader;
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                log.lock().expect("log").0.extend_from_slice(&buf[..n]);
            }
        }));
    }
    let deadline = spec["spec"]["activeDeadlineSeconds"]
        .as_u64()
        .unwrap_or(3600);
    let exit = tokio::time::timeout(Duration::from_secs(deadline), child.wait()).await;
    let (code, condition, reason) = match exit {
        Ok(Ok(st)) if st.success() => (0, "Complete", "Completed"),
        Ok(Ok(st)) => (st.code().unwrap_or(137), "Failed", "BackoffLimitExceeded"),
        Ok(Err(_)) => (128, "Failed", "BackoffLimitExceeded"),
        Err(_) => {
            // The deadline: the kubelet kills the container.
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            let _ = child.kill().await;
            (143, "Failed", "DeadlineExceeded")
        }
    };
    for c in copies {
        let _ = c.await;
    }
    log.lock().expect("log").1 = true;
    let terminated = json!({"terminated": {"exitCode": code}});
    let phase = if code == 0 { "Succeeded" } else { "Failed" };
    if !set_pod(&store, &ns, &job, &pod, terminated, phase) {
        return;
    }
    let mut s = store.lock().expect("store");
    s.version += 1;
    let version = s.version.to_string();
    if let Some(obj) = s.objects.get_mut(&("jobs".to_owned(), ns, job)) {
        obj["metadata"]["resourceVersion"] = json!(version);
        obj["status"] = json!({
            "conditions": [{"type": condition, "status": "True", "reason": reason}],
        });
    }
}

async fn get_job(s: State<Client>, p: UrlPath<(String, String)>) -> Response {
    handle(s.0, "jobs", p.0.0, Some(p.0.1), None).await
}

/// Deletes the Job and its pods and kills the container's process (as the garbage
/// collector and the kubelet would, a moment later).
async fn delete_job(s: State<Client>, p: UrlPath<(String, String)>) -> Response {
    let (ns, name) = p.0;
    let mut store = s.store.lock().expect("store");
    let Some(job) = store
        .objects
        .remove(&("jobs".to_owned(), ns.clone(), name.clone()))
    else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("jobs.batch \"{name}\" not found"),
        );
    };
    store.objects.retain(|(kind, n, _), v| {
        !(kind == "pods" && *n == ns && v["metadata"]["labels"]["job-name"] == json!(name))
    });
    if let Some(pid) = store.pids.remove(&name) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    (StatusCode::OK, axum::Json(job)).into_response()
}

async fn list_pods(
    s: State<Client>,
    ns: UrlPath<String>,
    q: axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let selector = q.0.get("labelSelector").cloned().unwrap_or_default();
    let job = selector.strip_prefix("job-name=").unwrap_or_default();
    let store = s.store.lock().expect("store");
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((kind, n, _), v)| {
            kind == "pods" && *n == ns.0 && v["metadata"]["labels"]["job-name"] == json!(job)
        })
        .map(|(_, v)| v.clone())
        .collect();
    let list = json!({
        "apiVersion": "v1",
        "kind": "PodList",
        "metadata": {"resourceVersion": store.version.to_string()},
        "items": items,
    });
    (StatusCode::OK, axum::Json(list)).into_response()
}

/// Follows the container's output until it ends; `400` before the container runs.
async fn pod_log(s: State<Client>, p: UrlPath<(String, String)>) -> Response {
    let (ns, pod) = p.0;
    let log = {
        let mut store = s.store.lock().expect("store");
        let running = store
            .objects
            .get(&("pods".to_owned(), ns, pod.clone()))
            .is_some_and(|v| v["status"]["containerStatuses"][0]["state"]["waiting"].is_null());
        match store.logs.get(&pod).cloned() {
            Some(log) if running => log,
            _ => {
                store.logs_refused += 1;
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!(
                        "container \"unit\" in pod \"{pod}\" is waiting to start: ContainerCreating"
                    ),
                );
            }
        }
    };
    let stream = futures_util::stream::unfold((log, 0usize), |(log, offset)| async move {
        loop {
            let (chunk, done) = {
                let l = log.lock().expect("log");
                (l.0[offset..].to_vec(), l.1)
            };
            if !chunk.is_empty() {
                let next = offset + chunk.len();
                return Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), (log, next)));
            }
            if done {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (StatusCode::OK, axum::body::Body::from_stream(stream)).into_response()
}
