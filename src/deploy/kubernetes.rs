//! The Kubernetes executor: each attempt at a unit is one Kubernetes Job that runs
//! Sentry's own image as `sentry exec-unit`, which checks out the QA repository and runs
//! the commands with the local runner inside the pod.
//!
//! This module owns the Job manifest (deterministic name, labels, `backoffLimit: 0`,
//! deadlines, the pod template, credentials only by reference: `envFrom`, `secretKeyRef`,
//! Secret volumes), the Job's life as seen from Sentry (create or adopt — a running Job,
//! or a finished one whose outcome a dead leader never recorded —, wait for the pod,
//! follow its log into the unit's `OutputSink`, read the outcome from the Job's
//! `Complete`/`Failed` condition, delete — or, when `watch` stops, leave it running for
//! the next leader to adopt), and the unit description the pod receives
//! ([`UnitSpec`], one JSON environment variable).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use k8s_openapi::api::batch::v1::{Job as K8sJob, JobSpec};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, EnvFromSource, EnvVar, EnvVarSource, Pod, PodSpec,
    PodTemplateSpec, ResourceRequirements, SecretEnvSource, SecretKeySelector, SecretVolumeSource,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams, PropagationPolicy};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::executor::{Executor, Job, Outcome};
use super::runner::{OutputSink, RunInfo};
use super::{Trigger, Unit, UnitStatus};
use crate::config::pod::{PodTemplate, VolumeSource};
use crate::config::{Config, KubernetesExecutorConfig, Repository};
use crate::forge::Sha;
use crate::shutdown::Shutdown;

/// The environment variable that carries the [`UnitSpec`] into the pod.
pub const UNIT_SPEC_ENV: &str = "SENTRY_EXEC_UNIT";
/// Where the pod finds the configuration (the ConfigMap `config_map`, key `sentry.yaml`).
pub const POD_CONFIG_PATH: &str = "/etc/sentry/sentry.yaml";
/// `sentry exec-unit` exit codes beyond 0 (succeeded) and 1 (a command failed), so that
/// Sentry tells the outcomes apart from the container's exit code alone.
const EXIT_CANNOT_RUN: i32 = crate::Exit::CannotRun as i32;
const EXIT_SETUP_FAILED: i32 = crate::Exit::UnitSetupFailed as i32;
const EXIT_TIMED_OUT: i32 = crate::Exit::UnitTimedOut as i32;
const EXIT_CANCELLED: i32 = crate::Exit::UnitCancelled as i32;

const CONTAINER: &str = "unit";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const LABEL_GROUP: &str = "sentry.dev/group";
const LABEL_RUN: &str = "sentry.dev/run";
const LABEL_REPOSITORY: &str = "sentry.dev/repository";
/// How often the Job and its pod are read while a unit runs: a list every second per
/// running unit is cheap next to the clone, and needs no watch permission to work.
const POLL: Duration = Duration::from_millis(500);
/// The SHA the change moved from, so that a later run can tell the same change (whose
/// outcome it may adopt) from a move back to an old SHA (which runs again).
const ANNOTATION_PREVIOUS: &str = "sentry.dev/previous-sha";
/// How long a succeeded Job of a watched change outlives its outcome: until the outcome is
/// stored in the state. A leader that dies between the Job's end and that write leaves the
/// Job behind, and the next leader takes its outcome instead of running the change twice.
const RECORD_GRACE: Duration = Duration::from_secs(30);

/// What `sentry exec-unit` needs beyond the configuration: which unit of which run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitSpec {
    pub group: String,
    pub run_id: String,
    pub trigger: Trigger,
    pub changes_json: String,
    pub repository: String,
    pub branch: String,
    pub sha: Sha,
    pub previous_sha: Option<Sha>,
    /// Seconds left of the group's `global_timeout` when the Job was made.
    pub deadline_seconds: u64,
}

impl UnitSpec {
    pub fn new(run: &RunInfo, unit: &Unit, deadline: Duration) -> UnitSpec {
        UnitSpec {
            group: run.group.clone(),
            run_id: run.run_id.clone(),
            trigger: run.trigger.clone(),
            changes_json: run.changes_json.clone(),
            repository: unit.repository.clone(),
            branch: unit.branch.clone(),
            sha: unit.sha.clone(),
            previous_sha: unit.previous_sha.clone(),
            deadline_seconds: deadline.as_secs().max(1),
        }
    }

    pub fn unit(&self) -> Unit {
        Unit {
            repository: self.repository.clone(),
            branch: self.branch.clone(),
            previous_sha: self.previous_sha.clone(),
            sha: self.sha.clone(),
        }
    }
}

