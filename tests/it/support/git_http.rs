//! A real Git smart-HTTP server for integration tests.
//!
//! This module owns [`GitHttpServer`]: a tiny axum server bound to `127.0.0.1:0` that puts
//! optional HTTP Basic auth in front of the CGI program `git http-backend` (found at run time
//! via `git --exec-path`). It serves every repository (bare or non-bare) below a root
//! directory, so tests can exercise real clones, shallow clones, `ls-remote` and pushes with
//! both the git CLI and libgit2, with or without credentials.
//!
//! How a request is handled:
//! 1. The request counter is bumped.
//! 2. If credentials are configured, the `Authorization` header must equal the precomputed
//!    `Basic <base64(user:password)>`; otherwise the answer is `401` with
//!    `WWW-Authenticate: Basic realm="git"` (and the 401 counter is bumped).
//! 3. The request body is buffered and piped into `git-http-backend` with the CGI environment
//!    (`GIT_PROJECT_ROOT`, `GIT_HTTP_EXPORT_ALL`, `PATH_INFO`, `QUERY_STRING`,
//!    `REQUEST_METHOD`, `CONTENT_TYPE`, `CONTENT_LENGTH`, `HTTP_CONTENT_ENCODING` so the
//!    backend inflates gzip request bodies itself, `HTTP_GIT_PROTOCOL` for protocol v2, and
//!    `REMOTE_USER` when authenticated, which enables `receive-pack`, i.e. pushes).
//! 4. The CGI output is parsed: its headers (including `Status:`) become the HTTP response,
//!    the rest is the body (buffered, which is fine for test-sized repositories).
//!
//! Dropping the server aborts its accept loop; connections already open finish on their own.
//! The backend runs with a cleared environment (only `PATH` is kept, no `HOME`), so the
//! caller's `GIT_DIR` or personal git config cannot leak into it.
//!
//! Usage (from a `#[tokio::test(flavor = "multi_thread")]` test):
//! ```ignore
//! let server = GitHttpServer::start(root.path(), Some(("alice", "s3cret"))).await?;
//! let url = server.url("qa.git"); // http://127.0.0.1:PORT/qa.git, no credentials in it
//! // git CLI: put them in the URL (http://alice:s3cret@...) and set GIT_TERMINAL_PROMPT=0;
//! // libgit2: answer the credentials callback with Cred::userpass_plaintext, and fail on
//! // its second call. Run blocking clients via spawn_blocking or tokio::process.
//! assert!(server.requests() > 0);
//! ```
//! Both clients first send a request without credentials and retry after the 401, so
//! `unauthorized()` is non-zero even for a successful authenticated clone.
#![allow(dead_code)] // Not every test binary uses every accessor.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::task::JoinHandle;

/// Decides on a request's `Authorization` header: `Some(user)` lets it in.
pub type AuthCheck = Arc<dyn Fn(Option<&str>) -> Option<String> + Send + Sync>;

