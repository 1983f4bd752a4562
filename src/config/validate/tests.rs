use super::*;
use crate::config::{Severity, load_str};

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
    assert_eq!(g.max_parallel, None);
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
    assert!(errors_at(&yaml, "repositories[0].monitor.repo_url")[0].contains("SSH"));
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
fn plain_http_token_warns_unless_loopback() {
    let remote = seed_with(
        "https://gitlab-master.nvidia.com/",
        "http://gitlab-master.nvidia.com/",
    );
    assert!(
        diags(&remote)
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
