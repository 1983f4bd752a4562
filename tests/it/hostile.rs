//! Hostile input: malformed and malicious configuration files for `sentry validate`
//! (bounded in time and memory, never a panic), random bodies and headers for the webhook
//! endpoints (4xx or "ignored", nothing scheduled), and branch names that try to inject
//! shell syntax (they reach commands only as data), through polling and `trigger`.

use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use nix::sys::signal::Signal;
use sha2::Sha256;

use crate::crash::Rng;
use crate::support::{http, rlimit, run, run_bounded, sentry, tempdir, wait_until, write};
use crate::watch::Fixture;

const VALID: &str = "groups: {g: {}}\nrepositories:\n  - name: app\n    group: g\n    monitor: {repo_url: \"https://github.com/o/r\", repo_type: github, branches: [main]}\n    deploy: {qa_repo_url: \"https://github.com/o/qa\", qa_repo_branch: main, commands: [\"true\"]}\n";

/// `VALID` with `key: value` added at the top level.
fn top(key_value: &str) -> Vec<u8> {
    format!("{key_value}\n{VALID}").into_bytes()
}

/// `VALID` with `from` replaced by `to` (which makes it invalid).
fn sub(from: &str, to: &str) -> Vec<u8> {
    assert!(VALID.contains(from), "{from}");
    VALID.replacen(from, to, 1).into_bytes()
}

fn nested(depth: usize, open: &str, close: &str) -> String {
    format!("groups: {}{}\n", open.repeat(depth), close.repeat(depth))
}

