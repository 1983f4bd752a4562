use super::*;
use crate::config::{Severity, load_str};
use secrecy::ExposeSecret;

const SEED: &str = include_str!("../../../tests/data/seed.yaml");

fn seed_env() -> Env {
    Env::fixed([
        ("GITHUB_USERNAME", "octo"),
        ("GITHUB_TOKEN", "ghp_seedtokenvalue"),
        ("GITLAB_USERNAME", "qa"),
        ("GITLAB_TOKEN", "glpat-seedtokenvalue"),
    ])
}

/// Diagnostics of `yaml` as (severity, path, message) for compact assertions.
fn diags(yaml: &str) -> Vec<(Severity, String, String)> {
    load_str(yaml, &seed_env())
        .diagnostics
        .into_iter()
        .map(|d| (d.severity, d.path, d.message))
        .collect()
}

fn errors_at(yaml: &str, path: &str) -> Vec<String> {
    diags(yaml)
        .into_iter()
        .filter(|(s, p, _)| *s == Severity::Error && p == path)
        .map(|(_, _, m)| m)
        .collect()
}

/// The seed with one line replaced.
fn seed_with(from: &str, to: &str) -> String {
    assert!(SEED.contains(from), "seed has no {from:?}");
    SEED.replacen(from, to, 1)
}

#[test]
fn seed_example_validates_unchanged() {
    let loaded = load_str(SEED, &seed_env());
    assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
    let config = loaded.config.unwrap();
    let repo = &config.repositories[0];
    assert_eq!(repo.monitor.project_path, "NVIDIA-AI-Blueprints/rag");
    assert_eq!(
        repo.monitor.api_url.as_ref().unwrap().as_str(),
        "https://api.github.com/"
    );
    assert_eq!(repo.deploy.repo_type, RepoType::Gitlab);
    let group = &config.groups[0];
    assert_eq!(group.global_timeout, Duration::from_secs(900));
    assert_eq!(group.max_parallel, Some(3));
    assert!(group.continue_on_error);
    assert_eq!(config.polling_interval, Duration::from_secs(60));
}

#[test]
fn defaults_apply() {
    let yaml = "groups: {g: }\nrepositories:\n  - name: a\n    group: g\n    monitor: {repo_url: /tmp/x, branches: [main], repo_type: git}\n    deploy: {qa_repo_url: /tmp/qa, qa_repo_branch: main, commands: [\"true\"]}\n";
    let config = load_str(yaml, &seed_env()).config.unwrap();
    let g = &config.groups[0];
    assert_eq!(g.execution_strategy, Strategy::Parallel);
    assert_eq!(g.max_parallel, Some(4), "a finite default");
    assert!(config.max_concurrent_units >= 2);
    assert_eq!(config.pending_retry, crate::config::PendingRetry::default());
    assert!(!g.continue_on_error);
    assert_eq!(g.deploy_scope, DeployScope::Changed);
    let d = &config.repositories[0].deploy;
    assert_eq!(
        (d.retries, d.shell.as_str(), d.project_name.as_str()),
        (0, "/bin/sh", "a")
    );
    assert_eq!(config.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.shutdown_grace, Duration::from_secs(20));
}

#[test]
fn unset_variable_names_variable_and_field() {
    let loaded = load_str(
        SEED,
        &Env::fixed([
            ("GITHUB_USERNAME", "x"),
            ("GITLAB_USERNAME", "y"),
            ("GITLAB_TOKEN", "z"),
        ]),
    );
    let messages: Vec<String> = loaded
        .diagnostics
        .iter()
        .map(|d| format!("{}: {}", d.path, d.message))
        .collect();
    assert!(
        messages.iter().any(|m| m.starts_with(
            "repositories[0].monitor.auth.token: environment variable GITHUB_TOKEN is not set"
        )),
        "{messages:?}"
    );
}

#[test]
fn commands_are_not_expanded() {
    let yaml = seed_with(
        "./scripts/container-deployment-pipeline-onclick.sh",
        "echo ${UNSET_IN_SENTRY} $HOME",
    );
    let config = load_str(&yaml, &seed_env()).config.unwrap();
    assert!(config.repositories[0].deploy.commands[0].ends_with("echo ${UNSET_IN_SENTRY} $HOME"));
}

#[test]
fn durations_accept_seconds_and_text_and_reject_nonsense() {
    for (value, ok) in [
        ("900", true),
        ("\"15m\"", true),
        ("1h30m", true),
        ("0", false),
        ("-5", false),
        ("\"-5s\"", false),
        ("abc", false),
        ("100000000", false),
        ("1.5", false),
    ] {
        let yaml = seed_with("global_timeout: 900", &format!("global_timeout: {value}"));
        let errs = errors_at(&yaml, "groups.ai-blueprints.global_timeout");
        assert_eq!(errs.is_empty(), ok, "{value}: {errs:?}");
    }
}

#[test]
fn strategy_and_max_parallel_are_checked() {
    let yaml = seed_with(
        "execution_strategy: \"parallel\"",
        "execution_strategy: \"paralel\"",
    );
    assert!(
        errors_at(&yaml, "groups.ai-blueprints.execution_strategy")[0]
            .contains("\"parallel\" or \"sequential\"")
    );
    let yaml = seed_with("max_parallel: 3", "max_parallel: 0");
    assert_eq!(
        errors_at(&yaml, "groups.ai-blueprints.max_parallel"),
        ["0 is less than 1"]
    );
}

