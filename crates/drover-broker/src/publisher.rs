//! Publishing job messages and dead-letter copies with publisher confirms.

use crate::error::describe;
use crate::topology::short;
use crate::{BrokerError, Topology};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a publish waits for the broker's confirms before reporting them as lost. The
/// broker withholds confirms while a memory or disk alarm blocks publishers; past this bound
/// the caller gets an error (and the ledger's outbox republishes later) instead of a hang.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest `x-drover-reason` header kept, in characters.
pub const MAX_REASON_CHARS: usize = 1000;

/// Header carrying why a message was copied to `{ns}.dead`.
pub const REASON_HEADER: &str = "x-drover-reason";

/// Header carrying the idempotency key of a message copied to `{ns}.dead`, when known.
pub const KEY_HEADER: &str = "x-drover-key";

/// W3C trace-context header continuing the producer's trace in the worker.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// One job message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingJob {
    /// AMQP `message_id`: the job id (at most 255 bytes).
    pub message_id: String,
    /// The JSON body (contract v1).
    pub body: Vec<u8>,
    /// W3C `traceparent` of the producer's span, sent as a header when present.
    pub traceparent: Option<String>,
}

impl OutgoingJob {
    /// The message of job `id` (its ledger row id, sent as `message_id`), with the producer's
    /// trace context when there is one.
    pub fn new(
        id: impl std::fmt::Display,
        msg: &drover_core::JobMessage,
        traceparent: Option<String>,
    ) -> Self {
        OutgoingJob {
            message_id: id.to_string(),
            body: msg.to_body(),
            traceparent,
        }
    }
}

/// Publishes to one namespace over a channel in confirm mode.
///
/// `Send + Sync`: share it (e.g. in an `Arc`) between tasks. Publishes from concurrent calls
/// are serialised while they are sent, so each call's confirms are matched to its own
/// messages, and awaited concurrently.
#[derive(Debug)]
pub struct Publisher {
    channel: Arc<Channel>,
    jobs_queue: ShortString,
    dead_queue: ShortString,
    endpoint: Arc<str>,
    send_lock: tokio::sync::Mutex<()>,
}

/// Tally of one batch's confirms.
#[derive(Default)]
struct Outcome {
    nacked: usize,
    returned: usize,
    lost: usize,
    first_reason: Option<String>,
}

