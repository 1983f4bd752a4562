//! Run history and the live feed: a run observer that keeps the runs in progress and the
//! last [`RUNS_PER_GROUP`] finished runs of every group, broadcasts each run and unit
//! transition as an [`Event`] (the API's server-sent events), and persists finished runs
//! as JSON lines beside the state file so that history survives restarts.
//!
//! Observer calls are synchronous on deploying tasks, so everything here is a short
//! critical section on one mutex, a non-blocking broadcast, and a hand-off to a writer
//! thread: no file I/O happens on a tokio worker. The file is bounded too: the writer
//! rewrites it (temp file, rename) with only the kept runs once it holds twice as many
//! lines as it needs.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::config::Config;
use crate::deploy::{GroupResult, RunObserver, RunRef, Trigger, Unit, UnitResult, UnitStatus};
use crate::telemetry::now_rfc3339;

/// Finished runs kept per group, in memory and in the file.
pub const RUNS_PER_GROUP: usize = 50;
/// The end of each unit's (already masked) output kept in history; the full 64 KiB tail
/// is in the log and the audit trail.
const TAIL_KEPT: usize = 8 * 1024;
/// Events a slow subscriber may fall behind before it misses some (it is then told to
/// reload rather than shown a wrong picture).
const EVENTS_CAPACITY: usize = 1024;

/// One group run, in progress or finished.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    pub run_id: String,
    pub group: String,
    /// `poll`, `webhook`, `retry` or `manual`.
    pub trigger: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<f64>,
    pub units: Vec<UnitRecord>,
}

/// One unit of a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UnitRecord {
    pub repository: String,
    pub branch: String,
    pub sha: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_sha: Option<String>,
    /// `queued`, `running`, or how it ended (`succeeded`, `failed`, `timed_out`,
    /// `setup_failed`, `skipped`, `cancelled`).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The end of the unit's output, secrets already masked by the runner.
    #[serde(default)]
    pub output_tail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_url: Option<String>,
}

/// A run or unit transition, as sent on `/api/v1/events`.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `run_started`, `unit_started`, `unit_ended` or `run_ended`.
    pub kind: &'static str,
    pub group: String,
    pub run_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    pub at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot read run history {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Default)]
struct Runs {
    /// Finished runs per group, oldest first.
    finished: HashMap<String, VecDeque<Arc<RunRecord>>>,
    /// Runs in progress by run id.
    active: HashMap<String, RunRecord>,
}

/// A finished run for the writer thread: its group and its JSON line.
type Line = (String, String);

pub struct History {
    config: Arc<Config>,
    runs: Mutex<Runs>,
    events: broadcast::Sender<Event>,
    writer: Mutex<Option<(mpsc::Sender<Line>, std::thread::JoinHandle<()>)>>,
}

impl History {
    /// History kept in memory only (`trigger`, tests).
    pub fn in_memory(config: Arc<Config>) -> History {
        History {
            config,
            runs: Mutex::new(Runs::default()),
            events: broadcast::channel(EVENTS_CAPACITY).0,
            writer: Mutex::new(None),
        }
    }

