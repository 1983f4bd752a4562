//! Forge clients against fake GitHub and GitLab servers (wiremock on 127.0.0.1) and real
//! local Git repositories: exact branches, paginated pattern listings, percent-encoding,
//! ETags, rate-limit pauses, retries, malformed answers, auth and not-found errors, ls-remote.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sentry::testing::{Config, Env, Repository, load_str};
use sentry::testing::{ForgeError, ForgeEvents, Forges, Observation, Sha};
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{header, method, path, query_param, query_param_is_missing};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::support::{self, git, init_repo};

const TOKEN: &str = "tok_SUPERSECRET_0123456789";
const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const SHA_C: &str = "cccccccccccccccccccccccccccccccccccccccc";
const SHA_D: &str = "dddddddddddddddddddddddddddddddddddddddd";
const SHA_E: &str = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";

// ---------------------------------------------------------------------------------------
// Helpers

struct Repo<'a> {
    repo_type: &'a str,
    repo_url: &'a str,
    api_url: Option<&'a str>,
    branches: &'a [&'a str],
    token: bool,
}

impl Repo<'_> {
    fn yaml(&self) -> String {
        let mut text = format!(
            "  - name: app\n    group: g\n    monitor:\n      repo_url: {:?}\n      repo_type: {}\n      branches: {}\n",
            self.repo_url,
            self.repo_type,
            serde_json::to_string(self.branches).unwrap()
        );
        if let Some(api) = self.api_url {
            text.push_str(&format!("      api_url: {api:?}\n"));
        }
        if self.token {
            text.push_str("      auth: {username: me, token: \"${TOKEN}\"}\n");
        }
        text.push_str(
            "    deploy: {qa_repo_url: /tmp/qa, qa_repo_branch: main, commands: [\"true\"]}\n",
        );
        text
    }
}

fn config_with(repo: &Repo<'_>, extra: &str) -> Config {
    let yaml = format!(
        "request_timeout: 5s\n{extra}groups: {{g: }}\nrepositories:\n{}",
        repo.yaml()
    );
    let loaded = load_str(&yaml, &Env::fixed([("TOKEN", TOKEN)]));
    loaded
        .config
        .unwrap_or_else(|| panic!("config invalid: {:?}\n{yaml}", loaded.diagnostics))
}

fn setup(repo: &Repo<'_>) -> (Forges, Repository) {
    setup_with(repo, "")
}

fn setup_with(repo: &Repo<'_>, extra: &str) -> (Forges, Repository) {
    let config = config_with(repo, extra);
    let forges = Forges::new(&config).unwrap();
    (forges, config.repositories[0].as_ref().clone())
}

fn github<'a>(
    server: &MockServer,
    api_path: &str,
    branches: &'a [&'a str],
) -> (Forges, Repository) {
    let api = format!("{}{api_path}", server.uri());
    setup(&Repo {
        repo_type: "github",
        repo_url: "https://github.com/octo/app",
        api_url: Some(&api),
        branches,
        token: true,
    })
}

fn gitlab<'a>(server: &MockServer, branches: &'a [&'a str]) -> (Forges, Repository) {
    let api = format!("{}/api/v4", server.uri());
    setup(&Repo {
        repo_type: "gitlab",
        repo_url: "https://gitlab.example.com/grp/sub/proj",
        api_url: Some(&api),
        branches,
        token: true,
    })
}

async fn observe(forges: &Forges, repo: &Repository) -> Observation {
    forges.observe(repo, &CancellationToken::new()).await
}

fn sha(text: &str) -> Sha {
    Sha::parse(text).unwrap()
}

fn heads(obs: &Observation) -> Vec<(&str, &str)> {
    obs.heads
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// The only failure of `obs`, for `branch` (`None`: the listing).
fn only_failure(obs: &Observation, branch: Option<&str>) -> ForgeError {
    assert_eq!(obs.failures.len(), 1, "{obs:#?}");
    assert_eq!(obs.failures[0].branch.as_deref(), branch, "{obs:#?}");
    obs.failures[0].error.clone()
}

fn assert_no_token(error: &ForgeError) {
    let text = format!("{error} {error:?}");
    assert!(!text.contains(TOKEN), "token leaked: {text}");
}

async fn received(server: &MockServer) -> Vec<Request> {
    server.received_requests().await.unwrap_or_default()
}

fn header_of<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request.headers.get(name).and_then(|v| v.to_str().ok())
}

fn github_sha(body: &str) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_string(body)
        .insert_header("content-type", "application/vnd.github.sha")
}

fn branches_json(items: &[(&str, &str)], key: &str) -> String {
    let items: Vec<serde_json::Value> = items
        .iter()
        .map(|(name, sha)| serde_json::json!({"name": name, "commit": {key: sha, "url": "x"}}))
        .collect();
    serde_json::Value::Array(items).to_string()
}