/// The Job's name: the same for the same (group, unit, attempt), so that a restarted
/// Sentry or a new leader — whose run of the same change has a new run id — finds the Job
/// made before instead of making a second one (the run id is a label). A readable prefix
/// from the repository name, then a hash of everything (names may be longer than 63).
pub fn job_name(group: &str, unit: &Unit, attempt: u32) -> String {
    let mut hash = Sha256::new();
    for part in [group, &unit.repository, &unit.branch, unit.sha.as_str()] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hash.update(attempt.to_be_bytes());
    let digest = hash.finalize();
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let prefix = label_safe(&unit.repository, 30);
    format!("sentry-{prefix}-{hex}-{attempt}")
}

/// `s` reduced to what a DNS label and a label value both accept: lower-case
/// alphanumerics and `-`, starting and ending alphanumeric, at most `max` long.
fn label_safe(s: &str, max: usize) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(max)
        .collect();
    let trimmed = mapped.trim_matches('-');
    if trimmed.is_empty() {
        "x".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// The labels of the Job and its pod: who made it and for which run and repository.
pub fn labels(group: &str, run_id: &str, unit: &Unit) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.to_owned(), "sentry".to_owned()),
        (LABEL_GROUP.to_owned(), label_safe(group, 63)),
        (LABEL_RUN.to_owned(), label_safe(run_id, 63)),
        (
            LABEL_REPOSITORY.to_owned(),
            label_safe(&unit.repository, 63),
        ),
    ])
}

/// `activeDeadlineSeconds`: the group's remaining time, or less when every command has a
/// timeout (then their sum, plus the time the pod may take to start).
pub fn active_deadline(
    k: &KubernetesExecutorConfig,
    repo: &Repository,
    remaining: Duration,
) -> Duration {
    let per_unit = repo.deploy.timeout.map(|t| {
        let commands = u32::try_from(repo.deploy.commands.len()).unwrap_or(u32::MAX);
        t.saturating_mul(commands).saturating_add(k.start_timeout)
    });
    per_unit
        .map_or(remaining, |u| u.min(remaining))
        .max(Duration::from_secs(1))
}

