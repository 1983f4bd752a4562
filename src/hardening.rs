//! Process hardening done once at start, before any thread exists: no core dumps (they
//! would hold every token in memory), and as many file descriptors as the hard limit
//! allows (so that idle connections cannot starve deployments of descriptors).
//!
//! Each step is best effort: a failure is reported and Sentry goes on, because a refused
//! limit change is not a reason to stop watching.

/// What [`at_start`] did, for the log once logging is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardened {
    /// The soft `RLIMIT_NOFILE` now in force.
    pub open_files: u64,
    /// Problems met (each step that failed, with why).
    pub problems: Vec<String>,
}

/// Disables core dumps (`RLIMIT_CORE` 0 and not dumpable, which also keeps other users'
/// processes from reading `/proc/<pid>/mem`) and raises the soft `RLIMIT_NOFILE` to the
/// hard limit. Call first thing in `main`.
pub fn at_start() -> Hardened {
    let mut problems = Vec::new();
    if let Err(e) = disable_core_dumps() {
        problems.push(format!("cannot disable core dumps: {e}"));
    }
    let open_files = match raise_open_files() {
        Ok(n) => n,
        Err(e) => {
            problems.push(format!("cannot raise the open-files limit: {e}"));
            0
        }
    };
    Hardened {
        open_files,
        problems,
    }
}

fn disable_core_dumps() -> std::io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass; it has no other effect on memory.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft limit to the hard one; returns the soft limit in force.
fn raise_open_files() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_twice_is_stable() {
        let first = raise_open_files().expect("raise");
        assert_eq!(raise_open_files().expect("raise"), first);
        assert!(first > 0);
    }
}
