//! GitHub and GitHub Enterprise Server over the REST API.
//!
//! - Head of a branch: `GET {api}/repos/{owner}/{repo}/commits/refs/heads/{branch}` with
//!   `Accept: application/vnd.github.sha`; the body is the bare 40-hex SHA. The full ref
//!   name, never the bare branch name: `commits/{name}` would also resolve a tag, or take
//!   a 40-hex branch name for a commit SHA.
//! - Listing (for patterns): `GET {api}/repos/{owner}/{repo}/branches?per_page=100`,
//!   following `Link: <…>; rel="next"`. GitHub has no name filter, so every branch is listed.
//!
//! Every request is conditional once an ETag is known, so an unchanged repository costs no
//! quota (GitHub does not count authenticated 304s).
//!
//! Many repositories at once: `graphql` (batched `POST {api}/graphql`, see `github_lookup`).
//!
//! - Commit status: `POST {api}/repos/{owner}/{repo}/statuses/{sha}` with `state`
//!   (`pending|success|failure|error`), `context`, `description` (at most 140 characters:
//!   GitHub answers 422 to longer ones) and `target_url` → `201`.

pub(crate) mod graphql;

use std::borrow::Cow;
use std::sync::Arc;

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use super::http::{Call, Http, Reply};
use super::kind::{Kind, ProjectRule, Proof, WebhookIds};
use super::{
    BranchPattern, CommitStatus, Forge, ForgeError, Listing, ListingFormat, Posted, Sha,
    StatusState, api_base, cut, encode, fetch_sha, parse_url, secret_header, secrets_of, snippet,
    walk_listing,
};
use crate::config::{RepoType, Repository};

const API_VERSION: &str = "2022-11-28";
const ACCEPT_SHA: &str = "application/vnd.github.sha";
const ACCEPT_JSON: &str = "application/vnd.github+json";
/// GitHub answers 422 to a longer status description.
const MAX_DESCRIPTION: usize = 140;

/// GitHub and GitHub Enterprise Server.
pub(crate) static KIND: Kind = Kind {
    repo_type: RepoType::Github,
    name: "github",
    clone_username: "x-access-token",
    project: Some(ProjectRule {
        exact_segments: Some(2),
        min_segments: 2,
        hint: "must name the owner and the repository, like https://github.com/OWNER/REPO",
    }),
    default_api: |host, origin| {
        Some(if host == "github.com" || host == "www.github.com" {
            "https://api.github.com".to_owned()
        } else {
            // GitHub Enterprise Server.
            format!("{origin}/api/v3")
        })
    },
    owns_host: |host| host == "github.com",
    budget: Some(super::budget::BudgetLimits::GITHUB),
    rate_limit_headers: Some(("x-ratelimit-remaining", "x-ratelimit-reset")),
    // A write costs 5 of the 900 secondary-limit points a minute (a read 1): one a second
    // uses a third of the budget and leaves the rest to polling.
    status_spacing: Some(std::time::Duration::from_secs(1)),
    webhook: Some(WebhookIds {
        endpoint: "github",
        proof: Proof::HmacSha256 {
            header: "x-hub-signature-256",
        },
        event_header: "x-github-event",
        push_event: "push",
        ping_event: Some("ping"),
        delivery_header: "x-github-delivery",
        ids: &[
            ("repository", "full_name"),
            ("repository", "clone_url"),
            ("repository", "html_url"),
        ],
    }),
    commit_url: |repo, sha| Some(format!("{}/commit/{sha}", super::kind::web_base(repo)?)),
};

#[derive(Clone)]
pub(crate) struct GitHub {
    http: Arc<Http>,
    repo: Arc<Repository>,
    /// `{api}/repos/{owner}/{repo}`, each part percent-encoded, parsed once: a request URL
    /// is this with a longer path, so no request parses a host again (URL parsing was a
    /// sixth of a quiet poll cycle's CPU).
    repo_api: Url,
    host: String,
    /// The GraphQL endpoint (`{api}/graphql`; GitHub Enterprise Server: `/api/graphql`).
    graphql: Url,
    /// Request headers for a bare SHA and for JSON, token included, built once.
    sha_headers: Arc<HeaderMap>,
    json_headers: Arc<HeaderMap>,
}

