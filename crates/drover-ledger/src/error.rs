//! Ledger errors: connection problems name the (redacted) URL; the rest say which job.
//! Causes are chained as `source()`, not repeated in the message, so `{:#}` prints each once.

use thiserror::Error;

/// Everything that can go wrong talking to the ledger.
#[derive(Debug, Error)]
pub enum LedgerError {
    #[error("database url {url}: {message}")]
    BadUrl { url: String, message: String },
    #[error("cannot connect to Postgres at {url}")]
    Connect { url: String, source: sqlx::Error },
    #[error("the database of {url} does not exist: run `drover migrate` (it creates it)")]
    NoDatabase { url: String },
    #[error("cannot connect to Postgres at {url}: no answer within {secs}s")]
    Timeout { url: String, secs: u64 },
    #[error("cannot create the database of {url}")]
    CreateDatabase { url: String, source: sqlx::Error },
    #[error("migrating the ledger failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("the ledger at {url} has no drover schema yet: run `drover migrate`")]
    NotMigrated { url: String },
    #[error("no job with idempotency key {0:?}")]
    NotFound(String),
    #[error("job {key:?} is {state}: {message}")]
    WrongState {
        key: String,
        state: drover_core::JobState,
        message: String,
    },
    /// The key exists for a different request (`drover.enqueue` raised
    /// `drover_idempotency_conflict`); the message names the key and what differs.
    #[error("{message}")]
    Conflict { key: String, message: String },
    /// `drover.enqueue` refused its input; the message names the field and the value.
    #[error("{message}")]
    EnqueueRefused { message: String },
    /// A row's `state` is not a state this version knows (a newer schema, or a hand edit).
    #[error("the ledger holds {0}")]
    UnknownState(#[from] drover_core::UnknownState),
    /// A caller's argument the ledger refuses, naming the field and the value.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// A caller's input (a filter, a cursor) is not usable; names the field and the value.
    #[error("{field}: {message}")]
    BadInput {
        field: &'static str,
        message: String,
    },
    #[error("ledger query failed")]
    Db(#[from] sqlx::Error),
    /// A grouped write (see `Group`) failed for every job in its group; `message` is the
    /// underlying error with its causes.
    #[error("grouped ledger write failed: {message}")]
    Grouped { message: String, connection: bool },
}

impl LedgerError {
    /// True when the error is about reaching Postgres rather than about the data: the worker
    /// then backs off and waits for the database instead of failing the job.
    pub fn is_connection(&self) -> bool {
        match self {
            LedgerError::Connect { source, .. } => is_connection_error(source),
            LedgerError::Timeout { .. } => true,
            LedgerError::Db(e) => is_connection_error(e),
            LedgerError::Grouped { connection, .. } => *connection,
            _ => false,
        }
    }
}

/// Whether a sqlx error means the database is unreachable (or shutting down).
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now,
            // 08xxx connection exceptions.
            db.code()
                .map(|c| c.starts_with("57P") || c.starts_with("08"))
                .unwrap_or(false)
        }
        _ => false,
    }
}
