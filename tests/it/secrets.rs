//! Secret hygiene: distinctive token values run through authentication failures, forge
//! errors that echo the token back, failing and succeeding authenticated clones, webhooks
//! with wrong secrets, and commands that print the token — at `--log-level trace`. Every
//! log, stdout and stderr, the state file, the audit log, `/metrics`, `/healthz`, error
//! messages of `validate`, and the command lines of Sentry and of its children
//! (`/proc/<pid>/cmdline`, sampled while they run) must hold zero occurrences of any token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::faults::{Forge, healthy, point_at};
use crate::support::git_http::GitHttpServer;
use crate::support::{
    Background, FakeForge, FakeReply, MarkerGuard, http, lines_of, pids_with_env, run, sentry,
    wait_until, write,
};
use crate::watch::Fixture;

const MONITOR_TOKEN: &str = "ghp_LEAKCANARY_monitor_5b1e9f0a7c";
const DEPLOY_TOKEN: &str = "glpat-LEAKCANARY-deploy-3c9d2e";
const WRONG_DEPLOY_TOKEN: &str = "glpat-LEAKCANARY-wrong-77aa01";
const GITHUB_SECRET: &str = "whsec-LEAKCANARY-gh-0f0f0f";
const GITLAB_TOKEN: &str = "whtok-LEAKCANARY-gl-1e1e1e";
const QA_USER: &str = "qa-user";
/// Supplied by the env file only; `/` and `+` make its URL-encoded form differ.
const ENV_FILE_SECRET: &str = "envfile-LEAKCANARY/ef+01";
/// A variable of Sentry's environment (as a Kubernetes Secret key would be) named in the
/// top-level `secret_env`.
const EXTRA_SECRET: &str = "extra-LEAKCANARY-k8s-secret-key";
/// A literal `deploy.env` value listed in `deploy.secret_env`.
const LITERAL_SECRET: &str = "literal-LEAKCANARY/lit+9z";

const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const SHA_C: &str = "cccccccccccccccccccccccccccccccccccccccc";

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Every form in which a token could leak: itself, the shared marker, and the Basic
/// credentials a Git client would send.
fn needles() -> Vec<String> {
    let mut needles: Vec<String> = [
        MONITOR_TOKEN,
        DEPLOY_TOKEN,
        WRONG_DEPLOY_TOKEN,
        GITHUB_SECRET,
        GITLAB_TOKEN,
        ENV_FILE_SECRET,
        LITERAL_SECRET,
        EXTRA_SECRET,
        "LEAKCANARY",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    // Base64 of each secret alone, and the URL-encoded forms.
    for secret in [
        MONITOR_TOKEN,
        DEPLOY_TOKEN,
        GITHUB_SECRET,
        GITLAB_TOKEN,
        ENV_FILE_SECRET,
        LITERAL_SECRET,
        EXTRA_SECRET,
    ] {
        let encoded = base64(secret.as_bytes());
        needles.push(encoded[..encoded.len() - 4].to_owned());
        needles.push(secret.replace('/', "%2F").replace('+', "%2B"));
    }
    for token in [
        DEPLOY_TOKEN,
        WRONG_DEPLOY_TOKEN,
        MONITOR_TOKEN,
        ENV_FILE_SECRET,
    ] {
        for user in [QA_USER, "x-access-token", "oauth2", "git", ""] {
            let encoded = base64(format!("{user}:{token}").as_bytes());
            // The stable middle of the encoding, whatever the alignment of what precedes it.
            needles.push(encoded[4..encoded.len() - 4].to_owned());
        }
    }
    needles
}

/// What the fake GitHub answers: hostile errors echo the token they were sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Healthy(&'static str),
    Unauthorized,
    ServerError,
    NotFound,
}

struct Collected {
    texts: Mutex<Vec<(String, String)>>,
}

impl Collected {
    fn add(&self, what: &str, text: impl Into<String>) {
        self.texts
            .lock()
            .expect("texts")
            .push((what.to_owned(), text.into()));
    }
}