    /// History loaded from and appended to `path`. Unreadable lines are skipped with a
    /// warning: a torn last line after a crash must not hide the rest.
    pub fn open(config: Arc<Config>, path: &Path) -> Result<History, HistoryError> {
        let (kept, lines_in_file) = load(path)?;
        let history = History::in_memory(config);
        {
            let mut runs = history.lock();
            for (group, lines) in &kept {
                let parsed = lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<RunRecord>(l).ok())
                    .map(Arc::new)
                    .collect();
                runs.finished.insert(group.clone(), parsed);
            }
        }
        let (tx, rx) = mpsc::channel();
        let file = path.to_owned();
        let handle = std::thread::Builder::new()
            .name("sentry-history".into())
            .spawn(move || write_loop(&file, kept, lines_in_file, &rx))
            .map_err(|source| HistoryError::Read {
                path: path.to_owned(),
                source,
            })?;
        *history
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((tx, handle));
        Ok(history)
    }

    /// Where `watch` keeps the history for a state file: `state.json` → `state.runs.jsonl`,
    /// in the same directory, so that it is covered by the same writer lock.
    pub fn path_for(state_file: &Path) -> PathBuf {
        let stem = state_file
            .file_stem()
            .map_or_else(|| "state".into(), |s| s.to_string_lossy().into_owned());
        state_file.with_file_name(format!("{stem}.runs.jsonl"))
    }

    /// Stops the writer after it wrote every finished run. Blocking: call it from
    /// `spawn_blocking` or outside the runtime.
    pub fn close(&self) {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((tx, handle)) = writer {
            drop(tx);
            let _ = handle.join();
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs newest first — those in progress, then finished ones — of one group or all,
    /// at most `limit`.
    pub fn runs(&self, group: Option<&str>, limit: usize) -> Vec<RunRecord> {
        let runs = self.lock();
        let mut active: Vec<&RunRecord> = runs
            .active
            .values()
            .filter(|r| group.is_none_or(|g| r.group == g))
            .collect();
        active.sort_by(|a, b| b.started_at.cmp(&a.started_at));
        let mut finished: Vec<&Arc<RunRecord>> = match group {
            Some(g) => runs.finished.get(g).into_iter().flatten().collect(),
            None => runs.finished.values().flatten().collect(),
        };
        // Run ids start with their start time, so they sort by it.
        finished.sort_by(|a, b| b.run_id.cmp(&a.run_id));
        active
            .into_iter()
            .chain(finished.into_iter().map(|r| &**r))
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn run(&self, run_id: &str) -> Option<RunRecord> {
        let runs = self.lock();
        if let Some(r) = runs.active.get(run_id) {
            return Some(r.clone());
        }
        runs.finished
            .values()
            .flatten()
            .find(|r| r.run_id == run_id)
            .map(|r| (**r).clone())
    }

    /// Per group: the run in progress (its id) and the last finished run.
    pub fn latest(&self) -> HashMap<String, (Option<String>, Option<Arc<RunRecord>>)> {
        let runs = self.lock();
        let mut out: HashMap<String, (Option<String>, Option<Arc<RunRecord>>)> = HashMap::new();
        for (group, list) in &runs.finished {
            out.entry(group.clone()).or_default().1 = list.back().cloned();
        }
        for run in runs.active.values() {
            out.entry(run.group.clone()).or_default().0 = Some(run.run_id.clone());
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, kind: &'static str, run: RunRef<'_>, unit: Option<&Unit>, status: Option<&str>) {
        // No subscriber is not an error: nobody is watching.
        let _ = self.events.send(Event {
            kind,
            group: run.group.to_owned(),
            run_id: run.run_id.to_owned(),
            repository: unit.map(|u| u.repository.clone()),
            branch: unit.map(|u| u.branch.clone()),
            status: status.map(str::to_owned),
            at: now_rfc3339(),
        });
    }

    fn new_unit(&self, unit: &Unit) -> UnitRecord {
        let commit_url = self
            .config
            .repository(&unit.repository)
            .and_then(|r| crate::forge::kind::commit_url(r, unit.sha.as_str()));
        UnitRecord {
            repository: unit.repository.clone(),
            branch: unit.branch.clone(),
            sha: unit.sha.as_str().to_owned(),
            previous_sha: unit.previous_sha.as_ref().map(|s| s.as_str().to_owned()),
            status: "queued".into(),
            started_at: None,
            duration_secs: None,
            exit_code: None,
            attempts: 0,
            failed_command: None,
            reason: None,
            output_tail: String::new(),
            commit_url,
        }
    }

    /// Updates the unit of an active run; a unit not announced (a run started before the
    /// observer was added) is added.
    fn with_unit(&self, run: RunRef<'_>, unit: &Unit, f: impl FnOnce(&mut UnitRecord)) {
        let mut runs = self.lock();
        let Some(record) = runs.active.get_mut(run.run_id) else {
            return;
        };
        let found = record
            .units
            .iter()
            .position(|u| u.repository == unit.repository && u.branch == unit.branch);
        let index = found.unwrap_or_else(|| {
            record.units.push(self.new_unit(unit));
            record.units.len() - 1
        });
        if let Some(u) = record.units.get_mut(index) {
            f(u);
        }
    }
}

impl RunObserver for History {
    fn group_started(&self, run: RunRef<'_>, units: &[Unit]) {
        let user = match run.trigger {
            Trigger::Manual { user } => Some(user.clone()),
            _ => None,
        };
        let record = RunRecord {
            run_id: run.run_id.to_owned(),
            group: run.group.to_owned(),
            trigger: run.trigger.as_str().to_owned(),
            user,
            status: "running".into(),
            started_at: now_rfc3339(),
            ended_at: None,
            duration_secs: None,
            units: units.iter().map(|u| self.new_unit(u)).collect(),
        };
        self.lock().active.insert(record.run_id.clone(), record);
        self.emit("run_started", run, None, Some("running"));
    }

    fn unit_started(&self, run: RunRef<'_>, unit: &Unit) {
        self.with_unit(run, unit, |u| {
            u.status = "running".into();
            u.started_at = Some(now_rfc3339());
        });
        self.emit("unit_started", run, Some(unit), Some("running"));
    }

    fn unit_ended(&self, run: RunRef<'_>, result: &UnitResult) {
        self.with_unit(run, &result.unit, |u| {
            u.status = result.status.as_str().to_owned();
            u.duration_secs = Some(result.duration.as_secs_f64());
            u.exit_code = result.exit_code;
            u.attempts = result.attempts;
            u.failed_command.clone_from(&result.failed_command);
            u.reason.clone_from(&result.reason);
            u.output_tail = tail(&result.output_tail, TAIL_KEPT).to_owned();
        });
        let status = result.status.as_str();
        self.emit("unit_ended", run, Some(&result.unit), Some(status));
    }

    fn group_ended(&self, result: &GroupResult) {
        let status = run_status(result);
        let finished = {
            let mut runs = self.lock();
            let Some(mut record) = runs.active.remove(&result.run_id) else {
                return;
            };
            record.status = status.to_owned();
            record.ended_at = Some(now_rfc3339());
            record.duration_secs = Some(result.duration.as_secs_f64());
            let record = Arc::new(record);
            let list = runs.finished.entry(result.group.clone()).or_default();
            list.push_back(record.clone());
            while list.len() > RUNS_PER_GROUP {
                list.pop_front();
            }
            record
        };
        if let Ok(line) = serde_json::to_string(&*finished) {
            let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((tx, _)) = writer.as_ref() {
                let _ = tx.send((result.group.clone(), line));
            }
        }
        let run = RunRef {
            group: &result.group,
            run_id: &result.run_id,
            trigger: &result.trigger,
        };
        self.emit("run_ended", run, None, Some(status));
    }
}

/// `succeeded` when every unit did, `cancelled` when shutdown stopped one, else `failed`.
fn run_status(result: &GroupResult) -> &'static str {
    if result.succeeded() {
        "succeeded"
    } else if result
        .units
        .iter()
        .any(|u| u.status == UnitStatus::Cancelled)
    {
        "cancelled"
    } else {
        "failed"
    }
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The kept lines per group (the last [`RUNS_PER_GROUP`]) and how many lines the file has.
fn load(path: &Path) -> Result<(HashMap<String, VecDeque<String>>, usize), HistoryError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(HistoryError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut kept: HashMap<String, VecDeque<String>> = HashMap::new();
    let mut lines = 0;
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        lines += 1;
        match serde_json::from_str::<RunRecord>(line) {
            Ok(run) => push_bounded(kept.entry(run.group).or_default(), line.to_owned()),
            Err(_) => bad += 1,
        }
    }
    if bad > 0 {
        tracing::warn!(
            "run history {}: skipped {bad} unreadable line(s)",
            path.display()
        );
    }
    Ok((kept, lines))
}

fn push_bounded(list: &mut VecDeque<String>, line: String) {
    list.push_back(line);
    while list.len() > RUNS_PER_GROUP {
        list.pop_front();
    }
}

/// The writer thread: appends each finished run, and compacts the file when it holds
/// twice the lines it needs.
fn write_loop(
    path: &Path,
    mut kept: HashMap<String, VecDeque<String>>,
    mut lines_in_file: usize,
    rx: &mpsc::Receiver<Line>,
) {
    let needed = |kept: &HashMap<String, VecDeque<String>>| kept.values().map(VecDeque::len).sum();
    if lines_in_file > needed(&kept) {
        lines_in_file = compact(path, &kept).unwrap_or(lines_in_file);
    }
    while let Ok((group, line)) = rx.recv() {
        if let Err(e) = append(path, &line) {
            tracing::warn!("cannot append to run history {}: {e}", path.display());
        } else {
            lines_in_file += 1;
        }
        push_bounded(kept.entry(group).or_default(), line);
        let need: usize = needed(&kept);
        if lines_in_file > 2 * need.max(RUNS_PER_GROUP) {
            lines_in_file = compact(path, &kept).unwrap_or(lines_in_file);
        }
    }
}

fn append(path: &Path, line: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    // One write per line, so that a crash tears at most the last line.
    file.write_all(format!("{line}\n").as_bytes())
}

/// Rewrites the file with only the kept lines (temp file, rename); returns its line count.
fn compact(path: &Path, kept: &HashMap<String, VecDeque<String>>) -> Option<usize> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let write = || -> std::io::Result<usize> {
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        let mut all: Vec<&String> = kept.values().flatten().collect();
        all.sort_by_key(|l| run_id_of(l));
        for line in &all {
            tmp.write_all(line.as_bytes())?;
            tmp.write_all(b"\n")?;
        }
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(all.len())
    };
    match write() {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!("cannot compact run history {}: {e}", path.display());
            None
        }
    }
}

