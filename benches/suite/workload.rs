//! The watched estate the benchmarks poll: N GitHub repositories × 2 watched branches,
//! every tenth repository watching a pattern instead, and the `sentry.yaml` that watches it.
//!
//! - An *exact* repository `bench/rNNNN` has branches `main` and `dev` and watches both:
//!   one `GET /repos/bench/rNNNN/commits/refs/heads/{branch}` each per cycle.
//! - A *pattern* repository (every tenth) has 119 `feature/NNN` branches, `main`,
//!   `release/1` and `release/2`, and watches `release/*`: its listing is two pages of
//!   `GET /repos/bench/rNNNN/branches?per_page=100`, and the two watched branches sit on
//!   page 2.

use std::fmt::Write as _;
use std::path::Path;

/// Every tenth repository watches a pattern.
pub const PATTERN_EVERY: usize = 10;
/// The pattern repositories watch.
pub const PATTERN: &str = "release/*";
/// Unwatched branches in a pattern repository, so its listing spans two pages.
const FEATURE_BRANCHES: usize = 119;
/// The token in every generated configuration; the fake GitHub counts its requests.
pub const TOKEN: &str = "bench-token-not-a-secret";

/// One repository of the estate.
#[derive(Debug, Clone)]
pub struct RepoSpec {
    /// `bench/r0001`.
    pub path: String,
    /// Every branch the fake GitHub has.
    pub branches: Vec<String>,
    /// The branches Sentry watches (exact names, or the pattern's matches).
    pub watched: Vec<String>,
    /// Watches [`PATTERN`] (one listing) instead of exact names.
    pub pattern: bool,
}

impl RepoSpec {
    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

/// `repos` repositories, `2 × repos` watched branches.
pub fn estate(repos: usize) -> Vec<RepoSpec> {
    (0..repos).map(repo).collect()
}

fn repo(index: usize) -> RepoSpec {
    let path = format!("bench/r{index:04}");
    if index % PATTERN_EVERY == PATTERN_EVERY - 1 {
        let mut branches: Vec<String> = (0..FEATURE_BRANCHES)
            .map(|i| format!("feature/{i:03}"))
            .collect();
        branches.extend(["main", "release/1", "release/2"].map(String::from));
        RepoSpec {
            path,
            branches,
            watched: vec!["release/1".into(), "release/2".into()],
            pattern: true,
        }
    } else {
        let branches = vec!["main".to_owned(), "dev".to_owned()];
        RepoSpec {
            path,
            watched: branches.clone(),
            branches,
            pattern: false,
        }
    }
}

/// Watched branches of an estate.
pub fn watched_count(repos: &[RepoSpec]) -> usize {
    repos.iter().map(|r| r.watched.len()).sum()
}

/// What the generated configuration contains besides the repositories.
pub struct ConfigOptions<'a> {
    /// `http://127.0.0.1:PORT` of the fake GitHub.
    pub api_url: &'a str,
    pub polling_interval: &'a str,
    /// Holds the state file and the work dir.
    pub dir: &'a Path,
    /// The QA repository every deployment clones (a local path).
    pub qa_repo: &'a Path,
    /// The one deploy command.
    pub command: &'a str,
    pub webhook_secret: Option<&'a str>,
    /// The HTTP server (webhooks, metrics); off unless a benchmark needs it.
    pub server: bool,
}

/// A complete `sentry.yaml` for `repos`, one group, in flow style (one line per section).
pub fn sentry_yaml(repos: &[RepoSpec], o: &ConfigOptions<'_>) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut y = String::with_capacity(400 * repos.len() + 1000);
    let _ = writeln!(y, "polling_interval: {}", o.polling_interval);
    let _ = writeln!(
        y,
        "state_file: {}",
        q(&path_text(&o.dir.join("state.json")))
    );
    let _ = writeln!(y, "work_dir: {}", q(&path_text(&o.dir.join("work"))));
    let _ = writeln!(y, "request_timeout: 30s");
    let _ = writeln!(y, "max_requests_per_host: 8");
    // These benchmarks measure REST polling with ETags (the scale benchmark measures GraphQL).
    let _ = writeln!(y, "github_lookup: rest");
    // Their fake enforces no secondary limit, and they measure CPU, memory and requests at
    // intervals far below a minute: the request budget (GitHub's 900 points a minute by
    // default) must not pace them. The scale benchmark keeps the real budget.
    if let Some(host) = o.api_url.strip_prefix("http://") {
        let _ = writeln!(
            y,
            "rate_limits: {{{}: {{rest_points_per_minute: 1000000000, graphql_points_per_minute: 1000000000}}}}",
            q(host)
        );
    }
    let _ = writeln!(y, "server: {{enabled: {}}}", o.server);
    if let Some(secret) = o.webhook_secret {
        let _ = writeln!(y, "webhooks: {{github_secret: {}}}", q(secret));
    }
    y.push_str("groups:\n  bench: {execution_strategy: parallel, max_parallel: 4, continue_on_error: true}\n");
    y.push_str("repositories:\n");
    let qa = q(&path_text(o.qa_repo));
    let command = q(o.command);
    for repo in repos {
        let branches: Vec<String> = if repo.pattern {
            vec![q(PATTERN)]
        } else {
            repo.watched.iter().map(|b| q(b)).collect()
        };
        let _ = writeln!(y, "  - name: {}", repo.name());
        y.push_str("    group: bench\n");
        let _ = writeln!(
            y,
            "    monitor: {{repo_url: \"https://github.com/{}\", repo_type: github, api_url: {}, branches: [{}], auth: {{token: {}}}}}",
            repo.path,
            q(o.api_url),
            branches.join(", "),
            q(TOKEN)
        );
        let _ = writeln!(
            y,
            "    deploy: {{qa_repo_url: {qa}, qa_repo_branch: main, commands: [{command}]}}"
        );
    }
    y
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
