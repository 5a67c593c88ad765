//! Memory-aware admission (`drover worker --memory-limit`): a delivery is claimed only while
//! the worker's memory plus the job's estimate stays under the limit.
//!
//! * **Measured**: the process's resident set (`VmRSS` of `/proc/self/status`), sampled at
//!   every decision.
//! * **Estimate** of a job: its batch size (the message's, else the pipeline's default) times
//!   the pipeline's bytes per row: `--memory-per-row PIPELINE=SIZE` when the operator set
//!   one; else learned from this worker's earlier batches of the pipeline (the most frame
//!   bytes per input row a batch of the last job took, input plus output frame, times
//!   [`BATCHES_IN_MEMORY`]: a job holds the batch it transforms and the parts it writes);
//!   else [`DEFAULT_BYTES_PER_ROW`] times the same factor.
//! * **Committed** memory: the larger of the measured RSS and the RSS this worker had when
//!   it last ran nothing plus the estimates of the jobs it runs now. A running job keeps its
//!   estimate reserved until it ends: a batched job's memory rises and falls with each batch,
//!   so a sample taken between two batches would count it as nearly nothing and let a second
//!   job into the same headroom.
//! * **Admitted** when the worker runs nothing (waiting could not lower its idle RSS), or
//!   when committed plus the estimate stays under the limit. Otherwise the delivery waits
//!   here, unacked and unclaimed (no attempt counted, its job `queued` in the ledger),
//!   until a job of this worker ends or its RSS drops; the wait always ends, because once
//!   the worker's own jobs are over it runs nothing. Waiting in the worker, rather than
//!   holding the job back in the ledger as concurrency limits do, admits it the moment
//!   memory is free and in arrival order, with no relay round trip.
//! * A job whose estimate alone is over the limit can never run here: it is claimed and
//!   failed permanently (`dead`) with the estimate, the limit and what to change.

use crate::metrics::Metrics;
use bytesize::ByteSize;
use drover_pipeline::BATCHES_IN_MEMORY;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tracing::info;

/// Frame bytes per input row assumed for a pipeline before this worker has measured one of
/// its batches (times [`BATCHES_IN_MEMORY`], 4 KiB per row of the batch size): generous
/// for the narrow tables drover's pipelines read (a payroll batch's input and output frames
/// take about 200 per row).
pub const DEFAULT_BYTES_PER_ROW: u64 = 1024;

/// How often a waiting delivery samples the RSS again when no job of this worker ended.
const RESAMPLE: Duration = Duration::from_millis(250);

/// The process's resident memory in bytes (`None` where `/proc` is not available: then
/// only the estimates count).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A job's memory estimate and where its bytes per row came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Estimate {
    pub(crate) bytes: u64,
    pub(crate) rows: u64,
    pub(crate) per_row: u64,
    pub(crate) source: &'static str,
}

impl Estimate {
    fn describe(&self) -> String {
        format!(
            "{} ({} rows per batch x {} per row, {})",
            ByteSize(self.bytes),
            self.rows,
            ByteSize(self.per_row),
            self.source
        )
    }
}

/// What admission decided for a delivery.
pub(crate) enum Admission {
    /// No `--memory-limit`: nothing is counted.
    Unlimited,
    /// Admitted; the job's estimate stays reserved until the ticket is dropped.
    Admitted(#[allow(dead_code, reason = "held for its Drop, which ends the reservation")] Ticket),
    /// The estimate alone is over the limit: the reason to fail the job with.
    NeverFits(String),
}

/// A reservation of a job's estimate, released when dropped (the job ended, or its
/// delivery turned out to need no run).
pub(crate) struct Ticket {
    gate: Arc<MemoryGate>,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.release(self.id);
    }
}

#[derive(Default)]
struct GateState {
    /// All-in bytes per row learned per pipeline.
    learned: HashMap<String, u64>,
    /// Estimates of admitted jobs, by ticket.
    reserved: HashMap<u64, u64>,
    next_ticket: u64,
    /// RSS when the worker last ran nothing.
    idle_rss: u64,
    /// Deliveries waiting for memory now.
    waiting: i64,
}

/// Admission state shared by every delivery of a worker.
pub(crate) struct MemoryGate {
    limit: Option<u64>,
    pinned: BTreeMap<String, u64>,
    state: Mutex<GateState>,
    freed: Notify,
    rss: fn() -> Option<u64>,
    metrics: Arc<Metrics>,
}

/// Whether a job estimated at `estimate` fits now. `running`: jobs holding a reservation.
pub(crate) fn fits(
    limit: u64,
    rss: u64,
    idle_rss: u64,
    reserved: u64,
    running: usize,
    estimate: u64,
) -> bool {
    if running == 0 {
        return estimate <= limit;
    }
    let committed = rss.max(idle_rss.saturating_add(reserved));
    committed.saturating_add(estimate) <= limit
}

