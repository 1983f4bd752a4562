//! Crashes and signals: `kill -9` of `sentry watch` and of the process groups of its
//! commands at chosen and random points, over many restarts; SIGTERM during a long command
//! that ignores SIGTERM; a state write that fails (disk full through `RLIMIT_FSIZE`, and a
//! state directory that refuses new files through the immutable attribute).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::support::{
    Background, MarkerGuard, commit, git, kill_all_with_env, pids_with_env, rlimit, run, sentry,
    wait_until,
};
use crate::watch::Fixture;

/// A small deterministic generator (xorshift64*), so a failing run can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn seed_from_env(var: &str) -> u64 {
        std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn checkouts(work_dir: &Path) -> Vec<String> {
    std::fs::read_dir(work_dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("sentry-checkout-"))
                .collect()
        })
        .unwrap_or_default()
}

fn state_parses(path: &Path) -> Result<Option<serde_json::Value>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            format!(
                "state file does not parse: {e}: {}",
                String::from_utf8_lossy(&bytes)
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read state: {e}")),
    }
}

fn spawn_watch(f: &Fixture, marker: &str) -> Background {
    let (name, value) = marker.split_once('=').expect("marker");
    let mut cmd = sentry(f.root());
    cmd.env(name, value)
        .arg("-c")
        .arg(&f.config)
        .arg("watch")
        .process_group(0);
    Background::spawn(&mut cmd)
}

/// A node failure: SIGKILL to Sentry's process group and to every process of its commands.
fn node_failure(bg: &mut Background, marker: &str) {
    let pid = Pid::from_raw(bg.child.id() as i32);
    let _ = killpg(pid, Signal::SIGKILL);
    kill_all_with_env(marker);
    let _ = bg.child.wait();
}

#[derive(Debug, Default)]
struct KillPoints {
    idle_or_cycle: usize,
    during_command: usize,
    after_state_write: usize,
    checkout_present: usize,
}

