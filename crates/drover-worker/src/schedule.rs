//! The schedule loop: fires due schedule slots (`drover schedules add`) from the ledger.
//!
//! Every worker runs it once a second, leader-free: `Ledger::fire_schedules` locks due
//! schedules with `FOR UPDATE SKIP LOCKED` and enqueues each slot's job with
//! `drover.enqueue()` in the same transaction that advances the schedule, so a slot fires
//! exactly once however many workers run. The enqueue's NOTIFY wakes every relay, which
//! publishes the job like any other enqueued one.

use crate::shared::Shared;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How often a worker looks for due slots (a slot fires within about this long).
const SCHEDULE_TICK: Duration = Duration::from_secs(1);

/// Schedules fired per sweep (the next sweep takes the rest).
const SCHEDULE_BATCH: i64 = 100;

/// Fires due schedule slots every [`SCHEDULE_TICK`] until aborted.
pub(crate) async fn schedule_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SCHEDULE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match shared.ledger.fire_schedules(SCHEDULE_BATCH).await {
            Ok(report) => {
                for f in &report.fired {
                    info!(schedule = %f.schedule, slot = %f.slot.to_rfc3339(), key = %f.key,
                        new = f.new, "schedule fired");
                }
                for (name, n, policy) in &report.skipped {
                    info!(schedule = %name, skipped = n, catch_up = %policy,
                        "missed schedule slots skipped by the catch-up policy");
                }
                for (name, why) in &report.errors {
                    warn!(schedule = %name, error = %why, "schedule could not fire");
                }
            }
            Err(e) => debug!(error = %e, "schedule sweep failed; retrying next tick"),
        }
    }
}
