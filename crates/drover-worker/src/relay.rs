//! The relay: publishes from the ledger what is due and not yet on the broker — retries
//! whose delay is over, jobs enqueued in SQL, jobs whose producer never got a confirm.

use crate::shared::Shared;
use drover_broker::OutgoingJob;
use std::sync::Arc;
use tracing::{debug, info, warn};

/// How long a job recorded by a producer that publishes it itself may stay unconfirmed
/// before the relay publishes it instead (its producer likely crashed in between).
const ORPHAN_GRACE_SECS: f64 = 30.0;

/// Jobs locked and published per relay round trip.
const SWEEP_LIMIT: i64 = 500;

/// Re-publishes due retries, jobs enqueued in SQL (`drover.enqueue`) and jobs whose producer
/// never got a confirm. Every worker runs it; `FOR UPDATE SKIP LOCKED` splits the work
/// between replicas.
///
/// It sweeps every `relay_interval`, and at once when an enqueueing transaction commits
/// (LISTEN on the ledger's enqueue channel). The periodic sweep is the fallback: a lost
/// notification, or a LISTEN connection that is down, only delays a job by one interval.
pub(crate) async fn relay_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.relay_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut listener: Option<sqlx::postgres::PgListener> = None;
    loop {
        if listener.is_none() {
            // LISTEN before sweeping, so a commit between the sweep and the wait still wakes
            // the next one.
            listener = match shared.ledger.enqueue_listener().await {
                Ok(l) => Some(l),
                Err(e) => {
                    debug!(error = %e, "LISTEN for enqueued jobs unavailable; sweeping periodically");
                    None
                }
            };
        }
        sweep(&shared).await;
        let woke = match listener.as_mut() {
            Some(l) => tokio::select! {
                _ = tick.tick() => Ok(()),
                n = l.try_recv() => n.map(|_| ()),
            },
            None => {
                tick.tick().await;
                Ok(())
            }
        };
        match woke {
            Ok(()) => {
                // One sweep covers every notification that arrived meanwhile.
                if let Some(l) = listener.as_mut() {
                    while l.next_buffered().is_some() {}
                }
            }
            Err(e) => {
                debug!(error = %e, "LISTEN connection for enqueued jobs lost; reconnecting");
                listener = None;
                tick.tick().await;
            }
        }
    }
}

/// Publishes everything that is due now, [`SWEEP_LIMIT`] jobs at a time.
async fn sweep(shared: &Shared) {
    let Some(publisher) = shared.publisher().await else {
        return;
    };
    loop {
        let sweep = match shared
            .ledger
            .relay_sweep(SWEEP_LIMIT, ORPHAN_GRACE_SECS)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "relay sweep failed");
                return;
            }
        };
        if sweep.due.is_empty() {
            return;
        }
        let full = sweep.due.len() as i64 == SWEEP_LIMIT;
        // A row whose params are not an object is not published (rescue::due_message says
        // so in the log); the ledger's CHECKs and drover.enqueue() keep the rest valid.
        let out: Vec<OutgoingJob> = sweep
            .due
            .iter()
            .filter_map(crate::rescue::due_message)
            .collect();
        // Jobs enqueued in SQL without max_attempts get this worker's resolution (the
        // pipeline's default, else the configured one) before their first attempt.
        let limits: Vec<(uuid::Uuid, i32)> = sweep
            .due
            .iter()
            .filter(|d| d.max_attempts_default && d.attempts == 0)
            .filter_map(|d| {
                let n = shared
                    .registry
                    .default_max_attempts(&d.pipeline)
                    .unwrap_or(shared.config.max_attempts);
                i32::try_from(n)
                    .ok()
                    .filter(|n| *n != d.max_attempts)
                    .map(|n| (d.id, n))
            })
            .collect();
        let mut sweep = sweep;
        let lag = sweep.due.iter().map(|d| d.overdue_secs).fold(0.0, f64::max);
        match publisher.publish_jobs(&out).await {
            Ok(()) => match async {
                sweep.resolve_max_attempts(&limits).await?;
                sweep.commit().await
            }
            .await
            {
                Ok(()) => {
                    shared.metrics.relayed(out.len(), lag);
                    info!(jobs = out.len(), max_lag_secs = lag, "relayed due jobs");
                }
                Err(e) => {
                    warn!(error = %e, "relay commit failed; the jobs will be published again")
                }
            },
            Err(e) => {
                warn!(error = %e, "relay publish failed; will retry");
                return;
            }
        }
        if !full {
            return;
        }
    }
}
