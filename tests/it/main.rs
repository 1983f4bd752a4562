//! Integration tests: one binary that drives the real `sentry` binary against real local
//! Git repositories and fake forge servers on 127.0.0.1. Shared helpers live in `support`.
//! Modules declared here: add `mod <name>;` for each test file.

// Tests may unwrap: a panic is a failed test. Library code may not (Cargo.toml [lints]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod cli;
mod crash;
mod deploy;
mod enterprise;
mod faults;
mod forge;
mod ghapp;
mod graphql;
mod ha;
mod hostile;
mod jobs;
mod live;
mod monitor;
mod output;
mod promise;
mod proxy;
mod report;
mod scale;
mod secrets;
mod security;
mod server;
mod soak;
mod ssh;
mod trigger;
mod watch;
