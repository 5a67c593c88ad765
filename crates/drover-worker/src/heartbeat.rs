//! Lease renewal for in-flight jobs, and operator cancellation.

use crate::shared::{DbStop, Disposition, Shared, reconnect_backoff};
use backoff::backoff::Backoff;
use drover_broker::{Broker, Incoming, OutgoingJob};
use drover_core::JobMessage;
use drover_ledger::{
    BatchRecord, Claim, ClaimedJob, Completion, FailOutcome, HeldEnd, LeaseSeen,
};
use drover_pipeline::{BatchOutcome, JobRun, JobSpec, PipelineError, Registry};
use serde_json::Value;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};
use uuid::Uuid;

/// Renews the leases of in-flight jobs and picks up operator cancellations.
pub(crate) async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ids = shared.inflight_ids();
        if ids.is_empty() {
            continue;
        }
        match shared
            .ledger
            .heartbeat(&shared.config.worker_id, &ids)
            .await
        {
            Ok(cancelled) => {
                if let Ok(map) = shared.inflight.lock() {
                    for id in cancelled {
                        if let Some(i) = map.get(&id) {
                            i.cancel.store(true, Ordering::SeqCst);
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, jobs = ids.len(), "heartbeat failed"),
        }
    }
}
