//! Poison messages: a job whose message the broker dead-lettered at the delivery limit.
//!
//! `{ns}.jobs` is a quorum queue with `x-delivery-limit`: a message delivered that many
//! times without an ack (each worker that took it crashed or gave it back before claiming
//! it) is dead-lettered by the broker itself. Its job is still `queued` in the ledger with a
//! confirmed message, which is exactly what the lost-message sweep publishes again, so a
//! true poison message would loop for ever. Workers consume the copy the broker routes to
//! `{ns}.poison` and mark the job `dead` here instead, with a reason that names the limit.

use crate::{Ledger, LedgerError};

impl Ledger {
    /// Marks the job `key` `dead` (permanent) because its message reached the broker's
    /// delivery limit of `delivery_limit` deliveries, if it is still `queued` (waiting for a
    /// message that no longer exists). Returns the reason stored, or `None` when the job is
    /// unknown or in another state (running, finished: the dead-lettered message was a
    /// duplicate, and the job's own path goes on), in which case nothing changes.
    pub async fn mark_poisoned(
        &self,
        key: &str,
        delivery_limit: u32,
        queue: &str,
    ) -> Result<Option<String>, LedgerError> {
        let reason = format!(
            "delivery limit reached: its message was delivered {} times without an ack \
             (x-delivery-limit {delivery_limit} of queue {queue}) and the broker dead-lettered \
             it; not published again (a poison message would loop). `drover jobs retry` runs \
             it again",
            u64::from(delivery_limit) + 1,
        );
        let updated: Option<String> = sqlx::query_scalar(
            "UPDATE drover.jobs SET state = 'dead', error_kind = 'permanent', last_error = $2, \
             run_at = NULL, lease_owner = NULL, heartbeat_at = NULL, finished_at = now(), \
             updated_at = now() \
             WHERE idempotency_key = $1 AND state = 'queued' RETURNING last_error",
        )
        .bind(key)
        .bind(&reason)
        .fetch_optional(&self.pool)
        .await?;
        Ok(updated)
    }
}
