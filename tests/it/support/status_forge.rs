//! Fake GitHub and GitLab APIs that serve one branch head and take commit statuses,
//! enforcing the rules the real ones enforce: GitHub answers 422 to a description over 140
//! characters or an unknown state; GitLab answers 400 to the state a status already has.
//! They can also drop every status POST (an outage) or answer the next one with a
//! `403` + `retry-after` (a secondary rate limit).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{FakeForge, FakeReply, FakeRequest, wait_until};

/// One accepted status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusPost {
    /// `owner/repo` or `group/project`.
    pub project: String,
    pub sha: String,
    pub state: String,
    /// GitHub `context`, GitLab `name`.
    pub context: String,
    pub description: String,
    pub target_url: Option<String>,
    /// GitLab `ref`.
    pub git_ref: Option<String>,
    /// `authorization` (GitHub) or `private-token` (GitLab) as sent.
    pub token: Option<String>,
}

#[derive(Default)]
struct Shared {
    /// Head of `main` per project.
    heads: Mutex<HashMap<String, String>>,
    posts: Mutex<Vec<StatusPost>>,
    /// (HTTP status, why) of every status POST refused by a rule.
    refused: Mutex<Vec<(u16, String)>>,
    /// Status POSTs dropped or rate limited on purpose.
    disturbed: Mutex<usize>,
    outage: AtomicBool,
    rate_limit_next: AtomicBool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    GitHub,
    GitLab,
}

pub struct StatusForge {
    pub server: FakeForge,
    shared: Arc<Shared>,
    kind: Kind,
}

impl StatusForge {
    /// A fake GitHub API: any `owner/repo`, branch `main`.
    pub fn github() -> StatusForge {
        StatusForge::start(Kind::GitHub)
    }

    /// A fake GitLab API under `/api/v4`: any `group/project`, branch `main`.
    pub fn gitlab() -> StatusForge {
        StatusForge::start(Kind::GitLab)
    }

    /// `github` or `gitlab`, as in `repo_type`.
    pub fn kind(&self) -> &'static str {
        match self.kind {
            Kind::GitHub => "github",
            Kind::GitLab => "gitlab",
        }
    }

    /// What a superseded unit shows here.
    pub fn superseded_state(&self) -> &'static str {
        match self.kind {
            Kind::GitHub => "error",
            Kind::GitLab => "canceled",
        }
    }

    /// What a failed unit shows here.
    pub fn failure_state(&self) -> &'static str {
        match self.kind {
            Kind::GitHub => "failure",
            Kind::GitLab => "failed",
        }
    }

    fn start(kind: Kind) -> StatusForge {
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        let server = FakeForge::start(move |req| match kind {
            Kind::GitHub => github(&state, req),
            Kind::GitLab => gitlab(&state, req),
        });
        StatusForge {
            server,
            shared,
            kind,
        }
    }

    /// The `api_url` to configure.
    pub fn api_url(&self) -> String {
        match self.kind {
            Kind::GitHub => self.server.uri(),
            Kind::GitLab => format!("{}/api/v4", self.server.uri()),
        }
    }

    pub fn set_head(&self, project: &str, sha: &str) {
        self.shared
            .heads
            .lock()
            .unwrap()
            .insert(project.to_owned(), sha.to_owned());
    }

    pub fn set_outage(&self, down: bool) {
        self.shared.outage.store(down, Ordering::SeqCst);
    }

    /// The next status POST gets `403` with `retry-after: 1`.
    pub fn rate_limit_next(&self) {
        self.shared.rate_limit_next.store(true, Ordering::SeqCst);
    }

    pub fn posts(&self) -> Vec<StatusPost> {
        self.shared.posts.lock().unwrap().clone()
    }

    pub fn posts_for(&self, sha: &str) -> Vec<StatusPost> {
        self.posts().into_iter().filter(|p| p.sha == sha).collect()
    }

    pub fn states_for(&self, sha: &str) -> Vec<String> {
        self.posts_for(sha).into_iter().map(|p| p.state).collect()
    }

    pub fn refused(&self) -> Vec<(u16, String)> {
        self.shared.refused.lock().unwrap().clone()
    }

    pub fn disturbed(&self) -> usize {
        *self.shared.disturbed.lock().unwrap()
    }

    /// Waits until `sha` has at least `n` accepted statuses; returns its states.
    pub fn wait_states(&self, sha: &str, n: usize, timeout: Duration) -> Vec<String> {
        wait_until(timeout, || {
            let states = self.states_for(sha);
            (states.len() >= n).then_some(states)
        })
        .unwrap_or_else(|| {
            panic!(
                "{sha} never got {n} statuses; posts {:?}, refused {:?}",
                self.posts(),
                self.refused()
            )
        })
    }
}

/// An outage drops the connection; a pending rate limit answers 403 once.
fn disturbance(state: &Shared) -> Option<FakeReply> {
    if state.outage.load(Ordering::SeqCst) {
        *state.disturbed.lock().unwrap() += 1;
        return Some(FakeReply::Drop);
    }
    if state.rate_limit_next.swap(false, Ordering::SeqCst) {
        *state.disturbed.lock().unwrap() += 1;
        let body = r#"{"message":"You have exceeded a secondary rate limit."}"#;
        return Some(
            FakeReply::status(403, "application/json", body).with_header("retry-after", "1"),
        );
    }
    None
}

