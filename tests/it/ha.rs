//! Replicated `watch` end to end: real `sentry watch` processes elect a leader on a Lease
//! and keep their state in a ConfigMap of the fake API server (`support::fake_kube`),
//! watching a local Git repository; the deploy command appends `start SHA POD` and
//! `end SHA POD` lines to one file. Short timings: lease 3 s, renew deadline 2 s, retry
//! 500 ms.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use std::collections::HashMap;

use crate::support::fake_kube::{FakeKube, Fault, Kubelet};
use crate::support::{
    Background, TempDir, commit, git, http, init_repo, lines_of, sentry, sentry_bin, tempdir,
    wait_until, write,
};

const LEASE: Duration = Duration::from_secs(3);
const RENEW_DEADLINE: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(500);
const LONG: Duration = Duration::from_secs(60);

/// The deploy command of a unit run as a Job: the pod has no `POD_NAME`, so the shell's
/// pid tells the runs apart; the sleep (seconds) is read from the file `DEPLOY_SLEEP`.
const JOB_DEPLOY_SH: &str = "#!/bin/sh\necho \"start $SENTRY_COMMIT_SHA $$\" >> \"$DEPLOY_LOG\"\nsleep \"$(cat \"$DEPLOY_SLEEP\")\"\necho \"end $SENTRY_COMMIT_SHA $$\" >> \"$DEPLOY_LOG\"\n";

const DEPLOY_SH: &str = "#!/bin/sh\necho \"start $SENTRY_COMMIT_SHA $POD_NAME\" >> \"$DEPLOY_LOG\"\nsleep \"$DEPLOY_SLEEP\"\necho \"end $SENTRY_COMMIT_SHA $POD_NAME\" >> \"$DEPLOY_LOG\"\n";

struct Cluster {
    dir: TempDir,
    watched: PathBuf,
    log: PathBuf,
    config: PathBuf,
    kube: FakeKube,
}

impl Cluster {
    /// A fake API server with one listener per name in `pods` (`tls_pods` over TLS), and
    /// a configuration whose deploy command sleeps `deploy_sleep` seconds.
    fn new(pods: &[&str], tls_pods: &[&str], deploy_sleep: &str) -> Cluster {
        Cluster::with_branches(pods, tls_pods, deploy_sleep, 0)
    }

    /// [`Cluster::new`] with `release_branches` more branches `release/N` watched through
    /// the pattern `release/*`, to make the state large.
    fn with_branches(
        pods: &[&str],
        tls_pods: &[&str],
        deploy_sleep: &str,
        release_branches: usize,
    ) -> Cluster {
        Cluster::build(pods, tls_pods, deploy_sleep, release_branches, false)
    }

    /// [`Cluster::new`] with group `g` on the kubernetes executor: each unit is a Job of
    /// the fake, whose kubelet runs the real `sentry exec-unit` (with its own work
    /// directory, so that a starting replica's sweep of leftover checkouts cannot touch a
    /// running pod's). The Jobs outlive a killed replica, as in a cluster.
    fn with_jobs(pods: &[&str], deploy_sleep: &str) -> Cluster {
        Cluster::build(pods, &[], deploy_sleep, 0, true)
    }

