//! drover's RabbitMQ layer: topology, publishing with confirms, consuming with a prefetch.
//!
//! The broker only carries work; the Postgres ledger is the source of truth. This crate
//! therefore offers exactly what the worker and the producers need and nothing more:
//!
//! * [`Topology`] names one namespace's objects — the quorum work queue `{ns}.jobs`
//!   (durable, with a delivery limit and dead-lettering to `{ns}.dlx`), the quorum
//!   dead-letter queue `{ns}.dead`, and the direct exchanges `{ns}` and `{ns}.dlx` — and
//!   [`Broker::declare`] declares them idempotently, explaining any conflict with what exists.
//! * [`Publisher`] publishes persistent job messages with publisher confirms, pipelined, and
//!   copies rejected messages to `{ns}.dead` with the reason.
//! * [`JobConsumer`] yields [`Incoming`] deliveries under `basic.qos(prefetch)`, each acked
//!   or requeued explicitly; acks of consecutive deliveries leave as one `basic.ack` with
//!   `multiple` (one settle command in the quorum queue's log instead of one per message).
//!
//! * [`QueueReader`] takes messages one at a time with `basic.get`, for tools that look at
//!   a queue without consuming it (`drover doctor` and `{ns}.poison`).
//!
//! * [`BrokerAddresses`] holds the addresses of a cluster's nodes and connects to the first
//!   that answers, so a caller fails over to another node when its own goes away.
//!
//! There is no automatic reconnection here: when the connection goes, the consumer ends and
//! the caller builds a new [`Broker`] (through [`BrokerAddresses::connect`], on the next
//! node), redeclares and resumes, with its own backoff. Every
//! error is a [`BrokerError`] that names the broker as `host:port (vhost …)` (see
//! [`redact_url`]) and never its password.

#![warn(missing_docs)]

mod acks;
mod addresses;
mod broker;
mod consumer;
mod endpoint;
mod error;
mod publisher;
mod reader;
pub mod tls;
mod topology;
pub mod trace;

pub use addresses::{ADDRESS_SEPARATOR, BrokerAddresses};
pub use broker::{Broker, CLOSE_TIMEOUT, CONNECT_TIMEOUT, QueueDepth};
pub use consumer::{DELIVERY_COUNT_HEADER, Incoming, JobConsumer};
pub use endpoint::redact_url;
pub use error::BrokerError;
pub use publisher::{
    CONFIRM_TIMEOUT, KEY_HEADER, MAX_REASON_CHARS, OutgoingJob, Publisher, REASON_HEADER,
    TRACEPARENT_HEADER,
};
pub use reader::{GotMessage, QueueReader};
pub use topology::{DEFAULT_DELIVERY_LIMIT, DEFAULT_NAMESPACE, JOBS_ROUTING_KEY, Topology};