#[test]
fn undefined_group_suggests_closest() {
    let yaml = seed_with("group: \"ai-blueprints\"", "group: \"ai-blueprint\"");
    let errs = errors_at(&yaml, "repositories[0].group");
    assert!(
        errs[0].contains("did you mean \"ai-blueprints\""),
        "{errs:?}"
    );
}

#[test]
fn unused_group_is_a_warning() {
    let yaml = seed_with("groups:\n", "groups:\n  spare: {}\n");
    let d = diags(&yaml);
    assert!(
        d.contains(&(
            Severity::Warning,
            "groups.spare".into(),
            "no repository uses this group".into()
        )),
        "{d:?}"
    );
    assert!(load_str(&yaml, &seed_env()).config.is_some());
}

#[test]
fn duplicate_repository_names() {
    let repo = &SEED[SEED.find("  - name:").unwrap()..];
    let yaml = format!("{SEED}{repo}");
    let errs = errors_at(&yaml, "repositories[1].name");
    assert!(
        errs[0].contains("duplicate repository name \"rag-project\""),
        "{errs:?}"
    );
}

#[test]
fn repo_type_and_urls() {
    let yaml = seed_with("repo_type: \"github\"", "repo_type: \"bitbucket\"");
    assert!(errors_at(&yaml, "repositories[0].monitor.repo_type")[0].contains("unknown repo_type"));
    let yaml = seed_with(
        "https://github.com/NVIDIA-AI-Blueprints/rag",
        "https://github.com/NVIDIA-AI-Blueprints",
    );
    assert!(
        errors_at(&yaml, "repositories[0].monitor.repo_url")[0]
            .contains("owner and the repository")
    );
    let yaml = seed_with(
        "https://github.com/NVIDIA-AI-Blueprints/rag",
        "ftp://github.com/a/b",
    );
    assert!(
        errors_at(&yaml, "repositories[0].monitor.repo_url")[0].contains("unsupported URL scheme")
    );
    let yaml = seed_with(
        "https://github.com/NVIDIA-AI-Blueprints/rag",
        "git@github.com:a/b.git",
    );
    assert!(
        errors_at(&yaml, "repositories[0].monitor.repo_url")[0]
            .contains("use repo_type \"git\" for SSH")
    );
    let yaml = seed_with(
        "https://github.com/NVIDIA-AI-Blueprints/rag",
        "https://user:pw@github.com/a/b",
    );
    let errs = errors_at(&yaml, "repositories[0].monitor.repo_url");
    assert!(
        errs[0].contains("credentials") && !errs[0].contains("pw"),
        "{errs:?}"
    );
    let yaml = seed_with(
        "https://github.com/NVIDIA-AI-Blueprints/rag",
        "file:///srv/rag",
    );
    assert!(errors_at(&yaml, "repositories[0].monitor.repo_url")[0].contains("repo_type \"git\""));
}

#[test]
fn api_url_derivation() {
    let enterprise = seed_with(
        "https://github.com/NVIDIA-AI-Blueprints/rag",
        "https://ghe.example.com/org/rag",
    );
    let config = load_str(&enterprise, &seed_env()).config.unwrap();
    assert_eq!(
        config.repositories[0]
            .monitor
            .api_url
            .as_ref()
            .unwrap()
            .as_str(),
        "https://ghe.example.com/api/v3"
    );
    let gitlab = seed_with(
        "https://github.com/NVIDIA-AI-Blueprints/rag",
        "https://gitlab.example.com/grp/sub/proj.git",
    )
    .replacen("repo_type: \"github\"", "repo_type: \"gitlab\"", 1);
    let config = load_str(&gitlab, &seed_env()).config.unwrap();
    let m = &config.repositories[0].monitor;
    assert_eq!(
        m.api_url.as_ref().unwrap().as_str(),
        "https://gitlab.example.com/api/v4"
    );
    assert_eq!(m.project_path, "grp/sub/proj");
}

#[test]
fn plain_http_token_is_an_error_unless_loopback_or_allowed() {
    let remote = seed_with(
        "https://gitlab-master.nvidia.com/",
        "http://gitlab-master.nvidia.com/",
    );
    let errors = errors_at(&remote, "repositories[0].deploy.qa_repo_url");
    assert!(errors[0].contains("unencrypted"), "{errors:?}");
    assert!(errors[0].contains("allow_insecure_http"), "{errors:?}");
    let allowed = format!("allow_insecure_http: true\n{remote}");
    assert!(
        diags(&allowed)
            .iter()
            .any(|(s, p, m)| *s == Severity::Warning
                && p == "repositories[0].deploy.qa_repo_url"
                && m.contains("unencrypted"))
    );
    let local = seed_with(
        "https://gitlab-master.nvidia.com/",
        "http://127.0.0.1:8080/",
    );
    assert!(diags(&local).is_empty());
}

