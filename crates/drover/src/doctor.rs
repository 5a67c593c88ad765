//! `drover doctor [--fix]`: compares the ledger (the source of truth) with the broker (which
//! only carries work), reports the drift and what would fix it, and with `--fix` fixes it
//! the way every worker's rescuer and relay would.

use crate::cli::Context;
use clap::Args;
use drover_broker::{Broker, BrokerAddresses, OutgoingJob, Topology};
use drover_core::ExposeSecret;
use drover_ledger::{Ledger, RelaySweep};
use std::process::ExitCode;
use std::time::Duration;

/// `drover doctor` arguments.
#[derive(Debug, Args)]
#[command(after_help = "\
Findings (each with what --fix does):
  stale leases      running jobs whose heartbeat is older than two heartbeat periods: their
                    worker died, froze or lost its network. Fix: record the attempt as lost
                    and schedule the job as a retry due now (the relay publishes it).
  unpublished jobs  queued jobs that no confirmed message carries (a producer or a worker
                    stopped between the ledger and the broker). Fix: publish them.
  lost messages     jobs queued for over --lost-after-secs while the work queue holds no
                    ready message (queue purged, message dead-lettered). Fix: publish them.
  overdue retries   retries due for over --lost-after-secs (no worker runs the relay).
                    Fix: publish them.
  no consumers      jobs wait but no worker consumes the queue (reported only).
Running workers do all of this on their own; doctor is for when none runs, or to check.
Exit status: 0 when nothing is left to fix, 1 otherwise.")]
pub struct DoctorArgs {
    /// Fix what is found (publish, re-drive) instead of only reporting it.
    #[arg(long)]
    fix: bool,
    /// The workers' heartbeat period: a lease silent for two periods has expired
    /// [default: the [worker] table's heartbeat_secs, else 10].
    #[arg(long, value_name = "SECS")]
    heartbeat_secs: Option<u64>,
    /// How long a queued job may wait with no ready message in the queue (or a retry stay
    /// overdue) before it counts as lost.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    lost_after_secs: u64,
}

/// Jobs re-driven or published per statement.
const FIX_BATCH: i64 = 1000;
/// A job without a confirmed message this old is unpublished, not merely being published.
const ORPHAN_AFTER: Duration = Duration::from_secs(30);

/// `drover doctor`.
pub async fn run(ctx: &Context, args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let heartbeat = args
        .heartbeat_secs
        .or(ctx.file.worker.heartbeat_secs)
        .unwrap_or(10);
    anyhow::ensure!(
        heartbeat >= 1,
        "--heartbeat-secs: must be at least 1, got 0"
    );
    let stale_after = Duration::from_secs(heartbeat * 2);
    let lost_after = Duration::from_secs(args.lost_after_secs);
    let ledger = ctx.migrated_ledger(2).await?;
    let topo = Topology::for_connections(&ctx.conns);
    let broker = BrokerAddresses::parse(ctx.conns.amqp_url.expose_secret())?
        .connect("drover-doctor")
        .await?;
    broker.declare(&topo).await?;
    let jobs = broker.queue_depth(&topo.jobs_queue()).await?;
    let dead = broker.queue_depth(&topo.dead_queue()).await?;
    let drift = ledger.drift(stale_after, ORPHAN_AFTER, lost_after).await?;

    println!(
        "broker: queue {} holds {} ready message(s), {} consumer(s); {} holds {} dead letter(s)",
        topo.jobs_queue(),
        jobs.ready,
        jobs.consumers,
        topo.dead_queue(),
        dead.ready
    );
    println!(
        "ledger: {} queued, {} running with a lease silent for over {}s, {} retries overdue by over {}s",
        drift.queued,
        drift.stale_running,
        stale_after.as_secs(),
        drift.overdue_retries,
        lost_after.as_secs()
    );
    let lost = if jobs.ready == 0 {
        drift.queued_long
    } else {
        0
    };
    let mut findings = 0;
    let verb = if args.fix { "fixing" } else { "would fix" };
    if drift.stale_running > 0 {
        findings += 1;
        println!(
            "stale leases: {} running job(s) whose worker stopped heartbeating; {verb}: re-drive them as retries due now",
            drift.stale_running
        );
    }
    if drift.unpublished > 0 {
        findings += 1;
        println!(
            "unpublished jobs: {} queued job(s) no confirmed message carries; {verb}: publish them",
            drift.unpublished
        );
    }
    if lost > 0 {
        findings += 1;
        println!(
            "lost messages: {lost} job(s) queued for over {}s while the queue holds no ready message; {verb}: publish them again",
            lost_after.as_secs()
        );
    }
    if drift.overdue_retries > 0 {
        findings += 1;
        println!(
            "overdue retries: {} retries due for over {}s; {verb}: publish them",
            drift.overdue_retries,
            lost_after.as_secs()
        );
    }
    if drift.queued > 0 && jobs.consumers == 0 {
        println!(
            "no consumers: {} job(s) wait but no worker consumes {} (start `drover worker`)",
            drift.queued,
            topo.jobs_queue()
        );
    }
    if findings == 0 {
        println!("no drift between the ledger and the broker");
    }
    let mut left = findings;
    if args.fix && findings > 0 {
        let publisher = broker.publisher(&topo).await?;
        let rescued = ledger.rescue_stale(stale_after, FIX_BATCH).await?;
        // Rescued jobs are retries due now: the relay sweep below publishes them too.
        let mut published = 0;
        loop {
            let n = publish_sweep(
                &publisher,
                ledger
                    .relay_sweep(FIX_BATCH, ORPHAN_AFTER.as_secs_f64())
                    .await?,
            )
            .await?;
            published += n;
            if n < FIX_BATCH as usize {
                break;
            }
        }
        if lost > 0 {
            loop {
                let n = publish_sweep(&publisher, ledger.lost_sweep(lost_after, FIX_BATCH).await?)
                    .await?;
                published += n;
                if n < FIX_BATCH as usize {
                    break;
                }
            }
        }
        println!(
            "fixed: re-drove {} stale job(s), published {published} message(s)",
            rescued.len()
        );
        left = 0;
    }
    close(ledger, broker).await;
    Ok(if left == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Publishes a sweep's jobs with confirms, then commits it; returns how many.
async fn publish_sweep(
    publisher: &drover_broker::Publisher,
    sweep: RelaySweep,
) -> anyhow::Result<usize> {
    let out: Vec<OutgoingJob> = sweep
        .due
        .iter()
        .filter_map(drover_worker::due_message)
        .collect();
    let n = sweep.due.len();
    if n == 0 {
        return Ok(0);
    }
    publisher.publish_jobs(&out).await?;
    sweep.commit().await?;
    Ok(n)
}

async fn close(ledger: Ledger, broker: Broker) {
    ledger.close().await;
    if let Err(e) = broker.close().await {
        tracing::warn!(error = %e, "closing the broker connection");
    }
}
