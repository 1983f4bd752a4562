//! GitLab (gitlab.com and self-hosted) over the REST API v4.
//!
//! - Head of a branch: `GET {api}/projects/{path}/repository/branches/{branch}` → `commit.id`,
//!   with the project path and the branch each percent-encoded as one segment
//!   (`grp/sub/proj` → `grp%2Fsub%2Fproj`).
//! - Listing (for patterns): `GET …/repository/branches?per_page=100`, plus `search=^prefix`
//!   when every pattern starts with a literal prefix (one listing per distinct prefix),
//!   following `Link` `rel="next"` or `x-next-page`.
//!
//! Auth is `PRIVATE-TOKEN`. ETags are used when GitLab sends them, never relied on.

use std::sync::Arc;

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use super::http::{Call, Http};
use super::kind::{Kind, ProjectRule, WebhookIds};
use super::{
    BranchPattern, Forge, ForgeError, Listing, ListingFormat, Sha, api_base, encode, fetch_sha,
    parse_url, secret_header, walk_listing,
};
use crate::config::{RepoType, Repository};

/// gitlab.com and self-hosted GitLab.
pub(crate) static KIND: Kind = Kind {
    repo_type: RepoType::Gitlab,
    name: "gitlab",
    // What GitLab expects with an OAuth token; a personal access token works with any name.
    clone_username: "oauth2",
    project: Some(ProjectRule {
        exact_segments: None,
        min_segments: 2,
        hint: "must name the group and the project, like https://gitlab.com/GROUP/PROJECT",
    }),
    default_api: |_, origin| Some(format!("{origin}/api/v4")),
    owns_host: |host| host.contains("gitlab"),
    rate_limit_headers: Some(("ratelimit-remaining", "ratelimit-reset")),
    webhook: Some(WebhookIds {
        ids: &[
            ("project", "path_with_namespace"),
            ("project", "git_http_url"),
            ("project", "web_url"),
        ],
    }),
    commit_url: |repo, sha| Some(format!("{}/-/commit/{sha}", super::kind::web_base(repo)?)),
};

#[derive(Clone)]
pub(crate) struct GitLab {
    http: Arc<Http>,
    repo: Arc<Repository>,
    /// `{api}/projects/{encoded path}/repository/branches`.
    branches_api: String,
    host: String,
    /// `Accept` and the token (when configured) as a sensitive header, built once.
    headers: Arc<HeaderMap>,
}

impl GitLab {
    pub fn new(http: Arc<Http>, repo: Arc<Repository>) -> Result<GitLab, ForgeError> {
        let base = api_base(&repo)?;
        let branches_api = format!(
            "{base}/projects/{}/repository/branches",
            encode(&repo.monitor.project_path)
        );
        let host = parse_url(&repo, &branches_api)?
            .host_str()
            .unwrap_or_default()
            .to_owned();
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(token) = &repo.monitor.auth.token {
            headers.insert(
                "private-token",
                secret_header(&repo, token.expose_secret())?,
            );
        }
        Ok(GitLab {
            http,
            repo,
            branches_api,
            host,
            headers: Arc::new(headers),
        })
    }

    /// The full SHA of the commit an abbreviated SHA names:
    /// `GET …/repository/commits/{sha}` → `id`.
    pub async fn commit(
        &self,
        prefix: &str,
        cancel: &CancellationToken,
    ) -> Result<Sha, ForgeError> {
        let commits_api = self
            .branches_api
            .replace("/repository/branches", "/repository/commits");
        let url = format!("{commits_api}/{}", encode(prefix));
        let call = self.call(&url, cancel)?;
        fetch_sha(
            &self.http,
            call,
            |body| {
                let value: serde_json::Value = serde_json::from_slice(body).ok()?;
                Sha::parse(value.get("id")?.as_str()?)
            },
            |status, body| match status {
                StatusCode::NOT_FOUND => ForgeError::NotFound(format!(
                    "{}: no single commit {prefix} in {}",
                    self.repo.name, self.repo.monitor.project_path
                )),
                other => self.refused(other, body, None),
            },
        )
        .await
    }