    fn build(
        pods: &[&str],
        tls_pods: &[&str],
        deploy_sleep: &str,
        release_branches: usize,
        jobs: bool,
    ) -> Cluster {
        let dir = tempdir();
        let root = dir.path().to_owned();
        let watched = init_repo(&root.join("app"));
        if release_branches > 0 {
            let head = git(&watched, &["rev-parse", "HEAD"]);
            let refs: String = (0..release_branches)
                .map(|i| format!("create refs/heads/release/{i} {head}\n"))
                .collect();
            let script = write(&root, "refs.txt", &refs);
            let out = std::process::Command::new("git")
                .current_dir(&watched)
                .args(["update-ref", "--stdin"])
                .stdin(std::fs::File::open(script).expect("refs"))
                .output()
                .expect("git update-ref");
            assert!(out.status.success(), "{out:?}");
        }
        let (script, deploy_sleep) = if jobs {
            // The sleep is read from a file at the unit's start, so that a test sets it
            // per move ([`Cluster::set_sleep`]).
            let file = write(&root, "sleep", deploy_sleep);
            (JOB_DEPLOY_SH, file.display().to_string())
        } else {
            (DEPLOY_SH, deploy_sleep.to_owned())
        };
        let qa = crate::support::qa_repo(&root.join("qa"), script);
        let log = root.join("deploys.log");
        let executor = if jobs {
            "    executor: {kind: kubernetes, namespace: sentry-jobs, image: registry.example.com/qa/sentry:0.1.0}\n"
        } else {
            ""
        };
        let yaml = |work: &str| {
            format!(
                "polling_interval: 1s\nwork_dir: {root}/{work}\nshutdown_grace: 2s\nwebhooks: {{gitlab_token: ha-test-token}}\n\
             audit_log: {root}/audit.jsonl\n\
             leader_election: {{enabled: true, lease_name: sentry-leader, lease_duration: 3s, renew_deadline: 2s, retry_period: 500ms}}\n\
             state: {{backend: kubernetes, configmap: sentry-state}}\n\
             groups:\n  g:\n    execution_strategy: sequential\n{executor}\
             repositories:\n  - name: app\n    group: g\n    monitor:\n      repo_url: file://{watched}\n      branches: [main, \"release/*\"]\n      repo_type: git\n\
             \x20   deploy:\n      qa_repo_url: file://{qa}\n      qa_repo_branch: main\n      commands: [\"./deploy.sh\"]\n      env: {{DEPLOY_LOG: \"{log}\", DEPLOY_SLEEP: \"{deploy_sleep}\"}}\n",
                root = root.display(),
                watched = watched.display(),
                qa = qa.display(),
                log = log.display(),
            )
        };
        let config = write(&root, "sentry.yaml", &yaml("work"));
        let kube = FakeKube::start_with_tls(&root, pods, tls_pods);
        if jobs {
            kube.set_kubelet(Kubelet {
                binary: PathBuf::from(sentry_bin()),
                config: write(
                    &root,
                    "pod.yaml",
                    &yaml("pod-work")
                        .replace(&format!("audit_log: {}/audit.jsonl\n", root.display()), ""),
                ),
                secrets: HashMap::new(),
                start_after: Some(Duration::ZERO),
                never_reason: "ErrImagePull".to_owned(),
            });
        }
        Cluster {
            dir,
            watched,
            log,
            config,
            kube,
        }
    }

    /// With [`Cluster::with_jobs`]: how long the next units' command sleeps.
    fn set_sleep(&self, seconds: &str) {
        write(self.dir.path(), "sleep", seconds);
    }

    /// The audit log's unit records for `sha`: one per outcome recorded.
    fn unit_records(&self, sha: &str) -> usize {
        lines_of(&self.dir.path().join("audit.jsonl"))
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["kind"] == "unit" && r["sha"] == sha)
            .count()
    }

    /// `sentry watch` as pod `pod`, talking to its own listener of the fake.
    fn replica(&self, pod: &str) -> Background {
        let mut cmd = sentry(self.dir.path());
        cmd.arg("-c")
            .arg(&self.config)
            .args(["watch", "--listen", "127.0.0.1:0"])
            .env("POD_NAME", pod)
            .env("KUBECONFIG", self.kube.kubeconfig(pod))
            .env_remove("KUBERNETES_SERVICE_HOST");
        Background::spawn(&mut cmd)
    }

    fn lines(&self) -> Vec<String> {
        lines_of(&self.log)
    }

    /// Waits until some replica holds the Lease; returns its name.
    fn leader(&self) -> String {
        wait_until(LONG, || self.kube.holder("sentry-leader")).expect("a leader within 60 s")
    }

    /// Waits until a replica other than `old` holds the Lease; returns its name.
    fn leader_other_than(&self, old: &str) -> String {
        wait_until(LONG, || {
            self.kube.holder("sentry-leader").filter(|h| h != old)
        })
        .expect("a new leader within 60 s")
    }

    /// Waits until the leader has recorded a baseline for `app` main.
    fn wait_baseline(&self) {
        wait_until(LONG, || {
            let state = self.kube.state("sentry-state")?;
            state["repositories"]["app"]["branches"]["main"]["sha"]
                .as_str()
                .map(|_| ())
        })
        .expect("baseline in the ConfigMap");
    }

    /// Waits until an `end SHA` line for every one of `shas` is in the log.
    fn wait_deployed(&self, shas: &[String]) {
        assert!(
            self.try_wait_deployed(shas),
            "not every SHA deployed; log:\n{}",
            self.lines().join("\n")
        );
    }

    fn try_wait_deployed(&self, shas: &[String]) -> bool {
        wait_until(LONG, || {
            let lines = self.lines();
            shas.iter()
                .all(|sha| lines.iter().any(|l| l.starts_with(&format!("end {sha}"))))
                .then_some(())
        })
        .is_some()
    }

    /// [`Cluster::try_wait_deployed`], and the leader's state agrees: the last SHA is the
    /// handled one and no unit is claimed. An `end` line alone may come from the orphaned
    /// command of a killed leader, before the new leader has re-run that unit.
    fn try_wait_settled(&self, shas: &[String]) -> bool {
        self.try_wait_deployed(shas)
            && wait_until(LONG, || {
                let state = self.kube.state("sentry-state")?;
                let app = &state["repositories"]["app"];
                let handled = app["branches"]["main"]["sha"].as_str()?;
                let claimed = app["claims"].as_object().is_some_and(|c| !c.is_empty());
                (shas.last().is_none_or(|last| last == handled) && !claimed).then_some(())
            })
            .is_some()
    }
}

