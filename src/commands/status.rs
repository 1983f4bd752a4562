//! `sentry status`: what the state says, per repository and branch — the handled SHA with
//! its last deployment, and apart from it the change still pending and why. Reads the
//! state file (no network; safe while `watch` writes it: writes are atomic renames, and
//! status takes no lock), or with `state.backend: kubernetes` the ConfigMap. With
//! `--server URL` it asks a running `watch` for its live view instead (`/api/v1/status`):
//! groups with their running and waiting units, backoffs and rate limits too, with
//! relative ages.

use anyhow::Context as _;
use serde::Serialize;

use crate::Exit;
use crate::api::{BranchView, GroupView, StatusView};
use crate::cli::{Cli, OutputFormat, StatusArgs};
use crate::config::{Env, StateConfig};
use crate::history::{relative, short_duration};
use crate::monitor::state::configmap::ConfigMapBackend;
use crate::monitor::state::{DeployRecord, PendingRecord, State, StateStore};

#[derive(Serialize)]
struct Row<'a> {
    repository: &'a str,
    branch: &'a str,
    /// The handled SHA; `None` for a branch whose first change is still pending.
    sha: Option<&'a str>,
    seen_at: Option<&'a str>,
    last_deploy: Option<&'a DeployRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pending: Option<&'a PendingRecord>,
}

pub fn status(cli: &Cli, args: &StatusArgs, env: &Env) -> anyhow::Result<Exit> {
    if let Some(server) = &args.server {
        return live_status(server, args.token.as_deref(), args.format);
    }
    let config = super::load_config(&cli.config, env)?;
    let store = open(&config)?;
    let state = store.snapshot();
    let rows = rows(&state);
    match args.format {
        OutputFormat::Json => crate::outln!("{}", serde_json::to_string_pretty(&rows)?),
        OutputFormat::Text => print_table(&rows, &store),
    }
    Ok(Exit::Success)
}

/// The state from where `watch` keeps it: the file, or the ConfigMap (read only).
fn open(config: &crate::config::Config) -> anyhow::Result<StateStore> {
    let StateConfig::Kubernetes {
        configmap,
        namespace,
    } = &config.state
    else {
        return Ok(StateStore::load(&config.state_file)?);
    };
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let backend = ConfigMapBackend::connect(configmap, namespace.as_deref()).await?;
        let store = tokio::task::spawn_blocking(move || StateStore::open(Box::new(backend)))
            .await
            .map_err(|e| anyhow::anyhow!("reading the state failed: {e}"))??;
        Ok(store)
    })
}

/// One row per branch that has a handled SHA, a pending change, or both.
fn rows(state: &State) -> Vec<Row<'_>> {
    let mut rows = Vec::new();
    for (repo, rs) in &state.repositories {
        let mut branches: Vec<&String> = rs.branches.keys().chain(rs.pending.keys()).collect();
        branches.sort();
        branches.dedup();
        for branch in branches {
            let handled = rs.branches.get(branch);
            rows.push(Row {
                repository: repo,
                branch,
                sha: handled.map(|b| b.sha.as_str()),
                seen_at: handled.map(|b| b.seen_at.as_str()),
                last_deploy: handled.and_then(|b| b.last_deploy.as_ref()),
                pending: rs.pending.get(branch),
            });
        }
    }
    rows
}

fn print_table(rows: &[Row], store: &StateStore) {
    if rows.is_empty() {
        crate::outln!("no branches recorded yet in {}", store.describe());
        return;
    }
    let table: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            [
                r.repository.to_owned(),
                r.branch.to_owned(),
                handled_text(r),
                r.pending.map_or_else(|| "-".to_owned(), pending_text),
            ]
        })
        .collect();
    super::print_columns(["REPOSITORY", "BRANCH", "HANDLED", "PENDING"], &table);
}

/// `abc12345 (failed at 2026-11-29T10:00:00Z, run …)`, or `abc12345 (baseline)`.
fn handled_text(row: &Row) -> String {
    let Some(sha) = row.sha else {
        return "-".to_owned();
    };
    let short: String = sha.chars().take(8).collect();
    match row.last_deploy {
        Some(d) => format!(
            "{short} ({} at {}, run {})",
            crate::output::paint_result(&d.result),
            d.at,
            d.run_id
        ),
        None => format!("{short} (baseline, seen {})", row.seen_at.unwrap_or("-")),
    }
}

/// `def56789 (cannot reach …; 3 tries could not run; next try 2026-…)`.
fn pending_text(p: &PendingRecord) -> String {
    let short: String = p.sha.as_str().chars().take(8).collect();
    let mut text = format!(
        "{short} ({}",
        crate::output::paint(&p.reason, crate::output::Tone::Warn)
    );
    if p.tries > 1 {
        text.push_str(&format!("; {} tries could not run", p.tries));
    }
    match &p.next_try_at {
        Some(at) => text.push_str(&format!("; next try {at})")),
        None => text.push_str("; deployed after the next start)"),
    }
    text
}