fn json(body: String) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_string(body)
        .insert_header("content-type", "application/json")
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

// ---------------------------------------------------------------------------------------
// GitHub

#[tokio::test]
async fn github_exact_branches_with_encoded_names_and_headers() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v3/repos/octo/app/commits/refs/heads/main"))
        .respond_with(github_sha(&format!("{SHA_A}\n")))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(
            "/api/v3/repos/octo/app/commits/refs/heads/release%2F1.0",
        ))
        .respond_with(github_sha(SHA_B))
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "/api/v3", &["main", "release/1.0"]);

    let obs = observe(&forges, &repo).await;
    assert!(obs.failures.is_empty(), "{obs:#?}");
    assert_eq!(heads(&obs), [("main", SHA_A), ("release/1.0", SHA_B)]);
    assert!(!obs.listing_complete, "no patterns, no listing");

    let requests = received(&server).await;
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(header_of(r, "accept"), Some("application/vnd.github.sha"));
        assert_eq!(header_of(r, "x-github-api-version"), Some("2022-11-28"));
        assert_eq!(
            header_of(r, "authorization"),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        let agent = header_of(r, "user-agent").unwrap_or_default();
        assert!(agent.starts_with("sentry/"), "{agent}");
        assert!(!r.url.as_str().contains(TOKEN));
    }
    let stats = forges.stats();
    assert_eq!(
        (stats.requests, stats.not_modified, stats.errors),
        (2, 0, 0)
    );
}

#[tokio::test]
async fn github_api_url_with_trailing_slash_joins_cleanly() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/refs/heads/main"))
        .respond_with(github_sha(SHA_A))
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "/", &["main"]);
    let obs = observe(&forges, &repo).await;
    assert_eq!(heads(&obs), [("main", SHA_A)], "{obs:#?}");
}

#[tokio::test]
async fn authorization_is_sent_only_with_a_token() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/refs/heads/main"))
        .respond_with(github_sha(SHA_A))
        .mount(&server)
        .await;
    let api = server.uri();
    let (forges, repo) = setup(&Repo {
        repo_type: "github",
        repo_url: "https://github.com/octo/app",
        api_url: Some(&api),
        branches: &["main"],
        token: false,
    });
    let obs = observe(&forges, &repo).await;
    assert_eq!(heads(&obs), [("main", SHA_A)], "{obs:#?}");
    let requests = received(&server).await;
    assert_eq!(requests.len(), 1);
    assert_eq!(header_of(&requests[0], "authorization"), None);
}

#[tokio::test]
async fn github_pattern_follows_link_next_through_three_pages() {
    let server = MockServer::start().await;
    let uri = server.uri();
    // Page links point somewhere we would never build ourselves.
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/branches"))
        .and(query_param("per_page", "100"))
        .and(query_param_is_missing("page"))
        .respond_with(
            json(branches_json(
                &[("main", SHA_A), ("release/1.0", SHA_B)],
                "sha",
            ))
            .insert_header(
                "link",
                format!(
                    "<{uri}/repositories/42/branches?per_page=100&page=2>; rel=\"next\", <{uri}/repositories/42/branches?per_page=100&page=3>; rel=\"last\""
                ),
            ),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repositories/42/branches"))
        .and(query_param("page", "2"))
        .respond_with(
            json(branches_json(
                &[("release/1.0/fix", SHA_C), ("feature/x", SHA_D)],
                "sha",
            ))
            .insert_header(
                "link",
                format!(
                    "<{uri}/repositories/42/branches?per_page=100&page=1>; rel=\"prev\", <{uri}/repositories/42/branches?per_page=100&page=3>; rel=\"next\""
                ),
            ),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repositories/42/branches"))
        .and(query_param("page", "3"))
        .respond_with(
            json(branches_json(&[("release/2.0", SHA_E)], "sha")).insert_header(
                "link",
                format!("<{uri}/repositories/42/branches?per_page=100&page=2>; rel=\"prev\""),
            ),
        )
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["release/*"]);

    let obs = observe(&forges, &repo).await;
    assert!(obs.failures.is_empty(), "{obs:#?}");
    assert!(obs.listing_complete);
    // `*` stays within one segment: release/1.0/fix is not watched; main is not watched.
    assert_eq!(
        heads(&obs),
        [("release/1.0", SHA_B), ("release/2.0", SHA_E)]
    );
    let requests = received(&server).await;
    assert_eq!(requests.len(), 3, "one listing, three pages");
    for r in &requests {
        assert_eq!(header_of(r, "accept"), Some("application/vnd.github+json"));
    }
}

#[tokio::test]
async fn github_etag_round_trip() {
    let server = MockServer::start().await;
    let branch_path = "/repos/octo/app/commits/refs/heads/release%2F1.0";
    Mock::given(method("GET"))
        .and(path(branch_path))
        .respond_with(github_sha(SHA_A).insert_header("etag", "W/\"v1\""))
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["release/1.0"]);

    let first = observe(&forges, &repo).await;
    assert_eq!(heads(&first), [("release/1.0", SHA_A)]);
    assert_eq!(
        header_of(&received(&server).await[0], "if-none-match"),
        None
    );

    // Second check: conditional, with the tag exactly as received; 304 → unchanged.
    server.reset().await;
    Mock::given(method("GET"))
        .and(path(branch_path))
        .and(header("if-none-match", "W/\"v1\""))
        .respond_with(ResponseTemplate::new(304))
        .mount(&server)
        .await;
    let second = observe(&forges, &repo).await;
    assert!(second.failures.is_empty(), "{second:#?}");
    assert_eq!(heads(&second), [("release/1.0", SHA_A)]);
    let requests = received(&server).await;
    assert_eq!(requests.len(), 1);
    assert_eq!(header_of(&requests[0], "if-none-match"), Some("W/\"v1\""));
    let stats = forges.stats();
    assert_eq!((stats.requests, stats.not_modified), (2, 1));

    // Third check: the branch moved; the new SHA (and its tag) replace the old ones.
    server.reset().await;
    Mock::given(method("GET"))
        .and(path(branch_path))
        .respond_with(github_sha(SHA_B).insert_header("etag", "\"v2\""))
        .mount(&server)
        .await;
    let third = observe(&forges, &repo).await;
    assert_eq!(heads(&third), [("release/1.0", SHA_B)]);
    assert_eq!(
        header_of(&received(&server).await[0], "if-none-match"),
        Some("W/\"v1\"")
    );
    server.reset().await;
    Mock::given(method("GET"))
        .and(path(branch_path))
        .and(header("if-none-match", "\"v2\""))
        .respond_with(ResponseTemplate::new(304))
        .mount(&server)
        .await;
    let fourth = observe(&forges, &repo).await;
    assert_eq!(heads(&fourth), [("release/1.0", SHA_B)], "{fourth:#?}");
    assert_eq!(forges.stats().not_modified, 2);
}

