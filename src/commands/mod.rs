//! The subcommands: each turns parsed arguments into calls on the library and an [`Exit`].
//!
//! This is the edge of the program, where errors become messages and exit codes: every
//! command returns `anyhow::Result<Exit>`, and [`run`] prints an error once, in the log
//! format the user chose (`error: …` as text, one JSON object with `--log-format json`),
//! and exits 2 — Sentry could not do its job. Sync work (loading the env file and the
//! config) happens before the tokio runtime starts.

use std::collections::BTreeMap;
use std::path::Path;

mod status;
mod trigger;
mod watch;

use crate::Exit;
use crate::cli::{Cli, Command, OutputFormat, ValidateArgs};
use crate::config::{self, Config, Diagnostic, Env, LoadError};

pub fn run(cli: Cli) -> Exit {
    match run_command(&cli) {
        Ok(exit) => exit,
        Err(error) => {
            crate::telemetry::report_error(cli.log_format, &error);
            Exit::CannotRun
        }
    }
}

fn run_command(cli: &Cli) -> anyhow::Result<Exit> {
    let env = load_env(cli.env_file.as_deref()).map_err(anyhow::Error::msg)?;
    match &cli.command {
        Command::Validate(args) => validate(&cli.config, &env, args),
        Command::ConfigSchema => config_schema(),
        Command::Trigger(args) => trigger::trigger(cli, args, &env),
        Command::Watch(args) => watch::watch(cli, args, &env),
        Command::Status(args) => status::status(cli, args, &env),
    }
}

/// Reads `--env-file` (which must exist) or `.env` (when it exists) without touching the
/// process environment; the real environment wins over the file.
fn load_env(env_file: Option<&Path>) -> Result<Env, String> {
    let path = match env_file {
        Some(path) if !path.exists() => {
            return Err(format!("env file {} does not exist", path.display()));
        }
        Some(path) => path,
        None if Path::new(".env").is_file() => Path::new(".env"),
        None => return Ok(Env::default()),
    };
    let iter = dotenvy::from_path_iter(path)
        .map_err(|e| format!("cannot read env file {}: {e}", path.display()))?;
    let mut vars = BTreeMap::new();
    for item in iter {
        // dotenvy's parse errors quote the offending line, which may hold a secret.
        let (key, value) = item.map_err(|e| match e {
            dotenvy::Error::LineParse(_, _) => format!(
                "env file {}: a line is not of the form KEY=value",
                path.display()
            ),
            other => format!("cannot read env file {}: {other}", path.display()),
        })?;
        vars.insert(key, value);
    }
    Ok(Env::with_file_vars(vars))
}

/// Loads the configuration for commands that need a valid one. Outside `validate`, a
/// configuration that cannot be used means Sentry cannot do its job (exit 2), so that 1
/// always means "a deployment failed".
pub fn load_config(path: &Path, env: &Env) -> anyhow::Result<Config> {
    let (config, warnings) = config::load_file(path, env)?;
    for w in warnings {
        tracing::warn!(target: "sentry::config", "{w}");
    }
    Ok(config)
}

fn validate(path: &Path, env: &Env, args: &ValidateArgs) -> anyhow::Result<Exit> {
    let text = match config::read_file(path) {
        Ok(text) => text,
        Err(e @ (LoadError::Read { .. } | LoadError::Invalid { .. })) => return Err(e.into()),
    };
    let loaded = config::load_str(&text, env);
    let errors = loaded.diagnostics.iter().filter(|d| d.is_error()).count();
    let warnings = loaded.diagnostics.len() - errors;
    match args.format {
        OutputFormat::Json => {
            let report = serde_json::json!({
                "file": path.display().to_string(),
                "valid": loaded.config.is_some(),
                "errors": errors,
                "warnings": warnings,
                "diagnostics": loaded.diagnostics,
            });
            println!("{report:#}");
        }
        OutputFormat::Text => {
            for diag in &loaded.diagnostics {
                println!("{}", located(path, diag));
            }
            match &loaded.config {
                Some(config) => println!("config OK: {}", summary(config)),
                None => println!(
                    "config invalid: {}, {}",
                    plural(errors, "error"),
                    plural(warnings, "warning")
                ),
            }
        }
    }
    Ok(if loaded.config.is_some() {
        Exit::Success
    } else {
        Exit::JobFailed
    })
}

/// `sentry.yaml:12:5: error: path: message`, the form editors and CI annotate from.
fn located(path: &Path, diag: &Diagnostic) -> String {
    match diag.line {
        Some(_) => format!("{}:{diag}", path.display()),
        None => format!("{}: {diag}", path.display()),
    }
}

pub fn summary(config: &Config) -> String {
    format!(
        "{}, {}, {} watched",
        plural(config.groups.len(), "group"),
        plural(config.repositories.len(), "repository"),
        plural(config.watched_branch_count(), "branch"),
    )
}

pub fn plural(n: usize, noun: &str) -> String {
    match (n, noun) {
        (1, _) => format!("1 {noun}"),
        (_, "repository") => format!("{n} repositories"),
        (_, "branch") => format!("{n} branches"),
        _ => format!("{n} {noun}s"),
    }
}

fn config_schema() -> anyhow::Result<Exit> {
    let text = serde_json::to_string_pretty(&config::json_schema())
        .map_err(|e| anyhow::anyhow!("cannot print the schema: {e}"))?;
    println!("{text}");
    Ok(Exit::Success)
}

/// The multi-threaded runtime for commands that do async work.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

/// Prints a left-aligned table with a header row.
pub fn print_columns<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