/// The Job one attempt creates. Credentials reach the pod only by reference (`envFrom`
/// Secrets, `secretKeyRef` variables, Secret volumes): the spec carries no secret value,
/// since anyone who can read Jobs can read it.
pub fn job_manifest(
    k: &KubernetesExecutorConfig,
    spec: &UnitSpec,
    attempt: u32,
    deadline: Duration,
) -> Result<K8sJob, serde_json::Error> {
    let unit = spec.unit();
    let labels = labels(&spec.group, &spec.run_id, &unit);
    let annotations = BTreeMap::from([
        ("sentry.dev/branch".to_owned(), spec.branch.clone()),
        ("sentry.dev/sha".to_owned(), spec.sha.to_string()),
        ("sentry.dev/attempt".to_owned(), attempt.to_string()),
        (
            ANNOTATION_PREVIOUS.to_owned(),
            spec.previous_sha
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        ),
    ]);
    let env_from = k
        .env_from_secrets
        .iter()
        .map(|name| EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: name.clone(),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        })
        .collect::<Vec<_>>();
    let mut env = vec![
        EnvVar {
            name: UNIT_SPEC_ENV.to_owned(),
            value: Some(serde_json::to_string(spec)?),
            value_from: None,
        },
        // The pod's log is the commands' output: Sentry's own progress lines there
        // would be shown again as output. Warnings (a failed clone) still appear.
        EnvVar {
            name: "SENTRY_LOG_LEVEL".to_owned(),
            value: Some("warn".to_owned()),
            value_from: None,
        },
    ];
    env.extend(secret_key_env(&k.pod));
    let (mut volumes, mut mounts) = pod_volumes(&k.pod);
    mounts.insert(
        0,
        VolumeMount {
            name: "config".to_owned(),
            mount_path: "/etc/sentry".to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    );
    volumes.insert(
        0,
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: k.config_map.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    );
    let container = Container {
        name: CONTAINER.to_owned(),
        image: Some(k.image.clone()),
        args: Some(vec![
            "--config".to_owned(),
            POD_CONFIG_PATH.to_owned(),
            "exec-unit".to_owned(),
        ]),
        env: Some(env),
        env_from: (!env_from.is_empty()).then_some(env_from),
        resources: resources(k),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let pod = PodSpec {
        restart_policy: Some("Never".to_owned()),
        service_account_name: k.service_account_name.clone(),
        node_selector: (!k.node_selector.is_empty()).then(|| k.node_selector.clone()),
        tolerations: (!k.pod.tolerations.is_empty()).then(|| tolerations(&k.pod)),
        // QA code gets no API token unless a service account was chosen for it.
        automount_service_account_token: Some(k.service_account_name.is_some()),
        containers: vec![container],
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    Ok(K8sJob {
        metadata: ObjectMeta {
            name: Some(job_name(&spec.group, &unit, attempt)),
            namespace: Some(k.namespace.clone()),
            labels: Some(labels.clone()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(seconds(deadline)),
            ttl_seconds_after_finished: Some(
                i32::try_from(k.ttl_after_finished.as_secs()).unwrap_or(i32::MAX),
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

/// Variables from single Secret keys: a reference the kubelet resolves, never the value.
fn secret_key_env(t: &PodTemplate) -> impl Iterator<Item = EnvVar> + '_ {
    t.env_secret_keys.iter().map(|e| EnvVar {
        name: e.name.clone(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: e.secret.clone(),
                key: e.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    })
}

/// The configured Secret and ConfigMap volumes and their mounts.
fn pod_volumes(t: &PodTemplate) -> (Vec<Volume>, Vec<VolumeMount>) {
    t.volumes
        .iter()
        .map(|v| {
            let mut volume = Volume {
                name: v.name.clone(),
                ..Volume::default()
            };
            match &v.source {
                VolumeSource::Secret(name) => {
                    volume.secret = Some(SecretVolumeSource {
                        secret_name: Some(name.clone()),
                        ..SecretVolumeSource::default()
                    });
                }
                VolumeSource::ConfigMap(name) => {
                    volume.config_map = Some(ConfigMapVolumeSource {
                        name: name.clone(),
                        ..ConfigMapVolumeSource::default()
                    });
                }
            }
            let mount = VolumeMount {
                name: v.name.clone(),
                mount_path: v.mount_path.clone(),
                read_only: Some(v.read_only),
                ..VolumeMount::default()
            };
            (volume, mount)
        })
        .unzip()
}

fn tolerations(t: &PodTemplate) -> Vec<Toleration> {
    t.tolerations
        .iter()
        .map(|t| Toleration {
            key: t.key.clone(),
            operator: Some(t.operator.clone()),
            value: t.value.clone(),
            effect: t.effect.clone(),
            toleration_seconds: t.toleration_seconds,
        })
        .collect()
}

/// The container's `resources`, when any are configured.
fn resources(k: &KubernetesExecutorConfig) -> Option<ResourceRequirements> {
    let quantities = |m: &BTreeMap<String, String>| {
        (!m.is_empty()).then(|| {
            m.iter()
                .map(|(k, v)| (k.clone(), Quantity(v.clone())))
                .collect::<BTreeMap<_, _>>()
        })
    };
    let (requests, limits) = (quantities(&k.requests), quantities(&k.limits));
    (requests.is_some() || limits.is_some()).then(|| ResourceRequirements {
        requests,
        limits,
        ..ResourceRequirements::default()
    })
}

fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX)
}

/// Runs each attempt as a Job; connects to the API server on first use, so that a
/// configuration with a kubernetes group does not need a cluster for `validate`.
pub struct KubernetesExecutor {
    client: OnceCell<kube::Client>,
}

impl KubernetesExecutor {
    pub fn new() -> KubernetesExecutor {
        KubernetesExecutor {
            client: OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<kube::Client, String> {
        self.client
            .get_or_try_init(|| async {
                crate::cluster::connect(None)
                    .await
                    .map(|(client, _)| client)
                    .map_err(|e| e.to_string())
            })
            .await
            .cloned()
    }
}

impl Default for KubernetesExecutor {
    fn default() -> Self {
        KubernetesExecutor::new()
    }
}

/// Why a Job could not be made.
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("cannot create the Job: {0}")]
    Api(#[from] kube::Error),
    #[error("cannot describe the unit: {0}")]
    Spec(#[from] serde_json::Error),
    #[error("the finished Job {0} was not deleted in time to run the unit again")]
    Stuck(String),
}

/// One attempt as Sentry sees its Job.
struct Running<'a> {
    k: &'a KubernetesExecutorConfig,
    jobs: Api<K8sJob>,
    pods: Api<Pod>,
    name: String,
    job: &'a Job<'a>,
}

impl KubernetesExecutor {
    /// Runs `job` as the Job of `k`.
    pub async fn run(&self, k: &KubernetesExecutorConfig, job: Job<'_>) -> Outcome {
        let client = match self.client().await {
            Ok(c) => c,
            Err(e) => return setup_failed(&job, &e),
        };
        let remaining = job.run.deadline.saturating_duration_since(Instant::now());
        let spec = UnitSpec::new(job.run, job.unit, remaining);
        let deadline = active_deadline(k, job.repo, remaining);
        let manifest = match job_manifest(k, &spec, job.attempt, deadline) {
            Ok(m) => m,
            Err(e) => return setup_failed(&job, &JobError::from(e).to_string()),
        };
        let name = job_name(&spec.group, job.unit, job.attempt);
        let running = Running {
            k,
            jobs: Api::namespaced(client.clone(), &k.namespace),
            pods: Api::namespaced(client, &k.namespace),
            name,
            job: &job,
        };
        if let Err(e) = running.create_or_adopt(&manifest).await {
            return setup_failed(&job, &e.to_string());
        }
        running.follow().await
    }
}

fn setup_failed(job: &Job<'_>, reason: &str) -> Outcome {
    job.sink.note(&format!("kubernetes: {reason}"));
    Outcome {
        status: UnitStatus::SetupFailed,
        exit_code: None,
        failed_command: None,
    }
}

/// What the Job and its pod say at one look.
enum Seen {
    /// The pod has not started its container yet; the reason when it is stuck.
    Waiting(Option<String>),
    Running,
    /// The Job has its `Complete` or `Failed` condition; the container's exit code and
    /// the condition's reason.
    Finished {
        complete: bool,
        exit_code: Option<i32>,
        reason: Option<String>,
    },
}

impl Running<'_> {
    /// Creates the Job, or adopts one of the same name: a restarted Sentry (or a new
    /// leader) must not run the same attempt twice.
    async fn create_or_adopt(&self, manifest: &K8sJob) -> Result<(), JobError> {
        match self.jobs.create(&PostParams::default(), manifest).await {
            Ok(_) => {
                tracing::info!(job = %self.name, namespace = %self.k.namespace, "created the Job");
                Ok(())
            }
            Err(e) if crate::cluster::is_conflict(&e) => self.adopt_or_replace(manifest).await,
            Err(e) => Err(e.into()),
        }
    }

    /// A Job of this name exists. Still running: it is this change's, started before a
    /// restart or by the previous leader, so it is followed rather than run twice.
    /// Finished: a failed Job kept for inspection (or one that ended while nobody
    /// watched) must not block a new run, so it is deleted and the Job made again.
    async fn adopt_or_replace(&self, manifest: &K8sJob) -> Result<(), JobError> {
        let existing = self.jobs.get(&self.name).await?;
        let finished = existing
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"));
        if !finished {
            self.job.sink.note(&format!(
                "kubernetes: adopting the running Job {}",
                self.name
            ));
            return Ok(());
        }
        if self.ran_this_change(&existing.metadata).await {
            self.job.sink.note(&format!(
                "kubernetes: the Job {} already ran this change and its outcome was not \
                 recorded (the previous leader stopped first): taking its outcome",
                self.name
            ));
            return Ok(());
        }
        delete(&self.jobs, &self.name).await?;
        for _ in 0..120 {
            match self.jobs.create(&PostParams::default(), manifest).await {
                Ok(_) => return Ok(()),
                // Deletion is asynchronous: the old object may linger a moment.
                Err(e) if crate::cluster::is_conflict(&e) => tokio::time::sleep(POLL).await,
                Err(e) => return Err(e.into()),
            }
        }
        Err(JobError::Stuck(self.name.clone()))
    }

    /// Whether the finished Job of this name is this very change run to an outcome that
    /// was never recorded: the run was not by hand (a manual run always runs again), the
    /// branch really moved, from the same SHA as when the Job was made (a move back to an
    /// old SHA runs again), and the Job's outcome is one the state would have recorded as
    /// handled (a unit that could not run is run again).
    async fn ran_this_change(&self, meta: &ObjectMeta) -> bool {
        let unit = self.job.unit;
        let Some(previous) = &unit.previous_sha else {
            return false;
        };
        let same_move = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_PREVIOUS))
            .is_some_and(|p| p == previous.as_str());
        if matches!(self.job.run.trigger, Trigger::Manual { .. })
            || *previous == unit.sha
            || !same_move
        {
            return false;
        }
        match self.look().await {
            Ok(Seen::Finished {
                complete,
                exit_code,
                reason,
            }) => finished(complete, exit_code, reason.as_deref())
                .status
                .is_handled(),
            _ => false,
        }
    }

    /// Waits for the Job to finish, following the pod's log, honouring shutdown, the
    /// group deadline and the start timeout.
    async fn follow(&self) -> Outcome {
        let started = Instant::now();
        // Asked for at once: until the container runs the server answers 400, and the
        // log task retries, so no line is lost to a late start.
        let mut logs = Some(self.spawn_logs());
        let deadline = self.job.run.deadline;
        // Sentry's own stops (global_timeout, and shutdown of a manual run) delete the Job
        // at once; a Job that failed by itself is kept for inspection. A watched change's
        // Job outlives Sentry's shutdown or lost Lease: it runs on the cluster, the unit
        // stays pending, and the next leader adopts the Job by its name.
        let mut stopped = false;
        let mut left_running = false;
        let outcome = loop {
            let seen = match self.look().await {
                Ok(seen) => seen,
                Err(e) => {
                    tracing::warn!(job = %self.name, "cannot read the Job: {e}");
                    Seen::Waiting(None)
                }
            };
            match seen {
                Seen::Finished {
                    complete,
                    exit_code,
                    reason,
                } => break finished(complete, exit_code, reason.as_deref()),
                Seen::Running => {}
                Seen::Waiting(reason) => {
                    if let Some(outcome) = self.start_failed(started, reason) {
                        stopped = true;
                        break outcome;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = self.job.shutdown.requested() => {
                    if matches!(self.job.run.trigger, Trigger::Manual { .. }) {
                        self.job.sink.note("kubernetes: shutting down, deleting the Job");
                        stopped = true;
                    } else {
                        self.job.sink.note(&format!(
                            "kubernetes: shutting down; Job {} keeps running for the next leader to adopt",
                            self.name
                        ));
                        left_running = true;
                    }
                    break Outcome::new(UnitStatus::Cancelled, None);
                }
                () = tokio::time::sleep_until(deadline) => {
                    self.job.sink.note("kubernetes: global_timeout passed, deleting the Job");
                    stopped = true;
                    break Outcome::new(UnitStatus::TimedOut, None);
                }
            }
        };
        if let Some(handle) = logs.take() {
            if stopped || left_running {
                handle.abort();
            }
            // The log ends with the container; a stream the server keeps open is cut off.
            let abort = handle.abort_handle();
            if tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        if left_running {
            return outcome;
        }
        let keep = !stopped && outcome.status != UnitStatus::Succeeded;
        if !keep && !stopped && !matches!(self.job.run.trigger, Trigger::Manual { .. }) {
            self.delete_later(RECORD_GRACE);
        } else {
            self.clean_up(keep).await;
        }
        outcome
    }

    /// `Some` outcome when the pod cannot start: a bad image name at once, anything else
    /// once `start_timeout` has passed.
    fn start_failed(&self, started: Instant, reason: Option<String>) -> Option<Outcome> {
        let fatal = reason
            .as_deref()
            .is_some_and(|r| matches!(r, "InvalidImageName" | "CreateContainerConfigError"));
        if fatal || started.elapsed() >= self.k.start_timeout {
            let why = reason.unwrap_or_else(|| "not scheduled".to_owned());
            return Some(setup_failed(
                self.job,
                &format!(
                    "the pod of Job {} did not start within {}: {why}",
                    self.name,
                    humantime::format_duration(self.k.start_timeout)
                ),
            ));
        }
        None
    }

    async fn look(&self) -> Result<Seen, kube::Error> {
        let job = self.jobs.get(&self.name).await?;
        let pods = self
            .pods
            .list(&ListParams::default().labels(&format!("job-name={}", self.name)))
            .await?;
        let container = pods
            .items
            .first()
            .and_then(|p| p.status.as_ref())
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.iter().find(|c| c.name == CONTAINER))
            .and_then(|c| c.state.clone());
        let exit_code = container
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code);
        let conditions = job
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.status == "True");
        for c in conditions {
            if c.type_ == "Complete" || c.type_ == "Failed" {
                return Ok(Seen::Finished {
                    complete: c.type_ == "Complete",
                    exit_code,
                    reason: c.reason,
                });
            }
        }
        Ok(match container {
            Some(s) if s.running.is_some() || s.terminated.is_some() => Seen::Running,
            Some(s) => Seen::Waiting(s.waiting.and_then(|w| w.reason)),
            None => Seen::Waiting(pod_unschedulable(pods.items.first())),
        })
    }

    /// Follows the pod's log into the sink. A request before the container runs answers
    /// 400, so it is retried until the log opens.
    fn spawn_logs(&self) -> tokio::task::JoinHandle<()> {
        let pods = self.pods.clone();
        let jobs_label = format!("job-name={}", self.name);
        let sink = Arc::clone(self.job.sink);
        let prefix = format!("[{}@{}] ", self.job.unit.repository, self.job.unit.branch);
        tokio::spawn(async move {
            // Until it opens; the caller aborts this when the Job ends without a pod.
            loop {
                match stream_logs(&pods, &jobs_label, &prefix, &sink).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::debug!("pod log not ready: {e}");
                        tokio::time::sleep(POLL).await;
                    }
                }
            }
        })
    }

    /// Deletes the Job (background propagation removes its pod) unless it failed, in
    /// which case it stays `keep_failed` for people to inspect.
    async fn clean_up(&self, keep: bool) {
        if keep && !self.k.keep_failed.is_zero() {
            // A later run of the same unit replaces a kept Job, so it blocks nothing.
            self.delete_later(self.k.keep_failed);
            return;
        }
        if let Err(e) = delete(&self.jobs, &self.name).await {
            tracing::warn!(job = %self.name, "cannot delete the Job: {e}");
        }
    }
}

impl Running<'_> {
    /// Deletes the Job after `after`, unless Sentry stops first (then
    /// `ttlSecondsAfterFinished` removes it).
    fn delete_later(&self, after: Duration) {
        let (jobs, name) = (self.jobs.clone(), self.name.clone());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = delete(&jobs, &name).await;
        });
    }
}

