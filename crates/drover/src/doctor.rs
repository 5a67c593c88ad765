//! `drover doctor [--fix]`: compares the ledger (the source of truth) with the broker (which
//! only carries work), reports the drift and what would fix it, and with `--fix` fixes it
//! the way every worker's rescuer, relay and poison consumer would.

use crate::cli::Context;
use anyhow::Context as _;
use clap::Args;
use drover_broker::{Broker, BrokerAddresses, OutgoingJob, QueueDepth, Topology};
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
  poison messages   copies in {ns}.poison of messages the jobs queue dead-lettered at its
                    delivery limit, listed one by one (up to 50: key, ledger state) while
                    no worker has handled them. Fix: mark each still-queued job dead with
                    the limit as the reason and ack the copy (a copy whose job is running,
                    ended or unknown is just acked), before the lost-message fix, which
                    would otherwise publish such a job again.
  no consumers      jobs wait but no worker consumes the queue (reported only).
Running workers do all of this on their own; doctor is for when none runs, or to check.
Listing poison copies takes them with basic.get and gives them back: RabbitMQ before 4.3
counts that as a delivery of each copy, and from 4.0 a quorum queue without a delivery
limit of its own drops a message after 20 (prefer --fix to many reports).
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
/// Copies of `{ns}.poison` listed one by one in the report.
const POISON_SHOWN: usize = 50;

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
    // Declared like a worker does, so dead-letters reach it from now on; an account that may
    // not declare it (least privilege) still reads it when it exists.
    if let Err(e) = broker.declare_poison(&topo).await {
        tracing::warn!(error = %e, queue = %topo.poison_queue(), "could not declare the poison queue");
    }
    let jobs = broker.queue_depth(&topo.jobs_queue()).await?;
    let dead = broker.queue_depth(&topo.dead_queue()).await?;
    let poison_depth = broker.queue_depth_if_exists(&topo.poison_queue()).await?;
    let poison = poison_depth.unwrap_or(QueueDepth {
        ready: 0,
        consumers: 0,
    });
    let drift = ledger.drift(stale_after, ORPHAN_AFTER, lost_after).await?;

    println!(
        "broker: queue {} holds {} ready message(s), {} consumer(s); {} holds {} dead letter(s)",
        topo.jobs_queue(),
        jobs.ready,
        jobs.consumers,
        topo.dead_queue(),
        dead.ready
    );
    if poison_depth.is_some() {
        println!(
            "broker: queue {} holds {} copy(ies) of messages dead-lettered at the delivery limit, {} consumer(s)",
            topo.poison_queue(),
            poison.ready,
            poison.consumers
        );
    } else {
        println!(
            "broker: queue {} does not exist (workers declare it): messages dead-lettered at the delivery limit are only in {}",
            topo.poison_queue(),
            topo.dead_queue()
        );
    }
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
    if poison.ready > 0 {
        findings += 1;
        println!(
            "poison messages: {} copy(ies) in {} of messages dead-lettered at the delivery limit (x-delivery-limit {} of {}); {verb}: mark their still-queued jobs dead, ack the copies",
            poison.ready,
            topo.poison_queue(),
            topo.delivery_limit,
            topo.jobs_queue()
        );
        for line in list_poison(&broker, &ledger, &topo, args.fix, poison.ready).await? {
            println!("  {line}");
        }
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
        // Poison copies first: their jobs are queued with no message, which the lost-message
        // fix below would otherwise publish again.
        let poisoned = if poison.ready > 0 {
            fix_poison(&broker, &ledger, &topo, poison.ready).await?
        } else {
            PoisonFixed::default()
        };
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
        // Like the rescuer, the lost-message fix waits while copies nobody handled remain
        // (new ones dead-lettered since the report).
        let poison_left = if poison.ready > 0 {
            broker.queue_depth(&topo.poison_queue()).await?.ready
        } else {
            0
        };
        if lost > 0 && poison_left > 0 {
            println!(
                "lost messages not published: {} still holds {poison_left} copy(ies); run doctor again",
                topo.poison_queue()
            );
        }
        if lost > 0 && poison_left == 0 {
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
            "fixed: re-drove {} stale job(s), published {published} message(s), marked {} poisoned job(s) dead, acked {} poison copy(ies)",
            rescued.len(),
            poisoned.marked,
            poisoned.acked
        );
        left = usize::from(lost > 0 && poison_left > 0);
    }
    close(ledger, broker).await;
    Ok(if left == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One line per copy waiting in `{ns}.poison` (at most [`POISON_SHOWN`], then how many more
/// of the `total` the depth counted): its job's key and ledger state, and what `--fix` does
/// with it. The copies are taken with `basic.get` and all given back afterwards.
async fn list_poison(
    broker: &Broker,
    ledger: &Ledger,
    topo: &Topology,
    fix: bool,
    total: u32,
) -> anyhow::Result<Vec<String>> {
    let reader = broker.reader(&topo.poison_queue()).await?;
    let listed = list_taken(&reader, ledger, topo, fix, total).await;
    // Whatever happened, the copies go back (closing the channel would too).
    let given_back = reader.requeue_all().await;
    if let Err(e) = reader.close().await {
        tracing::warn!(error = %e, "closing the poison queue reader");
    }
    let lines = listed?;
    given_back?;
    Ok(lines)
}

async fn list_taken(
    reader: &drover_broker::QueueReader,
    ledger: &Ledger,
    topo: &Topology,
    fix: bool,
    total: u32,
) -> anyhow::Result<Vec<String>> {
    let verb = if fix { "fixing" } else { "would fix" };
    let mut lines = Vec::new();
    while lines.len() < POISON_SHOWN {
        let Some(copy) = reader.get().await? else {
            return Ok(lines);
        };
        let Some(key) = drover_worker::poison_job_key(&copy.body) else {
            lines.push(format!(
                "a copy without an idempotency key (message id {}); {verb}: ack it (the original is in {})",
                copy.message_id.as_deref().unwrap_or("none"),
                topo.dead_queue()
            ));
            continue;
        };
        let state = ledger
            .progress(std::slice::from_ref(&key))
            .await?
            .into_iter()
            .next()
            .map(|p| p.state);
        lines.push(match state {
            Some(drover_core::JobState::Queued) => {
                format!("job {key}: queued; {verb}: mark it dead, ack the copy")
            }
            Some(s) => format!(
                "job {key}: {}; {verb}: ack the copy (a duplicate message: the job's own path goes on)",
                s.as_str()
            ),
            None => format!("job {key}: not in the ledger; {verb}: ack the copy"),
        });
    }
    if total as usize > POISON_SHOWN {
        lines.push(format!(
            "… and {} more (only the first {POISON_SHOWN} are listed)",
            total as usize - POISON_SHOWN
        ));
    }
    Ok(lines)
}

/// What [`fix_poison`] did.
#[derive(Debug, Default)]
struct PoisonFixed {
    marked: usize,
    acked: usize,
}

/// Handles at most `max` copies of `{ns}.poison` as a worker's poison consumer does: the
/// still-queued job of each is marked dead (`Ledger::mark_poisoned`, the limit named), then
/// the copy is acked; a copy whose job is in another state, unknown, or that has no key is
/// just acked. A copy whose job the ledger could not mark is given back and the error
/// returned.
async fn fix_poison(
    broker: &Broker,
    ledger: &Ledger,
    topo: &Topology,
    max: u32,
) -> anyhow::Result<PoisonFixed> {
    let reader = broker.reader(&topo.poison_queue()).await?;
    let queue = topo.jobs_queue();
    let mut fixed = PoisonFixed::default();
    let mut outcome = Ok(());
    for _ in 0..max {
        let copy = match reader.get().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                outcome = Err(anyhow::Error::from(e));
                break;
            }
        };
        if let Some(key) = drover_worker::poison_job_key(&copy.body) {
            match ledger
                .mark_poisoned(&key, topo.delivery_limit, &queue)
                .await
            {
                Ok(Some(_reason)) => {
                    println!("  job {key}: marked dead (delivery limit reached)");
                    fixed.marked += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = copy.requeue().await;
                    outcome = Err(anyhow::Error::from(e)
                        .context(format!("marking job {key} dead (its message is poison)")));
                    break;
                }
            }
        }
        if let Err(e) = copy.ack().await {
            outcome = Err(e.into());
            break;
        }
        fixed.acked += 1;
    }
    if let Err(e) = reader.close().await {
        tracing::warn!(error = %e, "closing the poison queue reader");
    }
    outcome
        .with_context(|| format!("handling the copies in {}", topo.poison_queue()))
        .map(|()| fixed)
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
