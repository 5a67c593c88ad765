//! The one error type of this crate, and the translation of lapin's errors into sentences.

use drover_core::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

/// Everything that can go wrong talking to RabbitMQ.
///
/// Each message says what was attempted and against which broker (`host:port (vhost …)`,
/// never the credentials), and carries the broker's or the OS's own words for the cause, so
/// an operator reading one log line knows what to fix. [`BrokerError::kind`] tells the retry
/// machinery whether trying again can help.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The AMQP URL could not be understood (the reason never quotes the URL itself).
    #[error("invalid AMQP URL {url}: {reason}")]
    InvalidUrl {
        /// The URL without credentials, or `<unparseable AMQP URL>`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The TCP connection or the AMQP handshake failed or timed out.
    #[error("cannot connect to RabbitMQ at {endpoint}: {detail}")]
    Connect {
        /// `host:port (vhost …)`.
        endpoint: String,
        /// The OS's or the broker's reason (e.g. `Connection refused (os error 111)`).
        detail: String,
    },

    /// A queue or exchange exists with settings other than drover's (PRECONDITION_FAILED).
    #[error(
        "{object} on RabbitMQ at {endpoint} already exists with different settings: {detail}; {hint}"
    )]
    TopologyMismatch {
        /// e.g. `queue drover.jobs`.
        object: String,
        /// `host:port (vhost …)`.
        endpoint: String,
        /// The broker's explanation, which names the differing argument.
        detail: String,
        /// What the operator can do about it.
        hint: String,
    },

    /// An AMQP operation (declare, consume, qos, cancel, close, …) failed.
    #[error("cannot {action} on RabbitMQ at {endpoint}: {detail}")]
    Operation {
        /// What was being done, e.g. `consume from queue drover.jobs`.
        action: String,
        /// `host:port (vhost …)`.
        endpoint: String,
        /// The broker's or lapin's reason.
        detail: String,
        /// True when retrying cannot help (access refused, not allowed).
        permanent: bool,
    },

    /// Some published messages were not confirmed by the broker (nacked, returned as
    /// unroutable, or their channel closed before the confirm arrived).
    #[error(
        "RabbitMQ at {endpoint} did not confirm {failed} of {total} message(s) published to queue {queue}: {detail}"
    )]
    NotConfirmed {
        /// `host:port (vhost …)`.
        endpoint: String,
        /// The target queue.
        queue: String,
        /// How many messages the call tried to publish.
        total: usize,
        /// How many of them are not known to be safely stored.
        failed: usize,
        /// Counts by cause and the first reason seen.
        detail: String,
    },

    /// An ack or nack could not be delivered to the broker.
    #[error(
        "cannot {action} delivery {delivery_tag} of queue {queue} on RabbitMQ at {endpoint}: {reason}"
    )]
    Settle {
        /// `ack`, `nack (requeue)` or `reject`.
        action: &'static str,
        /// The channel-local delivery tag.
        delivery_tag: u64,
        /// The queue the message came from.
        queue: String,
        /// `host:port (vhost …)`.
        endpoint: String,
        /// Why (usually: the channel is gone, so the broker will redeliver the message).
        reason: String,
    },

    /// A caller-supplied value cannot be used (empty namespace, over-long name, prefetch 0,
    /// no tokio runtime, …).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which value.
        what: String,
        /// Why.
        reason: String,
    },
}

impl BrokerError {
    /// Whether retrying can help: lost connections and broker hiccups are transient, while
    /// bad URLs, conflicting topology and refused permissions fail the same way every time.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BrokerError::InvalidUrl { .. }
            | BrokerError::TopologyMismatch { .. }
            | BrokerError::Invalid { .. } => ErrorKind::Permanent,
            BrokerError::Operation { permanent, .. } if *permanent => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        }
    }
}

/// lapin's error in the words an operator needs: the OS error for I/O failures, the broker's
/// reply text (which names its code, e.g. `PRECONDITION_FAILED - …`) for protocol errors.
pub(crate) fn describe(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::IOError(io) => io.to_string(),
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
        lapin::ErrorKind::InvalidChannelState(state, context) => {
            format!("the channel is no longer open (state {state:?} during {context})")
        }
        lapin::ErrorKind::InvalidConnectionState(state) => {
            format!("the connection is no longer open (state {state:?})")
        }
        _ => e.to_string(),
    }
}

/// True when the broker answered NOT_FOUND (404), e.g. to a passive declare of a queue that
/// does not exist.
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

/// True when the broker refused for a reason retrying will not fix.
pub(crate) fn is_permanent(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTIMPLEMENTED)
        ),
        _ => false,
    }
}

/// True for the broker's PRECONDITION_FAILED (406): a declare that conflicts with what exists.
pub(crate) fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
    )
}

/// Replaces any occurrence of the password in a message we did not write ourselves.
pub(crate) fn scrub(text: String, password: &str) -> String {
    if password.len() >= 3 && text.contains(password) {
        text.replace(password, "***")
    } else {
        text
    }
}