#[tokio::test]
async fn unchanged_listing_costs_only_304s_and_follows_cached_links() {
    let server = MockServer::start().await;
    let uri = server.uri();
    let page = |n: u32| format!("{uri}/repos/octo/app/branches?per_page=100&page={n}");
    let pages = [
        (None, vec![("release/1", SHA_A)], Some(page(2))),
        (Some("2"), vec![("release/2", SHA_B)], Some(page(3))),
        (Some("3"), vec![("release/3", SHA_C)], None),
    ];
    for (i, (number, items, next)) in pages.iter().enumerate() {
        let mut response =
            json(branches_json(items, "sha")).insert_header("etag", format!("\"page{i}\""));
        if let Some(next) = next {
            response = response.insert_header("link", format!("<{next}>; rel=\"next\""));
        }
        let mock = Mock::given(method("GET")).and(path("/repos/octo/app/branches"));
        let mock = match number {
            Some(n) => mock.and(query_param("page", *n)),
            None => mock.and(query_param_is_missing("page")),
        };
        mock.respond_with(response).mount(&server).await;
    }
    let (forges, repo) = github(&server, "", &["release/*"]);
    // Pacing's estimate: one listing page before the first listing, then as many as it had.
    let watcher = forges.watcher(&Arc::new(repo.clone()));
    assert_eq!(watcher.expected_requests(), 1);
    let first = watcher.observe(&CancellationToken::new()).await;
    assert_eq!(watcher.expected_requests(), 3);
    assert_eq!(
        heads(&first),
        [
            ("release/1", SHA_A),
            ("release/2", SHA_B),
            ("release/3", SHA_C)
        ]
    );

    // Steady state: every page answers 304 without a Link header.
    server.reset().await;
    for i in 0..3 {
        Mock::given(method("GET"))
            .and(path("/repos/octo/app/branches"))
            .and(header("if-none-match", format!("\"page{i}\"").as_str()))
            .respond_with(ResponseTemplate::new(304))
            .mount(&server)
            .await;
    }
    let before = forges.stats();
    let second = observe(&forges, &repo).await;
    assert!(second.failures.is_empty(), "{second:#?}");
    assert!(second.listing_complete);
    assert_eq!(heads(&second), heads(&first));
    let after = forges.stats();
    assert_eq!(after.requests - before.requests, 3);
    assert_eq!(after.not_modified - before.not_modified, 3, "all 304");
    let requests = received(&server).await;
    let queries: Vec<Option<&str>> = requests.iter().map(|r| r.url.query()).collect();
    assert_eq!(
        queries,
        [
            Some("per_page=100"),
            Some("per_page=100&page=2"),
            Some("per_page=100&page=3")
        ]
    );
}

// ---------------------------------------------------------------------------------------
// GitLab

