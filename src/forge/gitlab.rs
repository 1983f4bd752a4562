//! GitLab (gitlab.com and self-hosted) over the REST API v4.
//!
//! - Head of a branch: `GET {api}/projects/{path}/repository/branches/{branch}` → `commit.id`,
//!   with the project path and the branch each percent-encoded as one segment
//!   (`grp/sub/proj` → `grp%2Fsub%2Fproj`).
//! - Listing (for patterns): `GET …/repository/branches?per_page=100`, plus `search=^prefix`
//!   when every pattern starts with a literal prefix (one listing per distinct prefix),
//!   following `Link` `rel="next"` or `x-next-page`.
//!
//! - Commit status: `POST {api}/projects/{path}/statuses/{sha}` with `state`
//!   (`pending|success|failed|canceled`), `name`, `ref`, `description`, `target_url` →
//!   `201`; posting the state the status already has answers `400 Cannot transition status`,
//!   which here means the status is already right.
//!
//! Auth is `PRIVATE-TOKEN`. ETags are used when GitLab sends them, never relied on.

use std::sync::Arc;

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use super::http::Reply;
use super::http::{Call, Http};
use super::kind::{Kind, ProjectRule, Proof, WebhookIds};
use super::{
    BranchPattern, CommitStatus, Forge, ForgeError, Listing, ListingFormat, Posted, Sha,
    StatusState, api_base, cut, encode, fetch_sha, parse_url, secret_header, secrets_of, snippet,
    walk_listing,
};

/// GitLab keeps at most this much of a description; longer ones are cut here, readably.
const MAX_DESCRIPTION: usize = 255;
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
    budget: Some(super::budget::BudgetLimits::GITLAB),
    rate_limit_headers: Some(("ratelimit-remaining", "ratelimit-reset")),
    // GitLab documents no extra cost for writes; a short gap keeps bursts polite.
    status_spacing: Some(std::time::Duration::from_millis(100)),
    webhook: Some(WebhookIds {
        endpoint: "gitlab",
        proof: Proof::Token {
            header: "x-gitlab-token",
        },
        event_header: "x-gitlab-event",
        push_event: "Push Hook",
        ping_event: None,
        delivery_header: "x-gitlab-event-uuid",
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
    /// `{api}/projects/{encoded path}`.
    project_api: String,
    /// `{project_api}/repository/branches`.
    branches_api: String,
    host: String,
    /// `Accept` and the token (when configured) as a sensitive header, built once.
    headers: Arc<HeaderMap>,
}

impl GitLab {
    pub fn new(http: Arc<Http>, repo: Arc<Repository>) -> Result<GitLab, ForgeError> {
        let base = api_base(&repo)?;
        let project_api = format!("{base}/projects/{}", encode(&repo.monitor.project_path));
        let branches_api = format!("{project_api}/repository/branches");
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
            project_api,
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

impl GitLab {
    /// Posts one commit status (see the module header).
    pub async fn post_status(
        &self,
        status: &CommitStatus,
        cancel: &CancellationToken,
    ) -> Result<Posted, ForgeError> {
        let url = format!("{}/statuses/{}", self.project_api, status.sha);
        let mut body = serde_json::json!({
            "state": state_word(status.state),
            "name": status.context,
            "ref": status.branch,
            "description": cut(&status.description, MAX_DESCRIPTION),
        });
        if let Some(target) = &status.target_url {
            body["target_url"] = serde_json::Value::from(target.as_str());
        }
        let spacing = KIND.status_spacing.unwrap_or_default();
        let call = self.call(&url, cancel)?;
        match self
            .http
            .post(call, body.to_string().as_bytes(), spacing)
            .await?
        {
            Reply::Fresh { .. } | Reply::Cached(_) => Ok(Posted::Created),
            Reply::Refused { status: code, body } => {
                let text = String::from_utf8_lossy(&body).to_ascii_lowercase();
                if code == StatusCode::BAD_REQUEST && text.contains("cannot transition") {
                    return Ok(Posted::AlreadySet);
                }
                Err(match code {
                    StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
                        ForgeError::Rejected(format!(
                            "{}: {} refused the commit status ({code}): {}",
                            self.repo.name,
                            self.host,
                            snippet(&body, &secrets_of(&self.headers))
                        ))
                    }
                    other => self.refused(other, &body, None),
                })
            }
        }
    }
}

/// GitLab's word for a state: it has no `error`, and a superseded unit is `canceled`.
fn state_word(state: StatusState) -> &'static str {
    match state {
        StatusState::Pending => "pending",
        StatusState::Success => "success",
        StatusState::Failure | StatusState::Error => "failed",
        StatusState::Superseded => "canceled",
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