/// The commands print every secret as is, base64-encoded (alone and as Basic credentials),
/// URL-encoded, and straddling the 64 KiB boundary where a long line is split.
const COMMANDS: &str = r#"commands: ['./deploy.sh', 'echo token $T', 'echo url http://qa-user:$T@127.0.0.1/x', 'echo envfile $ENVFILE_SECRET', 'echo literal $LITERAL', 'echo extra $EXTRA_SECRET', 'printf %s "$T" | base64 -w0; echo', 'printf %s "user:$ENVFILE_SECRET" | base64 -w0; echo', 'printf %s "$LITERAL" | sed "s#/#%2F#g; s#+#%2B#g"; echo', 'head -c 65530 /dev/zero | tr "\0" x; echo "$T"', 'sleep 1']"#;

fn scenario(qa_url: String, f: Fixture) {
    // Unique per test process: other checkouts may run this suite on the same machine, and
    // the guard kills every process carrying the marker.
    let marker = format!("SENTRY_SECRETS_MARKER=secrets-{}", std::process::id());
    let _guard = MarkerGuard(marker.clone());
    let phase = Arc::new(Mutex::new(Phase::Healthy(SHA_A)));
    let forge_phase = phase.clone();
    let fake = FakeForge::start(move |request| {
        let echoed = request.header("authorization").unwrap_or("none").to_owned();
        match *forge_phase.lock().expect("phase") {
            Phase::Healthy(sha) => healthy(Forge::GitHub, request, sha),
            Phase::Unauthorized => FakeReply::status(
                401,
                "application/json",
                &format!(r#"{{"message":"Bad credentials: {echoed}"}}"#),
            ),
            Phase::ServerError => {
                FakeReply::status(500, "text/plain", &format!("internal error for {echoed}"))
            }
            Phase::NotFound => FakeReply::status(
                404,
                "application/json",
                &format!(r#"{{"message":"Not Found ({echoed})"}}"#),
            ),
        }
    });
    point_at(
        &f,
        Forge::GitHub,
        &fake.uri(),
        "webhooks:\n  github_secret: \"${GH_SECRET}\"\n  gitlab_token: \"${GL_TOKEN}\"\n",
    );
    let text = std::fs::read_to_string(&f.config).expect("config");
    let qa_line = text
        .lines()
        .find(|l| l.contains("qa_repo_url:"))
        .expect("qa line")
        .to_owned();
    let text = text
        .replace(
            &qa_line,
            &format!(
                "      qa_repo_url: {qa_url}\n      auth: {{username: {QA_USER}, token: \"${{DEPLOY_TOKEN}}\"}}"
            ),
        )
        .replace("commands: [\"./deploy.sh\"]", COMMANDS)
        .replace(
            "env: {DEPLOY_LOG:",
            &format!("secret_env: [LITERAL]\n      env: {{T: \"${{DEPLOY_TOKEN}}\", LITERAL: '{LITERAL_SECRET}', DEPLOY_LOG:"),
        );
    std::fs::write(&f.config, format!("secret_env: [EXTRA_SECRET]\n{text}")).expect("config");
    // The default env file, read from the working directory.
    write(
        f.root(),
        ".env",
        &format!("ENVFILE_SECRET={ENV_FILE_SECRET}\n"),
    );

    let collected = Collected {
        texts: Mutex::new(Vec::new()),
    };
    let (name, value) = marker.split_once('=').expect("marker");
    let base = |deploy_token: &str, format: &str| {
        let mut cmd = sentry(f.root());
        cmd.env(name, value)
            .env("MONITOR_TOKEN", MONITOR_TOKEN)
            .env("DEPLOY_TOKEN", deploy_token)
            .env("GH_SECRET", GITHUB_SECRET)
            .env("GL_TOKEN", GITLAB_TOKEN)
            .env("EXTRA_SECRET", EXTRA_SECRET)
            .args(["--log-level", "trace", "--log-format", format])
            .arg("-c")
            .arg(&f.config);
        cmd
    };
    // The monitor token goes through monitor.auth.token.
    let text = std::fs::read_to_string(&f.config)
        .expect("config")
        .replace("${FORGE_TOKEN}", "${MONITOR_TOKEN}");
    std::fs::write(&f.config, text).expect("config");

    // validate, on the real config and on configs that misuse a token.
    let out = run(base(DEPLOY_TOKEN, "text").arg("validate"));
    assert_eq!(out.code, Some(0), "{out:?}");
    collected.add("validate", out.all());
    let good = std::fs::read_to_string(&f.config).expect("config");
    for (what, from, to) in [
        (
            "token in a URL",
            "repo_url: https://github.com/octo/app",
            "repo_url: \"https://me:${MONITOR_TOKEN}@github.com/octo/app\"",
        ),
        (
            "token as the API URL",
            &format!("api_url: {}", fake.uri()) as &str,
            "api_url: \"${MONITOR_TOKEN}\"",
        ),
        (
            "token as a group name",
            "group: g",
            "group: \"${MONITOR_TOKEN}\"",
        ),
        (
            "token as a branch",
            "branches: [main, \"rel/*\"]",
            "branches: [\"${MONITOR_TOKEN}\", \"a b ${DEPLOY_TOKEN}\"]",
        ),
        (
            "token as a duration",
            "polling_interval: 1s",
            "polling_interval: \"${DEPLOY_TOKEN}\"",
        ),
        (
            "token over plain http to another host",
            &format!("api_url: {}", fake.uri()) as &str,
            "api_url: \"http://forge.invalid/api\"",
        ),
    ] {
        assert!(good.contains(from), "{what}: {from}");
        let bad = write(f.root(), "bad.yaml", &good.replace(from, to));
        for format in ["text", "json"] {
            let mut cmd = base(DEPLOY_TOKEN, "text");
            let out = run(cmd
                .arg("-c")
                .arg(&bad)
                .args(["validate", "--format", format]));
            collected.add(&format!("validate ({what}, {format})"), out.all());
            let out = run(base(DEPLOY_TOKEN, "json")
                .arg("-c")
                .arg(&bad)
                .args(["watch", "--once"]));
            collected.add(&format!("watch with an invalid config ({what})"), out.all());
        }
    }

    // Baseline, then forge errors that echo the token, at trace level in both formats.
    let out = run(base(DEPLOY_TOKEN, "text").args(["watch", "--once"]));
    assert_eq!(out.code, Some(0), "{out:?}");
    collected.add("baseline", out.all());
    for (p, format) in [
        (Phase::Unauthorized, "text"),
        (Phase::ServerError, "json"),
        (Phase::NotFound, "text"),
    ] {
        *phase.lock().expect("phase") = p;
        let out = run(base(DEPLOY_TOKEN, format).args(["watch", "--once"]));
        assert_eq!(out.code, Some(1), "{p:?}: {out:?}");
        collected.add(&format!("forge error {p:?}"), out.all());
    }
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.header("authorization") == Some(&format!("Bearer {MONITOR_TOKEN}"))),
        "the token was never sent, so the echoes prove nothing"
    );

    // A move, deployed with a wrong deploy token: the clone fails on authentication.
    *phase.lock().expect("phase") = Phase::Healthy(SHA_B);
    let out = run(base(WRONG_DEPLOY_TOKEN, "text").args(["watch", "--once"]));
    assert_eq!(
        out.code,
        Some(1),
        "a clone with a wrong token succeeded: {out:?}"
    );
    collected.add("failing clone", out.all());
    let out =
        run(base(WRONG_DEPLOY_TOKEN, "json").args(["trigger", "--repo", "app", "--sha", SHA_C]));
    assert_eq!(out.code, Some(1), "{out:?}");
    collected.add("trigger with a failing clone", out.all());

    // A good run with a sampler on the command lines of Sentry and its children.
    *phase.lock().expect("phase") = Phase::Healthy(SHA_C);
    let mut bg =
        Background::spawn(base(DEPLOY_TOKEN, "text").args(["watch", "--listen", "127.0.0.1:0"]));
    let stop = Arc::new(AtomicBool::new(false));
    let cmdlines = Arc::new(Mutex::new(std::collections::BTreeSet::<String>::new()));
    let sampler = {
        let (stop, cmdlines, marker) = (stop.clone(), cmdlines.clone(), marker.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for pid in pids_with_env(&marker) {
                    if let Ok(bytes) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                        let text = String::from_utf8_lossy(&bytes).replace('\0', " ");
                        cmdlines.lock().expect("cmdlines").insert(text);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let port = bg.http_port();
    let deployed = wait_until(Duration::from_secs(60), || {
        lines_of(&f.log)
            .iter()
            .any(|l| l.contains(SHA_C) && l.ends_with("poll"))
            .then_some(())
    });
    assert!(deployed.is_some(), "no deployment:\n{}", bg.log());
    for (path, headers) in [
        (
            "/webhooks/github",
            vec![
                ("x-github-event", "push"),
                ("x-hub-signature-256", "sha256=00"),
            ],
        ),
        (
            "/webhooks/gitlab",
            vec![
                ("x-gitlab-event", "Push Hook"),
                ("x-gitlab-token", "whtok-LEAKCANARY-gl-1e1e1"),
            ],
        ),
        (
            "/webhooks/gitlab",
            vec![
                ("x-gitlab-event", "Push Hook"),
                ("x-gitlab-token", GITLAB_TOKEN),
            ],
        ),
    ] {
        let (status, body) = http("POST", port, path, &headers, b"{\"ref\": 1}");
        collected.add(&format!("webhook answer {path} {status}"), body);
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (status, body) = http("GET", port, path, &[], b"");
        assert_eq!(status, 200, "{path}");
        collected.add(path, body);
    }
    let seen = wait_until(Duration::from_secs(10), || {
        let seen = cmdlines.lock().expect("cmdlines");
        seen.iter().any(|c| c.contains("sleep 1")).then_some(())
    });
    assert!(
        seen.is_some(),
        "the sampler never saw a command: {:?}\n{}",
        cmdlines.lock().expect("cmdlines"),
        bg.log()
    );
    bg.signal(Signal::SIGTERM);
    assert_eq!(
        bg.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        bg.log()
    );
    stop.store(true, Ordering::SeqCst);
    sampler.join().expect("sampler");
    collected.add("watch log", bg.log());
    let cmdlines = cmdlines.lock().expect("cmdlines").clone();
    for c in &cmdlines {
        collected.add("/proc/<pid>/cmdline", c.clone());
    }

    // What stays on disk, and status.
    for format in ["text", "json"] {
        let out = run(base(DEPLOY_TOKEN, "text").args(["status", "--format", format]));
        collected.add("status", out.all());
    }
    for (what, path) in [
        ("state file", f.root().join("state/state.json")),
        ("audit log", f.root().join("state/audit.jsonl")),
        ("deploy log", f.log.clone()),
    ] {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(!text.is_empty(), "{what} is empty");
        collected.add(what, text);
    }

    // Whatever is left under work_dir.
    let mut dirs = vec![f.root().join("work")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                collected.add(
                    &format!("work_dir file {}", path.display()),
                    String::from_utf8_lossy(&bytes),
                );
            }
        }
    }

    // The output of the commands was there, masked.
    let log = bg.log();
    for seen in ["token ***", "envfile ***", "literal ***", "extra ***"] {
        assert!(
            log.contains(seen),
            "command output {seen:?} not seen masked:\n{log}"
        );
    }

    let needles = needles();
    let mut leaks = Vec::new();
    for (what, text) in collected.texts.lock().expect("texts").iter() {
        for needle in &needles {
            if let Some(at) = text.find(needle.as_str()) {
                let start = at.saturating_sub(120);
                let start = (start..at)
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(at);
                let end = (at + needle.len() + 60).min(text.len());
                let end = (end..=text.len())
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(text.len());
                leaks.push(format!("{what}: {needle:?} in …{}…", &text[start..end]));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "{} leak(s):\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_appear_in_logs_output_files_metrics_or_command_lines() {
    let f = Fixture::new("", 0);
    let server = GitHttpServer::start(f.root(), Some((QA_USER, DEPLOY_TOKEN)))
        .await
        .expect("git http server");
    let url = server.url("qa");
    tokio::task::spawn_blocking(move || scenario(url, f))
        .await
        .expect("scenario");
    drop(server);
}
