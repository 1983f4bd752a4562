//! Checks of the kubernetes executor's pod template keys (`tolerations`, `volumes`,
//! `env_secret_keys`): what the API server would refuse is an error here, at the key that
//! says it, instead of a Job creation failing at the first move.

use std::collections::BTreeMap;

use super::{Checker, is_dns_label, is_dns_subdomain};
use crate::config::pod::{
    PodTemplate, PodVolume, RawPodVolume, RawSecretKey, RawToleration, SecretKeyEnv, Toleration,
    VolumeSource,
};

/// Where Sentry mounts the configuration in the pod; no volume may hide it.
const CONFIG_DIR: &str = "/etc/sentry";
/// Variables the manifest sets itself.
const OWN_ENV: [&str; 2] = ["SENTRY_EXEC_UNIT", "SENTRY_LOG_LEVEL"];

impl Checker<'_> {
    pub(super) fn pod_template(
        &mut self,
        path: &str,
        tolerations: Option<Vec<RawToleration>>,
        env_secret_keys: Option<BTreeMap<String, RawSecretKey>>,
        volumes: Option<Vec<RawPodVolume>>,
    ) -> PodTemplate {
        let tolerations = tolerations
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, t)| self.toleration(&format!("{path}.tolerations[{i}]"), t))
            .collect();
        let env_secret_keys = env_secret_keys
            .into_iter()
            .flatten()
            .filter_map(|(name, r)| {
                self.secret_key_env(&format!("{path}.env_secret_keys.{name}"), name, r)
            })
            .collect();
        let mut names: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for (i, v) in volumes.into_iter().flatten().enumerate() {
            let at = format!("{path}.volumes[{i}]");
            if let Some(v) = self.volume(&at, v) {
                if names.contains(&v.name) {
                    self.error(
                        format!("{at}.name"),
                        format!("\"{}\" names two volumes; give each its own name", v.name),
                    );
                    continue;
                }
                names.push(v.name.clone());
                out.push(v);
            }
        }
        PodTemplate {
            tolerations,
            env_secret_keys,
            volumes: out,
        }
    }

    fn toleration(&mut self, path: &str, raw: RawToleration) -> Option<Toleration> {
        let key = self
            .optional_text(&format!("{path}.key"), raw.key)
            .filter(|k| !k.is_empty());
        let operator = self
            .optional_text(&format!("{path}.operator"), raw.operator)
            .unwrap_or_else(|| "Equal".to_owned());
        let value = self
            .optional_text(&format!("{path}.value"), raw.value)
            .filter(|v| !v.is_empty());
        let effect = self
            .optional_text(&format!("{path}.effect"), raw.effect)
            .filter(|e| !e.is_empty());
        let errors = self.errors();
        match operator.as_str() {
            "Equal" if key.is_none() => self.error(
                format!("{path}.key"),
                "operator Equal needs a key; to tolerate every taint use operator: Exists without a key",
            ),
            "Exists" if value.is_some() => self.error(
                format!("{path}.value"),
                "operator Exists takes no value; remove it or use operator: Equal",
            ),
            "Equal" | "Exists" => {}
            other => self.error(
                format!("{path}.operator"),
                format!("\"{other}\" is not an operator; use Equal or Exists"),
            ),
        }
        if let Some(e) = &effect {
            if !matches!(e.as_str(), "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
                self.error(
                    format!("{path}.effect"),
                    format!("\"{e}\" is not a taint effect; use NoSchedule, PreferNoSchedule or NoExecute"),
                );
            }
        }
        match raw.toleration_seconds {
            Some(s) if s < 0 => self.error(
                format!("{path}.toleration_seconds"),
                format!("{s} is negative"),
            ),
            Some(_) if effect.as_deref() != Some("NoExecute") => self.error(
                format!("{path}.toleration_seconds"),
                "only a toleration with effect: NoExecute has toleration_seconds",
            ),
            _ => {}
        }
        (self.errors() == errors).then_some(Toleration {
            key,
            operator,
            value,
            effect,
            toleration_seconds: raw.toleration_seconds,
        })
    }

    fn secret_key_env(
        &mut self,
        path: &str,
        name: String,
        raw: RawSecretKey,
    ) -> Option<SecretKeyEnv> {
        let errors = self.errors();
        if !is_env_name(&name) {
            self.error(
                path,
                format!(
                    "\"{}\" is not an environment variable name (letters, digits and `_`, not starting with a digit)",
                    name.escape_debug()
                ),
            );
        } else if OWN_ENV.contains(&name.as_str()) {
            self.error(
                path,
                format!("{name} is set by Sentry itself; use another name"),
            );
        }
        let secret = self.required_text(&format!("{path}.secret"), raw.secret);
        if let Some(s) = &secret {
            if !is_dns_subdomain(s) {
                self.error(
                    format!("{path}.secret"),
                    format!("\"{}\" is not a Secret name", s.escape_debug()),
                );
            }
        }
        let key = self.required_text(&format!("{path}.key"), raw.key);
        if let Some(k) = &key {
            if !is_config_key(k) {
                self.error(
                    format!("{path}.key"),
                    format!(
                        "\"{}\" is not a Secret key (letters, digits, `-`, `_` and `.`)",
                        k.escape_debug()
                    ),
                );
            }
        }
        match (secret, key) {
            (Some(secret), Some(key)) if self.errors() == errors => {
                Some(SecretKeyEnv { name, secret, key })
            }
            _ => None,
        }
    }

    fn volume(&mut self, path: &str, raw: RawPodVolume) -> Option<PodVolume> {
        let errors = self.errors();
        let name = self.required_text(&format!("{path}.name"), raw.name);
        if let Some(n) = &name {
            if !is_dns_label(n) {
                self.error(
                    format!("{path}.name"),
                    format!(
                        "\"{}\" is not a volume name (at most 63 lowercase letters, digits and `-`)",
                        n.escape_debug()
                    ),
                );
            } else if n == "config" {
                self.error(
                    format!("{path}.name"),
                    "\"config\" is the volume of Sentry's own configuration; use another name",
                );
            }
        }
        let mount_path = self.required_text(&format!("{path}.mount_path"), raw.mount_path);
        if let Some(m) = &mount_path {
            let trimmed = m.trim_end_matches('/');
            if !m.starts_with('/') {
                self.error(
                    format!("{path}.mount_path"),
                    format!("\"{}\" is not an absolute path", m.escape_debug()),
                );
            } else if trimmed.is_empty()
                || trimmed == CONFIG_DIR
                || CONFIG_DIR.starts_with(&format!("{trimmed}/"))
                || trimmed.starts_with(&format!("{CONFIG_DIR}/"))
            {
                self.error(
                    format!("{path}.mount_path"),
                    format!("{m} would hide or share {CONFIG_DIR}, where the pod reads its configuration; mount elsewhere"),
                );
            }
        }
        let secret = self.optional_text(&format!("{path}.secret"), raw.secret);
        let config_map = self.optional_text(&format!("{path}.config_map"), raw.config_map);
        let source = match (secret, config_map) {
            (Some(s), None) => Some((format!("{path}.secret"), VolumeSource::Secret(s))),
            (None, Some(c)) => Some((format!("{path}.config_map"), VolumeSource::ConfigMap(c))),
            (Some(_), Some(_)) => {
                self.error(path, "set one of secret and config_map, not both");
                None
            }
            (None, None) => {
                self.error(path, "set what to mount: secret or config_map");
                None
            }
        };
        if let Some((at, VolumeSource::Secret(n) | VolumeSource::ConfigMap(n))) = &source {
            if !is_dns_subdomain(n) {
                self.error(
                    at,
                    format!("\"{}\" is not a Kubernetes object name", n.escape_debug()),
                );
            }
        }
        match (name, mount_path, source) {
            (Some(name), Some(mount_path), Some((_, source))) if self.errors() == errors => {
                Some(PodVolume {
                    name,
                    mount_path,
                    source,
                    read_only: raw.read_only.unwrap_or(true),
                })
            }
            _ => None,
        }
    }
}

