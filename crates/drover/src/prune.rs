//! `drover prune`: deletes finished jobs from the ledger (and their outputs when asked).

use crate::cli::Context;
use clap::Args;
use drover_ledger::DEFAULT_PRUNE_STATES;
use std::process::ExitCode;
use std::time::Duration;

/// `drover prune` arguments.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  drover prune --older-than 30d --dry-run          # what would go
  drover prune --older-than 30d                    # succeeded, cancelled, rejected jobs
  drover prune --older-than 90d --state dead --delete-outputs

Only finished jobs are pruned, by the time they finished; their attempts and checkpoints go
with them. Output files stay unless --delete-outputs is given. Workers prune on their own
with a [retention] table in the config file (older_than, states, delete_outputs, every).")]
pub struct PruneArgs {
    /// Prune jobs that finished longer ago than this (e.g. 30d, 12h).
    #[arg(long, value_name = "DURATION")]
    older_than: String,
    /// A state to prune (repeatable) [default: succeeded, cancelled, rejected].
    #[arg(long = "state", value_name = "STATE")]
    states: Vec<String>,
    /// List what would be pruned; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Also delete the pruned jobs' part files and manifests.
    #[arg(long)]
    delete_outputs: bool,
}

/// Parses a retention duration (`30d`, `12h`, `90s`), naming the setting in the error.
pub fn parse_duration(setting: &str, text: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(text).map_err(|e| {
        anyhow::anyhow!("{setting} {text:?}: expected a duration such as 30d, 12h or 90s ({e})")
    })
}

/// The states to prune: those named, else the defaults.
pub fn states_or_default(states: Vec<String>) -> Vec<String> {
    if states.is_empty() {
        DEFAULT_PRUNE_STATES.iter().map(|s| s.to_string()).collect()
    } else {
        states
    }
}

/// `drover prune`.
pub async fn run(ctx: &Context, args: PruneArgs) -> anyhow::Result<ExitCode> {
    let older_than = parse_duration("--older-than", &args.older_than)?;
    let states = states_or_default(args.states);
    let ledger = ctx.migrated_ledger(2).await?;
    let (mut jobs, mut files, mut absent) = (0, 0, 0);
    loop {
        let pruned = ledger
            .prune(
                older_than,
                &states,
                args.dry_run,
                drover_worker::PRUNE_BATCH,
            )
            .await?;
        jobs += pruned.len();
        for p in &pruned {
            if args.dry_run {
                println!(
                    "{}: {} ({} part files)",
                    p.idempotency_key,
                    p.state,
                    p.outputs.len()
                );
            }
        }
        if args.delete_outputs && !args.dry_run {
            let parts: Vec<String> = pruned.iter().flat_map(|p| p.outputs.clone()).collect();
            let (d, a) = drover_worker::delete_outputs(&parts);
            files += d;
            absent += a;
        }
        // A dry run lists one batch: the same rows would come back again.
        if args.dry_run || pruned.len() < drover_worker::PRUNE_BATCH as usize {
            break;
        }
    }
    ledger.close().await;
    let states = states.join(", ");
    if args.dry_run {
        println!(
            "dry run: {jobs} job(s) ({states}) finished over {} ago would be pruned",
            args.older_than
        );
    } else if args.delete_outputs {
        println!(
            "pruned {jobs} job(s) ({states}); deleted {files} output file(s), {absent} already gone"
        );
    } else {
        println!(
            "pruned {jobs} job(s) ({states}); output files kept (--delete-outputs removes them)"
        );
    }
    Ok(ExitCode::SUCCESS)
}