/// (kind, sha, pod) per line.
fn parse(lines: &[String]) -> Vec<(String, String, String)> {
    lines
        .iter()
        .map(|l| {
            let mut words = l.split(' ').map(str::to_owned);
            let mut next = || words.next().unwrap_or_default();
            (next(), next(), next())
        })
        .collect()
}

/// Panics if two units of the same SHA ran at once: a second `start` of a SHA while an
/// earlier one has not written its `end` — unless that earlier one never ends (its
/// replica was killed, and with it the unit). Returns the starts per SHA.
fn assert_no_overlap(lines: &[String]) -> BTreeMap<String, usize> {
    let parsed = parse(lines);
    let mut starts = BTreeMap::new();
    for (i, (kind, sha, pod)) in parsed.iter().enumerate() {
        if kind != "start" {
            continue;
        }
        *starts.entry(sha.clone()).or_insert(0) += 1;
        let end = parsed[i + 1..]
            .iter()
            .position(|(k, s, p)| k == "end" && s == sha && p == pod);
        let later_start = parsed[i + 1..]
            .iter()
            .position(|(k, s, _)| k == "start" && s == sha);
        if let (Some(end), Some(start)) = (end, later_start) {
            assert!(
                end < start,
                "two units of {sha} ran at once (line {i}):\n{}",
                lines.join("\n")
            );
        }
    }
    starts
}

#[test]
fn two_replicas_exactly_one_deploys_and_the_standby_is_ready() {
    let c = Cluster::new(&["r1", "r2"], &[], "0");
    let r1 = c.replica("r1");
    let r2 = c.replica("r2");
    let leader = c.leader();
    c.wait_baseline();
    let (standby, led) = if leader == "r1" {
        (&r2, &r1)
    } else {
        (&r1, &r2)
    };
    let port = standby.http_port();
    let ready = wait_until(Duration::from_secs(10), || {
        (http("GET", port, "/readyz", &[], b"").0 == 200).then_some(())
    });
    assert!(
        ready.is_some(),
        "the standby is not ready:\n{}",
        standby.log()
    );
    assert_eq!(http("GET", port, "/healthz", &[], b"").0, 200);
    // A webhook reaching the standby is accepted (the leader's poll catches up).
    let push = format!(
        "{{\"ref\":\"refs/heads/main\",\"project\":{{\"git_http_url\":\"file://{}\"}}}}",
        c.watched.display()
    );
    let (code, body) = http(
        "POST",
        port,
        "/webhooks/gitlab",
        &[
            ("X-Gitlab-Token", "ha-test-token"),
            ("X-Gitlab-Event", "Push Hook"),
            ("Content-Type", "application/json"),
        ],
        push.as_bytes(),
    );
    assert_eq!(code, 202, "{body}");
    assert!(body.contains("checking"), "{body}");
    // The live view: the standby has none to show; the leader's names itself.
    let (code, body) = http("GET", port, "/api/v1/status", &[], b"");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("standby"), "{body}");
    let led_port = led.http_port();
    let status = wait_until(Duration::from_secs(10), || {
        let (code, body) = http("GET", led_port, "/api/v1/status", &[], b"");
        (code == 200).then_some(body)
    })
    .unwrap_or_else(|| panic!("the leader serves no live view:\n{}", led.log()));
    let view: serde_json::Value = serde_json::from_str(&status).expect("status json");
    assert_eq!(view["leader"], leader.as_str(), "{view}");

    let mut shas = Vec::new();
    for i in 0..3 {
        shas.push(commit(&c.watched, &format!("move {i}")));
        c.wait_deployed(&shas);
    }
    let parsed = parse(&c.lines());
    assert_eq!(parsed.len(), 6, "{:?}", c.lines());
    assert!(
        parsed.iter().all(|(_, _, pod)| *pod == leader),
        "a unit ran outside the leader {leader}:\n{}",
        c.lines().join("\n")
    );
    let starts = assert_no_overlap(&c.lines());
    assert!(starts.values().all(|&n| n == 1), "{starts:?}");
    assert!(
        !standby.log().contains("cycle:"),
        "the standby polled:\n{}",
        standby.log()
    );
    assert!(
        led.log()
            .contains("leading: acquired Lease qa/sentry-leader")
    );
    c.kube.assert_never_two_holders(Duration::from_millis(100));
}