#[test]
fn branches_are_checked() {
    let yaml = seed_with("branches: [\"main\", \"v2.3.0-draft\"]", "branches: []");
    assert!(errors_at(&yaml, "repositories[0].monitor.branches")[0].contains("at least one"));
    let yaml = seed_with(
        "branches: [\"main\", \"v2.3.0-draft\"]",
        "branches: [main, main]",
    );
    assert!(
        errors_at(&yaml, "repositories[0].monitor.branches[1]")[0].contains("duplicate branch")
    );
    let yaml = seed_with(
        "branches: [\"main\", \"v2.3.0-draft\"]",
        "branches: [\"release/[a-\"]",
    );
    assert!(errors_at(&yaml, "repositories[0].monitor.branches[0]")[0].contains("invalid pattern"));
    let yaml = seed_with(
        "branches: [\"main\", \"v2.3.0-draft\"]",
        "branches: [\"bad..name\"]",
    );
    assert!(
        errors_at(&yaml, "repositories[0].monitor.branches[0]")[0]
            .contains("not a valid branch name")
    );
}

#[test]
fn patterns_do_not_cross_slashes_unless_double_star() {
    let p = BranchPattern::new("release/*").unwrap();
    assert!(p.matches("release/1.0"));
    assert!(!p.matches("release/1.0/fix"));
    assert_eq!(p.literal_prefix(), "release/");
    let p = BranchPattern::new("release/**").unwrap();
    assert!(p.matches("release/1.0/fix"));
}

#[test]
fn commands_must_be_present_and_non_empty() {
    let yaml = seed_with(
        "      commands:\n        - \"cd .tekton/rag && ./scripts/container-deployment-pipeline-onclick.sh\"",
        "      commands: []",
    );
    assert!(
        errors_at(&yaml, "repositories[0].deploy.commands")[0].contains("at least one command")
    );
    let yaml = seed_with(
        "      commands:\n        - \"cd .tekton/rag && ./scripts/container-deployment-pipeline-onclick.sh\"",
        "      commands: [\"  \"]",
    );
    assert_eq!(
        errors_at(&yaml, "repositories[0].deploy.commands[0]"),
        ["command is empty"]
    );
}

#[test]
fn missing_required_fields_are_each_reported() {
    let yaml = "groups: {g: {}}\nrepositories:\n  - group: g\n    monitor: {repo_type: git}\n    deploy: {commands: [x]}\n";
    let paths: Vec<String> = diags(yaml)
        .into_iter()
        .filter(|(s, ..)| *s == Severity::Error)
        .map(|(_, p, _)| p)
        .collect();
    for want in [
        "repositories[0].name",
        "repositories[0].monitor.repo_url",
        "repositories[0].monitor.branches",
        "repositories[0].deploy.qa_repo_url",
        "repositories[0].deploy.qa_repo_branch",
    ] {
        assert!(
            paths.iter().any(|p| p == want),
            "{want} missing from {paths:?}"
        );
    }
}

#[test]
fn wrong_types_are_reported_per_item() {
    let yaml = "groups: {g: {max_parallel: lots}}\nrepositories:\n  - name: a\n    group: g\n    monitor: {repo_url: /x, branches: main, repo_type: git}\n    deploy: {qa_repo_url: /q, qa_repo_branch: main, commands: [x]}\n";
    let d = diags(yaml);
    assert!(
        d.iter()
            .any(|(_, p, m)| p == "groups.g.max_parallel" && m.contains("invalid type")),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|(_, p, m)| p == "repositories[0].monitor.branches" && m.contains("invalid type")),
        "{d:?}"
    );
}

#[test]
fn env_keys_are_checked() {
    let yaml = seed_with(
        "      project_name: \"rag\"",
        "      project_name: \"rag\"\n      env: {SENTRY_BRANCH: x, 9BAD: y, GOOD: \"${GITHUB_USERNAME}\"}",
    );
    assert!(errors_at(&yaml, "repositories[0].deploy.env.SENTRY_BRANCH")[0].contains("reserved"));
    assert!(
        errors_at(&yaml, "repositories[0].deploy.env.9BAD")[0]
            .contains("not a valid environment variable name")
    );
}

#[test]
fn syntax_errors_have_line_and_column() {
    let loaded = load_str("groups:\n  g: [\n", &seed_env());
    let d = &loaded.diagnostics[0];
    assert!(d.message.starts_with("YAML syntax"), "{d:?}");
    assert!(d.line.is_some() && d.column.is_some());
}

#[test]
fn semantic_errors_get_line_numbers() {
    let yaml = seed_with("max_parallel: 3", "max_parallel: 0");
    let loaded = load_str(&yaml, &seed_env());
    let d = loaded
        .diagnostics
        .iter()
        .find(|d| d.path == "groups.ai-blueprints.max_parallel")
        .unwrap();
    let line = SEED
        .lines()
        .position(|l| l.contains("max_parallel"))
        .unwrap()
        + 1;
    assert_eq!(d.line, Some(line));
}

#[test]
fn branch_names_follow_git_rules() {
    for ok in ["main", "release/1.0", "feature/x-y_z", "v2.3.0-draft"] {
        assert!(check_branch_name(ok).is_ok(), "{ok}");
    }
    for bad in ["", "-x", "a..b", "a b", "x.lock", "a/", "a:b", "a\\b", "@"] {
        assert!(check_branch_name(bad).is_err(), "{bad}");
    }
}