#[tokio::test]
async fn gitlab_exact_branch_with_nested_group_and_encoded_branch() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(
            "/api/v4/projects/grp%2Fsub%2Fproj/repository/branches/release%2F1.0",
        ))
        .respond_with(json(
            serde_json::json!({"name": "release/1.0", "commit": {"id": SHA_B, "short_id": "bbbbbbbb"}})
                .to_string(),
        ))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(
            "/api/v4/projects/grp%2Fsub%2Fproj/repository/branches/main",
        ))
        .respond_with(json(
            serde_json::json!({"name": "main", "commit": {"id": SHA_A}}).to_string(),
        ))
        .mount(&server)
        .await;
    let (forges, repo) = gitlab(&server, &["main", "release/1.0"]);
    let obs = observe(&forges, &repo).await;
    assert!(obs.failures.is_empty(), "{obs:#?}");
    assert_eq!(heads(&obs), [("main", SHA_A), ("release/1.0", SHA_B)]);
    for r in &received(&server).await {
        assert_eq!(header_of(r, "private-token"), Some(TOKEN));
        assert_eq!(header_of(r, "authorization"), None);
    }
    assert_eq!(forges.branch_head(&repo, "main").await.unwrap(), sha(SHA_A));
}

#[tokio::test]
async fn gitlab_pattern_uses_search_prefix_and_x_next_page() {
    let server = MockServer::start().await;
    let listing = "/api/v4/projects/grp%2Fsub%2Fproj/repository/branches";
    let pages = [
        (
            None,
            vec![("release/1.0", SHA_A), ("release-notes", SHA_D)],
            "2",
        ),
        (Some("2"), vec![("release/1.1", SHA_B)], "3"),
        (
            Some("3"),
            vec![("release/2.0", SHA_C), ("release/2.0/x", SHA_E)],
            "",
        ),
    ];
    for (number, items, next) in pages {
        let mock = Mock::given(method("GET"))
            .and(path(listing))
            .and(query_param("per_page", "100"))
            .and(query_param("search", "^release/"));
        let mock = match number {
            Some(n) => mock.and(query_param("page", n)),
            None => mock.and(query_param_is_missing("page")),
        };
        mock.respond_with(json(branches_json(&items, "id")).insert_header("x-next-page", next))
            .mount(&server)
            .await;
    }
    let (forges, repo) = gitlab(&server, &["release/*"]);
    let obs = observe(&forges, &repo).await;
    assert!(obs.failures.is_empty(), "{obs:#?}");
    assert!(obs.listing_complete);
    assert_eq!(
        heads(&obs),
        [
            ("release/1.0", SHA_A),
            ("release/1.1", SHA_B),
            ("release/2.0", SHA_C)
        ]
    );
    assert_eq!(received(&server).await.len(), 3);
}

#[tokio::test]
async fn gitlab_missing_branch_and_missing_project_are_not_found() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(
            "/api/v4/projects/grp%2Fsub%2Fproj/repository/branches/gone",
        ))
        .respond_with(
            ResponseTemplate::new(404).set_body_string(r#"{"message":"404 Branch Not Found"}"#),
        )
        .mount(&server)
        .await;
    let (forges, repo) = gitlab(&server, &["gone"]);
    let error = only_failure(&observe(&forges, &repo).await, Some("gone"));
    assert!(matches!(error, ForgeError::NotFound(_)), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("app") && text.contains("branch gone does not exist"),
        "{text}"
    );

    server.reset().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(404).set_body_string(r#"{"message":"404 Project Not Found"}"#),
        )
        .mount(&server)
        .await;
    let error = only_failure(&observe(&forges, &repo).await, Some("gone"));
    let text = error.to_string();
    assert!(matches!(error, ForgeError::NotFound(_)), "{error:?}");
    assert!(text.contains("grp/sub/proj not found"), "{text}");
}

// ---------------------------------------------------------------------------------------
// Rate limits

/// Issue #20: a `200` that reports the primary quota spent pauses the host until the
/// reset, so the next request is not one GitHub answers 403.
#[tokio::test]
async fn a_success_that_spends_the_quota_pauses_before_any_403() {
    let server = MockServer::start().await;
    let reset = epoch_secs(SystemTime::now()) + 3600;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/refs/heads/main"))
        .respond_with(
            github_sha(SHA_A)
                .insert_header("x-ratelimit-remaining", "0")
                .insert_header("x-ratelimit-reset", reset.to_string().as_str()),
        )
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["main"]);
    let first = observe(&forges, &repo).await;
    assert_eq!(heads(&first), [("main", SHA_A)]);
    let second = observe(&forges, &repo).await;
    match only_failure(&second, Some("main")) {
        ForgeError::RateLimited { until, .. } => assert_eq!(epoch_secs(until), reset),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        received(&server).await.len(),
        1,
        "no request once the quota is spent"
    );
}

