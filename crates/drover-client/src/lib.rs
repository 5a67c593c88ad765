//! drover-client: the producer API for Rust programs.
//!
//! A producer records each job in the ledger first and publishes its message second, with
//! publisher confirms ([`Client::publish`], [`Client::publish_many`]); or, inside its own
//! database transaction, calls `drover.enqueue()` ([`enqueue`]) so the job exists exactly
//! when its business writes commit, and lets the workers publish it. Either way the ledger
//! decides what an idempotency key means: the same request again is a harmless
//! [`Outcome::Exists`], a different request under a used key is a [`Conflict`], and nothing
//! new runs in either case.
//!
//! `drover publish` is a thin layer over this crate, so there is one publish path.
//!
//! ```no_run
//! # async fn example() -> Result<(), drover_client::ClientError> {
//! use drover_client::{Client, JobMessage};
//! use drover_core::config::{Connections, FileConfig};
//! use std::time::Duration;
//!
//! let conns = Connections::resolve(None, None, None, &FileConfig::default())
//!     .expect("the defaults are valid");
//! let client = Client::connect(&conns).await?;
//! let job = JobMessage::new("hello-1", "noop", Default::default(), None, None)
//!     .map_err(|e| drover_client::ClientError::Invalid { key: "hello-1".into(), reason: e.reason })?;
//! client.publish(&job).await?;
//! let done = client.wait(&["hello-1".to_string()], Duration::from_secs(60)).await?;
//! assert_eq!(done[0].state, drover_client::JobState::Succeeded);
//! client.close().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod error;

pub use drover_core::{JobMessage, JobState};
pub use drover_ledger::{JobProgress, JobView};
pub use error::{ClientError, Conflict};

use chrono::{DateTime, Utc};
use drover_broker::{Broker, BrokerAddresses, OutgoingJob, Publisher, Topology};
use drover_core::ExposeSecret;
use drover_core::config::Connections;
use drover_ledger::{EnqueueJob, InsertOutcome, Ledger, LedgerError, NewJob};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;
use uuid::Uuid;

/// Jobs recorded and published per round trip.
pub const CHUNK: usize = 1000;

/// How long [`Client::connect`] waits for Postgres.
pub const LEDGER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The attempt limit stored for a job that names none when no [`Preflight`] knows better:
/// the worker's default.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// Checks a producer runs before anything is recorded, so a job its workers would reject
/// (an unknown pipeline, bad params) is refused at once, by the caller, naming the field.
///
/// The `drover` CLI implements it over its pipeline registry; a producer without the
/// pipelines' code leaves it out and the worker checks instead (the job then ends
/// `rejected` with the reason).
pub trait Preflight: Send + Sync {
    /// `Err(reason)` refuses the job; the reason names the field and the value.
    fn check(&self, job: &JobMessage) -> Result<(), String>;

    /// The attempt limit to store when the job names none (a pipeline's own default);
    /// `None` keeps [`DEFAULT_MAX_ATTEMPTS`] or the client's
    /// [`Client::with_default_max_attempts`].
    fn default_max_attempts(&self, _job: &JobMessage) -> Option<u32> {
        None
    }
}

/// What publishing one job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new job, recorded and confirmed by the broker.
    Published {
        /// The idempotency key.
        key: String,
        /// The ledger id, also the message's `message_id`.
        id: Uuid,
    },
    /// Recorded by an earlier publish that never got the broker's confirm (a crash in
    /// between); published now.
    Republished {
        /// The idempotency key.
        key: String,
        /// The ledger id, also the message's `message_id`.
        id: Uuid,
    },
    /// The same request was recorded before; nothing published.
    Exists {
        /// The idempotency key.
        key: String,
        /// The stored job's id.
        id: Uuid,
        /// The stored job's state.
        state: JobState,
    },
    /// The key exists for a different request; nothing published.
    Conflict {
        /// The stored job's id.
        id: Uuid,
        /// What differs.
        conflict: Conflict,
    },
}

impl Outcome {
    /// The job's idempotency key.
    pub fn key(&self) -> &str {
        match self {
            Outcome::Published { key, .. }
            | Outcome::Republished { key, .. }
            | Outcome::Exists { key, .. } => key,
            Outcome::Conflict { conflict, .. } => &conflict.key,
        }
    }

