//! `sentry watch`: the long-running poller, or one cycle with `--once`.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Exit;
use crate::api::{Live, LiveSlot};
use crate::cli::{Cli, WatchArgs};
use crate::config::StateConfig;
use crate::config::{Config, Env};
use crate::deploy::{DeployOptions, Deployer, Observers, RunObserver, Trigger};
use crate::forge::Forges;
use crate::history::History;
use crate::leader::{self, Elector};
use crate::monitor::scheduler::Scheduler;
use crate::monitor::state::configmap::ConfigMapBackend;
use crate::monitor::state::{FileBackend, StateBackend, StateStore};
use crate::monitor::{self, Health, Monitor, Scope};
use crate::report::Reporting;
use crate::server::{self, AppState};
use crate::shutdown::Shutdown;
use crate::telemetry::audit::Audit;
use crate::telemetry::metrics::Metrics;

use super::{load_config, runtime};

pub fn watch(cli: &Cli, args: &WatchArgs, env: &Env) -> anyhow::Result<Exit> {
    let config = Arc::new(load_config(&cli.config, env)?);
    if config.leader_election.enabled && !args.once {
        return runtime()?.block_on(watch_replicated(config, args, env));
    }
    if config.state != StateConfig::File {
        // One cycle without the Lease would write the ConfigMap beside a running leader.
        anyhow::bail!(
            "watch --once cannot use state.backend: kubernetes (the state belongs to the elected leader); \
             run `sentry status` to read it, or `sentry watch` to take part in the election"
        );
    }
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
    let (shutdown, metrics) = start()?;
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
    log_start(&config);
    if args.once {
        let exit = watch_once(&monitor, &shutdown).await;
        reporting.flush(FLUSH_ONCE).await;
        return exit;
    }
    let (hints_tx, hints_rx) = mpsc::channel::<Vec<String>>(64);
    // The server outlives the poll loop so that /readyz can answer 503 while running
    // deployments drain.
    let slot = LiveSlot::default();
    let server = Server::start(
        &config,
        args,
        &monitor.health(),
        metrics,
        &shutdown,
        hints_tx,
        slot.clone(),
    )
    .await?;
    server.show(&slot, monitor.clone(), history.clone(), None);
    let saved = lead(monitor, &shutdown, hints_rx).await;
    reporting.flush(FLUSH_AT_STOP).await;
    // Every finished run is in the history file before the process ends.
    let closing = history.clone();
    let _ = tokio::task::spawn_blocking(move || closing.close()).await;
    server.stop().await;
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

/// The shutdown token, listening for SIGTERM/SIGINT, and the metrics registry.
fn start() -> anyhow::Result<(Shutdown, Arc<Metrics>)> {
    let shutdown = Shutdown::new();
    shutdown
        .listen_for_signals()
        .context("cannot install signal handlers")?;
    Ok((shutdown, Arc::new(Metrics::new())))
}

fn log_start(config: &Config) {
    tracing::info!(
        version = crate::build_info::VERSION,
        "sentry watching {} every {}",
        super::summary(config),
        humantime::format_duration(config.polling_interval)
    );
}

/// The HTTP server of `watch`, running until [`Server::stop`].
struct Server {
    stop: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    async fn start(
        config: &Arc<Config>,
        args: &WatchArgs,
        health: &Arc<Health>,
        metrics: Arc<Metrics>,
        shutdown: &Shutdown,
        hints: mpsc::Sender<Vec<String>>,
        live: LiveSlot,
    ) -> anyhow::Result<Server> {
        let stop = CancellationToken::new();
        if !config.server.enabled {
            return Ok(Server { stop, handle: None });
        }
        let state = AppState {
            config: config.clone(),
            health: health.clone(),
            metrics,
            shutdown: shutdown.clone(),
            hints,
            started: std::time::Instant::now(),
            live: Some(live),
        };
        let addr = args.listen.unwrap_or(config.server.listen);
        let (_, handle) = server::serve(addr, state, stop.clone())
            .await
            .with_context(|| format!("cannot listen on {addr} (set server.listen or --listen)"))?;
        Ok(Server {
            stop,
            handle: Some(handle),
        })
    }

    /// The live view of `monitor`, served from now on; the server's stop ends its event
    /// streams.
    fn show(
        &self,
        slot: &LiveSlot,
        monitor: Arc<Monitor>,
        history: Arc<History>,
        leader: Option<String>,
    ) {
        slot.set(Live {
            monitor,
            history,
            stop: self.stop.clone(),
            leader,
        });
    }

    async fn stop(self) {
        self.stop.cancel();
        if let Some(handle) = self.handle {
            let _ = handle.await;
        }
    }
}

/// Polls and deploys until shutdown, then drains running units and saves the state.
/// Returns whether the last state was saved.
async fn lead(
    monitor: Arc<Monitor>,
    shutdown: &Shutdown,
    hints: mpsc::Receiver<Vec<String>>,
) -> bool {
    // On a worker thread: polled from `block_on` on the main thread, every answer would
    // have to wake that thread across cores.
    let poll_loop = tokio::spawn(monitor::run(monitor.clone(), shutdown.clone(), hints));
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
    monitor.save_validators_now().await;
    monitor.save_state().await
}

/// `watch` with `leader_election.enabled`: stand by until this replica holds the Lease
/// (ready, answering webhooks 202 — their hints wait in the channel and the first cycle
/// as leader polls everything anyway), then lead: open the state, poll and deploy while
/// renewing. Losing the Lease (or a fenced state write) stops everything at once — units
/// are killed, not drained, since another replica may already run them — and exits with
/// an error so that the pod restarts as a standby. SIGTERM drains, saves, and releases
/// the Lease so that a standby takes over at its next try.
async fn watch_replicated(
    config: Arc<Config>,
    args: &WatchArgs,
    env: &Env,
) -> anyhow::Result<Exit> {
    let (shutdown, metrics) = start()?;
    let health = Arc::new(Health::default());
    let election = &config.leader_election;
    let elector = Arc::new(
        Elector::connect(election, leader::identity())
            .await
            .context("leader election")?,
    );
    tracing::info!(
        identity = elector.identity(),
        "replica {} standing by for Lease {}",
        elector.identity(),
        elector.lease()
    );
    let (hints_tx, hints_rx) = mpsc::channel::<Vec<String>>(64);
    let slot = LiveSlot::default();
    let server =
        // A standby has no monitor to show: the live view answers 503 until this replica
        // leads (`lead_replica` fills the slot).
        Server::start(&config, args, &health, metrics.clone(), &shutdown, hints_tx, slot.clone())
            .await?;
    let alive = || {
        health.cycle_completed_at(std::time::SystemTime::now());
        health.set_ready(!shutdown.is_requested());
    };
    let Some(term) = elector.acquire(shutdown.token(), alive).await else {
        server.stop().await;
        tracing::info!("stopped");
        return Ok(Exit::Success);
    };
    // Renewing runs beside the work; losing the Lease forces the shutdown at once.
    let stop_renewing = CancellationToken::new();
    let renewing = {
        let (elector, stop, shutdown) = (elector.clone(), stop_renewing.clone(), shutdown.clone());
        tokio::spawn(async move {
            let held = elector.hold(term, &stop).await;
            if let Err(e) = &held {
                tracing::error!("{e}");
                shutdown.force();
            }
            held
        })
    };
    let serving = Serving {
        metrics: &metrics,
        health: &health,
        server: &server,
        slot: &slot,
        identity: elector.identity().to_owned(),
    };
    let mut reporting = None;
    let outcome = lead_replica(
        &config,
        args,
        env,
        &shutdown,
        serving,
        hints_rx,
        &mut reporting,
    )
    .await;
    stop_renewing.cancel();
    let held = renewing
        .await
        .map_err(|e| anyhow::anyhow!("the renewal task failed: {e}"))?;
    if held.is_ok() {
        // Still ours (whatever went wrong while leading): hand it over now rather than
        // after lease_duration.
        elector.release().await;
    }
    if let Some(reporting) = reporting {
        reporting.flush(FLUSH_AT_STOP).await;
    }
    let result = match (held, outcome) {
        (Err(lost), _) => Err(anyhow::Error::new(lost)),
        (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(true)) => Ok(Exit::Success),
        (Ok(()), Ok(false)) => Err(anyhow::anyhow!(
            "the last state could not be saved (see above); the next leader may deploy again"
        )),
    };
    server.stop().await;
    tracing::info!("stopped");
    result
}

/// The leader's part of [`watch_replicated`]: opens the state (the ConfigMap, read only
/// now, after the previous leader's last write), then [`lead`]s. A fenced state write
/// forces the shutdown.
/// What a replica serves while it leads: its metrics and health, and the live view it
/// fills once it has a monitor.
struct Serving<'a> {
    metrics: &'a Arc<Metrics>,
    health: &'a Arc<Health>,
    server: &'a Server,
    slot: &'a LiveSlot,
    identity: String,
}

