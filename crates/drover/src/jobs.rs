//! `drover jobs`: list, show, wait for, cancel and retry jobs in the ledger.

use crate::cli::Context;
use clap::Subcommand;
use drover_ledger::{JobFilter, JobProgress, JobState, JobView, Ledger};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// `drover jobs` subcommands.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// Only jobs in this state (queued, running, retrying, succeeded, dead, rejected,
        /// cancelled).
        #[arg(long)]
        state: Option<JobState>,
        /// Only jobs of this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one job with its attempt history and lineage (pipeline version, input
    /// fingerprints, and per batch: input rows, rows out, part, SHA-256, attempt).
    Show {
        /// Idempotency key.
        key: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Wait until every named job is terminal, showing progress. Exit status: 0 if all
    /// succeeded; 1 if any ended dead, rejected or cancelled; 2 on timeout; 3 if a key is
    /// still not in the ledger after 2 s (a typo, or another database).
    Wait {
        /// Idempotency keys.
        #[arg(required = true)]
        keys: Vec<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Cancel a job: queued/retrying at once, running at its next batch boundary.
    Cancel {
        /// Idempotency key.
        key: String,
    },
    /// Re-drive a dead, rejected or cancelled job (attempt numbers continue). It resumes
    /// after its last checkpoint unless --from-scratch.
    Retry {
        /// Idempotency key.
        key: String,
        /// Start over: delete the job's output parts and manifest (at the paths the worker
        /// recorded; run this where the worker runs) and its checkpoints, and forget its
        /// recorded input fingerprints and pipeline version. The way out after the job died
        /// because its input or pipeline version changed.
        #[arg(long)]
        from_scratch: bool,
    },
}

/// `drover jobs ...`.
pub async fn run(ctx: &Context, cmd: JobsCommand) -> anyhow::Result<ExitCode> {
    let ledger = ctx.migrated_ledger(2).await?;
    let code = match cmd {
        JobsCommand::List {
            state,
            pipeline,
            limit,
            json,
        } => {
            let jobs = ledger
                .list(&JobFilter {
                    state,
                    pipeline,
                    limit: limit.clamp(1, 100_000),
                })
                .await?;
            if json {
                let rows: Vec<_> = jobs.iter().map(job_json).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_table(&jobs);
            }
            ExitCode::SUCCESS
        }
        JobsCommand::Show { key, json } => {
            let job = ledger.get(&key).await?;
            let attempts = ledger.attempts(job.id).await?;
            let lineage = crate::lineage::Lineage::load(&ledger, &job).await?;
            let output = output_of(ctx, &job);
            if json {
                let mut v = job_json(&job);
                v["attempt_history"] = serde_json::to_value(&attempts)?;
                v["lineage"] = lineage.json();
                v["output"] = output.as_ref().map_or(
                    serde_json::Value::Null,
                    |o| json!({"dir": o.dir, "manifest": o.manifest, "status": o.status}),
                );
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_show(&job, &attempts);
                if let Some(o) = &output {
                    println!("output:     {}", o.dir.display());
                    println!("            {}", o.status);
                }
                lineage.print(false);
            }
            ExitCode::SUCCESS
        }
        JobsCommand::Wait { keys, timeout } => {
            wait(&ledger, &keys, Duration::from_secs(timeout)).await?
        }
        JobsCommand::Cancel { key } => {
            let state = ledger.request_cancel(&key).await?;
            if state == JobState::Cancelled {
                println!("{key}: cancelled");
            } else {
                println!(
                    "{key}: {state}; cancellation requested, it stops at its next batch boundary"
                );
            }
            ExitCode::SUCCESS
        }
        JobsCommand::Retry { key, from_scratch } => {
            if from_scratch {
                retry_from_scratch(&ledger, &key).await?;
            } else {
                ledger.redrive(&key).await?;
                println!("{key}: scheduled for another attempt");
            }
            ExitCode::SUCCESS
        }
    };
    ledger.close().await;
    Ok(code)
}

/// `jobs retry KEY --from-scratch`: removes the output the checkpoints recorded (while the
/// job cannot run: it must be dead, rejected or cancelled), then resets the job in the
/// ledger so its next attempt starts at batch 0.
async fn retry_from_scratch(ledger: &Ledger, key: &str) -> anyhow::Result<()> {
    let job = ledger.get(key).await?;
    if !matches!(
        job.state,
        JobState::Dead | JobState::Rejected | JobState::Cancelled
    ) {
        anyhow::bail!(
            "{key}: {}: only dead, rejected or cancelled jobs can be retried",
            job.state
        );
    }
    let mut dirs = std::collections::BTreeSet::new();
    let mut removed = 0usize;
    for b in ledger.checkpoints(job.id).await? {
        let Some(part) = b.output else { continue };
        let path = std::path::PathBuf::from(&part);
        if let Some(d) = path.parent() {
            dirs.insert(d.to_path_buf());
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("{key}: removing part {part}: {e}; nothing was reset"),
        }
    }
    for d in &dirs {
        match std::fs::remove_file(d.join(drover_pipeline::MANIFEST)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!(
                "{key}: removing {}: {e}; nothing was reset",
                d.join(drover_pipeline::MANIFEST).display()
            ),
        }
    }
    let checkpoints = ledger.redrive_from_scratch(key).await?;
    println!(
        "{key}: scheduled to start over from batch 0 ({checkpoints} checkpoints discarded, \
         {removed} output parts removed)"
    );
    Ok(())
}

/// The documented JSON shape of a job (RFC 3339 times).
fn job_json(j: &JobView) -> serde_json::Value {
    json!({
        "idempotency_key": j.idempotency_key,
        "id": j.id,
        "pipeline": j.pipeline,
        // The ledger keeps the real params (the worker connects with them); what is shown
        // never carries a password.
        "params": drover_core::config::redact_params(&j.params.0),
        "state": j.state,
        "attempts": j.attempts,
        "failures": j.failures,
        "max_attempts": j.max_attempts,
        "batch_size": j.batch_size,
        "batches_done": j.batches_done,
        "batches_total": j.batches_total,
        "rows_done": j.rows_done,
        "result": j.result.as_ref().map(|r| &r.0),
        "last_error": j.last_error,
        "error_kind": j.error_kind,
        "run_at": j.run_at,
        "lease_owner": j.lease_owner,
        "heartbeat_at": j.heartbeat_at,
        "cancel_requested": j.cancel_requested,
        "trace_id": j.trace_id,
        "created_at": j.created_at,
        "started_at": j.started_at,
        "finished_at": j.finished_at,
    })
}

fn progress_text(batches_done: i32, batches_total: Option<i32>, rows: i64) -> String {
    match batches_total {
        Some(t) => format!("{batches_done}/{t} batches, {rows} rows"),
        None => format!("{batches_done} batches, {rows} rows"),
    }
}

/// Where a job's output is, as `jobs show` reports it.
struct OutputView {
    dir: std::path::PathBuf,
    /// Whether `_manifest.json` is in `dir` (the output is complete).
    manifest: bool,
    /// One sentence: complete, partial (and why), or not found on this host.
    status: String,
}

/// The job's output directory as this host's worker configuration resolves it
/// (`DROVER_OUTPUT_ROOT`, then `[worker] output_root`, then `./drover-output`), or the
/// pipeline's own `output` param; `None` for pipelines without output or unknown here.
fn output_of(ctx: &Context, job: &JobView) -> Option<OutputView> {
    let dir = output_dir_here(ctx, job)?;
    let manifest = dir.join(drover_pipeline::MANIFEST).is_file();
    let status = if manifest {
        "complete: _manifest.json is written (it lists every part)".to_string()
    } else if !dir.is_dir() {
        "not on this host (the worker's --output-root may differ), or not started".to_string()
    } else {
        let why = match job.state {
            JobState::Running | JobState::Queued | JobState::Retrying => {
                "the job has not finished; the parts are the batches done so far"
            }
            JobState::Dead | JobState::Cancelled | JobState::Rejected => {
                "the job stopped before its end; the parts are not a result"
            }
            JobState::Succeeded => "the job succeeded but the manifest is missing here",
        };
        format!("partial: no _manifest.json ({why})")
    };
    Some(OutputView {
        dir,
        manifest,
        status,
    })
}

/// The job's output directory as this host's worker configuration resolves it; `None` for
/// pipelines without output or unknown here.
pub(crate) fn output_dir_here(ctx: &Context, job: &JobView) -> Option<std::path::PathBuf> {
    let root = std::env::var_os("DROVER_OUTPUT_ROOT")
        .map(std::path::PathBuf::from)
        .or_else(|| ctx.file.worker.output_root.clone())
        .unwrap_or_else(|| std::path::PathBuf::from(drover_worker::DEFAULT_OUTPUT_ROOT));
    let spec = drover_pipeline::JobSpec {
        key: job.idempotency_key.clone(),
        pipeline: job.pipeline.clone(),
        params: job.params.0.clone(),
        batch_size: None,
        attempt: 1,
        output_root: root,
    };
    let dir = ctx.registry.output_dir(&spec).ok()??;
    Some(std::fs::canonicalize(&dir).unwrap_or(dir))
}

fn print_table(jobs: &[JobView]) {
    let key_w = jobs
        .iter()
        .map(|j| j.idempotency_key.chars().count())
        .max()
        .unwrap_or(3)
        .clamp(3, 48);
    println!(
        "{:<key_w$}  {:<10}  {:<9}  {:>8}  {:<28}  {:<20}  {:<20}",
        "KEY", "PIPELINE", "STATE", "FAILURES", "PROGRESS", "CREATED", "NEXT RUN"
    );
    for j in jobs {
        let key: String = j.idempotency_key.chars().take(key_w).collect();
        println!(
            "{key:<key_w$}  {:<10}  {:<9}  {:>8}  {:<28}  {:<20}  {:<20}",
            j.pipeline,
            j.state,
            // Failures against the limit: interrupted attempts (a drain) do not count, so
            // attempts/max would read "2/1" for a job that has not failed.
            format!("{}/{}", j.failures, j.max_attempts),
            progress_text(j.batches_done, j.batches_total, j.rows_done),
            j.created_at.format("%Y-%m-%d %H:%M:%S"),
            // A retry's due time, or a delayed job's run_at.
            j.run_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(|| "-".into()),
        );
    }
    if jobs.is_empty() {
        println!("(no jobs)");
    }
}

fn print_show(j: &JobView, attempts: &[drover_ledger::AttemptView]) {
    let t = |d: Option<chrono::DateTime<chrono::Utc>>| {
        d.map(|d| d.to_rfc3339()).unwrap_or_else(|| "-".into())
    };
    println!("key:        {}", j.idempotency_key);
    println!("id:         {}", j.id);
    println!("pipeline:   {}", j.pipeline);
    println!(
        "params:     {}",
        drover_core::shown::value(&drover_core::config::redact_params(&j.params.0))
    );
    println!("state:      {}", j.state);
    // The limit counts failures, not attempts (an attempt interrupted by a drain or a lost
    // lease is not one), so attempts are shown apart from it.
    println!(
        "attempts:   failures {} of {}, attempts {}",
        j.failures, j.max_attempts, j.attempts
    );
    println!(
        "progress:   {}",
        progress_text(j.batches_done, j.batches_total, j.rows_done)
    );
    if let Some(r) = &j.result {
        println!("result:     {}", r.0);
    }
    if let Some(e) = &j.last_error {
        println!(
            "last error: [{}] {e}",
            j.error_kind.as_deref().unwrap_or("?")
        );
    }
    if let Some(r) = j.run_at {
        println!("next run:   {}", r.to_rfc3339());
    }
    if let Some(o) = &j.lease_owner {
        println!("lease:      {o} (heartbeat {})", t(j.heartbeat_at));
    }
    if j.cancel_requested {
        println!("cancel:     requested");
    }
    println!("created:    {}", j.created_at.to_rfc3339());
    println!("started:    {}", t(j.started_at));
    println!("finished:   {}", t(j.finished_at));
    println!("attempt history:");
    for a in attempts {
        println!(
            "  #{:<3} {:<12} worker {}  {} → {}{}",
            a.attempt,
            a.outcome,
            a.worker,
            a.started_at.to_rfc3339(),
            t(a.finished_at),
            a.error
                .as_deref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        );
    }
}

/// A terminal progress bar for one job: `[#####-----] 5/10 batches, 50000 rows  running`.
fn bar_line(p: &JobProgress) -> String {
    const WIDTH: usize = 24;
    let filled = match (p.batches_total, p.state) {
        (_, JobState::Succeeded) => WIDTH,
        (Some(t), _) if t > 0 => (p.batches_done.max(0) as usize * WIDTH / t as usize).min(WIDTH),
        _ => 0,
    };
    let mut line = format!(
        "[{}{}] {}  {}",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        p.idempotency_key,
        progress_line(p)
            .split_once(": ")
            .map(|(_, rest)| rest.to_string())
            .unwrap_or_default()
    );
    if line.chars().count() > 160 {
        line = line.chars().take(159).collect::<String>() + "…";
    }
    line
}

fn progress_line(p: &JobProgress) -> String {
    let mut s = format!(
        "{}: {} ({}, attempt {})",
        p.idempotency_key,
        p.state,
        progress_text(p.batches_done, p.batches_total, p.rows_done),
        p.attempts
    );
    if p.state == JobState::Retrying
        && let Some(r) = p.run_at
    {
        // A due time already past (a retry due now, waiting for the relay) reads as "now",
        // not as a time in the past.
        if r > chrono::Utc::now() {
            s.push_str(&format!(", next attempt at {}", r.format("%H:%M:%S")));
        } else {
            s.push_str(", next attempt now");
        }
    }
    if !matches!(
        p.state,
        JobState::Succeeded | JobState::Running | JobState::Queued
    ) && let Some(e) = &p.last_error
    {
        s.push_str(&format!(": {e}"));
    }
    s
}

/// How long `jobs wait` waits for a key to appear in the ledger before saying it does not
/// exist: long enough for a publisher started just before (`publish ... & jobs wait ...`)
/// to insert its row, short enough that a typo is not a 10-minute hang.
const UNKNOWN_KEY_GRACE: Duration = Duration::from_secs(2);

/// Blocks until every key is terminal (LISTEN/NOTIFY, with a 1 s polling fallback),
/// printing a line whenever a job's state or progress changes.
async fn wait(ledger: &Ledger, keys: &[String], timeout: Duration) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let deadline = started + timeout;
    // LISTEN first, then read, so no change between the two is missed.
    let mut listener = match ledger.listener().await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "LISTEN unavailable, polling instead");
            None
        }
    };
    let tty = std::io::stdout().is_terminal();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut drawn = false;
    loop {
        let rows = ledger.progress(keys).await?;
        let by_key: BTreeMap<&str, &JobProgress> = rows
            .iter()
            .map(|p| (p.idempotency_key.as_str(), p))
            .collect();
        if tty {
            // One bar per job, redrawn in place.
            if drawn {
                print!("\x1b[{}A", keys.len());
            }
            for k in keys {
                let line = match by_key.get(k.as_str()) {
                    Some(p) => bar_line(p),
                    None => format!("{k}: unknown (not in the ledger yet)"),
                };
                println!("\x1b[2K{line}");
            }
            drawn = true;
        } else {
            for k in keys {
                let line = match by_key.get(k.as_str()) {
                    Some(p) => progress_line(p),
                    None => format!("{k}: unknown (not in the ledger yet)"),
                };
                if last.get(k) != Some(&line) {
                    println!("{line}");
                    last.insert(k.clone(), line);
                }
            }
        }
        let all_terminal = keys.iter().all(|k| {
            by_key
                .get(k.as_str())
                .map(|p| p.is_terminal())
                .unwrap_or(false)
        });
        if all_terminal {
            let failed: Vec<&str> = rows
                .iter()
                .filter(|p| p.state != JobState::Succeeded)
                .map(|p| p.idempotency_key.as_str())
                .collect();
            if failed.is_empty() {
                println!("all {} job(s) succeeded", keys.len());
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "drover: {} job(s) did not succeed: {}",
                failed.len(),
                failed.join(", ")
            );
            return Ok(ExitCode::from(1));
        }
        let now = Instant::now();
        let unknown: Vec<&str> = keys
            .iter()
            .filter(|k| !by_key.contains_key(k.as_str()))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() && now >= started + UNKNOWN_KEY_GRACE {
            eprintln!(
                "drover: no job with key {} in the ledger after {}s (a typo, or published to \
                 another --database-url?)",
                unknown.join(", "),
                UNKNOWN_KEY_GRACE.as_secs(),
            );
            return Ok(ExitCode::from(3));
        }
        if now >= deadline {
            let pending: Vec<String> = keys
                .iter()
                .filter(|k| {
                    !by_key
                        .get(k.as_str())
                        .map(|p| p.is_terminal())
                        .unwrap_or(false)
                })
                .map(|k| {
                    let state = by_key
                        .get(k.as_str())
                        .map(|p| p.state.as_str())
                        .unwrap_or("unknown");
                    format!("{k} ({state})")
                })
                .collect();
            eprintln!(
                "drover: timed out after {}s; not finished: {}",
                timeout.as_secs(),
                pending.join(", ")
            );
            return Ok(ExitCode::from(2));
        }
        let nap = (deadline - now).min(Duration::from_secs(1));
        match listener.as_mut() {
            Some(l) => {
                // A notification or the polling interval, whichever comes first.
                if let Ok(Err(e)) = tokio::time::timeout(nap, l.recv()).await {
                    tracing::warn!(error = %e, "LISTEN connection lost, polling instead");
                    listener = None;
                }
            }
            None => tokio::time::sleep(nap).await,
        }
    }
}

