//! The command line: clap definitions, and the rewrite that lets the seed's Go-style flags
//! (`sentry -action=watch -config=x.yaml`) mean exactly what the subcommand form means.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

pub const EXIT_CODES_HELP: &str = "\
Examples:
  sentry validate
  sentry watch
  sentry trigger --repo rag-project --dry-run
  sentry status -o json
  source <(sentry completions bash)

Exit codes:
  0  success
  1  the job failed: invalid configuration (validate), a failed deployment (trigger, watch --once)
  2  Sentry could not do its job: usage error, unreadable, missing or (outside validate)
     invalid config file, I/O failure

Go-style flags work too: `sentry -action=watch -config=sentry.yaml` is `sentry --config=sentry.yaml watch`.";

#[derive(Debug, Parser)]
#[command(
    name = "sentry",
    version = crate::build_info::VERSION_LINE,
    about = "Watches Git repositories and deploys QA pipelines for whole groups of them when a watched branch moves.",
    after_help = EXIT_CODES_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        short,
        long,
        global = true,
        env = "SENTRY_CONFIG",
        default_value = "sentry.yaml",
        help_heading = GLOBAL_HEADING
    )]
    pub config: PathBuf,

    /// File of KEY=value lines loaded into the environment (default: `.env` when it exists).
    #[arg(long, global = true, value_name = "PATH", help_heading = GLOBAL_HEADING)]
    pub env_file: Option<PathBuf>,

    /// Log level; RUST_LOG directives are honoured on top of it.
    #[arg(long, global = true, env = "SENTRY_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info, help_heading = GLOBAL_HEADING)]
    pub log_level: LogLevel,

    /// Log format on stderr: `text` for people, `json` (one object per line) for log pipelines.
    #[arg(long, global = true, env = "SENTRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, help_heading = GLOBAL_HEADING)]
    pub log_format: LogFormat,

    /// Colour in logs and tables: `auto` only on a terminal and when NO_COLOR is unset.
    #[arg(long, global = true, value_enum, value_name = "WHEN", default_value_t = ColorChoice::Auto, help_heading = GLOBAL_HEADING)]
    pub color: ColorChoice,

    #[command(subcommand)]
    pub command: Command,
}

/// The help heading of the options every subcommand accepts.
const GLOBAL_HEADING: &str = "Global options";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// `validate`'s output: `github` is GitHub Actions' workflow-command annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ValidateFormat {
    Text,
    Json,
    Github,
}

const VALIDATE_EXAMPLES: &str = "\
Examples:
  sentry validate
  sentry -c deploy/sentry.yaml validate -o json
  sentry validate --format github        # annotations for GitHub Actions";

const TRIGGER_EXAMPLES: &str = "\
Examples:
  sentry trigger --repo rag-project --dry-run
  sentry trigger --repo rag-project --branch main --sha \"$(git rev-parse HEAD)\"
  sentry trigger --group ai-blueprints
  sentry trigger --group ai-blueprints --no-report   # no commit statuses, no notifications
  sentry -config=sentry.yaml -action=trigger -repo=rag-project   # Go-style flags";

const WATCH_EXAMPLES: &str = "\
Examples:
  sentry watch
  sentry watch --once                    # one cycle and the deployments it causes
  sentry --log-format json watch --listen 127.0.0.1:9090
  sentry -action=watch                   # Go-style flags";

const STATUS_EXAMPLES: &str = "\
Examples:
  sentry status
  sentry status -o json
  sentry status --server http://127.0.0.1:8080
  SENTRY_READ_TOKEN=… sentry status --server https://sentry.example.com";

const CONFIG_SCHEMA_EXAMPLES: &str = "\
Examples:
  sentry config-schema > sentry.schema.json";

const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  source <(sentry completions bash)
  sentry completions zsh > \"${fpath[1]}/_sentry\"
  sentry completions fish > ~/.config/fish/completions/sentry.fish";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the configuration and report every problem at once.
    #[command(after_help = VALIDATE_EXAMPLES)]
    Validate(ValidateArgs),
    /// Deploy repositories now, by hand, under their group's strategy.
    #[command(after_help = TRIGGER_EXAMPLES)]
    Trigger(TriggerArgs),
    /// Poll the watched branches and deploy their groups when they move.
    #[command(after_help = WATCH_EXAMPLES)]
    Watch(WatchArgs),
    /// Show the last handled SHA and deployment of every watched branch (reads the state file).
    #[command(after_help = STATUS_EXAMPLES)]
    Status(StatusArgs),
    /// Print the JSON Schema of the configuration file.
    #[command(after_help = CONFIG_SCHEMA_EXAMPLES)]
    ConfigSchema,
    /// Print a shell completion script.
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions(CompletionsArgs),
    /// Print the man page (roff), or write one page per command; `make install` installs them.
    #[command(hide = true)]
    Man(ManArgs),
    /// Run one unit inside a Kubernetes Job's pod (the kubernetes executor's entry point;
    /// the unit comes from `SENTRY_EXEC_UNIT`).
    #[command(hide = true)]
    ExecUnit,
}