#[tokio::test]
async fn remaining_zero_pauses_the_host_until_reset() {
    let server = MockServer::start().await;
    let reset = epoch_secs(SystemTime::now()) + 2;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/refs/heads/main"))
        .respond_with(
            ResponseTemplate::new(403)
                .insert_header("x-ratelimit-remaining", "0")
                .insert_header("x-ratelimit-reset", reset.to_string().as_str())
                .set_body_string(r#"{"message":"API rate limit exceeded for user"}"#),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/refs/heads/main"))
        .respond_with(github_sha(SHA_A).insert_header("x-ratelimit-remaining", "4999"))
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["main"]);

    let first = observe(&forges, &repo).await;
    let until = match only_failure(&first, Some("main")) {
        ForgeError::RateLimited { until, .. } => until,
        other => panic!("{other:?}"),
    };
    assert_eq!(epoch_secs(until), reset);
    let host = server.address().to_string();
    let info = forges.stats().rate_limits.get(&host).cloned().unwrap();
    assert_eq!(info.remaining, Some(0));
    assert_eq!(info.paused_until, Some(until));

    // While paused: an immediate answer, and nothing reaches the server.
    let second = observe(&forges, &repo).await;
    assert!(matches!(
        only_failure(&second, Some("main")),
        ForgeError::RateLimited { .. }
    ));
    assert!(forges.branch_head(&repo, "main").await.is_err());
    assert_eq!(received(&server).await.len(), 1, "no request while paused");

    // After the reset, requests flow again.
    let wait =
        until.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(100);
    tokio::time::sleep(wait).await;
    let third = observe(&forges, &repo).await;
    assert_eq!(heads(&third), [("main", SHA_A)], "{third:#?}");
    assert_eq!(received(&server).await.len(), 2);
    let info = forges.stats().rate_limits.get(&host).cloned().unwrap();
    assert_eq!((info.remaining, info.paused_until), (Some(4999), None));
}

#[tokio::test]
async fn too_many_requests_with_retry_after_pauses_the_host() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(json(
            serde_json::json!({"name": "main", "commit": {"id": SHA_A}}).to_string(),
        ))
        .mount(&server)
        .await;
    // Two branches on one host: after the 429 the other one is not sent either.
    let config = config_with(
        &Repo {
            repo_type: "gitlab",
            repo_url: "https://gitlab.example.com/grp/proj",
            api_url: Some(&format!("{}/api/v4", server.uri())),
            branches: &["main"],
            token: true,
        },
        "max_requests_per_host: 1\n",
    );
    let forges = Forges::new(&config).unwrap();
    let repo = &config.repositories[0];
    let started = SystemTime::now();
    let first = observe(&forges, repo).await;
    let until = match only_failure(&first, Some("main")) {
        ForgeError::RateLimited { until, .. } => until,
        other => panic!("{other:?}"),
    };
    assert!(until >= started + Duration::from_secs(1), "{until:?}");
    let second = observe(&forges, repo).await;
    assert!(matches!(
        only_failure(&second, Some("main")),
        ForgeError::RateLimited { .. }
    ));
    assert_eq!(received(&server).await.len(), 1);

    let wait =
        until.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(100);
    tokio::time::sleep(wait).await;
    let third = observe(&forges, repo).await;
    assert_eq!(heads(&third), [("main", SHA_A)], "{third:#?}");
}

#[tokio::test]
async fn secondary_rate_limit_without_headers_pauses_at_least_a_minute() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(403).set_body_string(
            r#"{"message":"You have exceeded a secondary rate limit. Please wait a few minutes."}"#,
        ))
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["main"]);
    let recorder = Arc::new(Recorder::default());
    let forges = forges.with_events(recorder.clone());
    let now = SystemTime::now();
    match only_failure(&observe(&forges, &repo).await, Some("main")) {
        ForgeError::RateLimited { until, .. } => {
            assert!(until >= now + Duration::from_secs(59), "{until:?}")
        }
        other => panic!("{other:?}"),
    }
    observe(&forges, &repo).await;
    assert_eq!(received(&server).await.len(), 1);
    // Counted once (the metric `sentry_secondary_rate_limited_total`): the paused check
    // sent nothing.
    assert_eq!(
        *recorder.throttled.lock().unwrap(),
        [server.address().to_string()]
    );
}

#[tokio::test]
async fn forbidden_without_rate_limit_is_an_auth_error() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(403)
                .insert_header("x-ratelimit-remaining", "4000")
                .set_body_string(
                    r#"{"message":"Resource not accessible by personal access token"}"#,
                ),
        )
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["main"]);
    let error = only_failure(&observe(&forges, &repo).await, Some("main"));
    assert!(matches!(error, ForgeError::Auth(_)), "{error:?}");
    assert!(error.to_string().contains("app"), "{error}");
    assert!(error.to_string().contains("lacks permission"), "{error}");
    assert_no_token(&error);
    // Not a pause: the next check asks again.
    observe(&forges, &repo).await;
    assert_eq!(received(&server).await.len(), 2);
}

