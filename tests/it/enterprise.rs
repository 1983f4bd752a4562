//! Enterprise connectivity through the real binary against real servers on 127.0.0.1:
//! private certificate authorities (`tls.ca_file`, `GIT_SSL_CAINFO`) in front of a Git
//! smart-HTTP server and a fake GitHub API.

use std::path::Path;

use axum::Router;
use axum::routing::get;

use crate::support::fake_kube_tls;
use crate::support::git_http::GitHttpServer;
use crate::support::{Run, git, init_repo, qa_repo, run, sentry, tempdir, write};

/// A YAML single-quoted scalar.
fn q(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A config watching `app` twice over HTTPS — through the GitHub API (`api`) and with
/// ls-remote (`plain`) — and deploying both from the QA repository over HTTPS.
fn config(root: &Path, base: &str, tls: &str) -> String {
    let mut y = format!(
        "work_dir: {}\nstate_file: {}\nshutdown_grace: 1s\n{tls}server:\n  enabled: false\ngroups:\n  g:\n    execution_strategy: sequential\nrepositories:\n",
        q(&root.join("work").to_string_lossy()),
        q(&root.join("state.json").to_string_lossy()),
    );
    for (name, monitor) in [
        (
            "api",
            format!(
                "repo_url: {base}/o/app\n      repo_type: github\n      api_url: {base}/api/v3"
            ),
        ),
        (
            "plain",
            format!("repo_url: {base}/app\n      repo_type: git"),
        ),
    ] {
        y.push_str(&format!(
            "  - name: {name}\n    group: g\n    monitor:\n      {monitor}\n      branches: [main]\n    deploy:\n      qa_repo_url: {base}/qa\n      qa_repo_branch: main\n      repo_type: git\n      commands: ['./deploy.sh']\n"
        ));
    }
    y
}

fn sentry_run(root: &Path, args: &[&str], git_ssl_cainfo: Option<&Path>) -> Run {
    let mut cmd = sentry(root);
    cmd.args(["-c", "sentry.yaml"]).args(args);
    for var in ["GIT_SSL_CAINFO", "SSL_CERT_FILE", "SSL_CERT_DIR"] {
        cmd.env_remove(var);
    }
    if let Some(file) = git_ssl_cainfo {
        cmd.env("GIT_SSL_CAINFO", file);
    }
    run(&mut cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_through_tls_ca_file_or_git_ssl_cainfo() {
    let dir = tempdir();
    let root = dir.path().to_owned();
    let served = root.join("served");
    let app = init_repo(&served.join("app"));
    qa_repo(
        &served.join("qa"),
        "#!/bin/sh\necho \"deployed $SENTRY_REPO_NAME $SENTRY_COMMIT_SHA\"\n",
    );
    let head = git(&app, &["rev-parse", "HEAD"]);
    let api_head = head.clone();
    let api = Router::new().route(
        "/api/v3/repos/o/app/commits/refs/heads/main",
        get(move || {
            let sha = api_head.clone();
            async move { sha }
        }),
    );
    let (server, ca) = GitHttpServer::start_tls(&served, None, api, fake_kube_tls::serve_pem)
        .await
        .expect("https git server");
    let base = server.url("").trim_end_matches('/').to_owned();
    let ca_file = write(&root, "corp-ca.pem", &ca);

    let root2 = root.clone();
    let ca2 = ca_file.clone();
    tokio::task::spawn_blocking(move || {
        let root = root2.as_path();
        // Without the CA: every HTTPS client refuses the server, clearly and at once.
        write(root, "sentry.yaml", &config(root, &base, ""));
        let started = std::time::Instant::now();
        let out = sentry_run(root, &["watch", "--once"], None);
        assert_eq!(out.code, Some(1), "{}", out.all());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "a certificate error is not retried: {:?}",
            started.elapsed()
        );
        let all = out.all().to_lowercase();
        assert!(all.contains("certificate"), "{}", out.all());
        assert!(all.contains("127.0.0.1"), "names the host: {}", out.all());
        let out = sentry_run(root, &["trigger", "--repo", "plain", "--sha", &head], None);
        assert_ne!(out.code, Some(0), "{}", out.all());
        assert!(
            out.all().to_lowercase().contains("certificate"),
            "{}",
            out.all()
        );

        // With tls.ca_file: the API client, ls-remote and the clone all trust it.
        let tls = format!("tls:\n  ca_file: {}\n", q(&ca2.to_string_lossy()));
        write(root, "sentry.yaml", &config(root, &base, &tls));
        let out = sentry_run(root, &["watch", "--once"], None);
        assert_eq!(out.code, Some(0), "{}", out.all());
        for repo in ["api", "plain"] {
            let out = sentry_run(root, &["trigger", "--repo", repo], None);
            assert_eq!(out.code, Some(0), "{repo}: {}", out.all());
            assert!(
                out.all().contains(&format!("deployed {repo} {head}")),
                "{repo}: {}",
                out.all()
            );
        }

        // With GIT_SSL_CAINFO (what git users and CI images set) and no config key.
        std::fs::remove_file(root.join("state.json")).ok();
        write(root, "sentry.yaml", &config(root, &base, ""));
        let out = sentry_run(root, &["watch", "--once"], Some(&ca2));
        assert_eq!(out.code, Some(0), "{}", out.all());
        let out = sentry_run(root, &["trigger", "--repo", "plain"], Some(&ca2));
        assert_eq!(out.code, Some(0), "{}", out.all());
        assert!(
            out.all().contains(&format!("deployed plain {head}")),
            "{}",
            out.all()
        );

        // A CA file that is not one is a validation error naming the key.
        write(root, "not-a-ca.pem", "hello\n");
        let tls = format!(
            "tls:\n  ca_file: {}\n",
            q(&root.join("not-a-ca.pem").to_string_lossy())
        );
        write(root, "sentry.yaml", &config(root, &base, &tls));
        let out = sentry_run(root, &["validate"], None);
        assert_eq!(out.code, Some(1), "{}", out.all());
        assert!(out.all().contains("tls.ca_file"), "{}", out.all());
    })
    .await
    .unwrap();
    assert!(server.requests() > 0);
}

/// Two HTTPS forges, each with its own private CA. The repository whose `tls.ca_file`
/// names both CAs works; the one on the other host, which has none, fails at once (its
/// API client does not get the other repository's CAs) with a certificate
/// error naming the host and the reason, is not retried, and is counted in
/// `sentry_tls_errors_total{host}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_ca_trusts_only_its_hosts_and_a_refused_certificate_is_counted() {
    use crate::support::{Background, http, wait_until};
    use std::time::Duration;
    let dir = tempdir();
    let root = dir.path().to_owned();
    let served = root.join("served");
    let app = init_repo(&served.join("o/app"));
    qa_repo(&served.join("qa"), "#!/bin/sh\necho deployed\n");
    let head = git(&app, &["rev-parse", "HEAD"]);
    let api = |sha: String| {
        Router::new().route(
            "/api/v3/repos/o/app/commits/refs/heads/main",
            get(move || {
                let sha = sha.clone();
                async move { sha }
            }),
        )
    };
    let (trusted, ca) =
        GitHttpServer::start_tls(&served, None, api(head.clone()), fake_kube_tls::serve_pem)
            .await
            .expect("https server a");
    let (refused, other_ca) =
        GitHttpServer::start_tls(&served, None, api(head.clone()), fake_kube_tls::serve_pem)
            .await
            .expect("https server b");
    // a's bundle holds b's CA too: were it trusted for every host, b would work.
    let ca_file = write(&root, "a-ca.pem", &format!("{ca}\n{other_ca}"));
    let (base_a, base_b) = (
        trusted.url("").trim_end_matches('/').to_owned(),
        refused.url("").trim_end_matches('/').to_owned(),
    );
    let host_b = base_b.trim_start_matches("https://").to_owned();
    let mut y = format!(
        "work_dir: {}\nstate_file: {}\nshutdown_grace: 1s\npolling_interval: 1h\nserver: {{listen: \"127.0.0.1:0\"}}\ngroups:\n  g:\n    execution_strategy: sequential\nrepositories:\n",
        q(&root.join("work").to_string_lossy()),
        q(&root.join("state.json").to_string_lossy()),
    );
    for (name, base, tls) in [
        (
            "a",
            &base_a,
            format!(
                "    tls:\n      ca_file: {}\n",
                q(&ca_file.to_string_lossy())
            ),
        ),
        ("b", &base_b, String::new()),
    ] {
        y.push_str(&format!(
            "  - name: {name}\n    group: g\n{tls}    monitor:\n      repo_url: {base}/o/app\n      repo_type: github\n      api_url: {base}/api/v3\n      branches: [main]\n    deploy:\n      qa_repo_url: {base}/qa\n      qa_repo_branch: main\n      repo_type: git\n      commands: ['./deploy.sh']\n"
        ));
    }
    write(&root, "sentry.yaml", &y);

    let root2 = root.clone();
    tokio::task::spawn_blocking(move || {
        let root = root2.as_path();
        let mut cmd = sentry(root);
        cmd.args(["-c", "sentry.yaml", "watch"]);
        for var in ["GIT_SSL_CAINFO", "SSL_CERT_FILE", "SSL_CERT_DIR"] {
            cmd.env_remove(var);
        }
        let started = std::time::Instant::now();
        let bg = Background::spawn(&mut cmd);
        let port = bg.http_port();
        bg.wait_for_line("cycle:", Duration::from_secs(60));
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a refused certificate is not retried: {:?}\n{}",
            started.elapsed(),
            bg.log()
        );
        let log = bg.log();
        let refusal = log
            .lines()
            .find(|l| l.contains("certificate") && l.contains(&host_b))
            .unwrap_or_else(|| panic!("no certificate error naming {host_b}:\n{log}"));
        assert!(!refusal.contains("tries"), "retried: {refusal}");
        assert!(
            refusal.to_lowercase().contains("unknown") || refusal.to_lowercase().contains("issuer"),
            "gives the reason: {refusal}"
        );
        let metrics = wait_until(Duration::from_secs(10), || {
            let (_, text) = http("GET", port, "/metrics", &[], b"");
            text.contains("sentry_tls_errors_total").then_some(text)
        })
        .expect("metrics");
        let count = |host: &str| -> Option<f64> {
            metrics.lines().find_map(|l| {
                l.strip_prefix(&format!("sentry_tls_errors_total{{host=\"{host}\"}} "))
                    .and_then(|v| v.trim().parse().ok())
            })
        };
        assert_eq!(count(&host_b), Some(1.0), "{metrics}");
        let host_a = base_a.trim_start_matches("https://");
        assert_eq!(count(host_a), None, "{metrics}");
        drop(bg);
        // The trusted repository was checked: its baseline is in the state, b's is not.
        let state = std::fs::read_to_string(root.join("state.json")).unwrap_or_default();
        assert!(state.contains(&head), "{state}");
        assert!(state.contains("\"a\""), "{state}");
        assert!(!state.contains("\"b\""), "{state}");

        // A repository's CA file that holds no certificate: a validation error at its path.
        write(root, "not-a-ca.pem", "hello\n");
        let text = std::fs::read_to_string(root.join("sentry.yaml")).unwrap();
        write(
            root,
            "sentry.yaml",
            &text.replace("a-ca.pem", "not-a-ca.pem"),
        );
        let out = run(sentry(root).args(["-c", "sentry.yaml", "validate"]));
        assert_eq!(out.code, Some(1), "{}", out.all());
        assert!(
            out.all().contains("repositories[0].tls.ca_file"),
            "{}",
            out.all()
        );
    })
    .await
    .unwrap();
    assert_eq!(
        refused.requests(),
        0,
        "no request got past the refused handshake"
    );
    drop(trusted);
}
