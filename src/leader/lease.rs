//! The Lease on the API server: read, create, renew, take over and release it with
//! `resourceVersion` preconditions, and the two loops `watch` runs — [`Elector::acquire`]
//! while standing by, [`Elector::hold`] while leading.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Decision, Observed, decide};
use crate::cluster;
use crate::config::LeaderElection;

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("cannot reach the Kubernetes API server: {0}")]
    Connect(#[from] cluster::ClusterError),
    #[error("lost the leadership of Lease {lease}: {why}; stopping all work now")]
    Lost { lease: String, why: String },
}

/// Proof that this replica acquired the Lease; [`Elector::hold`] keeps it.
#[derive(Debug)]
pub struct Term {
    /// When the write that won the term was sent: the renew deadline counts from there.
    won_at: Instant,
}

/// What this replica last saw of the Lease.
#[derive(Debug)]
struct View {
    observed: Option<Observed>,
    /// When the current `resourceVersion` was first seen.
    since: Instant,
}

/// One replica's side of the election.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    lease: String,
    me: String,
    timing: LeaderElection,
    view: Mutex<View>,
}

/// What one try did.
enum Try {
    Leading,
    Following(String),
}

impl Elector {
    /// Connects the standard way (in-cluster service account, else `KUBECONFIG` or
    /// `~/.kube/config`).
    pub async fn connect(timing: &LeaderElection, me: String) -> Result<Elector, ElectionError> {
        let (client, namespace) = cluster::connect(timing.namespace.as_deref()).await?;
        Ok(Elector {
            api: Api::namespaced(client, &namespace),
            lease: format!("{namespace}/{}", timing.lease_name),
            me,
            timing: timing.clone(),
            view: Mutex::new(View {
                observed: None,
                since: Instant::now(),
            }),
        })
    }

    pub fn identity(&self) -> &str {
        &self.me
    }

    /// `namespace/name` of the Lease, for messages.
    pub fn lease(&self) -> &str {
        &self.lease
    }