/// `drover stats` arguments.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Duration window: jobs that finished within the last SECS seconds.
    #[arg(long, default_value_t = 86_400, value_name = "SECS")]
    window_secs: u64,
    /// JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// `drover stats`.
pub async fn stats(ctx: &Context, args: StatsArgs) -> anyhow::Result<ExitCode> {
    let ledger = ctx.migrated_ledger(2).await?;
    let counts = ledger.state_counts().await?;
    let durations = ledger.duration_stats(args.window_secs as f64).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "window_secs": args.window_secs,
                "states": counts,
                "durations": durations,
            }))?
        );
    } else {
        println!("{:<16} {:<10} {:>10}", "PIPELINE", "STATE", "JOBS");
        for c in &counts {
            println!("{:<16} {:<10} {:>10}", c.pipeline, c.state, c.jobs);
        }
        println!();
        println!(
            "succeeded in the last {}s (first start to finish):",
            args.window_secs
        );
        println!(
            "{:<16} {:>10} {:>10} {:>10} {:>10}",
            "PIPELINE", "JOBS", "P50_S", "P95_S", "MAX_S"
        );
        let f = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
        for d in &durations {
            println!(
                "{:<16} {:>10} {:>10} {:>10} {:>10}",
                d.pipeline,
                d.finished,
                f(d.p50_secs),
                f(d.p95_secs),
                f(d.max_secs)
            );
        }
    }
    ledger.close().await;
    Ok(ExitCode::SUCCESS)
}