/// Kills the leader with SIGKILL `kills` times, each time while a unit of a fresh move
/// is likely running, and returns the failover times: from the kill to the fake's
/// record of another replica's acquiring write. Checks the delivery promise over all.
fn kill_rounds(kills: usize) -> Vec<Duration> {
    let names: Vec<String> = (0..=kills + 1).map(|i| format!("r{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let c = Cluster::new(&refs, &[], "1");
    let mut replicas: BTreeMap<String, Background> = BTreeMap::new();
    for name in &names[..2] {
        replicas.insert(name.clone(), c.replica(name));
    }
    c.leader();
    c.wait_baseline();
    let mut shas = Vec::new();
    let mut failovers = Vec::new();
    let mut claimed_at_kill = Vec::new();
    for round in 0..kills {
        // Moves made faster than a poll coalesce (the newest SHA wins, with one replica
        // too): each round moves the branch once the previous move is deployed.
        if !c.try_wait_settled(&shas) {
            break;
        }
        let leader = c.leader();
        shas.push(commit(&c.watched, &format!("move {round}")));
        eprintln!("round {round}: leader {leader}, moved to {}", shas[round]);
        // Somewhere in the poll + deploy window: sometimes mid-unit, sometimes not.
        std::thread::sleep(Duration::from_millis(700 + 400 * (round as u64 % 4)));
        if let Some(state) = c.kube.state("sentry-state") {
            if let Some(claim) = state["repositories"]["app"]["claims"]["main"].as_object() {
                claimed_at_kill.push(claim["sha"].as_str().unwrap_or_default().to_owned());
            }
        }
        let writes_before = c.kube.lease_writes().len();
        let mut victim = replicas.remove(&leader).expect("the leader is ours");
        let killed = Instant::now();
        victim.signal(Signal::SIGKILL);
        victim.wait_exit(Duration::from_secs(5));
        let taken = wait_until(LONG, || {
            c.kube.lease_writes()[writes_before..]
                .iter()
                .find(|w| w.holder.as_deref().is_some_and(|h| h != leader))
                .map(|w| w.at)
        })
        .expect("a standby took over");
        failovers.push(taken.saturating_duration_since(killed));
        // The killed pod is replaced, as a Deployment would, under a new name.
        let fresh = names[round + 2].clone();
        replicas.insert(fresh.clone(), c.replica(&fresh));
    }
    if !c.try_wait_settled(&shas) {
        let logs: Vec<String> = replicas
            .iter()
            .map(|(name, r)| format!("--- {name}:\n{}", r.log()))
            .collect();
        let writes: Vec<String> = c
            .kube
            .lease_writes()
            .iter()
            .map(|w| format!("{:?} {} {:?}", w.at, w.client, w.holder))
            .collect();
        panic!(
            "not every SHA deployed ({shas:?}); log:\n{}\nlease writes:\n{}\n{}",
            c.lines().join("\n"),
            writes.join("\n"),
            logs.join("\n")
        );
    }
    let lines = c.lines();
    let starts = assert_no_overlap(&lines);
    for sha in &shas {
        let n = starts.get(sha).copied().unwrap_or(0);
        assert!(n >= 1, "{sha} never deployed:\n{}", lines.join("\n"));
        assert!(
            n == 1 || claimed_at_kill.contains(sha),
            "{sha} deployed {n} times without a kill hitting its unit:\n{}",
            lines.join("\n")
        );
    }
    c.kube.assert_never_two_holders(Duration::from_millis(100));
    let reruns = starts.values().filter(|&&n| n > 1).count();
    if std::env::var_os("SENTRY_HA_VERBOSE").is_some() {
        eprintln!(
            "deploy log:\n{}\nclaimed at kill: {claimed_at_kill:?}",
            lines.join("\n")
        );
    }
    eprintln!(
        "{} moves, {} kills hit a running unit (claimed), {reruns} SHAs ran twice",
        shas.len(),
        claimed_at_kill.len()
    );
    failovers
}

fn report(failovers: &mut [Duration]) -> (Duration, Duration) {
    failovers.sort();
    let p50 = failovers[failovers.len() / 2];
    let max = failovers[failovers.len() - 1];
    eprintln!(
        "failover over {} kills: p50 {p50:?}, max {max:?} (lease {LEASE:?}, retry {RETRY:?})",
        failovers.len()
    );
    (p50, max)
}

#[test]
fn killing_the_leader_hands_over_within_lease_plus_two_retries() {
    let mut failovers = kill_rounds(2);
    let (_, max) = report(&mut failovers);
    // The bound of the issue, plus scheduling slack for a shared CI machine.
    assert!(
        max <= LEASE + RETRY * 2 + Duration::from_millis(500),
        "{failovers:?}"
    );
}

/// The measurement behind docs/en/deployment.md: `make ha-failover`.
#[test]
#[ignore = "20 kills, about two minutes: make ha-failover"]
fn failover_over_twenty_kills() {
    let mut failovers = kill_rounds(20);
    let (_, max) = report(&mut failovers);
    assert!(
        max <= LEASE + RETRY * 2 + Duration::from_millis(500),
        "{failovers:?}"
    );
}

#[test]
fn a_leader_whose_api_calls_stall_stops_before_its_renew_deadline() {
    let c = Cluster::new(&["r1", "r2"], &[], "30");
    let mut r1 = c.replica("r1");
    c.leader();
    c.wait_baseline();
    let _r2 = c.replica("r2");
    let sha = commit(&c.watched, "move");
    wait_until(LONG, || {
        c.lines()
            .iter()
            .any(|l| l.starts_with(&format!("start {sha} r1")))
            .then_some(())
    })
    .expect("r1 started the unit");
    let stalled = Instant::now();
    c.kube.stall("r1");
    r1.wait_for_line("lost the leadership", LONG);
    let stopped = stalled.elapsed();
    assert!(
        stopped <= RENEW_DEADLINE + Duration::from_millis(300),
        "stopped {stopped:?} after the stall"
    );
    // Its unit was stopped with it: r2 re-runs the claimed SHA, and r1 never ends it.
    wait_until(LONG, || {
        c.lines()
            .iter()
            .any(|l| l.starts_with(&format!("start {sha} r2")))
            .then_some(())
    })
    .expect("r2 re-ran the interrupted unit");
    let lines = c.lines();
    assert!(
        !lines.contains(&format!("end {sha} r1")),
        "the deposed leader's unit ran on:\n{}",
        lines.join("\n")
    );
    assert_no_overlap(&lines);
    c.kube.assert_never_two_holders(Duration::from_millis(100));
    assert!(
        r1.log().contains("interrupted") || c.kube.holder("sentry-leader").as_deref() == Some("r2")
    );
    c.kube.heal("r1");
    let code = r1.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(2), "r1 exit\n{}", r1.log());
}

#[test]
fn sigterm_on_the_leader_hands_over_in_about_one_retry_period() {
    let c = Cluster::new(&["r1", "r2"], &[], "0");
    let mut r1 = c.replica("r1");
    c.leader();
    c.wait_baseline();
    let _r2 = c.replica("r2");
    wait_until(LONG, || {
        c.kube
            .lease_writes()
            .iter()
            .any(|w| w.client == "r1" && w.holder.as_deref() == Some("r1"))
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(1)); // r2 is standing by
    let writes_before = c.kube.lease_writes().len();
    let signalled = Instant::now();
    r1.signal(Signal::SIGTERM);
    let taken = wait_until(LONG, || {
        c.kube.lease_writes()[writes_before..]
            .iter()
            .find(|w| w.holder.as_deref() == Some("r2"))
            .map(|w| w.at)
    })
    .expect("r2 took over");
    let handover = taken.saturating_duration_since(signalled);
    eprintln!("SIGTERM handover: {handover:?}");
    assert!(
        handover <= RETRY * 2 + Duration::from_millis(500),
        "{handover:?}"
    );
    assert_eq!(
        r1.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        r1.log()
    );
    assert!(r1.log().contains("released Lease"), "{}", r1.log());
}

#[test]
fn leader_election_over_tls_with_the_kubeconfig_ca() {
    let c = Cluster::new(&[], &["tls"], "0");
    let r = c.replica("tls");
    assert_eq!(c.leader(), "tls", "{}", r.log());
    c.wait_baseline();
    let sha = commit(&c.watched, "move");
    c.wait_deployed(std::slice::from_ref(&sha));
    assert!(!r.log().contains("panicked"), "{}", r.log());
}

/// A leader frozen past its lease (SIGSTOP: a long GC pause, a frozen VM) wakes up deposed:
/// the new leader's first state write fenced it off, so whatever it tries first — renew
/// or start a unit — fails, and it starts nothing.
#[test]
fn a_leader_frozen_past_its_lease_wakes_up_fenced_and_starts_nothing() {
    let c = Cluster::new(&["r1", "r2"], &[], "0");
    let mut r1 = c.replica("r1");
    assert_eq!(c.leader(), "r1");
    c.wait_baseline();
    let _r2 = c.replica("r2");
    std::thread::sleep(Duration::from_secs(1));
    r1.signal(Signal::SIGSTOP);
    wait_until(LONG, || {
        (c.kube.holder("sentry-leader").as_deref() == Some("r2")).then_some(())
    })
    .expect("r2 took over");
    let sha = commit(&c.watched, "move while r1 is frozen");
    std::thread::sleep(Duration::from_millis(200));
    r1.signal(Signal::SIGCONT);
    c.wait_deployed(std::slice::from_ref(&sha));
    let code = r1.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(2), "r1 exit\n{}", r1.log());
    let lines = c.lines();
    assert!(
        parse(&lines).iter().all(|(_, _, pod)| pod == "r2"),
        "the deposed leader ran a unit:\n{}\n{}",
        lines.join("\n"),
        r1.log()
    );
    assert_no_overlap(&lines);
    c.kube.assert_never_two_holders(Duration::from_millis(100));
}

#[test]
fn watch_in_a_pod_with_an_empty_file_state_warns_loudly() {
    let f = crate::watch::Fixture::new("server: {enabled: false}\n", 0);
    let out = crate::support::run(
        sentry(f.root())
            .arg("-c")
            .arg(&f.config)
            .args(["watch", "--once"])
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("!!!"), "{}", out.stderr);
    assert!(out.stderr.contains("persistence.enabled"), "{}", out.stderr);
    // The second start finds the state: no warning.
    let again = crate::support::run(
        sentry(f.root())
            .arg("-c")
            .arg(&f.config)
            .args(["watch", "--once"])
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
    );
    assert!(!again.stderr.contains("!!!"), "{}", again.stderr);
}

#[test]
fn watch_once_refuses_the_kubernetes_state_of_the_elected_leader() {
    let c = Cluster::new(&["r1"], &[], "0");
    let out = crate::support::run(
        sentry(c.dir.path())
            .arg("-c")
            .arg(&c.config)
            .args(["watch", "--once"])
            .env("KUBECONFIG", c.kube.kubeconfig("r1")),
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr
            .contains("watch --once cannot use state.backend: kubernetes"),
        "{}",
        out.stderr
    );
    assert!(
        c.kube.state("sentry-state").is_none(),
        "--once wrote the ConfigMap"
    );
}

/// A state beyond one ConfigMap (12,000 branches) is sharded into parts; the next leader
/// reads it whole — no branch is taken as a new baseline — and writes the other slot.
#[test]
fn a_state_larger_than_one_configmap_is_sharded_and_survives_failover() {
    let c = Cluster::with_branches(&["r1", "r2"], &[], "0", 12_000);
    let mut r1 = c.replica("r1");
    assert_eq!(c.leader(), "r1");
    let head = wait_until(LONG, || {
        let head = c.kube.object("configmaps", "sentry-state")?;
        head["data"]["slot"].as_str().map(|_| head.clone())
    })
    .unwrap_or_else(|| panic!("no sharded state:\n{}", r1.log()));
    let parts: usize = head["data"]["parts"].as_str().unwrap().parse().unwrap();
    assert!(parts >= 2, "{head}");
    let slot = head["data"]["slot"].as_str().unwrap().to_owned();
    let r2 = c.replica("r2");
    std::thread::sleep(Duration::from_secs(1));
    r1.signal(Signal::SIGKILL);
    r1.wait_exit(Duration::from_secs(5));
    assert_eq!(c.leader_other_than("r1"), "r2");
    let sha = commit(&c.watched, "move main");
    c.wait_deployed(std::slice::from_ref(&sha));
    assert!(
        !r2.log().contains("baseline:"),
        "r2 re-baselined:\n{}",
        r2.log()
    );
    let moved = wait_until(LONG, || {
        let head = c.kube.object("configmaps", "sentry-state")?;
        (head["data"]["slot"].as_str()? != slot).then_some(())
    });
    assert!(moved.is_some(), "r2 did not write the other slot");
    let state = c.kube.state_sharded("sentry-state").expect("state");
    let branches = state["repositories"]["app"]["branches"]
        .as_object()
        .unwrap();
    assert_eq!(branches.len(), 12_001);
    assert_eq!(branches["main"]["sha"], sha.as_str());
}

/// Waits until the deploy log has a `start` line for `sha`: its Job's command runs.
fn wait_started(c: &Cluster, sha: &str) {
    wait_until(LONG, || {
        c.lines()
            .iter()
            .any(|l| l.starts_with(&format!("start {sha}")))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("{sha} never started; log:\n{}", c.lines().join("\n")));
}

/// SIGKILLs the leader `name` and waits until another replica leads; returns its name.
fn kill_leader(c: &Cluster, replicas: &mut BTreeMap<String, Background>, name: &str) -> String {
    let mut victim = replicas.remove(name).expect("the leader is ours");
    victim.signal(Signal::SIGKILL);
    victim.wait_exit(Duration::from_secs(5));
    c.leader_other_than(name)
}

/// Issue #19: a leader that stops gracefully (SIGTERM, as in a rolling update) leaves
/// its unit's running Job on the cluster instead of deleting it; the next leader adopts
/// it. One Job, one run of the command, one recorded outcome.
#[test]
fn a_leader_stopped_gracefully_leaves_its_running_job_to_the_next() {
    let c = Cluster::with_jobs(&["r1", "r2"], "6");
    let mut replicas = BTreeMap::new();
    replicas.insert("r1".to_owned(), c.replica("r1"));
    assert_eq!(c.leader(), "r1");
    c.wait_baseline();
    replicas.insert("r2".to_owned(), c.replica("r2"));

    let sha = commit(&c.watched, "move");
    wait_started(&c, &sha);
    let mut first = replicas.remove("r1").expect("the leader is ours");
    first.signal(Signal::SIGTERM);
    assert!(
        first.wait_exit(Duration::from_secs(30)).is_some(),
        "{}",
        first.log()
    );
    assert!(
        first.log().contains("keeps running for the next leader"),
        "{}",
        first.log()
    );
    assert_eq!(c.leader_other_than("r1"), "r2");
    assert!(
        c.try_wait_settled(std::slice::from_ref(&sha)),
        "not settled; log:\n{}",
        c.lines().join("\n")
    );
    let log = replicas["r2"].log();
    assert!(log.contains("adopting the running Job"), "{log}");
    assert_eq!(
        c.kube.jobs_created(),
        1,
        "the running Job was created twice"
    );
    let lines = c.lines();
    let starts = assert_no_overlap(&lines);
    assert_eq!(starts.get(&sha), Some(&1), "{}", lines.join("\n"));
    // The stopped leader audits its unit as cancelled; the next one audits the outcome.
    let results: Vec<String> = lines_of(&c.dir.path().join("audit.jsonl"))
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "unit" && r["sha"] == sha.as_str())
        .map(|r| r["result"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(results, ["cancelled", "succeeded"], "{}", lines.join("\n"));
}

/// Issue #19: two leaders in a row on the kubernetes executor, twice. A leader killed
/// while its unit's Job runs leaves the Job running; the next leader adopts it. A leader
/// killed after it saw the Job start but before it recorded the outcome leaves a finished
/// Job; the next leader takes its outcome. Each time one Job, one run of the command, one
/// recorded outcome.
#[test]
fn a_job_started_by_one_leader_is_adopted_by_the_next_and_runs_once() {
    let c = Cluster::with_jobs(&["r1", "r2", "r3"], "6");
    let mut replicas = BTreeMap::new();
    replicas.insert("r1".to_owned(), c.replica("r1"));
    assert_eq!(c.leader(), "r1");
    c.wait_baseline();
    replicas.insert("r2".to_owned(), c.replica("r2"));
    replicas.insert("r3".to_owned(), c.replica("r3"));

    // Leader r1 dies while the Job runs (6 s): the next leader adopts the running Job.
    let first = commit(&c.watched, "move 1");
    wait_started(&c, &first);
    let second_leader = kill_leader(&c, &mut replicas, "r1");
    assert!(
        c.try_wait_settled(std::slice::from_ref(&first)),
        "not settled; log:\n{}",
        c.lines().join("\n")
    );
    let log = replicas[&second_leader].log();
    assert!(log.contains("adopting the running Job"), "{log}");
    assert_eq!(
        c.kube.jobs_created(),
        1,
        "the running Job was created twice"
    );

    // The next leader dies right after its Job started (1 s): the Job ends before a third
    // leader takes over, which takes the Job's outcome instead of running it again.
    c.set_sleep("1");
    let second = commit(&c.watched, "move 2");
    wait_started(&c, &second);
    let third_leader = kill_leader(&c, &mut replicas, &second_leader);
    let shas = [first.clone(), second.clone()];
    assert!(
        c.try_wait_settled(&shas),
        "not settled; log:\n{}",
        c.lines().join("\n")
    );
    let log = replicas[&third_leader].log();
    assert!(log.contains("taking its outcome"), "{log}");
    assert_eq!(c.kube.jobs_created(), 2, "a finished Job was run again");

    let lines = c.lines();
    let starts = assert_no_overlap(&lines);
    for sha in &shas {
        assert_eq!(starts.get(sha), Some(&1), "{}", lines.join("\n"));
        let ends = lines
            .iter()
            .filter(|l| l.starts_with(&format!("end {sha}")))
            .count();
        assert_eq!(ends, 1, "{}", lines.join("\n"));
        assert_eq!(
            c.unit_records(sha),
            1,
            "the outcome of {sha} was recorded {} times",
            c.unit_records(sha)
        );
    }
    c.kube.assert_never_two_holders(Duration::from_millis(100));
}

/// Issue #19: `kills` moves on the kubernetes executor, each with the leader SIGKILLed
/// while the move's Job runs — alternately a long Job (the next leader adopts it running)
/// and a short one (it has ended when the next leader looks; the outcome is taken from
/// it, or was recorded before the kill). Every moved SHA's command runs exactly once and
/// no Job is created twice. Returns how many kills left a running and a finished Job.
fn job_kill_rounds(kills: usize) -> (usize, usize) {
    let names: Vec<String> = (0..=kills + 1).map(|i| format!("r{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let c = Cluster::with_jobs(&refs, "5");
    let mut replicas: BTreeMap<String, Background> = BTreeMap::new();
    for name in &names[..2] {
        replicas.insert(name.clone(), c.replica(name));
    }
    c.leader();
    c.wait_baseline();
    let mut shas: Vec<String> = Vec::new();
    let (mut running, mut ended) = (0, 0);
    let logs = |replicas: &BTreeMap<String, Background>| {
        replicas
            .iter()
            .map(|(name, r)| format!("--- {name}:\n{}", r.log()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for round in 0..kills {
        assert!(
            c.try_wait_settled(&shas),
            "round {round}: not settled ({shas:?}); log:\n{}\n{}",
            c.lines().join("\n"),
            logs(&replicas)
        );
        let leader = c.leader();
        let long = round % 2 == 0;
        c.set_sleep(if long { "5" } else { "1" });
        let sha = commit(&c.watched, &format!("move {round}"));
        shas.push(sha.clone());
        wait_started(&c, &sha);
        // Somewhere in the Job's run: early, middle or (short Jobs) about its end.
        std::thread::sleep(Duration::from_millis(150 * (round as u64 % 7)));
        let next = kill_leader(&c, &mut replicas, &leader);
        eprintln!(
            "round {round}: killed {leader} during {sha} ({}), {next} leads",
            if long { "5 s" } else { "1 s" }
        );
        let fresh = names[round + 2].clone();
        replicas.insert(fresh.clone(), c.replica(&fresh));
        // Which case the kill made, from the new leader's own words (each replica
        // leads once: it is killed after).
        if c.try_wait_settled(&shas) && replicas[&next].log().contains("adopting the running Job") {
            running += 1;
        } else {
            ended += 1;
        }
    }
    assert!(
        c.try_wait_settled(&shas),
        "not settled ({shas:?}); log:\n{}\n{}",
        c.lines().join("\n"),
        logs(&replicas)
    );
    let lines = c.lines();
    let starts = assert_no_overlap(&lines);
    for sha in &shas {
        assert_eq!(
            starts.get(sha),
            Some(&1),
            "{sha} did not run exactly once:\n{}",
            lines.join("\n")
        );
        let ends = lines
            .iter()
            .filter(|l| l.starts_with(&format!("end {sha}")))
            .count();
        assert_eq!(ends, 1, "{sha}:\n{}", lines.join("\n"));
        assert!(c.unit_records(sha) >= 1, "no outcome recorded for {sha}");
    }
    assert_eq!(
        c.kube.jobs_created(),
        shas.len(),
        "a Job was created twice:\n{}",
        lines.join("\n")
    );
    c.kube.assert_never_two_holders(Duration::from_millis(100));
    eprintln!(
        "{} moves, {kills} leader kills during their Jobs: {running} adopted running, {ended} ended before the next leader looked; every command ran once, {} Jobs created",
        shas.len(),
        c.kube.jobs_created()
    );
    (running, ended)
}

/// In the normal suite: about 110 s on a 2-core machine shared with other builds (under the
/// three minutes that would move it behind `#[ignore]`); alone with its counts:
/// `make ha-jobs`.
#[test]
fn every_moved_sha_runs_once_over_twenty_leader_kills_during_jobs() {
    let (running, ended) = job_kill_rounds(20);
    assert!(
        running > 0 && ended > 0,
        "both cases: {running} running, {ended} ended"
    );
}

/// Issue #19: a leader that saw its Job succeed but died before the outcome reached the
/// state (its state writes stalled, then SIGKILL) must not have deleted the Job: the next
/// leader finds it and takes its outcome — one Job, one run — instead of running the change
/// again.
#[test]
fn a_leader_killed_between_a_jobs_end_and_recording_it_leaves_the_job_to_the_next() {
    let c = Cluster::with_jobs(&["r1", "r2"], "1");
    let mut replicas = BTreeMap::new();
    replicas.insert("r1".to_owned(), c.replica("r1"));
    assert_eq!(c.leader(), "r1");
    c.wait_baseline();
    replicas.insert("r2".to_owned(), c.replica("r2"));
    let sha = commit(&c.watched, "move");
    wait_started(&c, &sha);
    // The claim is stored; from now on r1 cannot store anything, but keeps leading.
    c.kube.set_fault("r1", Fault::StallStateWrites);
    let finished = wait_until(LONG, || {
        c.kube
            .jobs()
            .iter()
            .any(|j| j["status"]["conditions"][0]["type"] == "Complete")
            .then_some(())
    });
    assert!(finished.is_some(), "the Job did not complete");
    // r1 reads the Job every 500 ms: it has seen the end and ended the unit.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.kube.holder("sentry-leader").as_deref(), Some("r1"));
    let next = kill_leader(&c, &mut replicas, "r1");
    assert!(
        c.try_wait_settled(std::slice::from_ref(&sha)),
        "not settled; log:\n{}",
        c.lines().join("\n")
    );
    let log = replicas[&next].log();
    assert!(log.contains("taking its outcome"), "{log}");
    assert_eq!(
        c.kube.jobs_created(),
        1,
        "the change ran again in a second Job"
    );
    let starts = assert_no_overlap(&c.lines());
    assert_eq!(starts.get(&sha), Some(&1), "{:?}", c.lines());
}