fn billion_laughs(levels: usize, key: &str) -> Vec<u8> {
    let mut text = String::from(
        "a0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for i in 1..levels {
        let refs = vec![format!("*a{}", i - 1); 10].join(",");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    text.push_str(&format!("{key}: *a{}\n", levels - 1));
    text.into_bytes()
}

/// At least 50 configuration files that must all be rejected.
fn hostile_configs() -> Vec<(String, Vec<u8>)> {
    let mut rng = Rng::new(0x5e17_c0de);
    let mut junk = vec![0u8; 8192];
    for b in junk.iter_mut() {
        *b = rng.next() as u8;
    }
    let mega = "x".repeat(2 << 20);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("only whitespace", b"   \n\n\t\n".to_vec()),
        ("null document", b"~\n".to_vec()),
        ("top-level list", b"- a\n- b\n".to_vec()),
        ("top-level number", b"42\n".to_vec()),
        ("top-level string", b"\"groups\"\n".to_vec()),
        ("binary junk", junk.clone()),
        (
            "junk after valid",
            [VALID.as_bytes(), &junk[..512]].concat(),
        ),
        (
            "NUL bytes",
            [VALID.as_bytes(), b"\0\0\0groups: \0\n"].concat(),
        ),
        ("UTF-16 with BOM", {
            let mut v = vec![0xff, 0xfe];
            for u in VALID.encode_utf16() {
                v.extend_from_slice(&u.to_le_bytes());
            }
            v
        }),
        ("negative interval", top("polling_interval: -1")),
        ("zero interval", top("polling_interval: 0")),
        (
            "huge interval",
            top("polling_interval: 99999999999999999999999999"),
        ),
        ("float interval", top("polling_interval: 1e308")),
        ("nan interval", top("polling_interval: .nan")),
        ("inf interval", top("polling_interval: -.inf")),
        (
            "absurd duration text",
            top("polling_interval: 9223372036854775807h"),
        ),
        (
            "repeated duration text",
            top(&format!("polling_interval: \"{}\"", "1h".repeat(5000))),
        ),
        ("negative duration text", top("shutdown_grace: \"-5s\"")),
        ("requests per host zero", top("max_requests_per_host: 0")),
        (
            "requests per host 2^64",
            top("max_requests_per_host: 18446744073709551616"),
        ),
        (
            "requests per host negative",
            top("max_requests_per_host: -8"),
        ),
        (
            "max_parallel negative",
            sub("groups: {g: {}}", "groups: {g: {max_parallel: -3}}"),
        ),
        (
            "max_parallel huge",
            sub("groups: {g: {}}", "groups: {g: {max_parallel: 1e40}}"),
        ),
        (
            "max_parallel string",
            sub("groups: {g: {}}", "groups: {g: {max_parallel: many}}"),
        ),
        (
            "retries over range",
            sub("commands: [\"true\"]", "commands: [\"true\"], retries: 11"),
        ),
        (
            "retries negative",
            sub("commands: [\"true\"]", "commands: [\"true\"], retries: -1"),
        ),
        ("groups is a list", sub("groups: {g: {}}", "groups: [g]")),
        (
            "repositories is a map",
            b"groups: {g: {}}\nrepositories: {name: app}\n".to_vec(),
        ),
        (
            "repositories is a string",
            b"groups: {g: {}}\nrepositories: app\n".to_vec(),
        ),
        (
            "branches is a string",
            sub("branches: [main]", "branches: main"),
        ),
        (
            "branches nested lists",
            sub("branches: [main]", "branches: [[main], {a: 1}]"),
        ),
        ("branches empty", sub("branches: [main]", "branches: []")),
        (
            "branch with control chars",
            sub("branches: [main]", "branches: [\"ma\\u0007in\\u001b[31m\"]"),
        ),
        (
            "commands is a string",
            sub("commands: [\"true\"]", "commands: \"true\""),
        ),
        (
            "commands empty",
            sub("commands: [\"true\"]", "commands: []"),
        ),
        (
            "commands numbers",
            sub("commands: [\"true\"]", "commands: [1, 2.5, null]"),
        ),
        (
            "env is a list",
            sub("commands: [\"true\"]", "commands: [\"true\"], env: [1, 2]"),
        ),
        (
            "env nested",
            sub(
                "commands: [\"true\"]",
                "commands: [\"true\"], env: {A: [1, {b: 2}]}",
            ),
        ),
        ("server is a number", top("server: 5")),
        (
            "listen port out of range",
            top("server: {listen: \":99999\"}"),
        ),
        ("webhooks is a string", top("webhooks: yes")),
        ("deep flow lists", nested(20_000, "[", "]").into_bytes()),
        ("deep flow maps", nested(20_000, "{a: ", "}").into_bytes()),
        ("deep block maps", {
            let mut t = String::from("groups:\n");
            for i in 1..3000 {
                t.push_str(&" ".repeat(i));
                t.push_str("a:\n");
            }
            t.into_bytes()
        }),
        ("billion laughs at top level", billion_laughs(10, "groups")),
        (
            "billion laughs under an unknown key",
            [billion_laughs(9, "zzz"), VALID.as_bytes().to_vec()].concat(),
        ),
        ("alias bomb in branches", {
            let mut t = String::from_utf8(billion_laughs(8, "bomb")).expect("utf8");
            t.push_str(&VALID.replace("branches: [main]", "branches: *a7"));
            t.into_bytes()
        }),
        ("undefined alias", top("polling_interval: *nope")),
        ("recursive-looking anchor", b"a: &x {b: *x}\n".to_vec()),
        (
            "megabyte repository name",
            sub("name: app", &format!("name: {mega}")),
        ),
        (
            "megabyte command",
            sub(
                "commands: [\"true\"]",
                &format!("commands: [\"{mega}\"], retries: 99"),
            ),
        ),
        ("megabyte key", top(&format!("{mega}: 1"))),
        ("over 16 MiB", {
            let mut t = VALID.as_bytes().to_vec();
            t.extend(std::iter::repeat_n(b'#', 17 << 20));
            t
        }),
        ("50k keys", {
            let mut t = String::from("groups: {");
            for i in 0..50_000 {
                t.push_str(&format!("g{i}: {{max_parallel: 0}}, "));
            }
            t.push_str("}\nrepositories: []\n");
            t.into_bytes()
        }),
        (
            "right-to-left override name",
            sub("name: app", "name: \"ap\\u202ep\""),
        ),
        (
            "zero-width and emoji group",
            sub("group: g", "group: \"g\\u200d🚀\""),
        ),
        ("fullwidth group", sub("group: g", "group: ｇ")),
        (
            "combining characters",
            sub("name: app", "name: \"a\\u0301\\u0301\\u0301pp\""),
        ),
        (
            "lone surrogate escape",
            sub("name: app", "name: \"\\ud800\""),
        ),
        (
            "tabs for indentation",
            VALID.replace("  - name", "\t- name").into_bytes(),
        ),
        ("tab inside flow", sub("group: g", "group:\tg\t\t:")),
        (
            "duplicate top-level key",
            [VALID.as_bytes(), b"groups: {h: {}}\n"].concat(),
        ),
        (
            "duplicate nested key",
            sub("name: app", "name: app\n    name: other"),
        ),
        ("unknown keys", top("polling_intervall: 5s\nstate_fil: x")),
        (
            "unset variable",
            sub("name: app", "name: \"${SENTRY_HOSTILE_UNSET_VARIABLE}\""),
        ),
        ("unterminated expansion", sub("name: app", "name: \"${\"")),
        (
            "nested expansion",
            sub("name: app", "name: \"${A:-${B:-${C}}}\""),
        ),
        (
            "many expansions",
            sub("name: app", &format!("name: \"{}\"", "${X".repeat(50_000))),
        ),
        (
            "custom tags",
            top("polling_interval: !!binary aGVsbG8=\nstate_file: !custom {a: 1}"),
        ),
        (
            "python tag",
            top("state_file: !!python/object:os.system [\"touch /tmp/x\"]"),
        ),
        (
            "several documents",
            [VALID.as_bytes(), b"---\ngroups: 1\n"].concat(),
        ),
        ("complex keys", top("? [a, b]\n: c\n1: 2\nnull: x")),
        (
            "javascript url",
            sub("https://github.com/o/r", "javascript:alert(1)"),
        ),
        (
            "url with credentials",
            sub(
                "https://github.com/o/r",
                "https://user:hunter2@github.com/o/r",
            ),
        ),
        (
            "file url for github",
            sub("https://github.com/o/r", "file:///etc/passwd"),
        ),
        (
            "CRLF with an error",
            VALID
                .replace('\n', "\r\n")
                .replace("github,", "gitbucket,")
                .into_bytes(),
        ),
        (
            "lone CR line ends",
            VALID
                .replace('\n', "\r")
                .replace("github,", "gitbucket,")
                .into_bytes(),
        ),
        ("unclosed quote", top("state_file: \"abc")),
        ("unclosed flow", top("groups: {g: [")),
    ];
    cases.sort_by_key(|(name, _)| *name);
    cases
        .into_iter()
        .map(|(name, bytes)| (name.to_owned(), bytes))
        .collect()
}

