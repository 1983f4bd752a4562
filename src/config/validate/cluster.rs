//! Checks of the Kubernetes sections: `leader_election:` and `state:`. Names must be what
//! the API server accepts, and the three election durations must nest (retry < renew
//! deadline < lease), or a leader could be deposed while it still believes it leads.

use super::Checker;
use crate::config::raw::{RawLeaderElection, RawStateConfig};
use crate::config::{LeaderElection, StateConfig};

impl Checker<'_> {
    pub(super) fn leader_election(&mut self, raw: RawLeaderElection) -> LeaderElection {
        let default = LeaderElection::default();
        let lease_name = self
            .object_name("leader_election.lease_name", raw.lease_name)
            .unwrap_or(default.lease_name);
        let namespace = self.namespace("leader_election.namespace", raw.namespace);
        let lease_duration = self.duration(
            "leader_election.lease_duration",
            raw.lease_duration,
            default.lease_duration,
        );
        let renew_deadline = self.duration(
            "leader_election.renew_deadline",
            raw.renew_deadline,
            default.renew_deadline,
        );
        let retry_period = self.duration(
            "leader_election.retry_period",
            raw.retry_period,
            default.retry_period,
        );
        if renew_deadline >= lease_duration {
            self.error(
                "leader_election.renew_deadline",
                format!(
                    "{} must be shorter than leader_election.lease_duration ({}): a leader must stop \
                     before a standby may take over",
                    humantime::format_duration(renew_deadline),
                    humantime::format_duration(lease_duration)
                ),
            );
        }
        if retry_period >= renew_deadline {
            self.error(
                "leader_election.retry_period",
                format!(
                    "{} must be shorter than leader_election.renew_deadline ({}), or a leader \
                     never gets a second try to renew",
                    humantime::format_duration(retry_period),
                    humantime::format_duration(renew_deadline)
                ),
            );
        }
        LeaderElection {
            enabled: raw.enabled.unwrap_or(false),
            lease_name,
            namespace,
            lease_duration,
            renew_deadline,
            retry_period,
        }
    }

    pub(super) fn state_config(
        &mut self,
        raw: RawStateConfig,
        election: &LeaderElection,
    ) -> StateConfig {
        let backend = self.optional_text("state.backend", raw.backend);
        let configmap = self.object_name("state.configmap", raw.configmap);
        let namespace = self.namespace("state.namespace", raw.namespace);
        match backend.as_deref() {
            None | Some("file") => {
                if configmap.is_some() || namespace.is_some() {
                    self.warn(
                        "state",
                        "state.configmap and state.namespace are ignored with the file backend",
                    );
                }
                StateConfig::File
            }
            Some("kubernetes") => {
                if !election.enabled {
                    self.error(
                        "state.backend",
                        "the kubernetes backend needs leader_election.enabled: true — the Lease \
                         is what makes one replica its only writer",
                    );
                }
                StateConfig::Kubernetes {
                    configmap: configmap.unwrap_or_else(|| "sentry-state".into()),
                    namespace,
                }
            }
            Some(other) => {
                self.error(
                    "state.backend",
                    format!(
                        "\"{}\" is not a backend; use file or kubernetes",
                        other.escape_debug()
                    ),
                );
                StateConfig::File
            }
        }
    }

    /// A Kubernetes object name: a DNS-1123 subdomain (lowercase letters, digits, `-`, `.`).
    fn object_name(&mut self, path: &str, value: Option<String>) -> Option<String> {
        let name = self.optional_text(path, value)?;
        if dns_name(&name, 253, true) {
            Some(name)
        } else {
            self.error(
                path,
                format!(
                    "\"{}\" is not a Kubernetes object name: 1 to 253 lowercase letters, digits, \
                     `-` and `.`, starting and ending with a letter or digit",
                    name.escape_debug()
                ),
            );
            None
        }
    }

    /// A namespace: a DNS-1123 label (lowercase letters, digits, `-`, at most 63).
    fn namespace(&mut self, path: &str, value: Option<String>) -> Option<String> {
        let name = self.optional_text(path, value).filter(|n| !n.is_empty())?;
        if dns_name(&name, 63, false) {
            Some(name)
        } else {
            self.error(
                path,
                format!(
                    "\"{}\" is not a namespace name: 1 to 63 lowercase letters, digits and `-`, \
                     starting and ending with a letter or digit",
                    name.escape_debug()
                ),
            );
            None
        }
    }
}

fn dns_name(name: &str, max: usize, dots: bool) -> bool {
    let edge = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= max
        && name.starts_with(edge)
        && name.ends_with(edge)
        && name
            .chars()
            .all(|c| edge(c) || c == '-' || (dots && c == '.'))
}
