//! The forge-kind seam: everything Sentry knows about one kind of Git host — GitHub
//! (and GitHub Enterprise), GitLab, plain Git — as plain data, one [`Kind`] per kind,
//! defined beside that kind's client (`github.rs`, `gitlab.rs`, `git.rs`).
//!
//! Configuration validation asks it for the default API URL, the project path rule and
//! the kind a URL's host implies; the QA checkout for the user name sent with a token;
//! the HTTP layer for rate-limit header names; the server for webhook identities; the
//! status reporter whether commit statuses exist and how far apart writes must be.
//! [`of`] is the one `match` on [`RepoType`] outside this module's kinds, and it has no
//! catch-all arm: adding a kind is a variant in the config's enum, a `Kind` beside its
//! client, and an arm here — the compiler finds every other place.

use crate::config::RepoType;

/// What one kind of forge is.
#[derive(Debug)]
pub struct Kind {
    pub repo_type: RepoType,
    /// As written in `repo_type:`.
    pub name: &'static str,
    /// User name sent with a token over HTTPS when `auth.username` is not set.
    pub clone_username: &'static str,
    /// How a web URL names a project; `None` for plain Git, which has no API.
    pub project: Option<ProjectRule>,
    /// The API root for a web URL at `origin` (`https://host[:port]`) on `host`.
    pub default_api: fn(host: &str, origin: &str) -> Option<String>,
    /// Whether a QA URL on this host is of this kind when `repo_type` is not given.
    pub owns_host: fn(host: &str) -> bool,
    /// Response headers with the remaining API quota and its reset time (epoch seconds).
    pub rate_limit_headers: Option<(&'static str, &'static str)>,
    /// Where a push webhook's payload names the repository.
    pub webhook: Option<WebhookIds>,
    /// The default request budget of one API host and token (`rate_limits:` overrides it
    /// per host); `None` when this kind has no HTTP API.
    pub budget: Option<super::budget::BudgetLimits>,
    /// The least time between two commit-status writes to one host; `None` when this
    /// kind has no commit statuses at all.
    pub status_spacing: Option<std::time::Duration>,
    /// The web page of commit `sha` of the repository at `repo_url` (as configured);
    /// `None` when the kind has no web UI or the URL is not a web URL.
    pub commit_url: fn(repo_url: &str, sha: &str) -> Option<String>,
}

/// `https://host/path` of a configured http(s) URL, without a trailing `.git` or `/`.
pub fn web_base(repo_url: &str) -> Option<String> {
    let url = url::Url::parse(repo_url).ok()?;
    if !matches!(url.scheme(), "https" | "http") {
        return None;
    }
    let path = url.path().trim_end_matches('/').trim_end_matches(".git");
    let host = url.host_str()?;
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    Some(format!("{}://{host}{port}{path}", url.scheme()))
}

/// The rule a project path (`owner/repo`, `group/sub/project`) must follow.
#[derive(Debug)]
pub struct ProjectRule {
    /// Exactly this many segments, or at least `min_segments` when `None`.
    pub exact_segments: Option<usize>,
    pub min_segments: usize,
    /// The message when the path breaks the rule.
    pub hint: &'static str,
}

impl ProjectRule {
    pub fn accepts(&self, project: &str) -> bool {
        let segments = project.split('/').filter(|s| !s.is_empty()).count();
        match self.exact_segments {
            Some(n) => segments == n,
            None => segments >= self.min_segments,
        }
    }
}

/// What a kind's push webhooks look like and how they prove they come from the forge.
#[derive(Debug)]
pub struct WebhookIds {
    /// The path under `/webhooks/` the endpoint is served at.
    pub endpoint: &'static str,
    /// How a request proves it knows the configured secret.
    pub proof: Proof,
    /// The header naming the event, and its values for a push and a ping (answered `pong`).
    pub event_header: &'static str,
    pub push_event: &'static str,
    pub ping_event: Option<&'static str>,
    /// The header with the delivery's unique id: a repeated id is a replay and is dropped.
    pub delivery_header: &'static str,
    /// (object, key) pairs, each naming the project by path or URL.
    pub ids: &'static [(&'static str, &'static str)],
}

