//! Deploying: check out a repository's QA repo and run its commands for every unit of a
//! group run, under the group's strategy, and report each unit's result.

use std::time::Duration;

use serde::Serialize;

use crate::forge::Sha;

/// One thing to deploy: a repository at a branch's commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unit {
    /// Repository name from the configuration.
    pub repository: String,
    pub branch: String,
    /// Last handled SHA of the branch; `None` for a new branch or a manual run without state.
    pub previous_sha: Option<Sha>,
    pub sha: Sha,
}

/// What started a group run; reaches commands as `SENTRY_TRIGGER`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Poll,
    Webhook,
    /// By hand, with the local user's name for the audit trail.
    Manual {
        user: String,
    },
}

impl Trigger {
    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::Poll => "poll",
            Trigger::Webhook => "webhook",
            Trigger::Manual { .. } => "manual",
        }
    }
}

/// A group's units to deploy together.
#[derive(Debug, Clone)]
pub struct GroupRun {
    pub group: String,
    /// In configuration order.
    pub units: Vec<Unit>,
    pub trigger: Trigger,
    /// Unique per group run; reaches commands as `SENTRY_RUN_ID`.
    pub run_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitStatus {
    Succeeded,
    Failed,
    TimedOut,
    Skipped,
    Cancelled,
}

impl UnitStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UnitStatus::Succeeded => "succeeded",
            UnitStatus::Failed => "failed",
            UnitStatus::TimedOut => "timed_out",
            UnitStatus::Skipped => "skipped",
            UnitStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the unit's change counts as handled, so its stored SHA may advance.
    /// A unit cancelled by shutdown is not: it is deployed again after a restart.
    pub fn ends_change(self) -> bool {
        !matches!(self, UnitStatus::Cancelled)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct UnitResult {
    pub unit: Unit,
    pub status: UnitStatus,
    /// Exit code of the last command that ran, when it exited by itself.
    pub exit_code: Option<i32>,
    #[serde(with = "duration_secs")]
    pub duration: Duration,
    /// The last 64 KiB of the unit's output, secrets masked.
    pub output_tail: String,
    /// 1 + retries used.
    pub attempts: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupResult {
    pub run_id: String,
    pub group: String,
    pub trigger: Trigger,
    pub units: Vec<UnitResult>,
    #[serde(with = "duration_secs")]
    pub duration: Duration,
}

impl GroupResult {
    /// A group run succeeded only when every unit did.
    pub fn succeeded(&self) -> bool {
        self.units.iter().all(|u| u.status == UnitStatus::Succeeded)
    }
}

/// Durations as fractional seconds in JSON.
mod duration_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}
