//! `drover lineage` (which part holds an input row, or a job's whole lineage) and
//! `drover verify` (re-hash parts, reconcile counts); also the lineage `jobs show` prints.

use crate::cli::Context;
use anyhow::Context as _;
use clap::Args;
use drover_ledger::{BatchRecord, JobView, Ledger};
use drover_pipeline::BatchOutcome;
use drover_pipeline::verify::{LedgerSide, Verification, verify_job};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;

/// `drover lineage`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  drover lineage payroll-acme-2026-11 --row 123456   # the part holding input row 123456
  drover lineage payroll-acme-2026-11 --json         # every batch's lineage

Input rows are numbered from 0 in the input's order (the file's row order, or the key order
of a Postgres input). Exit status 1 when the row is out of range or not processed yet.")]
pub struct LineageArgs {
    /// Idempotency key.
    pub key: String,
    /// The 0-based input row to locate; without it, every batch is listed.
    #[arg(long, value_name = "N")]
    pub row: Option<u64>,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `drover verify`.
#[derive(Debug, Args)]
#[command(after_help = "\
Checks, per job: every part is re-hashed and compared with the SHA-256 in _manifest.json
and in the ledger; the part's Parquet row count with the rows recorded; input rows with
the sum of the batches' rows and the job's rows_done. Names the first batch that
disagrees. Run it where the worker runs: the parts are read from the paths it recorded.

Exit status: 0 when every job verifies, 1 when any disagrees, 2 on a usage or ledger error.

Examples:
  drover verify payroll-acme-2026-11
  drover verify --since 24h               # every job that succeeded in the last 24 hours
  drover verify --since 2026-12-01T00:00:00Z --json")]
pub struct VerifyArgs {
    /// Idempotency keys of the jobs to verify.
    #[arg(required_unless_present = "since", conflicts_with = "since")]
    pub keys: Vec<String>,
    /// Verify every job that succeeded since this time: RFC 3339 (2026-12-01T00:00:00Z),
    /// or a duration back from now (24h, 7d).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// One JSON object per job (one per line) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A checkpoint as the pipeline crate's batch outcome (lineage fields where recorded).
fn outcome_of(r: &BatchRecord) -> anyhow::Result<BatchOutcome> {
    let summary = serde_json::from_value(r.summary.0.clone()).unwrap_or_default();
    let index = u32::try_from(r.batch_index)
        .with_context(|| format!("checkpoint with batch index {}", r.batch_index))?;
    let rows = u64::try_from(r.rows)
        .with_context(|| format!("batch {index}: {} rows recorded", r.rows))?;
    // No recorded first row: a batch of a release without lineage (`attempt` 0 says so).
    let (first_row, attempt) = match r.first_row {
        Some(f) => (
            u64::try_from(f).with_context(|| format!("batch {index}: first row {f}"))?,
            r.attempt.and_then(|a| u32::try_from(a).ok()).unwrap_or(0),
        ),
        None => (0, 0),
    };
    Ok(BatchOutcome {
        index,
        first_row,
        rows,
        rows_out: r.rows_out.and_then(|n| u64::try_from(n).ok()),
        attempt,
        output: r.output.clone(),
        checksum: r.checksum.clone(),
        summary,
    })
}

/// A job's lineage: what `jobs show`, `lineage` and `verify` read from the ledger.
pub struct Lineage {
    pub pipeline_version: Option<String>,
    pub inputs: Option<Value>,
    pub batches: Vec<BatchRecord>,
}

impl Lineage {
    pub async fn load(ledger: &Ledger, job: &JobView) -> anyhow::Result<Lineage> {
        let (pipeline_version, inputs) = ledger.identity(job.id).await?;
        let batches = ledger.checkpoints(job.id).await?;
        Ok(Lineage {
            pipeline_version,
            inputs,
            batches,
        })
    }

    /// The JSON `jobs show --json` gives as `lineage`.
    pub fn json(&self) -> Value {
        json!({
            "pipeline_version": self.pipeline_version,
            "inputs": self.inputs,
            "batches": self.batches.iter().map(batch_json).collect::<Vec<_>>(),
        })
    }

