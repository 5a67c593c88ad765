//! The rescuer: re-drives work from the ledger, whatever the broker does.
//!
//! Every worker runs it once per heartbeat period; the ledger's `FOR UPDATE SKIP LOCKED`
//! splits the work between replicas without a leader.
//!
//! - A `running` job whose heartbeat is older than two periods lost its worker (dead, frozen
//!   or cut off): [`Ledger::rescue_stale`](drover_ledger::Ledger::rescue_stale) makes it a
//!   retry due now and the relay publishes it, so another worker runs it within about three
//!   periods of the last heartbeat. Deliveries are acked at claim, so no broker redelivery
//!   would ever bring such a job back: this is the only path, and it is the same for a
//!   worker killed, frozen, or partitioned away.
//! - A job `queued` for longer than `lost_after` while `{ns}.jobs` holds no ready message
//!   has lost its message (a purged queue, a dead-lettered poison message): it is published
//!   again. A duplicate (its message was still buffered by a busy worker) is harmless.

use crate::shared::Shared;
use drover_broker::OutgoingJob;
use drover_core::JobMessage;
use drover_ledger::{ClaimedJob, DueJob};
use serde_json::Value;
use std::sync::Arc;
use tracing::{debug, info, warn};
use uuid::Uuid;

/// Most stale jobs re-driven per sweep (the next sweep takes the rest).
const RESCUE_BATCH: i64 = 500;

/// Re-drives expired leases and lost messages every heartbeat period until aborted.
pub(crate) async fn rescue_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        rescue_stale(&shared).await;
        rescue_lost(&shared).await;
    }
}

/// One sweep of expired leases.
async fn rescue_stale(shared: &Shared) {
    match shared
        .ledger
        .rescue_stale(shared.config.heartbeat * 2, RESCUE_BATCH)
        .await
    {
        Ok(rescued) => {
            for r in &rescued {
                warn!(key = %r.idempotency_key, owner = r.lost_owner.as_deref().unwrap_or(""),
                    heartbeat_at = ?r.heartbeat_at, state = %r.state,
                    "lease expired: its worker stopped heartbeating; re-driving the job from the ledger");
            }
            shared.metrics.rescued(rescued.len());
        }
        Err(e) => debug!(error = %e, "rescue sweep failed"),
    }
}

/// Publishes again the queued jobs whose message is gone. Asks the ledger first (cheap, and
/// nothing to do on a healthy system), the broker only when some job has waited too long.
async fn rescue_lost(shared: &Shared) {
    let lost_after = shared.config.lost_after;
    let waiting = match shared
        .ledger
        .drift(lost_after, lost_after, lost_after)
        .await
    {
        Ok(d) => d.queued_long,
        Err(e) => {
            debug!(error = %e, "lost-message check failed");
            return;
        }
    };
    if waiting == 0 {
        return;
    }
    let Some(publisher) = shared.publisher().await else {
        return;
    };
    let name = format!("{}-rescuer", shared.config.worker_id);
    let depth = match shared.addresses.connect(&name).await {
        Ok(b) => {
            let depth = b.queue_depth(&shared.topo.jobs_queue()).await;
            if let Err(e) = b.close().await {
                debug!(error = %e, "closing the rescuer's broker connection");
            }
            depth
        }
        Err(e) => Err(e),
    };
    let ready = match depth {
        Ok(d) => d.ready,
        Err(e) => {
            debug!(error = %e, "could not inspect the work queue");
            return;
        }
    };
    if ready > 0 {
        // Messages are still waiting: these jobs are behind them, not lost.
        return;
    }
    let sweep = match shared.ledger.lost_sweep(lost_after, RESCUE_BATCH).await {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "lost-message sweep failed");
            return;
        }
    };
    if sweep.due.is_empty() {
        return;
    }
    let out: Vec<OutgoingJob> = sweep.due.iter().filter_map(due_message).collect();
    let keys: Vec<String> = sweep
        .due
        .iter()
        .map(|d| d.idempotency_key.clone())
        .collect();
    match publisher.publish_jobs(&out).await {
        Ok(()) => match sweep.commit().await {
            Ok(()) => {
                shared.metrics.republished(out.len());
                warn!(
                    jobs = out.len(),
                    ?keys,
                    lost_after_secs = lost_after.as_secs(),
                    "queued jobs had no message in the queue; published them again"
                );
            }
            Err(e) => {
                warn!(error = %e, "lost-message commit failed; the next sweep publishes them again")
            }
        },
        Err(e) => warn!(error = %e, "could not publish lost messages; will retry"),
    }
}

