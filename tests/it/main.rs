//! Integration tests: one binary that drives the real `sentry` binary against real local
//! Git repositories and fake forge servers on 127.0.0.1. Shared helpers live in `support`.
//! Modules declared here: add `mod <name>;` for each test file.

mod support;

mod cli;
mod crash;
mod deploy;
mod faults;
mod forge;
mod hostile;
mod monitor;
mod secrets;
mod security;
mod server;
mod soak;
mod trigger;
mod watch;