    /// The job's ledger id (its message's `message_id`).
    pub fn id(&self) -> Uuid {
        match self {
            Outcome::Published { id, .. }
            | Outcome::Republished { id, .. }
            | Outcome::Exists { id, .. }
            | Outcome::Conflict { id, .. } => *id,
        }
    }
}

/// A producer's connections: the ledger (Postgres) and one confirm-mode channel to the
/// broker (RabbitMQ). Cheap to share by reference between tasks; call [`Client::close`]
/// when done so the channel and connection close cleanly.
pub struct Client {
    ledger: Ledger,
    broker: Broker,
    publisher: Publisher,
    preflight: Option<Arc<dyn Preflight>>,
    default_max_attempts: u32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("broker", &self.broker.endpoint())
            .field("default_max_attempts", &self.default_max_attempts)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the ledger (which must be migrated: `drover migrate`) and the broker, and
    /// declares the namespace's queues, so a first publish on a fresh broker is not lost.
    pub async fn connect(conns: &Connections) -> Result<Client, ClientError> {
        let addresses = BrokerAddresses::parse(conns.amqp_url.expose_secret())?;
        let topo = Topology::for_connections(conns);
        // The two services are set up side by side: each costs round trips (TCP, TLS, the
        // AMQP handshake and declarations, Postgres' start-up), and a short-lived producer
        // such as `drover publish` would otherwise wait for them one after the other. When
        // both fail, the ledger's error is the one reported, as when they were set up in turn.
        let ledger = async {
            let ledger = Ledger::connect(
                conns.database_url.expose_secret(),
                false,
                4,
                LEDGER_CONNECT_TIMEOUT,
            )
            .await?;
            ledger.check_schema().await?;
            Ok::<_, ClientError>(ledger)
        };
        let broker = async {
            let broker = addresses.connect("drover-client").await?;
            broker.declare(&topo).await?;
            let publisher = broker.publisher(&topo).await?;
            Ok::<_, ClientError>((broker, publisher))
        };
        let (ledger, broker) = ledger_first(ledger, broker).await?;
        let (broker, publisher) = broker;
        Ok(Client {
            ledger,
            broker,
            publisher,
            preflight: None,
            default_max_attempts: DEFAULT_MAX_ATTEMPTS,
        })
    }

    /// Runs `preflight` on every job before anything is recorded.
    pub fn with_preflight(mut self, preflight: Arc<dyn Preflight>) -> Self {
        self.preflight = Some(preflight);
        self
    }

    /// The attempt limit stored for jobs that name none (and whose pipeline has no default
    /// known to the [`Preflight`]).
    pub fn with_default_max_attempts(mut self, n: u32) -> Self {
        self.default_max_attempts = n;
        self
    }

    /// The ledger handle, for reads this client does not wrap.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Publishes one job: ledger first, then the broker with a confirm. A conflict (the key
    /// exists for a different request) is an error here; the same request again is
    /// [`Outcome::Exists`].
    pub async fn publish(&self, job: &JobMessage) -> Result<Outcome, ClientError> {
        let mut out = self.publish_many(std::slice::from_ref(job)).await?;
        out.pop().ok_or_else(|| ClientError::Invalid {
            key: job.idempotency_key.clone(),
            reason: "the ledger returned no outcome for the job".into(),
        })
    }

