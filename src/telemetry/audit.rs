//! The audit trail: one record per unit and per group run, as a tracing event with target
//! `audit` and, when `audit_log` is set, as one JSON object per line appended to that file
//! (flushed per record). Records hold names, SHAs and outcomes — never a secret.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

use crate::deploy::{GroupResult, RunObserver, RunRef, Trigger, UnitResult};

#[derive(Debug, Serialize)]
struct Record<'a> {
    time: String,
    kind: &'static str,
    run_id: &'a str,
    trigger: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    group: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    repository: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    branch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_sha: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha: Option<&'a str>,
    result: &'a str,
    duration_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    units: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failed_command: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

#[derive(Debug, Default)]
pub struct Audit {
    file: Option<Mutex<File>>,
}

impl Audit {
    /// Opens (creating) the audit log for appending; `None` logs to tracing only.
    pub fn open(path: Option<&Path>) -> std::io::Result<Audit> {
        let file = match path {
            Some(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                Some(Mutex::new(
                    OpenOptions::new().create(true).append(true).open(path)?,
                ))
            }
            None => None,
        };
        Ok(Audit { file })
    }

    pub fn unit(&self, run_id: &str, group: &str, trigger: &Trigger, result: &UnitResult) {
        let unit = &result.unit;
        self.write(Record {
            kind: "unit",
            repository: Some(&unit.repository),
            branch: Some(&unit.branch),
            previous_sha: unit.previous_sha.as_ref().map(|s| s.as_str()),
            sha: Some(unit.sha.as_str()),
            result: result.status.as_str(),
            duration_seconds: result.duration.as_secs_f64(),
            exit_code: result.exit_code,
            units: None,
            failed_command: result.failed_command.as_deref(),
            reason: result.reason.as_deref(),
            ..base(run_id, group, trigger)
        });
    }

    pub fn group_run(&self, result: &GroupResult) {
        self.write(Record {
            kind: "group_run",
            result: if result.succeeded() {
                "succeeded"
            } else {
                "failed"
            },
            duration_seconds: result.duration.as_secs_f64(),
            units: Some(result.units.len()),
            ..base(&result.run_id, &result.group, &result.trigger)
        });
    }

    fn write(&self, record: Record) {
        log(&record);
        let Some(file) = &self.file else { return };
        let line = match serde_json::to_string(&record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!("cannot encode audit record: {e}");
                return;
            }
        };
        let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
        let written = file
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| file.flush());
        if let Err(e) = written {
            tracing::error!("cannot append to the audit log: {e}");
        }
    }
}

/// The record as an event of target `audit`, each part a field of its own (log pipelines
/// index fields; a JSON string inside the message they cannot).
fn log(r: &Record) {
    tracing::info!(
        target: "audit",
        kind = r.kind,
        run_id = r.run_id,
        trigger = r.trigger,
        user = r.user,
        group = r.group,
        repository = r.repository,
        branch = r.branch,
        previous_sha = r.previous_sha,
        sha = r.sha,
        result = r.result,
        duration_seconds = r.duration_seconds,
        exit_code = r.exit_code,
        units = r.units,
        failed_command = r.failed_command,
        reason = r.reason,
        "audit: {} {}",
        r.kind,
        r.result
    );
}

/// Every unit and every group run, whatever started it (`watch` or `trigger`).
impl RunObserver for Audit {
    fn unit_ended(&self, run: RunRef<'_>, result: &UnitResult) {
        self.unit(run.run_id, run.group, run.trigger, result);
    }

    fn group_ended(&self, result: &GroupResult) {
        self.group_run(result);
    }
}

fn base<'a>(run_id: &'a str, group: &'a str, trigger: &'a Trigger) -> Record<'a> {
    Record {
        time: super::now_rfc3339(),
        kind: "",
        run_id,
        trigger: trigger.as_str(),
        user: match trigger {
            Trigger::Manual { user } => Some(user),
            _ => None,
        },
        group,
        repository: None,
        branch: None,
        previous_sha: None,
        sha: None,
        result: "",
        duration_seconds: 0.0,
        exit_code: None,
        units: None,
        failed_command: None,
        reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::{Unit, UnitStatus};
    use crate::forge::Sha;
    use std::time::Duration;

    #[test]
    fn appends_one_json_object_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/audit.jsonl");
        let audit = Audit::open(Some(&path)).unwrap();
        let result = UnitResult {
            unit: Unit {
                repository: "rag".into(),
                branch: "main".into(),
                previous_sha: None,
                sha: Sha::parse(&"a".repeat(40)).unwrap(),
            },
            status: UnitStatus::Failed,
            exit_code: Some(3),
            duration: Duration::from_millis(1500),
            output_tail: "secret-free".into(),
            attempts: 1,
            failed_command: Some("[1] make test".into()),
            reason: None,
        };
        let trigger = Trigger::Manual {
            user: "alice".into(),
        };
        audit.unit("run-1", "g", &trigger, &result);
        audit.group_run(&GroupResult {
            run_id: "run-1".into(),
            group: "g".into(),
            trigger,
            units: vec![result],
            duration: Duration::from_secs(2),
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["kind"], "unit");
        assert_eq!(lines[0]["user"], "alice");
        assert_eq!(lines[0]["exit_code"], 3);
        assert_eq!(lines[0]["result"], "failed");
        assert_eq!(lines[1]["kind"], "group_run");
        assert_eq!(lines[1]["units"], 1);
        assert!(lines[0].get("output_tail").is_none());
    }
}