    /// The text `jobs show` (a long table cut, `all` false) and `lineage` print.
    pub fn print(&self, all: bool) {
        println!(
            "version:    {}",
            self.pipeline_version.as_deref().unwrap_or("(not recorded)")
        );
        match self.inputs.as_ref().and_then(|v| {
            serde_json::from_value::<Vec<drover_pipeline::Fingerprint>>(v.clone()).ok()
        }) {
            Some(inputs) => {
                for f in inputs {
                    println!("input:      {}  [{f}]", f.label());
                }
            }
            None => println!("input:      (no fingerprint recorded)"),
        }
        if self.batches.is_empty() {
            return;
        }
        println!("lineage:    batch  input rows             rows out  attempt  part  sha256");
        // A long job's table is cut: the first and last batches, and where the rest is.
        const SHOWN: usize = 20;
        let n = if all { 0 } else { self.batches.len() };
        for (i, b) in self.batches.iter().enumerate() {
            if n > SHOWN && i == SHOWN / 2 {
                println!(
                    "            ... {} more batches (`drover lineage KEY` lists them all)",
                    self.batches.len() - SHOWN
                );
            }
            if n > SHOWN && (SHOWN / 2..n - SHOWN / 2).contains(&i) {
                continue;
            }
            println!(
                "            {:<5}  {:<21}  {:>8}  {:>7}  {}  {}",
                b.batch_index,
                row_range(b),
                b.rows_out.map_or("-".to_string(), |n| n.to_string()),
                b.attempt.map_or("-".to_string(), |n| n.to_string()),
                b.output.as_deref().unwrap_or("-"),
                b.checksum.as_deref().unwrap_or("-"),
            );
        }
    }
}

/// `first..end` (end exclusive), or the row count alone when the first row is unknown.
fn row_range(b: &BatchRecord) -> String {
    match b.first_row {
        Some(f) => format!("{f}..{}", f + b.rows),
        None => format!("({} rows)", b.rows),
    }
}

fn batch_json(b: &BatchRecord) -> Value {
    json!({
        "batch": b.batch_index,
        "first_row": b.first_row,
        "rows": b.rows,
        "rows_out": b.rows_out,
        "part": b.output,
        "sha256": b.checksum,
        "attempt": b.attempt,
    })
}

/// `drover lineage KEY [--row N]`.
pub async fn lineage(ctx: &Context, args: LineageArgs) -> anyhow::Result<ExitCode> {
    let ledger = ctx.migrated_ledger(2).await?;
    let job = ledger.get(&args.key).await?;
    let lin = Lineage::load(&ledger, &job).await?;
    ledger.close().await;
    let Some(row) = args.row else {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&lin.json())?);
        } else {
            lin.print(true);
        }
        return Ok(ExitCode::SUCCESS);
    };
    let total_rows: Option<i64> = match (job.state, job.batches_total) {
        (drover_ledger::JobState::Succeeded, _) => Some(job.rows_done),
        _ => None,
    };
    let hit = lin.batches.iter().find(|b| {
        b.first_row
            .is_some_and(|f| (f as i128..(f + b.rows) as i128).contains(&(row as i128)))
    });
    let Some(b) = hit else {
        let why = if let Some(t) = total_rows {
            format!(
                "input row {row} is out of range: job {} read {t} input rows (0..{t})",
                args.key
            )
        } else if lin.batches.iter().any(|b| b.first_row.is_none()) {
            format!(
                "input row {row}: job {} has batches without recorded row ranges (checkpointed \
                 by an older release); it cannot be located",
                args.key
            )
        } else {
            let done: i64 = lin.batches.iter().map(|b| b.rows).sum();
            format!(
                "input row {row} is not processed yet: job {} is {} with {done} input rows \
                 checkpointed (0..{done})",
                args.key, job.state
            )
        };
        anyhow::bail!(why);
    };
    if args.json {
        let mut v = batch_json(b);
        v["key"] = json!(args.key);
        v["row"] = json!(row);
        v["row_in_batch"] = json!(row as i64 - b.first_row.unwrap_or(0));
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "input row {row} of {}: batch {} (input rows {}), part {} (sha256 {}), written by attempt {}",
            args.key,
            b.batch_index,
            row_range(b),
            b.output.as_deref().unwrap_or("(no output)"),
            b.checksum.as_deref().unwrap_or("-"),
            b.attempt.map_or("-".to_string(), |a| a.to_string()),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// When `--since` starts: RFC 3339, or a duration back from now.
fn parse_since(text: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let d = humantime::parse_duration(text).map_err(|e| {
        anyhow::anyhow!(
            "--since: expected an RFC 3339 time (2026-12-01T00:00:00Z) or a duration (24h, 7d), got {text:?} ({e})"
        )
    })?;
    let d = chrono::Duration::from_std(d).context("--since: duration too large")?;
    Ok(chrono::Utc::now() - d)
}

/// `drover verify KEY... | --since T`: exit 0 when every job verifies, 1 on a mismatch, 2
/// when it could not check (so cron tells a broken output from a broken check).
pub async fn verify(ctx: &Context, args: VerifyArgs) -> anyhow::Result<ExitCode> {
    match verify_all(ctx, &args).await {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!(
                "drover: error: verify could not run: {}",
                drover_core::error::error_chain(&*e)
            );
            Ok(ExitCode::from(2))
        }
    }
}