async fn delete(jobs: &Api<K8sJob>, name: &str) -> Result<(), kube::Error> {
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    match jobs.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn stream_logs(
    pods: &Api<Pod>,
    label: &str,
    prefix: &str,
    sink: &OutputSink,
) -> Result<(), String> {
    use futures_util::{AsyncBufReadExt, TryStreamExt};
    let list = pods
        .list(&ListParams::default().labels(label))
        .await
        .map_err(|e| e.to_string())?;
    let Some(name) = list.items.first().and_then(|p| p.metadata.name.clone()) else {
        return Err("no pod yet".to_owned());
    };
    let params = LogParams {
        follow: true,
        container: Some(CONTAINER.to_owned()),
        ..LogParams::default()
    };
    let stream = pods
        .log_stream(&name, &params)
        .await
        .map_err(|e| e.to_string())?;
    let mut lines = stream.lines();
    while let Ok(Some(line)) = lines.try_next().await {
        sink.output_line(strip_label(&line, prefix));
    }
    Ok(())
}

/// The scheduler's reason when the pod cannot be placed on a node.
fn pod_unschedulable(pod: Option<&Pod>) -> Option<String> {
    pod?.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| {
            let reason = c
                .reason
                .clone()
                .unwrap_or_else(|| "Unschedulable".to_owned());
            match &c.message {
                Some(m) => format!("{reason}: {m}"),
                None => reason,
            }
        })
}