#[test]
fn no_secret_in_any_diagnostic() {
    let yaml = seed_with("max_parallel: 3", "max_parallel: -1\n    bogus: 1");
    let all = format!("{:?}", load_str(&yaml, &seed_env()));
    assert!(!all.contains("ghp_seedtokenvalue") && !all.contains("glpat-seedtokenvalue"));
}

const REPORTING: &str = "server: {public_url: 'https://sentry.example.com/'}\ngroups:\n  g:\n    report: {commit_status: true}\n    notify:\n      - {type: webhook, url: 'https://hooks.example.com/x', secret: '${HOOK_SECRET:-s3cr3t-hook}', on: [failure, started]}\n      - {type: slack, url: 'https://hooks.slack.com/services/T/B/XYZ'}\nrepositories:\n  - name: gh\n    group: g\n    monitor: {repo_url: 'https://github.com/o/r', branches: [main], repo_type: github}\n    deploy: {qa_repo_url: /tmp/qa, qa_repo_branch: main, commands: [\"true\"]}\n  - name: gl\n    group: g\n    report: {context: qa/custom}\n    monitor: {repo_url: 'https://gitlab.com/g/p', branches: [main], repo_type: gitlab, auth: {token: '${GITLAB_TOKEN}'}}\n    deploy: {qa_repo_url: /tmp/qa, qa_repo_branch: main, commands: [\"true\"]}\n";

#[test]
fn report_and_notify_are_read_with_defaults() {
    let loaded = load_str(REPORTING, &seed_env());
    assert!(
        loaded.diagnostics.iter().all(|d| !d.is_error()),
        "{:?}",
        loaded.diagnostics
    );
    let config = loaded.config.unwrap();
    let (gh, gl) = (&config.repositories[0], &config.repositories[1]);
    assert_eq!(
        (gh.report.commit_status, gh.report.context.as_str()),
        (true, "sentry/g")
    );
    assert_eq!(
        (gl.report.commit_status, gl.report.context.as_str()),
        (true, "qa/custom"),
        "a repository's report is laid over its group's"
    );
    assert_eq!(
        config.server.run_url("r1").as_deref(),
        Some("https://sentry.example.com/runs/r1")
    );
    let notify = &config.groups[0].notify;
    assert_eq!(notify[0].on, [NotifyEvent::Failure, NotifyEvent::Started]);
    assert_eq!(
        notify[1].on,
        [NotifyEvent::Failure, NotifyEvent::Recovery],
        "default events"
    );
    assert_eq!(notify[1].path, "groups.g.notify[1]");
    let secrets: Vec<String> = config
        .secrets()
        .iter()
        .map(|s| secrecy::ExposeSecret::expose_secret(s).to_owned())
        .collect();
    for secret in [
        "https://hooks.example.com/x",
        "s3cr3t-hook",
        "https://hooks.slack.com/services/T/B/XYZ",
    ] {
        assert!(secrets.iter().any(|s| s == secret), "{secret} is masked");
    }
}

#[test]
fn plain_git_cannot_report_commit_statuses() {
    let own = "groups: {g: }\nrepositories:\n  - name: a\n    group: g\n    report: {commit_status: true}\n    monitor: {repo_url: /tmp/x, branches: [main], repo_type: git}\n    deploy: {qa_repo_url: /tmp/qa, qa_repo_branch: main, commands: [\"true\"]}\n";
    let errors = errors_at(own, "repositories[0].report.commit_status");
    assert_eq!(errors.len(), 1, "{:?}", diags(own));
    assert!(errors[0].contains("repo_type \"git\""), "{errors:?}");
    let inherited = own
        .replace("g: }", "g: {report: {commit_status: true}}}")
        .replace("    report: {commit_status: true}\n", "");
    let errors = errors_at(&inherited, "groups.g.report.commit_status");
    assert_eq!(errors.len(), 1, "{:?}", diags(&inherited));
    assert!(errors[0].contains("repository \"a\""), "{errors:?}");
    let opted_out = own.replace("commit_status: true", "commit_status: false");
    assert!(load_str(&opted_out, &seed_env()).config.is_some());
}

#[test]
fn notify_targets_are_checked_without_printing_urls() {
    let yaml = REPORTING
        .replace("type: webhook", "type: teams")
        .replace("[failure, started]", "[failure, deployed]")
        .replace(
            "https://hooks.slack.com/services/T/B/XYZ",
            "ftp://secret-host/XYZ",
        );
    assert_eq!(errors_at(&yaml, "groups.g.notify[0].type").len(), 1);
    assert_eq!(errors_at(&yaml, "groups.g.notify[0].on[1]").len(), 1);
    let url = errors_at(&yaml, "groups.g.notify[1].url");
    assert_eq!(url.len(), 1);
    assert!(!url[0].contains("secret-host"), "{url:?}");
    let no_url = REPORTING.replace("url: 'https://hooks.example.com/x', ", "");
    assert_eq!(
        errors_at(&no_url, "groups.g.notify[0].url"),
        ["required field is missing"]
    );
}

