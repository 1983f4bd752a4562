//! GitHub heads in batches through the GraphQL API: one `POST {api}/graphql` (GitHub
//! Enterprise Server: `https://HOST/api/graphql`, not `/api/v3/graphql`) answers for many
//! repositories and branches at once.
//!
//! One query names each repository under an alias, each exact branch under another, and
//! for a repository with patterns one page of its branch listing:
//!
//! ```graphql
//! query Heads($o0: String!, $n0: String!, $q0_0: String!, $a0: String) {
//!   r0: repository(owner: $o0, name: $n0) {
//!     b0: ref(qualifiedName: $q0_0) { target { oid } }
//!     refs(refPrefix: "refs/heads/", first: 100, after: $a0) {
//!       nodes { name target { oid } } pageInfo { hasNextPage endCursor } }
//!   }
//! }
//! ```
//!
//! Every value that comes from the configuration or the forge (owner, name, branch, cursor)
//! travels as a GraphQL *variable*, never inside the query text. Listings are paginated:
//! a repository whose page says `hasNextPage` is asked again, with `after: endCursor`, in the
//! next round of queries.
//!
//! Batch size: at most [`MAX_REFS`] (1,000) branch lookups, [`MAX_LISTINGS`] (50) listings and
//! [`MAX_REPOSITORIES`] (100) repositories per query. That keeps a query at ≤ 5,000 nodes (GitHub
//! allows 500,000), at a cost of 1 point (see [`cost`]), and small enough to answer well
//! within GitHub's 10-second per-query timeout. GraphQL has no ETags: every query costs.
//! Each query is charged its cost against the request budget of its host and token
//! (`Cost::GraphQl`, `forge::budget`) before it is sent.
//!
//! Errors: a repository GitHub reports in `errors[].path` (`NOT_FOUND`, `FORBIDDEN`, …), or
//! answers `null` for, is an error for that repository only; the rest of the batch stands. A
//! branch answered `null` is a missing branch. An HTTP failure of the whole query is an error
//! for every repository in it.
//!
//! Which repositories are asked this way is [`plan`]'s decision (`github_lookup`).

use std::collections::HashMap;

use futures_util::future::join_all;
use reqwest::Url;
use reqwest::header::AUTHORIZATION;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::GitHub;
use crate::config::{Config, GithubLookup, RepoType};
use crate::forge::budget::Cost;
use crate::forge::http::{Call, Reply};
use crate::forge::{Client, ForgeError, Observation, Sha, Watcher, api_base, assemble};

/// Most exact-branch lookups (`ref(qualifiedName:)`) in one query. A lookup is no
/// connection: it adds no cost and no node to GitHub's limits, only work within the query's
/// time limit; 1,000 keeps 50,000 branches at 50 queries (points) a cycle.
pub(crate) const MAX_REFS: usize = 1000;
/// Most branch listings (`refs(first: 100)` connections) in one query: 50 × 100 = 5,000
/// nodes, and 50 connection requests cost 1 point.
pub(crate) const MAX_LISTINGS: usize = 50;
/// Most repositories (aliases) in one query.
pub(crate) const MAX_REPOSITORIES: usize = 100;
/// GitHub refuses a query that may return more nodes than this.
const MAX_NODES: u64 = 500_000;
/// Branches per listing page (GitHub's maximum `first`).
const PAGE: u64 = 100;
/// A listing longer than this many pages is not followed further.
const MAX_PAGES: usize = 1000;
/// `auto` switches an API host to GraphQL above this many REST points a minute: half of
/// GitHub's secondary limit of 900, leaving the rest to commit statuses and retries.
pub(crate) const AUTO_REST_POINTS_PER_MINUTE: f64 = 450.0;

/// GitHub's documented primary cost of a query: the requests its connections need (one per
/// connection at the top of a repository; nested connections multiply by their parents'
/// `first`), divided by 100, rounded to the nearest whole number, at least 1.
pub(crate) fn cost(connection_requests: u64) -> u64 {
    ((connection_requests + 50) / 100).max(1)
}

/// The GraphQL endpoint for a REST API root: `https://api.github.com` →
/// `https://api.github.com/graphql`; GitHub Enterprise Server's `https://HOST/api/v3` →
/// `https://HOST/api/graphql`.
pub(crate) fn endpoint(api: &str) -> String {
    let api = api.trim_end_matches('/');
    match api.strip_suffix("/api/v3") {
        Some(origin) => format!("{origin}/api/graphql"),
        None => format!("{api}/graphql"),
    }
}

