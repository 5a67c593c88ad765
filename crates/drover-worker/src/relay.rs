//! The retry relay: re-publishes due retries from the ledger.

use crate::shared::Shared;
use drover_broker::OutgoingJob;
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
                .filter_map(crate::rescue::due_message)
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
