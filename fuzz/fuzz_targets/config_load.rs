//! Configuration parsing and validation: `sentry::testing::load_str` must never panic, and
//! an accepted configuration must have no error diagnostics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sentry::testing::{Env, load_str};

fuzz_target!(|data: &[u8]| {
    // The binary refuses files over 16 MiB and non-UTF-8 text before parsing.
    if data.len() > 1 << 20 {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = Env::fixed([("TOKEN", "fuzz-token"), ("EMPTY", "")]);
    let loaded = load_str(text, &env);
    if loaded.config.is_some() {
        assert!(!loaded.diagnostics.iter().any(|d| d.is_error()));
    }
    for d in &loaded.diagnostics {
        let _ = d.to_string();
    }
});
