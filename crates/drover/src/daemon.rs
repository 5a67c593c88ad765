//! `drover worker`: resolves the flags, environment and `[worker]` table into a
//! [`WorkerConfig`] and runs the engine (`drover-worker`) until SIGTERM or SIGINT.

use crate::cli::Context;
use clap::Args;
use drover_worker::{
    DEFAULT_GRACE, DEFAULT_HEARTBEAT, DEFAULT_MAX_ATTEMPTS, DEFAULT_OUTPUT_ROOT, DEFAULT_PREFETCH,
    WorkerConfig,
};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tracing::{info, warn};

/// The health and metrics port when neither flag, variable nor `[worker] metrics_addr` names
/// one: fixed so a scraper finds it; a second worker on the host takes port 0 or `off`.
const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// `drover worker` arguments (each also settable in the `[worker]` table of the config file).
#[derive(Debug, Args)]
#[command(after_help = "\
The worker acks a message once the ledger holds its job (claimed, finished or scheduled);
from then on the ledger re-drives it: every worker's rescuer retries a running job whose
heartbeat is older than two periods, and publishes again a job queued for --lost-after-secs
while the queue holds no ready message. So a job may run longer than RabbitMQ's
consumer_timeout. SIGTERM/SIGINT: stop consuming, let running jobs reach their next batch
boundary (within --shutdown-grace-secs), checkpoint, publish the rest again, exit 0. A
second SIGTERM/SIGINT (Ctrl-C twice) stops at once: running jobs are released to queued and
published again, as when the grace period runs out.
A [retention] table in the config file makes the worker prune finished jobs.
Every worker also fires the due slots of `drover schedules` (once each, whatever the number
of workers), and marks dead a job whose message the broker dead-lettered at the delivery
limit (a poison message) instead of publishing it again.
Concurrency limits beyond the prefetch: --limit PIPELINE=N (per worker), or a
[limits.PIPELINE] table with per_worker, total (across all workers) and group_by + per_group
(e.g. one running payroll per client_id); a job over a limit waits in the ledger (no attempt
counted) and is published again every 2 s until a slot is free.
Memory-aware admission: --memory-limit SIZE (e.g. 2GiB) makes the worker claim a job only
while its resident memory (RSS, measured) plus the job's estimate stays under SIZE. The
estimate is the job's batch_size times the pipeline's bytes per row: --memory-per-row if
set, else learned from this worker's earlier batches of the pipeline (frame bytes per row
x4, the batches a job holds at once), else 4 KiB. A running job keeps its estimate reserved
until it ends. A job that does not fit waits unclaimed (no attempt counted) until a job of
this worker ends; one whose estimate alone exceeds SIZE can never fit and goes dead with
the estimate and the limit in its error. /metrics: drover_memory_* and
drover_jobs_waiting_for_memory.
Broker loss: reconnect with jittered backoff. Postgres loss: stop taking work until it is back.")]
pub struct WorkerArgs {
    /// Jobs in flight at once (AMQP basic.qos prefetch) [default: 8].
    #[arg(long, env = "DROVER_PREFETCH", value_name = "N")]
    prefetch: Option<u16>,
    /// Lease renewal period; a job whose heartbeat is older than two periods is taken over
    /// [default: 10].
    #[arg(long, env = "DROVER_HEARTBEAT_SECS", value_name = "SECS")]
    heartbeat_secs: Option<u64>,
    /// How long a draining worker waits for running jobs to reach a batch boundary
    /// [default: 30].
    #[arg(long, env = "DROVER_SHUTDOWN_GRACE_SECS", value_name = "SECS")]
    shutdown_grace_secs: Option<u64>,
    /// Root directory for pipeline output [default: ./drover-output].
    #[arg(long, env = "DROVER_OUTPUT_ROOT", value_name = "DIR")]
    output_root: Option<PathBuf>,
    /// Attempts for jobs that name none and whose pipeline has no default [default: 5].
    #[arg(long, env = "DROVER_MAX_ATTEMPTS", value_name = "N")]
    max_attempts: Option<u32>,
    /// This worker's id in leases and attempt history [default: host-pid-random].
    #[arg(long, env = "DROVER_WORKER_ID", value_name = "ID")]
    worker_id: Option<String>,
    /// Address of the HTTP port serving /healthz, /readyz and /metrics ("off" disables it;
    /// port 0 picks a free port, printed at start-up: use it for a second worker on one
    /// host) [default: 127.0.0.1:9464].
    #[arg(long, env = "DROVER_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<String>,
    /// How often the retry relay looks for due retries, in milliseconds.
    #[arg(long, default_value_t = 500, value_name = "MS", hide = true)]
    relay_interval_ms: u64,
    /// How long a job may wait queued, while the work queue holds no ready message, before
    /// its message is presumed lost (purged, dead-lettered) and published again
    /// [default: 60].
    #[arg(long, env = "DROVER_LOST_AFTER_SECS", value_name = "SECS")]
    lost_after_secs: Option<u64>,
    /// Most jobs of PIPELINE running on this worker at once (repeatable), over
    /// `[limits.PIPELINE] per_worker`.
    #[arg(long = "limit", value_name = "PIPELINE=N")]
    limits: Vec<String>,
    /// Claim a job only while this worker's resident memory (RSS) plus the job's estimate
    /// (batch_size x the pipeline's bytes per row) stays under SIZE: 2GiB, 512MiB, 1.5GB,
    /// or bytes. A job that does not fit waits, unclaimed, until a running job ends; a job
    /// whose estimate alone is over SIZE goes dead naming both. Absent or 0: no limit.
    #[arg(long, env = "DROVER_MEMORY_LIMIT", value_name = "SIZE")]
    memory_limit: Option<String>,
    /// Bytes per row of batch size a job of PIPELINE needs, for --memory-limit (repeatable),
    /// instead of learning it from batches: for a pipeline whose memory is outside the
    /// worker process (exec's child) or outgrows its frames.
    #[arg(long = "memory-per-row", value_name = "PIPELINE=SIZE")]
    memory_per_row: Vec<String>,
}