/// The unit's outcome from the Job's final condition and the container's exit code
/// (`sentry exec-unit` encodes the runner's outcome in it).
fn finished(complete: bool, exit_code: Option<i32>, reason: Option<&str>) -> Outcome {
    if complete {
        return Outcome::new(UnitStatus::Succeeded, Some(0));
    }
    let status = match (exit_code, reason) {
        (_, Some("DeadlineExceeded")) | (Some(EXIT_TIMED_OUT), _) => UnitStatus::TimedOut,
        // 2: `exec-unit` could not run at all (the configuration in the pod did not load,
        // `SENTRY_EXEC_UNIT` was missing) — nothing ran, so the change stays pending.
        (Some(EXIT_SETUP_FAILED | EXIT_CANNOT_RUN), _) => UnitStatus::SetupFailed,
        (Some(EXIT_CANCELLED), _) => UnitStatus::Cancelled,
        // The pod failed without a container exit (evicted, deleted): nothing ran to an
        // outcome Sentry can vouch for, so the change stays pending.
        (None, _) => UnitStatus::SetupFailed,
        _ => UnitStatus::Failed,
    };
    Outcome::new(status, exit_code.filter(|c| *c == 1))
}

/// The exit code `sentry exec-unit` ends with for an outcome; [`finished`] reads it back.
pub fn exit_for(status: UnitStatus) -> crate::Exit {
    match status {
        UnitStatus::Succeeded => crate::Exit::Success,
        UnitStatus::Failed => crate::Exit::JobFailed,
        UnitStatus::SetupFailed => crate::Exit::UnitSetupFailed,
        UnitStatus::TimedOut => crate::Exit::UnitTimedOut,
        UnitStatus::Cancelled | UnitStatus::Skipped => crate::Exit::UnitCancelled,
    }
}