fn check_one(dir: &Path, index: usize, name: &str, bytes: &[u8]) -> Result<(), String> {
    let path = dir.join(format!("hostile-{index}.yaml"));
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    let mut cmd = sentry(dir);
    cmd.env_remove("SENTRY_HOSTILE_UNSET_VARIABLE")
        .arg("-c")
        .arg(&path)
        .arg("validate");
    rlimit::apply(&mut cmd, &[(rlimit::AS, 1 << 30)]);
    let (out, took) = run_bounded(&mut cmd, Duration::from_secs(10));
    let Some(out) = out else {
        return Err(format!("{name}: still running after {took:?} (killed)"));
    };
    if out.all().contains("panicked") || out.code == Some(101) {
        return Err(format!("{name}: panic: {}", tail(&out.stderr)));
    }
    if !matches!(out.code, Some(1 | 2)) {
        return Err(format!(
            "{name}: exit {:?} (killed by a signal when None: memory?), stderr: {}",
            out.code,
            tail(&out.stderr)
        ));
    }
    if !out.all().to_ascii_lowercase().contains("error") {
        return Err(format!("{name}: no message: {out:?}"));
    }
    Ok(())
}

fn tail(text: &str) -> String {
    let start = text.len().saturating_sub(600);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].to_owned()
}

#[test]
fn hostile_configs_are_rejected_without_panic_in_bounded_time_and_memory() {
    let dir = tempdir();
    let cases = hostile_configs();
    assert!(cases.len() >= 50, "only {} cases", cases.len());
    // The valid base really is valid, so every case fails for its own reason.
    let base = write(dir.path(), "base.yaml", VALID);
    let ok = run(sentry(dir.path()).arg("-c").arg(&base).arg("validate"));
    assert_eq!(ok.code, Some(0), "{ok:?}");

    let cases = std::sync::Arc::new(cases);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let root = dir.path().to_owned();
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (cases, next, root) = (cases.clone(), next.clone(), root.clone());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some((name, bytes)) = cases.get(i) else {
                        break;
                    };
                    if let Err(e) = check_one(&root, i, name, bytes) {
                        failures.push(e);
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} hostile configs were mishandled:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Webhooks

const GITHUB_SECRET: &str = "hostile-gh-secret";
const GITLAB_TOKEN: &str = "hostile-gl-token";

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(GITHUB_SECRET.as_bytes()).expect("hmac");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn random_text(rng: &mut Rng, max: usize) -> String {
    const ALPHABET: &[u8] =
        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -_=;:/.,{}[]\"'\\$()`|&*";
    let n = rng.below(max as u64 + 1) as usize;
    (0..n)
        .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize] as char)
        .collect()
}

