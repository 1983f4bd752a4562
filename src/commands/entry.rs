//! The program's entry: parse the command line (Go-style flags first), start colour and
//! logging, run the command, and turn usage errors into messages. `src/main.rs` calls
//! [`main`] and nothing else.

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches};

use crate::cli::{self, Cli, EarlyOptions, LogLevel};
use crate::{Exit, output, telemetry};

/// The whole program: parse the command line, start logging, run the command, and say
/// how it ended. `sentry`'s `main` calls only this.
pub fn main(raw: Vec<OsString>) -> Exit {
    crate::memory::tune();
    // Before any thread exists: no core dumps, as many descriptors as allowed.
    let hardened = crate::hardening::at_start();
    let early = cli::early_options(&raw);
    let args = match cli::normalize_args(raw) {
        Ok(args) => args,
        Err(e) => return usage_error(early, &e.to_string()),
    };
    let cli = match parse(args, early) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors; clap's own text keeps its layout and
            // colours for people.
            if !e.use_stderr() || early.log_format == cli::LogFormat::Text {
                let _ = e.print();
                return if e.use_stderr() {
                    Exit::CannotRun
                } else {
                    Exit::Success
                };
            }
            return usage_error(early, &clap_message(&e));
        }
    };
    output::set_color(cli.color);
    telemetry::init(cli.log_level, cli.log_format, output::stderr_color());
    for problem in &hardened.problems {
        tracing::warn!("{problem}");
    }
    tracing::debug!(open_files = hardened.open_files, "process limits set");
    super::run(cli)
}

/// clap with its own colour (help, usage errors) following `--color` too.
fn parse(args: Vec<OsString>, early: EarlyOptions) -> Result<Cli, clap::Error> {
    let color = match early.color {
        cli::ColorChoice::Auto => clap::ColorChoice::Auto,
        cli::ColorChoice::Always => clap::ColorChoice::Always,
        cli::ColorChoice::Never => clap::ColorChoice::Never,
    };
    let mut matches = Cli::command().color(color).try_get_matches_from(args)?;
    Cli::from_arg_matches_mut(&mut matches)
}

/// A usage error as text with clap's hint, or as one JSON log line for log pipelines.
fn usage_error(early: EarlyOptions, message: &str) -> Exit {
    output::set_color(early.color);
    telemetry::init(LogLevel::Info, early.log_format, output::stderr_color());
    match early.log_format {
        cli::LogFormat::Json => telemetry::error(message),
        cli::LogFormat::Text => telemetry::error(format_args!(
            "{message}\n\nFor more information, try '--help'."
        )),
    }
    Exit::CannotRun
}

/// clap's rendered message without its `error: ` prefix and its trailing hint, for a JSON
/// log line.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    let text = text
        .split("\n\nFor more information")
        .next()
        .unwrap_or(text);
    text.trim_end().to_owned()
}
