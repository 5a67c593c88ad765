//! Consuming job messages with manual acks.

use crate::BrokerError;
use crate::acks::{Settle, Settled, Settler};
use crate::error::{describe, is_permanent};
use crate::publisher::TRACEPARENT_HEADER;
use futures_util::StreamExt;
use lapin::options::BasicCancelOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Acker, Channel, Consumer};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Header in which quorum queues count earlier failed deliveries of a message.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// The deliveries of one `basic.consume` on `{ns}.jobs`, on a channel of its own with
/// `basic.qos(prefetch)`, so at most `prefetch` messages are ever unacked in this worker.
///
/// Read it with [`JobConsumer::next`] (a method, not a `Stream` impl, so it can be used in
/// `tokio::select!` without pinning). It ends (`None`) when the consumer is cancelled — by
/// [`JobConsumer::cancel`] or by the broker, e.g. when the queue is deleted — or when the
/// channel or connection closes; a failure is reported once as `Some(Err(..))` just before
/// the end. Either way the caller reconnects (or, after its own cancel, shuts down).
#[derive(Debug)]
pub struct JobConsumer {
    channel: Arc<Channel>,
    consumer: Consumer,
    queue: Arc<str>,
    endpoint: Arc<str>,
    cancelled: AtomicBool,
    ended: bool,
    settler: Settler,
}

impl JobConsumer {
    pub(crate) fn new(
        channel: Arc<Channel>,
        consumer: Consumer,
        queue: String,
        endpoint: Arc<str>,
    ) -> JobConsumer {
        JobConsumer {
            channel,
            consumer,
            queue: queue.into(),
            endpoint,
            cancelled: AtomicBool::new(false),
            ended: false,
            settler: Settler::spawn(),
        }
    }

    /// The consumer tag (ours, or the broker's when none was given).
    pub fn tag(&self) -> String {
        self.consumer.tag().to_string()
    }

    /// Next delivery. `None` once the consumer was cancelled or its channel or connection
    /// closed (and on every call after that); `Some(Err(..))` reports why a channel or
    /// connection failed, and is followed by `None`.
    ///
    /// Deliveries that reached this client before a [`cancel`](Self::cancel) are still
    /// returned, and stay ackable, until the `None`.
    ///
    /// Cancel-safe: dropping the future (e.g. in `tokio::select!`) loses no delivery.
    pub async fn next(&mut self) -> Option<Result<Incoming, BrokerError>> {
        if self.ended {
            return None;
        }
        match self.consumer.next().await {
            Some(Ok(delivery)) => Some(Ok(Incoming::from_delivery(
                delivery,
                self.channel.clone(),
                self.queue.clone(),
                self.endpoint.clone(),
                self.settler.clone(),
            ))),
            Some(Err(e)) => Some(Err(BrokerError::Operation {
                action: format!("consume from queue {}", self.queue),
                endpoint: self.endpoint.to_string(),
                detail: describe(&e),
                permanent: is_permanent(&e),
            })),
            None => {
                self.ended = true;
                None
            }
        }
    }

    /// Sends `basic.cancel` so the broker stops delivering to this consumer (graceful
    /// shutdown). Deliveries already received stay ackable; keep calling
    /// [`next`](Self::next) to drain the few already in flight until it returns `None`, or
    /// drop them and let the channel's closing requeue them.
    ///
    /// Idempotent; succeeds without doing anything when the channel is already closed (no
    /// more deliveries can arrive then anyway).
    pub async fn cancel(&self) -> Result<(), BrokerError> {
        if self.cancelled.swap(true, Ordering::SeqCst) || !self.channel.status().connected() {
            return Ok(());
        }
        let result = self
            .channel
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default())
            .await;
        match result {
            Ok(()) => Ok(()),
            Err(_) if !self.channel.status().connected() => Ok(()),
            Err(e) => {
                self.cancelled.store(false, Ordering::SeqCst);
                Err(BrokerError::Operation {
                    action: format!(
                        "cancel consumer {} on queue {}",
                        self.consumer.tag(),
                        self.queue
                    ),
                    endpoint: self.endpoint.to_string(),
                    detail: describe(&e),
                    permanent: is_permanent(&e),
                })
            }
        }
    }

    /// Whether the consumer's channel is still open.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }
}

