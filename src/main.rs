//! The `sentry` binary: parse the command line, start logging, hand over to the library,
//! and turn the outcome into an exit code.

use std::process::ExitCode;

use clap::Parser;
use sentry::{Exit, cli, commands, telemetry};

fn main() -> ExitCode {
    sentry::memory::tune();
    let hardened = sentry::hardening::at_start();
    let args = match cli::normalize_args(std::env::args_os()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}\n\nFor more information, try '--help'.");
            return Exit::CannotRun.into();
        }
    };
    let cli = match cli::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors.
            let _ = e.print();
            return if e.use_stderr() {
                Exit::CannotRun
            } else {
                Exit::Success
            }
            .into();
        }
    };
    telemetry::init(cli.log_level, cli.log_format);
    for problem in &hardened.problems {
        tracing::warn!("{problem}");
    }
    tracing::debug!(open_files = hardened.open_files, "process limits set");
    commands::run(cli).into()
}
