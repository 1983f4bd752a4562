//! Notifications: each group's `notify:` targets hear of its runs — a generic webhook (a
//! JSON document, signed with `X-Sentry-Signature: sha256=<hex HMAC-SHA256 of the body>`
//! when a secret is set) or a Slack incoming webhook (a readable message).
//!
//! Events: `started` when a run starts; when it ends, `failure` (not every unit
//! succeeded), `recovery` (it succeeded and the group's previous run in this process did
//! not) or `success`. A target that asks for `success` but not `recovery` gets a recovery
//! as a success. A run whose every unit was cancelled by shutdown notifies nothing: it is
//! deployed again after the restart. Delivery is on the [`Queue`]'s task, with a short
//! timeout and a few retries; URLs and secrets never reach a log line (targets are named
//! by their configuration path, `groups.g.notify[0]`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sha2::Sha256;

use super::queue::Queue;
use crate::config::{Config, NotifyEvent, NotifyKind, NotifyTarget};
use crate::deploy::{
    GroupResult, RunObserver, RunRef, Unit, UnitResult, UnitStatus, format_duration,
};
use crate::telemetry::metrics::Metrics;

/// A receiver that has not answered by then is treated as failed for this try.
pub const TIMEOUT: Duration = Duration::from_secs(10);
const TRIES: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// One message for one target, ready to send.
struct Message {
    target: NotifyTarget,
    body: Vec<u8>,
}

pub struct Notifier {
    config: Arc<Config>,
    queue: Queue<Message>,
    /// Whether each group's last run failed, for `recovery`.
    failing: Mutex<HashMap<String, bool>>,
}

impl Notifier {
    /// Starts the delivery task; needs a tokio runtime.
    pub fn start(config: Arc<Config>, metrics: Arc<Metrics>) -> Result<Notifier, reqwest::Error> {
        let client = reqwest::Client::builder()
            .user_agent(crate::build_info::USER_AGENT)
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            // A redirect would carry the body (and its signature) somewhere not configured.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let sink = metrics.clone();
        let queue = Queue::spawn("notify", metrics, move |message: Message| {
            let (client, metrics) = (client.clone(), sink.clone());
            async move { deliver(&client, &metrics, message).await }
        });
        Ok(Notifier {
            config,
            queue,
            failing: Mutex::default(),
        })
    }

    /// Waits at most `within` for queued notifications; returns how many were not sent.
    pub async fn drained(&self, within: Duration) -> usize {
        self.queue.drained(within).await
    }

    /// Queues `event` for every target of `group` that wants it (or, for a recovery,
    /// wants successes).
    fn send(&self, group: &str, event: NotifyEvent, run: &RunView<'_>) {
        let Some(group) = self.config.group(group) else {
            return;
        };
        for target in &group.notify {
            let as_event = if target.on.contains(&event) {
                event
            } else if event == NotifyEvent::Recovery && target.on.contains(&NotifyEvent::Success) {
                NotifyEvent::Success
            } else {
                continue;
            };
            let body = match target.kind {
                NotifyKind::Webhook => webhook_body(as_event, run),
                NotifyKind::Slack => slack_body(as_event, run),
            };
            self.queue.push(Message {
                target: target.clone(),
                body: body.to_string().into_bytes(),
            });
        }
    }

    /// The event a finished run is, and remembers whether it failed.
    fn ended_event(&self, result: &GroupResult) -> NotifyEvent {
        let ok = result.succeeded();
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        let was_failing = failing.insert(result.group.clone(), !ok).unwrap_or(false);
        match (ok, was_failing) {
            (false, _) => NotifyEvent::Failure,
            (true, true) => NotifyEvent::Recovery,
            (true, false) => NotifyEvent::Success,
        }
    }
}

impl RunObserver for Notifier {
    fn group_started(&self, run: RunRef<'_>, units: &[Unit]) {
        let view = RunView {
            group: run.group,
            run_id: run.run_id,
            trigger: run.trigger.as_str(),
            url: self.config.server.run_url(run.run_id),
            units: units.iter().map(|u| (u, None)).collect(),
            duration: None,
        };
        self.send(run.group, NotifyEvent::Started, &view);
    }