/// A random body: junk bytes, broken JSON, or a valid push that concerns nothing watched.
fn random_body(rng: &mut Rng) -> Vec<u8> {
    match rng.below(8) {
        0 => (0..rng.below(4096)).map(|_| rng.next() as u8).collect(),
        1 => random_text(rng, 300).into_bytes(),
        2 => format!("{}{}", "[".repeat(rng.below(5000) as usize), "1").into_bytes(),
        3 => serde_json::json!({
            "ref": format!("refs/heads/{}", random_text(rng, 40)),
            "after": random_text(rng, 40),
            "repository": {"full_name": random_text(rng, 30), "clone_url": random_text(rng, 30)},
            "project": {"path_with_namespace": random_text(rng, 30)},
        })
        .to_string()
        .into_bytes(),
        // A watched repository, but a branch it does not watch.
        4 => serde_json::json!({
            "ref": "refs/heads/not-watched-branch",
            "after": "b".repeat(40),
            "repository": {"full_name": "someone/app", "clone_url": "file:///nowhere/app"},
        })
        .to_string()
        .into_bytes(),
        5 => serde_json::json!({
            "ref": rng.next(),
            "repository": [rng.next(), null, {"full_name": {"x": 1}}],
            "project": "app",
        })
        .to_string()
        .into_bytes(),
        6 => format!(
            "{{\"ref\": \"refs/heads/main\", \"after\": {}}}",
            "9".repeat(500)
        )
        .into_bytes(),
        _ => Vec::new(),
    }
}

