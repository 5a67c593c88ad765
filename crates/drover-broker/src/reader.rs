//! Reading a queue without a consumer: `basic.get`, one message at a time, for tools such as
//! `drover doctor` that look at what waits in a queue and settle it themselves.

use crate::BrokerError;
use crate::error::{describe, is_permanent};
use crate::topology::short;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::{Acker, Channel};
use std::sync::Arc;

/// A channel that takes messages from one queue with `basic.get` (manual acks), from
/// [`Broker::reader`](crate::Broker::reader).
///
/// Messages taken and not settled stay unacked until [`requeue_all`](Self::requeue_all) or
/// until the channel closes ([`close`](Self::close), or the connection's), which both give
/// them back to the queue. Holding them is what lets a caller look at several distinct
/// messages: one given back is at the head of the queue again.
#[derive(Debug)]
pub struct QueueReader {
    channel: Arc<Channel>,
    queue: String,
    endpoint: Arc<str>,
}

/// One message taken by [`QueueReader::get`].
#[derive(Debug)]
pub struct GotMessage {
    /// The message body.
    pub body: Vec<u8>,
    /// AMQP `message_id` (the job id for job messages).
    pub message_id: Option<String>,
    acker: Acker,
    queue: String,
    endpoint: Arc<str>,
}

impl QueueReader {
    pub(crate) fn new(channel: Arc<Channel>, queue: String, endpoint: Arc<str>) -> QueueReader {
        QueueReader {
            channel,
            queue,
            endpoint,
        }
    }

    /// The queue read.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Takes the next ready message (unacked until settled), or `None` when none is ready.
    pub async fn get(&self) -> Result<Option<GotMessage>, BrokerError> {
        let got = self
            .channel
            .basic_get(
                short("queue name", &self.queue)?,
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(|e| {
                op_error(
                    format!("take a message from queue {} (basic.get)", self.queue),
                    &self.endpoint,
                    &e,
                )
            })?;
        Ok(got.map(|m| GotMessage {
            message_id: m
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string()),
            body: m.delivery.data,
            acker: m.delivery.acker,
            queue: self.queue.clone(),
            endpoint: self.endpoint.clone(),
        }))
    }

    /// Gives every message taken and not settled back to the queue (`basic.nack` with
    /// `multiple` and `requeue`). Quorum queues of RabbitMQ before 4.3 count this as a
    /// delivery towards the queue's delivery limit.
    pub async fn requeue_all(&self) -> Result<(), BrokerError> {
        self.channel
            .basic_nack(
                0,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await
            .map_err(|e| {
                op_error(
                    format!(
                        "give the messages back to queue {} (basic.nack)",
                        self.queue
                    ),
                    &self.endpoint,
                    &e,
                )
            })
    }

    /// Closes the channel (reply 200); messages still unacked go back to the queue.
    pub async fn close(self) -> Result<(), BrokerError> {
        if !self.channel.status().connected() {
            return Ok(());
        }
        self.channel.close(200, "OK".into()).await.map_err(|e| {
            op_error(
                format!("close the channel reading queue {}", self.queue),
                &self.endpoint,
                &e,
            )
        })
    }
}

impl GotMessage {
    /// Acknowledges the message: the queue forgets it.
    pub async fn ack(&self) -> Result<(), BrokerError> {
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| {
                op_error(
                    format!("ack a message of queue {}", self.queue),
                    &self.endpoint,
                    &e,
                )
            })
    }

    /// Gives the message back to the queue (`basic.nack` with `requeue`).
    pub async fn requeue(&self) -> Result<(), BrokerError> {
        self.acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .map(|_| ())
            .map_err(|e| {
                op_error(
                    format!("give a message back to queue {} (basic.nack)", self.queue),
                    &self.endpoint,
                    &e,
                )
            })
    }
}

fn op_error(action: String, endpoint: &str, e: &lapin::Error) -> BrokerError {
    BrokerError::Operation {
        action,
        endpoint: endpoint.to_string(),
        detail: describe(e),
        permanent: is_permanent(e),
    }
}