/// A received job message, acked or requeued by the worker once its fate is recorded.
///
/// It keeps its channel open while it exists, so it can still be settled after the
/// [`JobConsumer`] is gone (an ack only works on the channel the message arrived on).
pub struct Incoming {
    /// The message body (a contract-v1 JSON job message, unless the producer erred).
    pub body: Vec<u8>,
    /// AMQP `message_id`: the job id.
    pub message_id: Option<String>,
    /// W3C `traceparent` header of the producer, to continue its trace.
    pub traceparent: Option<String>,
    /// True when the broker delivered this message before (to this or another consumer).
    pub redelivered: bool,
    /// The quorum queue's `x-delivery-count` header: earlier deliveries that ended without
    /// an ack (absent on a first delivery).
    pub delivery_count: Option<i64>,
    /// AMQP delivery mode: 2 for persistent messages.
    pub delivery_mode: Option<u8>,
    /// AMQP `content_type`, normally `application/json`.
    pub content_type: Option<String>,
    /// AMQP `timestamp` (seconds since the Unix epoch) set by the publisher, for queue lag.
    pub timestamp: Option<u64>,
    /// The exchange the message was published to (empty for the default exchange).
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Channel-local delivery tag.
    pub delivery_tag: u64,
    headers: FieldTable,
    acker: Acker,
    _channel: Arc<Channel>,
    queue: Arc<str>,
    endpoint: Arc<str>,
    /// The channel's settling task: acks of consecutive deliveries leave as one frame.
    settler: Settler,
    /// Set by the first ack, nack or reject: a delivery is settled once.
    settling: AtomicBool,
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("delivery_tag", &self.delivery_tag)
            .field("message_id", &self.message_id)
            .field("body_len", &self.body.len())
            .field("redelivered", &self.redelivered)
            .field("delivery_count", &self.delivery_count)
            .field("traceparent", &self.traceparent)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    fn from_delivery(
        delivery: lapin::message::Delivery,
        channel: Arc<Channel>,
        queue: Arc<str>,
        endpoint: Arc<str>,
        settler: Settler,
    ) -> Incoming {
        let props = &delivery.properties;
        let headers = props.headers().clone().unwrap_or_default();
        Incoming {
            message_id: props.message_id().as_ref().map(|s| s.to_string()),
            traceparent: header_string(&headers, TRACEPARENT_HEADER),
            delivery_count: header_int(&headers, DELIVERY_COUNT_HEADER),
            delivery_mode: *props.delivery_mode(),
            content_type: props.content_type().as_ref().map(|s| s.to_string()),
            timestamp: *props.timestamp(),
            redelivered: delivery.redelivered,
            exchange: delivery.exchange.to_string(),
            routing_key: delivery.routing_key.to_string(),
            delivery_tag: delivery.delivery_tag,
            headers,
            body: delivery.data,
            acker: delivery.acker,
            _channel: channel,
            queue,
            endpoint,
            settler,
            settling: AtomicBool::new(false),
        }
    }

    /// A header's value as text (string headers only), e.g. `x-drover-reason` on messages
    /// read from `{ns}.dead`.
    pub fn header(&self, name: &str) -> Option<String> {
        header_string(&self.headers, name)
    }

    /// Acknowledges the message: the broker forgets it. Call only once its outcome (or its
    /// retry schedule) is committed to the ledger.
    ///
    /// Acks of this channel's consecutive deliveries asked for at about the same time leave
    /// as one `basic.ack` with `multiple` (see the settling task in `acks.rs`); this returns
    /// once the frame covering this delivery was sent.
    pub async fn ack(&self) -> Result<(), BrokerError> {
        let done = self.settle(Settle::Ack).await;
        self.settled("ack", done)
    }

    async fn settle(&self, what: Settle) -> Settled {
        if self.settling.swap(true, Ordering::SeqCst) {
            return Ok(false);
        }
        self.settler
            .settle(self.delivery_tag, &self.acker, what)
            .await
    }

    /// Gives the message back to the queue for another delivery (graceful shutdown, or
    /// a job that could not be started). The quorum queue counts this towards the delivery
    /// limit.
    pub async fn nack_requeue(&self) -> Result<(), BrokerError> {
        let done = self.settle(Settle::Nack { requeue: true }).await;
        self.settled("nack (requeue)", done)
    }

    /// Refuses the message without requeueing: the queue dead-letters it through `{ns}.dlx`
    /// to `{ns}.dead` (with the broker's `x-death` header, but no drover reason — prefer
    /// [`Publisher::publish_dead`](crate::Publisher::publish_dead) then
    /// [`ack`](Self::ack) when there is a reason to record).
    pub async fn reject(&self) -> Result<(), BrokerError> {
        let done = self.settle(Settle::Nack { requeue: false }).await;
        self.settled("reject", done)
    }

    fn settled(&self, action: &'static str, done: lapin::Result<bool>) -> Result<(), BrokerError> {
        let reason = match done {
            Ok(true) => return Ok(()),
            Ok(false) if self.acker.poisoned() => {
                "the channel it arrived on is closed; RabbitMQ will redeliver it".to_string()
            }
            Ok(false) => "it was already acked or nacked".to_string(),
            Err(e) => describe(&e),
        };
        Err(BrokerError::Settle {
            action,
            delivery_tag: self.delivery_tag,
            queue: self.queue.to_string(),
            endpoint: self.endpoint.to_string(),
            reason,
        })
    }
}

/// A string-typed header (long or short string, or a byte array holding UTF-8).
fn header_string(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        AMQPValue::ByteArray(b) => std::str::from_utf8(b.as_slice()).ok().map(str::to_string),
        _ => None,
    }
}

/// An integer-typed header of any width.
fn header_int(headers: &FieldTable, name: &str) -> Option<i64> {
    match headers.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;

    #[test]
    fn headers_of_any_string_or_int_type() {
        let mut h = FieldTable::default();
        h.insert("a".into(), AMQPValue::LongString(LongString::from("x")));
        h.insert("b".into(), AMQPValue::ShortString("y".into()));
        h.insert("c".into(), AMQPValue::LongLongInt(3));
        h.insert("d".into(), AMQPValue::LongInt(4));
        h.insert("e".into(), AMQPValue::Boolean(true));
        assert_eq!(header_string(&h, "a").as_deref(), Some("x"));
        assert_eq!(header_string(&h, "b").as_deref(), Some("y"));
        assert_eq!(header_string(&h, "e"), None);
        assert_eq!(header_string(&h, "zz"), None);
        assert_eq!(header_int(&h, "c"), Some(3));
        assert_eq!(header_int(&h, "d"), Some(4));
        assert_eq!(header_int(&h, "a"), None);
    }
}