/// What the API server accepts as an environment variable name (C identifier rules).
fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What the API server accepts as a Secret or ConfigMap key.
fn is_config_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use crate::config::pod::{PodVolume, SecretKeyEnv, VolumeSource};
    use crate::config::{Env, ExecutorKind, KubernetesExecutorConfig, Severity, load_str};

    fn yaml(extra: &str) -> String {
        format!(
            "groups:\n  g:\n    executor:\n      kind: kubernetes\n      namespace: qa-jobs\n      image: sentry:1\n{extra}\
             repositories:\n  - name: a\n    group: g\n    monitor: {{repo_url: /tmp/x, branches: [main], repo_type: git}}\n    \
             deploy: {{qa_repo_url: /tmp/qa, qa_repo_branch: main, commands: [\"true\"]}}\n"
        )
    }

    fn executor(extra: &str) -> KubernetesExecutorConfig {
        let loaded = load_str(&yaml(extra), &Env::fixed([("HOME", "/root")]));
        let config = loaded
            .config
            .unwrap_or_else(|| panic!("{:?}", loaded.diagnostics));
        match &config.groups[0].executor {
            ExecutorKind::Kubernetes(k) => (**k).clone(),
            other => panic!("not kubernetes: {other:?}"),
        }
    }

    fn errors(extra: &str) -> Vec<(String, String)> {
        load_str(&yaml(extra), &Env::fixed([("HOME", "/root")]))
            .diagnostics
            .into_iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| (d.path, d.message))
            .collect()
    }

    #[test]
    fn tolerations_volumes_and_secret_keys_are_read() {
        let k = executor(
            "      tolerations:\n        - {key: dedicated, value: qa, effect: NoSchedule}\n        - {operator: Exists, effect: NoExecute, toleration_seconds: 60}\n\
             \x20     env_secret_keys: {QA_TOKEN: {secret: qa-credentials, key: token}}\n\
             \x20     volumes:\n        - {name: ssh, mount_path: /var/run/qa/ssh, secret: qa-ssh}\n        - {name: fixtures, mount_path: /srv/fixtures, config_map: qa-fixtures, read_only: false}\n",
        );
        assert_eq!(k.pod.tolerations.len(), 2);
        assert_eq!(k.pod.tolerations[0].operator, "Equal");
        assert_eq!(k.pod.tolerations[1].key, None);
        assert_eq!(k.pod.tolerations[1].toleration_seconds, Some(60));
        assert_eq!(
            k.pod.env_secret_keys,
            [SecretKeyEnv {
                name: "QA_TOKEN".to_owned(),
                secret: "qa-credentials".to_owned(),
                key: "token".to_owned(),
            }]
        );
        assert_eq!(
            k.pod.volumes[0],
            PodVolume {
                name: "ssh".to_owned(),
                mount_path: "/var/run/qa/ssh".to_owned(),
                source: VolumeSource::Secret("qa-ssh".to_owned()),
                read_only: true,
            }
        );
        assert_eq!(
            k.pod.volumes[1].source,
            VolumeSource::ConfigMap("qa-fixtures".to_owned())
        );
        assert!(!k.pod.volumes[1].read_only);
    }

    #[test]
    fn what_the_api_server_would_refuse_is_an_error_at_its_key() {
        let cases = [
            (
                "      tolerations: [{value: qa}]\n",
                "groups.g.executor.tolerations[0].key",
                "needs a key",
            ),
            (
                "      tolerations: [{key: k, operator: Exists, value: v}]\n",
                "groups.g.executor.tolerations[0].value",
                "takes no value",
            ),
            (
                "      tolerations: [{key: k, operator: In}]\n",
                "groups.g.executor.tolerations[0].operator",
                "Equal or Exists",
            ),
            (
                "      tolerations: [{key: k, effect: NoRun}]\n",
                "groups.g.executor.tolerations[0].effect",
                "not a taint effect",
            ),
            (
                "      tolerations: [{key: k, effect: NoSchedule, toleration_seconds: 5}]\n",
                "groups.g.executor.tolerations[0].toleration_seconds",
                "NoExecute",
            ),
            (
                "      env_secret_keys: {1TOKEN: {secret: s, key: k}}\n",
                "groups.g.executor.env_secret_keys.1TOKEN",
                "environment variable name",
            ),
            (
                "      env_secret_keys: {SENTRY_EXEC_UNIT: {secret: s, key: k}}\n",
                "groups.g.executor.env_secret_keys.SENTRY_EXEC_UNIT",
                "set by Sentry itself",
            ),
            (
                "      env_secret_keys: {T: {secret: Bad_Secret, key: k}}\n",
                "groups.g.executor.env_secret_keys.T.secret",
                "not a Secret name",
            ),
            (
                "      env_secret_keys: {T: {secret: s}}\n",
                "groups.g.executor.env_secret_keys.T.key",
                "",
            ),
            (
                "      volumes: [{name: config, mount_path: /x, secret: s}]\n",
                "groups.g.executor.volumes[0].name",
                "Sentry's own configuration",
            ),
            (
                "      volumes: [{name: v, mount_path: /etc/sentry, secret: s}]\n",
                "groups.g.executor.volumes[0].mount_path",
                "/etc/sentry",
            ),
            (
                "      volumes: [{name: v, mount_path: /etc, secret: s}]\n",
                "groups.g.executor.volumes[0].mount_path",
                "/etc/sentry",
            ),
            (
                "      volumes: [{name: v, mount_path: relative, secret: s}]\n",
                "groups.g.executor.volumes[0].mount_path",
                "absolute",
            ),
            (
                "      volumes: [{name: v, mount_path: /x, secret: s, config_map: c}]\n",
                "groups.g.executor.volumes[0]",
                "not both",
            ),
            (
                "      volumes: [{name: v, mount_path: /x}]\n",
                "groups.g.executor.volumes[0]",
                "secret or config_map",
            ),
            (
                "      volumes: [{name: v, mount_path: /x, secret: s}, {name: v, mount_path: /y, secret: t}]\n",
                "groups.g.executor.volumes[1].name",
                "names two volumes",
            ),
        ];
        for (extra, path, message) in cases {
            let errors = errors(extra);
            assert!(
                errors.iter().any(|(p, m)| p == path && m.contains(message)),
                "{extra}: no error at {path} containing {message:?}: {errors:?}"
            );
        }
        // A mount next to, not over, the configuration is fine.
        assert!(
            errors("      volumes: [{name: v, mount_path: /etc/sentry-extra, secret: s}]\n")
                .is_empty()
        );
    }
}