async fn lead_replica(
    config: &Arc<Config>,
    args: &WatchArgs,
    env: &Env,
    shutdown: &Shutdown,
    serving: Serving<'_>,
    hints: mpsc::Receiver<Vec<String>>,
    reporting_out: &mut Option<Reporting>,
) -> anyhow::Result<bool> {
    let (metrics, health) = (serving.metrics, serving.health);
    let backend: Box<dyn StateBackend> = match &config.state {
        StateConfig::File => Box::new(FileBackend::new(&config.state_file)),
        StateConfig::Kubernetes {
            configmap,
            namespace,
        } => Box::new(ConfigMapBackend::connect(configmap, namespace.as_deref()).await?),
    };
    let opening = config.clone();
    let (state, _lock) =
        tokio::task::spawn_blocking(move || monitor::open_state_with(&opening, backend))
            .await
            .context("opening the state")??;
    // The first write of this term: from here on, a write by the previous leader (a
    // process that was paused and does not know it was deposed yet) fails with a
    // conflict, so it can neither claim nor start a unit.
    let first = state.clone();
    tokio::task::spawn_blocking(move || first.save())
        .await
        .context("writing the state")?
        .context("cannot take over the state")?;
    let fenced = state.fenced().clone();
    let fenced_after = fenced.clone();
    // Runs are not kept across replicas: the history lives with the live view.
    let history = Arc::new(History::in_memory(config.clone()));
    let (monitor, reporting) = build(config, state, args, env, shutdown, metrics, &history)?;
    let monitor = Arc::new(monitor.with_health(health.clone()));
    serving.server.show(
        serving.slot,
        monitor.clone(),
        history,
        Some(serving.identity),
    );
    log_start(config);
    let watchdog = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = fenced.cancelled() => shutdown.force(),
                _ = shutdown.requested() => {}
            }
        })
    };
    let saved = lead(monitor, shutdown, hints).await;
    watchdog.abort();
    // Flushed by the caller after the Lease is released: a slow forge must not delay the
    // handover.
    *reporting_out = Some(reporting);
    if fenced_after.is_cancelled() {
        anyhow::bail!(
            "another replica wrote the state: this replica is no longer the leader (its running units were stopped)"
        );
    }
    Ok(saved)
}

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
    {
        let forges = forges.clone();
        metrics.set_budget_source(Arc::new(move || forges.budgets()));
    }
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