    /// Tries every `retry_period` until this replica leads (`Some`) or `stop` is cancelled
    /// (`None`). `alive` is called after every answer from the API server, whatever it was.
    pub async fn acquire(&self, stop: &CancellationToken, alive: impl Fn()) -> Option<Term> {
        let mut last_holder = String::new();
        loop {
            let started = Instant::now();
            match self.try_bounded().await {
                Ok(Try::Leading) => {
                    alive();
                    tracing::info!(lease = %self.lease, identity = %self.me, "leading: acquired Lease {}", self.lease);
                    return Some(Term { won_at: started });
                }
                Ok(Try::Following(holder)) => {
                    alive();
                    if holder != last_holder {
                        tracing::info!(lease = %self.lease, holder = %holder, "standing by: {holder} leads");
                        last_holder = holder;
                    }
                }
                Err(why) => {
                    tracing::warn!(lease = %self.lease, "cannot check Lease {}: {why}", self.lease)
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep_until(started + self.timing.retry_period) => {}
            }
        }
    }

    /// Renews every `retry_period` until `stop` is cancelled (`Ok`) or the Lease is lost
    /// (`Err`): another replica holds it, or no renewal succeeded within `renew_deadline`
    /// of the last successful one's start. The deadline interrupts a stalled request, so
    /// the caller hears of the loss no later than the deadline.
    pub async fn hold(&self, term: Term, stop: &CancellationToken) -> Result<(), ElectionError> {
        let mut renewed = term.won_at;
        loop {
            let deadline = renewed + self.timing.renew_deadline;
            let next = (Instant::now() + self.timing.retry_period).min(deadline);
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(next) => {}
            }
            let started = Instant::now();
            let outcome = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(deadline) => Err("timed out".to_owned()),
                t = self.try_once() => t.map_err(|e| e.to_string()),
            };
            match outcome {
                Ok(Try::Leading) => renewed = started,
                Ok(Try::Following(holder)) => {
                    return Err(self.lost(format!("{holder} holds it now")));
                }
                Err(why) if Instant::now() >= deadline => {
                    return Err(self.lost(format!(
                        "no renewal within renew_deadline ({}); last error: {why}",
                        humantime::format_duration(self.timing.renew_deadline)
                    )));
                }
                Err(why) => {
                    tracing::warn!(lease = %self.lease, "cannot renew Lease {}: {why}; retrying", self.lease)
                }
            }
        }
    }

    /// Gives the Lease up (holder cleared) so that a standby takes over at its next try
    /// rather than after the lease duration. Best effort: a failure only delays the handover.
    pub async fn release(&self) {
        let released = tokio::time::timeout(self.timing.renew_deadline, async {
            let mut lease = self.api.get(&self.timing.lease_name).await?;
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
                return Ok(false);
            }
            spec.holder_identity = None;
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api
                .replace(&self.timing.lease_name, &PostParams::default(), &lease)
                .await?;
            Ok::<_, kube::Error>(true)
        })
        .await;
        match released {
            Ok(Ok(true)) => tracing::info!(lease = %self.lease, "released Lease {}", self.lease),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(
                "cannot release Lease {}: {e}; a standby takes over when it expires",
                self.lease
            ),
            Err(_) => tracing::warn!(
                "releasing Lease {} timed out; a standby takes over when it expires",
                self.lease
            ),
        }
    }

    fn lost(&self, why: String) -> ElectionError {
        ElectionError::Lost {
            lease: self.lease.clone(),
            why,
        }
    }

    /// One try, bounded by the retry period so that a stalled API server does not stall
    /// the standby's loop.
    async fn try_bounded(&self) -> Result<Try, String> {
        let bound = self.timing.retry_period.max(Duration::from_secs(1));
        match tokio::time::timeout(bound, self.try_once()).await {
            Ok(t) => t.map_err(|e| e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Reads the Lease, decides, and writes if the decision says so. A `409` on the write
    /// means another replica wrote first: we follow.
    async fn try_once(&self) -> Result<Try, kube::Error> {
        let current = self.api.get_opt(&self.timing.lease_name).await?;
        let now = Instant::now();
        let decision = {
            let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
            let observed = current.as_ref().map(observe);
            let changed = view.observed.as_ref().map(|o| &o.resource_version)
                != observed.as_ref().map(|o| &o.resource_version);
            if changed {
                view.since = now;
                view.observed = observed;
            }
            decide(&self.me, view.observed.as_ref(), view.since, now)
        };
        let written = match (decision, current) {
            (Decision::Follow { holder, .. }, _) => return Ok(Try::Following(holder)),
            (Decision::Create, _) => {
                let lease = self.fresh_lease(
                    ObjectMeta {
                        name: Some(self.timing.lease_name.clone()),
                        ..ObjectMeta::default()
                    },
                    0,
                );
                self.api.create(&PostParams::default(), &lease).await
            }
            (Decision::Renew, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.renew_time = Some(MicroTime(Timestamp::now()));
                spec.lease_duration_seconds = Some(seconds(self.timing.lease_duration));
                self.replace(&lease).await
            }
            (Decision::TakeOver { from }, Some(lease)) => {
                if let Some(from) = from {
                    tracing::warn!(lease = %self.lease, "Lease {} held by {from} expired; taking over", self.lease);
                }
                let transitions = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_transitions)
                    .unwrap_or(0);
                let lease = self.fresh_lease(lease.metadata, transitions.saturating_add(1));
                self.replace(&lease).await
            }
            (Decision::Renew | Decision::TakeOver { .. }, None) => {
                return Ok(Try::Following(String::new()));
            }
        };
        match written {
            Ok(_) => Ok(Try::Leading),
            Err(e) if cluster::is_conflict(&e) => {
                let holder = self.view_holder();
                Ok(Try::Following(holder))
            }
            Err(e) => Err(e),
        }
    }

    /// PUT with the `resourceVersion` in `lease.metadata`: the precondition.
    async fn replace(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        self.api
            .replace(&self.timing.lease_name, &PostParams::default(), lease)
            .await
    }

    fn fresh_lease(&self, metadata: ObjectMeta, transitions: i32) -> Lease {
        let now = MicroTime(Timestamp::now());
        Lease {
            metadata,
            spec: Some(LeaseSpec {
                holder_identity: Some(self.me.clone()),
                lease_duration_seconds: Some(seconds(self.timing.lease_duration)),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        }
    }

    fn view_holder(&self) -> String {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        view.observed
            .as_ref()
            .and_then(|o| o.holder.clone())
            .unwrap_or_else(|| "another replica".into())
    }
}

fn observe(lease: &Lease) -> Observed {
    let spec = lease.spec.as_ref();
    Observed {
        holder: spec.and_then(|s| s.holder_identity.clone()),
        lease_duration: Duration::from_secs(
            spec.and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(15),
        ),
        resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
    }
}

/// `leaseDurationSeconds` is whole seconds: round up, never below one.
fn seconds(d: Duration) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
}