fn refuse(state: &Shared, status: u16, why: &str) -> FakeReply {
    state.refused.lock().unwrap().push((status, why.to_owned()));
    FakeReply::status(
        status,
        "application/json",
        &format!(r#"{{"message":"{why}"}}"#),
    )
}

fn text(body: &serde_json::Value, key: &str) -> Option<String> {
    body.get(key)?.as_str().map(str::to_owned)
}

fn head(state: &Shared, project: &str) -> Option<String> {
    state.heads.lock().unwrap().get(project).cloned()
}

fn github(state: &Shared, req: &FakeRequest) -> FakeReply {
    let not_found = || FakeReply::status(404, "application/json", r#"{"message":"Not Found"}"#);
    // /repos/{owner}/{repo}/{commits|statuses}/{rest}
    let parts: Vec<&str> = req.target.splitn(6, '/').collect();
    let ["", "repos", owner, repo, what, rest] = parts[..] else {
        return not_found();
    };
    let project = format!("{owner}/{repo}");
    if req.method == "GET" && what == "commits" && rest == "main" {
        return match head(state, &project) {
            Some(sha) => FakeReply::status(200, "application/vnd.github.sha", &sha),
            None => not_found(),
        };
    }
    if what != "statuses" {
        return not_found();
    }
    let sha = rest;
    if req.method != "POST" {
        return FakeReply::status(405, "application/json", "{}");
    }
    if let Some(reply) = disturbance(state) {
        return reply;
    }
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
        return refuse(state, 400, "Problems parsing JSON");
    };
    let post = StatusPost {
        project,
        sha: sha.to_owned(),
        state: text(&body, "state").unwrap_or_default(),
        context: text(&body, "context").unwrap_or_else(|| "default".into()),
        description: text(&body, "description").unwrap_or_default(),
        target_url: text(&body, "target_url"),
        git_ref: None,
        token: req.header("authorization").map(str::to_owned),
    };
    if !["pending", "success", "failure", "error"].contains(&post.state.as_str()) {
        return refuse(state, 422, "Validation Failed: state");
    }
    if post.description.chars().count() > 140 {
        return refuse(
            state,
            422,
            "Validation Failed: description is too long (maximum is 140 characters)",
        );
    }
    state.posts.lock().unwrap().push(post.clone());
    FakeReply::status(
        201,
        "application/json",
        &format!(r#"{{"state":"{}"}}"#, post.state),
    )
}

fn gitlab(state: &Shared, req: &FakeRequest) -> FakeReply {
    let not_found = || FakeReply::status(404, "application/json", r#"{"message":"404 Not Found"}"#);
    // /api/v4/projects/{group%2Fproject}/{statuses/{sha}|repository/branches/main}
    let parts: Vec<&str> = req.target.splitn(6, '/').collect();
    let ["", "api", "v4", "projects", encoded, rest] = parts[..] else {
        return not_found();
    };
    let project = encoded.replace("%2F", "/");
    if req.method == "GET" && rest == "repository/branches/main" {
        return match head(state, &project) {
            Some(sha) => {
                FakeReply::json(&format!(r#"{{"name":"main","commit":{{"id":"{sha}"}}}}"#))
            }
            None => FakeReply::status(
                404,
                "application/json",
                r#"{"message":"404 Branch Not Found"}"#,
            ),
        };
    }
    let Some(sha) = rest.strip_prefix("statuses/") else {
        return not_found();
    };
    if req.method != "POST" {
        return FakeReply::status(405, "application/json", "{}");
    }
    if let Some(reply) = disturbance(state) {
        return reply;
    }
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
        return refuse(state, 400, "400 Bad request");
    };
    let post = StatusPost {
        project,
        sha: sha.to_owned(),
        state: text(&body, "state").unwrap_or_default(),
        context: text(&body, "name").unwrap_or_else(|| "default".into()),
        description: text(&body, "description").unwrap_or_default(),
        target_url: text(&body, "target_url"),
        git_ref: text(&body, "ref"),
        token: req.header("private-token").map(str::to_owned),
    };
    if !["pending", "running", "success", "failed", "canceled"].contains(&post.state.as_str()) {
        return refuse(state, 400, "state does not have a valid value");
    }
    let mut posts = state.posts.lock().unwrap();
    let last: HashMap<(String, String), String> = posts
        .iter()
        .map(|p| ((p.sha.clone(), p.context.clone()), p.state.clone()))
        .collect();
    if last.get(&(post.sha.clone(), post.context.clone())) == Some(&post.state) {
        drop(posts);
        let why = format!("Cannot transition status via :{0} from :{0}", post.state);
        return refuse(state, 400, &why);
    }
    posts.push(post.clone());
    FakeReply::status(
        201,
        "application/json",
        &format!(r#"{{"status":"{}"}}"#, post.state),
    )
}