#[test]
fn commit_statuses_without_a_monitor_token_warn() {
    let yaml = REPORTING;
    let warnings: Vec<String> = diags(yaml)
        .into_iter()
        .filter(|(s, p, _)| *s == Severity::Warning && p == "repositories[0].monitor.auth.token")
        .map(|(_, _, m)| m)
        .collect();
    assert_eq!(warnings.len(), 1, "{:?}", diags(yaml));
    let with_token = diags(yaml)
        .into_iter()
        .filter(|(_, p, _)| p == "repositories[1].monitor.auth.token")
        .count();
    assert_eq!(with_token, 0, "the GitLab repository has a token");
}

#[test]
fn secret_env_values_and_single_references_are_masked() {
    let yaml = seed_with(
        "      project_name: \"rag\"",
        "      project_name: \"rag\"\n      env: {PLAIN: qa-namespace, LISTED: listed-value, FROM_ENV: \"${GITHUB_USERNAME}\", MIXED: \"x-${GITHUB_USERNAME}\"}\n      secret_env: [LISTED]",
    );
    let loaded = load_str(&yaml, &seed_env());
    let config = loaded.config.expect("valid");
    let deploy = &config.repositories[0].deploy;
    let names: Vec<&str> = deploy.secret_env.iter().map(String::as_str).collect();
    assert_eq!(names, ["FROM_ENV", "LISTED"]);
    let secrets: Vec<String> = config
        .secrets()
        .iter()
        .map(|s| s.expose_secret().to_owned())
        .collect();
    assert!(secrets.contains(&"listed-value".to_owned()), "{secrets:?}");
    assert!(secrets.contains(&"octo".to_owned()), "{secrets:?}");
    assert!(!secrets.contains(&"qa-namespace".to_owned()), "{secrets:?}");

    let yaml = seed_with(
        "      project_name: \"rag\"",
        "      project_name: \"rag\"\n      env: {A: b}\n      secret_env: [NOPE]",
    );
    assert!(errors_at(&yaml, "repositories[0].deploy.secret_env[0]")[0].contains("NOPE"));
}

#[test]
fn top_level_secret_env_masks_named_variables() {
    let yaml = format!("secret_env: [GITLAB_USERNAME, NOT_SET, \"9bad\"]\n{SEED}");
    assert!(errors_at(&yaml, "secret_env[2]")[0].contains("not a valid"));
    let yaml = format!("secret_env: [GITLAB_USERNAME, NOT_SET]\n{SEED}");
    let config = load_str(&yaml, &seed_env()).config.expect("valid");
    assert!(config.secrets().iter().any(|s| s.expose_secret() == "qa"));
}

#[test]
fn env_file_values_are_masked() {
    let mut file = std::collections::BTreeMap::new();
    file.insert("FILE_ONLY".to_owned(), "from-the-env-file".to_owned());
    let env = Env::with_file_vars(file);
    let yaml = "groups: {g: }\nrepositories:\n  - name: a\n    group: g\n    monitor: {repo_url: /tmp/x, branches: [main], repo_type: git}\n    deploy: {qa_repo_url: /tmp/qa, qa_repo_branch: main, commands: [\"true\"]}\n";
    let config = load_str(yaml, &env).config.expect("valid");
    assert!(
        config
            .secrets()
            .iter()
            .any(|s| s.expose_secret() == "from-the-env-file")
    );
}

#[test]
fn leader_election_and_state_defaults_and_checks() {
    let config = load_str(SEED, &seed_env()).config.unwrap();
    assert_eq!(config.leader_election, LeaderElection::default());
    assert_eq!(config.state, StateConfig::File);

    let ok = format!(
        "{SEED}\nleader_election: {{enabled: true, lease_name: qa-lease, namespace: qa, lease_duration: 3s, renew_deadline: 2s, retry_period: 500ms}}\nstate: {{backend: kubernetes, configmap: qa-state}}\n"
    );
    let config = load_str(&ok, &seed_env()).config.unwrap();
    assert!(config.leader_election.enabled);
    assert_eq!(config.leader_election.lease_name, "qa-lease");
    assert_eq!(
        config.leader_election.retry_period,
        Duration::from_millis(500)
    );
    assert_eq!(
        config.state,
        StateConfig::Kubernetes {
            configmap: "qa-state".into(),
            namespace: None
        }
    );

    let bad = format!(
        "{SEED}\nleader_election: {{lease_name: Bad_Name, namespace: \"a.b\", lease_duration: 5s, renew_deadline: 5s, retry_period: 6s}}\nstate: {{backend: kubernetes}}\n"
    );
    assert_eq!(errors_at(&bad, "leader_election.lease_name").len(), 1);
    assert_eq!(errors_at(&bad, "leader_election.namespace").len(), 1);
    assert!(errors_at(&bad, "leader_election.renew_deadline")[0].contains("shorter"));
    assert_eq!(errors_at(&bad, "leader_election.retry_period").len(), 1);
    assert!(errors_at(&bad, "state.backend")[0].contains("leader_election.enabled"));
    let unknown = format!("{SEED}\nstate: {{backend: etcd}}\n");
    assert!(errors_at(&unknown, "state.backend")[0].contains("file or kubernetes"));
}

