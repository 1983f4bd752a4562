//! Reporting run outcomes where developers look: commit statuses on the watched commits
//! ([`status`]) and notifications to webhooks and Slack ([`notify`]).
//!
//! Both are run observers (`crate::deploy::observer`): they are told of runs and units
//! and never decide anything about them. Each hands its work to a bounded [`queue`] drained
//! by a task of its own, so a forge or receiver that is slow, refusing or down never
//! delays or changes a deployment. `watch` and `trigger` build the same [`Reporting`];
//! `trigger --no-report` leaves it out.

pub mod notify;
pub mod queue;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::deploy::RunObserver;
use crate::forge::Forges;
use crate::telemetry::metrics::Metrics;

/// The reporting observers of one process, and their queues.
pub struct Reporting {
    status: Option<Arc<status::StatusReporter>>,
    notify: Option<Arc<notify::Notifier>>,
}

impl Reporting {
    /// Starts what `config` asks for: the status reporter when a repository reports, the
    /// notifier when a group has targets. Needs a tokio runtime.
    pub fn start(
        config: &Arc<Config>,
        forges: &Forges,
        metrics: &Arc<Metrics>,
    ) -> Result<Reporting, reqwest::Error> {
        let wants_status = config.repositories.iter().any(|r| r.report.commit_status);
        let wants_notify = config.groups.iter().any(|g| !g.notify.is_empty());
        let status = wants_status.then(|| {
            Arc::new(status::StatusReporter::start(
                config.clone(),
                forges.clone(),
                metrics.clone(),
            ))
        });
        let notify = match wants_notify {
            true => Some(Arc::new(notify::Notifier::start(
                config.clone(),
                metrics.clone(),
            )?)),
            false => None,
        };
        Ok(Reporting { status, notify })
    }

    /// Reports nothing (`trigger --no-report`).
    pub fn off() -> Reporting {
        Reporting {
            status: None,
            notify: None,
        }
    }

    /// The observers to add to a run's list.
    pub fn observers(&self) -> Vec<Arc<dyn RunObserver>> {
        let mut list: Vec<Arc<dyn RunObserver>> = Vec::new();
        if let Some(s) = &self.status {
            list.push(s.clone());
        }
        if let Some(n) = &self.notify {
            list.push(n.clone());
        }
        list
    }

    /// Before exiting: waits at most `within` for queued statuses and notifications to be
    /// delivered, and says what was left undelivered.
    pub async fn flush(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let left =
            |d: tokio::time::Instant| d.saturating_duration_since(tokio::time::Instant::now());
        let statuses = match &self.status {
            Some(s) => s.drained(left(deadline)).await,
            None => 0,
        };
        let notifications = match &self.notify {
            Some(n) => n.drained(left(deadline)).await,
            None => 0,
        };
        if statuses + notifications > 0 {
            tracing::warn!(
                "exiting with {statuses} commit status(es) and {notifications} notification(s) \
                 not delivered after waiting {}",
                humantime::format_duration(within)
            );
        }
    }
}