// ---------------------------------------------------------------------------------------
// Retries, malformed answers, auth and not found

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(502))
        .up_to_n_times(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(github_sha(SHA_A))
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["main"]);
    let obs = observe(&forges, &repo).await;
    assert!(obs.failures.is_empty(), "{obs:#?}");
    assert_eq!(heads(&obs), [("main", SHA_A)]);
    assert_eq!(received(&server).await.len(), 3);
    let stats = forges.stats();
    assert_eq!((stats.requests, stats.errors), (3, 2));
}

#[tokio::test]
async fn persistent_server_errors_become_transient_after_three_tries() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["main"]);
    let error = only_failure(&observe(&forges, &repo).await, Some("main"));
    assert!(matches!(error, ForgeError::Transient(_)), "{error:?}");
    assert!(error.to_string().contains("503"), "{error}");
    assert_eq!(received(&server).await.len(), 3);
}

#[tokio::test]
async fn connection_refused_is_transient() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = format!("http://127.0.0.1:{port}");
    let (forges, repo) = setup(&Repo {
        repo_type: "github",
        repo_url: "https://github.com/octo/app",
        api_url: Some(&api),
        branches: &["main"],
        token: true,
    });
    let error = only_failure(&observe(&forges, &repo).await, Some("main"));
    assert!(matches!(error, ForgeError::Transient(_)), "{error:?}");
    assert_no_token(&error);
    assert_eq!(forges.stats().errors, 3);
}

#[tokio::test]
async fn malformed_bodies_are_errors_not_heads() {
    for body in [
        "not a sha",
        "<html><body>Sign in</body></html>",
        &SHA_A[..39],
        &format!("{SHA_A}0"),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(github_sha(body))
            .mount(&server)
            .await;
        let (forges, repo) = github(&server, "", &["main"]);
        let obs = observe(&forges, &repo).await;
        assert!(obs.heads.is_empty(), "{body:?}: {obs:#?}");
        let error = only_failure(&obs, Some("main"));
        assert!(
            matches!(error, ForgeError::Malformed(_)),
            "{body:?}: {error:?}"
        );
        assert!(error.to_string().contains("app"), "{error}");
    }
}

#[tokio::test]
async fn malformed_listing_fails_the_listing_only() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/refs/heads/main"))
        .respond_with(github_sha(SHA_A))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/branches"))
        .respond_with(json(
            r#"[{"name":"release/1","commit":{"sha":"zzz"}}]"#.to_owned(),
        ))
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["main", "release/*"]);
    let obs = observe(&forges, &repo).await;
    assert_eq!(heads(&obs), [("main", SHA_A)]);
    assert!(!obs.listing_complete);
    let error = only_failure(&obs, None);
    assert!(matches!(error, ForgeError::Malformed(_)), "{error:?}");

    // Not JSON at all.
    server.reset().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>oops</html>"))
        .mount(&server)
        .await;
    let obs = observe(&forges, &repo).await;
    assert!(obs.heads.is_empty(), "{obs:#?}");
    assert!(!obs.listing_complete);
    assert_eq!(obs.failures.len(), 2);
    assert!(
        obs.failures
            .iter()
            .all(|f| matches!(f.error, ForgeError::Malformed(_)))
    );
}

#[tokio::test]
async fn unauthorized_names_the_repository_and_hides_the_token() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(401).set_body_string(r#"{"message":"Bad credentials"}"#),
        )
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["main"]);
    let error = only_failure(&observe(&forges, &repo).await, Some("main"));
    assert!(matches!(error, ForgeError::Auth(_)), "{error:?}");
    let text = error.to_string();
    assert!(
        text.starts_with("app:") && text.contains("bad or expired token"),
        "{text}"
    );
    assert_no_token(&error);
    assert!(error.backs_off_repository());
    assert_eq!(received(&server).await.len(), 1, "401 is not retried");
}