/// The message that re-drives a job from its ledger row (a due retry, a rescued or lost
/// job), with a `traceparent` that continues the job's trace; `None` (logged) for a row whose
/// params are not a JSON object, which no valid message produces. `drover doctor --fix`
/// publishes with it too.
pub fn due_message(d: &DueJob) -> Option<OutgoingJob> {
    let params = match &d.params.0 {
        Value::Object(m) => m.clone(),
        other => {
            warn!(key = %d.idempotency_key, params = %other, "ledger row's params are not a JSON object; not publishing it");
            return None;
        }
    };
    let msg = JobMessage {
        v: drover_core::message::CONTRACT_VERSION,
        idempotency_key: d.idempotency_key.clone(),
        pipeline: d.pipeline.clone(),
        params,
        batch_size: d.batch_size.and_then(|b| u32::try_from(b).ok()),
        // A request that named no limit is published without one, as it was made.
        max_attempts: if d.max_attempts_default {
            None
        } else {
            u32::try_from(d.max_attempts).ok()
        },
        // Due now: published by the relay only once its time has come.
        run_at: None,
        timeout_secs: d.timeout_secs.and_then(|t| u32::try_from(t).ok()),
    };
    Some(OutgoingJob::new(
        d.id,
        &msg,
        traceparent(d.trace_id.as_deref(), d.id),
    ))
}

/// The message of a job this worker held, to give it back to the queue.
pub(crate) fn outgoing_held(job: &ClaimedJob) -> Option<OutgoingJob> {
    let params = match &job.params {
        Value::Object(m) => m.clone(),
        other => {
            warn!(key = %job.key, params = %other, "job's params are not a JSON object; not publishing it");
            return None;
        }
    };
    let msg = JobMessage {
        v: drover_core::message::CONTRACT_VERSION,
        idempotency_key: job.key.clone(),
        pipeline: job.pipeline.clone(),
        params,
        batch_size: job.batch_size.and_then(|b| u32::try_from(b).ok()),
        max_attempts: u32::try_from(job.max_attempts).ok(),
        run_at: None,
        timeout_secs: job.timeout_secs.and_then(|t| u32::try_from(t).ok()),
    };
    Some(OutgoingJob::new(
        job.id,
        &msg,
        traceparent(job.trace_id.as_deref(), job.id),
    ))
}

/// A W3C `traceparent` continuing trace `trace_id` (the producer's, stored on the job row),
/// so a retried, rescued or released job's next attempt stays in the producer's trace. The
/// parent span id is derived from the job id: the message is published by the ledger's
/// relay, not inside a span of the producer's.
pub(crate) fn traceparent(trace_id: Option<&str>, job_id: Uuid) -> Option<String> {
    let t = trace_id?;
    let valid = t.len() == 32
        && t.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && t.bytes().any(|b| b != b'0');
    if !valid {
        return None;
    }
    let id = job_id.simple().to_string();
    let span = if id[..16].bytes().all(|b| b == b'0') {
        "0000000000000001".to_string()
    } else {
        id[..16].to_string()
    };
    Some(format!("00-{t}-{span}-01"))
}

/// Gives jobs this worker released (drain, grace expiry, a ledger error mid-job) back to the
/// queue: their deliveries were acked at claim. If the broker is away, the rescuer's
/// lost-message sweep publishes them once the queue has no ready message and they have
/// waited `lost_after`.
pub(crate) async fn republish(shared: &Shared, jobs: &[ClaimedJob]) {
    if jobs.is_empty() {
        return;
    }
    let Some(publisher) = shared.publisher().await else {
        warn!(
            jobs = jobs.len(),
            "no broker connection: the rescuer publishes the released jobs once it is back"
        );
        return;
    };
    let out: Vec<OutgoingJob> = jobs.iter().filter_map(outgoing_held).collect();
    match publisher.publish_jobs(&out).await {
        Ok(()) => info!(jobs = out.len(), "released jobs published again"),
        Err(e) => {
            warn!(error = %e, "could not publish released jobs; the rescuer publishes them later")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_continues_the_stored_trace() {
        let id = Uuid::parse_str("0af7651916cd43dd8448eb211c80319c").expect("uuid");
        let tp = traceparent(Some("4bf92f3577b34da6a3ce929d0e0e4736"), id);
        assert_eq!(
            tp.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0af7651916cd43dd-01")
        );
        assert_eq!(traceparent(None, id), None);
        assert_eq!(
            traceparent(Some("00000000000000000000000000000000"), id),
            None
        );
        assert_eq!(traceparent(Some("not-hex"), id), None);
    }
}
