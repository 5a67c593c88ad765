//! The consumer loop: connect, declare, consume; reconnect with jittered backoff.

use crate::delivery::handle_delivery;
use crate::reconnect::{Failed, Reconnect, connect_and_set_up};
use crate::shared::{Shared, reconnect_backoff};
use drover_broker::Broker;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{info, warn};

/// Connects, declares, consumes; reconnects with jittered backoff when the broker goes away.
/// Returns the connection still open at shutdown (to be closed after draining).
pub(crate) async fn consume_loop(
    shared: Arc<Shared>,
    mut first: Option<Broker>,
    tasks: &mut JoinSet<()>,
) -> Option<Broker> {
    let mut backoff = reconnect_backoff();
    let mut shutdown = shared.shutdown.clone();
    // Job slots: deliveries are acked at claim, so the broker's unacked count no longer
    // bounds the jobs running here; a delivery is taken off the consumer only with a free
    // slot, held until its job ends. Slots outlive reconnections (jobs run on through them).
    let slots = Arc::new(Semaphore::new(usize::from(shared.config.prefetch)));
    // Consumer sessions lost so far, logged with each `consuming` line.
    let mut reconnects: u64 = 0;
    let how = Reconnect {
        name: &shared.config.worker_id,
        next_node_after_failed_set_up: true,
    };
    loop {
        let session = connect_and_set_up(
            &shared,
            &how,
            &mut backoff,
            &mut first,
            Some(&mut shutdown),
            |broker| {
                let shared = shared.clone();
                Box::pin(async move {
                    broker.declare(&shared.topo).await?;
                    let publisher = broker.publisher(&shared.topo).await?;
                    let consumer = broker
                        .consume(
                            &shared.topo,
                            shared.config.prefetch,
                            &shared.config.worker_id,
                        )
                        .await?;
                    Ok((publisher, consumer))
                })
            },
            |failed, e, wait| match failed {
                Failed::Connect => {
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker unavailable; reconnecting");
                }
                Failed::SetUp => {
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker setup failed; reconnecting");
                }
            },
        )
        .await;
        // Shut down before a session started: the first connection, if still unused, is
        // closed by the caller after draining.
        let Some((broker, (publisher, mut consumer))) = session else {
            return first;
        };
        let broker_endpoint = broker.endpoint().to_string();
        *shared.publisher.write().await = Some(Arc::new(publisher));
        shared.metrics.consuming.store(true, Ordering::SeqCst);
        info!(queue = %shared.topo.jobs_queue(), prefetch = shared.config.prefetch, endpoint = %broker.endpoint(), reconnects, "consuming");
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    shared.metrics.consuming.store(false, Ordering::SeqCst);
                    if let Err(e) = consumer.cancel().await {
                        warn!(error = %e, "basic.cancel failed");
                    }
                    return Some(broker);
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                next = consumer.next(), if slots.available_permits() > 0 => match next {
                    Some(Ok(delivery)) => {
                        // Only this loop takes slots, and one is free.
                        let slot = slots.clone().try_acquire_owned();
                        let sh = shared.clone();
                        tasks.spawn(async move {
                            handle_delivery(sh, delivery).await;
                            drop(slot);
                        });
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "consumer error; reconnecting");
                        break;
                    }
                    None => {
                        warn!("broker connection lost; reconnecting");
                        break;
                    }
                }
            }
        }
        shared.metrics.consuming.store(false, Ordering::SeqCst);
        *shared.publisher.write().await = None;
        let _ = broker.close().await;
        reconnects += 1;
        // Its node is probably going away (stopped, upgraded, partitioned): start the
        // reconnect with the next node of the cluster, so no time goes waiting on this one.
        if shared.addresses.len() > 1 {
            shared.addresses.skip_current();
            info!(lost = %broker_endpoint, next = %shared.addresses.preferred(), "failing over to the next broker node");
        }
    }
}
