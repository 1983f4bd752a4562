//! A fake GitHub API serving both REST and GraphQL from one model, on a [`FakeForge`]:
//!
//! - `GET /repos/{o}/{r}/commits/refs/heads/{branch}`: the bare SHA, ETag `"<sha>"`, `304`
//!   on a matching `If-None-Match`; `422` for a missing branch, `404` for a missing
//!   repository, `403` for a forbidden one.
//! - `GET /repos/{o}/{r}/branches?per_page=100[&page=N]`: branches by name with
//!   `Link: <…>; rel="next"` while more follow.
//! - `POST /graphql`: evaluated by [`super::graphql_eval`] (aliases, variables, `ref`,
//!   paginated `refs`, `NOT_FOUND`/`FORBIDDEN` in `errors[].path`).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::graphql_eval::{Access, evaluate};
use super::{FakeForge, FakeReply, FakeRequest};

/// How a repository looks to the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    Visible,
    Forbidden,
}

#[derive(Default)]
pub struct Model {
    /// `owner/name` → (visibility, branch → SHA). A repository not here is not found.
    pub repos: BTreeMap<String, (Visibility, BTreeMap<String, String>)>,
    /// GraphQL queries answered, and the points they cost by GitHub's formula.
    pub graphql_queries: u64,
    pub graphql_points: u64,
    /// Answer `404` to `/graphql`, as a server without a GraphQL API does.
    pub no_graphql: bool,
}

pub struct FakeGitHubApi {
    pub forge: FakeForge,
    pub model: Arc<Mutex<Model>>,
}

impl FakeGitHubApi {
    pub fn start(model: Model) -> FakeGitHubApi {
        let model = Arc::new(Mutex::new(model));
        let shared = model.clone();
        let forge = FakeForge::start(move |request| answer(&shared, request));
        FakeGitHubApi { forge, model }
    }

    pub fn uri(&self) -> String {
        self.forge.uri()
    }

    /// Sets `branch` of `repo` to `sha` (creating it).
    pub fn set(&self, repo: &str, branch: &str, sha: &str) {
        let mut model = self.model.lock().unwrap();
        let entry = model.repos.get_mut(repo).expect("repository in the model");
        entry.1.insert(branch.to_owned(), sha.to_owned());
    }

    /// Requests so far: (REST GETs, GraphQL POSTs).
    pub fn counts(&self) -> (usize, usize) {
        let requests = self.forge.requests();
        let graphql = requests.iter().filter(|r| r.target == "/graphql").count();
        (requests.len() - graphql, graphql)
    }
}

fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

fn answer(model: &Mutex<Model>, request: &FakeRequest) -> FakeReply {
    let mut model = model.lock().unwrap();
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((request.target.as_str(), ""));
    if request.method == "POST" && path == "/graphql" {
        if model.no_graphql {
            return FakeReply::status(404, "application/json", r#"{"message":"Not Found"}"#);
        }
        if request.header("authorization").is_none() {
            return FakeReply::status(
                401,
                "application/json",
                r#"{"message":"Requires authentication"}"#,
            );
        }
        let doc: serde_json::Value = match serde_json::from_slice(&request.body) {
            Ok(d) => d,
            Err(_) => {
                return FakeReply::status(
                    400,
                    "application/json",
                    r#"{"message":"Problems parsing JSON"}"#,
                );
            }
        };
        let text = doc["query"].as_str().unwrap_or_default().to_owned();
        let repos = &model.repos;
        let lookup = |owner: &str, name: &str| match repos.get(&format!("{owner}/{name}")) {
            None => Access::NotFound,
            Some((Visibility::Forbidden, _)) => Access::Forbidden,
            Some((Visibility::Visible, branches)) => Access::Found(branches),
        };
        return match evaluate(&text, &doc["variables"], &lookup) {
            Ok(done) => {
                let body = done.body.to_string();
                model.graphql_queries += 1;
                model.graphql_points += done.cost;
                FakeReply::json(&body)
            }
            Err(e) => FakeReply::json(&serde_json::json!({"errors": [{"message": e}]}).to_string()),
        };
    }
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(4, '/').collect();
    let ["repos", owner, name, rest] = parts[..] else {
        return FakeReply::status(404, "application/json", r#"{"message":"Not Found"}"#);
    };
    let Some((visibility, branches)) = model.repos.get(&format!("{owner}/{name}")) else {
        return FakeReply::status(404, "application/json", r#"{"message":"Not Found"}"#);
    };
    if *visibility == Visibility::Forbidden {
        return FakeReply::status(
            403,
            "application/json",
            r#"{"message":"Resource not accessible by integration"}"#,
        );
    }
    if let Some(branch) = rest.strip_prefix("commits/refs/heads/") {
        let Some(sha) = branches.get(&decode(branch)) else {
            return FakeReply::status(422, "application/json", r#"{"message":"No commit found"}"#);
        };
        let etag = format!("\"{sha}\"");
        if request.header("if-none-match") == Some(etag.as_str()) {
            return FakeReply::status(304, "text/plain", "").with_header("etag", &etag);
        }
        return FakeReply::status(200, "text/plain", sha).with_header("etag", &etag);
    }
    if rest == "branches" {
        let page: usize = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("page="))
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        let all: Vec<(&String, &String)> = branches.iter().collect();
        let chunk: Vec<serde_json::Value> = all
            .iter()
            .skip((page - 1) * 100)
            .take(100)
            .map(|(name, sha)| serde_json::json!({"name": name, "commit": {"sha": sha}}))
            .collect();
        let mut reply = FakeReply::json(&serde_json::Value::Array(chunk).to_string());
        if page * 100 < all.len() {
            let next = format!(
                "<http://127.0.0.1/repos/{owner}/{name}/branches?per_page=100&page={}>; rel=\"next\"",
                page + 1
            );
            // Relative to the request's origin: the client joins it with its own URL.
            let next = next.replace("http://127.0.0.1", "");
            reply = reply.with_header("link", &next);
        }
        return reply;
    }
    FakeReply::status(404, "application/json", r#"{"message":"Not Found"}"#)
}
