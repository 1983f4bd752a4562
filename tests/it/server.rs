//! The HTTP server of `watch`: probes, metrics, and webhooks as verified hints.

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use nix::sys::signal::Signal;
use sha2::Sha256;

use crate::support::{Background, commit, http, wait_until};
use crate::watch::Fixture;

pub const GITHUB_SECRET: &str = "gh-webhook-secret-value";
const GITLAB_TOKEN: &str = "gl-webhook-token-value";

pub fn webhook_fixture(interval: &str, deploy_sleep: u32) -> Fixture {
    let f = Fixture::new(
        &format!("webhooks:\n  github_secret: {GITHUB_SECRET}\n  gitlab_token: {GITLAB_TOKEN}\n"),
        deploy_sleep,
    );
    let text = std::fs::read_to_string(&f.config).unwrap().replace(
        "polling_interval: 1s",
        &format!("polling_interval: {interval}"),
    );
    std::fs::write(&f.config, text).unwrap();
    f
}

pub fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(GITHUB_SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub fn github_push(f: &Fixture, branch: &str, after: &str) -> Vec<u8> {
    serde_json::json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "0".repeat(40),
        "after": after,
        "created": false,
        "deleted": false,
        "repository": {"full_name": "someone/app", "clone_url": format!("file://{}", f.watched.display())},
    })
    .to_string()
    .into_bytes()
}

pub fn started(f: &Fixture) -> (Background, u16) {
    let bg = f.watch();
    let port = bg.http_port();
    bg.wait_for_line("cycle:", Duration::from_secs(30));
    (bg, port)
}

#[test]
fn probes_answer_and_metrics_parse_and_move() {
    let f = webhook_fixture("1s", 0);
    let (bg, port) = started(&f);
    let (code, body) = http("GET", port, "/healthz", &[], b"");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    let ready = wait_until(Duration::from_secs(10), || {
        (http("GET", port, "/readyz", &[], b"").0 == 200).then_some(())
    });
    assert!(ready.is_some());

    let cycles = |text: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("sentry_poll_cycles_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sentry_poll_cycles_total in\n{text}"))
    };
    let (code, first) = http(
        "GET",
        port,
        "/metrics",
        &[("Accept", "application/openmetrics-text; version=1.0.0")],
        b"",
    );
    assert_eq!(code, 200);
    assert_prometheus_text(&first);
    assert!(first.trim_end().ends_with("# EOF"), "no EOF marker");
    for name in [
        "sentry_build_info",
        "sentry_poll_cycle_duration_seconds_bucket",
        "sentry_last_successful_cycle_timestamp_seconds",
        "sentry_forge_requests_total{host=",
    ] {
        assert!(first.contains(name), "{name} missing:\n{first}");
    }
    std::thread::sleep(Duration::from_millis(2500));
    let (_, second) = http("GET", port, "/metrics", &[], b"");
    assert!(cycles(&second) > cycles(&first), "poll cycles did not move");
    drop(bg);
}

/// Without `Accept: application/openmetrics-text`, `/metrics` is the classic text format,
/// which `promtool check metrics` (Debian `prometheus`, installed by `.ci/run`) accepts
/// without a single complaint; a scraper that asks gets OpenMetrics.
#[test]
fn metrics_are_classic_text_for_promtool_unless_openmetrics_is_asked_for() {
    let f = webhook_fixture("1s", 0);
    let (bg, port) = started(&f);
    let head = |accept: Option<&str>| {
        let accept = accept
            .map(|a| format!("Accept: {a}\r\n"))
            .unwrap_or_default();
        crate::support::http_raw(
            port,
            &format!(
                "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{accept}\r\n"
            ),
            Duration::from_secs(10),
        )
        .expect("an answer")
    };
    let classic = head(None);
    assert!(
        classic
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{classic}"
    );
    let om = head(Some(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    ));
    assert!(
        om.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{om}"
    );

    let (code, text) = http("GET", port, "/metrics", &[("Accept", "text/plain")], b"");
    assert_eq!(code, 200);
    assert_prometheus_text(&text);
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE sentry_poll_cycles_total counter"),
        "{text}"
    );
    assert!(text.contains("# TYPE sentry_build_info gauge"), "{text}");
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(bg);
}

/// Every sample line is `name{labels} value` with a numeric value; comments are `# ...`.
fn assert_prometheus_text(text: &str) {
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.starts_with("sentry_")
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name in {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels in {line:?}"
            );
        }
    }
}

