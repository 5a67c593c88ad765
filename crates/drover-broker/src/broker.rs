//! One AMQP connection and the channels opened on it.

use crate::consumer::JobConsumer;
use crate::endpoint::Endpoint;
use crate::error::{describe, is_not_found, is_permanent, is_precondition_failed, scrub};
use crate::publisher::Publisher;
use crate::reader::QueueReader;
use crate::topology::{JOBS_ROUTING_KEY, short};
use crate::{BrokerError, Topology};
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, DefaultConnectionBuilder, ExchangeKind};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tracing::{debug, info, warn};

/// How long [`Broker::connect`] waits for TCP + TLS + the AMQP handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Broker::close`] waits for each channel and for the connection to close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A queue's depth as a passive declare reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    /// Messages ready for delivery (not counting delivered, unacked ones).
    pub ready: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// One AMQP connection to RabbitMQ.
///
/// A worker opens one per (re)connection and takes a [`Publisher`] and a [`JobConsumer`] from
/// it; each gets its own channel, so a slow consumer never delays confirms and a channel error
/// on one side does not take the other down. Automatic recovery is deliberately off: when the
/// connection is lost, the consumer ends and the caller reconnects, redeclares and resumes,
/// which keeps the state after an outage explicit.
#[derive(Debug)]
pub struct Broker {
    connection: Connection,
    endpoint: Arc<str>,
    /// Channels handed out in publishers and consumers, so [`Broker::close`] can close them
    /// first. Weak: a dropped publisher or consumer lets lapin close its channel by itself.
    channels: Mutex<Vec<Weak<Channel>>>,
}