/// The body of `sentry exec-unit` in the pod: one attempt at the unit `spec` describes,
/// run by the local executor exactly as Sentry would run it on its own machine.
pub async fn exec_unit(config: Arc<Config>, spec: &UnitSpec, shutdown: &Shutdown) -> Outcome {
    let unit = spec.unit();
    let masker = super::mask::Masker::new(config.secrets());
    // Live: the lines go to the container's stdout, which Sentry follows.
    let sink = Arc::new(OutputSink::new(&unit, masker, true));
    let Some(repo) = config.repository(&spec.repository) else {
        sink.note(&format!(
            "no repository named \"{}\" in the configuration",
            spec.repository
        ));
        return Outcome::new(UnitStatus::SetupFailed, None);
    };
    let run = RunInfo {
        group: spec.group.clone(),
        run_id: spec.run_id.clone(),
        trigger: spec.trigger.clone(),
        changes_json: spec.changes_json.clone(),
        deadline: Instant::now() + Duration::from_secs(spec.deadline_seconds),
        extra_env: Vec::new(),
        keep_workdir: false,
    };
    let executor = super::executor::LocalExecutor::new(config.clone());
    let job = Job {
        repo,
        unit: &unit,
        run: &run,
        shutdown,
        sink: &sink,
        attempt: 1,
    };
    executor.execute(job).await
}