/// A running Git smart-HTTP server on `127.0.0.1`; stops when dropped.
pub struct GitHttpServer {
    port: u16,
    scheme: &'static str,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// State shared between the server handle and the request handler.
struct Shared {
    /// Directory served as `GIT_PROJECT_ROOT`.
    root: PathBuf,
    /// Absolute path of the `git-http-backend` CGI program.
    backend: PathBuf,
    /// The exact `Authorization` header value accepted, and the user name it carries
    /// (passed on as `REMOTE_USER`); `None` serves anonymously.
    auth: Option<(String, String)>,
    /// Decides on the `Authorization` header instead of `auth` (tokens that change at run
    /// time, such as GitHub App installation tokens); answers the user name it carries.
    check: Option<AuthCheck>,
    requests: AtomicUsize,
    unauthorized: AtomicUsize,
}

impl GitHttpServer {
    /// Serves every repository under `root` (bare or non-bare; http-backend handles both with
    /// GIT_HTTP_EXPORT_ALL) at http://127.0.0.1:PORT/<relative path>.
    /// `credentials`: Some((user, password)) requires Basic auth (401 with
    /// `WWW-Authenticate: Basic realm="git"` otherwise); None serves anonymously.
    pub async fn start(
        root: &Path,
        credentials: Option<(&str, &str)>,
    ) -> io::Result<GitHttpServer> {
        let shared = shared(root, credentials).await?;

        // Only ever the loopback interface and an ephemeral port.
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                eprintln!("git_http: server stopped: {err}");
            }
        });
        Ok(GitHttpServer {
            port,
            scheme: "http",
            shared,
            task,
        })
    }

    /// Like [`GitHttpServer::start`], with `extra` routes (a fake forge API) beside Git and
    /// `check` deciding who may use Git (401 with `WWW-Authenticate` otherwise).
    pub async fn start_checked(
        root: &Path,
        extra: Router,
        check: AuthCheck,
    ) -> io::Result<GitHttpServer> {
        let mut shared = shared(root, None).await?;
        if let Some(s) = Arc::get_mut(&mut shared) {
            s.check = Some(check);
        }
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let app = extra.merge(
            Router::new()
                .fallback(handle)
                .with_state(Arc::clone(&shared)),
        );
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                eprintln!("git_http: server stopped: {err}");
            }
        });
        Ok(GitHttpServer {
            port,
            scheme: "http",
            shared,
            task,
        })
    }

    /// Like [`GitHttpServer::start`], over HTTPS: `serve_tls` serves the app on the
    /// listener and returns the CA certificate (PEM) it made (`fake_kube_tls::serve_pem`);
    /// `extra` routes (a fake forge API) are served beside Git. Returns the server and
    /// that CA certificate.
    pub async fn start_tls(
        root: &Path,
        credentials: Option<(&str, &str)>,
        extra: Router,
        serve_tls: impl FnOnce(TcpListener, Router) -> String,
    ) -> io::Result<(GitHttpServer, String)> {
        let shared = shared(root, credentials).await?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let app = extra.merge(
            Router::new()
                .fallback(handle)
                .with_state(Arc::clone(&shared)),
        );
        let ca = serve_tls(listener, app);
        let task = tokio::spawn(std::future::pending());
        Ok((
            GitHttpServer {
                port,
                scheme: "https",
                shared,
                task,
            },
            ca,
        ))
    }

    /// The URL of the repository at `repo_rel_path` below the root, without credentials,
    /// e.g. `http://127.0.0.1:41234/qa.git`.
    pub fn url(&self, repo_rel_path: &str) -> String {
        format!(
            "{}://127.0.0.1:{}/{}",
            self.scheme,
            self.port,
            repo_rel_path.trim_start_matches('/')
        )
    }

    /// Number of HTTP requests seen so far (any status, including 401s).
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Number of requests answered with `401 Unauthorized`.
    pub fn unauthorized(&self) -> usize {
        self.shared.unauthorized.load(Ordering::SeqCst)
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        // Stops accepting connections; the listener is closed with the task.
        self.task.abort();
    }
}

/// `$(git --exec-path)/git-http-backend`, computed at run time.
async fn http_backend_path() -> io::Result<PathBuf> {
    let out = Command::new("git").arg("--exec-path").output().await?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`git --exec-path` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let exec_path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let backend = Path::new(&exec_path).join("git-http-backend");
    if !backend.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} does not exist", backend.display()),
        ));
    }
    Ok(backend)
}

/// The single handler: auth check, then CGI.
async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);

    let mut remote_user = None;
    if let Some((expected, user)) = &shared.auth {
        let given = req.headers().get(header::AUTHORIZATION);
        if given.map(|v| v.as_bytes()) != Some(expected.as_bytes()) {
            shared.unauthorized.fetch_add(1, Ordering::SeqCst);
            return unauthorized();
        }
        remote_user = Some(user.clone());
    }
    if let Some(check) = &shared.check {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match check(given) {
            Some(user) => remote_user = Some(user),
            None => {
                shared.unauthorized.fetch_add(1, Ordering::SeqCst);
                return unauthorized();
            }
        }
    }

    let response = match run_backend(&shared, req, remote_user).await {
        Ok(response) => response,
        Err(err) => {
            eprintln!("git_http: {err}");
            plain(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
        }
    };
    if response.status() == StatusCode::UNAUTHORIZED {
        shared.unauthorized.fetch_add(1, Ordering::SeqCst);
    }
    response
}

