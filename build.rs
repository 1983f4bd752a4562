//! Embeds the version, the Git commit and the build date into the binary.
//!
//! Each comes from an environment variable when set (the Dockerfile passes them as build
//! arguments): `SENTRY_VERSION`, `SENTRY_GIT_COMMIT`, `SENTRY_BUILD_DATE`. Otherwise the
//! commit is asked from git, and a tree without `.git` says `unknown`.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    for var in [
        "SENTRY_VERSION",
        "SENTRY_GIT_COMMIT",
        "SENTRY_BUILD_DATE",
        "SOURCE_DATE_EPOCH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Some(git_dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={git_dir}/HEAD");
        // A missing file would make cargo rerun this script on every build.
        let head_ref = git(&["symbolic-ref", "-q", "HEAD"]).map(|r| format!("{git_dir}/{r}"));
        if let Some(path) = head_ref.filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let version = env("SENTRY_VERSION").unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned());
    let commit = env("SENTRY_GIT_COMMIT")
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    let date = env("SENTRY_BUILD_DATE").unwrap_or_else(build_date);
    println!("cargo:rustc-env=SENTRY_BUILD_VERSION={version}");
    println!("cargo:rustc-env=SENTRY_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=SENTRY_BUILD_DATE={date}");
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Today's UTC date (or SOURCE_DATE_EPOCH's, for reproducible builds) as YYYY-MM-DD.
fn build_date() -> String {
    let secs = env("SOURCE_DATE_EPOCH")
        .and_then(|s| s.parse::<u64>().ok())
        .or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        })
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}