#[test]
fn the_read_token_is_one_of_sentrys_own_secrets() {
    let yaml = format!("server: {{read_token: rt-secret-value}}\n{SEED}");
    let config = load_str(&yaml, &seed_env()).config.expect("valid");
    let own: Vec<String> = config
        .own_secrets()
        .iter()
        .map(|s| s.expose_secret().to_owned())
        .collect();
    assert!(
        own.contains(&"rt-secret-value".to_owned()),
        "withheld from commands"
    );
    assert!(
        config
            .secrets()
            .iter()
            .any(|s| s.expose_secret() == "rt-secret-value"),
        "masked"
    );
}

#[test]
fn the_executor_is_local_by_default_and_kubernetes_needs_namespace_and_image() {
    let group = |executor: &str| {
        format!(
            "groups:\n  g:\n    executor: {executor}\nrepositories:\n  - name: a\n    group: g\n    monitor: {{repo_url: /tmp/x, branches: [main], repo_type: git}}\n    deploy: {{qa_repo_url: /tmp/qa, qa_repo_branch: main, commands: [\"true\"]}}\n"
        )
    };
    let yaml = "groups: {g: }\nrepositories:\n  - name: a\n    group: g\n    monitor: {repo_url: /tmp/x, branches: [main], repo_type: git}\n    deploy: {qa_repo_url: /tmp/qa, qa_repo_branch: main, commands: [\"true\"]}\n";
    let config = load_str(yaml, &seed_env()).config.unwrap();
    assert_eq!(config.groups[0].executor, ExecutorKind::Local);

    let yaml = group(
        "{kind: kubernetes, namespace: qa-jobs, image: sentry:1, env_from_secrets: [qa-creds]}",
    );
    let config = load_str(&yaml, &seed_env()).config.unwrap();
    let ExecutorKind::Kubernetes(k) = &config.groups[0].executor else {
        panic!("not kubernetes: {:?}", config.groups[0].executor);
    };
    assert_eq!(k.namespace, "qa-jobs");
    assert_eq!(k.config_map, "sentry-config");
    assert_eq!(k.env_from_secrets, ["qa-creds"]);
    assert_eq!(k.start_timeout, Duration::from_secs(300));

    let yaml = group("{kind: kubernetes}");
    assert!(!errors_at(&yaml, "groups.g.executor.namespace").is_empty());
    assert!(!errors_at(&yaml, "groups.g.executor.image").is_empty());
    let yaml = group("{kind: kubernetes, namespace: Not_A_Name, image: x}");
    assert!(errors_at(&yaml, "groups.g.executor.namespace")[0].contains("namespace name"));
    let yaml = group("{kind: docker}");
    assert!(errors_at(&yaml, "groups.g.executor.kind")[0].contains("\"local\" or \"kubernetes\""));
}

/// A config watching `monitor_url` (repo_type git) and cloning `qa_url`, with `extra` at
/// the top level and `monitor_auth` under monitor.auth.
fn ssh_yaml(monitor_url: &str, monitor_auth: &str, qa_url: &str, extra: &str) -> String {
    format!(
        "{extra}\ngroups: {{g: }}\nrepositories:\n  - name: a\n    group: g\n    monitor: {{repo_url: \"{monitor_url}\", branches: [main], repo_type: git, auth: {{{monitor_auth}}}}}\n    deploy: {{qa_repo_url: \"{qa_url}\", qa_repo_branch: main, commands: [\"true\"]}}\n"
    )
}

/// A temp dir with a private key file and a known_hosts file.
fn ssh_files() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id");
    std::fs::write(
        &key,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();
    let known = dir.path().join("known_hosts");
    std::fs::write(&known, "[git.example.com]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJxm+OiQYWdpoibTjBy/DWST9cWgpC/5TBL8yx3u5YEN\n").unwrap();
    let (key, known) = (key.display().to_string(), known.display().to_string());
    (dir, key, known)
}

#[test]
fn ssh_urls_are_accepted_with_a_key_and_known_hosts() {
    let (_dir, key, known) = ssh_files();
    let yaml = ssh_yaml(
        "ssh://ci@git.example.com:2222/srv/app.git",
        &format!("ssh_key_file: {key}, ssh_key_passphrase_env: KEY_PASS"),
        "git@git.example.com:qa/tests.git",
        &format!("ssh: {{known_hosts_file: {known}}}"),
    );
    let env = Env::fixed([("KEY_PASS", "correct horse")]);
    let loaded = load_str(&yaml, &env);
    assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
    let config = loaded.config.unwrap();
    let ssh = config.repositories[0].monitor.auth.ssh.clone().unwrap();
    assert_eq!(
        (ssh.user.as_str(), ssh.host.as_str(), ssh.port),
        ("ci", "git.example.com", 2222)
    );
    assert_eq!(ssh.key_file.as_deref(), Some(Path::new(&key)));
    assert_eq!(ssh.known_hosts, Path::new(&known));
    assert_eq!(
        ssh.passphrase.as_ref().unwrap().expose_secret(),
        "correct horse"
    );
    // The passphrase is masked like a token.
    assert!(
        config
            .own_secrets()
            .iter()
            .any(|s| s.expose_secret() == "correct horse")
    );
    // The QA repository over SSH without a key: the agent, user from the URL.
    let qa = config.repositories[0].deploy.auth.ssh.clone().unwrap();
    assert_eq!(
        (qa.user.as_str(), qa.port, qa.key_file.is_none()),
        ("git", 22, true)
    );
}

