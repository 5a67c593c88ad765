//! Why a worker could not start. Once running, a worker does not fail: outages are waited
//! out and job failures end in the ledger.

use drover_broker::BrokerError;
use drover_ledger::LedgerError;
use std::net::SocketAddr;
use thiserror::Error;

/// A start-up failure of [`run`](crate::run).
///
/// Each message already includes its cause, so no variant names a `source`: an error chain
/// printed with `{:#}` (as the CLI does) says each cause once.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// The ledger could not be reached or is not migrated.
    #[error("starting the worker: {0}")]
    Ledger(LedgerError),
    /// The broker could not be reached or its topology declared.
    #[error("starting the worker: {0}")]
    Broker(BrokerError),
    /// The configuration is unusable.
    #[error("{field}: {message}")]
    Config {
        /// The setting at fault, as the CLI names it.
        field: &'static str,
        /// What is wrong with its value.
        message: String,
    },
    /// The HTTP port for health and metrics could not be bound.
    #[error(
        "--metrics-addr {addr}: cannot listen: {error} (another worker on this host? use port 0 for a free port, or \"off\")"
    )]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        error: std::io::Error,
    },
}

impl From<LedgerError> for WorkerError {
    fn from(e: LedgerError) -> Self {
        WorkerError::Ledger(e)
    }
}

impl From<BrokerError> for WorkerError {
    fn from(e: BrokerError) -> Self {
        WorkerError::Broker(e)
    }
}
