//! `sentry status`: what the state says, per repository and branch — the handled SHA with
//! its last deployment, and apart from it the change still pending and why. Reads the
//! state file (no network; safe while `watch` writes it: writes are atomic renames, and
//! status takes no lock), or with `state.backend: kubernetes` the ConfigMap.

use serde::Serialize;

use crate::Exit;
use crate::cli::{Cli, OutputFormat, StatusArgs};
use crate::config::{Env, StateConfig};
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