#[test]
fn github_webhook_checks_signatures() {
    let f = webhook_fixture("1h", 0);
    let (_bg, port) = started(&f);
    let body = github_push(&f, "main", &"a".repeat(40));
    let post = |headers: &[(&str, &str)], body: &[u8]| {
        http("POST", port, "/webhooks/github", headers, body).0
    };
    assert_eq!(
        post(&[("X-GitHub-Event", "push")], &body),
        401,
        "missing signature"
    );
    assert_eq!(
        post(
            &[
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", "sha256=")
            ],
            &body
        ),
        401
    );
    let wrong = sign(b"something else");
    assert_eq!(
        post(
            &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &wrong)],
            &body
        ),
        401,
        "wrong signature"
    );
    let ping = br#"{"zen":"Keep it logically awesome."}"#;
    assert_eq!(
        post(
            &[
                ("X-GitHub-Event", "ping"),
                ("X-Hub-Signature-256", &sign(ping))
            ],
            ping
        ),
        200
    );
    assert_eq!(
        post(
            &[
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", &sign(b"{nope"))
            ],
            b"{nope"
        ),
        400
    );
    let other = github_push(&f, "feature/unwatched", &"a".repeat(40));
    let (code, text) = http(
        "POST",
        port,
        "/webhooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sign(&other)),
        ],
        &other,
    );
    assert_eq!((code, text.contains("ignored")), (202, true), "{text}");
    // A body over the limit is refused from its declared length, before it is sent.
    let big = vec![b' '; 6 * 1024 * 1024];
    let head = format!(
        "POST /webhooks/github HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nX-Hub-Signature-256: {}\r\nContent-Length: {}\r\n\r\n",
        sign(&big),
        big.len()
    );
    let answer = crate::support::http_raw(port, &head, Duration::from_secs(10)).unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let (code, text) = http(
        "POST",
        port,
        "/webhooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sign(&body)),
        ],
        &body,
    );
    assert_eq!((code, text.contains("checking")), (202, true), "{text}");
}

#[test]
fn gitlab_webhook_checks_the_token() {
    let f = webhook_fixture("1h", 0);
    let (_bg, port) = started(&f);
    let body = serde_json::json!({
        "object_kind": "push", "ref": "refs/heads/main", "before": "0".repeat(40), "after": "b".repeat(40),
        "project": {"path_with_namespace": "grp/app", "git_http_url": format!("file://{}", f.watched.display())},
    })
    .to_string();
    let post = |headers: &[(&str, &str)]| {
        http("POST", port, "/webhooks/gitlab", headers, body.as_bytes()).0
    };
    assert_eq!(post(&[("X-Gitlab-Event", "Push Hook")]), 401);
    assert_eq!(
        post(&[("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", "wrong")]),
        401
    );
    assert_eq!(
        post(&[
            ("X-Gitlab-Event", "Push Hook"),
            ("X-Gitlab-Token", GITLAB_TOKEN)
        ]),
        202
    );
    assert_eq!(
        post(&[
            ("X-Gitlab-Event", "Tag Push Hook"),
            ("X-Gitlab-Token", GITLAB_TOKEN)
        ]),
        202
    );
}

#[test]
fn webhook_endpoints_are_404_without_a_secret() {
    let f = Fixture::new("", 0);
    let bg = f.watch();
    let port = bg.http_port();
    assert_eq!(
        http(
            "POST",
            port,
            "/webhooks/github",
            &[("X-GitHub-Event", "ping")],
            b"{}"
        )
        .0,
        404
    );
    assert_eq!(
        http(
            "POST",
            port,
            "/webhooks/gitlab",
            &[("X-Gitlab-Event", "Push Hook")],
            b"{}"
        )
        .0,
        404
    );
}

#[test]
fn webhook_leads_to_a_deploy_while_polling_is_slow() {
    let f = webhook_fixture("1h", 0);
    let (bg, port) = started(&f);
    let new = commit(&f.watched, "pushed");
    let body = github_push(&f, "main", &new);
    let sent = Instant::now();
    let (code, _) = http(
        "POST",
        port,
        "/webhooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sign(&body)),
        ],
        &body,
    );
    assert_eq!(code, 202);
    let deployed = wait_until(Duration::from_secs(30), || {
        (!f.deploys().is_empty()).then(|| f.deploys())
    });
    let deploys = deployed.unwrap_or_else(|| panic!("no deploy after the webhook\n{}", bg.log()));
    eprintln!("webhook → deploy recorded in {:?}", sent.elapsed());
    assert!(
        deploys[0].starts_with(&format!("app main {new} ")) && deploys[0].ends_with(" webhook"),
        "{deploys:?}"
    );
}

#[test]
fn forged_sha_in_a_signed_payload_is_not_deployed() {
    let f = webhook_fixture("1h", 0);
    let (bg, port) = started(&f);
    let forged = "f".repeat(40);
    let body = github_push(&f, "main", &forged);
    let (code, _) = http(
        "POST",
        port,
        "/webhooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sign(&body)),
        ],
        &body,
    );
    assert_eq!(code, 202);
    // The check runs (a second cycle line) and finds the branch where it was.
    let checked = wait_until(Duration::from_secs(20), || {
        (bg.log().matches("cycle:").count() >= 2).then_some(())
    });
    assert!(checked.is_some(), "{}", bg.log());
    std::thread::sleep(Duration::from_millis(500));
    assert!(f.deploys().is_empty(), "{:?}", f.deploys());
    assert!(!bg.log().contains(&forged[..8]));
}

#[test]
fn readiness_fails_during_shutdown_while_a_deploy_drains() {
    let f = webhook_fixture("1s", 5);
    let (mut bg, port) = started(&f);
    commit(&f.watched, "slow deploy");
    bg.wait_for_line("→", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    bg.signal(Signal::SIGTERM);
    let unready = wait_until(Duration::from_secs(5), || {
        (http("GET", port, "/readyz", &[], b"").0 == 503).then_some(())
    });
    assert!(unready.is_some(), "{}", bg.log());
    assert_eq!(
        bg.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        bg.log()
    );
}
