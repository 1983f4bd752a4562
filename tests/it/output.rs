//! What Sentry prints, through the real binary: closed pipes, colour under a terminal,
//! shell completions, the man page, GitHub annotations, and flattened JSON logs.

use std::process::{Command, Stdio};

use regex::Regex;

use crate::support::{closed_pipe, commit, run, sentry, sentry_bin, tempdir, write};
use crate::watch::Fixture;

/// A configuration with problems on lines 3, 6 and 15 (and an unused group).
const BROKEN_YAML: &str = "\
groups:
  g:
    max_parallel: 0
repositories:
  - name: app
    group: nope
    monitor:
      repo_url: https://github.com/o/r
      repo_type: github
      branches: [main]
    deploy:
      qa_repo_url: https://github.com/o/qa
      qa_repo_branch: main
      commands: [\"true\"]
    extra_key: 1
";

const VALID_YAML: &str = "\
groups:
  g: {}
repositories:
  - name: app
    group: g
    monitor: {repo_url: https://github.com/o/r, repo_type: github, branches: [main]}
    deploy: {qa_repo_url: https://github.com/o/qa, qa_repo_branch: main, commands: [\"true\"]}
";

#[test]
fn closed_stdout_ends_output_quietly_with_exit_0() {
    let dir = tempdir();
    write(dir.path(), "sentry.yaml", VALID_YAML);
    for args in [&["config-schema"][..], &["validate"], &["--help"]] {
        let out = sentry(dir.path())
            .args(args)
            .stdout(closed_pipe())
            .output()
            .expect("run sentry");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn closed_stdout_and_stderr_never_abandon_a_deployment() {
    let f = Fixture::new("server: {enabled: false}\n", 0);
    assert_eq!(f.once().code, Some(0), "baseline");
    let new = commit(&f.watched, "second");
    let status = sentry(f.root())
        .arg("-c")
        .arg(&f.config)
        .args(["--log-level", "debug", "watch", "--once"])
        .stdout(closed_pipe())
        .stderr(closed_pipe())
        .status()
        .expect("run sentry");
    assert_eq!(status.code(), Some(0));
    assert_eq!(f.deploys().len(), 1, "the deployment did not run");
    assert!(f.deploys()[0].contains(&new), "{:?}", f.deploys());
    assert_eq!(
        f.state()["repositories"]["app"]["branches"]["main"]["last_deploy"]["result"],
        "succeeded"
    );
}

/// Runs `sentry ARGS` under a pseudo-terminal (util-linux `script`), returning what the
/// terminal showed (stdout and stderr together).
fn under_terminal(dir: &std::path::Path, args: &str, no_color: bool) -> String {
    let mut cmd = Command::new("script");
    cmd.current_dir(dir)
        .args(["-qec", &format!("{} {args}", sentry_bin()), "/dev/null"])
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .env_remove("SENTRY_LOG_FORMAT")
        .stdin(Stdio::null());
    if no_color {
        cmd.env("NO_COLOR", "1");
    }
    let out = cmd.output().expect("run script");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn no_color_under_a_terminal_gives_no_escape_codes() {
    let f = Fixture::new("server: {enabled: false}\n", 0);
    let args = format!("-c {} watch --once", f.config.display());
    // The control: on a terminal, logs are coloured by default.
    let coloured = under_terminal(f.root(), &args, false);
    assert!(
        coloured.contains('\x1b'),
        "no colour on a terminal: {coloured}"
    );
    assert!(coloured.contains("INFO"), "{coloured}");

    let plain = under_terminal(f.root(), &args, true);
    assert!(plain.contains("INFO"), "{plain}");
    assert!(
        !plain.contains('\x1b'),
        "escape codes with NO_COLOR: {plain:?}"
    );

    let never = under_terminal(f.root(), &format!("--color never {args}"), false);
    assert!(
        never.contains("INFO") && !never.contains('\x1b'),
        "{never:?}"
    );
}

#[test]
fn bash_completions_load() {
    let script = format!(
        "source <('{}' completions bash) && complete -p sentry",
        sentry_bin()
    );
    let out = run(Command::new("bash").args(["--norc", "-c", &script]));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("sentry"), "{out:?}");
    for shell in ["zsh", "fish", "powershell"] {
        let out = run(Command::new(sentry_bin()).args(["completions", shell]));
        assert_eq!(out.code, Some(0), "{shell}: {out:?}");
        assert!(out.stdout.contains("validate"), "{shell}: {}", out.stdout);
    }
}

#[test]
fn man_page_renders_with_man() {
    let dir = tempdir();
    let page = run(Command::new(sentry_bin()).arg("man"));
    assert_eq!(page.code, Some(0), "{page:?}");
    let path = write(dir.path(), "sentry.1", &page.stdout);
    let out = run(Command::new("man")
        .arg("-l")
        .arg(&path)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .env_remove("MAN_KEEP_FORMATTING"));
    assert_eq!(out.code, Some(0), "{out:?}");
    for needle in ["NAME", "SYNOPSIS", "validate", "--log-format", "Exit codes"] {
        assert!(out.stdout.contains(needle), "{needle}: {}", out.stdout);
    }

    // `make install` writes a page per command too.
    let pages = dir.path().join("man1");
    std::fs::create_dir(&pages).expect("mkdir");
    let written = run(Command::new(sentry_bin())
        .args(["man", "--dir"])
        .arg(&pages));
    assert_eq!(written.code, Some(0), "{written:?}");
    let out = run(Command::new("man")
        .arg("-l")
        .arg(pages.join("sentry-validate.1"))
        .env("MANPAGER", "cat")
        .env_remove("MAN_KEEP_FORMATTING"));
    assert_eq!(out.code, Some(0), "{out:?}");
    for needle in ["sentry-validate", "--format", "github", "Examples"] {
        assert!(out.stdout.contains(needle), "{needle}: {}", out.stdout);
    }
    assert!(pages.join("sentry.1").is_file() && pages.join("sentry-watch.1").is_file());
}

#[test]
fn validate_github_format_is_workflow_command_syntax_sorted_by_line() {
    let dir = tempdir();
    write(dir.path(), "sentry.yaml", BROKEN_YAML);
    let out = run(sentry(dir.path()).args(["validate", "--format", "github"]));
    assert_eq!(out.code, Some(1), "{out:?}");
    // ::error|warning, then properties file (escaped), optional line and col, then the
    // message with no raw CR or LF.
    let syntax =
        Regex::new(r"^::(error|warning) file=[^,:\r\n]+(,line=(\d+)(,col=\d+)?)?::[^\r\n]+$")
            .expect("regex");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines.len() >= 3, "{}", out.stdout);
    let mut numbers = Vec::new();
    for line in &lines {
        let caps = syntax
            .captures(line)
            .unwrap_or_else(|| panic!("not an annotation: {line}"));
        if let Some(n) = caps.get(3) {
            numbers.push(n.as_str().parse::<usize>().expect("line number"));
        }
    }
    assert!(
        numbers.windows(2).all(|w| w[0] <= w[1]),
        "not sorted: {numbers:?}"
    );
    for (line, key) in [(3, "max_parallel"), (6, "group"), (15, "extra_key")] {
        assert!(
            lines.iter().any(|l| l.starts_with("::error")
                && l.contains(&format!("line={line},"))
                && l.contains(key)),
            "no error on line {line}: {}",
            out.stdout
        );
    }
    // -o is --format, and text output is sorted by line too.
    let text = run(sentry(dir.path()).args(["validate", "-o", "text"]));
    let text_lines: Vec<usize> = text
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("sentry.yaml:"))
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .collect();
    assert!(text_lines.len() >= 3, "{}", text.stdout);
    assert!(
        text_lines.windows(2).all(|w| w[0] <= w[1]),
        "{text_lines:?}"
    );
}

#[test]
fn json_log_lines_carry_fields_at_top_level() {
    let f = Fixture::new("server: {enabled: false}\n", 0);
    assert_eq!(f.once().code, Some(0), "baseline");
    commit(&f.watched, "second");
    let out = run(sentry(f.root()).arg("-c").arg(&f.config).args([
        "--log-format",
        "json",
        "watch",
        "--once",
    ]));
    assert_eq!(out.code, Some(0), "{out:?}");
    let events: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!events.is_empty());
    for event in &events {
        assert!(event["message"].is_string(), "{event}");
        assert!(event.get("fields").is_none(), "nested fields: {event}");
    }
    assert!(
        events.iter().any(|e| e["repository"] == "app"),
        "no event with a top-level repository field: {}",
        out.stderr
    );
    // Every line of a unit — Sentry's and the commands' output — carries the unit's span
    // fields (group run and unit) at the top level.
    let unit_lines: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("running command") || m.starts_with("unit "))
                || e["target"] == "sentry::deploy::output"
        })
        .collect();
    assert!(unit_lines.len() >= 3, "{}", out.stderr);
    for e in unit_lines {
        for key in ["group", "run_id", "repository", "branch", "sha"] {
            assert!(e[key].is_string(), "{key} missing at the top level: {e}");
        }
        assert_eq!(e["branch"], "main", "{e}");
    }
    // Audit records are fields too, not a JSON string inside the message.
    let audit = events
        .iter()
        .find(|e| e["target"] == "audit" && e["kind"] == "unit")
        .unwrap_or_else(|| panic!("no audit event: {}", out.stderr));
    assert_eq!(audit["result"], "succeeded", "{audit}");
    assert!(
        !audit["message"].as_str().unwrap_or("").contains('{'),
        "{audit}"
    );
}

