//! The kubernetes executor through the real binary: `sentry trigger` creates Jobs on the
//! fake API server, whose fake kubelet runs the real `sentry exec-unit` as the container.
//! Success, a failing command, the deadline, a pod that never starts, a log asked for
//! before the container runs, cancellation by shutdown, and a restart that adopts the
//! running Job instead of creating a second one; plus the dry-run manifest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::fake_kube::{FakeKube, Kubelet};
use crate::support::{
    Background, Run, TempDir, init_repo, run, sentry, sentry_bin, tempdir, wait_until, write,
};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const SECRET: &str = "qa-s3cret-from-a-kubernetes-secret";

struct Setup {
    dir: TempDir,
    config: PathBuf,
    kube: FakeKube,
}

fn q(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A config whose group `g` runs on the kubernetes executor (namespace `sentry-jobs`),
/// with repository `a` running `commands`; `executor_extra` adds executor keys.
fn setup(commands: &[&str], executor_extra: &str, start_after: Option<Duration>) -> Setup {
    let dir = tempdir();
    let root = dir.path();
    let qa = init_repo(&root.join("qa"));
    let watched = init_repo(&root.join("wa"));
    let mut y = format!(
        "work_dir: {}\nstate_file: {}\nshutdown_grace: 1s\nserver:\n  enabled: false\n\
         groups:\n  g:\n    executor:\n      kind: kubernetes\n      namespace: sentry-jobs\n      \
         image: registry.example.com/qa/sentry:0.1.0\n      env_from_secrets: [qa-credentials]\n{executor_extra}\
         repositories:\n  - name: a\n    group: g\n    monitor:\n      repo_url: {}\n      branches: [main]\n      \
         repo_type: git\n    deploy:\n      qa_repo_url: {}\n      qa_repo_branch: main\n      secret_env: [QA_TOKEN]\n      env:\n        QA_TOKEN: \"${{QA_TOKEN:-}}\"\n      commands:\n",
        q(&root.join("work").to_string_lossy()),
        q(&root.join("state.json").to_string_lossy()),
        q(&format!("file://{}", watched.display())),
        q(&format!("file://{}", qa.display())),
    );
    for c in commands {
        y.push_str(&format!("        - {}\n", q(c)));
    }
    let config = write(root, "sentry.yaml", &y);
    let kube = FakeKube::start(root, &["sentry"]);
    kube.set_kubelet(Kubelet {
        binary: PathBuf::from(sentry_bin()),
        config: config.clone(),
        secrets: HashMap::from([(
            "qa-credentials".to_owned(),
            vec![("QA_TOKEN".to_owned(), SECRET.to_owned())],
        )]),
        start_after,
        never_reason: "ErrImagePull".to_owned(),
    });
    Setup { dir, config, kube }
}

impl Setup {
    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = sentry(self.root());
        cmd.env("KUBECONFIG", self.kube.kubeconfig("sentry"))
            .env_remove("QA_TOKEN")
            .arg("-c")
            .arg(&self.config)
            .arg("trigger")
            .args(["--repo", "a", "--sha", SHA, "--no-report"])
            .args(args);
        cmd
    }

    fn trigger(&self) -> Run {
        run(&mut self.command(&[]))
    }
}

fn summary_row(out: &Run) -> String {
    out.stdout
        .lines()
        .find(|l| l.contains("a@main ("))
        .unwrap_or_else(|| panic!("no summary row: {out:?}"))
        .to_owned()
}

#[test]
fn a_unit_runs_as_a_job_streams_its_masked_log_and_the_job_is_deleted() {
    let s = setup(
        &["echo hello-from-the-pod", "echo token=$QA_TOKEN"],
        "",
        Some(Duration::from_millis(800)),
    );
    let out = s.trigger();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("[a@main] hello-from-the-pod"),
        "{out:?}"
    );
    assert!(out.all().contains("token=***"), "{out:?}");
    assert!(
        !out.all().contains(SECRET),
        "the Secret's value leaked: {out:?}"
    );
    assert_eq!(s.kube.jobs_created(), 1);
    assert!(
        s.kube.logs_refused() >= 1,
        "the log was asked for before the container started and retried"
    );
    assert!(s.kube.jobs().is_empty(), "a succeeded Job is deleted");
}

