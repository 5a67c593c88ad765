//! One delivery: parse, validate, claim (fast or slow path), run, settle.

use crate::attempt::run_attempt;
use crate::memory::Admission;
use crate::shared::{DbStop, Disposition, Shared};
use drover_broker::Incoming;
use drover_core::JobMessage;
use drover_ledger::{Claim, ClaimedJob, LeaseSeen};
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tracing::{Instrument, debug, error, info, info_span, warn};
use uuid::Uuid;

/// Handles one delivery and acks or requeues it.
pub(crate) async fn handle_delivery(shared: Arc<Shared>, delivery: Incoming) {
    let disposition = process(&shared, &delivery).await;
    let result = match disposition {
        Disposition::Ack => delivery.ack().await,
        Disposition::Requeue => delivery.nack_requeue().await,
        Disposition::Settled => Ok(()),
    };
    if let Err(e) = result {
        // The channel is gone; the broker redelivers and the ledger makes that harmless.
        warn!(error = %e, ?disposition, "could not settle delivery");
    }
}

/// Decides a delivery's fate. Never panics and never returns an error: every failure ends in
/// the ledger or back on the queue.
pub(crate) async fn process(shared: &Arc<Shared>, delivery: &Incoming) -> Disposition {
    let msg = match JobMessage::parse(&delivery.body) {
        Ok(m) => m,
        Err(e) => {
            return reject(
                shared,
                delivery,
                e.key.as_deref(),
                e.pipeline.as_deref(),
                None,
                &e.reason,
            )
            .await;
        }
    };
    let params = Value::Object(msg.params.clone());
    let span = info_span!(
        "job",
        key = %msg.idempotency_key,
        pipeline = %msg.pipeline,
        message_id = delivery.message_id.as_deref().unwrap_or(""),
        trace_id = tracing::field::Empty,
    );
    if let Some(tp) = &delivery.traceparent {
        drover_broker::trace::continue_trace(&span, tp);
    }
    let trace_id = drover_broker::trace::trace_id_of(&span);
    if let Some(t) = &trace_id {
        span.record("trace_id", t.as_str());
    }
    async {
        if let Err(e) = shared.registry.validate(&msg.pipeline, &params) {
            return reject(
                shared,
                delivery,
                Some(&msg.idempotency_key),
                Some(&msg.pipeline),
                Some(&params),
                &e.to_string(),
            )
            .await;
        }
        // Memory-aware admission, before any claim: a job that does not fit waits here,
        // unclaimed (see crate::memory). `admission` lives until the job ends.
        let batch_size = msg.batch_size.map_or_else(
            || shared.registry.default_batch_size(&msg.pipeline) as u64,
            u64::from,
        );
        let admit = || shared.memory.admit(&msg.pipeline, batch_size, shared.shutdown.clone());
        let Some(mut admission) = admit().await else {
            return Disposition::Requeue;
        };
        let max_attempts = shared.registry.max_attempts_for(&msg, shared.config.max_attempts) as i32;
        let worker = shared.config.worker_id.clone();
        // Fast path: a plainly claimable job is claimed in a statement shared with the
        // other deliveries arriving now. Anything else is decided one by one below.
        // A delayed job's early message goes to the slow path, which records its time.
        let early = msg.run_at.is_some_and(|t| t > chrono::Utc::now());
        // A pipeline with concurrency limits is claimed under its limit lock, never on the
        // fast path (see drover_ledger::Limits).
        let limits = shared.config.limits.get(&msg.pipeline);
        if !early && limits.is_none() {
            match shared
                .db("claim", || shared.group.claim_ready(msg.idempotency_key.clone()))
                .await
            {
                Ok(Some(job)) => return run_job(shared, timed(shared, job, &msg).await, delivery, admission).await,
                Ok(None) => {}
                Err(DbStop::Shutdown) => return Disposition::Requeue,
                Err(DbStop::Failed(e)) => {
                    error!(error = %e, "claim failed; requeueing");
                    return Disposition::Requeue;
                }
            }
        }
        let mut takeover: Option<LeaseSeen> = None;
        loop {
            let claim = shared
                .db("claim", || async {
                    match limits {
                        Some(l) => shared.ledger.claim_limited(&msg, max_attempts, &worker, trace_id.as_deref(), takeover.as_ref(), l).await,
                        None => shared.ledger.claim(&msg, max_attempts, &worker, trace_id.as_deref(), takeover.as_ref()).await,
                    }
                })
                .await;
            let claim = match claim {
                Ok(c) => c,
                Err(DbStop::Shutdown) => return Disposition::Requeue,
                Err(DbStop::Failed(e)) => {
                    error!(error = %e, "claim failed; requeueing");
                    return Disposition::Requeue;
                }
            };
            match claim {
                Claim::Done { state } => {
                    shared.metrics.job(&msg.pipeline, "duplicate");
                    info!(state = %state, "job already finished; acking duplicate delivery");
                    return Disposition::Ack;
                }
                Claim::NotDue { run_at } => {
                    info!(run_at = ?run_at, "job is not due yet; the ledger holds its time and the relay publishes it then");
                    return Disposition::Ack;
                }
                Claim::HeldBack { run_at, limit } => {
                    shared.metrics.job(&msg.pipeline, "held_back");
                    info!(%run_at, %limit, "concurrency limit reached: job held back (no attempt counted); the relay publishes it again at run_at");
                    return Disposition::Ack;
                }
                Claim::Held { id, seen } => {
                    let ours = seen.owner.as_deref() == Some(worker.as_str())
                        || shared.inflight.contains(&id);
                    if ours {
                        info!("job is running here already; acking duplicate delivery");
                        return Disposition::Ack;
                    }
                    // Running elsewhere: no memory is reserved here while the lease is
                    // watched (up to two heartbeat periods); admitted again if it is ours.
                    drop(std::mem::replace(&mut admission, Admission::Unlimited));
                    match watch_lease(shared, id, &seen).await {
                        LeaseWatch::Alive => {
                            info!(owner = ?seen.owner, "job is running on a live worker; acking duplicate delivery");
                            return Disposition::Ack;
                        }
                        LeaseWatch::Changed => takeover = None,
                        LeaseWatch::Stale => {
                            warn!(owner = ?seen.owner, heartbeat_at = ?seen.heartbeat_at,
                                "lease expired: owner stopped heartbeating; taking the job over");
                            takeover = Some(seen);
                        }
                        LeaseWatch::Shutdown => return Disposition::Requeue,
                    }
                    admission = match admit().await {
                        Some(a) => a,
                        None => return Disposition::Requeue,
                    };
                }
                Claim::Run(job) => return run_job(shared, timed(shared, job, &msg).await, delivery, admission).await,
            }
        }
    }
    .instrument(span)
    .await
}

