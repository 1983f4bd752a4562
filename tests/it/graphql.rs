//! GitHub lookups batched through GraphQL (`github_lookup: graphql`) against REST polling
//! (`github_lookup: rest`), with the real binary (`watch --once`) on one fake GitHub that
//! serves both from the same model: the same moves are deployed, patterns and pagination
//! included; and a repository that fails inside a batch fails alone.

use std::collections::BTreeMap;
use std::path::Path;

use crate::support::fake_github_api::{FakeGitHubApi, Model, Visibility};
use crate::support::{qa_repo, run, sentry, tempdir, write};

fn sha(n: u32) -> String {
    format!("{n:040x}")
}

/// A configuration watching `repos` (name, `owner/repo`, branches YAML) on `api`, whose
/// deployments append `repo branch sha` to `dir/deployed.txt`.
fn config(dir: &Path, api: &str, lookup: &str, repos: &[(&str, &str, &str)]) -> String {
    let mut yaml = format!(
        "polling_interval: 1s\nrequest_timeout: 10s\ngithub_lookup: {lookup}\n\
         state_file: {d}/state.json\nwork_dir: {d}/work\nserver: {{enabled: false}}\n\
         groups: {{g: {{execution_strategy: parallel}}}}\nrepositories:\n",
        d = dir.display()
    );
    for (name, path, branches) in repos {
        yaml.push_str(&format!(
            "  - name: {name}\n    group: g\n    monitor:\n      repo_url: https://github.com/{path}\n      \
             repo_type: github\n      api_url: {api}\n      auth: {{token: test-token-gql}}\n      \
             branches: {branches}\n    deploy: {{qa_repo_url: {d}/qa, qa_repo_branch: main, \
             commands: [./deploy.sh]}}\n",
            d = dir.display()
        ));
    }
    yaml
}

fn setup(dir: &Path, api: &str, lookup: &str, repos: &[(&str, &str, &str)]) {
    qa_repo(
        &dir.join("qa"),
        &format!(
            "#!/bin/sh\necho \"$SENTRY_REPO_NAME $SENTRY_BRANCH $SENTRY_COMMIT_SHA\" >> {}/deployed.txt\n",
            dir.display()
        ),
    );
    write(dir, "sentry.yaml", &config(dir, api, lookup, repos));
}

fn watch_once(dir: &Path) -> crate::support::Run {
    run(sentry(dir).args(["-c", "sentry.yaml", "watch", "--once"]))
}

fn deployed(dir: &Path) -> Vec<String> {
    let mut lines = crate::support::lines_of(&dir.join("deployed.txt"));
    lines.sort();
    lines
}

#[test]
fn graphql_and_rest_detect_the_same_moves() {
    // acme/big has 251 branches: three pages in REST and in GraphQL.
    let mut big: BTreeMap<String, String> = (0..250)
        .map(|i| (format!("release/{i:03}"), sha(1000 + i)))
        .collect();
    big.insert("main".into(), sha(1));
    let small = |names: &[&str]| -> BTreeMap<String, String> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| ((*n).to_owned(), sha(10 + i as u32)))
            .collect()
    };
    let mut model = Model::default();
    model.repos.insert(
        "acme/app".into(),
        (Visibility::Visible, small(&["main", "dev", "other"])),
    );
    model
        .repos
        .insert("acme/big".into(), (Visibility::Visible, big));
    model.repos.insert(
        "acme/mixed".into(),
        (
            Visibility::Visible,
            small(&["main", "feature/a", "feature/b"]),
        ),
    );
    let fake = FakeGitHubApi::start(model);
    let repos = [
        ("app", "acme/app", "[main, dev]"),
        ("big", "acme/big", "[main, \"release/*\"]"),
        ("mixed", "acme/mixed", "[main, \"feature/*\"]"),
    ];
    let (rest, gql) = (tempdir(), tempdir());
    setup(rest.path(), &fake.uri(), "rest", &repos);
    setup(gql.path(), &fake.uri(), "graphql", &repos);

    // Baselines: nothing is deployed.
    for dir in [rest.path(), gql.path()] {
        let before = fake.counts();
        let out = watch_once(dir);
        assert_eq!(out.code, Some(0), "{}", out.all());
        let after = fake.counts();
        if dir == gql.path() {
            assert_eq!(after.0, before.0, "GraphQL mode sent REST requests");
            // Round 1: every repository and the first listing pages in one query; then page 2,
            // then page 3 of acme/big.
            assert_eq!(after.1 - before.1, 3, "{}", out.all());
        } else {
            assert_eq!(after.1, before.1, "REST mode sent GraphQL queries");
            // app: 2 branches; big: main and 3 listing pages; mixed: main and 1 page.
            let least = 8;
            assert!(after.0 - before.0 >= least, "{}", out.all());
        }
        assert!(deployed(dir).is_empty(), "{:?}", deployed(dir));
    }

    // Moves: exact branches, a pattern branch on the third page, a new pattern branch, and
    // branches nobody watches.
    fake.set("acme/app", "main", &sha(501));
    fake.set("acme/app", "other", &sha(502));
    fake.set("acme/big", "release/240", &sha(503));
    fake.set("acme/big", "release/900", &sha(504));
    fake.set("acme/big", "main", &sha(505));
    fake.set("acme/mixed", "feature/b", &sha(506));
    fake.set("acme/mixed", "feature/c", &sha(507));

    for dir in [rest.path(), gql.path()] {
        let out = watch_once(dir);
        assert_eq!(out.code, Some(0), "{}", out.all());
    }
    let expected: Vec<String> = [
        ("app", "main", 501),
        ("big", "main", 505),
        ("big", "release/240", 503),
        ("big", "release/900", 504),
        ("mixed", "feature/b", 506),
        ("mixed", "feature/c", 507),
    ]
    .iter()
    .map(|(r, b, s)| format!("{r} {b} {}", sha(*s)))
    .collect();
    assert_eq!(deployed(rest.path()), expected);
    assert_eq!(deployed(gql.path()), expected);
    let model = fake.model.lock().unwrap();
    // Two listings (big, mixed) in the first query, one in the others: 1 point each.
    assert_eq!(model.graphql_points, model.graphql_queries);
}