#[test]
fn a_failing_command_fails_the_unit_and_keeps_the_job() {
    let s = setup(&["echo failing; exit 7"], "", Some(Duration::ZERO));
    let out = s.trigger();
    assert_eq!(out.code, Some(1), "{out:?}");
    let row = summary_row(&out);
    assert!(row.contains("failed"), "{row}");
    assert!(out.stdout.contains("[a@main] failing"), "{out:?}");
    assert_eq!(
        s.kube.jobs().len(),
        1,
        "a failed Job is kept for inspection"
    );
    // A second run of the same unit is not blocked by the kept Job.
    let again = s.trigger();
    assert_eq!(again.code, Some(1), "{again:?}");
    assert_eq!(s.kube.jobs_created(), 2);
}

#[test]
fn the_deadline_times_the_unit_out() {
    let s = setup(
        &["sleep 30"],
        "      start_timeout: 1s\n",
        Some(Duration::ZERO),
    );
    let mut cmd = s.command(&[]);
    // One second per command, so the Job's activeDeadlineSeconds is 2.
    let text = std::fs::read_to_string(&s.config).expect("config");
    write(
        s.root(),
        "sentry.yaml",
        &text.replace("      commands:\n", "      timeout: 1s\n      commands:\n"),
    );
    let out = run(&mut cmd);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(summary_row(&out).contains("timed_out"), "{out:?}");
}

#[test]
fn a_pod_that_never_starts_fails_the_unit_as_setup_failed_with_the_reason() {
    let s = setup(&["true"], "      start_timeout: 2s\n", None);
    let out = s.trigger();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(summary_row(&out).contains("setup_failed"), "{out:?}");
    assert!(
        out.all().contains("ErrImagePull"),
        "the reason is shown: {out:?}"
    );
    assert!(s.kube.jobs().is_empty(), "the stuck Job is deleted");
}

#[test]
fn shutdown_deletes_the_running_job() {
    let s = setup(&["echo started; sleep 60"], "", Some(Duration::ZERO));
    let mut bg = Background::spawn(&mut s.command(&[]));
    wait_until(Duration::from_secs(30), || {
        (s.kube.jobs().len() == 1).then_some(())
    })
    .expect("the Job was created");
    std::thread::sleep(Duration::from_millis(1500));
    bg.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        bg.wait_exit(Duration::from_secs(30)).is_some(),
        "{}",
        bg.log()
    );
    assert!(s.kube.jobs().is_empty(), "the Job is deleted on shutdown");
}

#[test]
fn a_restarted_sentry_adopts_the_running_job() {
    let s = setup(&["sleep 3; echo finished-once"], "", Some(Duration::ZERO));
    let mut first = Background::spawn(&mut s.command(&[]));
    wait_until(Duration::from_secs(30), || {
        (s.kube.jobs().len() == 1).then_some(())
    })
    .expect("the Job was created");
    first.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = first.wait_exit(Duration::from_secs(10));
    let out = s.trigger();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.all().contains("adopting the running Job"), "{out:?}");
    assert_eq!(
        s.kube.jobs_created(),
        1,
        "the Job was adopted, not duplicated"
    );
    assert_eq!(out.stdout.matches("] finished-once").count(), 1, "{out:?}");
}