    /// Publishes many jobs, [`CHUNK`] per round trip: each chunk is recorded in one
    /// statement, published pipelined with confirms, then marked confirmed.
    ///
    /// Every job is checked first (contract, distinct keys, the [`Preflight`]); if any is
    /// refused, nothing is recorded and the error lists them all. Keys that exist for a
    /// different request are not published; the others are, and the call then fails with
    /// [`ClientError::Conflict`] carrying every outcome. On a broker error, the jobs of the
    /// failed chunk stay recorded without a confirm: publishing them again, or the workers'
    /// relay after its grace period, sends them.
    pub async fn publish_many(&self, jobs: &[JobMessage]) -> Result<Vec<Outcome>, ClientError> {
        self.check(jobs)?;
        // One span per call; a caller's span (e.g. from $TRACEPARENT) is its parent, and its
        // trace continues in the workers through each message's traceparent header.
        let span = tracing::info_span!(
            "publish",
            jobs = jobs.len(),
            trace_id = tracing::field::Empty
        );
        let traceparent = drover_broker::trace::traceparent_of(&span);
        let trace_id = drover_broker::trace::trace_id_of(&span);
        if let Some(t) = &trace_id {
            span.record("trace_id", t.as_str());
        }
        let mut outcomes = Vec::with_capacity(jobs.len());
        let mut conflicts = Vec::new();
        for chunk in jobs.chunks(CHUNK) {
            let new: Vec<NewJob> = chunk
                .iter()
                .map(|m| self.new_job(m, trace_id.clone()))
                .collect::<Result<_, _>>()?;
            let recorded = self
                .ledger
                .insert_queued(&new)
                .instrument(span.clone())
                .await?;
            let mut out = Vec::new();
            let mut ids = Vec::new();
            for (m, o) in chunk.iter().zip(recorded) {
                let key = m.idempotency_key.clone();
                let outcome = match o {
                    InsertOutcome::Inserted { id } => Outcome::Published { key, id },
                    InsertOutcome::Exists {
                        id,
                        needs_publish: true,
                        ..
                    } => Outcome::Republished { key, id },
                    InsertOutcome::Exists { id, state, .. } => Outcome::Exists { key, id, state },
                    InsertOutcome::Conflict { id, state, differs } => {
                        let conflict = Conflict {
                            key,
                            state: state.to_string(),
                            differs,
                        };
                        conflicts.push(conflict.clone());
                        Outcome::Conflict { id, conflict }
                    }
                };
                if let Outcome::Published { id, .. } | Outcome::Republished { id, .. } = &outcome {
                    out.push(OutgoingJob::new(id, m, traceparent.clone()));
                    ids.push(*id);
                }
                outcomes.push(outcome);
            }
            self.publisher
                .publish_jobs(&out)
                .instrument(span.clone())
                .await?;
            self.ledger.mark_enqueued(&ids).await?;
        }
        if conflicts.is_empty() {
            Ok(outcomes)
        } else {
            Err(ClientError::Conflict {
                conflicts,
                outcomes,
            })
        }
    }

    /// [`enqueue`] through this client (the transaction is the caller's, not the client's).
    pub async fn enqueue(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        job: &JobMessage,
    ) -> Result<bool, ClientError> {
        if let Some(p) = &self.preflight {
            p.check(job).map_err(|reason| ClientError::Invalid {
                key: job.idempotency_key.clone(),
                reason,
            })?;
        }
        enqueue(tx, job).await
    }