#[test]
fn ssh_mistakes_are_reported_where_they_are() {
    let (_dir, key, known) = ssh_files();
    let top = format!("ssh: {{known_hosts_file: {known}}}");
    let env = Env::fixed([("T", "tok-secret")]);
    let errors = |yaml: &str, path: &str| -> Vec<String> {
        load_str(yaml, &env)
            .diagnostics
            .into_iter()
            .filter(|d| d.is_error() && d.path == path)
            .map(|d| d.message)
            .collect()
    };
    // A password in an ssh URL, never echoed.
    let yaml = ssh_yaml("ssh://git:hunter2@h/a.git", "", "/tmp/qa", &top);
    let errs = errors(&yaml, "repositories[0].monitor.repo_url");
    assert!(
        errs[0].contains("password") && !errs[0].contains("hunter2"),
        "{errs:?}"
    );
    let yaml = ssh_yaml("git:hunter2@h:a.git", "", "/tmp/qa", &top);
    assert!(errors(&yaml, "repositories[0].monitor.repo_url")[0].contains("password"));
    // A user name that could pass for an option.
    let yaml = ssh_yaml("ssh://-oProxyCommand=x@h/a.git", "", "/tmp/qa", &top);
    assert!(errors(&yaml, "repositories[0].monitor.repo_url")[0].contains("`-`"));
    // A key for an https URL.
    let yaml = ssh_yaml(
        "https://h/a.git",
        &format!("ssh_key_file: {key}"),
        "/tmp/qa",
        &top,
    );
    assert!(errors(&yaml, "repositories[0].monitor.auth.ssh_key_file")[0].contains("SSH remotes"));
    // A token for an SSH URL.
    let yaml = ssh_yaml("ssh://git@h/a.git", "token: \"${T}\"", "/tmp/qa", &top);
    let errs = errors(&yaml, "repositories[0].monitor.auth.token");
    assert!(
        errs[0].contains("not used over SSH") && !errs[0].contains("tok-secret"),
        "{errs:?}"
    );
    // A missing key file, a public key, an unset passphrase variable.
    let yaml = ssh_yaml(
        "ssh://git@h/a.git",
        "ssh_key_file: /nonexistent/id",
        "/tmp/qa",
        &top,
    );
    assert!(
        errors(&yaml, "repositories[0].monitor.auth.ssh_key_file")[0]
            .contains("cannot read /nonexistent/id")
    );
    let yaml = ssh_yaml(
        "ssh://git@h/a.git",
        &format!("ssh_key_file: {known}"),
        "/tmp/qa",
        &top,
    );
    assert!(
        errors(&yaml, "repositories[0].monitor.auth.ssh_key_file")[0].contains("not a private key")
    );
    let yaml = ssh_yaml(
        "ssh://git@h/a.git",
        &format!("ssh_key_file: {key}, ssh_key_passphrase_env: NOPE_UNSET"),
        "/tmp/qa",
        &top,
    );
    assert!(
        errors(&yaml, "repositories[0].monitor.auth.ssh_key_passphrase_env")[0]
            .contains("NOPE_UNSET is not set")
    );
    // known_hosts: unreadable, malformed (with its line), or none at all.
    let yaml = ssh_yaml(
        "ssh://git@h/a.git",
        "",
        "/tmp/qa",
        "ssh: {known_hosts_file: /nonexistent/kh}",
    );
    assert!(errors(&yaml, "ssh.known_hosts_file")[0].contains("cannot read /nonexistent/kh"));
    let bad = _dir.path().join("bad_known_hosts");
    std::fs::write(&bad, "# ok\nhost ssh-ed25519\n").unwrap();
    let yaml = ssh_yaml(
        "ssh://git@h/a.git",
        "",
        "/tmp/qa",
        &format!("ssh: {{known_hosts_file: {}}}", bad.display()),
    );
    assert!(errors(&yaml, "ssh.known_hosts_file")[0].contains("line 2"));
    let home = tempfile::tempdir().unwrap();
    let env_no_kh = Env::fixed([("HOME", home.path().to_str().unwrap())]);
    let yaml = ssh_yaml("ssh://git@h/a.git", "", "/tmp/qa", "");
    let errs: Vec<String> = load_str(&yaml, &env_no_kh)
        .diagnostics
        .into_iter()
        .filter(|d| d.is_error() && d.path == "repositories[0].monitor.repo_url")
        .map(|d| d.message)
        .collect();
    assert!(errs[0].contains("ssh.known_hosts_file"), "{errs:?}");
    // ~/.ssh/known_hosts is the default when it exists.
    std::fs::create_dir(home.path().join(".ssh")).unwrap();
    std::fs::copy(&known, home.path().join(".ssh/known_hosts")).unwrap();
    let config = load_str(&yaml, &env_no_kh).config.unwrap();
    assert_eq!(
        config.repositories[0]
            .monitor
            .auth
            .ssh
            .as_ref()
            .unwrap()
            .known_hosts,
        home.path().join(".ssh/known_hosts")
    );
}

