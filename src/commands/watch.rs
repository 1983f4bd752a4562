//! `sentry watch`: the long-running poller, or one cycle with `--once`.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::Exit;
use crate::cli::{Cli, WatchArgs};
use crate::config::{Config, Env};
use crate::deploy::{DeployOptions, Deployer, Trigger};
use crate::forge::Forges;
use crate::monitor::scheduler::{Observers, Scheduler};
use crate::monitor::state::StateStore;
use crate::monitor::{self, Monitor, Scope};
use crate::server::{self, AppState};
use crate::shutdown::Shutdown;
use crate::telemetry::audit::Audit;
use crate::telemetry::metrics::Metrics;

use super::{load_config, runtime};

pub fn watch(cli: &Cli, args: &WatchArgs, env: &Env) -> Exit {
    let config = match load_config(&cli.config, env) {
        Ok(config) => Arc::new(config),
        Err(exit) => return exit,
    };
    match runtime() {
        Ok(rt) => rt.block_on(watch_async(config, args, env)),
        Err(exit) => exit,
    }
}

async fn watch_async(config: Arc<Config>, args: &WatchArgs, env: &Env) -> Exit {
    let shutdown = Shutdown::new();
    if let Err(e) = shutdown.listen_for_signals() {
        eprintln!("error: cannot install signal handlers: {e}");
        return Exit::CannotRun;
    }
    let metrics = Arc::new(Metrics::new());
    let monitor = match build(&config, args, env, &shutdown, &metrics) {
        Ok(monitor) => Arc::new(monitor),
        Err(e) => {
            eprintln!("error: {e:#}");
            return Exit::CannotRun;
        }
    };
    tracing::info!(
        version = crate::build_info::VERSION,
        "sentry watching {} every {}",
        super::summary(&config),
        humantime::format_duration(config.polling_interval)
    );
    if args.once {
        return watch_once(&monitor, &shutdown).await;
    }
    let (hints_tx, hints_rx) = mpsc::channel::<Vec<String>>(64);
    // The server outlives the poll loop so that /readyz can answer 503 while running
    // deployments drain.
    let server_stop = tokio_util::sync::CancellationToken::new();
    let server = if config.server.enabled {
        let state = AppState {
            config: config.clone(),
            health: monitor.health(),
            metrics,
            shutdown: shutdown.clone(),
            hints: hints_tx,
            started: std::time::Instant::now(),
        };
        let addr = args.listen.unwrap_or(config.server.listen);
        match server::serve(addr, state, server_stop.clone()).await {
            Ok((_, handle)) => Some(handle),
            Err(e) => {
                eprintln!("error: cannot listen on {addr}: {e} (set server.listen or --listen)");
                return Exit::CannotRun;
            }
        }
    } else {
        None
    };
    // On a worker thread: polled from `block_on` on the main thread, every answer would
    // have to wake that thread across cores.
    let poll_loop = tokio::spawn(monitor::run(monitor.clone(), shutdown.clone(), hints_rx));
    if let Err(e) = poll_loop.await {
        tracing::error!("the poll loop stopped unexpectedly (a bug: please report it): {e}");
    }
    let (running, _) = monitor.scheduler().load();
    if !running.is_empty() {
        tracing::info!(
            "waiting for running group runs to stop: {}",
            running.join(", ")
        );
    }
    monitor.scheduler().wait_idle().await;
    let saved = monitor.save_state().await;
    server_stop.cancel();
    if let Some(handle) = server {
        let _ = handle.await;
    }
    tracing::info!("stopped");
    if saved {
        Exit::Success
    } else {
        Exit::CannotRun
    }
}

async fn watch_once(monitor: &Monitor, shutdown: &Shutdown) -> Exit {
    let report = monitor
        .poll_once(Scope::All, Trigger::Poll, shutdown.token())
        .await;
    monitor.scheduler().wait_idle().await;
    if !monitor.save_state().await {
        // What was deployed is not recorded: an I/O failure, not a job result.
        return Exit::CannotRun;
    }
    let failed = monitor.scheduler().failed_runs();
    if failed > 0 || report.errors > 0 {
        tracing::error!(
            "watch --once: {failed} group run(s) failed, {} branch check(s) failed",
            report.errors
        );
        Exit::JobFailed
    } else {
        Exit::Success
    }
}

fn build(
    config: &Arc<Config>,
    args: &WatchArgs,
    env: &Env,
    shutdown: &Shutdown,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Monitor> {
    let state = Arc::new(StateStore::load(&config.state_file)?);
    let dropped = state.retain_configured(config);
    if !dropped.is_empty() {
        tracing::info!(
            "dropped from state (no longer configured): {}",
            dropped.join(", ")
        );
        state.save()?;
    }
    let deployer = Deployer::new(
        config.clone(),
        DeployOptions {
            keep_workdir: args.keep_workdir,
            live_output: false,
            extra_env: env
                .file_only_vars()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        },
    );
    match deployer.sweep_work_dir() {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            "removed {n} leftover checkout(s) from {}",
            config.work_dir.display()
        ),
        Err(e) => tracing::warn!("cannot sweep {}: {e}", config.work_dir.display()),
    }
    let forges = Forges::new(config)?.with_events(metrics.clone());
    let audit = Audit::open(config.audit_log.as_deref())
        .map_err(|e| anyhow::anyhow!("cannot open audit_log: {e}"))?;
    let observers = Observers {
        metrics: metrics.clone(),
        audit: Arc::new(audit),
    };
    let scheduler = Scheduler::new(
        config.clone(),
        deployer,
        state.clone(),
        shutdown.clone(),
        observers,
    );
    Ok(Monitor::new(
        config.clone(),
        forges,
        state,
        scheduler,
        metrics.clone(),
    ))
}