/// Runs `git-http-backend` for one request and translates its CGI output.
async fn run_backend(
    shared: &Shared,
    req: Request,
    remote_user: Option<String>,
) -> io::Result<Response> {
    let (parts, body) = req.into_parts();
    // Buffer the whole request body; test repositories are small. Chunked uploads (git's
    // large POSTs) are thereby turned into a known CONTENT_LENGTH.
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| io::Error::other(format!("reading request body: {e}")))?;

    let header_str = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };

    let mut cmd = Command::new(&shared.backend);
    // A clean environment keeps the caller's GIT_DIR & co. from leaking into the backend.
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.env("GIT_PROJECT_ROOT", &shared.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("SERVER_SOFTWARE", "sentry-test-git-http")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", percent_decode(parts.uri.path()))
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("CONTENT_LENGTH", body.len().to_string());
    if let Some(v) = header_str("content-type") {
        cmd.env("CONTENT_TYPE", v);
    }
    // http-backend inflates gzip/x-gzip request bodies itself when told so.
    if let Some(v) = header_str("content-encoding") {
        cmd.env("HTTP_CONTENT_ENCODING", v);
    }
    // Protocol v2 negotiation ("version=2").
    if let Some(v) = header_str("git-protocol") {
        cmd.env("HTTP_GIT_PROTOCOL", v);
    }
    // With REMOTE_USER set, http-backend enables receive-pack (push) unless the repository
    // sets http.receivepack=false; anonymously it needs http.receivepack=true.
    if let Some(user) = remote_user {
        cmd.env("REMOTE_USER", user).env("AUTH_TYPE", "Basic");
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);

    let mut child = cmd.spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| io::Error::other("no stdin pipe"))?;
    // Write stdin and drain stdout/stderr concurrently so neither pipe can deadlock.
    let feed = async move {
        // The backend may exit early (e.g. on an error) and close its stdin: ignore EPIPE.
        let _ = stdin.write_all(&body).await;
        drop(stdin);
    };
    let ((), output) = tokio::join!(feed, child.wait_with_output());
    let output = output?;
    if !output.stderr.is_empty() {
        eprintln!(
            "git_http: http-backend stderr: {}",
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    parse_cgi_output(&output.stdout)
}

/// Splits CGI output into headers and body and builds the HTTP response, honouring `Status:`.
fn parse_cgi_output(out: &[u8]) -> io::Result<Response> {
    // Headers end at the first empty line; http-backend uses "\r\n" but accept "\n" too.
    let (head, body) = match find(out, b"\r\n\r\n") {
        Some(i) => (&out[..i], &out[i + 4..]),
        None => match find(out, b"\n\n") {
            Some(i) => (&out[..i], &out[i + 2..]),
            None => {
                return Err(io::Error::other(format!(
                    "http-backend produced no CGI header block ({} bytes)",
                    out.len()
                )));
            }
        },
    };
    let head = std::str::from_utf8(head)
        .map_err(|_| io::Error::other("http-backend headers are not UTF-8"))?;

    let mut response = Response::new(Body::from(Bytes::copy_from_slice(body)));
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            // "Status: 404 Not Found" -> 404
            let code = value.split_whitespace().next().unwrap_or("");
            let status = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| io::Error::other(format!("bad CGI Status: {value}")))?;
            *response.status_mut() = status;
        } else if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    Ok(response)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn unauthorized() -> Response {
    let mut response = plain(StatusCode::UNAUTHORIZED, "authentication required\n".into());
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"git\""),
    );
    response
}

fn plain(status: StatusCode, text: String) -> Response {
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Decodes `%XX` escapes (CGI's PATH_INFO is decoded); invalid escapes are kept verbatim.
fn percent_decode(path: &str) -> OsString {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

/// Standard base64 (RFC 4648, with padding), enough for a Basic auth header.
fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (k, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if k <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What every request handler shares: the repositories' root, the CGI program and the
/// Basic credentials, if any.
async fn shared(root: &Path, credentials: Option<(&str, &str)>) -> io::Result<Arc<Shared>> {
    let backend = http_backend_path().await?;
    // http-backend wants an absolute project root; it resolves PATH_INFO below it.
    let root = std::fs::canonicalize(root)?;
    let auth = credentials.map(|(user, password)| {
        let token = base64_encode(format!("{user}:{password}").as_bytes());
        (format!("Basic {token}"), user.to_owned())
    });
    Ok(Arc::new(Shared {
        root,
        backend,
        auth,
        check: None,
        requests: AtomicUsize::new(0),
        unauthorized: AtomicUsize::new(0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64_encode(plain.as_bytes()), encoded, "input {plain:?}");
        }
    }

    #[test]
    fn percent_decode_handles_escapes() {
        assert_eq!(percent_decode("/a%20b.git"), OsString::from("/a b.git"));
        assert_eq!(percent_decode("/x%2"), OsString::from("/x%2"));
        assert_eq!(percent_decode("/x%zz"), OsString::from("/x%zz"));
        assert_eq!(percent_decode("/%41"), OsString::from("/A"));
    }
}
