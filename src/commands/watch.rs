//! `sentry watch`: the long-running poller, or one cycle with `--once`.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::Exit;
use crate::api::Live;
use crate::cli::{Cli, WatchArgs};
use crate::config::{Config, Env};
use crate::deploy::{DeployOptions, Deployer, Observers, RunObserver, Trigger};
use crate::forge::Forges;
use crate::history::History;
use crate::monitor::scheduler::Scheduler;
use crate::monitor::state::StateStore;
use crate::monitor::{self, Monitor, Scope};
use crate::report::Reporting;
use crate::server::{self, AppState};
use crate::shutdown::Shutdown;
use crate::telemetry::audit::Audit;
use crate::telemetry::metrics::Metrics;

use super::{load_config, runtime};

pub fn watch(cli: &Cli, args: &WatchArgs, env: &Env) -> anyhow::Result<Exit> {
    let config = Arc::new(load_config(&cli.config, env)?);
    // The one writer of the state: a second watch stops here, before it reads anything.
    let (state, _lock) = monitor::open_state_for_watch(&config)?;
    runtime()?.block_on(watch_async(config, state, args, env))
}

async fn watch_async(
    config: Arc<Config>,
    state: Arc<StateStore>,
    args: &WatchArgs,
    env: &Env,
) -> anyhow::Result<Exit> {
    let shutdown = Shutdown::new();
    shutdown
        .listen_for_signals()
        .context("cannot install signal handlers")?;
    let metrics = Arc::new(Metrics::new());
    let history_file = History::path_for(&config.state_file);
    // `--once` keeps no history: nobody can ask for it, and the file belongs to the
    // long-running watch.
    let history = Arc::new(if args.once {
        History::in_memory(config.clone())
    } else {
        History::open(config.clone(), &history_file).context("cannot open the run history")?
    });
    let (monitor, reporting) = build(&config, state, args, env, &shutdown, &metrics, &history)?;
    let monitor = Arc::new(monitor);
    tracing::info!(
        version = crate::build_info::VERSION,
        "sentry watching {} every {}",
        super::summary(&config),
        humantime::format_duration(config.polling_interval)
    );
    if args.once {
        let exit = watch_once(&monitor, &shutdown).await;
        reporting.flush(FLUSH_ONCE).await;
        return exit;
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
            live: Some(Live {
                monitor: monitor.clone(),
                history: history.clone(),
                stop: server_stop.clone(),
            }),
        };
        let addr = args.listen.unwrap_or(config.server.listen);
        let (_, handle) = server::serve(addr, state, server_stop.clone())
            .await
            .with_context(|| format!("cannot listen on {addr} (set server.listen or --listen)"))?;
        Some(handle)
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
    reporting.flush(FLUSH_AT_STOP).await;
    // Every finished run is in the history file before the process ends.
    let closing = history.clone();
    let _ = tokio::task::spawn_blocking(move || closing.close()).await;
    server_stop.cancel();
    if let Some(handle) = server {
        let _ = handle.await;
    }
    tracing::info!("stopped");
    if !saved {
        anyhow::bail!(
            "the last state could not be saved (see above); the next start may deploy again"
        );
    }
    Ok(Exit::Success)
}

/// How long `watch --once` waits for statuses and notifications before it exits.
const FLUSH_ONCE: std::time::Duration = std::time::Duration::from_secs(30);
/// The same at a stop: short, as a container's stop timeout is counting.
const FLUSH_AT_STOP: std::time::Duration = std::time::Duration::from_secs(10);

async fn watch_once(monitor: &Monitor, shutdown: &Shutdown) -> anyhow::Result<Exit> {
    let report = monitor
        .poll_once(Scope::All, Trigger::Poll, shutdown.token())
        .await;
    monitor.scheduler().wait_idle().await;
    if !monitor.save_state().await {
        // What was deployed is not recorded: an I/O failure, not a job result.
        anyhow::bail!("the state could not be saved (see above)");
    }
    let failed = monitor.scheduler().failed_runs();
    if failed > 0 || report.errors > 0 {
        tracing::error!(
            "watch --once: {failed} group run(s) failed, {} branch check(s) failed",
            report.errors
        );
        Ok(Exit::JobFailed)
    } else {
        Ok(Exit::Success)
    }
}

fn build(
    config: &Arc<Config>,
    state: Arc<StateStore>,
    args: &WatchArgs,
    env: &Env,
    shutdown: &Shutdown,
    metrics: &Arc<Metrics>,
    history: &Arc<History>,
) -> anyhow::Result<(Monitor, Reporting)> {
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
    let audit = Audit::open(config.audit_log.as_deref()).context("cannot open audit_log")?;
    let reporting = Reporting::start(config, &forges, metrics).context("cannot start reporting")?;
    let mut list: Vec<Arc<dyn RunObserver>> =
        vec![metrics.clone(), Arc::new(audit), history.clone()];
    list.extend(reporting.observers());
    let observers = Observers::new(list);
    let scheduler = Scheduler::new(
        config.clone(),
        deployer,
        state.clone(),
        shutdown.clone(),
        observers,
        metrics.clone(),
    );
    let monitor = Monitor::new(config.clone(), forges, state, scheduler, metrics.clone());
    Ok((monitor, reporting))
}
