//! GitHub App authentication (`auth.github_app`): the App's private key, the short-lived
//! JWT it signs, and the installation tokens minted with it.
//!
//! - JWT: RS256, `iat` 60 s in the past (clock drift), `exp` 9 minutes ahead (GitHub's
//!   limit is 10), `iss` the App ID; signed with `jsonwebtoken` on aws-lc.
//! - Installation: `installation_id` when configured, else `GET {api}/repos/{o}/{r}/installation`
//!   (with the JWT), remembered per App and repository.
//! - Token: `POST {api}/app/installations/{id}/access_tokens` → `{token, expires_at}`,
//!   cached per installation in [`AppTokens`] and used until [`REFRESH_MARGIN`] before it
//!   expires. One mint per installation at a time (single-flight): callers that find no
//!   usable token wait on the installation's lock, and the first one mints for all.
//! - A 401 with a token: the caller hands it back with [`AppTokens::forget`] (only that
//!   token is dropped, so fifty callers that saw the same 401 cause one new mint) and tries
//!   once more.
//!
//! Every minted token is registered with the output masker the moment it arrives
//! (`deploy::mask::remember_runtime_secret`), whatever its length: it never reaches a log,
//! a message or command output in clear.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use super::http::{Call, Http, Reply};
use super::{ForgeError, encode};
use crate::config::GithubApp;

/// A cached token is replaced when it has less than this left: GitHub's last an hour, and
/// a clone or a command started with it must not see it expire.
pub(crate) const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// `iat` this far in the past, against clock drift (GitHub's advice).
const JWT_BACKDATE: Duration = Duration::from_secs(60);
/// `exp` this far ahead; GitHub refuses more than 10 minutes.
const JWT_LIFETIME: Duration = Duration::from_secs(9 * 60);
const API_VERSION: &str = "2022-11-28";

/// The App's RSA private key, ready to sign. Never printed.
#[derive(Clone)]
pub struct AppKey(Arc<EncodingKey>);

impl std::fmt::Debug for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppKey(***)")
    }
}

#[derive(serde::Serialize)]
struct Claims {
    iat: u64,
    exp: u64,
    iss: String,
}

impl AppKey {
    /// Reads a PEM RSA private key: PKCS#1 (`BEGIN RSA PRIVATE KEY`, what GitHub hands
    /// out) or unencrypted PKCS#8 (`BEGIN PRIVATE KEY`). Signs once to prove the key works,
    /// so a broken key fails at start. The error says what is wrong, not where (the caller
    /// adds the config path).
    pub fn from_pem(pem: &[u8]) -> Result<AppKey, String> {
        let text = std::str::from_utf8(pem).map_err(|_| "is not a PEM text file".to_owned())?;
        let (label, der) = pem_block(text)?;
        let der = match label.as_str() {
            "RSA PRIVATE KEY" => der,
            "PRIVATE KEY" => pkcs8_rsa_key(&der)?.to_vec(),
            "ENCRYPTED PRIVATE KEY" => {
                return Err("holds an encrypted key; export it without a passphrase".to_owned());
            }
            other => {
                return Err(format!(
                    "holds a \"{other}\" block, not an RSA private key (BEGIN RSA PRIVATE KEY)"
                ));
            }
        };
        let key = AppKey(Arc::new(EncodingKey::from_rsa_der(&der)));
        key.jwt(1, SystemTime::now())
            .map_err(|e| format!("is not a usable RSA private key ({e})"))?;
        Ok(key)
    }