impl GitHub {
    pub fn new(http: Arc<Http>, repo: Arc<Repository>) -> Result<GitHub, ForgeError> {
        let base = api_base(&repo)?;
        let path: Vec<String> = repo.monitor.project_path.split('/').map(encode).collect();
        let repo_api = parse_url(&repo, &format!("{base}/repos/{}", path.join("/")))?;
        let host = repo_api.host_str().unwrap_or_default().to_owned();
        Ok(GitHub {
            graphql: graphql::endpoint_url(&repo)?,
            sha_headers: Arc::new(headers(&repo, ACCEPT_SHA)?),
            json_headers: Arc::new(headers(&repo, ACCEPT_JSON)?),
            http,
            repo,
            repo_api,
            host,
        })
    }

    /// `{repo_api}/{tail}` with `query`; `tail` is already percent-encoded.
    fn url(&self, tail: &str, query: Option<&str>) -> Url {
        let mut url = self.repo_api.clone();
        url.set_path(&format!("{}/{tail}", self.repo_api.path()));
        url.set_query(query);
        url
    }

    fn call<'a>(
        &'a self,
        url: Url,
        headers: &'a HeaderMap,
        cancel: &'a CancellationToken,
    ) -> Call<'a> {
        Call {
            repo: &self.repo.name,
            url,
            headers,
            has_token: self.repo.monitor.auth.has_credentials(),
            cancel,
        }
    }

    /// `base` with the GitHub App's current installation token, when the repository
    /// authenticates as an App (else `base` as prepared, its token included), and that token.
    async fn authorized<'h>(
        &self,
        base: &'h HeaderMap,
        cancel: &CancellationToken,
    ) -> Result<(Cow<'h, HeaderMap>, Option<SecretString>), ForgeError> {
        let Some(app) = &self.repo.monitor.auth.github_app else {
            return Ok((Cow::Borrowed(base), None));
        };
        let token = self
            .http
            .apps()
            .token(&self.http, app, &self.repo.name, cancel)
            .await?;
        let mut headers = base.clone();
        let value = format!("Bearer {}", token.expose_secret());
        headers.insert(header::AUTHORIZATION, secret_header(&self.repo, &value)?);
        Ok((Cow::Owned(headers), Some(token)))
    }

    /// After a request made with App token `token`: on a 401 the first time (`tries` 0),
    /// hands the token back so the next try mints a new one, and says to try again.
    async fn try_again<T>(
        &self,
        result: &Result<T, ForgeError>,
        token: Option<SecretString>,
        tries: &mut u32,
    ) -> bool {
        *tries += 1;
        match (&self.repo.monitor.auth.github_app, token, result) {
            (Some(app), Some(token), Err(e)) if *tries == 1 && super::http::is_unauthorized(e) => {
                tracing::info!(repository = %self.repo.name, "GitHub refused the App installation token (401); minting a new one");
                self.http.apps().forget(app, &token).await;
                true
            }
            _ => false,
        }
    }

    fn repository_not_found(&self) -> ForgeError {
        ForgeError::NotFound(format!(
            "{}: repository {} not found on {} — renamed, private without a token, or wrong api_url",
            self.repo.name, self.repo.monitor.project_path, self.host
        ))
    }

    /// What a status that is neither success, rate limit nor 401/403 means here.
    fn refused(&self, status: StatusCode, branch: Option<&str>) -> ForgeError {
        let name = &self.repo.name;
        match (status, branch) {
            (StatusCode::NOT_FOUND, _) => self.repository_not_found(),
            // `commits/{ref}` answers 422 "No commit found for SHA" for a missing branch.
            (StatusCode::UNPROCESSABLE_ENTITY, Some(branch)) => ForgeError::NotFound(format!(
                "{name}: branch {branch} does not exist in {}",
                self.repo.monitor.project_path
            )),
            (StatusCode::CONFLICT, _) => ForgeError::NotFound(format!(
                "{name}: repository {} is empty",
                self.repo.monitor.project_path
            )),
            (s, _) if s.is_redirection() => ForgeError::NotFound(format!(
                "{name}: {} redirected to another host ({s}); check api_url",
                self.host
            )),
            (s, _) => {
                ForgeError::Transient(format!("{name}: unexpected answer {s} from {}", self.host))
            }
        }
    }
}

