//! `drover run`: a pipeline in-process, without broker or ledger, through the same
//! `JobRun` the worker drives batch by batch.

use crate::cli::Context;
use anyhow::bail;
use clap::Args;
use drover_core::message::parse_param;
use drover_pipeline::JobSpec;
use serde_json::{Map, Value};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// `drover run` arguments.
#[derive(Debug, Args)]
#[command(after_help = "\
Example:
  drover run payroll --param client_id=acme --param period=2026-11 \\
      --param input=demo-data/acme.parquet --output /tmp/out --json
  drover run sql --param input=demo-data/acme.parquet \\
      --param 'query=SELECT state, SUM(bonus_cents) AS bonus FROM batch GROUP BY state' \\
      --param 'combine=SELECT state, SUM(bonus) AS bonus FROM parts GROUP BY state' --json

Params are checked as `drover publish` checks them (including the pipeline's publish-time
checks, e.g. sql's query against the input's columns) before anything runs.")]
pub struct RunArgs {
    /// Pipeline name (see `drover pipelines`).
    pipeline: String,
    /// A pipeline parameter, name=value (repeatable; the value is JSON if it parses as JSON).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// Output root directory [default: ./drover-output].
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Rows per batch [default: the pipeline's].
    #[arg(long, value_name = "N")]
    batch_size: Option<usize>,
    /// Key naming the output directory [default: local-<pipeline>].
    #[arg(long)]
    key: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// `drover run`.
pub async fn run(ctx: &Context, args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut params = Map::new();
    for p in &args.params {
        let (k, v) = parse_param(p).map_err(anyhow::Error::msg)?;
        params.insert(k, v);
    }
    if args.batch_size == Some(0) {
        bail!("--batch-size: must be at least 1, got 0");
    }
    let registry = ctx.registry.clone();
    let params = Value::Object(params);
    // The same checks as `drover publish` (validate, then the publish-time preflight).
    registry.preflight(&args.pipeline, &params)?;
    let spec = JobSpec {
        key: args
            .key
            .clone()
            .unwrap_or_else(|| format!("local-{}", args.pipeline)),
        pipeline: args.pipeline.clone(),
        params,
        batch_size: args.batch_size,
        attempt: 1,
        output_root: args
            .output
            .clone()
            .unwrap_or_else(|| PathBuf::from("drover-output")),
    };
    let json = args.json;
    // Where the parts and `_manifest.json` go (`None`: the pipeline writes no output).
    let out_dir = registry.output_dir(&spec)?;
    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<Value> {
        let started = Instant::now();
        let mut run = registry.open(&spec, 0)?;
        let total = run.batches_total();
        let tty = std::io::stderr().is_terminal();
        let mut batches = Vec::new();
        while let Some(b) = run.next_batch()? {
            if tty {
                match total {
                    Some(t) => eprint!("\rbatch {}/{t}", b.index + 1),
                    None => eprint!("\rbatch {}", b.index + 1),
                }
            }
            batches.push(b);
        }
        if tty {
            eprintln!();
        }
        let result = run.finish(&batches)?;
        if !json {
            eprintln!(
                "{} batches in {:.2}s",
                batches.len(),
                started.elapsed().as_secs_f64()
            );
        }
        Ok(result)
    })
    .await??;
    if let Some(dir) = out_dir {
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let state = if dir.join(drover_pipeline::MANIFEST).is_file() {
            "complete: _manifest.json written"
        } else {
            "partial: no _manifest.json"
        };
        // On stderr with --json, so stdout stays one JSON document.
        let line = format!("output: {} ({state})", dir.display());
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else if let Value::Object(m) = &result {
        for (k, v) in m {
            println!("{k:<24} {v}");
        }
    } else {
        println!("{result}");
    }
    Ok(ExitCode::SUCCESS)
}