    /// A JWT for `app_id` valid from a minute before `now` for nine minutes.
    fn jwt(&self, app_id: u64, now: SystemTime) -> Result<String, jsonwebtoken::errors::Error> {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let claims = Claims {
            iat: now.saturating_sub(JWT_BACKDATE).as_secs(),
            exp: (now + JWT_LIFETIME).as_secs(),
            iss: app_id.to_string(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.0)
    }
}

/// The first PEM block of `text`: its label and decoded body.
fn pem_block(text: &str) -> Result<(String, Vec<u8>), String> {
    let no_block = || "holds no PEM block (-----BEGIN RSA PRIVATE KEY-----)".to_owned();
    let start = text.find("-----BEGIN ").ok_or_else(no_block)?;
    let rest = &text[start + "-----BEGIN ".len()..];
    let label_end = rest.find("-----").ok_or_else(no_block)?;
    let label = rest[..label_end].trim().to_owned();
    let body = &rest[label_end + 5..];
    let end = body
        .find(&format!("-----END {label}-----"))
        .ok_or_else(|| format!("has no -----END {label}----- line"))?;
    if body[..end].contains("Proc-Type:") {
        return Err("holds an encrypted key; export it without a passphrase".to_owned());
    }
    let b64: String = body[..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("has a PEM body that is not base64 ({e})"))?;
    Ok((label, der))
}

/// One DER item: tag, contents, what follows.
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo` whose algorithm is RSA.
fn pkcs8_rsa_key(der: &[u8]) -> Result<&[u8], String> {
    const RSA_ENCRYPTION: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
    ];
    let bad = || "holds a PKCS#8 key that cannot be read".to_owned();
    let (0x30, info, _) = der_item(der).ok_or_else(bad)? else {
        return Err(bad());
    };
    let (0x02, _, rest) = der_item(info).ok_or_else(bad)? else {
        return Err(bad());
    };
    let (0x30, algorithm, rest) = der_item(rest).ok_or_else(bad)? else {
        return Err(bad());
    };
    if !algorithm.starts_with(RSA_ENCRYPTION) {
        return Err("holds a private key that is not RSA; GitHub Apps sign with RSA".to_owned());
    }
    let (0x04, key, _) = der_item(rest).ok_or_else(bad)? else {
        return Err(bad());
    };
    Ok(key)
}

/// A token and when GitHub said it expires.
#[derive(Clone)]
struct Minted {
    token: SecretString,
    expires_at: SystemTime,
}

type Slot = Arc<tokio::sync::Mutex<Option<Minted>>>;

/// Installation tokens of every App the configuration uses, per installation; one per
/// HTTP client ([`Http`] holds it).
#[derive(Default)]
pub(crate) struct AppTokens {
    /// `{api} {app_id} {installation}` → its current token (or none yet).
    slots: Mutex<HashMap<String, Slot>>,
    /// `{api} {app_id} {owner/repo}` → installation id found for it.
    installations: Mutex<HashMap<String, u64>>,
    mints: AtomicU64,
}

impl AppTokens {
    /// Tokens minted since start.
    #[cfg(test)]
    pub fn mints(&self) -> u64 {
        self.mints.load(Ordering::Relaxed)
    }

    /// A token for `app`'s installation with at least [`REFRESH_MARGIN`] left, minted when
    /// there is none (one mint at a time per installation; see the module header).
    pub async fn token(
        &self,
        http: &Http,
        app: &GithubApp,
        repo: &str,
        cancel: &CancellationToken,
    ) -> Result<SecretString, ForgeError> {
        let installation = self.installation(http, app, repo, cancel).await?;
        let slot = self.slot(app, installation);
        let mut current = tokio::select! {
            () = cancel.cancelled() => return Err(super::http::cancelled(repo)),
            guard = slot.lock() => guard,
        };
        if let Some(minted) = current.as_ref() {
            if minted.expires_at > SystemTime::now() + REFRESH_MARGIN {
                return Ok(minted.token.clone());
            }
        }
        let minted = self.mint(http, app, installation, repo, cancel).await?;
        let token = minted.token.clone();
        *current = Some(minted);
        Ok(token)
    }

    /// Drops `token` after the forge refused it (401), unless another caller has already
    /// replaced it: the next [`AppTokens::token`] mints a new one.
    pub async fn forget(&self, app: &GithubApp, token: &SecretString) {
        let key = self.installation_key(app);
        let installation = self
            .installations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .copied()
            .or(app.installation_id);
        let Some(installation) = installation else {
            return;
        };
        let slot = self.slot(app, installation);
        let mut current = slot.lock().await;
        if current
            .as_ref()
            .is_some_and(|m| m.token.expose_secret() == token.expose_secret())
        {
            *current = None;
        }
    }

    fn installation_key(&self, app: &GithubApp) -> String {
        format!("{} {} {}", app.api_url, app.app_id, app.project)
    }

    fn slot(&self, app: &GithubApp, installation: u64) -> Slot {
        let key = format!("{} {} {installation}", app.api_url, app.app_id);
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .clone()
    }

    /// The configured installation, else the one GitHub names for the repository.
    async fn installation(
        &self,
        http: &Http,
        app: &GithubApp,
        repo: &str,
        cancel: &CancellationToken,
    ) -> Result<u64, ForgeError> {
        if let Some(id) = app.installation_id {
            return Ok(id);
        }
        let key = self.installation_key(app);
        if let Some(id) = self
            .installations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(*id);
        }
        let path: Vec<String> = app.project.split('/').map(encode).collect();
        let url = parse(
            repo,
            &format!("{}/repos/{}/installation", app.api_url, path.join("/")),
        )?;
        let headers = jwt_headers(app, repo)?;
        let call = Call {
            repo,
            url,
            headers: &headers,
            has_token: true,
            cancel,
        };
        let host = call.url.host_str().unwrap_or_default().to_owned();
        let reply = http
            .get(call)
            .await
            .map_err(|e| refused_jwt(app, repo, e))?;
        let body = match reply {
            Reply::Fresh { body, .. } => body,
            Reply::Refused {
                status: StatusCode::NOT_FOUND,
                ..
            } => {
                return Err(ForgeError::Auth(format!(
                    "{repo}: GitHub App {} is not installed on {} ({host} answered 404); install it there, or set auth.github_app.installation_id",
                    app.app_id, app.project
                )));
            }
            Reply::Refused { status, .. } => {
                return Err(ForgeError::Transient(format!(
                    "{repo}: {host} answered {status} when asked for the installation of GitHub App {}",
                    app.app_id
                )));
            }
            Reply::Cached(_) => return Err(unexpected_304(repo)),
        };
        #[derive(serde::Deserialize)]
        struct Installation {
            id: u64,
        }
        let found: Installation = serde_json::from_slice(&body).map_err(|e| {
            ForgeError::Malformed(format!(
                "{repo}: the installation of GitHub App {} from {host} has no numeric id ({e})",
                app.app_id
            ))
        })?;
        self.installations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, found.id);
        Ok(found.id)
    }

    async fn mint(
        &self,
        http: &Http,
        app: &GithubApp,
        installation: u64,
        repo: &str,
        cancel: &CancellationToken,
    ) -> Result<Minted, ForgeError> {
        let url = parse(
            repo,
            &format!(
                "{}/app/installations/{installation}/access_tokens",
                app.api_url
            ),
        )?;
        let host = url.host_str().unwrap_or_default().to_owned();
        let headers = jwt_headers(app, repo)?;
        let call = Call {
            repo,
            url,
            headers: &headers,
            has_token: true,
            cancel,
        };
        let reply = http
            .post(call, b"{}", Duration::ZERO)
            .await
            .map_err(|e| refused_jwt(app, repo, e))?;
        let body = match reply {
            Reply::Fresh { body, .. } => body,
            Reply::Refused { status, .. } if status == StatusCode::NOT_FOUND => {
                return Err(ForgeError::Auth(format!(
                    "{repo}: installation {installation} of GitHub App {} not found on {host}; check auth.github_app.installation_id",
                    app.app_id
                )));
            }
            Reply::Refused { status, .. } => {
                return Err(ForgeError::Transient(format!(
                    "{repo}: {host} answered {status} to the installation token request of GitHub App {}",
                    app.app_id
                )));
            }
            Reply::Cached(_) => return Err(unexpected_304(repo)),
        };
        #[derive(serde::Deserialize)]
        struct Answer {
            token: String,
            expires_at: String,
        }
        let answer: Answer = serde_json::from_slice(&body).map_err(|e| {
            ForgeError::Malformed(format!(
                "{repo}: the installation token answer from {host} lacks token or expires_at ({})",
                e.to_string().replace(body_text(&body).as_str(), "***")
            ))
        })?;
        // Masked from here on, before anything could print it.
        crate::deploy::mask::remember_runtime_secret(&answer.token);
        let expires_at = humantime::parse_rfc3339(&answer.expires_at)
            .or_else(|_| humantime::parse_rfc3339_weak(&answer.expires_at))
            .map_err(|e| {
                ForgeError::Malformed(format!(
                    "{repo}: expires_at from {host} is not an RFC 3339 time ({e})"
                ))
            })?;
        self.mints.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            repository = repo,
            app_id = app.app_id,
            installation,
            expires_in_s = expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .as_secs(),
            "GitHub App installation token minted"
        );
        Ok(Minted {
            token: SecretString::from(answer.token),
            expires_at,
        })
    }
}

fn body_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

fn parse(repo: &str, text: &str) -> Result<reqwest::Url, ForgeError> {
    reqwest::Url::parse(text).map_err(|e| {
        ForgeError::Malformed(format!(
            "{repo}: cannot build a GitHub App request URL: {e}"
        ))
    })
}

fn unexpected_304(repo: &str) -> ForgeError {
    ForgeError::Malformed(format!(
        "{repo}: a GitHub App request was answered 304 Not Modified"
    ))
}

/// A 401/403 to a JWT request is the App's identity being refused.
fn refused_jwt(app: &GithubApp, repo: &str, error: ForgeError) -> ForgeError {
    match error {
        ForgeError::Auth(_) => ForgeError::Auth(format!(
            "{repo}: GitHub refused GitHub App {}'s signed request: check auth.github_app.app_id and private_key_file ({})",
            app.app_id,
            app.private_key_file.display()
        )),
        other => other,
    }
}

/// Headers of a request made as the App itself: a fresh JWT as the bearer token.
fn jwt_headers(app: &GithubApp, repo: &str) -> Result<HeaderMap, ForgeError> {
    let jwt = app.key.jwt(app.app_id, SystemTime::now()).map_err(|e| {
        ForgeError::Auth(format!(
            "{repo}: cannot sign the GitHub App JWT with {}: {e}",
            app.private_key_file.display()
        ))
    })?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static("application/vnd.github+json"),
    );
    headers.insert(
        "x-github-api-version",
        HeaderValue::from_static(API_VERSION),
    );
    let mut value = HeaderValue::from_str(&format!("Bearer {jwt}")).map_err(|_| {
        ForgeError::Auth(format!("{repo}: the GitHub App JWT is not a header value"))
    })?;
    value.set_sensitive(true);
    headers.insert(header::AUTHORIZATION, value);
    Ok(headers)
}

/// The process's HTTP client, for the callers outside `forge` that need a token (the
/// clone, the commands). Set by the first `Forges::new`.
static PROCESS_HTTP: OnceLock<Arc<Http>> = OnceLock::new();

pub(crate) fn set_process_http(http: &Arc<Http>) {
    let _ = PROCESS_HTTP.set(http.clone());
}

pub(crate) fn process_http() -> Option<&'static Arc<Http>> {
    PROCESS_HTTP.get()
}

/// An installation token for `app` through the process's client (see [`AppTokens::token`]).
pub async fn installation_token(
    app: &GithubApp,
    repo: &str,
    cancel: &CancellationToken,
) -> Result<SecretString, ForgeError> {
    let http = PROCESS_HTTP.get().ok_or_else(|| {
        ForgeError::Auth(format!(
            "{repo}: no forge client in this process to mint a GitHub App token"
        ))
    })?;
    http.apps().token(http, app, repo, cancel).await
}

/// Hands back a token a server refused (see [`AppTokens::forget`]).
pub async fn forget_installation_token(app: &GithubApp, token: &SecretString) {
    if let Some(http) = PROCESS_HTTP.get() {
        http.apps().forget(app, token).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    /// An RSA key pair made with the openssl CLI: (private PEM in PKCS#8, PKCS#1, public DER).
    pub(crate) fn rsa_keys(dir: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let key = dir.join("key.pem");
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["genrsa", "-out", key.to_str().unwrap(), "2048"]);
        let pkcs1 = dir.join("pkcs1.pem");
        run(&[
            "rsa",
            "-in",
            key.to_str().unwrap(),
            "-traditional",
            "-out",
            pkcs1.to_str().unwrap(),
        ]);
        let public = dir.join("pub.der");
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
        (
            std::fs::read(key).unwrap(),
            std::fs::read(pkcs1).unwrap(),
            std::fs::read(public).unwrap(),
        )
    }

    fn app(key: AppKey, api: &str) -> GithubApp {
        GithubApp {
            app_id: 4242,
            installation_id: None,
            private_key_file: "/k.pem".into(),
            key,
            api_url: api.to_owned(),
            project: "acme/widgets".to_owned(),
        }
    }

    #[test]
    fn both_key_formats_sign_a_jwt_the_public_key_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let (pkcs8, pkcs1, public) = rsa_keys(dir.path());
        assert!(String::from_utf8_lossy(&pkcs8).contains("BEGIN PRIVATE KEY"));
        assert!(String::from_utf8_lossy(&pkcs1).contains("BEGIN RSA PRIVATE KEY"));
        let decoding = jsonwebtoken::DecodingKey::from_rsa_der(&public);
        for pem in [&pkcs8, &pkcs1] {
            let key = AppKey::from_pem(pem).unwrap();
            let now = SystemTime::now();
            let jwt = key.jwt(4242, now).unwrap();
            let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
            validation.set_issuer(&["4242"]);
            validation.set_required_spec_claims(&["exp", "iat", "iss"]);
            let data =
                jsonwebtoken::decode::<serde_json::Value>(&jwt, &decoding, &validation).unwrap();
            let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
            assert_eq!(data.claims["iat"], secs - 60);
            assert_eq!(data.claims["exp"], secs + 540);
            assert_eq!(data.claims["iss"], "4242");
        }
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason() {
        for (pem, why) in [
            (&b"hello"[..], "no PEM block"),
            (
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "not an RSA private key",
            ),
            (
                b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
                "not a usable RSA private key",
            ),
            (
                b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
                "encrypted",
            ),
        ] {
            let err = AppKey::from_pem(pem).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }

    /// Fifty callers at once find no token: one mint, and all get its token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_callers_share_one_mint_and_a_401_refreshes_once() {
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let dir = tempfile::tempdir().unwrap();
        let (pkcs8, _, _) = rsa_keys(dir.path());
        let server = MockServer::start().await;
        let minted = Arc::new(AtomicU64::new(0));
        let counter = minted.clone();
        Mock::given(method("GET"))
            .and(path("/api/v3/repos/acme/widgets/installation"))
            .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"id":77}"#))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/api/v3/app/installations/77/access_tokens"))
            .respond_with(move |_: &wiremock::Request| {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                // Slow enough that every caller arrives while the first mint is in flight.
                ResponseTemplate::new(201)
                    .set_delay(Duration::from_millis(300))
                    .set_body_string(format!(
                        r#"{{"token":"ghs_{n}{}","expires_at":"2099-01-01T00:00:00Z"}}"#,
                        "x".repeat(60)
                    ))
            })
            .mount(&server)
            .await;
        let http = Arc::new(Http::new(Duration::from_secs(10), 100, Vec::new(), None).unwrap());
        let app = Arc::new(app(
            AppKey::from_pem(&pkcs8).unwrap(),
            &format!("{}/api/v3", server.uri()),
        ));
        let barrier = Arc::new(tokio::sync::Barrier::new(50));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (http, app, barrier) = (http.clone(), app.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let cancel = CancellationToken::new();
                http.apps()
                    .token(&http, &app, "r", &cancel)
                    .await
                    .map(|t| t.expose_secret().to_owned())
            }));
        }
        let mut tokens = Vec::new();
        for task in tasks {
            tokens.push(task.await.unwrap().unwrap());
        }
        assert_eq!(minted.load(Ordering::SeqCst), 1);
        assert_eq!(http.apps().mints(), 1);
        assert!(tokens.iter().all(|t| t == &tokens[0]), "{tokens:?}");
        assert_eq!(tokens[0].len(), 65);

        // Fifty callers hand back the same refused token: one new mint.
        let stale = SecretString::from(tokens[0].clone());
        for _ in 0..50 {
            http.apps().forget(&app, &stale).await;
        }
        let cancel = CancellationToken::new();
        let fresh = http.apps().token(&http, &app, "r", &cancel).await.unwrap();
        assert_ne!(fresh.expose_secret(), stale.expose_secret());
        // The old token handed back again must not throw the new one away.
        http.apps().forget(&app, &stale).await;
        let again = http.apps().token(&http, &app, "r", &cancel).await.unwrap();
        assert_eq!(again.expose_secret(), fresh.expose_secret());
        assert_eq!(minted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_token_close_to_expiry_is_replaced_before_use() {
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let dir = tempfile::tempdir().unwrap();
        let (pkcs8, _, _) = rsa_keys(dir.path());
        let server = MockServer::start().await;
        let soon = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(120));
        Mock::given(method("POST"))
            .and(path("/app/installations/5/access_tokens"))
            .respond_with(
                ResponseTemplate::new(201)
                    .set_body_string(format!(r#"{{"token":"ghs_soon","expires_at":"{soon}"}}"#)),
            )
            .expect(2)
            .mount(&server)
            .await;
        let http = Http::new(Duration::from_secs(10), 10, Vec::new(), None).unwrap();
        let mut app = app(AppKey::from_pem(&pkcs8).unwrap(), &server.uri());
        app.installation_id = Some(5);
        let cancel = CancellationToken::new();
        http.apps().token(&http, &app, "r", &cancel).await.unwrap();
        http.apps().token(&http, &app, "r", &cancel).await.unwrap();
        assert_eq!(http.apps().mints(), 2);
        server.verify().await;
    }
}
