//! What can go wrong for a producer, each error naming the job, field or service involved.

use thiserror::Error;

/// Everything a [`Client`](crate::Client) call can fail with.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The job is not a valid contract-v1 message, or a pre-publish check refused it; the
    /// message names the key, the field and the value.
    #[error("{key}: {reason}")]
    Invalid {
        /// The job's idempotency key (as given, even when it is the invalid field).
        key: String,
        /// What is wrong, naming the field and the value.
        reason: String,
    },
    /// Several jobs of one call were refused (each line `key: reason`); nothing was
    /// recorded or published.
    #[error("{} invalid jobs; nothing was published:\n{}", .problems.len(), .problems.join("\n"))]
    Refused {
        /// One `key: reason` line per refused job.
        problems: Vec<String>,
    },
    /// The keys exist already for different requests. Nothing was published for them; the
    /// other jobs of the same call were (see `outcomes`).
    #[error("{}", conflict_text(.conflicts))]
    Conflict {
        /// One [`Conflict`] per refused key.
        conflicts: Vec<Conflict>,
        /// Every job of the call in input order, the conflicting ones included.
        outcomes: Vec<crate::Outcome>,
    },
    /// The ledger (Postgres) failed or refused; see the source.
    #[error("ledger: {0}")]
    Ledger(#[from] drover_ledger::LedgerError),
    /// The broker (RabbitMQ) failed or did not confirm. Jobs recorded in the ledger but not
    /// confirmed are published later by the workers' relay, or by publishing them again.
    #[error("broker: {0}")]
    Broker(#[from] drover_broker::BrokerError),
    /// [`Client::wait`](crate::Client::wait) gave up; `pending` lists `key (state)`.
    #[error("timed out after {secs}s waiting for {}", .pending.join(", "))]
    Timeout {
        /// The timeout that passed.
        secs: u64,
        /// `key (state)` of every job not terminal yet.
        pending: Vec<String>,
    },
}

/// One key refused because it exists for another request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The idempotency key.
    pub key: String,
    /// The stored job's state.
    pub state: String,
    /// What differs, stored value first: `params (period: "2026-11" vs "2026-12")`.
    pub differs: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: already exists ({}) with different {}; nothing published",
            self.key, self.state, self.differs
        )
    }
}

fn conflict_text(conflicts: &[Conflict]) -> String {
    conflicts
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}
