//! `sentry exec-unit` (hidden): the entry point of a Kubernetes Job's pod. It reads the
//! unit from `SENTRY_EXEC_UNIT`, runs it with the local executor and ends with an exit code
//! that tells Sentry the outcome (see `deploy::kubernetes::exit_for`).

use std::sync::Arc;

use anyhow::Context as _;

use super::{load_config, runtime};
use crate::Exit;
use crate::cli::Cli;
use crate::config::Env;
use crate::deploy::kubernetes::{self, UNIT_SPEC_ENV, UnitSpec};
use crate::shutdown::Shutdown;

pub fn exec_unit(cli: &Cli, env: &Env) -> anyhow::Result<Exit> {
    let text =
        std::env::var(UNIT_SPEC_ENV).with_context(|| format!("{UNIT_SPEC_ENV} is not set"))?;
    let spec: UnitSpec =
        serde_json::from_str(&text).with_context(|| format!("{UNIT_SPEC_ENV} is not a unit"))?;
    let config = Arc::new(load_config(&cli.config, env)?);
    // The trust for the clone (tls.ca_file, GIT_SSL_CAINFO, per-repository CA files), as in
    // `watch`: building the forge clients records it for libgit2.
    let _forges = crate::forge::Forges::new(&config)?;
    runtime()?.block_on(async {
        let shutdown = Shutdown::new();
        // The kubelet's SIGTERM (Job deleted, deadline) stops the commands' process groups.
        shutdown
            .listen_for_signals()
            .context("cannot install signal handlers")?;
        let outcome = kubernetes::exec_unit(config, &spec, &shutdown).await;
        Ok(kubernetes::exit_for(outcome.status))
    })
}
