//! A fake GitHub (Enterprise, under `/api/v3`) for GitHub App authentication: it verifies
//! every App JWT with the App's public key (RS256, `iss`, `iat` in the past, `exp` at most
//! ten minutes after `iat`), finds installations, mints installation tokens (`ghs_` + 60
//! characters, never 40) with an `expires_at`, answers branch heads only to a valid token,
//! and decides who may use the Git server beside it ([`FakeGithubApp::git_check`]).
//!
//! Knobs: the lifetime of the next tokens, a number of next tokens issued already revoked
//! (the API answers 401 to them), or every token refused.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;

/// A key pair for the App, made with the openssl CLI: the private key as GitHub hands it
/// out (PKCS#1 PEM) and the public key (PKCS#1 DER) for the fake to verify with.
pub fn app_keys(dir: &std::path::Path) -> (PathBuf, Vec<u8>) {
    let key = dir.join("app-key.pem");
    let public = dir.join("app-pub.der");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genrsa",
        "-traditional",
        "-out",
        key.to_str().unwrap(),
        "2048",
    ]);
    run(&[
        "rsa",
        "-in",
        key.to_str().unwrap(),
        "-RSAPublicKey_out",
        "-outform",
        "DER",
        "-out",
        public.to_str().unwrap(),
    ]);
    (key, std::fs::read(public).expect("public key"))
}

struct Issued {
    token: String,
    expires: SystemTime,
    revoked: bool,
}

struct Inner {
    public_der: Vec<u8>,
    app_id: u64,
    installation: u64,
    /// Directory served by the Git server: `{root}/{owner}/{repo}` is a repository.
    root: PathBuf,
    issued: Mutex<Vec<Issued>>,
    lifetime: Mutex<Duration>,
    revoke_next: AtomicUsize,
    refuse_all: AtomicBool,
    mints: AtomicUsize,
    lookups: AtomicUsize,
    bad_jwts: AtomicUsize,
    api_ok: AtomicUsize,
    api_unauthorized: AtomicUsize,
    git_ok: AtomicUsize,
}

/// See the module header. Cheap to clone.
#[derive(Clone)]
pub struct FakeGithubApp(Arc<Inner>);

impl FakeGithubApp {
    pub fn new(public_der: Vec<u8>, app_id: u64, installation: u64, root: PathBuf) -> Self {
        FakeGithubApp(Arc::new(Inner {
            public_der,
            app_id,
            installation,
            root,
            issued: Mutex::default(),
            lifetime: Mutex::new(Duration::from_secs(3600)),
            revoke_next: AtomicUsize::new(0),
            refuse_all: AtomicBool::new(false),
            mints: AtomicUsize::new(0),
            lookups: AtomicUsize::new(0),
            bad_jwts: AtomicUsize::new(0),
            api_ok: AtomicUsize::new(0),
            api_unauthorized: AtomicUsize::new(0),
            git_ok: AtomicUsize::new(0),
        }))
    }

