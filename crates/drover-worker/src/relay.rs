//! The retry relay: re-publishes due retries from the ledger.

use crate::shared::Shared;
use drover_broker::OutgoingJob;
use drover_core::JobMessage;
use serde_json::Value;
use std::sync::Arc;
use tracing::{debug, info, warn};

/// Re-publishes due retries (and jobs whose producer never got a confirm). Every worker runs
/// it; `FOR UPDATE SKIP LOCKED` splits the work between replicas.
pub(crate) async fn relay_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.relay_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(publisher) = shared.publisher().await else {
            continue;
        };
        loop {
            let sweep = match shared.ledger.relay_sweep(500, 30.0).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "relay sweep failed");
                    break;
                }
            };
            if sweep.due.is_empty() {
                break;
            }
            let full = sweep.due.len() == 500;
            let out: Vec<OutgoingJob> = sweep
                .due
                .iter()
                .map(|d| {
                    let params = match &d.params.0 {
                        Value::Object(m) => m.clone(),
                        _ => Default::default(),
                    };
                    let msg = JobMessage {
                        v: drover_core::message::CONTRACT_VERSION,
                        idempotency_key: d.idempotency_key.clone(),
                        pipeline: d.pipeline.clone(),
                        params,
                        batch_size: d.batch_size.map(|b| b as u32),
                        max_attempts: Some(d.max_attempts as u32),
                    };
                    OutgoingJob::new(d.id, &msg, None)
                })
                .collect();
            let lag = sweep.due.iter().map(|d| d.overdue_secs).fold(0.0, f64::max);
            match publisher.publish_jobs(&out).await {
                Ok(()) => match sweep.commit().await {
                    Ok(()) => {
                        shared.metrics.relayed(out.len(), lag);
                        info!(jobs = out.len(), max_lag_secs = lag, "relayed due retries");
                    }
                    Err(e) => {
                        warn!(error = %e, "relay commit failed; the retries will be published again")
                    }
                },
                Err(e) => {
                    warn!(error = %e, "relay publish failed; will retry");
                    break;
                }
            }
            if !full {
                break;
            }
        }
    }
}