impl MemoryGate {
    pub(crate) fn new(
        limit: Option<u64>,
        pinned: BTreeMap<String, u64>,
        metrics: Arc<Metrics>,
    ) -> Arc<MemoryGate> {
        MemoryGate::with_rss(limit, pinned, metrics, resident_bytes)
    }

    pub(crate) fn with_rss(
        limit: Option<u64>,
        pinned: BTreeMap<String, u64>,
        metrics: Arc<Metrics>,
        rss: fn() -> Option<u64>,
    ) -> Arc<MemoryGate> {
        let limit = limit.filter(|l| *l > 0);
        metrics.memory_limit(limit.unwrap_or(0));
        for (pipeline, per_row) in &pinned {
            metrics.memory_per_row(pipeline, *per_row);
        }
        Arc::new(MemoryGate {
            limit,
            pinned,
            state: Mutex::new(GateState {
                idle_rss: rss().unwrap_or(0),
                ..GateState::default()
            }),
            freed: Notify::new(),
            rss,
            metrics,
        })
    }

    fn state(&self) -> MutexGuard<'_, GateState> {
        // Only single inserts, removes and counters change under the lock: never half done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A job's estimate: `batch_size` rows times the pipeline's bytes per row.
    pub(crate) fn estimate(&self, pipeline: &str, batch_size: u64) -> Estimate {
        let (per_row, source) = match self.pinned.get(pipeline) {
            Some(p) => (*p, "--memory-per-row"),
            None => match self.state().learned.get(pipeline) {
                Some(l) => (*l, "learned from earlier batches"),
                None => (
                    DEFAULT_BYTES_PER_ROW * BATCHES_IN_MEMORY,
                    "default before any batch of the pipeline ran here",
                ),
            },
        };
        Estimate {
            bytes: per_row.saturating_mul(batch_size),
            rows: batch_size,
            per_row,
            source,
        }
    }

    /// Records what a batch of `pipeline` took: `frame_bytes_per_row` as measured by the
    /// pipeline runner, so the next job's estimate is this times [`BATCHES_IN_MEMORY`].
    pub(crate) fn learn(&self, pipeline: &str, frame_bytes_per_row: u64) {
        if self.limit.is_none() || self.pinned.contains_key(pipeline) {
            return;
        }
        let per_row = frame_bytes_per_row.max(1).saturating_mul(BATCHES_IN_MEMORY);
        self.state().learned.insert(pipeline.to_string(), per_row);
        self.metrics.memory_per_row(pipeline, per_row);
    }

