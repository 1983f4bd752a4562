//! GitHub App authentication through the real binary, against a fake GitHub Enterprise
//! (`/api/v3`) that verifies the App's JWTs with its public key, and a real Git smart-HTTP
//! server that lets in only the installation tokens it issued (user `x-access-token`).

use std::path::Path;
use std::time::Duration;

use crate::support::fake_github_app::{FakeGithubApp, app_keys};
use crate::support::git_http::GitHttpServer;
use crate::support::{Run, commit, init_repo, qa_repo, run, sentry, tempdir, write};

const APP_ID: u64 = 31337;
const INSTALLATION: u64 = 4242;

/// A YAML single-quoted scalar.
fn q(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn app_auth(key: &Path, installation: Option<u64>) -> String {
    let mut y = format!(
        "github_app:\n          app_id: {APP_ID}\n          private_key_file: {}\n",
        q(&key.to_string_lossy())
    );
    if let Some(id) = installation {
        y.push_str(&format!("          installation_id: {id}\n"));
    }
    y
}

/// The top of a config: files under `root`, an audit log, no server.
fn head(root: &Path) -> String {
    format!(
        "work_dir: {}\nstate_file: {}\naudit_log: {}\nshutdown_grace: 1s\nserver:\n  enabled: false\ngroups:\n  g:\n    execution_strategy: sequential\nrepositories:\n",
        q(&root.join("work").to_string_lossy()),
        q(&root.join("state.json").to_string_lossy()),
        q(&root.join("audit.jsonl").to_string_lossy()),
    )
}

/// One repository: watched through the API (`github`) or ls-remote (`git`), deployed from
/// the QA repository with the App's token.
fn repo(name: &str, base: &str, repo_type: &str, key: &Path, root: &Path) -> String {
    let api = if repo_type == "github" {
        format!("\n      api_url: {base}/api/v3")
    } else {
        String::new()
    };
    let installation = (repo_type == "git").then_some(INSTALLATION);
    format!(
        "  - name: {name}\n    group: g\n    monitor:\n      repo_url: {base}/o/app\n      repo_type: {repo_type}{api}\n      branches: [main]\n      auth:\n        {}    deploy:\n      qa_repo_url: {base}/o/qa\n      qa_repo_branch: main\n      auth:\n        {}      env:\n        OUT: {}\n      commands: ['./deploy.sh']\n",
        app_auth(key, installation),
        app_auth(key, None),
        q(&root.join(format!("token-{name}")).to_string_lossy()),
    )
}

fn sentry_run(root: &Path, args: &[&str]) -> Run {
    let mut cmd = sentry(root);
    cmd.args(["-c", "sentry.yaml"]).args(args);
    run(&mut cmd)
}

/// Every file under `dir` (recursively), except those named `token-*`, as text.
fn files_text(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_text(&path));
        } else if !entry.file_name().to_string_lossy().starts_with("token-") {
            let bytes = std::fs::read(&path).unwrap_or_default();
            out.push((
                path.display().to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    out
}

struct World {
    dir: crate::support::TempDir,
    app: FakeGithubApp,
    server: GitHttpServer,
    key: std::path::PathBuf,
}

impl World {
    fn root(&self) -> &Path {
        self.dir.path()
    }
    fn base(&self) -> String {
        self.server.url("").trim_end_matches('/').to_owned()
    }
    fn watched(&self) -> std::path::PathBuf {
        self.root().join("served/o/app")
    }
}

async fn world() -> World {
    let dir = tempdir();
    let root = dir.path().to_owned();
    let served = root.join("served");
    init_repo(&served.join("o/app"));
    qa_repo(
        &served.join("o/qa"),
        "#!/bin/sh\necho \"token length ${#SENTRY_GITHUB_TOKEN}\"\necho \"token: $SENTRY_GITHUB_TOKEN\"\nprintf %s \"$SENTRY_GITHUB_TOKEN\" > \"$OUT\"\n",
    );
    let (key, public) = app_keys(&root);
    let app = FakeGithubApp::new(public, APP_ID, INSTALLATION, served.clone());
    let server = GitHttpServer::start_checked(&served, app.router(), app.git_check())
        .await
        .expect("git server");
    World {
        dir,
        app,
        server,
        key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_token_serves_the_api_ls_remote_clone_and_commands_and_never_leaks() {
    let w = world().await;
    tokio::task::spawn_blocking(move || {
        let (root, base) = (w.root(), w.base());
        let mut y = head(root);
        y.push_str(&repo("api", &base, "github", &w.key, root));
        y.push_str(&repo("plain", &base, "git", &w.key, root));
        write(root, "sentry.yaml", &y);

        // First sight: a baseline through the API and ls-remote, one mint for both.
        let first = sentry_run(root, &["watch", "--once"]);
        assert_eq!(first.code, Some(0), "{}", first.all());
        assert_eq!(w.app.mints(), 1, "{}", first.all());
        assert!(w.app.api_ok() >= 1, "the API was asked with the token");
        assert!(w.app.git_ok() >= 1, "ls-remote used the token");
        assert_eq!(w.app.bad_jwts(), 0);

        // A push: both repositories deploy; the clone and the commands use the token.
        let sha = commit(&w.watched(), "change");
        let git_before = w.app.git_ok();
        let second = sentry_run(root, &["watch", "--once"]);
        assert_eq!(second.code, Some(0), "{}", second.all());
        assert!(w.app.git_ok() > git_before, "the clone used the token");
        assert_eq!(w.app.mints(), 2, "one mint per process: {}", second.all());
        let tokens = w.app.tokens();
        for name in ["api", "plain"] {
            let handed = std::fs::read_to_string(root.join(format!("token-{name}"))).unwrap();
            assert!(
                tokens.contains(&handed),
                "{name}: {handed:?} was not issued"
            );
            assert_eq!(handed.len(), 64, "ghs_ and 60 characters");
        }
        let all = second.all();
        assert!(all.contains("token length 64"), "{all}");
        assert!(
            all.contains("token: ***"),
            "command output is masked: {all}"
        );
        let state = std::fs::read_to_string(root.join("state.json")).unwrap();
        assert!(state.contains(&sha), "deployed {sha}: {state}");

        // Never in clear: not in any output, nor in any file Sentry wrote.
        assert!(root.join("audit.jsonl").exists());
        let mut places = vec![
            ("first run".to_owned(), first.all()),
            ("second run".to_owned(), second.all()),
        ];
        places.extend(
            files_text(root)
                .into_iter()
                .filter(|(p, _)| !p.contains("/served/")),
        );
        for token in &tokens {
            for (place, text) in &places {
                assert!(!text.contains(token.as_str()), "token in {place}");
                assert!(!text.contains(&token[4..]), "token body in {place}");
            }
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_minted_again_once_and_an_expiring_one_is_replaced() {
    let w = world().await;
    tokio::task::spawn_blocking(move || {
        let (root, base) = (w.root(), w.base());
        let mut y = head(root);
        y.push_str(&repo("api", &base, "github", &w.key, root));
        write(root, "sentry.yaml", &y);

        // The first token is refused (revoked early): exactly one new mint, then success.
        w.app.revoke_next(1);
        let out = sentry_run(root, &["watch", "--once"]);
        assert_eq!(out.code, Some(0), "{}", out.all());
        assert_eq!(w.app.api_unauthorized(), 1, "{}", out.all());
        assert_eq!(w.app.mints(), 2, "{}", out.all());

        // Every token refused: one refresh, no more, and a clear error.
        w.app.refuse_all(true);
        let started = std::time::Instant::now();
        let out = sentry_run(root, &["watch", "--once"]);
        assert_ne!(out.code, Some(0), "{}", out.all());
        assert_eq!(w.app.mints(), 4, "one mint and one refresh: {}", out.all());
        assert_eq!(w.app.api_unauthorized(), 3, "{}", out.all());
        assert!(out.all().contains("401"), "{}", out.all());
        assert!(started.elapsed() < Duration::from_secs(60));
        w.app.refuse_all(false);

        // Tokens that expire within the refresh margin are replaced before each use: the
        // API check, the clone and the commands each get a new one.
        w.app.set_lifetime(Duration::from_secs(120));
        commit(&w.watched(), "change");
        let before = w.app.mints();
        let out = sentry_run(root, &["watch", "--once"]);
        assert_eq!(out.code, Some(0), "{}", out.all());
        assert!(w.app.mints() - before >= 3, "{}", out.all());
        let handed = std::fs::read_to_string(root.join("token-api")).unwrap();
        assert_eq!(
            w.app.tokens().last(),
            Some(&handed),
            "commands got the newest"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_repositories_checked_at_once_share_one_mint() {
    let w = world().await;
    tokio::task::spawn_blocking(move || {
        let (root, base) = (w.root(), w.base());
        let mut y = head(root);
        for i in 0..50 {
            y.push_str(&repo(&format!("r{i}"), &base, "github", &w.key, root));
        }
        write(root, "sentry.yaml", &y);
        let out = sentry_run(root, &["watch", "--once"]);
        assert_eq!(out.code, Some(0), "{}", out.all());
        assert_eq!(w.app.mints(), 1, "{}", out.all());
        assert!(w.app.api_ok() >= 50);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_app_configuration_errors_name_the_key() {
    let w = world().await;
    tokio::task::spawn_blocking(move || {
        let (root, base) = (w.root(), w.base());
        write(root, "not-a-key.pem", "hello\n");
        let mut y = head(root);
        y.push_str(&repo(
            "api",
            &base,
            "github",
            &root.join("not-a-key.pem"),
            root,
        ));
        write(root, "sentry.yaml", &y);
        let out = sentry_run(root, &["validate"]);
        assert_eq!(out.code, Some(1), "{}", out.all());
        assert!(
            out.all()
                .contains("repositories[0].monitor.auth.github_app.private_key_file"),
            "{}",
            out.all()
        );

        let mut y = head(root);
        y.push_str(&repo("api", &base, "github", &w.key, root).replace(
            "      auth:\n        github_app:\n          app_id",
            "      auth:\n        token: abcdef\n        github_app:\n          app_id",
        ));
        write(root, "sentry.yaml", &y);
        let out = sentry_run(root, &["validate"]);
        assert_eq!(out.code, Some(1), "{}", out.all());
        assert!(out.all().contains("not both"), "{}", out.all());

        // GitLab: an App authenticates to GitHub only.
        let mut y = head(root);
        y.push_str(
            &repo("api", &base, "github", &w.key, root)
                .replace("repo_type: github", "repo_type: gitlab"),
        );
        write(root, "sentry.yaml", &y);
        let out = sentry_run(root, &["validate"]);
        assert_eq!(out.code, Some(1), "{}", out.all());
        assert!(
            out.all()
                .contains("repositories[0].monitor.auth.github_app"),
            "{}",
            out.all()
        );

        // Job pods mint no tokens: refused for a group on the kubernetes executor.
        let y = head(root).replace(
            "execution_strategy: sequential\n",
            "execution_strategy: sequential\n    executor:\n      kind: kubernetes\n      namespace: qa\n      image: sentry:test\n",
        ) + &repo("api", &base, "github", &w.key, root);
        write(root, "sentry.yaml", &y);
        let out = sentry_run(root, &["validate"]);
        assert_eq!(out.code, Some(1), "{}", out.all());
        assert!(out.all().contains("Kubernetes Jobs"), "{}", out.all());

        let mut y = head(root);
        y.push_str(&repo("api", &base, "github", &w.key, root));
        write(root, "sentry.yaml", &y);
        let out = sentry_run(root, &["validate"]);
        assert_eq!(out.code, Some(0), "{}", out.all());
    })
    .await
    .unwrap();
}
