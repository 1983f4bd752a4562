//! The subcommands: each turns parsed arguments into calls on the library and an [`Exit`].
//!
//! This is the edge of the program, where errors become messages and exit codes: every
//! command returns `anyhow::Result<Exit>`, and [`run`] prints an error once, in the log
//! format the user chose (`error: …` as text, one JSON object with `--log-format json`),
//! and exits 2 — Sentry could not do its job. Sync work (loading the env file and the
//! config) happens before the tokio runtime starts.

use std::collections::BTreeMap;
use std::path::Path;

mod entry;
mod exec_unit;
mod status;
mod trigger;
mod watch;

pub use entry::main;

use crate::cli::{Cli, Command, CompletionsArgs, ManArgs, ValidateArgs, ValidateFormat};
use crate::config::{self, Config, Diagnostic, Env, LoadError};
use crate::telemetry::error;
use crate::{Exit, outln};

mod github;

pub fn run(cli: Cli) -> Exit {
    match run_command(&cli) {
        Ok(exit) => exit,
        Err(e) => {
            error(format_args!("{e:#}"));
            Exit::CannotRun
        }
    }
}

fn run_command(cli: &Cli) -> anyhow::Result<Exit> {
    let env = load_env(cli.env_file.as_deref()).map_err(anyhow::Error::msg)?;
    match &cli.command {
        Command::Validate(args) => validate(&cli.config, &env, args),
        Command::ConfigSchema => config_schema(),
        Command::Completions(args) => Ok(completions(args)),
        Command::Man(args) => man_pages(args),
        Command::Trigger(args) => trigger::trigger(cli, args, &env),
        Command::Watch(args) => watch::watch(cli, args, &env),
        Command::Status(args) => status::status(cli, args, &env),
        Command::ExecUnit => exec_unit::exec_unit(cli, &env),
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
        ValidateFormat::Json => {
            let report = serde_json::json!({
                "file": path.display().to_string(),
                "valid": loaded.config.is_some(),
                "errors": errors,
                "warnings": warnings,
                "diagnostics": loaded.diagnostics,
            });
            outln!("{report:#}");
        }
        ValidateFormat::Github => {
            for diag in &loaded.diagnostics {
                outln!("{}", github::annotation(path, diag));
            }
        }
        ValidateFormat::Text => {
            for diag in &loaded.diagnostics {
                outln!("{}", located(path, diag));
            }
            match &loaded.config {
                Some(config) => outln!("config OK: {}", summary(config)),
                None => outln!(
                    "config invalid: {}, {}",
                    plural(errors, "error"),
                    plural(warnings, "warning")
                ),
            };
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
    outln!("{text}");
    Ok(Exit::Success)
}

/// `sentry completions SHELL`: the script clap_complete generates from the clap definitions.
fn completions(args: &CompletionsArgs) -> Exit {
    let mut script = Vec::new();
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(args.shell, &mut cmd, "sentry", &mut script);
    crate::output::write_stdout_bytes(&script);
    Exit::Success
}

/// `sentry man`: the man page in roff, generated from the same clap definitions as `--help`;
/// with `--dir`, that page and one per command, as `make install` installs them.
fn man_pages(args: &ManArgs) -> anyhow::Result<Exit> {
    let cmd = <Cli as clap::CommandFactory>::command();
    match &args.dir {
        Some(dir) => clap_mangen::generate_to(cmd, dir),
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut page).map(|()| {
                let _ = crate::output::write_stdout_bytes(&page);
            })
        }
    }
    .map_err(|e| anyhow::anyhow!("cannot write the man page: {e}"))?;
    Ok(Exit::Success)
}

/// The multi-threaded runtime for commands that do async work.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

/// Prints a left-aligned table with a header row. Cells may be coloured
/// ([`crate::output::paint`]): widths count only the visible characters.
pub fn print_columns<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(visible_width);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(visible_width(cell));
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w.saturating_sub(visible_width(c)))))
            .collect();
        outln!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Characters a terminal shows: ANSI colour sequences (`ESC [ … m`) take no room.
fn visible_width(text: &str) -> usize {
    let mut width = 0;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            width += 1;
        }
    }
    width
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_sequences_take_no_width() {
        assert_eq!(visible_width("failed"), 6);
        assert_eq!(visible_width("\x1b[31mfailed\x1b[0m"), 6);
        assert_eq!(visible_width("ok \x1b[32m✓\x1b[0m"), 4);
    }
}
