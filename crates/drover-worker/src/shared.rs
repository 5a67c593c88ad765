//! State shared by every task of a worker, and the ledger-call wrapper that waits out a
//! Postgres outage.

use crate::config::WorkerConfig;
use crate::metrics::Metrics;
use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;
use drover_broker::{Publisher, Topology};
use drover_ledger::{ClaimedJob, Group, Ledger, LedgerError};
use drover_pipeline::Registry;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{RwLock, watch};
use tracing::warn;
use uuid::Uuid;

/// What happens to a delivery once its handling is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    Ack,
    Requeue,
}

/// A job this worker is running: its claim and its cancel flag.
pub(crate) struct Inflight {
    pub(crate) job: ClaimedJob,
    pub(crate) cancel: Arc<AtomicBool>,
}

/// State shared by every task of the worker.
pub(crate) struct Shared {
    pub(crate) ledger: Ledger,
    /// Claims and completions of concurrent jobs, grouped into shared commits.
    pub(crate) group: Group,
    pub(crate) registry: Registry,
    pub(crate) config: WorkerConfig,
    pub(crate) topo: Topology,
    pub(crate) inflight: Mutex<HashMap<Uuid, Inflight>>,
    /// Set once on SIGTERM/SIGINT; jobs check it at batch boundaries.
    pub(crate) draining: AtomicBool,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// The current confirm-mode publisher (replaced on reconnect; None while disconnected).
    pub(crate) publisher: RwLock<Option<Arc<Publisher>>>,
    pub(crate) metrics: Arc<Metrics>,
}

impl Shared {
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The claims of the jobs running here (to release them after the grace period).
    pub(crate) fn inflight_jobs(&self) -> Vec<ClaimedJob> {
        self.inflight
            .lock()
            .map(|m| m.values().map(|i| i.job.clone()).collect())
            .unwrap_or_default()
    }

    pub(crate) fn inflight_ids(&self) -> Vec<Uuid> {
        self.inflight
            .lock()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Runs a ledger operation, waiting out a Postgres outage with jittered backoff (the
    /// delivery stays unacked meanwhile, which is the backpressure: no new work arrives past
    /// the prefetch). Gives up only when the worker is shutting down.
    pub(crate) async fn db<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, DbStop>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, LedgerError>>,
    {
        let mut backoff = reconnect_backoff();
        let mut shutdown = self.shutdown.clone();
        loop {
            match op().await {
                Ok(v) => {
                    self.metrics.database_up.store(true, Ordering::SeqCst);
                    return Ok(v);
                }
                Err(e) if e.is_connection() => {
                    self.metrics.database_up.store(false, Ordering::SeqCst);
                    let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(10));
                    warn!(error = %e, op = what, retry_in_ms = wait.as_millis() as u64,
                        "postgres unavailable; holding the job until it is back");
                    if *shutdown.borrow() {
                        return Err(DbStop::Shutdown);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return Err(DbStop::Shutdown),
                    }
                }
                Err(e) => return Err(DbStop::Failed(e)),
            }
        }
    }

    pub(crate) async fn publisher(&self) -> Option<Arc<Publisher>> {
        self.publisher.read().await.clone()
    }
}

/// Why a ledger operation was abandoned.
#[derive(Debug)]
pub(crate) enum DbStop {
    Shutdown,
    Failed(LedgerError),
}

/// Jittered exponential backoff for reconnecting (broker or Postgres): 200 ms growing to
/// 15 s, forever.
pub(crate) fn reconnect_backoff() -> ExponentialBackoff {
    ExponentialBackoff {
        initial_interval: Duration::from_millis(200),
        current_interval: Duration::from_millis(200),
        randomization_factor: 0.5,
        multiplier: 2.0,
        max_interval: Duration::from_secs(15),
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    }
}
