//! The command line and `validate`, through the real binary.

use crate::support::{run, sentry, tempdir, write};

const SEED: &str = include_str!("../data/seed.yaml");
const GITHUB_TOKEN: &str = "ghp_TOPSECRETvalue0123456789";
const GITLAB_TOKEN: &str = "glpat-TOPSECRETvalue987654";

fn with_seed_env(cmd: &mut std::process::Command) -> &mut std::process::Command {
    cmd.env("GITHUB_USERNAME", "octo")
        .env("GITHUB_TOKEN", GITHUB_TOKEN)
        .env("GITLAB_USERNAME", "qa")
        .env("GITLAB_TOKEN", GITLAB_TOKEN)
}

#[test]
fn seed_example_validates() {
    let dir = tempdir();
    write(dir.path(), "sentry.yaml", SEED);
    let out = run(with_seed_env(&mut sentry(dir.path())).arg("validate"));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        "config OK: 1 group, 1 repository, 2 branches watched"
    );
}

#[test]
fn shipped_template_validates() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = run(
        with_seed_env(&mut sentry(std::path::Path::new(root))).args([
            "--env-file",
            "env.example",
            "validate",
        ]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
}

/// Each case: what to replace in the seed, with what, and the path the error must name.
const BROKEN: &[(&str, &str, &str)] = &[
    (
        "execution_strategy: \"parallel\"",
        "exectuion_strategy: \"parallel\"",
        "groups.ai-blueprints.exectuion_strategy",
    ),
    (
        "execution_strategy: \"parallel\"",
        "execution_strategy: \"random\"",
        "groups.ai-blueprints.execution_strategy",
    ),
    (
        "max_parallel: 3",
        "max_parallel: 0",
        "groups.ai-blueprints.max_parallel",
    ),
    (
        "max_parallel: 3",
        "max_parallel: three",
        "groups.ai-blueprints.max_parallel",
    ),
    (
        "global_timeout: 900",
        "global_timeout: -1",
        "groups.ai-blueprints.global_timeout",
    ),
    (
        "global_timeout: 900",
        "global_timeout: \"soon\"",
        "groups.ai-blueprints.global_timeout",
    ),
    (
        "global_timeout: 900",
        "global_timeout: 99999999",
        "groups.ai-blueprints.global_timeout",
    ),
    (
        "group: \"ai-blueprints\"",
        "group: \"ai-blueprint\"",
        "repositories[0].group",
    ),
    (
        "repo_type: \"github\"",
        "repo_type: \"svn\"",
        "repositories[0].monitor.repo_type",
    ),
    (
        "https://github.com/NVIDIA-AI-Blueprints/rag",
        "https://github.com/NVIDIA-AI-Blueprints",
        "repositories[0].monitor.repo_url",
    ),
    (
        "https://github.com/NVIDIA-AI-Blueprints/rag",
        "not a url at all://x",
        "repositories[0].monitor.repo_url",
    ),
    (
        "https://gitlab-master.nvidia.com/",
        "ssh://gitlab-master.nvidia.com/",
        "repositories[0].deploy.qa_repo_url",
    ),
    (
        "branches: [\"main\", \"v2.3.0-draft\"]",
        "branches: []",
        "repositories[0].monitor.branches",
    ),
    (
        "branches: [\"main\", \"v2.3.0-draft\"]",
        "branches: [main, main]",
        "repositories[0].monitor.branches[1]",
    ),
    (
        "branches: [\"main\", \"v2.3.0-draft\"]",
        "branches: [\"rel/[x\"]",
        "repositories[0].monitor.branches[0]",
    ),
    (
        "      commands:\n        - \"cd .tekton/rag && ./scripts/container-deployment-pipeline-onclick.sh\"",
        "      commands: []",
        "repositories[0].deploy.commands",
    ),
    (
        "      project_name: \"rag\"\n",
        "",
        "repositories[0].deploy.qa_repo_branch",
    ), // made by the next edit
    (
        "token: \"${GITHUB_TOKEN}\"",
        "token: \"${NOT_SET_ANYWHERE}\"",
        "repositories[0].monitor.auth.token",
    ),
    ("    monitor:\n", "    monitr:\n", "repositories[0].monitr"),
];

#[test]
fn broken_configs_exit_1_naming_the_path() {
    let dir = tempdir();
    for (i, (from, to, path)) in BROKEN.iter().enumerate() {
        assert!(SEED.contains(from), "case {i}: seed lacks {from:?}");
        let mut text = SEED.replacen(from, to, 1);
        if *path == "repositories[0].deploy.qa_repo_branch" {
            text = text.replacen("      qa_repo_branch: \"rag-tekton-workflow\"\n", "", 1);
        }
        let file = write(dir.path(), &format!("broken-{i}.yaml"), &text);
        let out = run(with_seed_env(&mut sentry(dir.path()))
            .arg("-c")
            .arg(&file)
            .arg("validate"));
        assert_eq!(out.code, Some(1), "case {i} ({path}): {out:?}");
        assert!(
            out.stdout
                .lines()
                .any(|l| l.contains(&format!("error: {path}: "))),
            "case {i}: no error at {path} in\n{}",
            out.stdout
        );
        assert!(
            !out.all().contains(GITHUB_TOKEN) && !out.all().contains(GITLAB_TOKEN),
            "case {i} leaked a token"
        );
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let dir = tempdir();
    let text = SEED
        .replacen("max_parallel: 3", "max_parallel: 0", 1)
        .replacen("repo_type: \"github\"", "repo_type: \"svn\"", 1)
        .replacen("global_timeout: 900", "global_timeout: 0", 1);
    write(dir.path(), "sentry.yaml", &text);
    let out = run(with_seed_env(&mut sentry(dir.path())).arg("validate"));
    assert_eq!(out.code, Some(1));
    assert_eq!(out.stdout.matches(": error: ").count(), 3, "{}", out.stdout);
    assert!(out.stdout.contains("config invalid: 3 errors"));
}

#[test]
fn errors_carry_line_and_column() {
    let dir = tempdir();
    write(
        dir.path(),
        "sentry.yaml",
        &SEED.replacen("max_parallel: 3", "max_parallel: 0", 1),
    );
    let out = run(with_seed_env(&mut sentry(dir.path())).arg("validate"));
    let line = SEED
        .lines()
        .position(|l| l.contains("max_parallel"))
        .unwrap()
        + 1;
    assert!(
        out.stdout.contains(&format!(
            "sentry.yaml:{line}:5: error: groups.ai-blueprints.max_parallel"
        )),
        "{}",
        out.stdout
    );
}

#[test]
fn json_format_lists_diagnostics() {
    let dir = tempdir();
    write(
        dir.path(),
        "sentry.yaml",
        &SEED.replacen("max_parallel: 3", "max_parallel: 0", 1),
    );
    let out = run(with_seed_env(&mut sentry(dir.path())).args(["validate", "--format", "json"]));
    assert_eq!(out.code, Some(1));
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(report["valid"], false);
    let d = &report["diagnostics"][0];
    assert_eq!(d["path"], "groups.ai-blueprints.max_parallel");
    assert_eq!(d["severity"], "error");
    assert!(d["line"].is_u64() && d["column"].is_u64() && d["message"].is_string());
}

#[test]
fn go_style_spellings_work_like_subcommands() {
    let dir = tempdir();
    write(dir.path(), "other.yaml", SEED);
    for args in [
        &["-config=other.yaml", "-action=validate"][..],
        &["-config", "other.yaml", "-action", "validate"],
        &["--action=validate", "--config=other.yaml"],
        &["-action=validate", "-config=other.yaml", "-format=json"],
        &["--config", "other.yaml", "validate"],
    ] {
        let out = run(with_seed_env(&mut sentry(dir.path())).args(args));
        assert_eq!(out.code, Some(0), "{args:?}: {out:?}");
    }
}

#[test]
fn unknown_action_is_a_usage_error_listing_valid_ones() {
    let out = run(sentry(&std::env::temp_dir()).arg("-action=deploy"));
    assert_eq!(out.code, Some(2));
    for name in ["validate", "trigger", "watch", "status"] {
        assert!(out.stderr.contains(name), "{}", out.stderr);
    }
}

#[test]
fn missing_config_file_exits_2() {
    let dir = tempdir();
    let out = run(sentry(dir.path()).args(["-c", "nope.yaml", "validate"]));
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("nope.yaml"), "{}", out.stderr);
}

#[test]
fn named_env_file_must_exist_and_dot_env_is_read() {
    let dir = tempdir();
    write(dir.path(), "sentry.yaml", SEED);
    let out = run(sentry(dir.path()).args(["--env-file", "missing.env", "validate"]));
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("missing.env"));
    write(
        dir.path(),
        ".env",
        "GITHUB_USERNAME=a\nGITHUB_TOKEN=b\nGITLAB_USERNAME=c\nGITLAB_TOKEN=d\n",
    );
    let out = run(sentry(dir.path()).arg("validate"));
    assert_eq!(out.code, Some(0), "{out:?}");
}

