//! `drover`: the worker daemon and the CLI around it.
//!
//! This is the binary's edge: arguments are parsed here, errors become one line on stderr
//! and a non-zero exit code, and every subcommand lives in a module of its own.

mod cli;
mod demo;
mod jobs;
mod logging;
mod metrics;
mod publish;
mod run;
mod worker;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
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
    let code = match runtime.block_on(cli::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` prints the context chain on one line: "what: why: cause".
            eprintln!("drover: error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Flush spans before the runtime goes away.
    drop(telemetry);
    code
}
