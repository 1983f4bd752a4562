//! The one shutdown signal of the process: SIGTERM or SIGINT asks for a graceful stop,
//! a second signal forces it.
//!
//! Long-running work checks [`Shutdown::requested`] at safe points and drains: nothing
//! new starts, running deploy commands get `shutdown_grace` before their process groups
//! are killed. [`Shutdown::forced`] (the second signal) skips the grace period.

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    graceful: CancellationToken,
    force: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask for a graceful stop (what the first signal does).
    pub fn request(&self) {
        self.graceful.cancel();
    }

    /// Stop at once (what the second signal does); implies a graceful request.
    pub fn force(&self) {
        self.graceful.cancel();
        self.force.cancel();
    }

    pub fn is_requested(&self) -> bool {
        self.graceful.is_cancelled()
    }

    pub fn is_forced(&self) -> bool {
        self.force.is_cancelled()
    }

    /// Completes when a stop has been asked for.
    pub async fn requested(&self) {
        self.graceful.cancelled().await
    }

    /// Completes when an immediate stop has been asked for.
    pub async fn forced(&self) {
        self.force.cancelled().await
    }

    /// The graceful token, for APIs that take a `CancellationToken`.
    pub fn token(&self) -> &CancellationToken {
        &self.graceful
    }

    /// Spawns the task that turns SIGTERM/SIGINT into requests: the first one graceful,
    /// the second one forced. Must be called inside the tokio runtime.
    pub fn listen_for_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let this = self.clone();
        tokio::spawn(async move {
            for attempt in 0.. {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                if attempt == 0 {
                    tracing::info!(
                        "{name} received: finishing running work, starting nothing new (send it again to stop at once)"
                    );
                    this.request();
                } else {
                    tracing::warn!("{name} received again: stopping at once");
                    this.force();
                    break;
                }
            }
        });
        Ok(())
    }
}
