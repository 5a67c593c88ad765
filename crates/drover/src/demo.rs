//! `drover demo`: helpers for the demo and for benchmarks.

use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// `drover demo` subcommands.
#[derive(Debug, Subcommand)]
pub enum DemoCommand {
    /// Write realistic, deterministic payroll input (Parquet or CSV, by extension).
    Generate {
        /// Number of employees (rows).
        #[arg(long)]
        rows: u64,
        /// Client id written on every row.
        #[arg(long)]
        client: String,
        /// Pay period, YYYY-MM.
        #[arg(long)]
        period: String,
        /// Output file: .parquet or .csv.
        #[arg(long)]
        out: PathBuf,
        /// Random seed (same seed, same file).
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

/// `drover demo ...`.
pub async fn run(cmd: DemoCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DemoCommand::Generate {
            rows,
            client,
            period,
            out,
            seed,
        } => {
            let started = Instant::now();
            let path = out.clone();
            let written = tokio::task::spawn_blocking(move || {
                drover_pipeline::generate_payroll(rows, &client, &period, seed, &path)
            })
            .await??;
            println!(
                "wrote {written} rows to {} in {:.2}s",
                out.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
