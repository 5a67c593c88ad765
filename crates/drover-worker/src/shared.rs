//! State shared by every task of a worker, and the ledger-call wrapper that waits out a
//! Postgres outage.

use crate::config::WorkerConfig;
use crate::metrics::Metrics;
use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;
use drover_broker::{BrokerAddresses, Publisher, Topology};
use drover_ledger::{ClaimedJob, Group, Ledger, LedgerError};
use drover_pipeline::Registry;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{RwLock, watch};
use tracing::warn;
use uuid::Uuid;

/// What happens to a delivery once its handling is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    Ack,
    Requeue,
    /// Acked already, when the job was claimed: nothing left to do with the delivery.
    Settled,
}

/// A job this worker is running: its claim and its cancel flag.
pub(crate) struct Inflight {
    pub(crate) job: ClaimedJob,
    pub(crate) cancel: Arc<AtomicBool>,
}

/// The jobs running on this worker, by id: what the heartbeat renews, what a cancellation
/// reaches, what is released after the grace period.
///
/// A task that panicked while holding the lock poisons it; every method here takes the map
/// anyway (`into_inner`): the map is only ever changed by single inserts and removes, so it
/// is never half-updated, and skipping a registration would leave a running job whose lease
/// nobody renews (another worker would take it over while it runs here).
#[derive(Default)]
pub(crate) struct InflightMap(Mutex<HashMap<Uuid, Inflight>>);

impl InflightMap {
    fn map(&self) -> MutexGuard<'_, HashMap<Uuid, Inflight>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a running job; returns how many run now.
    pub(crate) fn insert(&self, job: ClaimedJob, cancel: Arc<AtomicBool>) -> usize {
        let mut m = self.map();
        m.insert(job.id, Inflight { job, cancel });
        m.len()
    }

    /// Unregisters a job; returns how many run now.
    pub(crate) fn remove(&self, id: &Uuid) -> usize {
        let mut m = self.map();
        m.remove(id);
        m.len()
    }

    pub(crate) fn contains(&self, id: &Uuid) -> bool {
        self.map().contains_key(id)
    }

    pub(crate) fn ids(&self) -> Vec<Uuid> {
        self.map().keys().copied().collect()
    }

    pub(crate) fn jobs(&self) -> Vec<ClaimedJob> {
        self.map().values().map(|i| i.job.clone()).collect()
    }

    /// Raises the cancel flag of each of `ids` running here.
    pub(crate) fn cancel(&self, ids: &[Uuid]) {
        let m = self.map();
        for id in ids {
            if let Some(i) = m.get(id) {
                i.cancel.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// State shared by every task of the worker.
pub(crate) struct Shared {
    pub(crate) ledger: Ledger,
    /// Claims and completions of concurrent jobs, grouped into shared commits.
    pub(crate) group: Group,
    pub(crate) registry: Registry,
    pub(crate) config: WorkerConfig,
    pub(crate) topo: Topology,
    /// The broker's nodes (one or several), with the AMQP heartbeat set: every connection
    /// the worker opens goes to the first that answers, starting with the one it was on.
    pub(crate) addresses: BrokerAddresses,
    pub(crate) inflight: InflightMap,
    /// Set once on SIGTERM/SIGINT; jobs check it at batch boundaries.
    pub(crate) draining: AtomicBool,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// The current confirm-mode publisher (replaced on reconnect; None while disconnected).
    pub(crate) publisher: RwLock<Option<Arc<Publisher>>>,
    pub(crate) metrics: Arc<Metrics>,
    /// Memory-aware admission (`--memory-limit`).
    pub(crate) memory: Arc<crate::memory::MemoryGate>,
}

impl Shared {
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The claims of the jobs running here (to release them after the grace period).
    pub(crate) fn inflight_jobs(&self) -> Vec<ClaimedJob> {
        self.inflight.jobs()
    }

    pub(crate) fn inflight_ids(&self) -> Vec<Uuid> {
        self.inflight.ids()
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
                Ok(v) => return Ok(v),
                Err(e) if e.is_connection() => {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(key: &str) -> ClaimedJob {
        ClaimedJob {
            id: Uuid::new_v4(),
            key: key.into(),
            pipeline: "noop".into(),
            params: serde_json::json!({}),
            batch_size: None,
            attempt: 1,
            max_attempts: 5,
            batches_done: 0,
            trace_id: None,
            timeout_secs: None,
        }
    }

    #[test]
    fn a_poisoned_lock_still_registers_and_renews() {
        let map = Arc::new(InflightMap::default());
        let first = job("a");
        map.insert(first.clone(), Arc::new(AtomicBool::new(false)));
        let poisoner = map.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = poisoner.map();
            panic!("a task panics while holding the in-flight lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(map.0.is_poisoned());
        let second = job("b");
        let cancel = Arc::new(AtomicBool::new(false));
        assert_eq!(map.insert(second.clone(), cancel.clone()), 2);
        let mut ids = map.ids();
        ids.sort();
        let mut want = vec![first.id, second.id];
        want.sort();
        assert_eq!(ids, want, "the heartbeat must see both jobs");
        map.cancel(&[second.id]);
        assert!(cancel.load(Ordering::SeqCst));
        assert_eq!(map.remove(&first.id), 1);
    }
}
