//! `drover publish`: the command line over `drover-client` (ledger first, `queued`, then
//! the broker with publisher confirms).

use crate::cli::Context;
use anyhow::{Context as _, bail};
use clap::Args;
use drover_client::{Client, ClientError, Outcome, Preflight};
use drover_core::JobMessage;
use drover_core::message::parse_param;
use drover_pipeline::Registry;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tracing::Instrument;

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
string. Publishing a key that exists with the same pipeline, params and options prints its
state and publishes nothing (exit 0); with different ones it is a conflict that names what
differs (exit 1), and nothing is published for that key. Every message's params are checked
first, including the pipeline's publish-time checks (sql: the query parses and names only
existing columns); one failure publishes nothing.")]
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

/// A job's params from `--params-json` (an object) and then each `--param k=v` over it; shared
/// by `publish` and `schedules add`.
pub(crate) fn params_from_flags(
    params_json: Option<&str>,
    params: &[String],
) -> anyhow::Result<Map<String, Value>> {
    let mut out = match params_json {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            Ok(other) => bail!("--params-json: expected a JSON object, got {other}"),
            Err(e) => bail!("--params-json: not JSON ({e})"),
        },
    };
    for p in params {
        let (name, value) = parse_param(p).map_err(anyhow::Error::msg)?;
        out.insert(name, value);
    }
    Ok(out)
}

fn message_from_flags(args: &PublishArgs) -> anyhow::Result<JobMessage> {
    let params = params_from_flags(args.params_json.as_deref(), &args.params)?;
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
    report_errors(errors, "invalid message(s)")?;
    Ok(out.into_iter().map(|(_, m)| m).collect())
}

fn report_errors(errors: Vec<String>, what: &str) -> anyhow::Result<()> {
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
    bail!("{} {what}; nothing was published for them", errors.len())
}

/// The CLI's pre-publish checks: the registry knows every pipeline this binary runs, so an
/// unknown pipeline or bad params are refused before anything is recorded.
struct RegistryPreflight(Registry);

impl Preflight for RegistryPreflight {
    fn check(&self, job: &JobMessage) -> Result<(), String> {
        self.0
            .preflight(&job.pipeline, &Value::Object(job.params.clone()))
            .map_err(|e| e.to_string())
    }

    fn default_max_attempts(&self, job: &JobMessage) -> Option<u32> {
        self.0.default_max_attempts(&job.pipeline)
    }
}

/// Prints what happened to each job (for up to 20 jobs, unless `quiet`).
fn print_outcomes(outcomes: &[Outcome], quiet: bool) {
    if quiet || outcomes.len() > 20 {
        return;
    }
    for o in outcomes {
        match o {
            Outcome::Published { key, id } => println!("{key}: published (job {id})"),
            Outcome::Republished { key, id } => println!(
                "{key}: recorded earlier but never confirmed by the broker; published now (job {id})"
            ),
            Outcome::Exists { key, state, .. } => {
                println!("{key}: already exists ({state}); nothing published")
            }
            // Reported on stderr with the error.
            Outcome::Conflict { .. } => {}
        }
    }
}

fn counts(outcomes: &[Outcome]) -> (usize, usize) {
    let published = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Published { .. } | Outcome::Republished { .. }))
        .count();
    let existing = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Exists { .. }))
        .count();
    (published, existing)
}

/// `drover publish`: a thin layer over [`drover_client::Client`].
pub async fn run(ctx: &Context, args: PublishArgs) -> anyhow::Result<ExitCode> {
    let msgs = match &args.file {
        Some(path) => messages_from_file(path)?,
        None => vec![message_from_flags(&args)?],
    };
    // Refuse invalid jobs before connecting, so the answer does not depend on the services.
    let preflight = Arc::new(RegistryPreflight(ctx.registry.clone()));
    let errors = msgs
        .iter()
        .filter_map(|m| {
            // validate, then the pipeline's publish-time checks (which may read the input,
            // e.g. `sql` plans its query against the input's columns): nothing is published
            // unless every message passes.
            preflight
                .check(m)
                .err()
                .map(|e| format!("{}: {e}", m.idempotency_key))
        })
        .collect();
    report_errors(errors, "invalid message(s)")?;
    let client = Client::connect(&ctx.conns)
        .await?
        .with_preflight(preflight)
        .with_default_max_attempts(args.default_max_attempts);
    // One trace per publish command, continuing $TRACEPARENT when the caller has one.
    let span = tracing::info_span!("drover publish");
    if let Ok(tp) = std::env::var("TRACEPARENT") {
        drover_broker::trace::continue_trace(&span, &tp);
    }
    let result = client.publish_many(&msgs).instrument(span).await;
    // Every message is confirmed by now; a failed goodbye does not undo that.
    if let Err(e) = client.close().await {
        tracing::warn!(error = %e, "closing the connections");
    }
    let (outcomes, conflicts) = match result {
        Ok(outcomes) => (outcomes, Vec::new()),
        Err(ClientError::Conflict {
            conflicts,
            outcomes,
        }) => (outcomes, conflicts),
        Err(e @ ClientError::Refused { .. }) => bail!("{e}"),
        Err(e) => return Err(e).context("publishing"),
    };
    print_outcomes(&outcomes, args.quiet);
    let (published, existing) = counts(&outcomes);
    if args.file.is_some() || args.quiet {
        println!(
            "published {published}, already present {existing}, conflicts {}",
            conflicts.len()
        );
    }
    // Fails (exit 1) when there is any conflict, after listing them on stderr.
    report_errors(
        conflicts.iter().map(ToString::to_string).collect(),
        "conflicting key(s)",
    )?;
    Ok(ExitCode::SUCCESS)
}
