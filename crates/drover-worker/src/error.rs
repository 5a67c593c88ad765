//! Why a worker could not start. Once running, a worker does not fail: outages are waited
//! out and job failures end in the ledger.

use drover_broker::BrokerError;
use drover_ledger::LedgerError;
use std::net::SocketAddr;
use thiserror::Error;

/// A start-up failure of [`run`](crate::run).
#[derive(Debug, Error)]
pub enum WorkerError {
    /// The ledger could not be reached or is not migrated.
    #[error("starting the worker: {0}")]
    Ledger(#[from] LedgerError),
    /// The broker could not be reached or its topology declared.
    #[error("starting the worker: {0}")]
    Broker(#[from] BrokerError),
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
        "--metrics-addr {addr}: cannot listen: {source} (another worker on this host? use port 0 for a free port, or \"off\")"
    )]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
}