/// For each watcher, whether its heads are asked through GraphQL: GitHub repositories with a
/// token (GitHub's GraphQL API needs one) under `github_lookup: graphql`, or under `auto`
/// when the REST polling of all the repositories of its API host would exceed
/// [`AUTO_REST_POINTS_PER_MINUTE`].
pub(crate) fn plan(config: &Config, watchers: &[Watcher]) -> Vec<bool> {
    let eligible: Vec<Option<String>> = watchers
        .iter()
        .map(|w| {
            let repo = &w.0.repo;
            let ok = repo.monitor.repo_type == RepoType::Github
                && repo.monitor.auth.token.is_some()
                && matches!(w.0.client, Ok(Client::GitHub(_)));
            ok.then(|| api_base(repo).ok()).flatten()
        })
        .collect();
    match config.github_lookup {
        GithubLookup::Rest => vec![false; watchers.len()],
        GithubLookup::Graphql => eligible.iter().map(Option::is_some).collect(),
        GithubLookup::Auto => {
            let per_minute = 60.0 / config.polling_interval.as_secs_f64().max(1.0);
            let mut points: HashMap<&str, f64> = HashMap::new();
            for (w, api) in watchers.iter().zip(&eligible) {
                if let Some(api) = api {
                    *points.entry(api).or_default() += rest_requests(w) as f64 * per_minute;
                }
            }
            eligible
                .iter()
                .map(|api| {
                    api.as_deref()
                        .and_then(|a| points.get(a))
                        .is_some_and(|p| *p > AUTO_REST_POINTS_PER_MINUTE)
                })
                .collect()
        }
    }
}

/// REST requests one cycle of `w` sends at least: one per exact branch, one listing page.
fn rest_requests(w: &Watcher) -> usize {
    let monitor = &w.0.repo.monitor;
    monitor.exact_branches().count() + usize::from(monitor.patterns().next().is_some())
}

/// Heads of every watched branch of `watchers` (all GitHub clients, see [`plan`]), in their
/// order. Repositories that share an endpoint and a token are batched together.
///
/// Where the endpoint answers `404` (no GraphQL API: an old or restricted GitHub Enterprise
/// Server, a proxy), `fallback` (`github_lookup: auto`) asks those repositories through REST
/// instead and flags them `true`, so that the caller stops batching them; without it
/// (`github_lookup: graphql`) they fail with a message saying what to change.
pub(crate) async fn observe(
    watchers: &[Watcher],
    fallback: bool,
    cancel: &CancellationToken,
) -> Vec<(Observation, bool)> {
    let mut groups: HashMap<(String, Vec<u8>), Vec<usize>> = HashMap::new();
    let mut clients = Vec::with_capacity(watchers.len());
    for (i, w) in watchers.iter().enumerate() {
        match &w.0.client {
            Ok(Client::GitHub(gh)) => {
                let key = (
                    gh.graphql.as_str().to_owned(),
                    gh.json_headers
                        .get(AUTHORIZATION)
                        .map(|v| v.as_bytes().to_vec())
                        .unwrap_or_default(),
                );
                groups.entry(key).or_default().push(i);
                clients.push(Some(gh));
            }
            _ => clients.push(None),
        }
    }
    let mut answers: Vec<Option<(Observation, bool)>> = vec![None; watchers.len()];
    let lookups = groups.into_values().map(|members| {
        let group: Vec<(&Watcher, &GitHub)> = members
            .iter()
            .filter_map(|&i| Some((&watchers[i], clients[i]?)))
            .collect();
        async move {
            let observed = match lookup(&group, cancel).await {
                Ok(observed) => observed.into_iter().map(|o| (o, false)).collect(),
                Err(missing) if fallback => {
                    if let Some((_, gh)) = group.first() {
                        tracing::warn!(
                            "{} has no GraphQL API at {}: asking its {} repositories through REST",
                            gh.host,
                            gh.graphql.path(),
                            group.len()
                        );
                    }
                    let _ = missing;
                    join_all(group.iter().map(|(w, _)| w.observe(cancel)))
                        .await
                        .into_iter()
                        .map(|o| (o, true))
                        .collect()
                }
                Err(missing) => group
                    .iter()
                    .map(|(w, _)| {
                        let obs = crate::forge::everything_failed(&w.0.repo.monitor, &missing);
                        (obs, false)
                    })
                    .collect::<Vec<_>>(),
            };
            (members, observed)
        }
    });
    for (members, observed) in join_all(lookups).await {
        for (i, obs) in members.into_iter().zip(observed) {
            answers[i] = Some(obs);
        }
    }
    answers
        .into_iter()
        .zip(watchers)
        .map(|(obs, w)| {
            obs.unwrap_or_else(|| {
                let error = ForgeError::Malformed(format!(
                    "{}: not a GitHub repository; cannot ask GraphQL",
                    w.0.repo.name
                ));
                (
                    crate::forge::everything_failed(&w.0.repo.monitor, &error),
                    false,
                )
            })
        })
        .collect()
}