#[test]
fn kill_9_at_random_points_over_restarts_loses_no_move() {
    let seed = Rng::seed_from_env("SENTRY_CRASH_SEED");
    eprintln!("kill -9 test seed: {seed} (SENTRY_CRASH_SEED={seed} replays it)");
    let mut rng = Rng::new(seed);
    let f = Fixture::new("server: {enabled: false}\n", 0);
    let text = std::fs::read_to_string(&f.config)
        .expect("config")
        .replace("DEPLOY_SLEEP: \"0\"", "DEPLOY_SLEEP: \"0.3\"");
    std::fs::write(&f.config, text).expect("config");
    let marker = format!("SENTRY_CRASH_MARKER=crash-{seed}");
    let _guard = MarkerGuard(marker.clone());
    let state_file = f.root().join("state/state.json");
    let work_dir = f.root().join("work");

    let baseline = f.once();
    assert_eq!(baseline.code, Some(0), "{baseline:?}");

    const ITERATIONS: usize = 24;
    let mut expected: Vec<(String, String)> = Vec::new();
    let mut main_sha = String::new();
    let mut points = KillPoints::default();
    let mut max_checkouts = 0;
    for i in 0..ITERATIONS {
        // A move of main and a new branch under the pattern, both at a new commit.
        main_sha = commit(&f.watched, &format!("move {i}"));
        git(&f.watched, &["branch", &format!("release/{i}")]);
        expected.push((format!("release/{i}"), main_sha.clone()));

        let mut bg = spawn_watch(&f, &marker);
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let started_mtime = mtime(&state_file);
        match i % 4 {
            // While a command runs.
            0 => {
                let _ = wait_until(Duration::from_secs(10), || {
                    (pids_with_env(&marker).len() > 1).then_some(())
                });
                std::thread::sleep(Duration::from_millis(rng.below(250)));
            }
            // Right after a state write (the rename just happened, or is happening).
            1 => {
                let _ = wait_until(Duration::from_secs(10), || {
                    (mtime(&state_file) != started_mtime).then_some(())
                });
            }
            // Anywhere: during the cycle, the clone, a command or a write.
            _ => std::thread::sleep(Duration::from_millis(rng.below(2500))),
        }
        let running = pids_with_env(&marker).len();
        let now_checkouts = checkouts(&work_dir).len();
        if i % 4 == 1 {
            points.after_state_write += 1;
        } else if running > 1 {
            points.during_command += 1;
        } else if now_checkouts > 0 {
            points.checkout_present += 1;
        } else {
            points.idle_or_cycle += 1;
        }
        node_failure(&mut bg, &marker);
        assert!(
            !bg.log().contains("panicked"),
            "iteration {i}: panic:\n{}",
            bg.log()
        );
        if let Err(e) = state_parses(&state_file) {
            panic!("iteration {i} (seed {seed}): {e}");
        }
        let left = checkouts(&work_dir).len();
        max_checkouts = max_checkouts.max(left);
        assert!(
            left <= 2,
            "iteration {i}: checkouts accumulate in work_dir: {:?}",
            checkouts(&work_dir)
        );
        assert!(
            pids_with_env(&marker).is_empty(),
            "processes survived the kill"
        );
    }
    eprintln!("kill points: {points:?}; at most {max_checkouts} checkout(s) left by a kill");

    // A last start without a crash deploys everything that is still pending.
    let mut bg = spawn_watch(&f, &marker);
    // Up and handling signals (everything may have been deployed before this start).
    bg.wait_for_line("cycle:", Duration::from_secs(60));
    let all_done = wait_until(Duration::from_secs(180), || {
        let state = state_parses(&state_file).ok().flatten()?;
        let branches = &state["repositories"]["app"]["branches"];
        let done = branches["main"]["sha"] == main_sha.as_str()
            && expected
                .iter()
                .all(|(b, sha)| branches[b]["sha"] == sha.as_str());
        done.then_some(())
    });
    assert!(
        all_done.is_some(),
        "not every move was deployed (seed {seed}): state {:?}\ndeploys {:#?}\n{}",
        state_parses(&state_file),
        f.deploys(),
        bg.log()
    );
    bg.signal(Signal::SIGTERM);
    assert_eq!(
        bg.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        bg.log()
    );

    let deploys = f.deploys();
    for (branch, sha) in &expected {
        let line = format!("app {branch} {sha} ");
        assert!(
            deploys.iter().any(|d| d.starts_with(&line)),
            "{branch} at {sha} was never deployed (seed {seed}): {deploys:#?}"
        );
    }
    assert!(
        deploys
            .iter()
            .any(|d| d.starts_with(&format!("app main {main_sha} "))),
        "the last move of main was never deployed: {deploys:#?}"
    );
    assert!(
        checkouts(&work_dir).is_empty(),
        "checkouts left after a clean stop: {:?}",
        checkouts(&work_dir)
    );
    let stray: Vec<String> = std::fs::read_dir(f.root().join("state"))
        .expect("state dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(
        stray.is_empty(),
        "temporary state files accumulate after crashes: {stray:?}"
    );
    assert!(pids_with_env(&marker).is_empty());
}

#[test]
fn sigterm_during_a_long_command_stops_its_whole_group_within_grace() {
    let f = Fixture::new("server: {enabled: false}\n", 0);
    let pgid_file = f.root().join("pgid");
    let child_file = f.root().join("child");
    // The command and its child ignore SIGTERM: only the SIGKILL after the grace stops them.
    let command = format!(
        "trap '' TERM; echo $$ > {}; sleep 300 & echo $! > {}; wait; wait",
        pgid_file.display(),
        child_file.display()
    );
    let text = std::fs::read_to_string(&f.config).expect("config").replace(
        "commands: [\"./deploy.sh\"]",
        &format!("commands: ['{}']", command.replace('\'', "''")),
    );
    std::fs::write(&f.config, text).expect("config");
    let marker = "SENTRY_CRASH_MARKER=sigterm-long-command".to_owned();
    let _guard = MarkerGuard(marker.clone());

    assert_eq!(f.once().code, Some(0));
    let old = git(&f.watched, &["rev-parse", "HEAD"]);
    commit(&f.watched, "long");
    let mut bg = spawn_watch(&f, &marker);
    let started = wait_until(Duration::from_secs(30), || {
        let pgid = std::fs::read_to_string(&pgid_file).ok()?;
        let child = std::fs::read_to_string(&child_file).ok()?;
        Some((
            pgid.trim().parse::<i32>().ok()?,
            child.trim().parse::<i32>().ok()?,
        ))
    });
    let (pgid, child) =
        started.unwrap_or_else(|| panic!("the command never started:\n{}", bg.log()));
    assert_ne!(
        pgid,
        bg.child.id() as i32,
        "the command runs in Sentry's group"
    );
    std::thread::sleep(Duration::from_millis(300));

    let sent = Instant::now();
    bg.signal(Signal::SIGTERM);
    let code = bg.wait_exit(Duration::from_secs(60));
    let took = sent.elapsed();
    assert!(code.is_some(), "sentry did not exit:\n{}", bg.log());
    // shutdown_grace is 2 s in the fixture.
    assert!(
        took <= Duration::from_secs(2 + 5),
        "exit took {took:?} (grace 2 s):\n{}",
        bg.log()
    );
    let alive =
        |pid: i32| kill(Pid::from_raw(pid), None).is_ok() && !crate::support::is_zombie(pid);
    assert!(!alive(pgid), "the command's shell survived");
    assert!(!alive(child), "the command's child survived");
    let group = killpg(Pid::from_raw(pgid), None);
    let group_gone = group == Err(Errno::ESRCH) || pids_with_env(&marker).is_empty();
    assert!(group_gone, "the process group survives: {group:?}");
    assert!(
        pids_with_env(&marker).is_empty(),
        "a process of the command survives"
    );

    // State saved and parseable; the cancelled unit did not advance the branch.
    let state = f.state();
    assert_eq!(
        state["repositories"]["app"]["branches"]["main"]["sha"],
        old.as_str(),
        "a cancelled unit advanced the stored SHA: {state}"
    );
    assert!(
        checkouts(&f.root().join("work")).is_empty(),
        "checkout left behind after SIGTERM"
    );
}

