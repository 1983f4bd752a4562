//! What this binary is: version, commit and build date, embedded by `build.rs`.

pub const VERSION: &str = env!("SENTRY_BUILD_VERSION");
pub const COMMIT: &str = env!("SENTRY_BUILD_COMMIT");

/// What `sentry --version` prints after the program name.
pub const VERSION_LINE: &str = concat!(
    env!("SENTRY_BUILD_VERSION"),
    " (commit ",
    env!("SENTRY_BUILD_COMMIT"),
    ", built ",
    env!("SENTRY_BUILD_DATE"),
    ")"
);

/// `User-Agent` for every HTTP request (GitHub rejects requests without one).
pub const USER_AGENT: &str = concat!("sentry/", env!("SENTRY_BUILD_VERSION"));
