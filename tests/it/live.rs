//! The live view end to end: a running `watch` over real local Git repositories
//! (`repo_type: git`, the fake forge here) is driven through a move, a failing deploy and a
//! pending retry; then `/api/v1/status`, `/api/v1/runs`, `/api/v1/runs/{id}`, the SSE
//! stream, the read token, history across a restart, `status --server`, and (in
//! `browser`) the dashboard in headless Chromium.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::support::{
    Background, TempDir, commit, http, init_repo, run, sentry, tempdir, wait_until, write,
};

/// Fails (exit 3, with a recognisable output) while `$FAIL_FILE` exists.
const DEPLOY_SH: &str = "#!/bin/sh\necho \"deploying $SENTRY_REPO_NAME@$SENTRY_BRANCH $SENTRY_COMMIT_SHA\"\n\
if [ -e \"$FAIL_FILE\" ]; then echo \"boom: tests of $SENTRY_REPO_NAME failed\"; exit 3; fi\n";

pub struct LiveFixture {
    pub dir: TempDir,
    pub app: PathBuf,
    pub lib: PathBuf,
    pub fail_file: PathBuf,
    pub config: PathBuf,
}

impl LiveFixture {
    /// Group `g` (sequential): `app` then `lib`, both deployed by `deploy.sh`; `lib`'s QA
    /// branch is `missing` while `lib_qa_ok` is false, so its units cannot run (setup
    /// failure) and stay pending with a retry every second or two.
    pub fn new(extra_server: &str) -> LiveFixture {
        let dir = tempdir();
        let root = dir.path().to_owned();
        let app = init_repo(&root.join("app"));
        let lib = init_repo(&root.join("lib"));
        let qa = crate::support::qa_repo(&root.join("qa"), DEPLOY_SH);
        let fail_file = root.join("FAIL");
        let repo = |name: &str, path: &Path, qa_branch: &str| {
            format!(
                "  - name: {name}\n    group: g\n    monitor: {{repo_url: \"file://{}\", branches: [main], repo_type: git}}\n\
                 \x20   deploy: {{qa_repo_url: \"file://{}\", qa_repo_branch: {qa_branch}, commands: [\"./deploy.sh\"], env: {{FAIL_FILE: \"{}\"}}}}\n",
                path.display(),
                qa.display(),
                fail_file.display()
            )
        };
        let yaml = format!(
            "polling_interval: 1s\nstate_file: {root}/state/state.json\nwork_dir: {root}/work\nshutdown_grace: 2s\n\
             pending_retry: {{initial: 1s, max: 2s}}\nserver: {{listen: \"127.0.0.1:0\"{extra_server}}}\n\
             groups:\n  g:\n    execution_strategy: sequential\nrepositories:\n{}{}",
            repo("app", &app, "main"),
            repo("lib", &lib, "missing"),
            root = root.display(),
        );
        let config = write(&root, "sentry.yaml", &yaml);
        LiveFixture {
            dir,
            app,
            lib,
            fail_file,
            config,
        }
    }

    pub fn watch(&self) -> Background {
        Background::spawn(sentry(self.dir.path()).arg("-c").arg(&self.config).args([
            "watch",
            "--listen",
            "127.0.0.1:0",
        ]))
    }
}