#[test]
fn start_up_errors_are_json_under_log_format_json() {
    let dir = tempdir();
    for args in [
        &[
            "--log-format",
            "json",
            "-c",
            "missing.yaml",
            "watch",
            "--once",
        ][..],
        &["--log-format=json", "-action=bogus"],
        &["--log-format", "json", "validate", "--bogus"],
    ] {
        let out = run(sentry(dir.path()).args(args));
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        let event: serde_json::Value = serde_json::from_str(out.stderr.trim())
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON line ({e}): {}", out.stderr));
        assert_eq!(event["level"], "ERROR", "{event}");
        assert!(event["message"].is_string(), "{event}");
    }
}

#[test]
fn status_colours_results_only_when_asked_or_on_a_terminal() {
    let f = Fixture::new("server: {enabled: false}\n", 0);
    assert_eq!(f.once().code, Some(0), "baseline");
    commit(&f.watched, "second");
    assert_eq!(f.once().code, Some(0), "deploy");
    let status = |args: &[&str]| {
        run(sentry(f.root())
            .arg("-c")
            .arg(&f.config)
            .args(args)
            .env_remove("NO_COLOR"))
    };
    // A pipe is not a terminal: plain text, aligned as before.
    let piped = status(&["status"]);
    assert!(piped.stdout.contains("succeeded at"), "{piped:?}");
    assert!(!piped.stdout.contains('\x1b'), "{piped:?}");
    let forced = status(&["--color", "always", "status"]);
    assert!(
        forced.stdout.contains("\x1b[32msucceeded\x1b[0m at"),
        "{forced:?}"
    );
    // Colour does not shift the columns: the header is as wide as the plain one.
    assert_eq!(
        forced.stdout.lines().next(),
        piped.stdout.lines().next(),
        "{forced:?}"
    );
    let terminal = under_terminal(f.root(), &format!("-c {} status", f.config.display()), true);
    assert!(
        terminal.contains("succeeded") && !terminal.contains('\x1b'),
        "{terminal:?}"
    );
}