/// `status --server`: one request to `/api/v1/status`, printed as JSON or as two tables.
fn live_status(
    server: &url::Url,
    token: Option<&str>,
    format: OutputFormat,
) -> anyhow::Result<Exit> {
    let url = status_url(server)?;
    let body = super::runtime()?.block_on(fetch(url.clone(), token))?;
    let view: StatusView = serde_json::from_slice(&body)
        .with_context(|| format!("{url} did not answer with a Sentry status"))?;
    match format {
        OutputFormat::Json => crate::outln!("{}", serde_json::to_string_pretty(&view)?),
        OutputFormat::Text => print_live(&view),
    }
    Ok(Exit::Success)
}

/// `/api/v1/status` below `server`; `https://host/sentry` behind a proxy is a directory,
/// so the path is joined below it, not beside it.
fn status_url(server: &url::Url) -> anyhow::Result<url::Url> {
    let mut base = server.clone();
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    base.join("api/v1/status")
        .with_context(|| format!("{server} cannot be joined with api/v1/status"))
}

async fn fetch(url: url::Url, token: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("cannot build an HTTP client")?;
    let mut request = client.get(url.clone());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let code = response.status();
    if code == reqwest::StatusCode::UNAUTHORIZED {
        anyhow::bail!("{url} needs the read token: pass --token or set SENTRY_READ_TOKEN");
    }
    if !code.is_success() {
        anyhow::bail!("{url} answered {code}");
    }
    Ok(response
        .bytes()
        .await
        .with_context(|| format!("cannot read {url}"))?
        .to_vec())
}

fn print_live(view: &StatusView) {
    let groups: Vec<[String; 4]> = view.groups.iter().map(group_cells).collect();
    super::print_columns(["GROUP", "STATE", "LAST RUN", "WAITING"], &groups);
    crate::outln!("");
    let mut rows = Vec::new();
    for repo in &view.repositories {
        let backoff = repo
            .backoff_secs
            .map(|s| format!(" (backing off, next check in {})", short_duration(s as i64)))
            .unwrap_or_default();
        for b in &repo.branches {
            rows.push([
                format!("{}{backoff}", repo.name),
                b.branch.clone(),
                live_handled(b),
                b.pending
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), live_pending),
            ]);
        }
    }
    super::print_columns(["REPOSITORY", "BRANCH", "HANDLED", "PENDING"], &rows);
    for l in &view.rate_limits {
        crate::outln!(
            "\napi host {}: {} requests left{}{}",
            l.host,
            l.remaining
                .map_or_else(|| "?".to_owned(), |r| r.to_string()),
            l.reset
                .as_deref()
                .map(|r| format!(", resets {}", relative(r)))
                .unwrap_or_default(),
            l.paused_until
                .as_deref()
                .map(|p| format!(", paused until {}", relative(p)))
                .unwrap_or_default(),
        );
    }
    crate::outln!(
        "\nlast poll {}",
        view.last_cycle
            .as_deref()
            .map_or_else(|| "not yet".to_owned(), relative)
    );
}

fn group_cells(g: &GroupView) -> [String; 4] {
    let state = match &g.running_run {
        Some(id) => format!("{} ({id})", crate::output::paint_result("running")),
        None => g.state.replace('_', " "),
    };
    let last = g.last_run.as_ref().map_or_else(
        || "-".to_owned(),
        |r| {
            format!(
                "{} {} ({}, {})",
                crate::output::paint_result(&r.status),
                r.run_id,
                r.ended_at
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), relative),
                r.duration_secs
                    .map_or_else(String::new, |d| short_duration(d.round() as i64)),
            )
        },
    );
    let waiting = g.units.pending.len() + g.units.deferred.len();
    [g.name.clone(), state, last, waiting.to_string()]
}

/// `abc12345 (failed 3 m ago, run …)`, or `abc12345 (baseline, seen 2 h ago)`.
fn live_handled(b: &BranchView) -> String {
    let Some(sha) = &b.sha else {
        return "-".to_owned();
    };
    let short: String = sha.chars().take(8).collect();
    match &b.last_deploy {
        Some(d) => format!(
            "{short} ({} {}, run {})",
            crate::output::paint_result(&d.result),
            relative(&d.at),
            d.run_id
        ),
        None => format!(
            "{short} (baseline, seen {})",
            b.seen_at
                .as_deref()
                .map_or_else(|| "-".to_owned(), relative)
        ),
    }
}

/// `def56789 (reason; 3 tries could not run; next try in 40 s)`.
fn live_pending(p: &PendingRecord) -> String {
    let mut text = pending_text(p);
    if let Some(at) = &p.next_try_at {
        text = text.replace(
            &format!("next try {at}"),
            &format!("next try {}", relative(at)),
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_urls_stay_below_a_proxy_path() {
        let url = |s: &str| {
            status_url(&url::Url::parse(s).unwrap())
                .unwrap()
                .to_string()
        };
        assert_eq!(
            url("http://127.0.0.1:8080"),
            "http://127.0.0.1:8080/api/v1/status"
        );
        assert_eq!(url("https://h/sentry"), "https://h/sentry/api/v1/status");
        assert_eq!(url("https://h/sentry/"), "https://h/sentry/api/v1/status");
    }
}