impl Command {
    /// The names `-action=` accepts.
    pub fn names() -> Vec<String> {
        Cli::command()
            .get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| c.get_name().to_owned())
            .filter(|n| n != "help")
            .collect()
    }
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// `json` prints the diagnostics as JSON (path, line, column, severity, message);
    /// `github` prints GitHub Actions annotations, so CI marks the lines.
    #[arg(short = 'o', long, value_enum, default_value_t = ValidateFormat::Text)]
    pub format: ValidateFormat,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write sentry.1 and a page per command (sentry-validate.1, …) into this directory.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct TriggerArgs {
    /// Repository to deploy (repeatable).
    #[arg(long = "repo", value_name = "NAME", required_unless_present = "group")]
    pub repos: Vec<String>,
    /// Deploy every repository of this group.
    #[arg(long, value_name = "NAME", conflicts_with = "repos")]
    pub group: Option<String>,
    /// Branch to deploy (default: the repository's first exact branch).
    #[arg(long)]
    pub branch: Option<String>,
    /// Commit to deploy (default: the branch's current head, asked from the forge).
    #[arg(long)]
    pub sha: Option<String>,
    /// Print the plan and run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep QA checkouts in work_dir for debugging.
    #[arg(long)]
    pub keep_workdir: bool,
    /// Post no commit statuses and send no notifications for this run.
    #[arg(long)]
    pub no_report: bool,
    /// `json` prints one JSON document with every run and unit (command output then goes
    /// to the log only).
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Run one cycle and the deployments it causes, then exit.
    #[arg(long)]
    pub once: bool,
    /// Address of the HTTP server (overrides server.listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// Keep QA checkouts in work_dir for debugging.
    #[arg(long)]
    pub keep_workdir: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// `json` for scripts.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// Ask a running `watch` at URL for its live view (runs, pending changes, backoffs,
    /// rate limits) instead of reading the state file.
    #[arg(long, value_name = "URL")]
    pub server: Option<url::Url>,
    /// The server's `server.read_token`, when it has one.
    #[arg(
        long,
        env = "SENTRY_READ_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

/// A usage error found before clap sees the arguments.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("-action needs a value; valid actions: {}", .valid.join(", "))]
    MissingAction { valid: Vec<String> },
    #[error("unknown action \"{action}\"; valid actions: {}", .valid.join(", "))]
    UnknownAction { action: String, valid: Vec<String> },
}

/// Rewrites Go-style arguments into clap's form:
/// `-action=X`/`-action X`/`--action=X` becomes the subcommand `X`, placed first, and a
/// single-dash long option (`-config=x`, `-repo x`) becomes `--config=x`.
pub fn normalize_args<I>(args: I) -> Result<Vec<OsString>, UsageError>
where
    I: IntoIterator<Item = OsString>,
{
    let mut args = args.into_iter();
    let program = args.next().unwrap_or_else(|| OsString::from("sentry"));
    let long_names = long_option_names();
    let valid = Command::names();
    let mut action = None;
    let mut rest = Vec::new();
    let mut pending_action = false;
    for arg in args {
        if pending_action {
            action = Some(arg.to_string_lossy().into_owned());
            pending_action = false;
            continue;
        }
        let Some(text) = arg.to_str() else {
            rest.push(arg);
            continue;
        };
        let (name, value) = match text.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (text, None),
        };
        if name == "-action" || name == "--action" {
            match value {
                Some(v) => action = Some(v.to_owned()),
                None => pending_action = true,
            }
        } else if let Some(long) = name
            .strip_prefix('-')
            .filter(|n| !n.starts_with('-') && n.len() > 1)
        {
            if long_names.iter().any(|n| n == long) {
                rest.push(OsString::from(format!("-{text}")));
            } else {
                rest.push(arg);
            }
        } else {
            rest.push(arg);
        }
    }
    if pending_action {
        return Err(UsageError::MissingAction { valid });
    }
    let mut out = vec![program];
    if let Some(action) = action {
        if !valid.contains(&action) {
            return Err(UsageError::UnknownAction { action, valid });
        }
        out.push(OsString::from(action));
    }
    out.extend(rest);
    Ok(out)
}

