//! Security hardening (issue 14) through the real binary: tokens never follow a redirect to
//! another origin, work directories are private, webhooks cannot exhaust or steer Sentry.
//! Every server here listens on 127.0.0.1 only.

use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;

use crate::support::{run, sentry, tempdir, write};

const TOKEN: &str = "redirect-canary-token-1234";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// A YAML single-quoted scalar.
fn q(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Every `Authorization` header the second server saw, and how many requests it got.
#[derive(Default)]
struct Seen {
    authorizations: Vec<String>,
    requests: usize,
}

/// The second server: asks for Basic credentials and records whatever it is sent.
async fn recorder(State(seen): State<Arc<Mutex<Seen>>>, req: Request) -> Response {
    let mut seen = seen.lock().expect("seen");
    seen.requests += 1;
    if let Some(auth) = req.headers().get(header::AUTHORIZATION) {
        seen.authorizations
            .push(String::from_utf8_lossy(auth.as_bytes()).into_owned());
    }
    let mut response = (StatusCode::UNAUTHORIZED, "who are you?\n").into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"git\""),
    );
    response
}

/// The first server: answers every request with a 302 to the same path on `target`.
async fn redirector(State(target): State<String>, req: Request) -> Response {
    let location = format!(
        "{target}{}",
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    let mut response = StatusCode::FOUND.into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

async fn serve(app: Router) -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

/// Starts the recorder at `host` (127.0.0.1 or `localhost`, both loopback) and a redirector
/// in front of it; returns the redirector's base URL and the recorder's log.
async fn redirect_pair(host: &str) -> (String, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let second = serve(Router::new().fallback(recorder).with_state(seen.clone())).await;
    let target = format!("http://{host}:{second}");
    let first = serve(Router::new().fallback(redirector).with_state(target)).await;
    (format!("http://127.0.0.1:{first}"), seen)
}

fn redirect_config(dir: &Path, url: &str) -> std::path::PathBuf {
    let y = format!(
        "work_dir: {}\nstate_file: {}\nserver: {{enabled: false}}\ngroups: {{g: {{}}}}\nrepositories:\n  - name: app\n    group: g\n    monitor:\n      repo_url: {}\n      repo_type: git\n      branches: [main]\n      auth: {{username: me, token: {TOKEN}}}\n    deploy:\n      qa_repo_url: {}\n      qa_repo_branch: main\n      auth: {{username: me, token: {TOKEN}}}\n      commands: [\"true\"]\n",
        q(&dir.join("work").to_string_lossy()),
        q(&dir.join("state.json").to_string_lossy()),
        q(&format!("{url}/watched.git")),
        q(&format!("{url}/qa.git")),
    );
    write(dir, "sentry.yaml", &y)
}

fn assert_never_sent(seen: &Mutex<Seen>, what: &str) {
    let seen = seen.lock().expect("seen");
    assert!(
        seen.requests > 0,
        "{what}: the redirect was never tried, so the test proves nothing"
    );
    assert!(
        seen.authorizations.is_empty(),
        "{what}: the second server received credentials: {:?}",
        seen.authorizations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_and_ls_remote_never_send_the_token_to_another_port() {
    let dir = tempdir();
    let (url, seen) = redirect_pair("127.0.0.1").await;
    let config = redirect_config(dir.path(), &url);
    let root = dir.path().to_owned();

    let trigger = tokio::task::spawn_blocking({
        let (root, config) = (root.clone(), config.clone());
        move || {
            run(sentry(&root)
                .arg("-c")
                .arg(&config)
                .args(["trigger", "--repo", "app", "--sha", SHA]))
        }
    })
    .await
    .expect("join");
    assert_eq!(trigger.code, Some(1), "{trigger:?}");
    assert!(!trigger.all().contains(TOKEN), "{trigger:?}");
    assert_never_sent(&seen, "clone");

    seen.lock().expect("seen").requests = 0;
    let once = tokio::task::spawn_blocking(move || {
        run(sentry(&root)
            .arg("-c")
            .arg(&config)
            .args(["watch", "--once"]))
    })
    .await
    .expect("join");
    assert_ne!(once.code, Some(0), "{once:?}");
    assert_never_sent(&seen, "ls-remote");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_does_not_follow_a_redirect_to_another_host() {
    let dir = tempdir();
    // `localhost` is another host name than 127.0.0.1: libgit2's own off-site rule applies.
    let (url, seen) = redirect_pair("localhost").await;
    let config = redirect_config(dir.path(), &url);
    let root = dir.path().to_owned();
    let trigger = tokio::task::spawn_blocking(move || {
        run(sentry(&root)
            .arg("-c")
            .arg(&config)
            .args(["trigger", "--repo", "app", "--sha", SHA]))
    })
    .await
    .expect("join");
    assert_eq!(trigger.code, Some(1), "{trigger:?}");
    let seen = seen.lock().expect("seen");
    assert!(seen.authorizations.is_empty(), "{:?}", seen.authorizations);
}

// ---------------------------------------------------------------- the server (finding 4, 5)

use std::time::{Duration, Instant};

use crate::server::{github_push, sign};
use crate::support::{Background, http, http_raw, wait_until};
use crate::watch::Fixture;

const HOOK_SECRET: &str = crate::server::GITHUB_SECRET;
const GITLAB_HOOK_TOKEN: &str = "gl-hook-token-for-security";

/// A watched fixture with both webhooks and the given `server:` settings.
fn server_fixture(server: &str, interval: &str) -> Fixture {
    let f = Fixture::new(
        &format!(
            "webhooks:\n  github_secret: {HOOK_SECRET}\n  gitlab_token: {GITLAB_HOOK_TOKEN}\nserver:\n{server}"
        ),
        0,
    );
    let text = std::fs::read_to_string(&f.config).expect("config").replace(
        "polling_interval: 1s",
        &format!("polling_interval: {interval}"),
    );
    std::fs::write(&f.config, text).expect("config");
    f
}

fn start(f: &Fixture) -> (Background, u16) {
    let bg = f.watch();
    let port = bg.http_port();
    bg.wait_for_line("cycle:", Duration::from_secs(30));
    (bg, port)
}

/// Sockets the process holds open.
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn half_sent_headers_and_silent_connections_are_closed() {
    let f = server_fixture("  header_timeout: 1s\n", "1h");
    let (_bg, port) = start(&f);
    let started = Instant::now();
    let half = http_raw(
        port,
        "GET /healthz HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(8),
    );
    assert!(half.is_some(), "half-sent headers kept the connection open");
    let silent = http_raw(port, "", Duration::from_secs(8));
    assert!(silent.is_some(), "a silent connection stayed open");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn webhooks_without_a_signature_are_refused_before_the_body_is_read() {
    let f = server_fixture("  header_timeout: 5s\n", "1h");
    let (bg, port) = start(&f);
    // 4 MB announced, none sent: the answer must come from the headers alone.
    for head in [
        "POST /webhooks/github HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nContent-Length: 4000000\r\n\r\n",
        "POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Event: Push Hook\r\nX-Gitlab-Token: wrong\r\nContent-Length: 4000000\r\n\r\n",
    ] {
        let answer = http_raw(port, head, Duration::from_secs(3)).unwrap_or_default();
        assert!(answer.starts_with("HTTP/1.1 401"), "{head:?}: {answer:?}");
    }
    // Twenty rejections make one WARN line, not twenty.
    for _ in 0..20 {
        http(
            "POST",
            port,
            "/webhooks/github",
            &[("X-GitHub-Event", "push")],
            b"{}",
        );
    }
    let warns = bg
        .log()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("github webhook rejected"))
        .count();
    assert_eq!(warns, 1, "{}", bg.log());
}

#[test]
fn open_files_are_raised_core_dumps_off_and_idle_connections_do_not_starve_health() {
    use std::os::unix::process::CommandExt;
    let f = server_fixture("  header_timeout: 2s\n", "1h");
    let mut cmd = crate::support::sentry(f.root());
    cmd.arg("-c")
        .arg(&f.config)
        .args(["watch", "--listen", "127.0.0.1:0"]);
    // SAFETY: only setrlimit, which is async-signal-safe, runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let bg = Background::spawn(&mut cmd);
    let port = bg.http_port();
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", bg.child.id())).expect("limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    assert!(
        open_files.split_whitespace().nth(3) == Some("4096"),
        "the soft limit was not raised to the hard one: {open_files}"
    );
    // Core dumps are off (they would hold every token).
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    assert_eq!(
        core.split_whitespace().nth(4),
        Some("0"),
        "core dumps are still allowed: {core}"
    );
    // More idle connections than the old soft limit.
    let idle: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(idle.len() > 256, "only {} connections", idle.len());
    let healthy = wait_until(Duration::from_secs(10), || {
        (http("GET", port, "/healthz", &[], b"").0 == 200).then_some(())
    });
    assert!(healthy.is_some(), "/healthz did not answer:\n{}", bg.log());
    drop(idle);
}

#[test]
fn connections_are_capped() {
    let f = server_fixture("  header_timeout: 30s\n  max_connections: 8\n", "1h");
    let (bg, port) = start(&f);
    let pid = bg.child.id();
    let before = sockets(pid);
    let idle: Vec<std::net::TcpStream> = (0..40)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert_eq!(idle.len(), 40);
    std::thread::sleep(Duration::from_millis(500));
    let held = sockets(pid).saturating_sub(before);
    assert!(
        held <= 8,
        "{held} connections accepted with max_connections: 8"
    );
    drop(idle);
}

#[test]
fn webhooks_can_have_a_listener_of_their_own() {
    let f = server_fixture("  webhook_listen: \"127.0.0.1:0\"\n", "1h");
    let (bg, port) = start(&f);
    let line = bg.wait_for_line("webhook server listening on", Duration::from_secs(10));
    let hook_port: u16 = line
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .expect("webhook port");
    assert_ne!(hook_port, port);
    let unsigned = [("X-GitHub-Event", "push")];
    assert_eq!(
        http("POST", port, "/webhooks/github", &unsigned, b"{}").0,
        404
    );
    assert_eq!(
        http("POST", hook_port, "/webhooks/github", &unsigned, b"{}").0,
        401
    );
    assert_eq!(http("GET", hook_port, "/metrics", &[], b"").0, 404);
    assert_eq!(http("GET", port, "/healthz", &[], b"").0, 200);
}

#[test]
fn replayed_deliveries_and_hint_storms_cost_one_check_per_gap() {
    let f = server_fixture("  header_timeout: 5s\n", "1h");
    let (bg, port) = start(&f);
    let body = github_push(&f, "main", &"a".repeat(40));
    let signature = sign(&body);
    let post = |delivery: &str| {
        http(
            "POST",
            port,
            "/webhooks/github",
            &[
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", &signature),
                ("X-GitHub-Delivery", delivery),
            ],
            &body,
        )
    };
    let (code, text) = post("delivery-1");
    assert_eq!((code, text.contains("checking")), (202, true), "{text}");
    for _ in 0..30 {
        let (code, text) = post("delivery-1");
        assert_eq!(
            (code, text.contains("already received")),
            (202, true),
            "{text}"
        );
    }
    // Distinct deliveries inside the gap: merged into one more check at its end.
    for i in 0..30 {
        assert_eq!(post(&format!("storm-{i}")).0, 202);
    }
    let cycles = || bg.log().lines().filter(|l| l.contains("cycle:")).count();
    let merged = wait_until(Duration::from_secs(15), || (cycles() >= 3).then_some(()));
    assert!(
        merged.is_some(),
        "the deferred check never ran:\n{}",
        bg.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    // 1 first poll + 1 check for delivery-1 + 1 merged check for the storm (one more if
    // a slow machine spread the storm over two gaps) — not one per delivery.
    let checks = cycles();
    assert!((3..=4).contains(&checks), "{checks} cycles:\n{}", bg.log());
}

#[test]
fn a_body_that_never_ends_times_out() {
    let f = server_fixture("  header_timeout: 5s\n  request_timeout: 2s\n", "1h");
    let (_bg, port) = start(&f);
    let head = format!(
        "POST /webhooks/github HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nX-Hub-Signature-256: {}\r\nContent-Length: 1000\r\n\r\n{{\"ref\":",
        sign(b"x")
    );
    let started = Instant::now();
    let answer = http_raw(port, &head, Duration::from_secs(10)).unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
}

// ------------------------------------------------------------- the work dir (finding 7)

/// A config whose one repository deploys from a local QA repository with `commands`.
fn local_config(dir: &Path, work_dir: Option<&Path>, commands: &str) -> std::path::PathBuf {
    let qa = crate::support::init_repo(&dir.join("qa"));
    let watched = crate::support::init_repo(&dir.join("watched"));
    let work = work_dir.map_or(String::new(), |w| {
        format!("work_dir: {}\n", q(&w.to_string_lossy()))
    });
    let y = format!(
        "{work}state_file: {}\nserver: {{enabled: false}}\ngroups: {{g: {{}}}}\nrepositories:\n  - name: app\n    group: g\n    monitor: {{repo_url: {}, repo_type: git, branches: [main]}}\n    deploy:\n      qa_repo_url: {}\n      qa_repo_branch: main\n      commands: [{}]\n",
        q(&dir.join("state.json").to_string_lossy()),
        q(&format!("file://{}", watched.display())),
        q(&format!("file://{}", qa.display())),
        q(commands),
    );
    write(dir, "sentry.yaml", &y)
}

#[test]
fn the_default_work_dir_is_private_and_checkouts_too() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).expect("home");
    let out = dir.path().join("modes");
    let config = local_config(
        dir.path(),
        None,
        &format!(
            "stat -c %a . > {0}; stat -c %a \"$SENTRY_CHANGES_FILE\" >> {0}",
            out.display()
        ),
    );
    let run = run(sentry(dir.path())
        .env("HOME", &home)
        .arg("-c")
        .arg(&config)
        .args(["trigger", "--repo", "app", "--sha", SHA]));
    assert_eq!(run.code, Some(0), "{run:?}");
    let work = home.join(".cache/sentry/work");
    let mode = std::fs::metadata(&work)
        .expect("work dir")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    let modes = std::fs::read_to_string(&out).expect("modes");
    assert_eq!(modes.split_whitespace().collect::<Vec<_>>(), ["700", "600"]);
}

#[test]
fn a_work_dir_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let canary = dir.path().join("ran");
    let config = local_config(
        dir.path(),
        Some(&shared),
        &format!("touch {}", canary.display()),
    );
    let run = run(sentry(dir.path())
        .arg("-c")
        .arg(&config)
        .args(["trigger", "--repo", "app", "--sha", SHA]));
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.all().contains("lets others write"), "{run:?}");
    assert!(!canary.exists(), "a command ran in a shared work_dir");
}

// ---------------------------------------------------- certificate errors (finding 8)

/// `openssl s_server` with a fresh self-signed certificate on 127.0.0.1; killed on drop.
struct TlsServer {
    child: std::process::Child,
    port: u16,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_server(dir: &Path) -> TlsServer {
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl req");
    assert!(made.status.success(), "{made:?}");
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let up = wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    assert!(up.is_some(), "openssl s_server did not start");
    TlsServer { child, port }
}

#[test]
fn refused_certificates_fail_fast_as_configuration_errors() {
    let dir = tempdir();
    let tls = tls_server(dir.path());
    let base = format!("https://127.0.0.1:{}", tls.port);
    let y = format!(
        "work_dir: {}\nstate_file: {}\nserver: {{enabled: false}}\ngroups: {{g: {{}}}}\nrepositories:\n  - name: api\n    group: g\n    monitor: {{repo_url: \"https://github.example/o/r\", repo_type: github, api_url: \"{base}/api/v3\", branches: [main], auth: {{token: {TOKEN}}}}}\n    deploy: {{qa_repo_url: \"{base}/qa.git\", qa_repo_branch: main, commands: [\"true\"]}}\n  - name: git\n    group: g\n    monitor: {{repo_url: \"{base}/w.git\", repo_type: git, branches: [main]}}\n    deploy: {{qa_repo_url: \"{base}/qa.git\", qa_repo_branch: main, commands: [\"true\"]}}\n",
        q(&dir.path().join("work").to_string_lossy()),
        q(&dir.path().join("state.json").to_string_lossy()),
    );
    let config = write(dir.path(), "sentry.yaml", &y);
    let started = Instant::now();
    let once = run(sentry(dir.path()).arg("-c").arg(&config).args([
        "--log-format",
        "json",
        "watch",
        "--once",
    ]));
    assert_eq!(once.code, Some(1), "{once:?}");
    let certificate_errors = once
        .stderr
        .lines()
        .filter(|l| l.contains("\"kind\":\"certificate\""))
        .count();
    assert_eq!(certificate_errors, 2, "{}", once.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    let trigger = run(sentry(dir.path())
        .arg("-c")
        .arg(&config)
        .args(["trigger", "--repo", "git", "--sha", SHA]));
    assert_eq!(trigger.code, Some(1), "{trigger:?}");
    assert!(trigger.all().contains("certificate"), "{trigger:?}");
    assert!(!trigger.all().contains("retrying"), "{trigger:?}");
}
