//! Observability: logging here, the audit trail in [`audit`], Prometheus metrics in
//! [`metrics`].
//!
//! Logging: the tracing subscriber on stderr, as human text or one JSON object per line.
//!
//! `--log-level` sets the base level and `RUST_LOG` directives refine it. Colour as
//! `--color` and `NO_COLOR` say (see [`crate::output`]). JSON events are flat ([`json`]):
//! the fields of the event and of every span it is in (a group run's `group` and `run_id`,
//! a unit's `repository`, `branch` and `sha`) sit at the top level beside `message`. Errors
//! that end a command before it starts go through [`error`], so they are JSON too under
//! `--log-format json`. Nothing here ever formats a secret: secrets are `SecretString`s,
//! whose `Debug` prints nothing.

pub mod audit;
mod json;
pub mod metrics;

use std::fmt::Display;
use std::io::Write;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use crate::cli::{LogFormat, LogLevel};

/// The log format chosen at [`init`]; [`error`] follows it.
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Starts logging on stderr; `ansi` colours the text format.
pub fn init(level: LogLevel, format: LogFormat, ansi: bool) {
    let _ = FORMAT.set(format);
    let level = match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    };
    let filter = EnvFilter::builder()
        .with_default_directive(level.into())
        .from_env_lossy()
        // Dependencies' chatter at debug and trace is noise, and may echo request details.
        .add_directive(quiet("hyper_util"))
        .add_directive(quiet("reqwest"))
        .add_directive(quiet("h2"))
        .add_directive(quiet("rustls"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Its report of a failed write is an `eprintln!`, which panics when stderr is a
        // closed pipe (`sentry watch 2>&1 | head`): a log line nobody reads is not an error.
        .log_internal_errors(false);
    // A second init (tests calling the library twice) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(json::FlatJson)
            .try_init(),
    };
}

/// Reports an error that stops a command: `error: MESSAGE` on stderr for people, or one
/// JSON log line under `--log-format json`. A closed stderr is ignored, never a panic.
pub fn error(message: impl Display) {
    match FORMAT.get() {
        Some(LogFormat::Json) => tracing::error!(target: "sentry", "{message}"),
        _ => {
            let _ = writeln!(std::io::stderr(), "error: {message}");
        }
    }
}

fn quiet(target: &str) -> tracing_subscriber::filter::Directive {
    format!("{target}=info")
        .parse()
        .unwrap_or_else(|_| LevelFilter::INFO.into())
}

/// The current time as RFC 3339 (UTC, whole seconds), as used in state and audit records.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
