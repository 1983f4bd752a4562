//! Webhook endpoints: random headers and bodies through the real axum router. No input may
//! panic or produce a 5xx. The first byte picks the endpoint and how the request is
//! authenticated (GitHub signature valid or not, GitLab token right or not), so that the
//! payload parser is reached as well as the verification.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sentry::testing::{Config, Env, load_str};
use sentry::testing::Health;
use sentry::testing::{AppState, hmac_sha256_valid, router};
use sentry::testing::Shutdown;
use sentry::testing::Metrics;
use sha2::Sha256;
use tower::ServiceExt;

const SECRET: &str = "fuzz-github-secret";
const TOKEN: &str = "fuzz-gitlab-token";
const CONFIG: &str = concat!(
    "webhooks:\n",
    "  github_secret: fuzz-github-secret\n",
    "  gitlab_token: fuzz-gitlab-token\n",
    "groups: {g: {}}\n",
    "repositories:\n",
    "  - name: gh\n",
    "    group: g\n",
    "    monitor: {repo_url: \"https://github.com/o/gh\", repo_type: github, branches: [main, \"rel/*\"]}\n",
    "    deploy: {qa_repo_url: \"https://github.com/o/qa\", qa_repo_branch: main, commands: [\"true\"]}\n",
    "  - name: gl\n",
    "    group: g\n",
    "    monitor: {repo_url: \"https://gitlab.com/grp/gl\", repo_type: gitlab, branches: [main]}\n",
    "    deploy: {qa_repo_url: \"https://github.com/o/qa\", qa_repo_branch: main, commands: [\"true\"]}\n",
);

struct World {
    runtime: tokio::runtime::Runtime,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let loaded = load_str(CONFIG, &Env::fixed::<[(&str, &str); 0], &str, &str>([]));
        let Some(config) = loaded.config else {
            panic!("the fuzz config is invalid: {:?}", loaded.diagnostics);
        };
        World {
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
            config: Arc::new(config),
            metrics: Arc::new(Metrics::new()),
        }
    })
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    // rest = header value \0 event \0 body
    let mut parts = rest.splitn(3, |b| *b == 0);
    let raw_header = parts.next().unwrap_or_default();
    let event = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default().to_vec();

    // The signature check alone, on arbitrary input.
    let _ = hmac_sha256_valid(
        SECRET.as_bytes(),
        &body,
        std::str::from_utf8(raw_header).ok(),
    );

    let w = world();
    let (hints, mut receiver) = tokio::sync::mpsc::channel(64);
    let state = AppState {
        config: w.config.clone(),
        health: Arc::new(Health::default()),
        metrics: w.metrics.clone(),
        shutdown: Shutdown::new(),
        hints,
        started: Instant::now(),
        live: None,
    };
    let gitlab = selector & 1 == 1;
    let authentic = selector & 2 == 2;
    let mut request = Request::builder()
        .method(if selector & 4 == 4 { "GET" } else { "POST" })
        .uri(if gitlab {
            "/webhooks/gitlab"
        } else {
            "/webhooks/github"
        });
    let event = String::from_utf8_lossy(event).into_owned();
    let header_text = String::from_utf8_lossy(raw_header).into_owned();
    if gitlab {
        request = request.header(
            "x-gitlab-event",
            if selector & 8 == 8 {
                "Push Hook"
            } else {
                event.as_str()
            },
        );
        request = request.header(
            "x-gitlab-token",
            if authentic {
                TOKEN
            } else {
                header_text.as_str()
            },
        );
    } else {
        request = request.header(
            "x-github-event",
            if selector & 8 == 8 {
                "push"
            } else {
                event.as_str()
            },
        );
        let signature = if authentic {
            sign(&body)
        } else {
            header_text.clone()
        };
        request = request.header("x-hub-signature-256", signature);
    }
    // Header values that the HTTP layer would refuse never reach the router.
    let Ok(request) = request.body(Body::from(body)) else {
        return;
    };
    let response = w
        .runtime
        .block_on(router(state).oneshot(request))
        .expect("infallible");
    let status = response.status();
    assert!(!status.is_server_error(), "{status}");
    // A hint may only come from an authentic request.
    if receiver.try_recv().is_ok() {
        assert!(authentic, "an unauthenticated webhook scheduled a check");
    }
});
