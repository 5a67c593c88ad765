//! `drover publish`: ledger first (`queued`), then the broker with publisher confirms.

use crate::cli::Context;
use anyhow::{Context as _, bail};
use clap::Args;
use drover_broker::{Broker, OutgoingJob, Topology};
use drover_core::message::parse_param;
use drover_core::{ExposeSecret, JobMessage};
use drover_ledger::{InsertOutcome, Ledger, NewJob};
use drover_pipeline::Registry;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing::Instrument;
use uuid::Uuid;

/// Jobs recorded and published per round trip when publishing a file.
const CHUNK: usize = 1000;

/// `drover publish` arguments.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  drover publish --pipeline noop --key hello-1
  drover publish --pipeline payroll --key acme:2026-11 --param client_id=acme \\
      --param period=2026-11 --param input=data/acme.parquet --batch-size 5000
  drover publish --file jobs.jsonl     # one contract-v1 JSON message per line
  drover publish --pipeline noop --key later-1 --delay 10m     # starts in 10 minutes
  drover publish --pipeline noop --key at-9 --run-at 2026-12-04T09:00:00Z --timeout-secs 600

A --param value is parsed as JSON when it is valid JSON (5, true, \"text\"), else taken as a
string. Publishing a key that exists prints its state and publishes nothing (exit 0).
Every message's params are checked first, including the pipeline's publish-time checks
(sql: the query parses and names only existing columns); one failure publishes nothing.")]
pub struct PublishArgs {
    /// Pipeline name (see `drover pipelines`).
    #[arg(long, required_unless_present = "file", conflicts_with = "file")]
    pipeline: Option<String>,
    /// Idempotency key: one business operation = one key.
    #[arg(long, required_unless_present = "file", conflicts_with = "file")]
    key: Option<String>,
    /// A pipeline parameter, name=value (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE", conflicts_with = "file")]
    params: Vec<String>,
    /// Pipeline parameters as one JSON object (merged under --param).
    #[arg(long, value_name = "JSON", conflicts_with = "file")]
    params_json: Option<String>,
    /// Rows per batch (overrides the pipeline default).
    #[arg(long, value_name = "N", conflicts_with = "file")]
    batch_size: Option<u32>,
    /// Attempts before the job is dead (overrides pipeline and worker defaults).
    #[arg(long, value_name = "N", conflicts_with = "file")]
    max_attempts: Option<u32>,
    /// Do not start the job before this time (RFC 3339, e.g. 2026-12-03T09:30:00Z).
    #[arg(long, value_name = "TIME", conflicts_with_all = ["file", "delay"])]
    run_at: Option<String>,
    /// Do not start the job before this long from now (e.g. 90s, 10m, 2h, 1day).
    #[arg(long, value_name = "DURATION", conflicts_with = "file")]
    delay: Option<String>,
    /// Longest one attempt may run, in seconds; a longer one fails as a transient error
    /// (and is retried).
    #[arg(long, value_name = "SECS", conflicts_with = "file")]
    timeout_secs: Option<u32>,
    /// Publish every message of a JSON Lines file (one contract-v1 message per line);
    /// `-` reads standard input. Every line is validated before anything is published.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Default attempts for jobs that name none and whose pipeline has no default.
    #[arg(long, value_name = "N", default_value_t = 5, hide = true)]
    default_max_attempts: u32,
    /// Print only the summary line.
    #[arg(long, short)]
    quiet: bool,
}

fn message_from_flags(args: &PublishArgs) -> anyhow::Result<JobMessage> {
    let mut params = match &args.params_json {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            Ok(other) => bail!("--params-json: expected a JSON object, got {other}"),
            Err(e) => bail!("--params-json: not JSON ({e})"),
        },
    };
    for p in &args.params {
        let (name, value) = parse_param(p).map_err(anyhow::Error::msg)?;
        params.insert(name, value);
    }
    let run_at = match (&args.run_at, &args.delay) {
        (Some(t), _) => Some(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "--run-at {t:?}: expected an RFC 3339 time such as 2026-12-03T09:30:00Z ({e})"
                    )
                })?
                .with_timezone(&chrono::Utc),
        ),
        (None, Some(d)) => {
            let delay = humantime::parse_duration(d).map_err(|e| {
                anyhow::anyhow!("--delay {d:?}: expected a duration such as 90s, 10m or 2h ({e})")
            })?;
            let delay = chrono::Duration::from_std(delay)
                .map_err(|e| anyhow::anyhow!("--delay {d:?}: too long ({e})"))?;
            Some(chrono::Utc::now() + delay)
        }
        (None, None) => None,
    };
    let msg = JobMessage::new(
        args.key.clone().unwrap_or_default(),
        args.pipeline.clone().unwrap_or_default(),
        params,
        args.batch_size,
        args.max_attempts,
    )?
    .with_run_at(run_at)
    .with_timeout_secs(args.timeout_secs)?;
    Ok(msg)
}

/// Reads and validates every line; fails listing each bad line (file:line: reason).
fn messages_from_file(path: &PathBuf) -> anyhow::Result<Vec<JobMessage>> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(path).with_context(|| format!("--file {}", path.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        match JobMessage::parse(line.as_bytes()) {
            Ok(m) => out.push((i + 1, m)),
            Err(e) => errors.push(format!("{}:{}: {}", path.display(), i + 1, e.reason)),
        }
    }
    let mut seen = HashSet::new();
    for (line, m) in &out {
        if !seen.insert(m.idempotency_key.clone()) {
            errors.push(format!(
                "{}:{line}: idempotency_key {:?} appears more than once in the file",
                path.display(),
                m.idempotency_key
            ));
        }
    }
    report_errors(errors)?;
    Ok(out.into_iter().map(|(_, m)| m).collect())
}