impl WorkerArgs {
    /// Flags (and their environment variables) over the `[worker]` table over defaults.
    fn resolve(self, ctx: &Context) -> anyhow::Result<WorkerConfig> {
        let f = &ctx.file.worker;
        let mut c = WorkerConfig::new(ctx.conns.clone());
        c.prefetch = self.prefetch.or(f.prefetch).unwrap_or(DEFAULT_PREFETCH);
        anyhow::ensure!(c.prefetch >= 1, "--prefetch: must be at least 1, got 0");
        let heartbeat = self.heartbeat_secs.or(f.heartbeat_secs);
        anyhow::ensure!(
            heartbeat != Some(0),
            "--heartbeat-secs: must be at least 1, got 0"
        );
        c.heartbeat = heartbeat.map_or(DEFAULT_HEARTBEAT, Duration::from_secs);
        c.max_attempts = self
            .max_attempts
            .or(f.max_attempts)
            .unwrap_or(DEFAULT_MAX_ATTEMPTS);
        anyhow::ensure!(
            c.max_attempts >= 1,
            "--max-attempts: must be at least 1, got 0"
        );
        c.grace = self
            .shutdown_grace_secs
            .or(f.shutdown_grace_secs)
            .map_or(DEFAULT_GRACE, Duration::from_secs);
        c.output_root = self
            .output_root
            .or_else(|| f.output_root.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_OUTPUT_ROOT));
        if let Some(id) = self.worker_id.or_else(|| f.id.clone()) {
            c.worker_id = id;
        }
        c.relay_interval = Duration::from_millis(self.relay_interval_ms.max(50));
        let lost_after_secs = self.lost_after_secs.or(f.lost_after_secs).unwrap_or(60);
        anyhow::ensure!(
            lost_after_secs >= 1,
            "--lost-after-secs: must be at least 1, got 0"
        );
        c.lost_after = Duration::from_secs(lost_after_secs);
        c.retention = match &ctx.file.retention {
            None => None,
            Some(r) => {
                let older_than = r.older_than.as_deref().ok_or_else(|| {
                    anyhow::anyhow!("[retention] older_than: required (e.g. \"30d\")")
                })?;
                let retention = drover_worker::Retention {
                    older_than: crate::prune::parse_duration("[retention] older_than", older_than)?,
                    states: crate::prune::states_or_default(r.states.clone().unwrap_or_default()),
                    delete_outputs: r.delete_outputs,
                    every: crate::prune::parse_duration(
                        "[retention] every",
                        r.every.as_deref().unwrap_or("1h"),
                    )?,
                };
                if let Some(bad) = retention.states.iter().find(|s| {
                    !s.parse::<drover_core::JobState>()
                        .is_ok_and(drover_core::JobState::is_terminal)
                }) {
                    anyhow::bail!(
                        "[retention] states: {bad:?} is not a finished state (succeeded, dead, cancelled, rejected)"
                    );
                }
                anyhow::ensure!(
                    !retention.every.is_zero(),
                    "[retention] every: must be more than 0"
                );
                Some(retention)
            }
        };
        c.limits = crate::limits::resolve(&ctx.file.limits, &self.limits, &ctx.registry)?;
        c.retry = ctx.file.retry.clone().unwrap_or_default();
        c.memory_limit =
            crate::memory::limit(self.memory_limit.as_deref(), f.memory_limit.as_deref())?;
        c.memory_per_row =
            crate::memory::per_row(&f.memory_per_row, &self.memory_per_row, &ctx.registry)?;
        let metrics_addr = self
            .metrics_addr
            .or_else(|| f.metrics_addr.clone())
            .unwrap_or_else(|| DEFAULT_METRICS_ADDR.to_string());
        c.metrics_addr =
            match metrics_addr.as_str() {
                "off" | "none" | "" => None,
                a => Some(a.parse().map_err(|e| {
                    anyhow::anyhow!("--metrics-addr {a:?}: expected host:port ({e})")
                })?),
            };
        Ok(c)
    }
}

