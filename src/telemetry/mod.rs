//! Observability: logging here, the audit trail in [`audit`], Prometheus metrics in
//! [`metrics`].
//!
//! Logging: the tracing subscriber on stderr, as human text or one JSON object per line.
//!
//! `--log-level` sets the base level and `RUST_LOG` directives refine it. Colour only on a
//! terminal. Nothing here ever formats a secret: secrets are `SecretString`s, whose
//! `Debug` prints nothing.

pub mod audit;
pub mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use crate::cli::{LogFormat, LogLevel};

pub fn init(level: LogLevel, format: LogFormat) {
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
        .with_writer(std::io::stderr);
    // A second init (tests calling the library twice) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
}

/// Prints an error that ends a command, once: `error: …` on stderr as text, or one JSON
/// log object with `--log-format json` so that log pipelines see it too.
pub fn report_error(format: LogFormat, error: &anyhow::Error) {
    let message = format!("{error:#}");
    match format {
        LogFormat::Text => eprintln!("error: {message}"),
        LogFormat::Json => tracing::error!(target: "sentry", "{message}"),
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