/// Removes the immutable attribute again, whatever happens.
struct Mutable(std::path::PathBuf);

impl Drop for Mutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn state_write_failures_are_clear_errors_and_keep_the_previous_file() {
    // Disk full, simulated with RLIMIT_FSIZE (SIGXFSZ ignored, so writes fail with EFBIG):
    // the limit is the size of the current state file, so the new, larger one cannot be
    // written. The audit log lives outside the state directory.
    let f = Fixture::new("server: {enabled: false}\n", 0);
    let text = std::fs::read_to_string(&f.config)
        .expect("config")
        .replace("audit_log: ", "audit_log: /dev/null\n#");
    std::fs::write(&f.config, text).expect("config");
    assert_eq!(f.once().code, Some(0));
    let state_file = f.root().join("state/state.json");
    let previous = std::fs::read(&state_file).expect("state");
    let new = commit(&f.watched, "second");
    let mut cmd = sentry(f.root());
    cmd.arg("-c").arg(&f.config).args(["watch", "--once"]);
    rlimit::apply(&mut cmd, &[(rlimit::FSIZE, previous.len() as u64)]);
    let out = run(&mut cmd);
    assert!(!out.all().contains("panicked"), "{out:?}");
    assert!(
        out.stderr.contains("cannot write state file") && out.stderr.contains("intact"),
        "no clear error: {out:?}"
    );
    assert_ne!(
        out.code,
        Some(0),
        "a lost state write is not a success: {out:?}"
    );
    assert_eq!(
        std::fs::read(&state_file).expect("state"),
        previous,
        "the previous state file changed"
    );
    // Space again: the move is deployed again (at-least-once) and the state advances.
    let again = f.once();
    assert_eq!(again.code, Some(0), "{again:?}");
    assert!(
        f.deploys().last().is_some_and(|d| d.contains(&new)),
        "{:?}",
        f.deploys()
    );
    assert_eq!(
        f.state()["repositories"]["app"]["branches"]["main"]["sha"],
        new.as_str()
    );

    // A state directory that refuses new files (immutable; root ignores permission bits).
    let f = Fixture::new("server: {enabled: false}\n", 0);
    let text = std::fs::read_to_string(&f.config)
        .expect("config")
        .replace("audit_log: ", "audit_log: /dev/null\n#");
    std::fs::write(&f.config, text).expect("config");
    assert_eq!(f.once().code, Some(0));
    let state_dir = f.root().join("state");
    let previous = std::fs::read(state_dir.join("state.json")).expect("state");
    commit(&f.watched, "second");
    let set = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&state_dir)
        .output();
    let supported = set.as_ref().is_ok_and(|o| o.status.success());
    if !supported {
        eprintln!(
            "skipping the read-only directory case: chattr +i is not available here: {set:?}"
        );
        return;
    }
    let _mutable = Mutable(state_dir.clone());
    let out = f.once();
    assert!(!out.all().contains("panicked"), "{out:?}");
    assert!(
        out.stderr.contains("cannot write state file") && out.stderr.contains("intact"),
        "no clear error: {out:?}"
    );
    assert_ne!(out.code, Some(0), "{out:?}");
    assert_eq!(
        std::fs::read(state_dir.join("state.json")).expect("state"),
        previous
    );
}