    fn call<'a>(
        &'a self,
        url: &str,
        cancel: &'a CancellationToken,
    ) -> Result<Call<'a>, ForgeError> {
        Ok(Call {
            repo: &self.repo.name,
            url: parse_url(&self.repo, url)?,
            headers: &self.headers,
            has_token: self.repo.monitor.auth.token.is_some(),
            cancel,
        })
    }

    /// What a status that is neither success, rate limit nor 401/403 means here.
    fn refused(&self, status: StatusCode, body: &[u8], branch: Option<&str>) -> ForgeError {
        let name = &self.repo.name;
        let path = &self.repo.monitor.project_path;
        let says_branch = String::from_utf8_lossy(body)
            .to_ascii_lowercase()
            .contains("branch not found");
        match (status, branch) {
            (StatusCode::NOT_FOUND, Some(branch)) if says_branch => {
                ForgeError::NotFound(format!("{name}: branch {branch} does not exist in {path}"))
            }
            (StatusCode::NOT_FOUND, _) => ForgeError::NotFound(format!(
                "{name}: project {path} not found on {} — renamed, private without a token, or wrong api_url",
                self.host
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

    async fn list_one(
        &self,
        prefix: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Listing, ForgeError> {
        let mut url = format!("{}?per_page=100", self.branches_api);
        if let Some(prefix) = prefix {
            url.push_str("&search=");
            url.push_str(&encode(&format!("^{prefix}")));
        }
        let call = self.call(&url, cancel)?;
        let format = ListingFormat {
            sha_key: "id",
            x_next_page: true,
        };
        walk_listing(&self.http, call, &format, |status, body| {
            self.refused(status, body, None)
        })
        .await
    }
}

impl Forge for GitLab {
    async fn head(&self, branch: &str, cancel: &CancellationToken) -> Result<Sha, ForgeError> {
        let url = format!("{}/{}", self.branches_api, encode(branch));
        let call = self.call(&url, cancel)?;
        fetch_sha(
            &self.http,
            call,
            |body| {
                let value: serde_json::Value = serde_json::from_slice(body).ok()?;
                Sha::parse(value.get("commit")?.get("id")?.as_str()?)
            },
            |status, body| self.refused(status, body, Some(branch)),
        )
        .await
    }

    async fn list(
        &self,
        patterns: &[BranchPattern],
        cancel: &CancellationToken,
    ) -> Result<Listing, ForgeError> {
        let mut pages = Vec::new();
        for prefix in search_prefixes(patterns) {
            pages.extend(self.list_one(prefix.as_deref(), cancel).await?);
        }
        Ok(pages)
    }
}

/// The listings that cover every pattern: one unfiltered listing (`None`) when any pattern
/// starts with a glob character, else one `search=^prefix` per prefix that no shorter
/// prefix already covers.
fn search_prefixes(patterns: &[BranchPattern]) -> Vec<Option<String>> {
    let mut prefixes: Vec<&str> = patterns.iter().map(|p| p.literal_prefix()).collect();
    if prefixes.iter().any(|p| p.is_empty()) {
        return vec![None];
    }
    prefixes.sort_unstable_by_key(|p| p.len());
    let mut kept: Vec<&str> = Vec::new();
    for prefix in prefixes {
        if !kept.iter().any(|k| prefix.starts_with(k)) {
            kept.push(prefix);
        }
    }
    kept.into_iter().map(|p| Some(p.to_owned())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(globs: &[&str]) -> Vec<BranchPattern> {
        globs
            .iter()
            .map(|g| BranchPattern::new(g).unwrap())
            .collect()
    }

    #[test]
    fn one_search_per_uncovered_prefix() {
        assert_eq!(
            search_prefixes(&patterns(&["release/*", "release/v*", "feat-?"])),
            [Some("feat-".to_owned()), Some("release/".to_owned())]
        );
        assert_eq!(search_prefixes(&patterns(&["release/*", "*-rc"])), [None]);
    }
}