#[test]
fn version_names_commit_and_date() {
    let out = run(sentry(&std::env::temp_dir()).arg("--version"));
    assert_eq!(out.code, Some(0));
    let line = out.stdout.trim();
    assert!(
        line.starts_with(&format!("sentry {}", env!("CARGO_PKG_VERSION"))),
        "{line}"
    );
    assert!(
        line.contains("(commit ") && line.contains(", built "),
        "{line}"
    );
}

#[test]
fn help_documents_exit_codes() {
    let out = run(sentry(&std::env::temp_dir()).arg("--help"));
    assert_eq!(out.code, Some(0));
    assert!(out.stdout.contains("Exit codes:") && out.stdout.contains("-action=watch"));
}

#[test]
fn shipped_schema_is_current() {
    let out = run(sentry(&std::env::temp_dir()).arg("config-schema"));
    assert_eq!(out.code, Some(0));
    let shipped = include_str!("../../sentry.schema.json");
    assert_eq!(
        out.stdout.trim(),
        shipped.trim(),
        "sentry.schema.json is stale: run `sentry config-schema > sentry.schema.json`"
    );
}

#[test]
fn tokens_never_appear_in_output() {
    let dir = tempdir();
    let text = SEED
        .replacen("max_parallel: 3", "max_parallel: 0\n    junk: 1", 1)
        .replacen(
            "https://github.com/NVIDIA-AI-Blueprints/rag",
            "http://github.example.com/a/b",
            1,
        )
        .replacen(
            "repo_type: \"github\"",
            "repo_type: \"github\"\n      api_url: \"http://github.example.com/api/v3\"",
            1,
        );
    write(dir.path(), "sentry.yaml", &text);
    for format in ["text", "json"] {
        let out = run(with_seed_env(&mut sentry(dir.path())).args([
            "--log-level",
            "trace",
            "validate",
            "--format",
            format,
        ]));
        assert_eq!(out.code, Some(1));
        assert!(out.stdout.contains("unencrypted"), "{}", out.stdout);
        assert!(!out.all().contains(GITHUB_TOKEN) && !out.all().contains(GITLAB_TOKEN));
    }
}

#[test]
fn commands_other_than_validate_exit_2_on_an_unusable_config() {
    let dir = tempdir();
    write(
        dir.path(),
        "sentry.yaml",
        &SEED.replacen("max_parallel: 3", "max_parallel: 0", 1),
    );
    for args in [
        &["watch", "--once"][..],
        &["status"],
        &["trigger", "--repo", "rag-project", "--dry-run"],
    ] {
        let out = run(with_seed_env(&mut sentry(dir.path())).args(args));
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("groups.ai-blueprints.max_parallel"),
            "{args:?}: {}",
            out.stderr
        );
    }
}
