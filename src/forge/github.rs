//! GitHub and GitHub Enterprise Server over the REST API.
//!
//! - Head of a branch: `GET {api}/repos/{owner}/{repo}/commits/{branch}` with
//!   `Accept: application/vnd.github.sha`; the body is the bare 40-hex SHA.
//! - Listing (for patterns): `GET {api}/repos/{owner}/{repo}/branches?per_page=100`,
//!   following `Link: <…>; rel="next"`. GitHub has no name filter, so every branch is listed.
//!
//! Every request is conditional once an ETag is known, so an unchanged repository costs no
//! quota (GitHub does not count authenticated 304s).

use std::sync::Arc;

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use super::http::{Call, Http};
use super::{
    BranchPattern, Forge, ForgeError, ListingFormat, Sha, api_base, encode, fetch_sha, parse_url,
    secret_header, walk_listing,
};
use crate::config::Repository;

const API_VERSION: &str = "2022-11-28";
const ACCEPT_SHA: &str = "application/vnd.github.sha";
const ACCEPT_JSON: &str = "application/vnd.github+json";

#[derive(Clone)]
pub(crate) struct GitHub {
    http: Arc<Http>,
    repo: Arc<Repository>,
    /// `{api}/repos/{owner}/{repo}`, each part percent-encoded.
    repo_api: String,
    host: String,
}

impl GitHub {
    pub fn new(http: Arc<Http>, repo: Arc<Repository>) -> Result<GitHub, ForgeError> {
        let base = api_base(&repo)?;
        let path: Vec<String> = repo.monitor.project_path.split('/').map(encode).collect();
        let repo_api = format!("{base}/repos/{}", path.join("/"));
        let host = parse_url(&repo, &repo_api)?
            .host_str()
            .unwrap_or_default()
            .to_owned();
        Ok(GitHub {
            http,
            repo,
            repo_api,
            host,
        })
    }

    fn call<'a>(
        &'a self,
        url: &str,
        accept: &'static str,
        cancel: &'a CancellationToken,
    ) -> Result<Call<'a>, ForgeError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
        headers.insert(
            "x-github-api-version",
            HeaderValue::from_static(API_VERSION),
        );
        let token = self.repo.monitor.auth.token.as_ref();
        if let Some(token) = token {
            let value = format!("Bearer {}", token.expose_secret());
            headers.insert(header::AUTHORIZATION, secret_header(&self.repo, &value)?);
        }
        Ok(Call {
            repo: &self.repo.name,
            url: parse_url(&self.repo, url)?,
            headers,
            has_token: token.is_some(),
            cancel,
        })
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

impl Forge for GitHub {
    async fn head(&self, branch: &str, cancel: &CancellationToken) -> Result<Sha, ForgeError> {
        let url = format!("{}/commits/{}", self.repo_api, encode(branch));
        let call = self.call(&url, ACCEPT_SHA, cancel)?;
        fetch_sha(
            &self.http,
            call,
            |body| Sha::parse(std::str::from_utf8(body).ok()?),
            |status, _| self.refused(status, Some(branch)),
        )
        .await
    }

    async fn list(
        &self,
        _patterns: &[BranchPattern],
        cancel: &CancellationToken,
    ) -> Result<Vec<(String, Sha)>, ForgeError> {
        let url = format!("{}/branches?per_page=100", self.repo_api);
        let call = self.call(&url, ACCEPT_JSON, cancel)?;
        let format = ListingFormat {
            sha_key: "sha",
            x_next_page: false,
        };
        walk_listing(&self.http, call, &format, |status, _| {
            self.refused(status, None)
        })
        .await
    }
}