#[test]
fn a_failing_repository_inside_a_batch_fails_alone() {
    let mut model = Model::default();
    let branches: BTreeMap<String, String> = [("main".to_owned(), sha(1))].into_iter().collect();
    model
        .repos
        .insert("acme/ok".into(), (Visibility::Visible, branches.clone()));
    model.repos.insert(
        "acme/secret".into(),
        (Visibility::Forbidden, branches.clone()),
    );
    let mut listed = branches.clone();
    listed.insert("release/1".into(), sha(2));
    model
        .repos
        .insert("acme/listed".into(), (Visibility::Visible, listed));
    let fake = FakeGitHubApi::start(model);
    let dir = tempdir();
    let repos = [
        ("ok", "acme/ok", "[main]"),
        ("gone", "acme/renamed-away", "[main]"),
        ("secret", "acme/secret", "[main, \"release/*\"]"),
        ("listed", "acme/listed", "[main, missing, \"release/*\"]"),
    ];
    setup(dir.path(), &fake.uri(), "graphql", &repos);

    let out = watch_once(dir.path());
    // The failures make the cycle report errors (exit 1), but nothing else failed.
    assert_eq!(out.code, Some(1), "{}", out.all());
    let log = out.all();
    assert_eq!(fake.counts(), (0, 1), "one query for all four repositories");
    assert!(log.contains("gone") && log.contains("not found"), "{log}");
    assert!(log.contains("NOT_FOUND"), "{log}");
    assert!(log.contains("FORBIDDEN"), "{log}");
    assert!(log.contains("branch missing does not exist"), "{log}");
    assert!(!log.contains("test-token-gql"), "the token leaked: {log}");
    let state = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let repos = &state["repositories"];
    assert_eq!(repos["ok"]["branches"]["main"]["sha"], sha(1), "{state}");
    assert_eq!(
        repos["listed"]["branches"]["release/1"]["sha"],
        sha(2),
        "{state}"
    );
    assert!(
        repos
            .get("gone")
            .is_none_or(|r| r["branches"].as_object().is_none_or(|b| b.is_empty())),
        "{state}"
    );
    assert!(
        repos
            .get("secret")
            .is_none_or(|r| r["branches"].as_object().is_none_or(|b| b.is_empty())),
        "{state}"
    );

    // The healthy repositories keep being served: a move of ok/main is deployed.
    fake.set("acme/ok", "main", &sha(3));
    let out = watch_once(dir.path());
    assert_eq!(
        deployed(dir.path()),
        [format!("ok main {}", sha(3))],
        "{}",
        out.all()
    );
}

#[test]
fn auto_falls_back_to_rest_where_there_is_no_graphql_api() {
    let branches: BTreeMap<String, String> = (0..10).map(|i| (format!("b{i}"), sha(i))).collect();
    let mut model = Model {
        no_graphql: true,
        ..Model::default()
    };
    model
        .repos
        .insert("acme/many".into(), (Visibility::Visible, branches));
    let fake = FakeGitHubApi::start(model);
    let dir = tempdir();
    // 10 branches every second: 600 REST points a minute, so `auto` tries GraphQL first.
    let repos = [(
        "many",
        "acme/many",
        "[b0, b1, b2, b3, b4, b5, b6, b7, b8, b9]",
    )];
    setup(dir.path(), &fake.uri(), "auto", &repos);
    let out = watch_once(dir.path());
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.all().contains("has no GraphQL API"), "{}", out.all());
    let (rest, graphql) = fake.counts();
    assert_eq!((rest, graphql), (10, 1), "{}", out.all());
    let state = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(
        state["repositories"]["many"]["branches"]["b9"]["sha"],
        sha(9),
        "{state}"
    );

    // `graphql` never falls back: the repository fails, saying what to change.
    let dir = tempdir();
    setup(dir.path(), &fake.uri(), "graphql", &repos);
    let out = watch_once(dir.path());
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.all().contains("github_lookup: rest"), "{}", out.all());
}