    /// Decides a delivery of `pipeline` with `batch_size` rows per batch, waiting while it
    /// does not fit. `None` when the worker shut down meanwhile.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        pipeline: &str,
        batch_size: u64,
        mut shutdown: watch::Receiver<bool>,
    ) -> Option<Admission> {
        let Some(limit) = self.limit else {
            return Some(Admission::Unlimited);
        };
        let mut waiting = false;
        loop {
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            // Estimated again each round: a batch that ended meanwhile may have taught more.
            let estimate = self.estimate(pipeline, batch_size);
            if estimate.bytes > limit {
                if waiting {
                    self.stop_waiting();
                }
                let pinned = estimate.source == "--memory-per-row";
                return Some(Admission::NeverFits(format!(
                    "memory: the job's estimate {} exceeds this worker's --memory-limit {}, so it can never run here; raise --memory-limit or lower the job's batch_size{}",
                    estimate.describe(),
                    ByteSize(limit),
                    if pinned {
                        format!(" (or --memory-per-row {pipeline}=...)")
                    } else {
                        String::new()
                    }
                )));
            }
            let rss = (self.rss)().unwrap_or(0);
            {
                let mut s = self.state();
                let reserved: u64 = s.reserved.values().sum();
                if fits(
                    limit,
                    rss,
                    s.idle_rss,
                    reserved,
                    s.reserved.len(),
                    estimate.bytes,
                ) {
                    let id = s.next_ticket;
                    s.next_ticket += 1;
                    s.reserved.insert(id, estimate.bytes);
                    if waiting {
                        s.waiting -= 1;
                    }
                    self.metrics
                        .memory_state(rss, reserved + estimate.bytes, s.waiting);
                    if waiting {
                        info!(estimate = %estimate.describe(), rss = %ByteSize(rss), "memory free: job admitted");
                    }
                    return Some(Admission::Admitted(Ticket {
                        gate: self.clone(),
                        id,
                    }));
                }
                if !waiting {
                    waiting = true;
                    s.waiting += 1;
                    self.metrics.memory_state(rss, reserved, s.waiting);
                    self.metrics.job(pipeline, "waited_for_memory");
                    info!(
                        estimate = %estimate.describe(),
                        rss = %ByteSize(rss),
                        reserved = %ByteSize(reserved),
                        running = s.reserved.len(),
                        limit = %ByteSize(limit),
                        "not enough memory under --memory-limit: job waits (unclaimed, no attempt counted) until a job here ends"
                    );
                }
            }
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep(RESAMPLE) => {}
                _ = shutdown.changed() => {
                    self.stop_waiting();
                    return None;
                }
            }
        }
    }

    fn stop_waiting(&self) {
        let mut s = self.state();
        s.waiting -= 1;
        let reserved = s.reserved.values().sum();
        self.metrics
            .memory_state((self.rss)().unwrap_or(0), reserved, s.waiting);
    }

    fn release(&self, id: u64) {
        let rss = (self.rss)().unwrap_or(0);
        {
            let mut s = self.state();
            s.reserved.remove(&id);
            if s.reserved.is_empty() {
                s.idle_rss = rss;
            }
            let reserved = s.reserved.values().sum();
            self.metrics.memory_state(rss, reserved, s.waiting);
        }
        self.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn an_idle_worker_admits_anything_under_the_limit_whatever_its_rss() {
        assert!(fits(100 * MIB, 500 * MIB, 500 * MIB, 0, 0, 90 * MIB));
        assert!(!fits(100 * MIB, 0, 0, 0, 0, 101 * MIB));
    }

    #[test]
    fn a_running_job_counts_at_its_estimate_or_the_rss_whichever_is_more() {
        // Idle 10 MiB + a 60 MiB reservation + 60 MiB: over 100 MiB.
        assert!(!fits(100 * MIB, 20 * MIB, 10 * MIB, 60 * MIB, 1, 60 * MIB));
        // A 20 MiB job fits beside it.
        assert!(fits(100 * MIB, 20 * MIB, 10 * MIB, 60 * MIB, 1, 20 * MIB));
        // The RSS grew past the estimate: it counts instead.
        assert!(!fits(100 * MIB, 90 * MIB, 10 * MIB, 60 * MIB, 1, 20 * MIB));
    }

    fn fixed_rss() -> Option<u64> {
        Some(10 * MIB)
    }

    fn gate(limit: u64) -> Arc<MemoryGate> {
        MemoryGate::with_rss(
            Some(limit),
            BTreeMap::from([("pinned".to_string(), MIB)]),
            Arc::new(Metrics::new()),
            fixed_rss,
        )
    }

    #[test]
    fn the_estimate_is_pinned_then_learned_then_the_default() {
        let g = gate(GIB);
        assert_eq!(g.estimate("pinned", 100).bytes, 100 * MIB);
        let d = g.estimate("payroll", 1000);
        assert_eq!(d.per_row, DEFAULT_BYTES_PER_ROW * BATCHES_IN_MEMORY);
        g.learn("payroll", 150);
        assert_eq!(
            g.estimate("payroll", 1000).bytes,
            150 * BATCHES_IN_MEMORY * 1000
        );
        g.learn("pinned", 1);
        assert_eq!(g.estimate("pinned", 100).bytes, 100 * MIB);
    }

    const GIB: u64 = 1024 * MIB;

    #[tokio::test]
    async fn a_second_job_waits_until_the_first_ends() {
        let g = gate(150 * MIB);
        let (_tx, rx) = watch::channel(false);
        let Some(Admission::Admitted(first)) = g.admit("pinned", 100, rx.clone()).await else {
            panic!("the first job fits an idle worker");
        };
        let g2 = g.clone();
        let rx2 = rx.clone();
        let second = tokio::spawn(async move { g2.admit("pinned", 100, rx2).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !second.is_finished(),
            "admitted into the first job's headroom"
        );
        assert_eq!(g.state().waiting, 1);
        drop(first);
        let admitted = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("admitted once the first ended")
            .expect("task");
        assert!(matches!(admitted, Some(Admission::Admitted(_))));
        assert_eq!(g.state().waiting, 0);
    }

    #[tokio::test]
    async fn a_job_over_the_limit_never_fits_and_says_what_to_change() {
        let g = gate(150 * MIB);
        let (_tx, rx) = watch::channel(false);
        let Some(Admission::NeverFits(reason)) = g.admit("pinned", 200, rx).await else {
            panic!("200 MiB cannot fit 150 MiB");
        };
        assert!(reason.contains("--memory-limit 150.0 MiB"), "{reason}");
        assert!(reason.contains("200.0 MiB"), "{reason}");
        assert!(reason.contains("batch_size"), "{reason}");
    }

    #[tokio::test]
    async fn shutdown_ends_a_wait() {
        let g = gate(150 * MIB);
        let (tx, rx) = watch::channel(false);
        let Some(Admission::Admitted(_first)) = g.admit("pinned", 100, rx.clone()).await else {
            panic!("the first job fits");
        };
        let g2 = g.clone();
        let second = tokio::spawn(async move { g2.admit("pinned", 100, rx).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send_replace(true);
        let r = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("shutdown ends the wait")
            .expect("task");
        assert!(r.is_none());
        assert_eq!(g.state().waiting, 0);
    }
}