/// The claimed job with the message's attempt timeout, recorded in the ledger when the row
/// lacks it (a producer's insert does not store it) so re-published messages carry it too.
async fn timed(shared: &Shared, mut job: ClaimedJob, msg: &JobMessage) -> ClaimedJob {
    let Some(secs) = msg.timeout_secs else {
        return job;
    };
    match i32::try_from(secs) {
        Ok(secs) if job.timeout_secs != Some(secs) => {
            job.timeout_secs = Some(secs);
            if let Err(e) = shared.ledger.record_timeout(job.id, secs).await {
                warn!(error = %e, "could not record the job's timeout_secs; a retry's message may lack it");
            }
        }
        Ok(_) => {}
        Err(_) => warn!(timeout_secs = secs, "timeout_secs out of range; ignored"),
    }
    job
}

/// Result of watching another worker's lease.
pub(crate) enum LeaseWatch {
    /// The heartbeat advanced: the owner is alive.
    Alive,
    /// The job left `running` (finished, released): decide again.
    Changed,
    /// Two heartbeat periods passed without a renewal: the owner is dead.
    Stale,
    Shutdown,
}

/// Watches a lease for at most two heartbeat periods.
pub(crate) async fn watch_lease(shared: &Shared, id: Uuid, seen: &LeaseSeen) -> LeaseWatch {
    let deadline = tokio::time::Instant::now() + shared.config.heartbeat * 2;
    let step = (shared.config.heartbeat / 4).max(Duration::from_millis(100));
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = shutdown.changed() => return LeaseWatch::Shutdown,
        }
        match shared.db("lease", || shared.ledger.lease(id)).await {
            Ok(now) if now.state != drover_core::JobState::Running => return LeaseWatch::Changed,
            Ok(now) if now.heartbeat_at != seen.heartbeat_at || now.owner != seen.owner => {
                return LeaseWatch::Alive;
            }
            Ok(_) => {}
            Err(_) => return LeaseWatch::Shutdown,
        }
        if tokio::time::Instant::now() >= deadline {
            return LeaseWatch::Stale;
        }
    }
}

