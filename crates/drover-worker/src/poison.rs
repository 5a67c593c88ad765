//! Poison messages: the broker dead-lettered a job's message at the delivery limit.
//!
//! `{ns}.jobs` dead-letters a message delivered `x-delivery-limit` times without an ack
//! (every worker that took it crashed, froze or gave it back before claiming it). Its job is
//! still `queued` in the ledger, which the rescuer's lost-message sweep would publish again,
//! so a true poison message would loop. The broker also routes a copy of every such message
//! to `{ns}.poison`; this loop consumes it and marks the job `dead` with a reason naming the
//! limit (`Ledger::mark_poisoned`). Every worker runs it; each copy is consumed once.

use crate::reconnect::{Failed, Reconnect, connect_and_set_up};
use crate::shared::{Shared, reconnect_backoff};
use drover_broker::Incoming;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, error, info, warn};

/// Dead-lettered copies taken at once (each is one ledger statement).
const POISON_PREFETCH: u16 = 16;

/// Consumes `{ns}.poison` until aborted, reconnecting with backoff.
pub(crate) async fn poison_loop(shared: Arc<Shared>) {
    let mut backoff = reconnect_backoff();
    let name = format!("{}-poison", shared.config.worker_id);
    let how = Reconnect {
        name: &name,
        next_node_after_failed_set_up: false,
    };
    loop {
        let session = connect_and_set_up(
            &shared,
            &how,
            &mut backoff,
            &mut None,
            None,
            |broker| {
                let (shared, name) = (shared.clone(), name.clone());
                Box::pin(async move {
                    broker.declare(&shared.topo).await?;
                    broker.declare_poison(&shared.topo).await?;
                    broker
                        .consume_poison(&shared.topo, POISON_PREFETCH, &name)
                        .await
                })
            },
            |failed, e, wait| match failed {
                Failed::Connect => {
                    debug!(error = %e, retry_in_ms = wait.as_millis() as u64, "poison consumer: broker unavailable");
                }
                Failed::SetUp => {
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "poison consumer setup failed; retrying");
                }
            },
        )
        .await;
        // Without a shutdown signal it returns only once connected.
        let Some((broker, mut consumer)) = session else {
            return;
        };
        info!(queue = %shared.topo.poison_queue(), "consuming messages dead-lettered at the delivery limit");
        while let Some(next) = consumer.next().await {
            match next {
                Ok(delivery) => handle(&shared, delivery).await,
                Err(e) => {
                    debug!(error = %e, "poison consumer error; reconnecting");
                    break;
                }
            }
        }
        let _ = broker.close().await;
    }
}

/// Marks the job of one dead-lettered message `dead`, then acks the copy. A copy whose job
/// the ledger cannot be asked about now is requeued (the ledger decides, later).
async fn handle(shared: &Shared, delivery: Incoming) {
    let queue = shared.topo.jobs_queue();
    let Some(key) = poison_job_key(&delivery.body) else {
        warn!(
            message_id = delivery.message_id.as_deref().unwrap_or(""),
            "a message dead-lettered at the delivery limit has no idempotency key; dropping the copy (the original is in the dead queue)"
        );
        settle_ack(&delivery).await;
        return;
    };
    match shared
        .ledger
        .mark_poisoned(&key, shared.topo.delivery_limit, &queue)
        .await
    {
        Ok(Some(reason)) => {
            error!(%key, delivery_limit = shared.topo.delivery_limit, %reason,
                "poison message: marked the job dead");
            shared.metrics.poisoned();
            settle_ack(&delivery).await;
        }
        Ok(None) => {
            info!(%key, "a dead-lettered duplicate message: its job is not queued; nothing to do");
            settle_ack(&delivery).await;
        }
        Err(e) => {
            warn!(%key, error = %e, "could not mark a poison message's job dead; requeueing the copy");
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Err(e) = delivery.nack_requeue().await {
                debug!(error = %e, "nack of a poison copy");
            }
        }
    }
}

async fn settle_ack(delivery: &Incoming) {
    if let Err(e) = delivery.ack().await {
        debug!(error = %e, "ack of a poison copy; it is delivered again and handled again");
    }
}

/// The idempotency key of a job message body, read leniently: the message reached a
/// worker's queue before, so only the key is needed, whatever else it holds. `drover doctor`
/// reads `{ns}.poison` copies with it too.
pub fn poison_job_key(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("idempotency_key")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::poison_job_key;

    #[test]
    fn key_of_reads_the_key_only() {
        assert_eq!(
            poison_job_key(br#"{"v":1,"idempotency_key":"k-1","pipeline":"x"}"#).as_deref(),
            Some("k-1")
        );
        assert_eq!(poison_job_key(br#"{"idempotency_key":5}"#), None);
        assert_eq!(poison_job_key(b"not json"), None);
    }
}
