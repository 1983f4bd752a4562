//! `sentry status`: what the state file says, per repository and branch. No network; safe
//! to run while `watch` writes the file (writes are atomic renames).

use serde::Serialize;

use crate::Exit;
use crate::cli::{Cli, OutputFormat, StatusArgs};
use crate::config::Env;
use crate::monitor::state::{DeployRecord, StateStore};

#[derive(Serialize)]
struct Row<'a> {
    repository: &'a str,
    branch: &'a str,
    sha: &'a str,
    seen_at: &'a str,
    last_deploy: Option<&'a DeployRecord>,
}

pub fn status(cli: &Cli, args: &StatusArgs, env: &Env) -> Exit {
    let config = match super::load_config(&cli.config, env) {
        Ok(config) => config,
        Err(exit) => return exit,
    };
    let store = match StateStore::load(&config.state_file) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("error: {e}");
            return Exit::CannotRun;
        }
    };
    let state = store.snapshot();
    let rows: Vec<Row> = state
        .repositories
        .iter()
        .flat_map(|(repo, rs)| {
            rs.branches.iter().map(move |(branch, b)| Row {
                repository: repo,
                branch,
                sha: b.sha.as_str(),
                seen_at: &b.seen_at,
                last_deploy: b.last_deploy.as_ref(),
            })
        })
        .collect();
    match args.format {
        OutputFormat::Json => match serde_json::to_string_pretty(&rows) {
            Ok(text) => crate::outln!("{text}"),
            Err(e) => {
                eprintln!("error: {e}");
                return Exit::CannotRun;
            }
        },
        OutputFormat::Text => print_table(&rows, &store),
    }
    Exit::Success
}

fn print_table(rows: &[Row], store: &StateStore) {
    if rows.is_empty() {
        crate::outln!("no branches recorded yet in {}", store.path().display());
        return;
    }
    let table: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let deploy = r.last_deploy.map_or_else(
                || "-".to_owned(),
                |d| {
                    format!(
                        "{} at {} (run {})",
                        crate::output::paint_result(&d.result),
                        d.at,
                        d.run_id
                    )
                },
            );
            [
                r.repository.to_owned(),
                r.branch.to_owned(),
                r.sha.chars().take(12).collect(),
                r.seen_at.to_owned(),
                deploy,
            ]
        })
        .collect();
    super::print_columns(
        ["REPOSITORY", "BRANCH", "SHA", "SEEN", "LAST DEPLOYMENT"],
        &table,
    );
}
