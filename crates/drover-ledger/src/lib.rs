//! drover-ledger: the Postgres job ledger.
//!
//! One row per idempotency key in `drover.jobs`, one per attempt in `drover.attempts`, one per
//! completed batch in `drover.checkpoints`. Every state transition of the job state machine
//! lives in this crate as one SQL transaction, so a reader finds "what moves a job from
//! running to retrying" in one place:
//!
//! ```text
//! queued → running → succeeded
//! running → retrying → queued → running …   (transient failure, retry scheduled)
//! running → dead                             (permanent failure / attempts exhausted)
//! rejected                                   (invalid message)
//! running → cancelled                        (operator, at a batch boundary)
//! running → queued                           (graceful shutdown released it)
//! running → retrying (due now) | dead        (lease expired: the rescuer re-drives it)
//! queued → dead                              (its message reached the delivery limit)
//! queued/retrying → same, run_at pushed back  (held back by a concurrency limit)
//! ```
//!
//! Invariants: a running job has exactly one lease owner; every write a worker makes about a
//! running job is conditioned on still holding that lease (`lease_owner` and `attempts`), so a
//! worker that lost its lease cannot overwrite the new owner's progress.

mod dashboard;
mod error;
mod group;
mod limits;
mod poison;
mod prune;
mod publish;
mod read;
mod relay;
mod rescue;
mod roles;
mod schedules;
mod transitions;

pub use dashboard::{
    ActionView, CheckpointView, Cursor, JobPage, JobRow, ListQuery, MAX_PAGE, MinuteCount,
    NewAction, RetryCounts, WorkerLeases,
};
pub use error::LedgerError;
pub use group::Group;
pub use limits::{HOLD_BACK, Limits};
pub use prune::{DEFAULT_PRUNE_STATES, Pruned};
pub use publish::{EnqueueJob, InsertOutcome, NewJob, enqueue};
pub use read::{AttemptView, DurationStats, JobFilter, JobProgress, JobView, StateCount};
pub use relay::{DueJob, ENQUEUE_CHANNEL, RelaySweep};
pub use rescue::{LedgerDrift, Rescued};
pub use roles::{RoleGrants, RoleNames, quote_role};
pub use schedules::{FireReport, Fired, NewSchedule, ScheduleView};
pub use transitions::{
    BatchRecord, Claim, ClaimedJob, Completion, FailOutcome, HeldEnd, IdentityRecord, LeaseLost,
    LeaseSeen,
};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// A pooled connection idle at least this long is pinged before it is used again.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// The migrations in the workspace's top-level `migrations/` directory, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

pub use drover_core::JobState;

/// A handle on the ledger: a connection pool plus the operations on it.
#[derive(Clone, Debug)]
pub struct Ledger {
    pool: PgPool,
    url: String,
}

impl Ledger {
    /// Connects to `url`, creating the database first if `create_database` and it is absent.
    ///
    /// Bounded: fails after `connect_timeout` with an error naming the (redacted) URL.
    pub async fn connect(
        url: &str,
        create_database: bool,
        max_connections: u32,
        connect_timeout: Duration,
    ) -> Result<Ledger, LedgerError> {
        Ledger::connect_with(url, create_database, max_connections, connect_timeout, None).await
    }

