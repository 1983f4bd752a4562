//! Commit statuses: each unit's outcome on the watched commit that triggered it, for the
//! repositories with `report.commit_status: true`.
//!
//! | unit | state posted | GitHub | GitLab |
//! |---|---|---|---|
//! | started | pending "Sentry: deploying to G" | `pending` | `pending` |
//! | succeeded | success | `success` | `success` |
//! | failed, timed out | failure | `failure` | `failed` |
//! | setup failed, cancelled by shutdown | error | `error` | `failed` |
//! | skipped (retried later by the scheduler) | pending, with the reason | `pending` | `pending` |
//! | superseded before it ran | superseded "superseded by abc1234" | `error` | `canceled` |
//!
//! The same state is never posted twice in a row for one commit and context (GitLab
//! answers 400 to that), so a skipped unit that later starts posts nothing new until its
//! outcome. Posting happens on the [`Queue`]'s task: transient failures are retried with
//! backoff, a rate limit waits for the host's pause, a refusal (401/403/404/422) is logged
//! and dropped — never anything that touches the deployment.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::queue::Queue;
use crate::config::{Config, Repository};
use crate::deploy::{RunObserver, RunRef, Unit, UnitResult, UnitStatus, format_duration};
use crate::forge::{CommitStatus, ForgeError, Forges, Posted, Sha, StatusState, kind};
use crate::telemetry::metrics::Metrics;

/// Tries of one status while the forge is unreachable or failing: with the backoff below,
/// about ten minutes, after which the forge is more likely gone than slow.
const MAX_TRIES: u32 = 14;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Remembered states before the memory is cleared (only repeats after that could slip by).
const MAX_REMEMBERED: usize = 10_000;

struct Job {
    repo: Arc<Repository>,
    status: CommitStatus,
}

type Key = (String, Sha, String);

/// The commit-status observer: decides what to post, queues it, and remembers what it
/// posted last per commit.
pub struct StatusReporter {
    config: Arc<Config>,
    queue: Queue<Job>,
    last: Mutex<HashMap<Key, StatusState>>,
}

impl StatusReporter {
    /// Starts the delivery task; needs a tokio runtime.
    pub fn start(config: Arc<Config>, forges: Forges, metrics: Arc<Metrics>) -> StatusReporter {
        let sink = metrics.clone();
        let queue = Queue::spawn("status", metrics, move |job: Job| {
            let (forges, metrics) = (forges.clone(), sink.clone());
            async move { deliver(&forges, &metrics, job).await }
        });
        StatusReporter {
            config,
            queue,
            last: Mutex::default(),
        }
    }

    /// Waits at most `within` for queued statuses to be delivered; returns how many were not.
    pub async fn drained(&self, within: Duration) -> usize {
        self.queue.drained(within).await
    }

    /// Queues a status for `unit`, unless its repository does not report or the commit
    /// already shows `state` for this context.
    fn report(&self, unit: &Unit, state: StatusState, description: String, run_id: Option<&str>) {
        let Some(repo) = self
            .config
            .repositories
            .iter()
            .find(|r| r.name == unit.repository && r.report.commit_status)
        else {
            return;
        };
        if !self.is_new(repo, &unit.sha, state) {
            return;
        }
        let status = CommitStatus {
            sha: unit.sha.clone(),
            branch: unit.branch.clone(),
            state,
            context: repo.report.context.clone(),
            description,
            target_url: run_id.and_then(|id| self.config.server.run_url(id)),
        };
        self.queue.push(Job {
            repo: repo.clone(),
            status,
        });
    }

    /// Records `state` as the commit's latest; false when it already was.
    fn is_new(&self, repo: &Repository, sha: &Sha, state: StatusState) -> bool {
        let key = (repo.name.clone(), sha.clone(), repo.report.context.clone());
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.get(&key) == Some(&state) {
            return false;
        }
        if state.is_final() {
            // Nothing follows an outcome; forgetting it keeps the map small.
            last.remove(&key);
        } else {
            if last.len() >= MAX_REMEMBERED {
                last.clear();
            }
            last.insert(key, state);
        }
        true
    }
}

impl RunObserver for StatusReporter {
    fn unit_started(&self, run: RunRef<'_>, unit: &Unit) {
        let text = format!("Sentry: deploying to {}", run.group);
        self.report(unit, StatusState::Pending, text, Some(run.run_id));
    }

    fn unit_ended(&self, run: RunRef<'_>, result: &UnitResult) {
        let (state, text) = outcome(run.group, result);
        self.report(&result.unit, state, text, Some(run.run_id));
    }

