//! Scale (issue #20): ETag validators survive a restart, so a second `watch --once` on
//! unchanged branches costs no primary quota; the state files hold no token.

use std::sync::{Arc, Mutex};

use crate::support::{FakeForge, FakeReply, qa_repo, run, sentry, tempdir, write};

const TOKEN: &str = "ghp_SCALECANARY_7d3e1f0b9a";
const REPOS: usize = 6;
const BRANCHES: usize = 100;

fn sha_of(repo: usize, branch: usize, version: u32) -> String {
    format!(
        "{:040x}",
        (repo * 1_000 + branch) as u128 * 1_000 + u128::from(version)
    )
}

/// A fake GitHub answering `commits/refs/heads/bNNN` of `octo/rNN` with a SHA and a
/// per-branch ETag, `304` when `If-None-Match` matches.
fn fake_github(versions: Arc<Mutex<Vec<u32>>>) -> FakeForge {
    FakeForge::start(move |request| {
        let parse = || -> Option<(usize, usize)> {
            let rest = request.target.strip_prefix("/repos/octo/r")?;
            let (repo, rest) = rest.split_once('/')?;
            let branch = rest.strip_prefix("commits/refs/heads/b")?;
            Some((repo.parse().ok()?, branch.parse().ok()?))
        };
        let Some((repo, branch)) = parse().filter(|(r, b)| *r < REPOS && *b < BRANCHES) else {
            return FakeReply::status(404, "application/json", r#"{"message":"Not Found"}"#);
        };
        let version = versions.lock().expect("versions")[repo * BRANCHES + branch];
        let etag = format!("\"r{repo}b{branch}v{version}\"");
        let headers = vec![
            ("etag".to_owned(), etag.clone()),
            ("x-ratelimit-limit".to_owned(), "5000".to_owned()),
            ("x-ratelimit-remaining".to_owned(), "4000".to_owned()),
        ];
        if request.header("if-none-match") == Some(etag.as_str()) {
            return FakeReply::Http {
                status: 304,
                headers,
                body: Vec::new(),
            };
        }
        FakeReply::Http {
            status: 200,
            headers,
            body: sha_of(repo, branch, version).into_bytes(),
        }
    })
}

/// Requests that cost primary quota: authenticated and not answered `304`. The fake
/// answers 304 exactly when `If-None-Match` carries the current ETag.
fn counted(forge: &FakeForge, versions: &[u32], from: usize) -> usize {
    forge.requests()[from..]
        .iter()
        .filter(|r| r.header("authorization").is_some())
        .filter(|r| {
            let current = r
                .target
                .strip_prefix("/repos/octo/r")
                .and_then(|rest| rest.split_once('/'))
                .and_then(|(repo, rest)| {
                    let repo: usize = repo.parse().ok()?;
                    let branch: usize = rest.strip_prefix("commits/refs/heads/b")?.parse().ok()?;
                    let v = versions[repo * BRANCHES + branch];
                    Some(format!("\"r{repo}b{branch}v{v}\""))
                });
            r.header("if-none-match") != current.as_deref()
        })
        .count()
}

#[test]
fn second_watch_once_on_600_unchanged_branches_costs_no_primary_quota() {
    let dir = tempdir();
    let root = dir.path();
    let versions = Arc::new(Mutex::new(vec![1u32; REPOS * BRANCHES]));
    let forge = fake_github(versions.clone());
    qa_repo(&root.join("qa"), "#!/bin/sh\ntrue\n");
    let mut yaml = format!(
        // REST polling is what this measures (600 branches a minute would make `auto` try GraphQL).
        "polling_interval: 60s\ngithub_lookup: rest\nstate_file: {root}/state.json\nwork_dir: {root}/work\nserver: {{enabled: false}}\ngroups:\n  g: {{}}\nrepositories:\n",
        root = root.display()
    );
    let branches: Vec<String> = (0..BRANCHES).map(|b| format!("b{b:03}")).collect();
    for r in 0..REPOS {
        yaml.push_str(&format!(
            "  - name: r{r:02}\n    group: g\n    monitor: {{repo_url: \"https://github.com/octo/r{r:02}\", repo_type: github, api_url: \"{}\", branches: [{}], auth: {{token: \"${{FORGE_TOKEN}}\"}}}}\n    deploy: {{qa_repo_url: \"file://{root}/qa\", qa_repo_branch: main, commands: [\"true\"]}}\n",
            forge.uri(),
            branches.join(", "),
            root = root.display()
        ));
    }
    let config = write(root, "sentry.yaml", &yaml);
    let watch_once = || {
        run(sentry(root)
            .env("FORGE_TOKEN", TOKEN)
            .arg("-c")
            .arg(&config)
            .args(["watch", "--once"]))
    };

    let first = watch_once();
    assert_eq!(first.code, Some(0), "{}", first.all());
    let after_first = forge.count();
    let now = versions.lock().expect("versions").clone();
    assert_eq!(
        counted(&forge, &now, 0),
        REPOS * BRANCHES,
        "the first run asks every branch in full"
    );
    let validators = root.join("state.json.validators.json");
    assert!(validators.exists(), "validators persisted beside the state");

    let second = watch_once();
    assert_eq!(second.code, Some(0), "{}", second.all());
    let asked = forge.count() - after_first;
    assert_eq!(asked, REPOS * BRANCHES, "every branch is still checked");
    assert_eq!(
        counted(&forge, &now, after_first),
        0,
        "the second run costs no primary quota:\n{}",
        second.all()
    );
    assert!(
        second.all().contains("600 branches checked"),
        "{}",
        second.all()
    );

    // One branch moves: the third run asks it in full and sees the change.
    versions.lock().expect("versions")[3 * BRANCHES + 7] = 2;
    let before_third = forge.count();
    let third = watch_once();
    assert_eq!(third.code, Some(0), "{}", third.all());
    let now = versions.lock().expect("versions").clone();
    assert_eq!(counted(&forge, &now, before_third), 1, "{}", third.all());
    assert!(third.all().contains("1 changes"), "{}", third.all());

    // Nothing Sentry keeps holds the token.
    for entry in std::fs::read_dir(root).expect("dir").flatten() {
        let path = entry.path();
        if path.is_file() {
            let text = String::from_utf8_lossy(&std::fs::read(&path).expect("read")).into_owned();
            assert!(!text.contains(TOKEN), "{} holds the token", path.display());
        }
    }
    let text = std::fs::read_to_string(&validators).expect("validators");
    assert!(text.contains("r3b7v2"), "the new ETag is persisted");
}

#[test]
fn validators_of_a_repository_no_longer_configured_are_dropped() {
    let dir = tempdir();
    let root = dir.path();
    let versions = Arc::new(Mutex::new(vec![1u32; REPOS * BRANCHES]));
    let forge = fake_github(versions);
    let config_for = |repos: &[usize]| {
        let mut yaml = format!(
            "state_file: {root}/state.json\nwork_dir: {root}/work\nserver: {{enabled: false}}\ngroups:\n  g: {{}}\nrepositories:\n",
            root = root.display()
        );
        for r in repos {
            yaml.push_str(&format!(
                "  - name: r{r:02}\n    group: g\n    monitor: {{repo_url: \"https://github.com/octo/r{r:02}\", repo_type: github, api_url: \"{}\", branches: [b000, b001], auth: {{token: \"${{FORGE_TOKEN}}\"}}}}\n    deploy: {{qa_repo_url: \"file://{root}/qa\", qa_repo_branch: main, commands: [\"true\"]}}\n",
                forge.uri(),
                root = root.display()
            ));
        }
        write(root, "sentry.yaml", &yaml)
    };
    let watch_once = |config: &std::path::Path| {
        let out = run(sentry(root)
            .env("FORGE_TOKEN", TOKEN)
            .arg("-c")
            .arg(config)
            .args(["watch", "--once"]));
        assert_eq!(out.code, Some(0), "{}", out.all());
    };
    watch_once(&config_for(&[0, 1]));
    let validators = root.join("state.json.validators.json");
    let text = std::fs::read_to_string(&validators).expect("validators");
    assert!(text.contains("\"r01\""), "{text}");
    watch_once(&config_for(&[0]));
    let text = std::fs::read_to_string(&validators).expect("validators");
    assert!(text.contains("\"r00\""), "{text}");
    assert!(!text.contains("\"r01\""), "r01 is pruned: {text}");
}