    /// [`connect`](Self::connect), and with `idle_in_transaction` every session of the pool
    /// is ended by Postgres when it sits idle inside a transaction for that long. Workers
    /// set it to their heartbeat period: a worker frozen (SIGSTOP, a paused VM) in the
    /// middle of a checkpoint would otherwise hold its job's row lock for as long as it is
    /// frozen, and the rescuer, which skips locked rows, could never re-drive the job.
    pub async fn connect_with(
        url: &str,
        create_database: bool,
        max_connections: u32,
        connect_timeout: Duration,
        idle_in_transaction: Option<Duration>,
    ) -> Result<Ledger, LedgerError> {
        let shown = drover_core::config::redact(url);
        let opts = PgConnectOptions::from_str(url).map_err(|e| LedgerError::BadUrl {
            url: shown.clone(),
            message: e.to_string(),
        })?;
        let mut opts = opts.log_statements(tracing::log::LevelFilter::Trace);
        if let Some(t) = idle_in_transaction {
            let ms = t.as_millis().max(1).to_string();
            opts = opts.options([("idle_in_transaction_session_timeout", ms.as_str())]);
        }
        if create_database {
            ensure_database(url, &shown, connect_timeout).await?;
        }
        // The server's socket first: a pool retries a refused connection until its acquire
        // timeout and then reports only "pool timed out", hiding the cause, while a bare TCP
        // (or Unix socket) connect fails at once with it. Only the socket: a whole Postgres
        // connection here (TLS handshake, start-up, authentication) would be made twice, and
        // the pool's own first connection reports every other failure (bad password, TLS,
        // no database) directly, since it retries only refused and starting-up servers.
        match tokio::time::timeout(connect_timeout, probe_socket(&opts)).await {
            Err(_) => {
                return Err(LedgerError::Timeout {
                    url: shown,
                    secs: connect_timeout.as_secs(),
                });
            }
            Ok(Err(e)) => {
                return Err(LedgerError::Connect {
                    url: shown,
                    source: sqlx::Error::Io(e),
                });
            }
            Ok(Ok(())) => {}
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(connect_timeout)
            // sqlx pings every idle connection before handing it out by default: one more
            // round trip, and one more wake-up of the Postgres backend, for every statement
            // of the worker's hot path. Only a connection idle for a while is checked; a
            // busy one that broke fails its statement as a connection error, which every
            // caller already retries (the worker holds the job until Postgres is back).
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(opts)
            .await
            .map_err(|source| match &source {
                sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000") => {
                    LedgerError::NoDatabase { url: shown.clone() }
                }
                sqlx::Error::PoolTimedOut => LedgerError::Timeout {
                    url: shown.clone(),
                    secs: connect_timeout.as_secs(),
                },
                _ => LedgerError::Connect {
                    url: shown.clone(),
                    source,
                },
            })?;
        Ok(Ledger {
            pool,
            url: url.to_string(),
        })
    }

    /// The pool, for callers that need plain SQL (tests, the CLI's stats).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations. Safe to run from several replicas at once: sqlx holds a
    /// Postgres advisory lock while it migrates, and applied migrations are skipped.
    pub async fn migrate(&self) -> Result<(), LedgerError> {
        MIGRATOR.run(&self.pool).await.map_err(LedgerError::Migrate)
    }

    /// Checks the schema is there, with a hint to run `drover migrate` if not.
    pub async fn check_schema(&self) -> Result<(), LedgerError> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('drover.jobs') IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        if exists {
            Ok(())
        } else {
            Err(LedgerError::NotMigrated {
                url: drover_core::config::redact(&self.url),
            })
        }
    }

    /// A cheap round trip, for readiness checks and outage detection.
    pub async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// A LISTEN connection subscribed to job change notifications (channel `drover_jobs`,
    /// payload = idempotency key).
    pub async fn listener(&self) -> Result<sqlx::postgres::PgListener, LedgerError> {
        let mut l = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        l.listen("drover_jobs").await?;
        Ok(l)
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Creates the database named in `url` if it does not exist. Tolerates a concurrent
/// creation by another replica.
async fn ensure_database(url: &str, shown: &str, timeout: Duration) -> Result<(), LedgerError> {
    use sqlx::migrate::MigrateDatabase;
    let exists = tokio::time::timeout(timeout, sqlx::Postgres::database_exists(url))
        .await
        .map_err(|_| LedgerError::Timeout {
            url: shown.to_string(),
            secs: timeout.as_secs(),
        })?
        .map_err(|source| LedgerError::Connect {
            url: shown.to_string(),
            source,
        })?;
    if exists {
        return Ok(());
    }
    match sqlx::Postgres::create_database(url).await {
        Ok(()) => Ok(()),
        Err(e) => {
            // Another process may have created it between our check and our CREATE.
            if sqlx::Postgres::database_exists(url).await.unwrap_or(false) {
                Ok(())
            } else {
                Err(LedgerError::CreateDatabase {
                    url: shown.to_string(),
                    source: e,
                })
            }
        }
    }
}

/// Connects to the server's socket named by `opts` (TCP, or the Unix socket of a
/// `host=/run/postgresql` URL) and closes it at once: the cause of a server that is down or
/// unreachable, without a whole Postgres connection.
async fn probe_socket(opts: &PgConnectOptions) -> std::io::Result<()> {
    let host = opts.get_host();
    let port = opts.get_port();
    let socket_dir = opts
        .get_socket()
        .map(|dir| dir.display().to_string())
        .or_else(|| host.starts_with('/').then(|| host.to_string()));
    match socket_dir {
        #[cfg(unix)]
        Some(dir) => {
            tokio::net::UnixStream::connect(format!("{dir}/.s.PGSQL.{port}")).await?;
        }
        #[cfg(not(unix))]
        Some(_) => {}
        None => {
            tokio::net::TcpStream::connect((host, port)).await?;
        }
    }
    Ok(())
}