/// What one query asks of one repository.
#[derive(Debug, Clone)]
struct Ask {
    /// Index into the group.
    repo: usize,
    branches: Vec<String>,
    /// `Some(after)`: one page of the listing, after that cursor (`None`: the first page).
    listing: Option<Option<String>>,
}

/// One repository's answers, gathered across queries and pages.
struct Gathered {
    exact: Vec<(String, Result<Sha, ForgeError>)>,
    listing: Option<Result<Vec<(String, Sha)>, ForgeError>>,
    pages: usize,
}

/// Every head of a group of repositories on one endpoint with one token.
/// `Err` when the endpoint has no GraphQL API (`404` to the first round of queries).
async fn lookup(
    group: &[(&Watcher, &GitHub)],
    cancel: &CancellationToken,
) -> Result<Vec<Observation>, ForgeError> {
    let mut gathered: Vec<Gathered> = Vec::with_capacity(group.len());
    let mut asks = Vec::new();
    for (i, (w, _)) in group.iter().enumerate() {
        let monitor = &w.0.repo.monitor;
        let exact: Vec<String> = monitor.exact_branches().map(str::to_owned).collect();
        let patterns = !w.0.patterns.is_empty();
        gathered.push(Gathered {
            exact: Vec::with_capacity(exact.len()),
            listing: patterns.then(|| Ok(Vec::new())),
            pages: 0,
        });
        let mut chunks: Vec<Vec<String>> = exact.chunks(MAX_REFS).map(<[_]>::to_vec).collect();
        if chunks.is_empty() && patterns {
            chunks.push(Vec::new());
        }
        for (c, branches) in chunks.into_iter().enumerate() {
            asks.push(Ask {
                repo: i,
                branches,
                listing: (c == 0 && patterns).then_some(None),
            });
        }
    }
    let Some((_, first)) = group.first() else {
        return Ok(Vec::new());
    };
    let mut round = 0;
    while !asks.is_empty() {
        round += 1;
        let batches = pack(std::mem::take(&mut asks));
        let sent = batches
            .iter()
            .map(|batch| send(first, group, batch, cancel));
        for (batch, (answers, missing)) in batches.iter().zip(join_all(sent).await) {
            if let Some(missing) = missing.filter(|_| round == 1) {
                return Err(missing);
            }
            for (ask, answer) in batch.iter().zip(answers) {
                let g = &mut gathered[ask.repo];
                g.exact.extend(answer.exact);
                match answer.listing {
                    None => {}
                    Some(Err(e)) => g.listing = Some(Err(e)),
                    Some(Ok((branches, next))) => {
                        g.pages += 1;
                        if let Some(Ok(all)) = &mut g.listing {
                            all.extend(branches);
                            match next {
                                Some(_) if g.pages >= MAX_PAGES => {
                                    g.listing = Some(Err(ForgeError::Malformed(format!(
                                        "{}: the branch listing exceeds {MAX_PAGES} pages",
                                        group[ask.repo].0.0.repo.name
                                    ))));
                                }
                                Some(cursor) => asks.push(Ask {
                                    repo: ask.repo,
                                    branches: Vec::new(),
                                    listing: Some(Some(cursor)),
                                }),
                                None => {}
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(gathered
        .into_iter()
        .zip(group)
        .map(|(g, (w, _))| {
            let patterns = &w.0.patterns;
            let listing = g.listing.map(|l| {
                l.map(|all| {
                    all.into_iter()
                        .filter(|(name, _)| patterns.iter().any(|p| p.matches(name)))
                        .collect()
                })
            });
            assemble(g.exact, listing)
        })
        .collect())
}

/// Packs asks into queries within the batch limits, in order.
fn pack(asks: Vec<Ask>) -> Vec<Vec<Ask>> {
    let mut batches: Vec<Vec<Ask>> = Vec::new();
    let (mut refs, mut listings) = (0, 0);
    for ask in asks {
        let fits = batches.last().is_some_and(|b| {
            b.len() < MAX_REPOSITORIES
                && refs + ask.branches.len() <= MAX_REFS
                && listings + usize::from(ask.listing.is_some()) <= MAX_LISTINGS
        });
        if !fits {
            batches.push(Vec::new());
            (refs, listings) = (0, 0);
        }
        refs += ask.branches.len();
        listings += usize::from(ask.listing.is_some());
        if let Some(batch) = batches.last_mut() {
            batch.push(ask);
        }
    }
    batches
}

/// One query as sent: text, variables, and what GitHub will charge for it.
#[derive(Debug)]
pub(crate) struct Query {
    pub text: String,
    pub variables: Map<String, Value>,
    /// Primary-rate-limit points by GitHub's formula ([`cost`]).
    pub cost: u64,
    /// Nodes the query may return (GitHub refuses more than 500,000).
    pub nodes: u64,
}

const LISTING: &str = "refs(refPrefix: \"refs/heads/\", first: 100, after: $a{k}) \
     { nodes { name target { oid } } pageInfo { hasNextPage endCursor } }";

/// The query for `batch` (owner and name per repository from `owners`).
fn build(batch: &[Ask], owners: &[(&str, &str)]) -> Query {
    let mut declared = Vec::new();
    let mut body = String::new();
    let mut variables = Map::new();
    let mut listings = 0;
    for (k, ask) in batch.iter().enumerate() {
        let (owner, name) = owners[ask.repo];
        declared.push(format!("$o{k}: String!, $n{k}: String!"));
        variables.insert(format!("o{k}"), json!(owner));
        variables.insert(format!("n{k}"), json!(name));
        body.push_str(&format!("r{k}: repository(owner: $o{k}, name: $n{k}) {{ "));
        for (j, branch) in ask.branches.iter().enumerate() {
            declared.push(format!("$q{k}_{j}: String!"));
            variables.insert(format!("q{k}_{j}"), json!(format!("refs/heads/{branch}")));
            body.push_str(&format!(
                "b{j}: ref(qualifiedName: $q{k}_{j}) {{ target {{ oid }} }} "
            ));
        }
        if let Some(after) = &ask.listing {
            listings += 1;
            declared.push(format!("$a{k}: String"));
            variables.insert(format!("a{k}"), json!(after));
            body.push_str(&LISTING.replace("{k}", &k.to_string()));
            body.push(' ');
        }
        body.push_str("} ");
    }
    Query {
        text: format!("query Heads({}) {{ {body}}}", declared.join(", ")),
        variables,
        cost: cost(listings),
        nodes: listings * PAGE,
    }
}

/// What one query said about one ask.
struct Answer {
    exact: Vec<(String, Result<Sha, ForgeError>)>,
    /// The page's branches and the cursor of the next page, if any.
    listing: Option<PageRead>,
}

impl Answer {
    fn failed(ask: &Ask, error: &ForgeError) -> Answer {
        Answer {
            exact: ask
                .branches
                .iter()
                .map(|b| (b.clone(), Err(error.clone())))
                .collect(),
            listing: ask.listing.as_ref().map(|_| Err(error.clone())),
        }
    }
}

/// Sends one query and reads each repository's part of the answer; with the error, when the
/// endpoint has no GraphQL API (`404`).
async fn send(
    client: &GitHub,
    group: &[(&Watcher, &GitHub)],
    batch: &[Ask],
    cancel: &CancellationToken,
) -> (Vec<Answer>, Option<ForgeError>) {
    let owners: Vec<(&str, &str)> = group
        .iter()
        .map(|(w, _)| {
            let path = w.0.repo.monitor.project_path.as_str();
            path.split_once('/').unwrap_or((path, ""))
        })
        .collect();
    let query = build(batch, &owners);
    let label = format!("GraphQL query for {} repositories", batch.len());
    let body = json!({ "query": query.text, "variables": query.variables }).to_string();
    let call = Call {
        repo: &label,
        url: client.graphql.clone(),
        headers: &client.json_headers,
        has_token: client.repo.monitor.auth.token.is_some(),
        cancel,
    };
    let whole =
        |e: ForgeError| -> Vec<Answer> { batch.iter().map(|a| Answer::failed(a, &e)).collect() };
    debug_assert!(query.nodes <= MAX_NODES);
    tracing::debug!(
        repositories = batch.len(),
        cost = query.cost,
        nodes = query.nodes,
        "GraphQL query to {}",
        client.host
    );
    let cost = Cost::GraphQl {
        points: u32::try_from(query.cost).unwrap_or(u32::MAX),
    };
    let reply = match client.http.post_costed(call, body.as_bytes(), cost).await {
        Ok(reply) => reply,
        Err(e) => return (whole(e), None),
    };
    let answers = match reply {
        Reply::Fresh { body, .. } => match serde_json::from_slice::<Value>(&body) {
            Ok(doc) => read(&doc, batch, group, &client.host),
            Err(e) => whole(ForgeError::Malformed(format!(
                "{}: the GraphQL answer is not JSON ({e})",
                client.host
            ))),
        },
        Reply::Refused { status, .. } if status == reqwest::StatusCode::NOT_FOUND => {
            let missing = ForgeError::NotFound(format!(
                "{}: no GraphQL API at {} — for GitHub Enterprise Server set api_url to \
                 https://HOST/api/v3 (GraphQL is then https://HOST/api/graphql), or set \
                 github_lookup: rest",
                client.host,
                client.graphql.path()
            ));
            return (whole(missing.clone()), Some(missing));
        }
        Reply::Refused { status, .. } => whole(ForgeError::Transient(format!(
            "{}: unexpected answer {status} to a GraphQL query",
            client.host
        ))),
        Reply::Cached(_) => whole(ForgeError::Malformed(format!(
            "{}: a GraphQL query was answered from the ETag cache",
            client.host
        ))),
    };
    (answers, None)
}

/// A forge's error message, printable and short.
fn message(text: &str) -> String {
    text.chars()
        .take(160)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Splits a GraphQL answer into each ask's part (see the module header for the rules).
fn read(doc: &Value, batch: &[Ask], group: &[(&Watcher, &GitHub)], host: &str) -> Vec<Answer> {
    // `errors[].path` → (alias index, field under it).
    let mut repo_errors: HashMap<usize, (String, String)> = HashMap::new();
    let mut field_errors: HashMap<(usize, String), (String, String)> = HashMap::new();
    let mut general = Vec::new();
    for error in doc
        .get("errors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let kind = error
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ERROR")
            .to_owned();
        let text = message(error.get("message").and_then(Value::as_str).unwrap_or(""));
        let path: Vec<&str> = error
            .get("path")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let alias = path
            .first()
            .and_then(|p| p.strip_prefix('r'))
            .and_then(|k| k.parse::<usize>().ok())
            .filter(|k| *k < batch.len());
        match (alias, path.get(1)) {
            (Some(k), None) => {
                repo_errors.entry(k).or_insert((kind, text));
            }
            (Some(k), Some(field)) => {
                field_errors
                    .entry((k, (*field).to_owned()))
                    .or_insert((kind, text));
            }
            (None, _) => general.push(format!("{kind}: {text}")),
        }
    }
    let data = doc.get("data").filter(|d| d.is_object());
    let Some(data) = data else {
        let why = if general.is_empty() {
            "no data".to_owned()
        } else {
            general.join("; ")
        };
        let error = ForgeError::Transient(format!("{host}: the GraphQL query failed: {why}"));
        return batch.iter().map(|a| Answer::failed(a, &error)).collect();
    };
    batch
        .iter()
        .enumerate()
        .map(|(k, ask)| {
            let repo = &group[ask.repo].0.0.repo;
            let (name, project) = (&repo.name, &repo.monitor.project_path);
            let classify = |kind: &str, text: &str| match kind {
                "NOT_FOUND" => ForgeError::NotFound(format!(
                    "{name}: repository {project} not found on {host} — renamed, private \
                     without a token, or wrong api_url (GraphQL NOT_FOUND: {text})"
                )),
                "FORBIDDEN" => ForgeError::Auth(format!(
                    "{name}: the token may not read {project} on {host} (GraphQL FORBIDDEN: {text})"
                )),
                _ => ForgeError::Transient(format!("{name}: GraphQL error {kind}: {text}")),
            };
            let node = data.get(format!("r{k}")).filter(|v| v.is_object());
            let Some(node) = node else {
                let error = match repo_errors.get(&k) {
                    Some((kind, text)) => classify(kind, text),
                    None => ForgeError::NotFound(format!(
                        "{name}: repository {project} not found on {host} — renamed, private \
                         without a token, or wrong api_url"
                    )),
                };
                return Answer::failed(ask, &error);
            };
            let exact = ask
                .branches
                .iter()
                .enumerate()
                .map(|(j, branch)| {
                    let field = format!("b{j}");
                    let result = match node.get(&field).filter(|v| !v.is_null()) {
                        Some(r) => r
                            .pointer("/target/oid")
                            .and_then(Value::as_str)
                            .and_then(Sha::parse)
                            .ok_or_else(|| {
                                ForgeError::Malformed(format!(
                                    "{name}: GraphQL gave no 40-hex commit SHA for {branch}"
                                ))
                            }),
                        None => Err(match field_errors.get(&(k, field)) {
                            Some((kind, text)) => classify(kind, text),
                            None => ForgeError::NotFound(format!(
                                "{name}: branch {branch} does not exist in {project}"
                            )),
                        }),
                    };
                    (branch.clone(), result)
                })
                .collect();
            let listing =
                ask.listing
                    .as_ref()
                    .map(|_| match node.get("refs").filter(|v| v.is_object()) {
                        Some(refs) => read_page(name, refs),
                        None => Err(match field_errors.get(&(k, "refs".to_owned())) {
                            Some((kind, text)) => classify(kind, text),
                            None => ForgeError::Malformed(format!(
                                "{name}: the GraphQL answer has no branch listing"
                            )),
                        }),
                    });
            Answer { exact, listing }
        })
        .collect()
}

type PageRead = Result<(Vec<(String, Sha)>, Option<String>), ForgeError>;

fn read_page(name: &str, refs: &Value) -> PageRead {
    let malformed =
        |what: &str| ForgeError::Malformed(format!("{name}: GraphQL branch listing {what}"));
    let nodes = refs
        .get("nodes")
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("has no nodes"))?;
    let mut branches = Vec::with_capacity(nodes.len());
    for node in nodes {
        let branch = node.get("name").and_then(Value::as_str);
        let sha = node
            .pointer("/target/oid")
            .and_then(Value::as_str)
            .and_then(Sha::parse);
        match (branch, sha) {
            (Some(b), Some(sha)) => branches.push((b.to_owned(), sha)),
            (Some(b), None) => {
                return Err(malformed(&format!("has no valid commit SHA for {b:?}")));
            }
            (None, _) => return Err(malformed("has a node without a name")),
        }
    }
    let more = refs
        .pointer("/pageInfo/hasNextPage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let next = match refs.pointer("/pageInfo/endCursor").and_then(Value::as_str) {
        Some(cursor) if more => Some(cursor.to_owned()),
        None if more => return Err(malformed("says more pages follow but gives no cursor")),
        _ => None,
    };
    Ok((branches, next))
}

/// The GraphQL endpoint of `api` as a URL.
pub(crate) fn endpoint_url(repo: &crate::config::Repository) -> Result<Url, ForgeError> {
    let api = api_base(repo)?;
    crate::forge::parse_url(repo, &endpoint(&api))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(repo: usize, branches: &[&str], listing: Option<Option<&str>>) -> Ask {
        Ask {
            repo,
            branches: branches.iter().map(|b| (*b).to_owned()).collect(),
            listing: listing.map(|l| l.map(str::to_owned)),
        }
    }

    fn plan_for(lookup: &str, interval: &str) -> Vec<bool> {
        let repo = |name: &str, token: bool, branches: &str| {
            format!(
                "  - name: {name}\n    group: g\n    monitor:\n      repo_url: https://github.com/o/{name}\n      \
                 repo_type: github\n      branches: {branches}\n{}    deploy: {{qa_repo_url: /tmp/qa, \
                 qa_repo_branch: main, commands: [\"true\"]}}\n",
                if token {
                    "      auth: {token: t}\n"
                } else {
                    ""
                }
            )
        };
        let yaml = format!(
            "polling_interval: {interval}\ngithub_lookup: {lookup}\ngroups: {{g: }}\nrepositories:\n{}{}{}",
            repo("a", true, "[b0, b1, b2, b3]"),
            repo("b", true, "[b0, b1, b2, \"release/*\"]"),
            repo("c", false, "[b0, b1, b2, b3]"),
        );
        let env = crate::config::Env::fixed::<[(&str, &str); 0], _, _>([]);
        let config = crate::config::load_str(&yaml, &env).config.expect("config");
        let forges = crate::forge::Forges::new(&config).expect("forges");
        let watchers: Vec<Watcher> = config
            .repositories
            .iter()
            .map(|r| forges.watcher(r))
            .collect();
        plan(&config, &watchers)
    }

    #[test]
    fn plan_follows_github_lookup_and_never_batches_without_a_token() {
        assert_eq!(plan_for("rest", "1s"), [false, false, false]);
        assert_eq!(plan_for("graphql", "1h"), [true, true, false]);
        // 8 REST requests a cycle: 8 a minute at 60 s stays REST; 480 a minute at 1 s (more
        // than 450 on api.github.com) switches the host to GraphQL.
        assert_eq!(plan_for("auto", "60s"), [false, false, false]);
        assert_eq!(plan_for("auto", "1s"), [true, true, false]);
    }

    #[test]
    fn cost_follows_githubs_formula() {
        assert_eq!(cost(0), 1);
        assert_eq!(cost(1), 1);
        assert_eq!(cost(49), 1);
        assert_eq!(cost(50), 1);
        assert_eq!(cost(149), 1);
        assert_eq!(cost(150), 2);
        assert_eq!(cost(2_000), 20);
    }

    #[test]
    fn endpoints_for_github_and_enterprise() {
        assert_eq!(
            endpoint("https://api.github.com"),
            "https://api.github.com/graphql"
        );
        assert_eq!(
            endpoint("https://ghe.corp/api/v3/"),
            "https://ghe.corp/api/graphql"
        );
        assert_eq!(
            endpoint("http://127.0.0.1:9/"),
            "http://127.0.0.1:9/graphql"
        );
    }

    #[test]
    fn values_travel_as_variables_never_in_the_text() {
        let evil = "x\") { oid } } r9: repository(owner: \"evil";
        let q = build(
            &[ask(0, &["main", evil], Some(Some("Y3Vyc29y")))],
            &[("acme\"", "na}me")],
        );
        assert!(!q.text.contains("evil"), "{}", q.text);
        assert!(!q.text.contains("acme"), "{}", q.text);
        assert!(!q.text.contains("Y3Vyc29y"), "{}", q.text);
        assert_eq!(q.variables["q0_1"], json!(format!("refs/heads/{evil}")));
        assert_eq!(q.variables["o0"], json!("acme\""));
        assert_eq!(q.variables["a0"], json!("Y3Vyc29y"));
        assert_eq!(q.cost, 1);
        assert_eq!(q.nodes, 100);
        // Every declared variable is used, every used one declared.
        for k in ["$o0", "$n0", "$q0_0", "$q0_1", "$a0"] {
            assert_eq!(q.text.matches(k).count(), 2, "{k} in {}", q.text);
        }
    }

    #[test]
    fn packing_respects_every_limit() {
        let many: Vec<String> = (0..600).map(|i| format!("b{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let asks: Vec<Ask> = (0..120)
            .map(|i| ask(i, if i < 3 { &many } else { &["main"] }, Some(None)))
            .collect();
        let batches = pack(asks);
        for b in &batches {
            assert!(b.len() <= MAX_REPOSITORIES);
            assert!(b.iter().map(|a| a.branches.len()).sum::<usize>() <= MAX_REFS);
            assert!(b.iter().filter(|a| a.listing.is_some()).count() <= MAX_LISTINGS);
        }
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 120);
        // 600 + 600 > 1,000: the second big repository starts a new query.
        assert_eq!(batches[0].len(), 1);
    }

    #[test]
    fn reads_pages_and_refuses_a_page_without_a_cursor() {
        let sha = "a".repeat(40);
        let page = json!({"nodes": [{"name": "rel/1", "target": {"oid": sha}}],
                          "pageInfo": {"hasNextPage": true, "endCursor": "c1"}});
        let (branches, next) = read_page("r", &page).unwrap();
        assert_eq!(branches[0].0, "rel/1");
        assert_eq!(next.as_deref(), Some("c1"));
        let page = json!({"nodes": [], "pageInfo": {"hasNextPage": true, "endCursor": null}});
        assert!(read_page("r", &page).is_err());
        let page = json!({"nodes": [{"name": "x", "target": {"oid": "nope"}}],
                          "pageInfo": {"hasNextPage": false}});
        assert!(read_page("r", &page).is_err());
    }
}