/// How a webhook request proves it comes from the forge.
#[derive(Debug, Clone, Copy)]
pub enum Proof {
    /// The header carries the secret itself (GitLab's `X-Gitlab-Token`): checked before
    /// the body is read.
    Token { header: &'static str },
    /// The header carries `sha256=` and the hex HMAC-SHA256 of the body (GitHub's
    /// `X-Hub-Signature-256`): its form is checked before the body is read, its value after.
    HmacSha256 { header: &'static str },
}

impl Proof {
    pub fn header(self) -> &'static str {
        match self {
            Proof::Token { header } | Proof::HmacSha256 { header } => header,
        }
    }

    /// What can be checked from the header alone: the token itself, or that a signature
    /// has the right form. `false` refuses the request before its body is read.
    pub fn plausible(self, secret: &[u8], given: Option<&str>) -> bool {
        let Some(given) = given else { return false };
        match self {
            Proof::Token { .. } => digests_equal(secret, given.as_bytes()),
            Proof::HmacSha256 { .. } => given.starts_with("sha256=") && given.len() == 7 + 64,
        }
    }

    /// The whole check, with the body.
    pub fn verify(self, secret: &[u8], given: Option<&str>, body: &[u8]) -> bool {
        match self {
            Proof::Token { .. } => self.plausible(secret, given),
            Proof::HmacSha256 { .. } => hmac_sha256_valid(secret, body, given),
        }
    }
}

/// Compares SHA-256 digests in constant time: neither a token's content nor its length
/// shows in the time the comparison takes.
pub fn digests_equal(expected: &[u8], given: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    bool::from(Sha256::digest(expected).ct_eq(&Sha256::digest(given)))
}

/// `sha256=` + hex HMAC-SHA256 of the raw body, checked in constant time.
pub fn hmac_sha256_valid(secret: &[u8], body: &[u8], signature: Option<&str>) -> bool {
    use hmac::{Hmac, Mac};
    let Some(hex_sig) = signature.and_then(|s| s.strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(given) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// The kind of a configured `repo_type`.
pub fn of(repo_type: RepoType) -> &'static Kind {
    match repo_type {
        RepoType::Github => &super::github::KIND,
        RepoType::Gitlab => &super::gitlab::KIND,
        RepoType::Git => &super::git::KIND,
    }
}

/// The forge's web page of commit `sha` of a configured repository, when its kind has one.
pub fn commit_url(repo: &crate::config::Repository, sha: &str) -> Option<String> {
    (of(repo.monitor.repo_type).commit_url)(&repo.monitor.repo_url, sha)
}

/// Every kind, in the order `repo_type` errors list them.
pub fn all() -> [&'static Kind; 3] {
    [
        &super::github::KIND,
        &super::gitlab::KIND,
        &super::git::KIND,
    ]
}

/// The kind written `name` in `repo_type:`.
pub fn by_name(name: &str) -> Option<&'static Kind> {
    all().into_iter().find(|k| k.name == name)
}

/// The kind a URL's host implies; plain Git when no API kind claims the host.
pub fn for_host(host: &str) -> &'static Kind {
    all()
        .into_iter()
        .find(|k| (k.owns_host)(host))
        .unwrap_or(&super::git::KIND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_found_by_its_name_and_type() {
        for kind in all() {
            assert_eq!(
                by_name(kind.name).map(|k| k.repo_type),
                Some(kind.repo_type)
            );
            assert_eq!(of(kind.repo_type).name, kind.name);
        }
        assert!(by_name("bitbucket").is_none());
    }

    #[test]
    fn hosts_imply_kinds() {
        assert_eq!(for_host("github.com").repo_type, RepoType::Github);
        assert_eq!(for_host("gitlab.example.com").repo_type, RepoType::Gitlab);
        assert_eq!(for_host("git.example.com").repo_type, RepoType::Git);
    }

    #[test]
    fn default_api_urls() {
        let api = |t: RepoType, host: &str| (of(t).default_api)(host, &format!("https://{host}"));
        assert_eq!(
            api(RepoType::Github, "github.com").as_deref(),
            Some("https://api.github.com")
        );
        assert_eq!(
            api(RepoType::Github, "ghe.corp").as_deref(),
            Some("https://ghe.corp/api/v3")
        );
        assert_eq!(
            api(RepoType::Gitlab, "gitlab.com").as_deref(),
            Some("https://gitlab.com/api/v4")
        );
        assert_eq!(api(RepoType::Git, "git.corp"), None);
    }

    #[test]
    fn webhook_proofs() {
        // GitHub's documented test vector.
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let secret = b"It's a Secret to Everybody";
        let github = of(RepoType::Github).webhook.as_ref().unwrap().proof;
        assert!(github.plausible(secret, Some(sig)));
        assert!(github.verify(secret, Some(sig), b"Hello, World!"));
        assert!(!github.verify(secret, Some(sig), b"Hello, World?"));
        assert!(!github.plausible(secret, Some("sha1=abc")) && !github.plausible(secret, None));
        let gitlab = of(RepoType::Gitlab).webhook.as_ref().unwrap().proof;
        assert!(gitlab.plausible(b"tok", Some("tok")) && gitlab.verify(b"tok", Some("tok"), b""));
        assert!(!gitlab.plausible(b"tok", Some("tok2")) && !gitlab.plausible(b"tok", None));
        assert!(of(RepoType::Git).webhook.is_none());
    }

    #[test]
    fn commit_urls() {
        let sha = "a".repeat(40);
        let url = |t: RepoType, repo: &str| (of(t).commit_url)(repo, &sha);
        assert_eq!(
            url(RepoType::Github, "https://github.com/o/r.git"),
            Some(format!("https://github.com/o/r/commit/{sha}"))
        );
        assert_eq!(
            url(RepoType::Gitlab, "https://gitlab.example.com:8443/g/s/p/"),
            Some(format!(
                "https://gitlab.example.com:8443/g/s/p/-/commit/{sha}"
            ))
        );
        assert_eq!(url(RepoType::Git, "https://git.corp/r.git"), None);
        assert_eq!(url(RepoType::Github, "file:///tmp/r"), None);
    }

    #[test]
    fn project_rules() {
        let github = of(RepoType::Github).project.as_ref().unwrap();
        assert!(github.accepts("o/r") && !github.accepts("o/r/x") && !github.accepts("o"));
        let gitlab = of(RepoType::Gitlab).project.as_ref().unwrap();
        assert!(gitlab.accepts("g/p") && gitlab.accepts("g/s/p") && !gitlab.accepts("g"));
        assert!(of(RepoType::Git).project.is_none());
    }
}