/// POSTs `size` bytes, tolerating a server that answers and closes before reading them all.
fn post_oversized(port: u16, path: &str, size: usize) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {size}\r\n\r\n"
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&vec![b'{'; size]);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn webhooks_fed_random_bodies_and_headers_schedule_nothing() {
    let seed = Rng::seed_from_env("SENTRY_HOSTILE_SEED");
    eprintln!("webhook fuzz seed: {seed}");
    let mut rng = Rng::new(seed);
    let f = Fixture::new(
        &format!("webhooks:\n  github_secret: {GITHUB_SECRET}\n  gitlab_token: {GITLAB_TOKEN}\n"),
        0,
    );
    let text = std::fs::read_to_string(&f.config)
        .expect("config")
        .replace("polling_interval: 1s", "polling_interval: 1h");
    std::fs::write(&f.config, text).expect("config");
    let mut bg = f.watch();
    let port = bg.http_port();
    bg.wait_for_line("cycle:", Duration::from_secs(30));

    let events = [
        "push",
        "ping",
        "Push Hook",
        "issues",
        "",
        "push\u{7f}",
        "PUSH",
    ];
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for i in 0..400 {
        let body = random_body(&mut rng);
        let gitlab = rng.below(2) == 1;
        let event = events[rng.below(events.len() as u64) as usize].to_owned();
        let signature = match rng.below(4) {
            0 => sign(&body),
            1 => format!("sha256={}", random_text(&mut rng, 80)),
            2 => random_text(&mut rng, 200),
            _ => String::new(),
        };
        let token = match rng.below(3) {
            0 => GITLAB_TOKEN.to_owned(),
            1 => random_text(&mut rng, 64),
            _ => String::new(),
        };
        let content_type = random_text(&mut rng, 30);
        let mut headers: Vec<(&str, &str)> = vec![("content-type", &content_type)];
        let path = if gitlab {
            headers.push(("x-gitlab-event", &event));
            if !token.is_empty() {
                headers.push(("x-gitlab-token", &token));
            }
            "/webhooks/gitlab"
        } else {
            headers.push(("x-github-event", &event));
            if !signature.is_empty() {
                headers.push(("x-hub-signature-256", &signature));
            }
            "/webhooks/github"
        };
        let (status, answer) = http("POST", port, path, &headers, &body);
        *statuses.entry(status).or_default() += 1;
        let fine = (400..500).contains(&status)
            || (status == 202 && answer.contains("ignored"))
            || (status == 200 && answer.contains("pong"));
        assert!(
            fine,
            "request {i} (seed {seed}): {status} {answer}\nbody {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    // Over the size limit (unsigned: refused from its headers, before the body), and odd
    // methods and paths.
    let oversized = post_oversized(port, "/webhooks/github", 6 << 20);
    assert!(matches!(oversized, 401 | 413), "{oversized}");
    for (method, path) in [
        ("GET", "/webhooks/github"),
        ("PUT", "/webhooks/gitlab"),
        ("POST", "/webhooks/../webhooks/github"),
        ("POST", "/webhooks/bitbucket"),
    ] {
        let (status, _) = http(method, port, path, &[], b"{}");
        assert!((400..500).contains(&status), "{method} {path}: {status}");
    }
    eprintln!("webhook answers by status: {statuses:?}");

    std::thread::sleep(Duration::from_millis(500));
    let log = bg.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        !log.contains("webhook: checking"),
        "a webhook scheduled a check:\n{log}"
    );
    let cycles = log.lines().filter(|l| l.contains("cycle:")).count();
    assert_eq!(cycles, 1, "extra cycles ran:\n{log}");
    assert!(f.deploys().is_empty());
    assert!(bg.child.try_wait().expect("wait").is_none(), "sentry died");
    bg.signal(Signal::SIGTERM);
    assert_eq!(bg.wait_exit(Duration::from_secs(20)), Some(0));
}

// ---------------------------------------------------------------------------------------
// Branch names that try to inject shell syntax

const INJECTIONS: &[&str] = &[
    "inj/semi;touch${IFS}$CANARY",
    "inj/pipe|touch${IFS}$CANARY",
    "inj/and&&touch${IFS}$CANARY",
    "inj/subst$(touch${IFS}$CANARY)",
    "inj/tick`touch${IFS}$CANARY`",
    "inj/quote'$(touch${IFS}$CANARY)'",
    "inj/dquote\"$(touch${IFS}$CANARY)\"",
    "inj/redirect>$CANARY",
    "inj/ifs${IFS}touch${IFS}$CANARY",
    "inj/newline-free;$(touch$IFS$CANARY)|`touch$IFS$CANARY`&&touch$IFS$CANARY",
];

#[test]
fn branch_names_with_shell_syntax_reach_commands_only_as_data() {
    let f = Fixture::new("server: {enabled: false}\n", 0);
    let canary = f.root().join("canary");
    let text = std::fs::read_to_string(&f.config)
        .expect("config")
        .replace("branches: [main, \"release/*\"]", "branches: [main, \"inj/**\"]")
        .replace(
            "commands: [\"./deploy.sh\"]",
            "commands: [\"./deploy.sh\", \"echo $SENTRY_BRANCH $SENTRY_PREVIOUS_SHA > /dev/null\", \"cat \\\"$SENTRY_CHANGES_FILE\\\" > /dev/null\"]",
        )
        .replace(
            "env: {DEPLOY_LOG:",
            &format!("env: {{CANARY: \"{}\", DEPLOY_LOG:", canary.display()),
        );
    std::fs::write(&f.config, text).expect("config");
    assert_eq!(f.once().code, Some(0), "baseline");

    let mut names = Vec::new();
    for name in INJECTIONS {
        let ok = std::process::Command::new("git")
            .args(["check-ref-format", &format!("refs/heads/{name}")])
            .status()
            .expect("git")
            .success();
        if ok {
            crate::support::git(&f.watched, &["branch", name]);
            names.push(*name);
        } else {
            eprintln!("git refuses the branch name {name:?}; skipped");
        }
    }
    assert!(names.len() >= 8, "git accepted only {names:?}");

    // Poll path: each new branch is a change deployed once, with its name as data.
    let out = crate::support::run(
        sentry(f.root())
            .env("CANARY", &canary)
            .arg("-c")
            .arg(&f.config)
            .args(["watch", "--once"]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        !canary.exists(),
        "a branch name was run as a command (poll)"
    );
    let head = crate::support::git(&f.watched, &["rev-parse", "HEAD"]);
    let deploys = f.deploys();
    for name in &names {
        let line = format!("app {name} {head} none poll");
        assert!(deploys.contains(&line), "{line:?} not in {deploys:#?}");
    }
    assert_eq!(deploys.len(), names.len(), "{deploys:#?}");

    // Manual path.
    for name in &names {
        let out = crate::support::run(
            sentry(f.root())
                .env("CANARY", &canary)
                .arg("-c")
                .arg(&f.config)
                .args(["trigger", "--repo", "app", "--branch", name]),
        );
        assert_eq!(out.code, Some(0), "{name}: {out:?}");
        assert!(
            !canary.exists(),
            "a branch name was run as a command (trigger {name})"
        );
        assert!(
            f.deploys()
                .contains(&format!("app {name} {head} none manual")),
            "{name}: {:#?}",
            f.deploys()
        );
    }
    // Names git would not accept are refused before anything runs.
    for name in [
        "a b;touch $CANARY",
        "x..y$(touch $CANARY)",
        "-rf;touch$IFS$CANARY",
        "@{`touch $CANARY`}",
    ] {
        let out = crate::support::run(
            sentry(f.root())
                .env("CANARY", &canary)
                .arg("-c")
                .arg(&f.config)
                .args(["trigger", "--repo", "app", "--branch", name]),
        );
        assert!(matches!(out.code, Some(1 | 2)), "{name}: {out:?}");
        assert!(!canary.exists(), "{name} ran");
    }
    let _ = wait_until(Duration::from_millis(200), || None::<()>);
    assert!(!canary.exists());
}
