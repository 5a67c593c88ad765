//! `drover` as a library: the whole CLI (worker, publish, jobs, run, migrate, dashboard, ...) over a
//! registry of pipelines, so a team's binary with its own pipelines is a `main` of a few
//! lines:
//!
//! ```no_run
//! use drover::{Registry, noop::Noop};
//!
//! fn main() -> std::process::ExitCode {
//!     let mut registry = Registry::builtin();
//!     registry.register(Noop); // register your own `impl Pipeline` here
//!     drover::main(registry)
//! }
//! ```
//!
//! This crate is the binary's edge: arguments are parsed here, errors become one line on
//! stderr and a non-zero exit code, and every subcommand lives in a module of its own. The
//! engine is `drover-worker`, the pipelines' framework `drover-pipeline`.

pub mod cli;
mod daemon;
mod dashboard;
mod demo;
mod doctor;
mod jobs;
mod limits;
mod lineage;
mod logging;
mod memory;
mod migrate;
mod pipelines;
mod prune;
mod publish;
mod run;
mod schedules;

pub use drover_pipeline::{
    BatchContext, BatchOutcome, ErrorKind, Input, JobSpec, Output, OutputColumn, OutputSchema,
    ParamReader, Pipeline, PipelineError, Registry, Summary, noop, payroll,
};

use clap::Parser;
use drover_core::error::error_chain;
use std::process::ExitCode;

/// Parses the command line and runs the chosen subcommand with `registry`'s pipelines;
/// returns the process's exit code (errors are printed as one line on stderr).
pub fn main(registry: Registry) -> ExitCode {
    let cli = cli::Cli::parse();
    // Every TLS client here (Postgres, RabbitMQ, OTLP) is rustls on ring; the HTTP client
    // asks for a process-wide provider. Installing fails only when one is set already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let telemetry = logging::init(cli.global.log_format, cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("drover")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(cli::dispatch(cli, registry)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("drover: error: {}", error_chain(&*e));
            ExitCode::FAILURE
        }
    };
    // Flush spans before the runtime goes away.
    drop(telemetry);
    // A worker stopped before its jobs finished (grace period over, or a second Ctrl-C) has
    // released them; a batch still computing on a blocking thread must not hold the process
    // (dropping the runtime would wait for it). Its part, if it gets written, has the same
    // name and bytes as the next owner's.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

#[cfg(test)]
mod error_chain_tests {
    use anyhow::Context;
    use drover_core::error::error_chain;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let e = anyhow::Error::new(sqlx::Error::Io(io)).context("cannot connect to Postgres at X");
        assert_eq!(
            error_chain(&*e),
            "cannot connect to Postgres at X: error communicating with database: Connection refused"
        );
    }

    #[test]
    fn distinct_causes_are_all_kept_in_order() {
        let e = Err::<(), _>(std::io::Error::other("disk full"))
            .context("writing part 3")
            .context("running job k1")
            .unwrap_err();
        assert_eq!(
            error_chain(&*e),
            "running job k1: writing part 3: disk full"
        );
    }
}