fn report_errors(errors: Vec<String>) -> anyhow::Result<()> {
    if errors.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 20;
    for e in errors.iter().take(SHOWN) {
        eprintln!("{e}");
    }
    if errors.len() > SHOWN {
        eprintln!("... and {} more", errors.len() - SHOWN);
    }
    bail!("{} invalid message(s); nothing was published", errors.len())
}

/// Records and publishes `msgs`; returns (published, already present) counts.
pub async fn publish_messages(
    ledger: &Ledger,
    broker: &Broker,
    topo: &Topology,
    registry: &Registry,
    msgs: &[JobMessage],
    default_max_attempts: u32,
    quiet: bool,
) -> anyhow::Result<(usize, usize)> {
    // One trace per publish command, continuing $TRACEPARENT when the caller has one.
    let span = tracing::info_span!(
        "publish",
        jobs = msgs.len(),
        trace_id = tracing::field::Empty
    );
    if let Ok(tp) = std::env::var("TRACEPARENT") {
        drover_broker::trace::continue_trace(&span, &tp);
    }
    let traceparent = drover_broker::trace::traceparent_of(&span);
    let trace_id = drover_broker::trace::trace_id_of(&span);
    if let Some(t) = &trace_id {
        span.record("trace_id", t.as_str());
    }
    let publisher = broker.publisher(topo).instrument(span.clone()).await?;
    let (mut published, mut existing) = (0, 0);
    for chunk in msgs.chunks(CHUNK) {
        let new: Vec<NewJob> = chunk
            .iter()
            .map(|m| NewJob {
                id: Uuid::new_v4(),
                key: m.idempotency_key.clone(),
                pipeline: m.pipeline.clone(),
                params: Value::Object(m.params.clone()),
                batch_size: m.batch_size.map(|b| b as i32),
                max_attempts: registry.max_attempts_for(m, default_max_attempts) as i32,
                trace_id: trace_id.clone(),
            })
            .collect();
        let outcomes = ledger
            .insert_queued(&new)
            .await
            .context("recording jobs in the ledger")?;
        let mut out = Vec::new();
        let mut ids = Vec::new();
        for (m, o) in chunk.iter().zip(&outcomes) {
            match o {
                InsertOutcome::Inserted { id } => {
                    out.push(OutgoingJob::new(id, m, traceparent.clone()));
                    ids.push(*id);
                }
                InsertOutcome::Exists {
                    id,
                    needs_publish: true,
                    ..
                } => {
                    if !quiet {
                        println!(
                            "{}: recorded earlier but never confirmed by the broker; publishing it now",
                            m.idempotency_key
                        );
                    }
                    out.push(OutgoingJob::new(id, m, traceparent.clone()));
                    ids.push(*id);
                }
                InsertOutcome::Exists { state, .. } => {
                    existing += 1;
                    if !quiet {
                        println!(
                            "{}: already exists ({state}); nothing published",
                            m.idempotency_key
                        );
                    }
                }
            }
        }
        publisher
            .publish_jobs(&out)
            .instrument(span.clone())
            .await
            .context("publishing to RabbitMQ")?;
        ledger.mark_enqueued(&ids).await?;
        if !quiet && msgs.len() <= 20 {
            for (m, o) in chunk.iter().zip(&outcomes) {
                if let InsertOutcome::Inserted { id }
                | InsertOutcome::Exists {
                    id,
                    needs_publish: true,
                    ..
                } = o
                {
                    println!("{}: published (job {id})", m.idempotency_key);
                }
            }
        }
        published += out.len();
    }
    Ok((published, existing))
}

/// `drover publish`.
pub async fn run(ctx: &Context, args: PublishArgs) -> anyhow::Result<ExitCode> {
    let registry = &ctx.registry;
    let msgs = match &args.file {
        Some(path) => messages_from_file(path)?,
        None => vec![message_from_flags(&args)?],
    };
    let errors: Vec<String> = msgs
        .iter()
        .filter_map(|m| {
            // validate, then the pipeline's publish-time checks (which may read the input,
            // e.g. `sql` plans its query against the input's columns): nothing is published
            // unless every message passes.
            registry
                .preflight(&m.pipeline, &Value::Object(m.params.clone()))
                .err()
                .map(|e| format!("{}: {e}", m.idempotency_key))
        })
        .collect();
    report_errors(errors)?;

    let ledger = ctx.migrated_ledger(4).await?;
    let broker = Broker::connect(ctx.conns.amqp_url.expose_secret(), "drover-publish").await?;
    let topo = Topology::for_connections(&ctx.conns);
    broker.declare(&topo).await?;
    let (published, existing) = publish_messages(
        &ledger,
        &broker,
        &topo,
        registry,
        &msgs,
        args.default_max_attempts,
        args.quiet,
    )
    .await?;
    if args.file.is_some() || args.quiet {
        println!("published {published}, already present {existing}");
    }
    // Every message is confirmed by now; a failed goodbye does not undo that.
    if let Err(e) = broker.close().await {
        tracing::warn!(error = %e, "closing the RabbitMQ connection");
    }
    ledger.close().await;
    Ok(ExitCode::SUCCESS)
}