/// Issue #19: the pod template keys reach the Job, a `secretKeyRef` variable reaches the
/// command, and no secret value — neither one Sentry holds nor one only the cluster
/// holds — is in the Job sent to the API server or in the dry-run manifest.
#[test]
fn secrets_reach_the_pod_by_reference_and_never_appear_in_the_job() {
    const POD_SECRET: &str = "pod-only-s3cret-from-a-secret-key";
    let s = setup(
        &[
            "test \"$QA_TOKEN\" = pod-only-s3cret-from-a-secret-key && echo via-secret-key-ref",
            "echo token=$QA_TOKEN",
        ],
        "      env_secret_keys: {QA_TOKEN: {secret: qa-keys, key: token}}\n      \
         tolerations: [{key: dedicated, value: qa, effect: NoSchedule}]\n      \
         volumes: [{name: ssh, mount_path: /var/run/qa/ssh, secret: qa-ssh}, {name: fixtures, mount_path: /srv/fixtures, config_map: qa-fixtures}]\n",
        Some(Duration::ZERO),
    );
    s.kube.set_kubelet(Kubelet {
        binary: PathBuf::from(sentry_bin()),
        config: s.config.clone(),
        secrets: HashMap::from([
            (
                "qa-credentials".to_owned(),
                vec![("QA_TOKEN".to_owned(), SECRET.to_owned())],
            ),
            (
                "qa-keys".to_owned(),
                vec![("token".to_owned(), POD_SECRET.to_owned())],
            ),
        ]),
        start_after: Some(Duration::ZERO),
        never_reason: "ErrImagePull".to_owned(),
    });
    // Sentry itself holds a value of the variable too (its deploy.env reads QA_TOKEN).
    let run_with_secret = |args: &[&str]| {
        let mut cmd = s.command(args);
        cmd.env("QA_TOKEN", SECRET);
        run(&mut cmd)
    };
    let dry = run_with_secret(&["--dry-run"]);
    assert_eq!(dry.code, Some(0), "{dry:?}");
    let manifest = job_manifest(&dry.stdout);
    let job: serde_json::Value = serde_json::from_str(&manifest).expect("manifest is JSON");
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["tolerations"][0]["key"], "dedicated", "{manifest}");
    assert_eq!(pod["volumes"][1]["secret"]["secretName"], "qa-ssh");
    assert_eq!(pod["volumes"][2]["configMap"]["name"], "qa-fixtures");
    let out = run_with_secret(&[]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("] via-secret-key-ref"), "{out:?}");
    assert!(out.all().contains("token=***"), "{out:?}");
    let created = s.kube.created();
    assert_eq!(created.len(), 1);
    let sent = created[0].to_string();
    assert!(
        sent.contains("\"secretKeyRef\":{\"key\":\"token\",\"name\":\"qa-keys\""),
        "{sent}"
    );
    for secret in [SECRET, POD_SECRET] {
        assert!(
            !manifest.contains(secret),
            "{secret} in the manifest:\n{manifest}"
        );
        assert!(!sent.contains(secret), "{secret} in the Job sent:\n{sent}");
        assert!(
            !out.all().contains(secret),
            "{secret} in the output: {out:?}"
        );
    }
}

#[test]
fn dry_run_prints_the_job_manifest() {
    let s = setup(&["make test"], "", Some(Duration::ZERO));
    let out = run(&mut s.command(&["--dry-run"]));
    assert_eq!(out.code, Some(0), "{out:?}");
    let manifest = job_manifest(&out.stdout);
    let job: serde_json::Value = serde_json::from_str(&manifest).expect("manifest is JSON");
    assert_eq!(job["kind"], "Job");
    assert_eq!(job["spec"]["backoffLimit"], 0);
    assert_eq!(s.kube.jobs_created(), 0, "a dry run creates nothing");
}

/// The manifest block of a dry run's output.
pub fn job_manifest(plan: &str) -> String {
    let mut lines = plan
        .lines()
        .skip_while(|l| !l.contains("kubernetes Job (namespace"));
    lines.next();
    lines
        .take_while(|l| l.starts_with("       "))
        .map(|l| &l[7..])
        .collect::<Vec<_>>()
        .join("\n")
}