/// `drover worker`.
pub async fn run(ctx: &Context, args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let config = args.resolve(ctx)?;
    // Signals seen so far: the first drains, the second stops now (see `count_signals`).
    let (tx, rx) = tokio::sync::watch::channel(0u32);
    let counter = tokio::spawn(count_signals(tx));
    let mut first = rx.clone();
    let mut second = rx;
    let shutdown = async move {
        let _ = first.wait_for(|n| *n >= 1).await;
    };
    let stop_now = async move {
        // A closed channel (signals unavailable) never means "stop now".
        if second.wait_for(|n| *n >= 2).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let result =
        drover_worker::run_with_stop(config, ctx.registry.clone(), shutdown, stop_now).await;
    counter.abort();
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Counts SIGTERM/SIGINT into `tx`: the first asks for a drain (running jobs reach their
/// next batch boundary within the grace period), the second for stopping at once (running
/// jobs are released to `queued` and published again, as after the grace period). Saying
/// so on the first keeps an operator from reaching for `kill -9`, which would leave the
/// jobs' leases to expire instead.
async fn count_signals(tx: tokio::sync::watch::Sender<u32>) {
    #[cfg(unix)]
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => Some(t),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the worker");
            None
        }
    };
    for n in 1u32..=2 {
        #[cfg(unix)]
        let signal = match term.as_mut() {
            Some(t) => tokio::select! {
                _ = t.recv() => "SIGTERM",
                r = tokio::signal::ctrl_c() => match r { Ok(()) => "SIGINT", Err(_) => return },
            },
            None => match tokio::signal::ctrl_c().await {
                Ok(()) => "SIGINT",
                Err(_) => return,
            },
        };
        #[cfg(not(unix))]
        let signal = match tokio::signal::ctrl_c().await {
            Ok(()) => "SIGINT",
            Err(_) => return,
        };
        tx.send_replace(n);
        if n == 1 {
            info!(
                signal,
                "shutdown requested: draining; press Ctrl-C again to stop now"
            );
        } else {
            warn!(
                signal,
                "second signal: stopping now, releasing running jobs"
            );
        }
    }
}

/// Resolves at the first SIGTERM/SIGINT: for commands that simply stop, such as
/// `drover dashboard`.
pub(crate) async fn wait_for_signal() {
    let (tx, mut rx) = tokio::sync::watch::channel(0u32);
    let counter = tokio::spawn(count_signals(tx));
    let _ = rx.wait_for(|n| *n >= 1).await;
    counter.abort();
}