#[test]
fn proxy_urls_are_checked_and_passwords_come_from_the_environment() {
    let yaml = |proxy: &str| format!("{proxy}\n{SEED}");
    let env = Env::fixed([
        ("GITHUB_USERNAME", "octo"),
        ("GITHUB_TOKEN", "ghp_seedtokenvalue"),
        ("GITLAB_USERNAME", "qa"),
        ("GITLAB_TOKEN", "glpat-seedtokenvalue"),
        ("PROXY_PASSWORD", "pr0xy-pass"),
    ]);
    let loaded = load_str(
        &yaml(
            "proxy: {url: \"http://ci:${PROXY_PASSWORD}@proxy.corp:3128\", no_proxy: [.corp.example, 10.0.0.1]}",
        ),
        &env,
    );
    // One warning: Git traffic cannot pass a proxy that asks for a password (libgit2 #7081).
    assert_eq!(loaded.diagnostics.len(), 1, "{:?}", loaded.diagnostics);
    assert!(!loaded.diagnostics[0].is_error());
    assert_eq!(loaded.diagnostics[0].path, "proxy.url");
    assert!(loaded.diagnostics[0].message.contains("#7081"));
    assert!(!loaded.diagnostics[0].message.contains("pr0xy-pass"));
    let config = loaded.config.unwrap();
    let proxy = config.proxy.clone().unwrap();
    assert_eq!(
        proxy.url.expose_secret(),
        "http://ci:pr0xy-pass@proxy.corp:3128"
    );
    assert_eq!(proxy.no_proxy, vec![".corp.example", "10.0.0.1"]);
    assert!(
        config
            .own_secrets()
            .iter()
            .any(|s| s.expose_secret() == "pr0xy-pass")
    );
    // No key: no proxy of Sentry's own (the environment's apply).
    assert!(load_str(SEED, &env).config.unwrap().proxy.is_none());

    let errors = |text: &str, path: &str| -> Vec<String> {
        load_str(&yaml(text), &env)
            .diagnostics
            .into_iter()
            .filter(|d| d.is_error() && d.path == path)
            .map(|d| d.message)
            .collect()
    };
    let errs = errors(
        "proxy: {url: \"http://ci:literal-secret@proxy.corp:3128\"}",
        "proxy.url",
    );
    assert!(
        errs[0].contains("from the environment") && !errs[0].contains("literal-secret"),
        "{errs:?}"
    );
    assert!(
        errors("proxy: {url: \"socks5://proxy.corp:1080\"}", "proxy.url")[0]
            .contains("http:// or https://")
    );
    assert!(!errors("proxy: {no_proxy: [a]}", "proxy.url").is_empty());
    assert!(
        errors(
            "proxy: {url: \"http://p:3128\", no_proxy: [\"a,b\"]}",
            "proxy.no_proxy[0]"
        )[0]
        .contains("one host")
    );
}

#[test]
fn github_lookup_defaults_to_auto_and_refuses_unknown_words() {
    let config = load_str(SEED, &seed_env()).config.unwrap();
    assert_eq!(config.github_lookup, GithubLookup::Auto);
    let ok = format!("{SEED}\ngithub_lookup: graphql\n");
    let config = load_str(&ok, &seed_env()).config.unwrap();
    assert_eq!(config.github_lookup, GithubLookup::Graphql);
    let bad = format!("{SEED}\ngithub_lookup: batched\n");
    let errors = errors_at(&bad, "github_lookup");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("auto, rest or graphql"), "{errors:?}");
}

#[test]
fn rate_limits_override_known_api_hosts_only() {
    let yaml = format!(
        "rate_limits:\n  api.github.com: {{concurrency: 20, rest_points_per_minute: 300, window: 10s}}\n{SEED}"
    );
    let loaded = load_str(&yaml, &seed_env());
    assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
    let config = loaded.config.unwrap();
    assert_eq!(
        config.rate_limits.get("api.github.com"),
        Some(&crate::config::RateLimitOverride {
            concurrency: Some(20),
            rest_points_per_minute: Some(300),
            graphql_points_per_minute: None,
            window: Some(Duration::from_secs(10)),
        })
    );

    let yaml = format!("rate_limits:\n  ghe.example.com: {{concurrency: 5}}\n{SEED}");
    let errors = errors_at(&yaml, "rate_limits.ghe.example.com");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("api.github.com"), "{errors:?}");

    let yaml = format!(
        "rate_limits:\n  api.github.com: {{rest_points_per_minute: 0, window: 0s}}\n{SEED}"
    );
    assert_eq!(
        errors_at(&yaml, "rate_limits.api.github.com.rest_points_per_minute"),
        ["must be at least 1"]
    );
    assert_eq!(
        errors_at(&yaml, "rate_limits.api.github.com.window"),
        ["must be greater than zero"]
    );
}

#[test]
fn webhook_poll_interval_defaults_to_the_polling_interval_and_is_not_shorter() {
    let config = load_str(SEED, &seed_env()).config.unwrap();
    assert_eq!(config.webhook_poll_interval, config.polling_interval);
    let yaml = format!("polling_interval: 1m\nwebhook_poll_interval: 30m\n{SEED}");
    let config = load_str(&yaml, &seed_env()).config.unwrap();
    assert_eq!(config.webhook_poll_interval, Duration::from_secs(1800));
    let yaml = format!("polling_interval: 1m\nwebhook_poll_interval: 30s\n{SEED}");
    let errors = errors_at(&yaml, "webhook_poll_interval");
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("shorter than polling_interval"),
        "{errors:?}"
    );
}