impl Broker {
    /// Connects to `url` (`amqp://user:pass@host:port/vhost`), naming the connection
    /// `connection_name` in the management UI, within [`CONNECT_TIMEOUT`].
    ///
    /// An `amqps://` URL connects with TLS (rustls), trusting the system's roots and the CA
    /// named by a `cacertfile=` query parameter, presenting the client certificate of
    /// `certfile=` and `keyfile=` when given (see [`crate::tls`]).
    ///
    /// Errors name `host:port (vhost …)` and the cause, never the password. Needs a tokio
    /// runtime (lapin's I/O is bound to it); outside one this returns an error, not a panic.
    pub async fn connect(url: &str, connection_name: &str) -> Result<Broker, BrokerError> {
        let endpoint = Endpoint::parse(url).map_err(|reason| BrokerError::InvalidUrl {
            url: crate::redact_url(url),
            reason,
        })?;
        let endpoint_text = endpoint.to_string();
        let uri: lapin::uri::AMQPUri = url.parse().map_err(|e: String| {
            // lapin's parse errors may quote the whole URL; only keep ones that do not.
            let reason = if e.contains("://") || e.contains('@') {
                "not a valid AMQP URI".to_string()
            } else {
                e
            };
            BrokerError::InvalidUrl {
                url: endpoint_text.clone(),
                reason,
            }
        })?;
        let password = uri.authority.userinfo.password.clone();
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BrokerError::Invalid {
                what: "runtime".into(),
                reason: format!(
                    "connecting to RabbitMQ at {endpoint_text} needs a tokio runtime, and none is running"
                ),
            });
        }
        let tls = crate::tls::tls_config(url, endpoint.tls)?;
        let props = ConnectionProperties::default().with_connection_name(connection_name.into());
        debug!(endpoint = %endpoint_text, connection_name, "connecting to RabbitMQ");
        let connect = async {
            DefaultConnectionBuilder::new()?
                .with_uri(uri)
                .with_properties(props)
                .with_tls_config(tls)
                .connect()
                .await
        };
        let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(BrokerError::Connect {
                    endpoint: endpoint_text,
                    detail: scrub(describe(&e), &password),
                });
            }
            Err(_) => {
                return Err(BrokerError::Connect {
                    endpoint: endpoint_text,
                    detail: format!(
                        "no answer within {} s (is the host reachable and is it RabbitMQ?)",
                        CONNECT_TIMEOUT.as_secs()
                    ),
                });
            }
        };
        info!(endpoint = %endpoint_text, connection_name, "connected to RabbitMQ");
        Ok(Broker {
            connection,
            endpoint: endpoint_text.into(),
            channels: Mutex::new(Vec::new()),
        })
    }

    /// `host:port (vhost …)` of this connection, for logs.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Whether the connection is still open; false once it closed or failed, which is the
    /// caller's cue to reconnect.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Declares the namespace's exchanges, queues and bindings (see [`Topology`]).
    ///
    /// Idempotent, so producers and workers both call it at start-up and after every
    /// reconnect. If `{ns}.jobs` (or another object) already exists with other arguments —
    /// a classic queue, another delivery limit — RabbitMQ answers PRECONDITION_FAILED and this
    /// returns [`BrokerError::TopologyMismatch`] naming the object, the differing argument
    /// and what to do.
    ///
    /// An account without the configure permission (a least-privilege worker or producer,
    /// see docs/security.md) is refused the declare; then the objects are checked with
    /// passive declares instead, which need no permission: if they all exist (an
    /// administrator declared them, e.g. with `drover migrate --broker`), that is enough,
    /// else the refusal is returned.
    pub async fn declare(&self, topo: &Topology) -> Result<(), BrokerError> {
        let declared = self.declare_objects(topo).await;
        self.declared_or_existing(declared, "the topology", &topo.namespace, async {
            self.verify_objects(topo).await.map(|()| true)
        })
        .await
    }

    /// The outcome of a declare of `what` (`name`: the namespace or queue, for the log),
    /// except that a permanent refusal (no configure permission)
    /// is forgiven when `exists` finds the objects with passive declares, which need no
    /// permission: an administrator declared them (`drover migrate --broker`). Otherwise
    /// the refusal stands.
    async fn declared_or_existing(
        &self,
        declared: Result<(), BrokerError>,
        what: &str,
        name: &str,
        exists: impl std::future::Future<Output = Result<bool, BrokerError>>,
    ) -> Result<(), BrokerError> {
        match declared {
            Err(
                refused @ BrokerError::Operation {
                    permanent: true, ..
                },
            ) => match exists.await {
                Ok(true) => {
                    info!(endpoint = %self.endpoint, name,
                            "no permission to declare {what}; it exists, using it");
                    Ok(())
                }
                Ok(false) => Err(refused),
                Err(e) => {
                    debug!(error = %e, "passive check of {what} failed too");
                    Err(refused)
                }
            },
            other => other,
        }
    }

    /// Passive declares of the namespace's exchanges and queues: they must exist.
    async fn verify_objects(&self, topo: &Topology) -> Result<(), BrokerError> {
        let channel = self.open_channel("check the topology").await?;
        let passive_exchange = ExchangeDeclareOptions {
            passive: true,
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for exchange in [topo.dead_letter_exchange(), topo.jobs_exchange()] {
            channel
                .exchange_declare(
                    short("exchange name", &exchange)?,
                    ExchangeKind::Direct,
                    passive_exchange,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| self.op_error(format!("find exchange {exchange}"), &e))?;
        }
        let passive_queue = QueueDeclareOptions {
            passive: true,
            durable: true,
            ..QueueDeclareOptions::default()
        };
        for queue in [topo.dead_queue(), topo.jobs_queue()] {
            channel
                .queue_declare(
                    short("queue name", &queue)?,
                    passive_queue,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| self.op_error(format!("find queue {queue}"), &e))?;
        }
        if let Err(e) = channel.close(200, "OK".into()).await {
            debug!(error = %describe(&e), "closing the check channel");
        }
        Ok(())
    }

    async fn declare_objects(&self, topo: &Topology) -> Result<(), BrokerError> {
        topo.validate()?;
        let channel = self.open_channel("declare the topology").await?;
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let dlx = topo.dead_letter_exchange();
        let jobs_exchange = topo.jobs_exchange();
        let dead = topo.dead_queue();
        let jobs = topo.jobs_queue();

        for exchange in [&dlx, &jobs_exchange] {
            let object = format!("exchange {exchange}");
            channel
                .exchange_declare(
                    short("exchange name", exchange)?,
                    ExchangeKind::Direct,
                    durable_exchange,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| self.declare_error(&object, "a durable direct exchange", &e))?;
        }
        if let Err(e) = channel
            .queue_declare(
                short("queue name", &dead)?,
                durable_queue,
                topo.dead_queue_arguments(),
            )
            .await
        {
            return Err(self
                .queue_declare_error(&dead, "a durable quorum queue", &e)
                .await);
        }
        self.bind(&channel, &dead, &dlx, &topo.dead_routing_key())
            .await?;
        if let Err(e) = channel
            .queue_declare(
                short("queue name", &jobs)?,
                durable_queue,
                topo.jobs_queue_arguments(),
            )
            .await
        {
            let expected = format!(
                "a durable quorum queue with x-delivery-limit {} that dead-letters to \
                 exchange {dlx} with routing key {}",
                topo.delivery_limit,
                topo.dead_routing_key()
            );
            return Err(self.queue_declare_error(&jobs, &expected, &e).await);
        }
        self.bind(&channel, &jobs, &jobs_exchange, JOBS_ROUTING_KEY)
            .await?;
        if let Err(e) = channel.close(200, "OK".into()).await {
            debug!(error = %describe(&e), "closing the declare channel");
        }
        debug!(endpoint = %self.endpoint, namespace = %topo.namespace, "topology declared");
        Ok(())
    }

    /// Declares `{ns}.poison` (a durable quorum queue) and binds it to `{ns}.dlx` with the
    /// dead-letter routing key, so it receives a copy of every message the broker
    /// dead-letters from `{ns}.jobs` at the delivery limit (see [`Topology::poison_queue`]).
    /// Idempotent; workers call it after [`declare`](Self::declare), and `drover migrate
    /// --broker` with it. Like [`declare`](Self::declare), an account without the configure
    /// permission is refused, and then a passive declare checks that the queue exists (an
    /// administrator declared it); else the refusal is returned.
    pub async fn declare_poison(&self, topo: &Topology) -> Result<(), BrokerError> {
        let declared = self.declare_poison_queue(topo).await;
        let queue = topo.poison_queue();
        self.declared_or_existing(declared, "the poison queue", &queue, async {
            Ok(self.queue_depth_if_exists(&queue).await?.is_some())
        })
        .await
    }

    async fn declare_poison_queue(&self, topo: &Topology) -> Result<(), BrokerError> {
        topo.validate()?;
        let channel = self.open_channel("declare the poison queue").await?;
        let queue = topo.poison_queue();
        let dlx = topo.dead_letter_exchange();
        channel
            .queue_declare(
                short("queue name", &queue)?,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                topo.dead_queue_arguments(),
            )
            .await
            .map_err(|e| {
                self.declare_error(&format!("queue {queue}"), "a durable quorum queue", &e)
            })?;
        self.bind(&channel, &queue, &dlx, &topo.dead_routing_key())
            .await?;
        if let Err(e) = channel.close(200, "OK".into()).await {
            debug!(error = %describe(&e), "closing the declare channel");
        }
        Ok(())
    }

    /// A publisher for the namespace on its own channel in confirm mode, so every publish is
    /// known to be stored (or reported as failed) before the caller moves on.
    pub async fn publisher(&self, topo: &Topology) -> Result<Publisher, BrokerError> {
        topo.validate()?;
        let channel = self.open_channel("open a publisher channel").await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| self.op_error("enable publisher confirms (confirm.select)".into(), &e))?;
        let channel = self.register(channel);
        Publisher::new(channel, topo, self.endpoint.clone())
    }

    /// Starts consuming `{ns}.jobs` with manual acks on a new channel, after `basic.qos`
    /// limits the unacked deliveries to `prefetch` — drover's concurrency limit and the bound
    /// on buffered messages. `consumer_tag` identifies the worker in the management UI
    /// (empty: the broker makes one up).
    pub async fn consume(
        &self,
        topo: &Topology,
        prefetch: u16,
        consumer_tag: &str,
    ) -> Result<JobConsumer, BrokerError> {
        topo.validate()?;
        self.consume_queue(&topo.jobs_queue(), prefetch, consumer_tag)
            .await
    }

    /// Starts consuming `{ns}.poison` (declared by [`declare_poison`](Self::declare_poison))
    /// with manual acks and `basic.qos(prefetch)`.
    pub async fn consume_poison(
        &self,
        topo: &Topology,
        prefetch: u16,
        consumer_tag: &str,
    ) -> Result<JobConsumer, BrokerError> {
        topo.validate()?;
        self.consume_queue(&topo.poison_queue(), prefetch, consumer_tag)
            .await
    }

    /// A [`QueueReader`] of `queue` on a channel of its own: messages taken one at a time
    /// with `basic.get`, settled by the caller (those left unacked go back to the queue when
    /// the reader or this connection closes).
    pub async fn reader(&self, queue: &str) -> Result<QueueReader, BrokerError> {
        short("queue name", queue)?;
        let channel = self
            .open_channel("open a channel to read the queue")
            .await?;
        let channel = self.register(channel);
        Ok(QueueReader::new(
            channel,
            queue.to_string(),
            self.endpoint.clone(),
        ))
    }

    async fn consume_queue(
        &self,
        queue: &str,
        prefetch: u16,
        consumer_tag: &str,
    ) -> Result<JobConsumer, BrokerError> {
        if prefetch == 0 {
            return Err(BrokerError::Invalid {
                what: "prefetch 0".into(),
                reason: "it must be at least 1 (AMQP reads 0 as \"unlimited\", which would \
                         defeat the concurrency bound)"
                    .into(),
            });
        }
        let tag = short("consumer tag", consumer_tag)?;
        let queue = queue.to_string();
        let channel = self.open_channel("open a consumer channel").await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| self.op_error(format!("set prefetch {prefetch} (basic.qos)"), &e))?;
        let consumer = channel
            .basic_consume(
                short("queue name", &queue)?,
                tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.op_error(format!("consume from queue {queue}"), &e))?;
        info!(endpoint = %self.endpoint, %queue, prefetch, consumer_tag = %consumer.tag(), "consumer started");
        let channel = self.register(channel);
        Ok(JobConsumer::new(
            channel,
            consumer,
            queue,
            self.endpoint.clone(),
        ))
    }

    /// Closes every channel still open (the broker requeues their unacked deliveries), then
    /// the connection, with reply 200 so the broker logs a clean close rather than a lost
    /// client. Each step is bounded by [`CLOSE_TIMEOUT`]. Closing an already lost connection
    /// is not an error.
    pub async fn close(self) -> Result<(), BrokerError> {
        let channels: Vec<Arc<Channel>> = {
            let mut list = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            list.drain(..).filter_map(|w| w.upgrade()).collect()
        };
        let mut first_error = None;
        for channel in channels {
            if !channel.status().connected() {
                continue;
            }
            let action = format!("close channel {}", channel.id());
            match tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "OK".into())).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if channel.status().connected() {
                        first_error.get_or_insert_with(|| self.op_error(action, &e));
                    }
                }
                Err(_) => {
                    first_error.get_or_insert_with(|| self.timeout_error(action));
                }
            }
        }
        if self.connection.status().connected() {
            match tokio::time::timeout(CLOSE_TIMEOUT, self.connection.close(200, "OK".into())).await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if self.connection.status().connected() {
                        first_error.get_or_insert_with(|| {
                            self.op_error("close the connection".into(), &e)
                        });
                    }
                }
                Err(_) => {
                    first_error
                        .get_or_insert_with(|| self.timeout_error("close the connection".into()));
                }
            }
        }
        match first_error {
            None => {
                debug!(endpoint = %self.endpoint, "connection closed");
                Ok(())
            }
            Some(e) => {
                warn!(error = %e, "closing the RabbitMQ connection");
                Err(e)
            }
        }
    }

    /// How many messages wait ready in `queue` (e.g. `{ns}.jobs`) and how many consumers it
    /// has (a passive declare on a channel of its own, closed afterwards). The ready count
    /// leaves out messages delivered to a consumer and not yet acked. The rescuer and
    /// `drover doctor` compare it with the ledger's `queued` jobs to find lost messages.
    pub async fn queue_depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        self.queue_depth_if_exists(queue)
            .await?
            .ok_or_else(|| BrokerError::Operation {
                action: format!("inspect queue {queue} (passive declare)"),
                endpoint: self.endpoint.to_string(),
                detail: format!("NOT_FOUND: no queue {queue:?} (start a worker or run drover publish to declare it)"),
                permanent: true,
            })
    }

    /// Like [`Broker::queue_depth`], but `Ok(None)` when the queue does not exist (NOT_FOUND
    /// closes only the inspecting channel), so the dashboard can say "not declared yet".
    pub async fn queue_depth_if_exists(
        &self,
        queue: &str,
    ) -> Result<Option<QueueDepth>, BrokerError> {
        let channel = self
            .open_channel("open a channel to inspect the queue")
            .await?;
        let declared = channel
            .queue_declare(
                short("queue name", queue)?,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(q) => {
                if let Err(e) = channel.close(200, "OK".into()).await {
                    debug!(error = %describe(&e), "closing the inspect channel");
                }
                Ok(Some(QueueDepth {
                    ready: q.message_count(),
                    consumers: q.consumer_count(),
                }))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.op_error(format!("inspect queue {queue} (passive declare)"), &e)),
        }
    }

    async fn open_channel(&self, purpose: &str) -> Result<Channel, BrokerError> {
        self.connection
            .create_channel()
            .await
            .map_err(|e| self.op_error(purpose.to_string(), &e))
    }

    fn register(&self, channel: Channel) -> Arc<Channel> {
        let channel = Arc::new(channel);
        let mut list = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&channel));
        channel
    }

    /// Binds `queue` to `exchange` with `routing_key` (one step of declaring the topology).
    async fn bind(
        &self,
        channel: &Channel,
        queue: &str,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), BrokerError> {
        channel
            .queue_bind(
                short("queue name", queue)?,
                short("exchange name", exchange)?,
                short("routing key", routing_key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.op_error(format!("bind queue {queue} to exchange {exchange}"), &e))
    }

    fn op_error(&self, action: String, e: &lapin::Error) -> BrokerError {
        BrokerError::Operation {
            action,
            endpoint: self.endpoint.to_string(),
            detail: describe(e),
            permanent: is_permanent(e),
        }
    }

    fn timeout_error(&self, action: String) -> BrokerError {
        BrokerError::Operation {
            action,
            endpoint: self.endpoint.to_string(),
            detail: format!("no answer within {} s", CLOSE_TIMEOUT.as_secs()),
            permanent: false,
        }
    }

    /// [`Broker::declare_error`] for a queue, which also finds out the existing queue's type
    /// when it is not a quorum queue: RabbitMQ names only the first argument that differs
    /// (for a classic queue, usually `x-dead-letter-exchange`), so the error would not say
    /// that the queue is of the wrong type, the one difference that cannot be fixed in place.
    async fn queue_declare_error(
        &self,
        queue: &str,
        expected: &str,
        e: &lapin::Error,
    ) -> BrokerError {
        let err = self.declare_error(&format!("queue {queue}"), expected, e);
        if !is_precondition_failed(e) {
            return err;
        }
        match (self.existing_queue_type(queue).await, err) {
            (
                Some((current, untyped)),
                BrokerError::TopologyMismatch {
                    object,
                    endpoint,
                    detail,
                    ..
                },
            ) => {
                let hint = queue_type_hint(queue, &current, untyped, expected);
                BrokerError::TopologyMismatch {
                    object,
                    endpoint,
                    detail,
                    hint,
                }
            }
            (_, err) => err,
        }
    }

    /// The type of existing queue `queue` when it is not `quorum` (`None` when it is, or when
    /// the broker does not say), and whether it has no `x-queue-type` argument at all. Declares it, on a channel of its own, with nothing but
    /// `x-queue-type: quorum`: every other argument is then absent on both sides, so a
    /// PRECONDITION_FAILED can only name `x-queue-type`, with the existing value (`none`
    /// for a queue declared without one: classic, the default type).
    async fn existing_queue_type(&self, queue: &str) -> Option<(String, bool)> {
        let channel = self.open_channel("probe the queue's type").await.ok()?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
        let probe = channel
            .queue_declare(
                short("queue name", queue).ok()?,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await;
        let Err(e) = probe else {
            if let Err(e) = channel.close(200, "OK".into()).await {
                debug!(error = %describe(&e), "closing the probe channel");
            }
            return None;
        };
        let detail = describe(&e);
        if !detail.contains("inequivalent arg 'x-queue-type'") {
            return None;
        }
        let untyped = detail.trim_end().ends_with("current is none");
        Some((
            current_value(&detail).unwrap_or("classic").to_string(),
            untyped,
        ))
    }

    fn declare_error(&self, object: &str, expected: &str, e: &lapin::Error) -> BrokerError {
        if !is_precondition_failed(e) {
            return self.op_error(format!("declare {object}"), e);
        }
        let detail = describe(e);
        BrokerError::TopologyMismatch {
            object: object.to_string(),
            endpoint: self.endpoint.to_string(),
            hint: mismatch_hint(object, expected, &detail),
            detail,
        }
    }
}

/// What an operator can do about a PRECONDITION_FAILED, based on the argument the broker
/// names in `inequivalent arg 'NAME' …` (the first difference it found; there may be more)
/// and on what drover expects (`expected`, e.g. "a durable quorum queue …").
fn mismatch_hint(object: &str, expected: &str, detail: &str) -> String {
    let arg = detail
        .split_once("inequivalent arg '")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(arg, _)| arg);
    let (kind, name) = object.split_once(' ').unwrap_or(("queue", object));
    let remedy = if kind == "exchange" {
        format!(
            "delete it (`rabbitmqadmin delete exchange name={name}`, or in the management UI) so \
             drover can recreate it, or use another --namespace"
        )
    } else {
        format!(
            "drain it and delete it (`rabbitmqctl delete_queue {name}`) so drover can recreate \
             it, or use another --namespace"
        )
    };
    let expected = format!("drover declares it as {expected}");
    let Some(arg) = arg else {
        return format!("{expected}; {remedy}");
    };
    if arg == "x-queue-type" {
        // A queue declared without the argument is of the broker's default type, classic.
        let current = current_value(detail).unwrap_or("classic");
        let untyped = detail.trim_end().ends_with("current is none");
        return queue_type_hint(name, current, untyped, &expected);
    }
    if detail.trim_end().ends_with("current is none") {
        return format!(
            "the existing {kind} has no {arg} argument, so it was not declared by drover (a \
             classic queue created by hand or by another tool?); {expected}; {remedy}"
        );
    }
    match arg {
        "x-delivery-limit" => format!(
            "it was declared with another delivery limit: give every producer and worker of \
             this namespace the same delivery limit, or {remedy}"
        ),
        "x-dead-letter-exchange" | "x-dead-letter-routing-key" => {
            format!("it dead-letters somewhere else ({arg} differs); {expected}; {remedy}")
        }
        "durable" => format!("its durability differs; {expected}; {remedy}"),
        "type" => format!("an exchange of another type has this name; {expected}; {remedy}"),
        _ => format!("argument {arg} differs; {expected}; {remedy}"),
    }
}