/// The options that matter before the command line parses — the log format and colour of
/// a usage error — read from the raw arguments and the environment, best effort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EarlyOptions {
    pub log_format: LogFormat,
    pub color: ColorChoice,
}

pub fn early_options(args: &[OsString]) -> EarlyOptions {
    let env_format = std::env::var("SENTRY_LOG_FORMAT").ok();
    let log_format = raw_option(args, "log-format")
        .or(env_format)
        .and_then(|v| LogFormat::from_str(&v, true).ok())
        .unwrap_or(LogFormat::Text);
    let color = raw_option(args, "color")
        .and_then(|v| ColorChoice::from_str(&v, true).ok())
        .unwrap_or(ColorChoice::Auto);
    EarlyOptions { log_format, color }
}

/// The last value of `--NAME=V`, `--NAME V` or their Go-style single-dash forms.
fn raw_option(args: &[OsString], name: &str) -> Option<String> {
    let mut found = None;
    let mut iter = args.iter().filter_map(|a| a.to_str());
    while let Some(arg) = iter.next() {
        let Some(rest) = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .and_then(|a| a.strip_prefix(name))
        else {
            continue;
        };
        if let Some(value) = rest.strip_prefix('=') {
            found = Some(value.to_owned());
        } else if rest.is_empty() {
            found = iter.next().map(str::to_owned);
        }
    }
    found
}

/// Every `--long` option name of the program and its subcommands.
fn long_option_names() -> Vec<String> {
    let root = Cli::command();
    let mut names: Vec<String> = Vec::new();
    let mut collect = |cmd: &clap::Command| {
        names.extend(
            cmd.get_arguments()
                .filter_map(|a| a.get_long())
                .map(str::to_owned),
        );
    };
    collect(&root);
    for sub in root.get_subcommands() {
        collect(sub);
    }
    names.extend(["help".to_owned(), "version".to_owned()]);
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        normalize_args(args.iter().map(OsString::from))
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn early_options_read_both_flag_forms() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let early = early_options(&args(&["sentry", "--log-format", "json", "-color=never"]));
        assert_eq!(early.log_format, LogFormat::Json);
        assert_eq!(early.color, ColorChoice::Never);
        let early = early_options(&args(&["sentry", "--log-format=json", "--colorx", "x"]));
        assert_eq!(early.log_format, LogFormat::Json);
        assert_eq!(early.color, ColorChoice::Auto);
    }

    #[test]
    fn short_o_is_format() {
        let cli = Cli::try_parse_from(["sentry", "validate", "-o", "github"]).unwrap();
        let Command::Validate(v) = cli.command else {
            panic!("not validate")
        };
        assert_eq!(v.format, ValidateFormat::Github);
    }

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    #[test]
    fn action_forms_become_the_subcommand() {
        for args in [
            &["sentry", "-action=watch"][..],
            &["sentry", "-action", "watch"],
            &["sentry", "--action=watch"],
            &["sentry", "--action", "watch"],
        ] {
            assert_eq!(norm(args), ["sentry", "watch"]);
        }
    }

    #[test]
    fn single_dash_long_options_become_double_dash() {
        assert_eq!(
            norm(&[
                "sentry",
                "-config=x.yaml",
                "-action=trigger",
                "-repo=rag",
                "-sha",
                "abc"
            ]),
            [
                "sentry",
                "trigger",
                "--config=x.yaml",
                "--repo=rag",
                "--sha",
                "abc"
            ]
        );
        assert_eq!(
            norm(&["sentry", "-c", "x.yaml", "validate"]),
            ["sentry", "-c", "x.yaml", "validate"]
        );
    }

    #[test]
    fn go_style_parses_like_subcommand_style() {
        let go = Cli::try_parse_from(norm(&[
            "sentry",
            "-config=x.yaml",
            "-action=trigger",
            "-repo=a",
            "-repo",
            "b",
            "-dry-run",
        ]))
        .unwrap();
        let Command::Trigger(t) = go.command else {
            panic!("not trigger")
        };
        assert_eq!(go.config, PathBuf::from("x.yaml"));
        assert_eq!(t.repos, ["a", "b"]);
        assert!(t.dry_run);
    }

    #[test]
    fn unknown_or_missing_action_lists_valid_ones() {
        let err = normalize_args(["sentry", "-action=deploy"].map(OsString::from)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("\"deploy\"") && text.contains("watch") && text.contains("validate"),
            "{text}"
        );
        assert!(matches!(
            normalize_args(["sentry", "-action"].map(OsString::from)),
            Err(UsageError::MissingAction { .. })
        ));
    }
}