    fn unit_superseded(&self, _group: &str, unit: &Unit, by: &Sha) {
        let text = format!("Sentry: superseded by {}", &by.as_str()[..7]);
        self.report(unit, StatusState::Superseded, text, None);
    }
}

/// The state and description for a unit that ended (see the module table).
fn outcome(group: &str, result: &UnitResult) -> (StatusState, String) {
    let took = format_duration(result.duration);
    let command = result.failed_command.as_deref().unwrap_or("a command");
    let reason = result.reason.as_deref().unwrap_or("unknown reason");
    match result.status {
        UnitStatus::Succeeded => (
            StatusState::Success,
            format!("Sentry: deployed to {group} in {took}"),
        ),
        UnitStatus::Failed => {
            let exit = result
                .exit_code
                .map_or_else(String::new, |c| format!(" (exit {c})"));
            (
                StatusState::Failure,
                format!("Sentry: {command} failed{exit} in {group}"),
            )
        }
        UnitStatus::TimedOut => (
            StatusState::Failure,
            format!("Sentry: {command} timed out in {group}"),
        ),
        UnitStatus::SetupFailed => (
            StatusState::Error,
            format!("Sentry could not run it: {reason}"),
        ),
        UnitStatus::Cancelled => (
            StatusState::Error,
            "Sentry: cancelled by shutdown; deployed again after restart".to_owned(),
        ),
        // The scheduler tries it again: it is still on its way, not failed.
        UnitStatus::Skipped => (
            StatusState::Pending,
            format!("Sentry: waiting to retry ({reason})"),
        ),
    }
}

/// Posts one status until it is delivered, refused, or the tries run out.
async fn deliver(forges: &Forges, metrics: &Metrics, job: Job) {
    let forge = kind::of(job.repo.monitor.repo_type).name;
    let never = CancellationToken::new();
    let (repo, sha) = (&job.repo.name, job.status.sha.short());
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=MAX_TRIES {
        let error = match forges.post_status(&job.repo, &job.status, &never).await {
            Ok(posted) => {
                let outcome = match posted {
                    Posted::Created => "created",
                    Posted::AlreadySet => "already_set",
                };
                metrics.status_post(forge, outcome);
                tracing::debug!(repository = %repo, sha, state = ?job.status.state, outcome, "commit status posted");
                return;
            }
            Err(e) => e,
        };
        let wait = match &error {
            ForgeError::RateLimited { until, .. } => {
                metrics.status_post(forge, "rate_limited");
                let left = until.duration_since(SystemTime::now()).unwrap_or_default();
                left.clamp(Duration::from_millis(100), Duration::from_secs(3600))
            }
            ForgeError::Transient(_) => {
                metrics.status_post(forge, "error");
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
            ForgeError::Auth(_)
            | ForgeError::NotFound(_)
            | ForgeError::Malformed(_)
            | ForgeError::Rejected(_) => {
                metrics.status_post(forge, "rejected");
                tracing::warn!(repository = %repo, sha, "commit status not posted: {error}");
                return;
            }
        };
        if attempt < MAX_TRIES {
            tracing::debug!(repository = %repo, sha, "commit status not posted yet ({error}); trying again in {wait:?}");
            tokio::time::sleep(wait).await;
        } else {
            metrics.status_post(forge, "gave_up");
            tracing::warn!(repository = %repo, sha, "commit status given up after {MAX_TRIES} tries: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: UnitStatus) -> UnitResult {
        UnitResult {
            unit: Unit {
                repository: "r".into(),
                branch: "main".into(),
                previous_sha: None,
                sha: Sha::parse(&"a".repeat(40)).unwrap(),
            },
            status,
            exit_code: Some(3),
            duration: Duration::from_secs(2),
            output_tail: String::new(),
            attempts: 1,
            failed_command: Some("[1] ./deploy.sh".into()),
            reason: Some("clone failed".into()),
        }
    }

    #[test]
    fn outcomes_map_to_states() {
        let state = |s| outcome("g", &result(s)).0;
        assert_eq!(state(UnitStatus::Succeeded), StatusState::Success);
        assert_eq!(state(UnitStatus::Failed), StatusState::Failure);
        assert_eq!(state(UnitStatus::TimedOut), StatusState::Failure);
        assert_eq!(state(UnitStatus::SetupFailed), StatusState::Error);
        assert_eq!(state(UnitStatus::Cancelled), StatusState::Error);
        assert_eq!(state(UnitStatus::Skipped), StatusState::Pending);
        assert_eq!(
            outcome("g", &result(UnitStatus::Failed)).1,
            "Sentry: [1] ./deploy.sh failed (exit 3) in g"
        );
    }
}