#[tokio::test]
async fn github_not_found_repository_and_branch() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/refs/heads/gone"))
        .respond_with(
            ResponseTemplate::new(422)
                .set_body_string(r#"{"message":"No commit found for SHA: gone"}"#),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/refs/heads/main"))
        .respond_with(ResponseTemplate::new(404).set_body_string(r#"{"message":"Not Found"}"#))
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["gone"]);
    let error = only_failure(&observe(&forges, &repo).await, Some("gone"));
    assert!(matches!(error, ForgeError::NotFound(_)), "{error:?}");
    assert!(
        error.to_string().contains("branch gone does not exist"),
        "{error}"
    );

    let error = forges.branch_head(&repo, "main").await.unwrap_err();
    assert!(matches!(error, ForgeError::NotFound(_)), "{error:?}");
    let text = error.to_string();
    assert!(
        text.starts_with("app:") && text.contains("repository octo/app not found"),
        "{text}"
    );
    assert_no_token(&error);
}

// ---------------------------------------------------------------------------------------
// Concurrency, cancellation, events

#[tokio::test]
async fn requests_per_host_are_bounded() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(github_sha(SHA_A).set_delay(Duration::from_millis(300)))
        .mount(&server)
        .await;
    let api = server.uri();
    let (forges, repo) = setup_with(
        &Repo {
            repo_type: "github",
            repo_url: "https://github.com/octo/app",
            api_url: Some(&api),
            branches: &["b1", "b2", "b3", "b4", "b5", "b6"],
            token: true,
        },
        "max_requests_per_host: 2\n",
    );
    let started = Instant::now();
    let obs = observe(&forges, &repo).await;
    assert_eq!(obs.heads.len(), 6, "{obs:#?}");
    // Six requests, two at a time, 300 ms each: at least three rounds.
    assert!(
        started.elapsed() >= Duration::from_millis(880),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn cancel_returns_promptly_with_transient_failures() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(github_sha(SHA_A).set_delay(Duration::from_secs(20)))
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["main", "release/*"]);
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let obs = forges.observe(&repo, &cancel).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(obs.heads.is_empty());
    assert!(!obs.listing_complete);
    assert_eq!(obs.failures.len(), 2, "{obs:#?}");
    assert!(
        obs.failures
            .iter()
            .all(|f| matches!(f.error, ForgeError::Transient(_)))
    );
}

#[derive(Default)]
struct Recorder {
    requests: Mutex<Vec<(String, String)>>,
    limits: Mutex<Vec<(String, Option<u64>)>>,
    throttled: Mutex<Vec<String>>,
}

impl ForgeEvents for Recorder {
    fn request(&self, host: &str, status: &str) {
        self.requests
            .lock()
            .unwrap()
            .push((host.to_owned(), status.to_owned()));
    }
    fn rate_limit(&self, host: &str, remaining: Option<u64>, _reset: Option<SystemTime>) {
        self.limits
            .lock()
            .unwrap()
            .push((host.to_owned(), remaining));
    }
    fn rate_limited(&self, host: &str) {
        self.throttled.lock().unwrap().push(host.to_owned());
    }
}

#[tokio::test]
async fn events_hook_sees_requests_and_rate_limits() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/refs/heads/main"))
        .respond_with(github_sha(SHA_A).insert_header("x-ratelimit-remaining", "17"))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/refs/heads/gone"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["main", "gone"]);
    let recorder = Arc::new(Recorder::default());
    let forges = forges.with_events(recorder.clone());
    observe(&forges, &repo).await;
    let host = server.address().to_string();
    let mut requests = recorder.requests.lock().unwrap().clone();
    requests.sort();
    assert_eq!(
        requests,
        [
            (host.clone(), "200".to_owned()),
            (host.clone(), "404".to_owned())
        ]
    );
    assert_eq!(*recorder.limits.lock().unwrap(), [(host, Some(17))]);
}

// ---------------------------------------------------------------------------------------
// repo_type: git (ls-remote through libgit2)

/// A repository with branches main, release/1.0, release/2.0, release/x/y and feature/x,
/// and a tag `release/tag` (tags must not count as branches).
fn local_repo(dir: &std::path::Path) -> (std::path::PathBuf, Vec<(String, String)>) {
    let repo = init_repo(&dir.join("src"));
    let mut heads = vec![("main".to_owned(), git(&repo, &["rev-parse", "HEAD"]))];
    for branch in ["release/1.0", "release/2.0", "release/x/y", "feature/x"] {
        git(&repo, &["checkout", "-q", "-b", branch, "main"]);
        let sha = support::commit(&repo, branch);
        heads.push((branch.to_owned(), sha));
    }
    git(&repo, &["tag", "release/tag"]);
    git(&repo, &["checkout", "-q", "main"]);
    (repo, heads)
}

fn git_repo(url: &str, branches: &[&str]) -> (Forges, Repository) {
    setup(&Repo {
        repo_type: "git",
        repo_url: url,
        api_url: None,
        branches,
        token: false,
    })
}

#[tokio::test]
async fn git_ls_remote_on_a_local_path_and_file_url() {
    let dir = support::tempdir();
    let (path, expected) = local_repo(dir.path());
    let head = |name: &str| expected.iter().find(|(n, _)| n == name).unwrap().1.clone();

    for url in [
        path.display().to_string(),
        format!("file://{}", path.display()),
    ] {
        let (forges, repo) = git_repo(&url, &["main", "release/*"]);
        let obs = observe(&forges, &repo).await;
        assert!(obs.failures.is_empty(), "{url}: {obs:#?}");
        assert!(obs.listing_complete);
        let want = [
            ("main".to_owned(), head("main")),
            ("release/1.0".to_owned(), head("release/1.0")),
            ("release/2.0".to_owned(), head("release/2.0")),
        ];
        let got: Vec<(String, String)> = obs
            .heads
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        assert_eq!(got, want, "{url}");
        assert_eq!(
            forges.branch_head(&repo, "feature/x").await.unwrap(),
            sha(&head("feature/x"))
        );
    }

    // A branch moves: the next observation sees it.
    git(&path, &["checkout", "-q", "release/2.0"]);
    let moved = support::commit(&path, "moved");
    let (forges, repo) = git_repo(&path.display().to_string(), &["release/*"]);
    let obs = observe(&forges, &repo).await;
    assert_eq!(obs.heads.get("release/2.0"), Some(&sha(&moved)));
}