impl GitHub {
    /// The full SHA of the commit an abbreviated SHA names (`commits/{sha}` answers for
    /// any unambiguous prefix of at least 7 hex characters; 422 when none or ambiguous).
    pub async fn commit(
        &self,
        prefix: &str,
        cancel: &CancellationToken,
    ) -> Result<Sha, ForgeError> {
        let url = self.url(&format!("commits/{}", encode(prefix)), None);
        let mut tries = 0;
        loop {
            let (headers, token) = self.authorized(&self.sha_headers, cancel).await?;
            let call = self.call(url.clone(), &headers, cancel);
            let result = fetch_sha(
                &self.http,
                call,
                |body| Sha::parse(std::str::from_utf8(body).ok()?),
                |status, _| match status {
                    StatusCode::UNPROCESSABLE_ENTITY => ForgeError::NotFound(format!(
                        "{}: no single commit {prefix} in {}",
                        self.repo.name, self.repo.monitor.project_path
                    )),
                    other => self.refused(other, None),
                },
            )
            .await;
            if !self.try_again(&result, token, &mut tries).await {
                return result;
            }
        }
    }

    /// Posts one commit status (see the module header).
    pub async fn post_status(
        &self,
        status: &CommitStatus,
        cancel: &CancellationToken,
    ) -> Result<Posted, ForgeError> {
        let url = self.url(&format!("statuses/{}", status.sha), None);
        let mut body = serde_json::json!({
            "state": state_word(status.state),
            "context": status.context,
            "description": cut(&status.description, MAX_DESCRIPTION),
        });
        if let Some(target) = &status.target_url {
            body["target_url"] = serde_json::Value::from(target.as_str());
        }
        let spacing = KIND.status_spacing.unwrap_or_default();
        let mut tries = 0;
        let (reply, headers) = loop {
            let (headers, token) = self.authorized(&self.json_headers, cancel).await?;
            let call = self.call(url.clone(), &headers, cancel);
            let result = self
                .http
                .post(call, body.to_string().as_bytes(), spacing)
                .await;
            if !self.try_again(&result, token, &mut tries).await {
                break (result?, headers);
            }
        };
        match reply {
            Reply::Fresh { .. } | Reply::Cached(_) => Ok(Posted::Created),
            Reply::Refused { status: code, body } => Err(match code {
                StatusCode::NOT_FOUND => self.repository_not_found(),
                StatusCode::UNPROCESSABLE_ENTITY | StatusCode::BAD_REQUEST => {
                    ForgeError::Rejected(format!(
                        "{}: {} refused the commit status ({code}): {}",
                        self.repo.name,
                        self.host,
                        snippet(&body, &secrets_of(&headers))
                    ))
                }
                other => self.refused(other, None),
            }),
        }
    }
}

/// GitHub's word for a state; a superseded unit is an `error` (GitHub has no `canceled`).
fn state_word(state: StatusState) -> &'static str {
    match state {
        StatusState::Pending => "pending",
        StatusState::Success => "success",
        StatusState::Failure => "failure",
        StatusState::Error | StatusState::Superseded => "error",
    }
}

impl Forge for GitHub {
    async fn head(&self, branch: &str, cancel: &CancellationToken) -> Result<Sha, ForgeError> {
        let url = self.url(&format!("commits/refs/heads/{}", encode(branch)), None);
        let mut tries = 0;
        loop {
            let (headers, token) = self.authorized(&self.sha_headers, cancel).await?;
            let call = self.call(url.clone(), &headers, cancel);
            let result = fetch_sha(
                &self.http,
                call,
                |body| Sha::parse(std::str::from_utf8(body).ok()?),
                |status, _| self.refused(status, Some(branch)),
            )
            .await;
            if !self.try_again(&result, token, &mut tries).await {
                return result;
            }
        }
    }

    async fn list(
        &self,
        _patterns: &[BranchPattern],
        cancel: &CancellationToken,
    ) -> Result<Listing, ForgeError> {
        let url = self.url("branches", Some("per_page=100"));
        let format = ListingFormat {
            sha_key: "sha",
            x_next_page: false,
        };
        let mut tries = 0;
        loop {
            let (headers, token) = self.authorized(&self.json_headers, cancel).await?;
            let call = self.call(url.clone(), &headers, cancel);
            let result = walk_listing(&self.http, call, &format, |status, _| {
                self.refused(status, None)
            })
            .await;
            if !self.try_again(&result, token, &mut tries).await {
                return result;
            }
        }
    }
}

/// `Accept`, the API version and the token (when configured) as a sensitive header.
fn headers(repo: &Repository, accept: &'static str) -> Result<HeaderMap, ForgeError> {
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
    headers.insert(
        "x-github-api-version",
        HeaderValue::from_static(API_VERSION),
    );
    if let Some(token) = &repo.monitor.auth.token {
        let value = format!("Bearer {}", token.expose_secret());
        headers.insert(header::AUTHORIZATION, secret_header(repo, &value)?);
    }
    Ok(headers)
}