/// Records an invalid message: `rejected` in the ledger when it has a usable key, a copy in
/// `{ns}.dead` with the reason, and an ack.
pub(crate) async fn reject(
    shared: &Shared,
    delivery: &Incoming,
    key: Option<&str>,
    pipeline: Option<&str>,
    params: Option<&Value>,
    reason: &str,
) -> Disposition {
    warn!(key = key.unwrap_or(""), reason, "rejecting invalid message");
    shared.metrics.job(pipeline.unwrap_or(""), "rejected");
    if let Some(k) = key {
        match shared
            .db("reject", || {
                shared.ledger.reject_message(k, pipeline, params, reason)
            })
            .await
        {
            Ok(_) => {}
            Err(DbStop::Shutdown) => return Disposition::Requeue,
            Err(DbStop::Failed(e)) => warn!(error = %e, "could not record the rejection"),
        }
    }
    dead_letter(
        shared,
        &delivery.body,
        delivery.message_id.as_deref(),
        key,
        reason,
    )
    .await;
    Disposition::Ack
}

/// Copies a message to `{ns}.dead` with the reason in a header.
pub(crate) async fn dead_letter(
    shared: &Shared,
    body: &[u8],
    message_id: Option<&str>,
    key: Option<&str>,
    reason: &str,
) {
    match shared.publisher().await {
        Some(p) => {
            if let Err(e) = p.publish_dead(body, message_id, key, reason).await {
                warn!(error = %e, "could not copy the message to the dead-letter queue");
            }
        }
        None => warn!("no broker connection; message not copied to the dead-letter queue"),
    }
}

/// Runs a claimed job: registers it as in flight, acks its delivery, runs the attempt,
/// unregisters it, and publishes the job again if the attempt gave it back.
///
/// The delivery is acked as soon as the job is claimed: from then on the ledger holds the
/// job (its lease, and the rescuer that re-drives it when the lease expires), so the broker
/// need not hold the message, and a job may run longer than RabbitMQ's `consumer_timeout`
/// (which closes the channel of a delivery left unacked that long). The worker's
/// concurrency is bounded by its job slots instead of the unacked count (see `consume`).
///
/// `admission` holds the job's memory reservation until the attempt ends; a job that can
/// never fit under `--memory-limit` is failed permanently with the reason instead of run.
pub(crate) async fn run_job(
    shared: &Arc<Shared>,
    job: ClaimedJob,
    delivery: &Incoming,
    admission: Admission,
) -> Disposition {
    let cancel = Arc::new(AtomicBool::new(false));
    let running = shared.inflight.insert(job.clone(), cancel.clone());
    shared.metrics.set_in_flight(running);
    if let Err(e) = delivery.ack().await {
        // The channel is gone and the broker redelivers the message: the copy finds the job
        // running here with a live lease and is acked then.
        warn!(error = %e, "could not ack the delivery at claim");
    }
    let span = info_span!(
        "attempt",
        attempt = job.attempt,
        resume_after = job.batches_done
    );
    let started = std::time::Instant::now();
    let d = match &admission {
        Admission::NeverFits(reason) => {
            crate::attempt::failed(
                shared,
                &job,
                drover_pipeline::PipelineError::permanent(reason.clone()),
                delivery,
            )
            .instrument(span)
            .await
        }
        Admission::Unlimited | Admission::Admitted(_) => {
            run_attempt(shared, &job, &cancel, delivery)
                .instrument(span)
                .await
        }
    };
    // The reservation ends with the attempt.
    drop(admission);
    let running = shared.inflight.remove(&job.id);
    shared.metrics.set_in_flight(running);
    shared
        .metrics
        .duration(&job.pipeline, started.elapsed().as_secs_f64());
    debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        ?d,
        "attempt over"
    );
    if d == Disposition::Requeue {
        // Released (drain, or a ledger error mid-job): the acked message is gone.
        crate::rescue::republish(shared, std::slice::from_ref(&job)).await;
    }
    Disposition::Settled
}
