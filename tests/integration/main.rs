//! End-to-end tests of the `drover` binary against real RabbitMQ and Postgres.
//!
//! Each test gets its own database (`drover_t_<random>`), namespace (queues) and working
//! directory, so tests run in parallel and leave nothing behind. Waits are on events (log
//! lines, LISTEN/NOTIFY from the ledger, process exit), each bounded by a timeout.

mod support;

/// The binary every test drives.
pub const BIN: &str = env!("CARGO_BIN_EXE_drover");

mod cli;
mod cluster;
mod core;
mod dashboard;
mod exec;
mod ledger;
mod lifecycle;
mod lifecycle2;
mod lineage;
mod memory;
mod observability;
mod outage;
mod polish;
mod producers;
mod reliability;
mod security;
mod sql;