async fn verify_all(ctx: &Context, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let ledger = ctx.migrated_ledger(2).await?;
    let keys = match &args.since {
        Some(t) => ledger.succeeded_since(parse_since(t)?).await?,
        None => args.keys.clone(),
    };
    let mut bad = 0usize;
    for key in &keys {
        let job = ledger.get(key).await?;
        let lin = Lineage::load(&ledger, &job).await?;
        let batches = lin
            .batches
            .iter()
            .map(outcome_of)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let dir = output_dir(ctx, &job, &batches);
        let side = LedgerSide {
            rows_done: u64::try_from(job.rows_done).unwrap_or(u64::MAX),
            batches_total: job.batches_total.and_then(|t| u32::try_from(t).ok()),
            batches,
        };
        let v = if job.state == drover_ledger::JobState::Succeeded {
            let dir2 = dir.clone();
            tokio::task::spawn_blocking(move || verify_job(&side, dir2.as_deref()))
                .await
                .context("verify")?
        } else {
            Verification {
                mismatches: vec![drover_pipeline::verify::Mismatch {
                    batch: None,
                    what: format!("the job is {}, not succeeded: nothing to verify", job.state),
                }],
                ..Verification::default()
            }
        };
        if !v.ok() {
            bad += 1;
        }
        report(key, dir.as_deref(), &v, args.json)?;
    }
    ledger.close().await;
    if !args.json {
        if keys.is_empty() {
            println!("verify: no jobs to check");
        } else {
            println!(
                "verify: {} of {} jobs verified",
                keys.len() - bad,
                keys.len()
            );
        }
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The job's output directory: where the worker recorded its parts, else where this host's
/// configuration puts it; `None` for a pipeline without output.
fn output_dir(ctx: &Context, job: &JobView, batches: &[BatchOutcome]) -> Option<PathBuf> {
    if let Some(dir) = batches
        .iter()
        .find_map(|b| b.output.as_deref())
        .and_then(|p| std::path::Path::new(p).parent())
    {
        return Some(dir.to_path_buf());
    }
    crate::jobs::output_dir_here(ctx, job)
}

fn report(
    key: &str,
    dir: Option<&std::path::Path>,
    v: &Verification,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let line = json!({
            "key": key,
            "ok": v.ok(),
            "output": dir,
            "batches": v.batches,
            "parts": v.parts,
            "rows": v.rows,
            "first_bad_batch": v.first_bad_batch(),
            "mismatches": v.mismatches.iter().map(|m| json!({"batch": m.batch, "what": m.what})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string(&line)?);
        return Ok(());
    }
    if v.ok() {
        println!(
            "{key}: ok: {} batches, {} parts re-hashed, {} input rows reconciled",
            v.batches, v.parts, v.rows
        );
        return Ok(());
    }
    match v.first_bad_batch() {
        Some(b) => println!("{key}: MISMATCH: first bad batch {b}"),
        None => println!("{key}: MISMATCH"),
    }
    for m in &v.mismatches {
        println!("  {}", m.what);
    }
    Ok(())
}
