//! The bounded queue between a reporting observer and its background task.
//!
//! Observers are called synchronously from deploying tasks, so [`Queue::push`] never waits:
//! when the queue is full the message is dropped, counted (`sentry_report_dropped_total`)
//! and logged once. One task drains the queue in order, one message at a time, so a
//! commit's `pending` is always sent before its outcome. [`Queue::drained`] lets a command
//! that is about to exit wait, for a bounded time, until everything queued was handled.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use crate::telemetry::metrics::Metrics;

/// Messages waiting per queue: far more than a burst of group runs produces, small enough
/// that a forge that is down for hours holds little memory.
pub const CAPACITY: usize = 1024;

pub struct Queue<T> {
    /// `status` or `notify`: the metric label and the log's name for the queue.
    name: &'static str,
    tx: mpsc::Sender<T>,
    /// Queued plus being handled.
    outstanding: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    metrics: Arc<Metrics>,
    warned: AtomicBool,
}

impl<T: Send + 'static> Queue<T> {
    /// A queue whose messages `handle` gets one at a time, on a task of its own. Must be
    /// called inside a tokio runtime.
    pub fn spawn<F, Fut>(name: &'static str, metrics: Arc<Metrics>, mut handle: F) -> Queue<T>
    where
        F: FnMut(T) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<T>(CAPACITY);
        let outstanding = Arc::new(AtomicUsize::new(0));
        let idle = Arc::new(Notify::new());
        let (count, wake) = (outstanding.clone(), idle.clone());
        tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                handle(message).await;
                if count.fetch_sub(1, Ordering::AcqRel) == 1 {
                    wake.notify_waiters();
                }
            }
        });
        Queue {
            name,
            tx,
            outstanding,
            idle,
            metrics,
            warned: AtomicBool::new(false),
        }
    }

    /// Queues `message` without waiting; a full queue drops it (counted, logged once).
    pub fn push(&self, message: T) {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        if self.tx.try_send(message).is_err() {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            self.metrics.report_dropped(self.name);
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    queue = self.name,
                    "the {} queue is full ({CAPACITY} messages): dropping messages until it drains \
                     (counted in sentry_report_dropped_total; logged once)",
                    self.name
                );
            }
        }
    }

    /// Waits until every queued message was handled, at most `within`; returns how many
    /// were still outstanding then.
    pub async fn drained(&self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a wake-up in between is not missed.
            notified.as_mut().enable();
            let left = self.outstanding.load(Ordering::Acquire);
            if left == 0 {
                return 0;
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(deadline) => return left,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handles_in_order_and_drains() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        let queue = Queue::spawn("test", Arc::new(Metrics::new()), move |n: u32| {
            let sink = sink.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                sink.lock().unwrap().push(n);
            }
        });
        for n in 0..5 {
            queue.push(n);
        }
        assert_eq!(queue.drained(Duration::from_secs(5)).await, 0);
        assert_eq!(*seen.lock().unwrap(), [0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let metrics = Arc::new(Metrics::new());
        let gate = Arc::new(Notify::new());
        let wait = gate.clone();
        let queue = Queue::spawn("status", metrics.clone(), move |_: usize| {
            let wait = wait.clone();
            async move { wait.notified().await }
        });
        for n in 0..CAPACITY + 10 {
            queue.push(n);
        }
        assert!(
            metrics
                .encode()
                .contains("sentry_report_dropped_total{queue=\"status\"}"),
            "{}",
            metrics.encode()
        );
        assert!(queue.drained(Duration::from_millis(50)).await > 0);
    }
}