pub fn get_json(port: u16, path: &str) -> Value {
    let (code, body) = http("GET", port, path, &[], b"");
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// Waits until `/api/v1/status` says a poll cycle completed (the baseline is taken).
pub fn wait_for_first_cycle(port: u16) {
    let ready = wait_until(Duration::from_secs(30), || {
        get_json(port, "/api/v1/status")["last_cycle"]
            .as_str()
            .map(str::to_owned)
    });
    assert!(ready.is_some(), "no poll cycle completed");
}

/// Waits for a finished run of `group` whose first unit has `sha`; returns the run.
pub fn wait_for_run(port: u16, sha: &str) -> Value {
    wait_until(Duration::from_secs(60), || {
        let runs = get_json(port, "/api/v1/runs?group=g");
        runs["runs"]
            .as_array()?
            .iter()
            .find(|r| {
                r["status"] != "running"
                    && r["units"].as_array().is_some_and(|u| {
                        u.iter()
                            .any(|u| u["sha"] == sha && u["repository"] == "app")
                    })
            })
            .cloned()
    })
    .unwrap_or_else(|| panic!("no finished run deployed app at {sha}"))
}

/// Collects a server-sent events stream in a thread.
struct EventStream(Arc<Mutex<String>>);

impl EventStream {
    fn open(port: u16) -> EventStream {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .write_all(b"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
            .expect("request");
        let text = Arc::new(Mutex::new(String::new()));
        let sink = text.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        EventStream(text)
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

#[test]
fn status_runs_and_events_follow_a_move_a_failure_and_a_pending_retry() {
    let f = LiveFixture::new("");
    let watch = f.watch();
    let port = watch.http_port();
    wait_for_first_cycle(port);
    let events = EventStream::open(port);
    std::thread::sleep(Duration::from_millis(300));

    // A move that deploys fine.
    let good = commit(&f.app, "good");
    let ok_run = wait_for_run(port, &good);
    assert_eq!(ok_run["status"], "succeeded", "{ok_run:#}");
    assert_eq!(ok_run["trigger"], "poll");

    // A failing deploy of app, and lib moved too: lib is skipped, then cannot run (its QA
    // branch is missing) and stays pending with retries.
    std::fs::write(&f.fail_file, "").unwrap();
    let bad = commit(&f.app, "bad");
    let lib_sha = commit(&f.lib, "lib change");
    let failed = wait_for_run(port, &bad);
    assert_eq!(failed["status"], "failed", "{failed:#}");
    let run_id = failed["run_id"].as_str().unwrap().to_owned();

    let one = get_json(port, &format!("/api/v1/runs/{run_id}"));
    let app_unit = one["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["repository"] == "app")
        .unwrap();
    assert_eq!(app_unit["status"], "failed");
    assert_eq!(app_unit["exit_code"], 3);
    assert!(
        app_unit["failed_command"]
            .as_str()
            .unwrap()
            .contains("deploy.sh"),
        "{app_unit:#}"
    );
    assert!(
        app_unit["output_tail"]
            .as_str()
            .unwrap()
            .contains("boom: tests of app failed"),
        "{app_unit:#}"
    );
    assert!(app_unit["duration_secs"].as_f64().is_some());

    // The pending retry: lib's change is pending with a reason and retried until it runs.
    let pending = wait_until(Duration::from_secs(30), || {
        let status = get_json(port, "/api/v1/status");
        let lib = status["repositories"]
            .as_array()?
            .iter()
            .find(|r| r["name"] == "lib")?
            .clone();
        let main = lib["branches"]
            .as_array()?
            .iter()
            .find(|b| b["branch"] == "main")?
            .clone();
        (main["pending"]["tries"].as_u64()? >= 1).then_some((status, main))
    });
    let (status, lib_branch) = pending.expect("lib never became pending after a setup failure");
    assert_eq!(
        lib_branch["pending"]["sha"],
        lib_sha.as_str(),
        "{lib_branch:#}"
    );
    assert!(
        lib_branch["pending"]["next_try_at"].is_string(),
        "{lib_branch:#}"
    );
    assert!(!lib_branch["pending"]["reason"].as_str().unwrap().is_empty());
    let group = &status["groups"][0];
    assert_eq!(group["name"], "g");
    assert_eq!(group["repositories"], 2);
    assert!(group["last_run"]["run_id"].is_string(), "{group:#}");
    let app = status["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "app")
        .unwrap();
    let app_main = app["branches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["sha"] == bad.as_str())
        .unwrap();
    assert_eq!(app_main["last_deploy"]["result"], "failed");
    assert_eq!(app_main["last_deploy"]["run_id"], run_id.as_str());
    assert!(status["leader"].is_null());
    assert!(
        status["rate_limits"].as_array().unwrap().is_empty(),
        "plain git has no API quota"
    );

    // Between tries, the scheduler shows lib's unit waiting for its retry.
    let deferred = wait_until(Duration::from_secs(30), || {
        let status = get_json(port, "/api/v1/status");
        let d = status["groups"][0]["deferred"].as_array()?.first()?.clone();
        Some(d)
    })
    .expect("lib's unit never showed as deferred");
    assert_eq!(deferred["repository"], "lib", "{deferred:#}");
    assert_eq!(deferred["sha"], lib_sha.as_str());
    assert!(
        deferred["retry_in_secs"].as_u64().unwrap() <= 3,
        "{deferred:#}"
    );

    // A retry run was recorded with its trigger.
    let retried = wait_until(Duration::from_secs(30), || {
        let runs = get_json(port, "/api/v1/runs?group=g&limit=100");
        runs["runs"]
            .as_array()?
            .iter()
            .find(|r| r["trigger"] == "retry" && r["status"] != "running")
            .cloned()
    });
    let retried = retried.expect("no retry run in the history");
    assert_eq!(retried["units"][0]["status"], "setup_failed", "{retried:#}");

    // Runs are newest first and bounded by limit; unknown ids and groups are 404.
    let two = get_json(port, "/api/v1/runs?limit=2");
    assert_eq!(two["runs"].as_array().unwrap().len(), 2);
    assert_eq!(http("GET", port, "/api/v1/runs/nope", &[], b"").0, 404);
    assert_eq!(
        http("GET", port, "/api/v1/runs?group=nope", &[], b"").0,
        404
    );

    // The events stream saw every transition of the failed run, in order.
    let sse = events.text();
    let at = |needle: &str| {
        sse.find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in the events:\n{sse}"))
    };
    assert!(sse.contains("text/event-stream"), "{sse}");
    let started = at(&format!(
        "\"kind\":\"run_started\",\"group\":\"g\",\"run_id\":\"{run_id}\""
    ));
    let ended = at(&format!(
        "\"kind\":\"run_ended\",\"group\":\"g\",\"run_id\":\"{run_id}\""
    ));
    assert!(started < ended);
    assert!(sse.contains("event: unit_ended"));
    assert!(sse.contains("\"status\":\"failed\""));

    // `status --server` prints the same live view, with relative ages.
    let out =
        run(sentry(f.dir.path()).args(["status", "--server", &format!("http://127.0.0.1:{port}")]));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("app") && out.stdout.contains("lib"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(" ago"),
        "no relative age:\n{}",
        out.stdout
    );
    assert!(out.stdout.contains("failed"), "{}", out.stdout);
    let json = run(sentry(f.dir.path()).args([
        "status",
        "-o",
        "json",
        "--server",
        &format!("http://127.0.0.1:{port}"),
    ]));
    let parsed: Value = serde_json::from_str(&json.stdout).expect("status --server -o json parses");
    assert_eq!(parsed["groups"][0]["name"], "g");

    // An open event stream does not keep a stopping watch alive.
    let mut watch = watch;
    watch.signal(Signal::SIGTERM);
    assert_eq!(
        watch.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        watch.log()
    );
    assert!(events.text().len() >= sse.len());
}

#[test]
fn history_survives_a_restart() {
    let f = LiveFixture::new("");
    let mut watch = f.watch();
    let port = watch.http_port();
    wait_for_first_cycle(port);
    let sha = commit(&f.app, "one");
    let first = wait_for_run(port, &sha);
    watch.signal(Signal::SIGTERM);
    assert_eq!(
        watch.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        watch.log()
    );

    let again = f.watch();
    let port = again.http_port();
    let run_id = first["run_id"].as_str().unwrap();
    let kept = get_json(port, &format!("/api/v1/runs/{run_id}"));
    assert_eq!(kept["units"][0]["sha"], sha.as_str());
    assert!(f.dir.path().join("state/state.runs.jsonl").exists());
}

#[test]
fn a_read_token_guards_the_api_and_dashboard_but_not_probes() {
    let f = LiveFixture::new(", read_token: \"r3ad-t0ken\"");
    let watch = f.watch();
    let port = watch.http_port();
    for path in [
        "/api/v1/status",
        "/api/v1/runs",
        "/api/v1/events",
        "/",
        "/groups/g",
    ] {
        assert_eq!(
            http("GET", port, path, &[], b"").0,
            401,
            "{path} without a token"
        );
        assert_eq!(
            http("GET", port, path, &[("Authorization", "Bearer wrong")], b"").0,
            401,
            "{path} with a wrong token"
        );
    }
    assert_eq!(http("GET", port, "/healthz", &[], b"").0, 200);
    let (code, _) = http(
        "GET",
        port,
        "/api/v1/status",
        &[("Authorization", "Bearer r3ad-t0ken")],
        b"",
    );
    assert_eq!(code, 200);
    // A browser passes it once as ?token= and then holds a cookie.
    let (code, _) = http("GET", port, "/?token=r3ad-t0ken", &[], b"");
    assert_eq!(code, 200);
    let (code, _) = http(
        "GET",
        port,
        "/groups/g",
        &[("Cookie", "sentry_read_token=r3ad-t0ken")],
        b"",
    );
    assert_eq!(code, 200);
    let out =
        run(sentry(f.dir.path()).args(["status", "--server", &format!("http://127.0.0.1:{port}")]));
    assert_eq!(out.code, Some(2), "no token: {out:?}");
    let out = run(sentry(f.dir.path())
        .env("SENTRY_READ_TOKEN", "r3ad-t0ken")
        .args(["status", "--server", &format!("http://127.0.0.1:{port}")]));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!out.all().contains("r3ad-t0ken"), "the token was printed");
}

/// The dashboard of a running `watch` in headless Chromium: the group, the repository, the
/// failed run and its output tail are on the rendered pages, and a new deploy appears on
/// the open page without a reload. With `SENTRY_SCREENSHOTS=DIR` it also saves a
/// screenshot of each page there (`make screenshots` refreshes docs/images).
#[test]
fn the_dashboard_shows_runs_and_updates_live_in_chromium() {
    use crate::support::browser::{Browser, screenshot};
    let f = LiveFixture::new("");
    let watch = f.watch();
    let port = watch.http_port();
    wait_for_first_cycle(port);
    std::fs::write(&f.fail_file, "").unwrap();
    let bad = commit(&f.app, "bad");
    commit(&f.lib, "lib change");
    let failed = wait_for_run(port, &bad);
    let run_id = failed["run_id"].as_str().unwrap().to_owned();
    let base = format!("http://127.0.0.1:{port}");

    let mut browser = Browser::launch();
    let index = browser.open(&format!("{base}/"));
    let text = browser.text(&index);
    assert!(text.contains("Groups") && text.contains('g'), "{text}");
    assert!(browser.dom(&index).contains("href=\"/groups/g\""));
    assert!(
        text.contains("failed"),
        "the last run's result is not shown:\n{text}"
    );

    let run_page = browser.open(&format!("{base}/runs/{run_id}"));
    let text = browser.text(&run_page);
    assert!(
        text.contains(&run_id) && text.contains("app") && text.contains("failed"),
        "{text}"
    );
    assert!(
        text.contains("boom: tests of app failed"),
        "no output tail:\n{text}"
    );
    assert!(text.contains("deploy.sh"), "no failing command:\n{text}");

    let group = browser.open(&format!("{base}/groups/g"));
    let dom = browser.dom(&group);
    assert!(dom.contains(">app<") && dom.contains(">lib<"), "{dom}");
    assert!(dom.contains(&run_id), "the failed run is not listed");
    let live = crate::support::wait_until(Duration::from_secs(10), || {
        (browser.eval(&group, "document.getElementById('live').textContent") == "live")
            .then_some(())
    });
    assert!(live.is_some(), "the page did not connect to /api/v1/events");

    // A new deploy while the page stays open: it must appear without a reload (a reload
    // would drop the marker set on the window).
    browser.eval(&group, "window.__no_reload = 42");
    std::fs::remove_file(&f.fail_file).unwrap();
    let good = commit(&f.app, "good");
    let short = &good[..8];
    let appeared = crate::support::wait_until(Duration::from_secs(60), || {
        let dom = browser.dom(&group);
        dom.contains(&format!(">{short}<")).then_some(dom)
    });
    let dom = appeared.unwrap_or_else(|| {
        panic!(
            "{short} never appeared on the open page:\n{}",
            browser.dom(&group)
        )
    });
    assert_eq!(
        browser.eval(&group, "window.__no_reload"),
        42,
        "the page was reloaded"
    );
    let updates = browser.eval(
        &group,
        "Number(document.querySelector('main').dataset.updates)",
    );
    assert!(
        updates.as_u64().unwrap_or(0) >= 1,
        "no live update counted: {updates}"
    );
    assert!(dom.contains("succeeded"));

    if let Some(dir) = std::env::var_os("SENTRY_SCREENSHOTS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        screenshot(&format!("{base}/"), &dir.join("dashboard-groups.png"));
        screenshot(
            &format!("{base}/groups/g"),
            &dir.join("dashboard-group.png"),
        );
        screenshot(
            &format!("{base}/runs/{run_id}"),
            &dir.join("dashboard-run.png"),
        );
    }
}