    fn group_ended(&self, result: &GroupResult) {
        let cancelled = |u: &UnitResult| u.status == UnitStatus::Cancelled;
        if !result.units.is_empty() && result.units.iter().all(cancelled) {
            return;
        }
        let event = self.ended_event(result);
        let view = RunView {
            group: &result.group,
            run_id: &result.run_id,
            trigger: result.trigger.as_str(),
            url: self.config.server.run_url(&result.run_id),
            units: result.units.iter().map(|u| (&u.unit, Some(u))).collect(),
            duration: Some(result.duration),
        };
        self.send(&result.group, event, &view);
    }
}

/// What a message says about a run: its units, with their results once it ended.
struct RunView<'a> {
    group: &'a str,
    run_id: &'a str,
    trigger: &'a str,
    url: Option<String>,
    units: Vec<(&'a Unit, Option<&'a UnitResult>)>,
    duration: Option<Duration>,
}

/// The generic webhook's JSON document (documented in docs/en/operations.md).
fn webhook_body(event: NotifyEvent, run: &RunView<'_>) -> Value {
    let units: Vec<Value> = run
        .units
        .iter()
        .map(|(unit, result)| {
            json!({
                "repository": unit.repository,
                "branch": unit.branch,
                "sha": unit.sha.as_str(),
                "previous_sha": unit.previous_sha.as_ref().map(|s| s.as_str()),
                "status": result.map_or("running", |r| r.status.as_str()),
                "exit_code": result.and_then(|r| r.exit_code),
                "duration_seconds": result.map(|r| r.duration.as_secs_f64()),
                "failed_command": result.and_then(|r| r.failed_command.as_deref()),
                "reason": result.and_then(|r| r.reason.as_deref()),
            })
        })
        .collect();
    json!({
        "event": event.as_str(),
        "group": run.group,
        "run_id": run.run_id,
        "trigger": run.trigger,
        "url": run.url,
        "duration_seconds": run.duration.map(|d| d.as_secs_f64()),
        "units": units,
    })
}

/// A Slack incoming-webhook message: `text` for notifications and old clients, `blocks`
/// for the readable version.
fn slack_body(event: NotifyEvent, run: &RunView<'_>) -> Value {
    let (icon, verb) = match event {
        NotifyEvent::Failure => (":x:", "failed"),
        NotifyEvent::Recovery => (":white_check_mark:", "recovered"),
        NotifyEvent::Success => (":white_check_mark:", "succeeded"),
        NotifyEvent::Started => (":rocket:", "started"),
    };
    let group = slack_escape(run.group);
    let run_ref = match &run.url {
        Some(url) => format!("<{}|{}>", slack_escape(url), slack_escape(run.run_id)),
        None => format!("`{}`", slack_escape(run.run_id)),
    };
    let took = run
        .duration
        .map_or_else(String::new, |d| format!(" in {}", format_duration(d)));
    let headline = format!("{icon} Sentry: *{group}* deployment {verb}{took} (run {run_ref})");
    let lines: Vec<String> = run.units.iter().map(|(u, r)| slack_unit(u, *r)).collect();
    json!({
        "text": format!("Sentry: {} deployment {verb}{took}", run.group),
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": headline}},
            {"type": "section", "text": {"type": "mrkdwn", "text": lines.join("\n")}},
        ],
    })
}

/// `• *repo* `main` `abc12345` — failed (exit 3) in 2.0s: [1] ./deploy.sh`
fn slack_unit(unit: &Unit, result: Option<&UnitResult>) -> String {
    let head = format!(
        "• *{}* `{}` `{}`",
        slack_escape(&unit.repository),
        slack_escape(&unit.branch),
        unit.sha.short()
    );
    let Some(r) = result else {
        return head;
    };
    let exit = r
        .exit_code
        .map_or_else(String::new, |c| format!(" (exit {c})"));
    let detail = r
        .failed_command
        .as_deref()
        .or(r.reason.as_deref())
        .map_or_else(String::new, |d| format!(": {}", slack_escape(d)));
    format!(
        "{head} — {}{exit} in {}{detail}",
        r.status.as_str(),
        format_duration(r.duration)
    )
}