#[tokio::test]
async fn git_missing_branch_and_missing_repository_are_not_found() {
    let dir = support::tempdir();
    let (path, _) = local_repo(dir.path());
    let (forges, repo) = git_repo(&path.display().to_string(), &["main", "nope"]);
    let obs = observe(&forges, &repo).await;
    assert!(obs.heads.contains_key("main"));
    let error = only_failure(&obs, Some("nope"));
    assert!(matches!(error, ForgeError::NotFound(_)), "{error:?}");
    assert!(
        error.to_string().contains("branch nope does not exist"),
        "{error}"
    );

    let missing = dir.path().join("no-such-repo");
    let (forges, repo) = git_repo(&missing.display().to_string(), &["main"]);
    let error = only_failure(&observe(&forges, &repo).await, Some("main"));
    assert!(matches!(error, ForgeError::NotFound(_)), "{error:?}");
    assert!(error.to_string().starts_with("app:"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn git_ls_remote_over_http_with_credentials() {
    let dir = support::tempdir();
    let (_path, expected) = local_repo(dir.path());
    let server = support::git_http::GitHttpServer::start(dir.path(), Some(("me", TOKEN)))
        .await
        .unwrap();
    let url = server.url("src");
    let (forges, repo) = setup(&Repo {
        repo_type: "git",
        repo_url: &url,
        api_url: None,
        branches: &["main"],
        token: true,
    });
    let obs = observe(&forges, &repo).await;
    assert!(obs.failures.is_empty(), "{obs:#?}");
    assert_eq!(obs.heads.get("main"), Some(&sha(&expected[0].1)));

    // A wrong token: one rejected attempt, then a clear Auth error (no endless retry).
    let config = load_str(
        &format!(
            "groups: {{g: }}\nrepositories:\n  - name: app\n    group: g\n    monitor: {{repo_url: {url:?}, repo_type: git, branches: [main], auth: {{username: me, token: wrong-token}}}}\n    deploy: {{qa_repo_url: /tmp/qa, qa_repo_branch: main, commands: [\"true\"]}}\n"
        ),
        &Env::fixed([("X", "y")]),
    )
    .config
    .unwrap();
    let forges = Forges::new(&config).unwrap();
    let started = Instant::now();
    let error = only_failure(
        &observe(&forges, &config.repositories[0]).await,
        Some("main"),
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(error, ForgeError::Auth(_)), "{error:?}");
    assert!(!error.to_string().contains("wrong-token"), "{error}");

    // No token at all: the server's 401 becomes an Auth error that says what to set.
    let (forges, repo) = git_repo(&url, &["main"]);
    let error = only_failure(&observe(&forges, &repo).await, Some("main"));
    assert!(matches!(error, ForgeError::Auth(_)), "{error:?}");
}

#[tokio::test]
async fn abbreviated_shas_resolve_through_github_and_gitlab() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/abc1234"))
        .and(header("accept", "application/vnd.github.sha"))
        .respond_with(ResponseTemplate::new(200).set_body_string(SHA_A))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/octo/app/commits/0000000"))
        .respond_with(
            ResponseTemplate::new(422).set_body_string("{\"message\":\"No commit found\"}"),
        )
        .mount(&server)
        .await;
    let (forges, repo) = github(&server, "", &["main"]);
    assert_eq!(
        forges.resolve_commit(&repo, "ABC1234").await.unwrap(),
        sha(SHA_A)
    );
    let err = forges.resolve_commit(&repo, "0000000").await.unwrap_err();
    assert!(matches!(err, ForgeError::NotFound(_)), "{err:?}");
    assert!(
        err.to_string().contains("no single commit 0000000"),
        "{err}"
    );

    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(
            "/api/v4/projects/grp%2Fsub%2Fproj/repository/commits/def5678",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"id": SHA_B})))
        .mount(&server)
        .await;
    let (forges, repo) = gitlab(&server, &["main"]);
    assert_eq!(
        forges.resolve_commit(&repo, "def5678").await.unwrap(),
        sha(SHA_B)
    );
    let err = forges.resolve_commit(&repo, "9999999").await.unwrap_err();
    assert!(matches!(err, ForgeError::NotFound(_)), "{err:?}");
}