impl Publisher {
    pub(crate) fn new(
        channel: Arc<Channel>,
        topo: &Topology,
        endpoint: Arc<str>,
    ) -> Result<Publisher, BrokerError> {
        Ok(Publisher {
            channel,
            jobs_queue: short("queue name", &topo.jobs_queue())?,
            dead_queue: short("queue name", &topo.dead_queue())?,
            endpoint,
            send_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether the publisher's channel is still open; false after a channel or connection
    /// error, when the caller needs a new [`Broker`](crate::Broker).
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes `jobs` to the default exchange with routing key `{ns}.jobs`: persistent
    /// (delivery mode 2), `application/json`, `message_id` set, a `traceparent` header when
    /// given, a timestamp (for queue-lag metrics), and `mandatory` so an unroutable message
    /// comes back instead of vanishing.
    ///
    /// Pipelined: every message is sent, then every confirm awaited (within
    /// [`CONFIRM_TIMEOUT`]). Returns `Ok` only when the broker confirmed all of them;
    /// otherwise [`BrokerError::NotConfirmed`] says how many were nacked, returned or lost.
    /// Any of them may still have been stored, so republishing must be idempotent — which
    /// drover's ledger makes it.
    pub async fn publish_jobs(&self, jobs: &[OutgoingJob]) -> Result<(), BrokerError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let timestamp = now();
        let mut messages = Vec::with_capacity(jobs.len());
        for job in jobs {
            let mut props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(short("message_id", &job.message_id)?)
                .with_timestamp(timestamp);
            if let Some(tp) = &job.traceparent {
                let mut headers = FieldTable::default();
                headers.insert(
                    TRACEPARENT_HEADER.into(),
                    AMQPValue::LongString(LongString::from(tp.as_str())),
                );
                props = props.with_headers(headers);
            }
            messages.push((job.body.as_slice(), props));
        }
        let queue = self.jobs_queue.clone();
        self.publish_confirmed(&queue, messages).await
    }

    /// Copies a message to `{ns}.dead` (persistent, confirmed) with the header
    /// `x-drover-reason` (`reason`, cut to [`MAX_REASON_CHARS`] characters) and
    /// `x-drover-key` when the idempotency key is known. The body and `message_id` are the
    /// original's, so an operator can inspect the message and republish it as is.
    ///
    /// Used for messages the worker rejects (bad JSON, unknown pipeline, …) before acking
    /// them: the copy must be safe in `{ns}.dead` first.
    pub async fn publish_dead(
        &self,
        body: &[u8],
        message_id: Option<&str>,
        key: Option<&str>,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut headers = FieldTable::default();
        let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        if let Some(k) = key {
            headers.insert(
                KEY_HEADER.into(),
                AMQPValue::LongString(LongString::from(k)),
            );
        }
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_timestamp(now())
            .with_headers(headers);
        if let Some(id) = message_id {
            props = props.with_message_id(short("message_id", id)?);
        }
        let queue = self.dead_queue.clone();
        self.publish_confirmed(&queue, vec![(body, props)]).await
    }

    /// Sends all messages to the default exchange (routing key = queue), then awaits their
    /// confirms.
    async fn publish_confirmed(
        &self,
        queue: &ShortString,
        messages: Vec<(&[u8], BasicProperties)>,
    ) -> Result<(), BrokerError> {
        let total = messages.len();
        let mut confirms: Vec<PublisherConfirm> = Vec::with_capacity(total);
        let mut send_error = None;
        {
            let _serialised = self.send_lock.lock().await;
            for (body, props) in messages {
                let sent = self
                    .channel
                    .basic_publish(
                        ShortString::default(),
                        queue.clone(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        body,
                        props,
                    )
                    .await;
                match sent {
                    Ok(confirm) => confirms.push(confirm),
                    Err(e) => {
                        send_error = Some(describe(&e));
                        break;
                    }
                }
            }
        }
        let unsent = total - confirms.len();
        let outcome = tokio::time::timeout(CONFIRM_TIMEOUT, tally(confirms)).await;
        let mut outcome = match outcome {
            Ok(o) => o,
            Err(_) => {
                return Err(self.not_confirmed(
                    queue,
                    total,
                    total,
                    format!(
                        "no confirms within {} s (is the broker blocking publishers on a memory or disk alarm?)",
                        CONFIRM_TIMEOUT.as_secs()
                    ),
                ));
            }
        };
        if let Some(e) = send_error {
            outcome.first_reason.get_or_insert(e);
        }
        let failed = outcome.nacked + outcome.returned + outcome.lost + unsent;
        if failed == 0 {
            return Ok(());
        }
        let mut parts = Vec::new();
        if outcome.nacked > 0 {
            parts.push(format!("{} nacked", outcome.nacked));
        }
        if outcome.returned > 0 {
            parts.push(format!(
                "{} returned as unroutable (does the queue exist? declare the topology first)",
                outcome.returned
            ));
        }
        if outcome.lost > 0 {
            parts.push(format!(
                "{} unconfirmed when the channel closed",
                outcome.lost
            ));
        }
        if unsent > 0 {
            parts.push(format!("{unsent} not sent"));
        }
        let mut detail = parts.join(", ");
        if let Some(r) = outcome.first_reason {
            detail.push_str(&format!(" ({r})"));
        }
        Err(self.not_confirmed(queue, total, failed, detail))
    }

    fn not_confirmed(
        &self,
        queue: &ShortString,
        total: usize,
        failed: usize,
        detail: String,
    ) -> BrokerError {
        BrokerError::NotConfirmed {
            endpoint: self.endpoint.to_string(),
            queue: queue.to_string(),
            total,
            failed,
            detail,
        }
    }
}

/// Awaits every confirm and counts the failures.
async fn tally(confirms: Vec<PublisherConfirm>) -> Outcome {
    let mut outcome = Outcome::default();
    for confirm in confirms {
        match confirm.await {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {}
            Ok(Confirmation::Ack(Some(returned))) => {
                outcome.returned += 1;
                outcome
                    .first_reason
                    .get_or_insert_with(|| format!("broker said {}", returned.reply_text));
            }
            Ok(Confirmation::Nack(_)) => outcome.nacked += 1,
            Err(e) => {
                outcome.lost += 1;
                outcome.first_reason.get_or_insert_with(|| describe(&e));
            }
        }
    }
    outcome
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