/// Slack's three control characters in message text.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `sha256=<hex HMAC-SHA256 of body>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length: the error branch never runs.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Sends one message, retrying timeouts, connection errors, 5xx and 429 a few times.
async fn deliver(client: &reqwest::Client, metrics: &Metrics, message: Message) {
    let kind = message.target.kind.as_str();
    let target = &message.target.path;
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=TRIES {
        let mut request = client
            .post(message.target.url.expose_secret())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(message.body.clone());
        if let (NotifyKind::Webhook, Some(secret)) = (message.target.kind, &message.target.secret) {
            request = request.header(
                "x-sentry-signature",
                signature(secret.expose_secret(), &message.body),
            );
        }
        let problem = match request.send().await {
            Ok(r) if r.status().is_success() => {
                metrics.notification(kind, "sent");
                tracing::debug!(target_path = %target, "notification sent");
                return;
            }
            Ok(r) => {
                let status = r.status();
                let retryable = status.is_server_error()
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT;
                if !retryable {
                    metrics.notification(kind, "rejected");
                    tracing::warn!(target_path = %target, "notification refused by its receiver ({status}); not retried");
                    return;
                }
                format!("answered {status}")
            }
            // Without the URL: it is a secret.
            Err(e) => e.without_url().to_string(),
        };
        metrics.notification(kind, "error");
        if attempt == TRIES {
            metrics.notification(kind, "gave_up");
            tracing::warn!(target_path = %target, "notification given up after {TRIES} tries: {problem}");
            return;
        }
        tracing::debug!(target_path = %target, "notification not delivered ({problem}); trying again");
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forge::Sha;

    #[test]
    fn signature_matches_the_github_documented_vector() {
        // Same construction as GitHub's X-Hub-Signature-256, whose test vector is published.
        assert_eq!(
            signature("It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    fn ended(ok: bool) -> GroupResult {
        GroupResult {
            run_id: "r".into(),
            group: "g".into(),
            trigger: crate::deploy::Trigger::Poll,
            units: Vec::new(),
            duration: Duration::from_secs(1),
        }
        .with_outcome(ok)
    }

    impl GroupResult {
        /// An empty run "succeeds"; a failing one needs a failed unit.
        fn with_outcome(mut self, ok: bool) -> GroupResult {
            if !ok {
                self.units.push(UnitResult {
                    unit: Unit {
                        repository: "a".into(),
                        branch: "main".into(),
                        previous_sha: None,
                        sha: Sha::parse(&"c".repeat(40)).unwrap(),
                    },
                    status: UnitStatus::Failed,
                    exit_code: Some(1),
                    duration: Duration::from_secs(1),
                    output_tail: String::new(),
                    attempts: 1,
                    failed_command: None,
                    reason: None,
                });
            }
            self
        }
    }

    #[tokio::test]
    async fn recovery_follows_a_failure_once() {
        let yaml = "groups: {g: }\nrepositories:\n  - name: a\n    group: g\n    monitor: {repo_url: /x, branches: [main], repo_type: git}\n    deploy: {qa_repo_url: /q, qa_repo_branch: main, commands: [x]}\n";
        let config = crate::config::load_str(yaml, &crate::config::Env::fixed([("HOME", "/")]))
            .config
            .unwrap();
        let notifier = Notifier::start(Arc::new(config), Arc::new(Metrics::new())).unwrap();
        let events: Vec<NotifyEvent> = [true, false, false, true, true]
            .into_iter()
            .map(|ok| notifier.ended_event(&ended(ok)))
            .collect();
        assert_eq!(
            events,
            [
                NotifyEvent::Success,
                NotifyEvent::Failure,
                NotifyEvent::Failure,
                NotifyEvent::Recovery,
                NotifyEvent::Success
            ]
        );
    }

    #[test]
    fn slack_text_is_escaped() {
        let unit = Unit {
            repository: "a<b>".into(),
            branch: "feat/&x".into(),
            previous_sha: None,
            sha: Sha::parse(&"b".repeat(40)).unwrap(),
        };
        let line = slack_unit(&unit, None);
        assert_eq!(line, "• *a&lt;b&gt;* `feat/&amp;x` `bbbbbbbb`");
    }
}