/// The hint for queue `name` found to be of type `current` where drover declares a quorum
/// queue: it names both types, since a queue's type is the one difference that cannot be
/// changed in place. `untyped`: the queue has no `x-queue-type` argument at all.
fn queue_type_hint(name: &str, current: &str, untyped: bool, expected: &str) -> String {
    let origin = if untyped {
        " (it has no x-queue-type argument, so it was not declared by drover)"
    } else {
        ""
    };
    let expected = expected
        .strip_prefix("drover declares it as ")
        .unwrap_or(expected);
    format!(
        "{name} is a {current} queue{origin} and drover needs a quorum queue (replicated on \
         the cluster's nodes, with a native delivery limit); a queue's type cannot be changed \
         in place, so drain it and delete it (`rabbitmqctl delete_queue {name}`) so drover \
         can recreate it as {expected}, or use another --namespace"
    )
}

/// The existing object's value in the broker's `… but current is the value 'X' of type …`
/// (or `… current is 'X'`); `None` when it says `current is none` or something else.
fn current_value(detail: &str) -> Option<&str> {
    let (_, current) = detail.split_once("but current is ")?;
    let current = current.strip_prefix("the value ").unwrap_or(current);
    let quoted = current.strip_prefix('\'')?;
    quoted.split_once('\'').map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::mismatch_hint;

    #[test]
    fn queue_type_hints_name_both_types() {
        let exp = "a durable quorum queue";
        let d = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'n.jobs' in vhost '/': received the value 'quorum' of type 'longstr' but current is none";
        let h = mismatch_hint("queue n.jobs", exp, d);
        assert!(
            h.starts_with("n.jobs is a classic queue (it has no x-queue-type argument"),
            "{h}"
        );
        assert!(h.contains("drover needs a quorum queue"), "{h}");
        let d = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'n.jobs' in vhost '/': received the value 'quorum' of type 'longstr' but current is the value 'stream' of type 'longstr'";
        let h = mismatch_hint("queue n.jobs", exp, d);
        assert!(h.starts_with("n.jobs is a stream queue and drover"), "{h}");
    }

    #[test]
    fn hints_name_the_argument() {
        let exp = "a durable quorum queue";
        let d = "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-exchange' for queue 'n.jobs' in vhost '/': received the value 'n.dlx' of type 'longstr' but current is none";
        let h = mismatch_hint("queue n.jobs", exp, d);
        assert!(h.contains("has no x-dead-letter-exchange argument"), "{h}");
        assert!(
            h.contains("drover declares it as a durable quorum queue"),
            "{h}"
        );
        assert!(h.contains("rabbitmqctl delete_queue n.jobs"), "{h}");
        let d = "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'n.jobs' in vhost '/': received '5' but current is '20'";
        assert!(mismatch_hint("queue n.jobs", exp, d).contains("another delivery limit"));
        let d = "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'n' in vhost '/': received 'direct' but current is 'fanout'";
        let h = mismatch_hint("exchange n", "a durable direct exchange", d);
        assert!(h.contains("rabbitmqadmin delete exchange name=n"), "{h}");
    }
}
