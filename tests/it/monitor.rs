//! The monitor as a library against a fake GitHub (wiremock on 127.0.0.1): per-repository
//! backoff after a 404 and its recovery, and that errors never change state.

use std::sync::Arc;
use std::time::Duration;

use sentry::testing::Forges;
use sentry::testing::Metrics;
use sentry::testing::Observers;
use sentry::testing::Scheduler;
use sentry::testing::Shutdown;
use sentry::testing::StateStore;
use sentry::testing::{DeployOptions, Deployer, Trigger};
use sentry::testing::{Env, load_str};
use sentry::testing::{Monitor, Scope};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::tempdir;

const SHA: &str = "1111111111111111111111111111111111111111";

fn monitor(api: &str, dir: &std::path::Path) -> (Monitor, Arc<StateStore>) {
    let yaml = format!(
        "polling_interval: 1s\nrequest_timeout: 5s\nstate_file: {dir}/state.json\nwork_dir: {dir}/work\n\
         groups: {{g: }}\nrepositories:\n  - name: app\n    group: g\n    monitor:\n      repo_url: https://github.example.com/o/app\n      repo_type: github\n      api_url: {api}\n      branches: [main]\n\
         \x20   deploy: {{qa_repo_url: {dir}/qa, qa_repo_branch: main, commands: [\"true\"]}}\n",
        dir = dir.display()
    );
    let config = Arc::new(
        load_str(&yaml, &Env::fixed::<[(&str, &str); 0], _, _>([]))
            .config
            .expect("config"),
    );
    let state = Arc::new(StateStore::load(&config.state_file).expect("state"));
    let deployer = Deployer::new(config.clone(), DeployOptions::default());
    let scheduler = Scheduler::new(
        config.clone(),
        deployer,
        state.clone(),
        Shutdown::new(),
        Observers::default(),
        Arc::new(Metrics::new()),
    );
    let forges = Forges::new(&config).expect("forges");
    (
        Monitor::new(
            config,
            forges,
            state.clone(),
            scheduler,
            Arc::new(Metrics::new()),
        ),
        state,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn not_found_backs_off_across_cycles_and_recovers() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/o/app/commits/refs/heads/main"))
        .respond_with(ResponseTemplate::new(404).set_body_string("{\"message\":\"Not Found\"}"))
        .mount(&server)
        .await;
    let dir = tempdir();
    let (monitor, state) = monitor(&server.uri(), dir.path());
    let cancel = tokio_util::sync::CancellationToken::new();
    let requests = || async { server.received_requests().await.map_or(0, |r| r.len()) };

    let first = monitor.poll_once(Scope::All, Trigger::Poll, &cancel).await;
    assert_eq!((first.errors, first.backing_off), (1, 0));
    assert_eq!(requests().await, 1);
    assert!(
        state.snapshot().repositories.is_empty(),
        "an error changed state"
    );

    // The next cycles skip the repository instead of spending quota on it.
    let second = monitor.poll_once(Scope::All, Trigger::Poll, &cancel).await;
    assert_eq!((second.errors, second.backing_off), (0, 1));
    assert_eq!(requests().await, 1, "a backing-off repository was asked");

    // The repository is fixed; once its backoff ends it is checked again and recovers.
    server.reset().await;
    Mock::given(method("GET"))
        .and(path("/repos/o/app/commits/refs/heads/main"))
        .respond_with(ResponseTemplate::new(200).set_body_string(SHA))
        .mount(&server)
        .await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let third = monitor.poll_once(Scope::All, Trigger::Poll, &cancel).await;
    assert_eq!(
        (third.errors, third.backing_off, third.branches_checked),
        (0, 0, 1)
    );
    assert_eq!(
        state.branch("app", "main").expect("baseline").sha.as_str(),
        SHA
    );
    let fourth = monitor.poll_once(Scope::All, Trigger::Poll, &cancel).await;
    assert_eq!(
        fourth.backing_off, 0,
        "recovered repository still backing off"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn explicit_checks_ignore_backoff() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/o/app/commits/refs/heads/main"))
        .respond_with(ResponseTemplate::new(404))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/o/app/commits/refs/heads/main"))
        .respond_with(ResponseTemplate::new(200).set_body_string(SHA))
        .mount(&server)
        .await;
    let dir = tempdir();
    let (monitor, state) = monitor(&server.uri(), dir.path());
    let cancel = tokio_util::sync::CancellationToken::new();
    assert_eq!(
        monitor
            .poll_once(Scope::All, Trigger::Poll, &cancel)
            .await
            .errors,
        1
    );
    // A webhook hint names the repository: it is checked now, backoff or not.
    let hinted = monitor
        .poll_once(
            Scope::Repositories(vec!["app".into()]),
            Trigger::Webhook,
            &cancel,
        )
        .await;
    assert_eq!((hinted.errors, hinted.branches_checked), (0, 1));
    assert!(state.branch("app", "main").is_some());
}
