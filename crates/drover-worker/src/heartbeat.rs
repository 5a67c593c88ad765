//! Lease renewal for in-flight jobs, and operator cancellation.

use crate::shared::Shared;
use std::sync::Arc;
use tracing::warn;

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
            Ok(cancelled) => shared.inflight.cancel(&cancelled),
            Err(e) => warn!(error = %e, jobs = ids.len(), "heartbeat failed"),
        }
    }
}
