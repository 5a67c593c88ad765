//! The connect / set up / back off skeleton of the worker's broker loops: `consume.rs`
//! (`{ns}.jobs`) and `poison.rs` (`{ns}.poison`) both open a connection, set it up
//! (declare, consume) and retry either step with jittered backoff until both succeed; each
//! then consumes in its own way and comes back here when the connection goes.

use crate::shared::Shared;
use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;
use drover_broker::{Broker, BrokerError};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::watch;

/// What a loop does on a new connection (declare, consume), returning what it consumes
/// with. Boxed: the worker spawns these loops, and a closure's future borrowing the
/// connection would not be `Send` for every lifetime.
pub(crate) type SetUp<'b, T> = Pin<Box<dyn Future<Output = Result<T, BrokerError>> + Send + 'b>>;

/// The step of [`connect_and_set_up`] that failed, for the caller's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failed {
    /// No node of the cluster answered.
    Connect,
    /// Connected, but the set-up (declare, consume) failed.
    SetUp,
}

/// How one loop reconnects.
pub(crate) struct Reconnect<'a> {
    /// The connection's name in the management UI.
    pub name: &'a str,
    /// After a failed set-up, start the next connection with the cluster's next node (a
    /// node shutting down may still accept connections).
    pub next_node_after_failed_set_up: bool,
}

/// Connects (or takes `first`, a connection already open) and runs `set_up` on it, until
/// both succeed, waiting `backoff` after each failure (then reset on success). Each failure
/// is handed to `log` with the error and the wait before it is retried; a connection whose
/// set-up failed is closed first.
///
/// With `shutdown`, stops when it is (or becomes, during a wait) true, returning `None`; a
/// `first` connection not yet taken is then still in `first`. Without, it only returns once
/// connected.
pub(crate) async fn connect_and_set_up<T>(
    shared: &Shared,
    how: &Reconnect<'_>,
    backoff: &mut ExponentialBackoff,
    first: &mut Option<Broker>,
    mut shutdown: Option<&mut watch::Receiver<bool>>,
    mut set_up: impl for<'b> FnMut(&'b Broker) -> SetUp<'b, T>,
    log: impl Fn(Failed, &BrokerError, Duration),
) -> Option<(Broker, T)> {
    loop {
        if shutdown.as_ref().is_some_and(|s| *s.borrow()) {
            return None;
        }
        let broker = match first.take() {
            Some(b) => b,
            None => match shared.addresses.connect(how.name).await {
                Ok(b) => b,
                Err(e) => {
                    let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(15));
                    log(Failed::Connect, &e, wait);
                    if !wait_or_shutdown(wait, shutdown.as_deref_mut()).await {
                        return None;
                    }
                    continue;
                }
            },
        };
        match set_up(&broker).await {
            Ok(v) => {
                backoff.reset();
                return Some((broker, v));
            }
            Err(e) => {
                let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(15));
                log(Failed::SetUp, &e, wait);
                let _ = broker.close().await;
                if how.next_node_after_failed_set_up {
                    shared.addresses.skip_current();
                }
                if !wait_or_shutdown(wait, shutdown.as_deref_mut()).await {
                    return None;
                }
            }
        }
    }
}

/// Sleeps `wait`; false when `shutdown` changed first (the caller stops).
async fn wait_or_shutdown(wait: Duration, shutdown: Option<&mut watch::Receiver<bool>>) -> bool {
    match shutdown {
        Some(s) => tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = s.changed() => false,
        },
        None => {
            tokio::time::sleep(wait).await;
            true
        }
    }
}
