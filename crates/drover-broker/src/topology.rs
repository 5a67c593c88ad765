//! Names and arguments of drover's queues and exchanges.

use crate::BrokerError;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Default namespace: queues `drover.jobs`, `drover.dead`, exchanges `drover`, `drover.dlx`.
pub const DEFAULT_NAMESPACE: &str = "drover";

/// Default quorum-queue delivery limit (`x-delivery-limit`): a message delivered this many
/// times without an ack is poison and is dead-lettered by the broker itself.
pub const DEFAULT_DELIVERY_LIMIT: u32 = drover_core::config::DEFAULT_DELIVERY_LIMIT;

/// Routing key that binds `{ns}.jobs` to the `{ns}` exchange.
pub const JOBS_ROUTING_KEY: &str = "jobs";

/// Queue and exchange names for one namespace (`--namespace`, default `drover`).
///
/// Several drover deployments can share one vhost by using different namespaces. Producers
/// and workers must agree on both fields: RabbitMQ refuses to redeclare `{ns}.jobs` with a
/// different delivery limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Prefix of every queue and exchange name.
    pub namespace: String,
    /// `x-delivery-limit` of `{ns}.jobs`: broker-level poison-message protection.
    pub delivery_limit: u32,
}

impl Default for Topology {
    /// The `drover` namespace with the default delivery limit.
    fn default() -> Self {
        Topology::new(DEFAULT_NAMESPACE)
    }
}

impl Topology {
    /// Names for `namespace` with the default delivery limit (20).
    pub fn new(namespace: &str) -> Self {
        Topology {
            namespace: namespace.to_string(),
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
        }
    }

    /// The namespace and delivery limit every command resolved from the configuration.
    pub fn for_connections(conns: &drover_core::config::Connections) -> Self {
        Topology {
            namespace: conns.namespace.clone(),
            delivery_limit: conns.delivery_limit,
        }
    }

    /// `{ns}.jobs`: the durable quorum work queue workers consume from.
    pub fn jobs_queue(&self) -> String {
        format!("{}.jobs", self.namespace)
    }

    /// `{ns}.dead`: the durable quorum queue holding dead-lettered and rejected messages.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    /// `{ns}.poison`: the durable quorum queue that receives a copy of every message the
    /// broker dead-letters from `{ns}.jobs` (bound to `{ns}.dlx` beside `{ns}.dead`). Workers
    /// consume it to mark the jobs of messages that reached the delivery limit `dead` in the
    /// ledger, so the lost-message sweep does not publish a poison message again. Rejected
    /// messages (published straight to `{ns}.dead`) never reach it.
    pub fn poison_queue(&self) -> String {
        format!("{}.poison", self.namespace)
    }

    /// `{ns}.dlx`: the durable direct exchange `{ns}.jobs` dead-letters into (routing key
    /// `{ns}.dead`).
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.namespace)
    }

    /// `{ns}`: a durable direct exchange bound to `{ns}.jobs` with routing key `jobs`, for
    /// producers that prefer publishing to an exchange. Publishing to the default exchange
    /// with routing key `{ns}.jobs` reaches the same queue.
    pub fn jobs_exchange(&self) -> String {
        self.namespace.clone()
    }

    /// The routing key of dead-lettered messages (and the binding of `{ns}.dead` to the DLX).
    pub fn dead_routing_key(&self) -> String {
        self.dead_queue()
    }

    /// Arguments `{ns}.jobs` is declared with; every declarer must use the same ones.
    pub(crate) fn jobs_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), quorum());
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(self.dead_letter_exchange())),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(self.dead_routing_key())),
        );
        args
    }

    /// Arguments `{ns}.dead` is declared with.
    pub(crate) fn dead_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), quorum());
        args
    }

    /// Checks the namespace can form valid AMQP names (short strings of at most 255 bytes,
    /// and the `amq.` prefix is reserved by the broker).
    pub(crate) fn validate(&self) -> Result<(), BrokerError> {
        let invalid = |reason: String| BrokerError::Invalid {
            what: format!("namespace {:?}", self.namespace),
            reason,
        };
        if self.namespace.is_empty() {
            return Err(invalid("it must not be empty".into()));
        }
        if self.namespace.len() > 250 {
            return Err(invalid(format!(
                "it is {} bytes long; queue names are limited to 255 bytes, so the namespace to 250",
                self.namespace.len()
            )));
        }
        if self.namespace.starts_with("amq.") || self.namespace == "amq" {
            return Err(invalid(
                "names starting with \"amq.\" are reserved by RabbitMQ".into(),
            ));
        }
        if self.delivery_limit == 0 {
            return Err(invalid(
                "the delivery limit must be at least 1 (0 would dead-letter every message)".into(),
            ));
        }
        Ok(())
    }
}

fn quorum() -> AMQPValue {
    AMQPValue::LongString(LongString::from("quorum"))
}

/// Converts a name to an AMQP short string, refusing (instead of panicking, as lapin's
/// `From<String>` does) anything over 255 bytes.
pub(crate) fn short(what: &str, s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s).map_err(|e| BrokerError::Invalid {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let t = Topology::new("acme");
        assert_eq!(t.jobs_queue(), "acme.jobs");
        assert_eq!(t.dead_queue(), "acme.dead");
        assert_eq!(t.dead_letter_exchange(), "acme.dlx");
        assert_eq!(t.poison_queue(), "acme.poison");
        assert_eq!(t.jobs_exchange(), "acme");
        assert_eq!(t.delivery_limit, 20);
        assert_eq!(Topology::default().jobs_queue(), "drover.jobs");
    }

    #[test]
    fn validation() {
        assert!(Topology::new("drover").validate().is_ok());
        assert!(Topology::new("").validate().is_err());
        assert!(Topology::new("amq.x").validate().is_err());
        assert!(Topology::new(&"x".repeat(251)).validate().is_err());
        let mut t = Topology::new("x");
        t.delivery_limit = 0;
        assert!(t.validate().is_err());
        assert!(short("tag", &"y".repeat(256)).is_err());
    }

    #[test]
    fn jobs_arguments() {
        let args = Topology::new("n").jobs_queue_arguments();
        let inner = args.inner();
        assert_eq!(
            inner.get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(
            inner.get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(20))
        );
        assert_eq!(
            inner.get("x-dead-letter-exchange"),
            Some(&AMQPValue::LongString("n.dlx".into()))
        );
        assert_eq!(
            inner.get("x-dead-letter-routing-key"),
            Some(&AMQPValue::LongString("n.dead".into()))
        );
    }
}
