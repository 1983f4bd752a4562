//! The pod template keys of `executor: {kind: kubernetes}` beyond the basics: tolerations,
//! Secrets and ConfigMaps mounted as files, and environment variables from single keys of
//! Secrets. Owns their raw (schema) form and their checked form; the checks are in
//! `validate/pod.rs`, the manifest in `deploy/kubernetes.rs`. Only names of Secrets ever
//! reach the Job spec, never their values.

use schemars::JsonSchema;
use serde::Deserialize;

/// `executor.tolerations[i]`, as written.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawToleration {
    /// The taint key; empty with `operator: Exists` tolerates every taint.
    pub key: Option<String>,
    /// `Equal` (default: the taint's value must be `value`) or `Exists`.
    pub operator: Option<String>,
    /// The taint value, with `operator: Equal`.
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`; none: every effect.
    pub effect: Option<String>,
    /// With `effect: NoExecute`: how long the pod stays after the taint appears.
    pub toleration_seconds: Option<i64>,
}

/// `executor.env_secret_keys.<VAR>`, as written.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawSecretKey {
    /// The Secret's name (in the Job namespace).
    pub secret: Option<String>,
    /// The key in the Secret whose value the variable gets.
    pub key: Option<String>,
}

/// `executor.volumes[i]`, as written.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RawPodVolume {
    /// The volume's name in the pod (a DNS label; `config` is Sentry's own).
    pub name: Option<String>,
    /// Where the container sees it (absolute; not under `/etc/sentry`).
    pub mount_path: Option<String>,
    /// A Secret to mount (its keys become files); exactly one of `secret` and `config_map`.
    pub secret: Option<String>,
    /// A ConfigMap to mount (its keys become files).
    pub config_map: Option<String>,
    /// Default `true`.
    pub read_only: Option<bool>,
}

/// A checked toleration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toleration {
    pub key: Option<String>,
    /// `Equal` or `Exists`.
    pub operator: String,
    pub value: Option<String>,
    pub effect: Option<String>,
    pub toleration_seconds: Option<i64>,
}

/// An environment variable set from one key of a Secret (`secretKeyRef`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretKeyEnv {
    pub name: String,
    pub secret: String,
    pub key: String,
}

/// What a volume mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    Secret(String),
    ConfigMap(String),
}

/// A checked volume and its mount in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodVolume {
    pub name: String,
    pub mount_path: String,
    pub source: VolumeSource,
    pub read_only: bool,
}

/// The checked pod template keys of a kubernetes executor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodTemplate {
    pub tolerations: Vec<Toleration>,
    pub env_secret_keys: Vec<SecretKeyEnv>,
    pub volumes: Vec<PodVolume>,
}
