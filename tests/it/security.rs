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