    /// The API routes, to merge beside the Git server.
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/api/v3/repos/{owner}/{repo}/installation",
                get(installation),
            )
            .route(
                "/api/v3/app/installations/{id}/access_tokens",
                post(access_tokens),
            )
            .route(
                "/api/v3/repos/{owner}/{repo}/commits/refs/heads/{branch}",
                get(head),
            )
            .with_state(self.clone())
    }

    /// For `GitHttpServer::start_checked`: Basic `x-access-token:<valid token>` only.
    pub fn git_check(&self) -> super::git_http::AuthCheck {
        let me = self.clone();
        Arc::new(move |given: Option<&str>| {
            let encoded = given?.strip_prefix("Basic ")?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (user, token) = text.split_once(':')?;
            (user == "x-access-token" && me.valid(token)).then(|| {
                me.0.git_ok.fetch_add(1, Ordering::SeqCst);
                user.to_owned()
            })
        })
    }

    pub fn set_lifetime(&self, lifetime: Duration) {
        *self.0.lifetime.lock().unwrap() = lifetime;
    }
    /// The next `n` tokens are issued already revoked: the API answers 401 to them.
    pub fn revoke_next(&self, n: usize) {
        self.0.revoke_next.store(n, Ordering::SeqCst);
    }
    pub fn refuse_all(&self, refuse: bool) {
        self.0.refuse_all.store(refuse, Ordering::SeqCst);
    }
    pub fn mints(&self) -> usize {
        self.0.mints.load(Ordering::SeqCst)
    }
    pub fn lookups(&self) -> usize {
        self.0.lookups.load(Ordering::SeqCst)
    }
    pub fn bad_jwts(&self) -> usize {
        self.0.bad_jwts.load(Ordering::SeqCst)
    }
    pub fn api_ok(&self) -> usize {
        self.0.api_ok.load(Ordering::SeqCst)
    }
    pub fn api_unauthorized(&self) -> usize {
        self.0.api_unauthorized.load(Ordering::SeqCst)
    }
    pub fn git_ok(&self) -> usize {
        self.0.git_ok.load(Ordering::SeqCst)
    }
    /// Every token issued so far.
    pub fn tokens(&self) -> Vec<String> {
        self.0
            .issued
            .lock()
            .unwrap()
            .iter()
            .map(|i| i.token.clone())
            .collect()
    }

    fn valid(&self, token: &str) -> bool {
        if self.0.refuse_all.load(Ordering::SeqCst) {
            return false;
        }
        let now = SystemTime::now();
        self.0
            .issued
            .lock()
            .unwrap()
            .iter()
            .any(|i| i.token == token && !i.revoked && i.expires > now)
    }

    /// Whether the request carries a JWT this App signed, valid now.
    fn jwt_ok(&self, headers: &HeaderMap) -> bool {
        let ok = (|| {
            let jwt = headers
                .get(header::AUTHORIZATION)?
                .to_str()
                .ok()?
                .strip_prefix("Bearer ")?;
            let key = jsonwebtoken::DecodingKey::from_rsa_der(&self.0.public_der);
            let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
            validation.set_issuer(&[self.0.app_id.to_string()]);
            validation.set_required_spec_claims(&["exp", "iat", "iss"]);
            validation.leeway = 0;
            let data = jsonwebtoken::decode::<serde_json::Value>(jwt, &key, &validation).ok()?;
            let iat = data.claims["iat"].as_u64()?;
            let exp = data.claims["exp"].as_u64()?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
            // GitHub: issued in the past, at most ten minutes of validity.
            (iat <= now && exp > now && exp - iat <= 600).then_some(())
        })()
        .is_some();
        if !ok {
            self.0.bad_jwts.fetch_add(1, Ordering::SeqCst);
        }
        ok
    }
}

fn status(code: StatusCode, body: &str) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_owned(),
    )
        .into_response()
}

async fn installation(
    State(app): State<FakeGithubApp>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    app.0.lookups.fetch_add(1, Ordering::SeqCst);
    if !app.jwt_ok(&headers) {
        return status(
            StatusCode::UNAUTHORIZED,
            r#"{"message":"A JSON web token could not be decoded"}"#,
        );
    }
    if !app.0.root.join(&owner).join(&repo).exists() {
        return status(StatusCode::NOT_FOUND, r#"{"message":"Not Found"}"#);
    }
    status(
        StatusCode::OK,
        &format!(r#"{{"id":{}}}"#, app.0.installation),
    )
}

async fn access_tokens(
    State(app): State<FakeGithubApp>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Response {
    if !app.jwt_ok(&headers) {
        return status(
            StatusCode::UNAUTHORIZED,
            r#"{"message":"A JSON web token could not be decoded"}"#,
        );
    }
    if id != app.0.installation {
        return status(StatusCode::NOT_FOUND, r#"{"message":"Not Found"}"#);
    }
    let n = app.0.mints.fetch_add(1, Ordering::SeqCst);
    // `ghs_` and 60 characters: not the 40 of old tokens.
    let body: String = format!("{n:04}{:x}", rand_part())
        .chars()
        .chain(std::iter::repeat('Q'))
        .take(60)
        .collect();
    let token = format!("ghs_{body}");
    let lifetime = *app.0.lifetime.lock().unwrap();
    let expires = SystemTime::now() + lifetime;
    let revoked = app
        .0
        .revoke_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    app.0.issued.lock().unwrap().push(Issued {
        token: token.clone(),
        expires,
        revoked,
    });
    let expires_at = humantime::format_rfc3339_seconds(expires);
    status(
        StatusCode::CREATED,
        &format!(r#"{{"token":"{token}","expires_at":"{expires_at}"}}"#),
    )
}

fn rand_part() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn head(
    State(app): State<FakeGithubApp>,
    Path((owner, repo, branch)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !token.is_some_and(|t| app.valid(t)) {
        app.0.api_unauthorized.fetch_add(1, Ordering::SeqCst);
        return status(StatusCode::UNAUTHORIZED, r#"{"message":"Bad credentials"}"#);
    }
    app.0.api_ok.fetch_add(1, Ordering::SeqCst);
    let dir = app.0.root.join(&owner).join(&repo);
    let out = std::process::Command::new("git")
        .args(["rev-parse", &format!("refs/heads/{branch}")])
        .current_dir(&dir)
        .output();
    match out {
        Ok(out) if out.status.success() => (
            StatusCode::OK,
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
            .into_response(),
        _ => status(
            StatusCode::UNPROCESSABLE_ENTITY,
            r#"{"message":"No commit found"}"#,
        ),
    }
}