    /// The job stored under `key`, or `None` when there is none.
    pub async fn job(&self, key: &str) -> Result<Option<JobView>, ClientError> {
        match self.ledger.get(key).await {
            Ok(j) => Ok(Some(j)),
            Err(LedgerError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until every key's job is terminal (succeeded, dead, cancelled or rejected) and
    /// returns their progress in the order of `keys`; check each `state`. Wakes on the
    /// ledger's change notifications (LISTEN), polling every second as a fallback. A key not
    /// in the ledger yet is waited for like any other. Past `timeout`:
    /// [`ClientError::Timeout`] naming the keys still pending and their states.
    pub async fn wait(
        &self,
        keys: &[String],
        timeout: Duration,
    ) -> Result<Vec<JobProgress>, ClientError> {
        let deadline = Instant::now() + timeout;
        // LISTEN first, then read, so no change between the two is missed.
        let mut listener = self.ledger.listener().await.ok();
        loop {
            let rows = self.ledger.progress(keys).await?;
            let mut by_key: BTreeMap<String, JobProgress> = rows
                .into_iter()
                .map(|p| (p.idempotency_key.clone(), p))
                .collect();
            let done = keys
                .iter()
                .all(|k| by_key.get(k).is_some_and(JobProgress::is_terminal));
            if done {
                return Ok(keys.iter().filter_map(|k| by_key.remove(k)).collect());
            }
            let now = Instant::now();
            if now >= deadline {
                let pending = keys
                    .iter()
                    .filter(|k| !by_key.get(*k).is_some_and(JobProgress::is_terminal))
                    .map(|k| {
                        let state = by_key
                            .get(k)
                            .map_or("not in the ledger", |p| p.state.as_str());
                        format!("{k} ({state})")
                    })
                    .collect();
                return Err(ClientError::Timeout {
                    secs: timeout.as_secs(),
                    pending,
                });
            }
            let nap = (deadline - now).min(Duration::from_secs(1));
            match listener.as_mut() {
                Some(l) => {
                    if let Ok(Err(e)) = tokio::time::timeout(nap, l.recv()).await {
                        tracing::debug!(error = %e, "LISTEN connection lost, polling instead");
                        listener = None;
                    }
                }
                None => tokio::time::sleep(nap).await,
            }
        }
    }

    /// Closes the broker channel and connection cleanly (reply 200, so neither side logs a
    /// lost connection) and the ledger pool. Every publish has been confirmed before its
    /// call returned, so a failure here loses nothing.
    pub async fn close(self) -> Result<(), ClientError> {
        let Client {
            ledger,
            broker,
            publisher,
            ..
        } = self;
        // The broker closes the channels it handed out that are still alive, so the
        // publisher must live until then: dropped earlier, lapin would close its channel
        // by itself, racing the connection close ("invalid channel state: Closing").
        let closed = broker.close().await;
        drop(publisher);
        ledger.close().await;
        closed.map_err(ClientError::from)
    }

    fn check(&self, jobs: &[JobMessage]) -> Result<(), ClientError> {
        let mut problems = Vec::new();
        let mut seen = HashSet::new();
        for m in jobs {
            // Jobs built with JobMessage::new are valid; a struct literal may not be.
            if let Err(e) = JobMessage::parse(&m.to_body()) {
                problems.push(format!("{}: {}", m.idempotency_key, e.reason));
                continue;
            }
            if !seen.insert(m.idempotency_key.as_str()) {
                problems.push(format!(
                    "{}: idempotency_key appears more than once in one publish",
                    m.idempotency_key
                ));
            }
            if let Some(p) = &self.preflight
                && let Err(reason) = p.check(m)
            {
                problems.push(format!("{}: {reason}", m.idempotency_key));
            }
        }
        match problems.len() {
            0 => Ok(()),
            1 if jobs.len() == 1 => {
                let reason = problems.remove(0);
                let key = &jobs[0].idempotency_key;
                let reason = reason
                    .strip_prefix(&format!("{key}: "))
                    .unwrap_or(&reason)
                    .to_string();
                Err(ClientError::Invalid {
                    key: key.clone(),
                    reason,
                })
            }
            _ => Err(ClientError::Refused { problems }),
        }
    }

    fn new_job(&self, m: &JobMessage, trace_id: Option<String>) -> Result<NewJob, ClientError> {
        let invalid = |field: &str, n: u32| ClientError::Invalid {
            key: m.idempotency_key.clone(),
            reason: format!("field \"{field}\": {n} does not fit the ledger's integer column"),
        };
        let max_attempts = m
            .max_attempts
            .or_else(|| {
                self.preflight
                    .as_ref()
                    .and_then(|p| p.default_max_attempts(m))
            })
            .unwrap_or(self.default_max_attempts);
        Ok(NewJob {
            id: Uuid::new_v4(),
            key: m.idempotency_key.clone(),
            pipeline: m.pipeline.clone(),
            params: Value::Object(m.params.clone()),
            batch_size: m
                .batch_size
                .map(|b| i32::try_from(b).map_err(|_| invalid("batch_size", b)))
                .transpose()?,
            max_attempts: i32::try_from(max_attempts)
                .map_err(|_| invalid("max_attempts", max_attempts))?,
            max_attempts_given: m.max_attempts.is_some(),
            trace_id,
        })
    }
}

/// Enqueues `job` inside the caller's transaction with `drover.enqueue()`: it exists, and a
/// worker publishes it (within a second of the commit), only if `tx` commits. Returns true
/// when the key is new, false when the same request was enqueued or published before.
///
/// The pipeline name is checked by the worker (an unknown one ends `rejected`); run a
/// [`Preflight`] first, or use [`Client::enqueue`], to refuse it here. A conflict (the key
/// exists for a different request) is [`ClientError::Conflict`] and aborts `tx`, like any
/// SQL error.
pub async fn enqueue(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job: &JobMessage,
) -> Result<bool, ClientError> {
    enqueue_at(tx, job, None).await
}

/// [`enqueue`], published no earlier than `run_at`.
pub async fn enqueue_at(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job: &JobMessage,
    run_at: Option<DateTime<Utc>>,
) -> Result<bool, ClientError> {
    let params = Value::Object(job.params.clone());
    let int = |field: &str, n: u32| {
        i32::try_from(n).map_err(|_| ClientError::Invalid {
            key: job.idempotency_key.clone(),
            reason: format!("field \"{field}\": {n} does not fit the ledger's integer column"),
        })
    };
    let req = EnqueueJob {
        key: &job.idempotency_key,
        pipeline: &job.pipeline,
        params: &params,
        batch_size: job.batch_size.map(|b| int("batch_size", b)).transpose()?,
        max_attempts: job
            .max_attempts
            .map(|n| int("max_attempts", n))
            .transpose()?,
        run_at,
    };
    drover_ledger::enqueue(tx, &req).await.map_err(|e| match e {
        LedgerError::Conflict { key, message } => ClientError::Conflict {
            conflicts: vec![conflict_from_message(key, &message)],
            outcomes: Vec::new(),
        },
        LedgerError::EnqueueRefused { message } => ClientError::Invalid {
            key: job.idempotency_key.clone(),
            reason: message,
        },
        other => other.into(),
    })
}

/// Rebuilds a [`Conflict`] from `drover.enqueue`'s message,
/// `KEY: already exists (STATE) with different DIFFERS; nothing enqueued`.
fn conflict_from_message(key: String, message: &str) -> Conflict {
    let rest = message
        .strip_prefix(&format!("{key}: already exists ("))
        .unwrap_or(message);
    let (state, rest) = rest.split_once(") with different ").unwrap_or(("?", rest));
    let differs = rest.strip_suffix("; nothing enqueued").unwrap_or(rest);
    Conflict {
        key,
        state: state.to_string(),
        differs: differs.to_string(),
    }
}

/// Runs both set-ups at once. A failed ledger is reported at once; a failed broker waits for
/// the ledger's outcome, so that with both down the error is always the ledger's.
async fn ledger_first<L, B>(
    ledger: impl std::future::Future<Output = Result<L, ClientError>>,
    broker: impl std::future::Future<Output = Result<B, ClientError>>,
) -> Result<(L, B), ClientError> {
    tokio::pin!(ledger, broker);
    tokio::select! {
        l = &mut ledger => {
            let l = l?;
            Ok((l, broker.await?))
        }
        b = &mut broker => {
            let l = ledger.await?;
            Ok((l, b?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(which: &str) -> ClientError {
        ClientError::Invalid {
            key: which.into(),
            reason: "down".into(),
        }
    }

    #[tokio::test]
    async fn with_both_services_down_the_ledger_error_is_reported_even_when_the_broker_fails_first()
    {
        let ledger = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err::<(), _>(failure("ledger"))
        };
        let broker = async { Err::<(), _>(failure("broker")) };
        let e = ledger_first(ledger, broker).await.expect_err("both failed");
        assert_eq!(e.to_string(), "ledger: down");
        let ok_ledger = async { Ok::<_, ClientError>(1) };
        let broker = async { Err::<(), _>(failure("broker")) };
        let e = ledger_first(ok_ledger, broker)
            .await
            .expect_err("broker failed");
        assert_eq!(e.to_string(), "broker: down");
        let both = ledger_first(async { Ok::<_, ClientError>(1) }, async {
            Ok::<_, ClientError>(2)
        });
        assert_eq!(both.await.expect("both up"), (1, 2));
    }

    #[test]
    fn conflict_parsed_from_the_sql_message() {
        let c = conflict_from_message(
            "acme:2026-11".into(),
            "acme:2026-11: already exists (queued) with different params (period: \"2026-11\" vs \"2026-12\"); nothing enqueued",
        );
        assert_eq!(c.state, "queued");
        assert_eq!(c.differs, "params (period: \"2026-11\" vs \"2026-12\")");
        assert_eq!(
            c.to_string(),
            "acme:2026-11: already exists (queued) with different params (period: \"2026-11\" vs \"2026-12\"); nothing published"
        );
    }
}