/// The line as the pod printed it, without the `[repo@branch] ` prefix the runner's live
/// output adds (Sentry's own sink adds it again where it shows lines live).
fn strip_label<'l>(line: &'l str, label: &str) -> &'l str {
    line.strip_prefix(label).unwrap_or(line)
}

/// The executor `Deployer::new` uses: each group's units go to the executor its
/// configuration names.
pub struct GroupExecutor {
    config: Arc<Config>,
    local: super::executor::LocalExecutor,
    kubernetes: KubernetesExecutor,
}

impl GroupExecutor {
    pub fn new(config: Arc<Config>) -> GroupExecutor {
        GroupExecutor {
            local: super::executor::LocalExecutor::new(config.clone()),
            kubernetes: KubernetesExecutor::new(),
            config,
        }
    }
}

impl Executor for GroupExecutor {
    fn execute<'a>(&'a self, job: Job<'a>) -> BoxFuture<'a, Outcome> {
        let kind = self.config.group(&job.run.group).map(|g| &g.executor);
        match kind {
            Some(crate::config::ExecutorKind::Kubernetes(k)) => {
                Box::pin(self.kubernetes.run(k, job))
            }
            _ => self.local.execute(job),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> KubernetesExecutorConfig {
        KubernetesExecutorConfig {
            namespace: "sentry-jobs".to_owned(),
            image: "registry.example.com/qa/sentry:0.1.0".to_owned(),
            service_account_name: None,
            config_map: "sentry-config".to_owned(),
            env_from_secrets: vec!["qa-credentials".to_owned()],
            pod: PodTemplate::default(),
            node_selector: BTreeMap::from([("pool".to_owned(), "qa".to_owned())]),
            requests: BTreeMap::from([("cpu".to_owned(), "500m".to_owned())]),
            limits: BTreeMap::from([("memory".to_owned(), "1Gi".to_owned())]),
            start_timeout: Duration::from_secs(300),
            keep_failed: Duration::from_secs(3600),
            ttl_after_finished: Duration::from_secs(86_400),
        }
    }

    fn spec() -> UnitSpec {
        UnitSpec {
            group: "QA_Group".to_owned(),
            run_id: "20261129T182000Z-ab12".to_owned(),
            trigger: Trigger::Poll,
            changes_json: "{}".to_owned(),
            repository: "Rag_Project.with.dots".to_owned(),
            branch: "release/1.0".to_owned(),
            sha: Sha::parse(&"a".repeat(40)).expect("sha"),
            previous_sha: None,
            deadline_seconds: 600,
        }
    }

    #[test]
    fn job_names_are_deterministic_valid_and_differ_by_attempt() {
        let unit = spec().unit();
        let a = job_name("g", &unit, 1);
        assert_eq!(a, job_name("g", &unit, 1));
        assert_ne!(a, job_name("g", &unit, 2));
        assert_ne!(a, job_name("h", &unit, 1));
        assert!(a.len() <= 63, "{a}");
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{a}"
        );
        let long = Unit {
            repository: "x".repeat(200),
            ..unit
        };
        assert!(job_name(&"g".repeat(100), &long, 99).len() <= 63);
    }

    #[test]
    fn the_manifest_bounds_the_job_and_carries_no_secret_value() {
        let job = job_manifest(&config(), &spec(), 1, Duration::from_secs(90)).expect("job");
        let spec_ = job.spec.as_ref().expect("spec");
        assert_eq!(spec_.backoff_limit, Some(0));
        assert_eq!(spec_.active_deadline_seconds, Some(90));
        assert_eq!(spec_.ttl_seconds_after_finished, Some(86_400));
        let pod = spec_.template.spec.as_ref().expect("pod");
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        let container = &pod.containers[0];
        let env = container.env.as_ref().expect("env");
        assert_eq!(env[0].name, UNIT_SPEC_ENV);
        assert!(
            env[1..].iter().all(|e| e.name == "SENTRY_LOG_LEVEL"),
            "only the unit description and the log level are literal: {env:?}"
        );
        let from = container.env_from.as_ref().expect("envFrom");
        assert_eq!(
            from[0].secret_ref.as_ref().map(|s| s.name.as_str()),
            Some("qa-credentials")
        );
        let annotations = job.metadata.annotations.as_ref().expect("annotations");
        assert_eq!(
            annotations[ANNOTATION_PREVIOUS], "",
            "a new branch moved from nothing"
        );
        let labels = job.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels[LABEL_GROUP], "qa-group");
        assert_eq!(labels[LABEL_REPOSITORY], "rag-project-with-dots");
        let back: UnitSpec =
            serde_json::from_str(env[0].value.as_deref().expect("value")).expect("spec");
        assert_eq!(back, spec());
    }