/// The run id of a stored line (they sort by start time), for a stable file order.
fn run_id_of(line: &str) -> String {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("run_id")?.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Seconds since an RFC 3339 time, for relative ages; `None` when it does not parse.
pub fn age_secs(rfc3339: &str) -> Option<i64> {
    let at = humantime::parse_rfc3339(rfc3339).ok()?;
    Some(match SystemTime::now().duration_since(at) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    })
}

/// `3 s`, `4 m`, `2 h`, `5 d`: a short rounded duration for ages and countdowns.
pub fn short_duration(secs: i64) -> String {
    let s = secs.unsigned_abs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} m", s / 60),
        3600..86400 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86400),
    }
}

/// `3 m ago`, or `in 3 m` for a time ahead.
pub fn relative(rfc3339: &str) -> String {
    match age_secs(rfc3339) {
        Some(s) if s >= 0 => format!("{} ago", short_duration(s)),
        Some(s) => format!("in {}", short_duration(s)),
        None => rfc3339.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::{GroupResult, UnitResult};
    use crate::forge::Sha;
    use std::time::Duration;

    const YAML: &str = "
groups:
  g: {}
repositories:
  - name: a
    group: g
    monitor: {repo_url: 'https://github.com/o/a', branches: [main], repo_type: github}
    deploy: {qa_repo_url: 'file:///qa', qa_repo_branch: main, commands: ['true']}
";

    fn config() -> Arc<Config> {
        Arc::new(
            crate::config::load_str(YAML, &crate::config::Env::fixed([("HOME", "/")]))
                .config
                .unwrap(),
        )
    }

    fn unit() -> Unit {
        Unit {
            repository: "a".into(),
            branch: "main".into(),
            previous_sha: None,
            sha: Sha::parse(&"b".repeat(40)).unwrap(),
        }
    }

    fn run_once(h: &History, run_id: &str, status: UnitStatus, output: &str) {
        let trigger = Trigger::Poll;
        let run = RunRef {
            group: "g",
            run_id,
            trigger: &trigger,
        };
        h.group_started(run, &[unit()]);
        h.unit_started(run, &unit());
        let result = UnitResult {
            unit: unit(),
            status,
            exit_code: Some(1),
            duration: Duration::from_millis(1500),
            output_tail: output.into(),
            attempts: 1,
            failed_command: Some("[1] make".into()),
            reason: None,
        };
        h.unit_ended(run, &result);
        h.group_ended(&GroupResult {
            run_id: run_id.into(),
            group: "g".into(),
            trigger,
            units: vec![result],
            duration: Duration::from_secs(2),
        });
    }

    #[test]
    fn records_runs_with_links_tails_and_events_in_order() {
        let h = History::in_memory(config());
        let mut events = h.subscribe();
        run_once(&h, "20261129T100000Z-aaaaaa", UnitStatus::Failed, "boom");
        let runs = h.runs(Some("g"), 10);
        assert_eq!(runs.len(), 1);
        let run = &runs[0];
        assert_eq!(run.status, "failed");
        assert_eq!(run.units[0].status, "failed");
        assert_eq!(run.units[0].output_tail, "boom");
        assert_eq!(
            run.units[0].commit_url.as_deref(),
            Some(format!("https://github.com/o/a/commit/{}", "b".repeat(40)).as_str())
        );
        let kinds: Vec<&str> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds,
            ["run_started", "unit_started", "unit_ended", "run_ended"]
        );
        assert!(h.run("20261129T100000Z-aaaaaa").is_some());
        assert!(h.run("nope").is_none());
    }

    #[test]
    fn history_is_bounded_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = History::path_for(&dir.path().join("state.json"));
        assert!(path.ends_with("state.runs.jsonl"));
        let h = History::open(config(), &path).unwrap();
        for i in 0..(RUNS_PER_GROUP * 3) {
            run_once(
                &h,
                &format!("20261129T1{i:05}Z-aaaaaa"),
                UnitStatus::Succeeded,
                "",
            );
        }
        h.close();
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 2 * RUNS_PER_GROUP + 1, "{lines} lines kept");
        // A torn last line (a crash mid-write) is skipped, not fatal.
        append(&path, "{\"run_id\": \"torn").unwrap();
        let again = History::open(config(), &path).unwrap();
        let runs = again.runs(None, 1000);
        assert_eq!(runs.len(), RUNS_PER_GROUP);
        assert_eq!(
            runs[0].run_id,
            format!("20261129T1{:05}Z-aaaaaa", RUNS_PER_GROUP * 3 - 1),
            "newest first"
        );
        again.close();
    }

    #[test]
    fn tails_cut_at_char_boundaries_and_ages_read_well() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("ab", 10), "ab");
        assert_eq!(short_duration(59), "59 s");
        assert_eq!(short_duration(180), "3 m");
        assert_eq!(short_duration(7200), "2 h");
        let past = humantime::format_rfc3339_seconds(SystemTime::now() - Duration::from_secs(190));
        assert_eq!(relative(&past.to_string()), "3 m ago");
    }
}