    #[test]
    fn the_pod_template_carries_tolerations_mounts_and_secret_references_only() {
        use crate::config::pod::{PodVolume, SecretKeyEnv, Toleration as Tol};
        let mut k = config();
        k.pod = PodTemplate {
            tolerations: vec![Tol {
                key: Some("dedicated".to_owned()),
                operator: "Equal".to_owned(),
                value: Some("qa".to_owned()),
                effect: Some("NoSchedule".to_owned()),
                toleration_seconds: None,
            }],
            env_secret_keys: vec![SecretKeyEnv {
                name: "QA_TOKEN".to_owned(),
                secret: "qa-credentials".to_owned(),
                key: "token".to_owned(),
            }],
            volumes: vec![
                PodVolume {
                    name: "ssh".to_owned(),
                    mount_path: "/var/run/qa/ssh".to_owned(),
                    source: VolumeSource::Secret("qa-ssh".to_owned()),
                    read_only: true,
                },
                PodVolume {
                    name: "fixtures".to_owned(),
                    mount_path: "/srv/fixtures".to_owned(),
                    source: VolumeSource::ConfigMap("qa-fixtures".to_owned()),
                    read_only: false,
                },
            ],
        };
        let job = job_manifest(&k, &spec(), 1, Duration::from_secs(90)).expect("job");
        let json = serde_json::to_value(&job).expect("json");
        let pod = &json["spec"]["template"]["spec"];
        assert_eq!(pod["tolerations"][0]["key"], "dedicated");
        assert_eq!(pod["tolerations"][0]["effect"], "NoSchedule");
        assert_eq!(pod["volumes"][0]["configMap"]["name"], "sentry-config");
        assert_eq!(pod["volumes"][1]["secret"]["secretName"], "qa-ssh");
        assert_eq!(pod["volumes"][2]["configMap"]["name"], "qa-fixtures");
        let c = &pod["containers"][0];
        assert_eq!(c["volumeMounts"][0]["mountPath"], "/etc/sentry");
        assert_eq!(c["volumeMounts"][1]["name"], "ssh");
        assert_eq!(c["volumeMounts"][1]["readOnly"], true);
        assert_eq!(c["volumeMounts"][2]["readOnly"], false);
        let token = &c["env"][2];
        assert_eq!(token["name"], "QA_TOKEN");
        assert!(token.get("value").is_none(), "{token}");
        assert_eq!(token["valueFrom"]["secretKeyRef"]["name"], "qa-credentials");
        assert_eq!(token["valueFrom"]["secretKeyRef"]["key"], "token");
        // Without any of them, none of the keys appears.
        let plain = serde_json::to_value(
            job_manifest(&config(), &spec(), 1, Duration::from_secs(90)).expect("job"),
        )
        .expect("json");
        assert!(
            plain["spec"]["template"]["spec"]
                .get("tolerations")
                .is_none()
        );
        assert_eq!(
            plain["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
    }

    #[test]
    fn outcomes_round_trip_through_the_exit_code() {
        for status in [
            UnitStatus::Succeeded,
            UnitStatus::Failed,
            UnitStatus::SetupFailed,
            UnitStatus::TimedOut,
            UnitStatus::Cancelled,
        ] {
            let code = exit_for(status) as i32;
            let seen = finished(status == UnitStatus::Succeeded, Some(code), None);
            assert_eq!(seen.status, status);
        }
        let deadline = finished(false, None, Some("DeadlineExceeded"));
        assert_eq!(deadline.status, UnitStatus::TimedOut);
        let no_config = finished(false, Some(2), None);
        assert_eq!(no_config.status, UnitStatus::SetupFailed);
        let vanished = finished(false, None, None);
        assert_eq!(vanished.status, UnitStatus::SetupFailed);
    }
}
