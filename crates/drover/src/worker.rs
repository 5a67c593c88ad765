//! `drover worker`: consume, claim, run batch by batch, record, retry, relay, drain.
//!
//! Shape (after mini-redis): one consumer loop that spawns a task per delivery (at most
//! `prefetch` exist, because the broker sends no more unacked messages than that), a
//! heartbeat loop renewing the leases of in-flight jobs, and a relay loop re-publishing due
//! retries. A shutdown signal flips one flag that every loop and job watches.
//!
//! The invariant every path keeps: a delivery is acked only after the ledger holds the
//! job's terminal state or its retry schedule; anything else is nacked back to the queue
//! (or left unacked, which the broker requeues when the connection closes).

use crate::cli::Context;
use anyhow::Context as _;
use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;
use clap::Args;
use drover_broker::{Broker, Incoming, OutgoingJob, Publisher, Topology};
use drover_core::{JobMessage, RetryPolicy};
use drover_ledger::{
    BatchRecord, Claim, ClaimedJob, Completion, FailOutcome, Group, HeldEnd, LeaseSeen, Ledger,
    LedgerError,
};
use drover_pipeline::{BatchOutcome, JobRun, JobSpec, PipelineError, Registry};
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::{Pin, pin};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{RwLock, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};
use uuid::Uuid;

use crate::metrics::Metrics;

/// `drover worker` arguments (each also settable in the `[worker]` table of the config file).
#[derive(Debug, Args)]
#[command(after_help = "\
The worker acks a message only after the job's terminal state or retry schedule is committed
in the ledger. SIGTERM/SIGINT: stop consuming, let running jobs reach their next batch
boundary (within --shutdown-grace-secs), checkpoint, requeue the rest, exit 0.
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
    /// port 0 picks a free port, logged at start-up).
    #[arg(
        long,
        env = "DROVER_METRICS_ADDR",
        value_name = "ADDR",
        default_value = "127.0.0.1:9464"
    )]
    metrics_addr: String,
    /// How often the retry relay looks for due retries, in milliseconds.
    #[arg(long, default_value_t = 500, value_name = "MS", hide = true)]
    relay_interval_ms: u64,
}

/// Resolved worker settings.
#[derive(Debug, Clone)]
struct Settings {
    prefetch: u16,
    heartbeat: Duration,
    grace: Duration,
    output_root: PathBuf,
    max_attempts: u32,
    worker_id: String,
    relay_interval: Duration,
    retry: RetryPolicy,
    delivery_limit: u32,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl Settings {
    fn resolve(args: WorkerArgs, ctx: &Context) -> anyhow::Result<Settings> {
        let f = &ctx.file.worker;
        let prefetch = args.prefetch.or(f.prefetch).unwrap_or(8);
        anyhow::ensure!(prefetch >= 1, "--prefetch: must be at least 1, got 0");
        let heartbeat_secs = args.heartbeat_secs.or(f.heartbeat_secs).unwrap_or(10);
        anyhow::ensure!(
            heartbeat_secs >= 1,
            "--heartbeat-secs: must be at least 1, got 0"
        );
        let max_attempts = args.max_attempts.or(f.max_attempts).unwrap_or(5);
        anyhow::ensure!(
            max_attempts >= 1,
            "--max-attempts: must be at least 1, got 0"
        );
        let metrics_addr =
            match args.metrics_addr.as_str() {
                "off" | "none" | "" => None,
                a => Some(a.parse().map_err(|e| {
                    anyhow::anyhow!("--metrics-addr {a:?}: expected host:port ({e})")
                })?),
            };
        Ok(Settings {
            metrics_addr,
            prefetch,
            heartbeat: Duration::from_secs(heartbeat_secs),
            grace: Duration::from_secs(
                args.shutdown_grace_secs
                    .or(f.shutdown_grace_secs)
                    .unwrap_or(30),
            ),
            output_root: args
                .output_root
                .or_else(|| f.output_root.clone())
                .unwrap_or_else(|| PathBuf::from("drover-output")),
            max_attempts,
            worker_id: args
                .worker_id
                .or_else(|| f.id.clone())
                .unwrap_or_else(default_worker_id),
            relay_interval: Duration::from_millis(args.relay_interval_ms.max(50)),
            retry: ctx.file.retry.clone().unwrap_or_default(),
            delivery_limit: f.delivery_limit.unwrap_or(20),
        })
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    let tag = &Uuid::new_v4().simple().to_string()[..6];
    format!("{host}-{}-{tag}", std::process::id())
}

/// What happens to a delivery once its handling is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    Ack,
    Requeue,
}

/// A job this worker is running: its claim and its cancel flag.
struct Inflight {
    job: ClaimedJob,
    cancel: Arc<AtomicBool>,
}

/// State shared by every task of the worker.
struct Shared {
    amqp_url: String,
    ledger: Ledger,
    /// Claims and completions of concurrent jobs, grouped into shared commits.
    group: Group,
    registry: Registry,
    settings: Settings,
    topo: Topology,
    inflight: Mutex<HashMap<Uuid, Inflight>>,
    /// Set once on SIGTERM/SIGINT; jobs check it at batch boundaries.
    draining: AtomicBool,
    shutdown: watch::Receiver<bool>,
    /// The current confirm-mode publisher (replaced on reconnect; None while disconnected).
    publisher: RwLock<Option<Arc<Publisher>>>,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn inflight_ids(&self) -> Vec<Uuid> {
        self.inflight
            .lock()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Runs a ledger operation, waiting out a Postgres outage with jittered backoff (the
    /// delivery stays unacked meanwhile, which is the backpressure: no new work arrives past
    /// the prefetch). Gives up only when the worker is shutting down.
    async fn db<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, DbStop>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, LedgerError>>,
    {
        let mut backoff = reconnect_backoff();
        let mut shutdown = self.shutdown.clone();
        loop {
            match op().await {
                Ok(v) => {
                    self.metrics.database_up.store(true, Ordering::SeqCst);
                    return Ok(v);
                }
                Err(e) if e.is_connection() => {
                    self.metrics.database_up.store(false, Ordering::SeqCst);
                    let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(10));
                    warn!(error = %e, op = what, retry_in_ms = wait.as_millis() as u64,
                        "postgres unavailable; holding the job until it is back");
                    if *shutdown.borrow() {
                        return Err(DbStop::Shutdown);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return Err(DbStop::Shutdown),
                    }
                }
                Err(e) => return Err(DbStop::Failed(e)),
            }
        }
    }

    async fn publisher(&self) -> Option<Arc<Publisher>> {
        self.publisher.read().await.clone()
    }
}

/// Why a ledger operation was abandoned.
#[derive(Debug)]
enum DbStop {
    Shutdown,
    Failed(LedgerError),
}

/// Jittered exponential backoff for reconnecting (broker or Postgres): 200 ms growing to
/// 15 s, forever.
fn reconnect_backoff() -> ExponentialBackoff {
    ExponentialBackoff {
        initial_interval: Duration::from_millis(200),
        current_interval: Duration::from_millis(200),
        randomization_factor: 0.5,
        multiplier: 2.0,
        max_interval: Duration::from_secs(15),
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    }
}

/// `drover worker`.
pub async fn run(ctx: &Context, args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::resolve(args, ctx)?;
    // Claims and completions are grouped (2 connections); the rest is per job: checkpoints
    // of multi-batch jobs, slow-path claims, failures. Capped at 36 so several workers fit
    // in a default Postgres (max_connections 100); jobs beyond it wait for a connection.
    let ledger = ctx
        .migrated_ledger(u32::from(settings.prefetch).clamp(4, 32) + 4)
        .await?;
    let mut topo = Topology::new(&ctx.conns.namespace);
    topo.delivery_limit = settings.delivery_limit;
    // Fail fast on a bad URL or an unreachable broker at start-up; later losses reconnect.
    let first = Broker::connect(&ctx.conns.amqp_url, &settings.worker_id)
        .await
        .context("starting the worker")?;
    first.declare(&topo).await?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let group = Group::new(
        ledger.clone(),
        settings.worker_id.clone(),
        usize::from(settings.prefetch),
    );
    let shared = Arc::new(Shared {
        amqp_url: ctx.conns.amqp_url.clone(),
        ledger,
        group,
        registry: Registry::builtin(),
        settings,
        topo,
        inflight: Mutex::new(HashMap::new()),
        draining: AtomicBool::new(false),
        shutdown: shutdown_rx,
        publisher: RwLock::new(None),
        metrics: Arc::new(Metrics::new()),
    });
    let http = match shared.settings.metrics_addr {
        Some(addr) => Some(crate::metrics::serve(addr, shared.metrics.clone()).await?),
        None => None,
    };
    info!(
        worker = %shared.settings.worker_id,
        namespace = %shared.topo.namespace,
        queue = %shared.topo.jobs_queue(),
        prefetch = shared.settings.prefetch,
        pipelines = ?shared.registry.names(),
        "worker starting"
    );

    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        let _ = shutdown_tx.send(true);
    });
    let heartbeat = tokio::spawn(heartbeat_loop(shared.clone()));
    let relay = tokio::spawn(relay_loop(shared.clone()));

    let mut tasks = JoinSet::new();
    let last_broker = consume_loop(shared.clone(), Some(first), &mut tasks).await;

    // Draining: no new deliveries arrive; running jobs stop at their next batch boundary.
    shared.draining.store(true, Ordering::SeqCst);
    info!(
        in_flight = tasks.len(),
        grace_secs = shared.settings.grace.as_secs(),
        "draining"
    );
    let drained = tokio::time::timeout(shared.settings.grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            still_running = tasks.len(),
            "grace period over; requeueing unfinished jobs"
        );
        tasks.abort_all();
        let left: Vec<ClaimedJob> = shared
            .inflight
            .lock()
            .map(|m| m.values().map(|i| i.job.clone()).collect())
            .unwrap_or_default();
        for job in left {
            // Their deliveries stay unacked; closing the connection requeues them.
            match shared
                .ledger
                .finish_held(&job, &shared.settings.worker_id, HeldEnd::Released, "")
                .await
            {
                Ok(_) => info!(key = %job.key, "released unfinished job back to queued"),
                Err(e) => {
                    warn!(key = %job.key, error = %e, "could not release job; its lease will expire and another worker takes it over")
                }
            }
        }
    }
    relay.abort();
    heartbeat.abort();
    if let Some(h) = http {
        h.abort();
    }
    signals.abort();
    *shared.publisher.write().await = None;
    if let Some(b) = last_broker
        && let Err(e) = b.close().await
    {
        warn!(error = %e, "closing the broker connection");
    }
    shared.ledger.close().await;
    info!(worker = %shared.settings.worker_id, "worker stopped");
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => info!(signal = "SIGTERM", "shutdown requested"),
                    _ = tokio::signal::ctrl_c() => info!(signal = "SIGINT", "shutdown requested"),
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the worker");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Connects, declares, consumes; reconnects with jittered backoff when the broker goes away.
/// Returns the connection still open at shutdown (to be closed after draining).
async fn consume_loop(
    shared: Arc<Shared>,
    mut first: Option<Broker>,
    tasks: &mut JoinSet<()>,
) -> Option<Broker> {
    let mut backoff = reconnect_backoff();
    let mut shutdown = shared.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            return first;
        }
        let broker = match first.take() {
            Some(b) => b,
            None => match Broker::connect(&shared.amqp_url, &shared.settings.worker_id).await {
                Ok(b) => b,
                Err(e) => {
                    let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(15));
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker unavailable; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = shutdown.changed() => return None,
                    }
                }
            },
        };
        let setup = async {
            broker.declare(&shared.topo).await?;
            let publisher = broker.publisher(&shared.topo).await?;
            let consumer = broker
                .consume(
                    &shared.topo,
                    shared.settings.prefetch,
                    &shared.settings.worker_id,
                )
                .await?;
            Ok::<_, drover_broker::BrokerError>((publisher, consumer))
        };
        let (publisher, mut consumer) = match setup.await {
            Ok(v) => v,
            Err(e) => {
                let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(15));
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker setup failed; reconnecting");
                let _ = broker.close().await;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = shutdown.changed() => return None,
                }
            }
        };
        *shared.publisher.write().await = Some(Arc::new(publisher));
        shared.metrics.consuming.store(true, Ordering::SeqCst);
        backoff.reset();
        info!(queue = %shared.topo.jobs_queue(), prefetch = shared.settings.prefetch, "consuming");
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    shared.metrics.consuming.store(false, Ordering::SeqCst);
                    if let Err(e) = consumer.cancel().await {
                        warn!(error = %e, "basic.cancel failed");
                    }
                    return Some(broker);
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        tasks.spawn(handle_delivery(shared.clone(), delivery));
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "consumer error; reconnecting");
                        break;
                    }
                    None => {
                        warn!("broker connection lost; reconnecting");
                        break;
                    }
                }
            }
        }
        shared.metrics.consuming.store(false, Ordering::SeqCst);
        *shared.publisher.write().await = None;
        let _ = broker.close().await;
    }
}

/// Renews the leases of in-flight jobs and picks up operator cancellations.
async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ids = shared.inflight_ids();
        if ids.is_empty() {
            continue;
        }
        match shared
            .ledger
            .heartbeat(&shared.settings.worker_id, &ids)
            .await
        {
            Ok(cancelled) => {
                if let Ok(map) = shared.inflight.lock() {
                    for id in cancelled {
                        if let Some(i) = map.get(&id) {
                            i.cancel.store(true, Ordering::SeqCst);
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, jobs = ids.len(), "heartbeat failed"),
        }
    }
}

/// Re-publishes due retries (and jobs whose producer never got a confirm). Every worker runs
/// it; `FOR UPDATE SKIP LOCKED` splits the work between replicas.
async fn relay_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.settings.relay_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(publisher) = shared.publisher().await else {
            continue;
        };
        loop {
            let sweep = match shared.ledger.relay_sweep(500, 30.0).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "relay sweep failed");
                    break;
                }
            };
            if sweep.due.is_empty() {
                break;
            }
            let full = sweep.due.len() == 500;
            let out: Vec<OutgoingJob> = sweep
                .due
                .iter()
                .map(|d| {
                    let params = match &d.params.0 {
                        Value::Object(m) => m.clone(),
                        _ => Default::default(),
                    };
                    let msg = JobMessage {
                        v: drover_core::message::CONTRACT_VERSION,
                        idempotency_key: d.idempotency_key.clone(),
                        pipeline: d.pipeline.clone(),
                        params,
                        batch_size: d.batch_size.map(|b| b as u32),
                        max_attempts: Some(d.max_attempts as u32),
                    };
                    crate::publish::outgoing(d.id, &msg, None)
                })
                .collect();
            let lag = sweep.due.iter().map(|d| d.overdue_secs).fold(0.0, f64::max);
            match publisher.publish_jobs(&out).await {
                Ok(()) => match sweep.commit().await {
                    Ok(()) => {
                        shared.metrics.relayed(out.len(), lag);
                        info!(jobs = out.len(), max_lag_secs = lag, "relayed due retries");
                    }
                    Err(e) => {
                        warn!(error = %e, "relay commit failed; the retries will be published again")
                    }
                },
                Err(e) => {
                    warn!(error = %e, "relay publish failed; will retry");
                    break;
                }
            }
            if !full {
                break;
            }
        }
    }
}

/// Handles one delivery and acks or requeues it.
async fn handle_delivery(shared: Arc<Shared>, delivery: Incoming) {
    let disposition = process(&shared, &delivery).await;
    let result = match disposition {
        Disposition::Ack => delivery.ack().await,
        Disposition::Requeue => delivery.nack_requeue().await,
    };
    if let Err(e) = result {
        // The channel is gone; the broker redelivers and the ledger makes that harmless.
        warn!(error = %e, ?disposition, "could not settle delivery");
    }
}

/// Decides a delivery's fate. Never panics and never returns an error: every failure ends in
/// the ledger or back on the queue.
async fn process(shared: &Arc<Shared>, delivery: &Incoming) -> Disposition {
    let msg = match JobMessage::parse(&delivery.body) {
        Ok(m) => m,
        Err(e) => {
            return reject(
                shared,
                delivery,
                e.key.as_deref(),
                e.pipeline.as_deref(),
                None,
                &e.reason,
            )
            .await;
        }
    };
    let params = Value::Object(msg.params.clone());
    let span = info_span!(
        "job",
        key = %msg.idempotency_key,
        pipeline = %msg.pipeline,
        message_id = delivery.message_id.as_deref().unwrap_or(""),
        trace_id = tracing::field::Empty,
    );
    if let Some(tp) = &delivery.traceparent {
        crate::logging::continue_trace(&span, tp);
    }
    let trace_id = crate::logging::trace_id_of(&span);
    if let Some(t) = &trace_id {
        span.record("trace_id", t.as_str());
    }
    async {
        if let Err(e) = shared.registry.validate(&msg.pipeline, &params) {
            return reject(
                shared,
                delivery,
                Some(&msg.idempotency_key),
                Some(&msg.pipeline),
                Some(&params),
                &e.to_string(),
            )
            .await;
        }
        let max_attempts = crate::publish::max_attempts_for(&shared.registry, &msg, shared.settings.max_attempts);
        let worker = shared.settings.worker_id.clone();
        // Fast path: a plainly claimable job is claimed in a statement shared with the
        // other deliveries arriving now. Anything else is decided one by one below.
        match shared
            .db("claim", || shared.group.claim_ready(msg.idempotency_key.clone()))
            .await
        {
            Ok(Some(job)) => return run_job(shared, job, delivery).await,
            Ok(None) => {}
            Err(DbStop::Shutdown) => return Disposition::Requeue,
            Err(DbStop::Failed(e)) => {
                error!(error = %e, "claim failed; requeueing");
                return Disposition::Requeue;
            }
        }
        let mut takeover: Option<LeaseSeen> = None;
        loop {
            let claim = shared
                .db("claim", || {
                    shared.ledger.claim(&msg, max_attempts, &worker, trace_id.as_deref(), takeover.as_ref())
                })
                .await;
            let claim = match claim {
                Ok(c) => c,
                Err(DbStop::Shutdown) => return Disposition::Requeue,
                Err(DbStop::Failed(e)) => {
                    error!(error = %e, "claim failed; requeueing");
                    return Disposition::Requeue;
                }
            };
            match claim {
                Claim::Done { state } => {
                    shared.metrics.job(&msg.pipeline, "duplicate");
                    info!(state = %state, "job already finished; acking duplicate delivery");
                    return Disposition::Ack;
                }
                Claim::NotDue { run_at } => {
                    info!(run_at = ?run_at, "job is scheduled for a later retry; acking early copy");
                    return Disposition::Ack;
                }
                Claim::Held { id, seen } => {
                    let ours = seen.owner.as_deref() == Some(worker.as_str())
                        || shared.inflight.lock().map(|m| m.contains_key(&id)).unwrap_or(false);
                    if ours {
                        info!("job is running here already; acking duplicate delivery");
                        return Disposition::Ack;
                    }
                    match watch_lease(shared, id, &seen).await {
                        LeaseWatch::Alive => {
                            info!(owner = ?seen.owner, "job is running on a live worker; acking duplicate delivery");
                            return Disposition::Ack;
                        }
                        LeaseWatch::Changed => takeover = None,
                        LeaseWatch::Stale => {
                            warn!(owner = ?seen.owner, heartbeat_at = ?seen.heartbeat_at,
                                "lease expired: owner stopped heartbeating; taking the job over");
                            takeover = Some(seen);
                        }
                        LeaseWatch::Shutdown => return Disposition::Requeue,
                    }
                }
                Claim::Run(job) => return run_job(shared, job, delivery).await,
            }
        }
    }
    .instrument(span)
    .await
}

/// Result of watching another worker's lease.
enum LeaseWatch {
    /// The heartbeat advanced: the owner is alive.
    Alive,
    /// The job left `running` (finished, released): decide again.
    Changed,
    /// Two heartbeat periods passed without a renewal: the owner is dead.
    Stale,
    Shutdown,
}

/// Watches a lease for at most two heartbeat periods.
async fn watch_lease(shared: &Shared, id: Uuid, seen: &LeaseSeen) -> LeaseWatch {
    let deadline = tokio::time::Instant::now() + shared.settings.heartbeat * 2;
    let step = (shared.settings.heartbeat / 4).max(Duration::from_millis(100));
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = shutdown.changed() => return LeaseWatch::Shutdown,
        }
        match shared.db("lease", || shared.ledger.lease(id)).await {
            Ok(now) if now.state != "running" => return LeaseWatch::Changed,
            Ok(now) if now.heartbeat_at != seen.heartbeat_at || now.owner != seen.owner => {
                return LeaseWatch::Alive;
            }
            Ok(_) => {}
            Err(_) => return LeaseWatch::Shutdown,
        }
        if tokio::time::Instant::now() >= deadline {
            return LeaseWatch::Stale;
        }
    }
}

/// Records an invalid message: `rejected` in the ledger when it has a usable key, a copy in
/// `{ns}.dead` with the reason, and an ack.
async fn reject(
    shared: &Shared,
    delivery: &Incoming,
    key: Option<&str>,
    pipeline: Option<&str>,
    params: Option<&Value>,
    reason: &str,
) -> Disposition {
    warn!(key = key.unwrap_or(""), reason, "rejecting invalid message");
    shared.metrics.job(pipeline.unwrap_or(""), "rejected");
    if let Some(k) = key {
        match shared
            .db("reject", || {
                shared.ledger.reject_message(k, pipeline, params, reason)
            })
            .await
        {
            Ok(_) => {}
            Err(DbStop::Shutdown) => return Disposition::Requeue,
            Err(DbStop::Failed(e)) => warn!(error = %e, "could not record the rejection"),
        }
    }
    dead_letter(
        shared,
        &delivery.body,
        delivery.message_id.as_deref(),
        key,
        reason,
    )
    .await;
    Disposition::Ack
}

/// Copies a message to `{ns}.dead` with the reason in a header.
async fn dead_letter(
    shared: &Shared,
    body: &[u8],
    message_id: Option<&str>,
    key: Option<&str>,
    reason: &str,
) {
    match shared.publisher().await {
        Some(p) => {
            if let Err(e) = p.publish_dead(body, message_id, key, reason).await {
                warn!(error = %e, "could not copy the message to the dead-letter queue");
            }
        }
        None => warn!("no broker connection; message not copied to the dead-letter queue"),
    }
}

/// Runs a claimed job: registers it as in flight, runs the attempt, unregisters it.
async fn run_job(shared: &Arc<Shared>, job: ClaimedJob, delivery: &Incoming) -> Disposition {
    let cancel = Arc::new(AtomicBool::new(false));
    if let Ok(mut m) = shared.inflight.lock() {
        m.insert(
            job.id,
            Inflight {
                job: job.clone(),
                cancel: cancel.clone(),
            },
        );
        shared.metrics.set_in_flight(m.len());
    }
    let span = info_span!(
        "attempt",
        attempt = job.attempt,
        resume_after = job.batches_done
    );
    let started = std::time::Instant::now();
    let d = run_attempt(shared, &job, &cancel, delivery)
        .instrument(span)
        .await;
    if let Ok(mut m) = shared.inflight.lock() {
        m.remove(&job.id);
        shared.metrics.set_in_flight(m.len());
    }
    shared
        .metrics
        .duration(&job.pipeline, started.elapsed().as_secs_f64());
    debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        ?d,
        "attempt over"
    );
    d
}

/// Moves a value into the blocking pool for CPU/disk work and back. A panic in the
/// pipeline becomes a transient error instead of taking the worker down.
async fn blocking<T: Send + 'static, R: Send + 'static>(
    value: T,
    f: impl FnOnce(&mut T) -> Result<R, PipelineError> + Send + 'static,
) -> Result<(T, R), PipelineError> {
    let joined = tokio::task::spawn_blocking(move || {
        let mut v = value;
        let r = f(&mut v);
        r.map(|r| (v, r))
    })
    .await;
    joined.unwrap_or_else(|e| {
        Err(PipelineError::transient(format!(
            "pipeline panicked: {}",
            panic_text(e)
        )))
    })
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into()),
        Err(e) => e.to_string(),
    }
}

async fn run_attempt(
    shared: &Arc<Shared>,
    job: &ClaimedJob,
    cancel: &AtomicBool,
    delivery: &Incoming,
) -> Disposition {
    // Debug, not info: at thousands of jobs per second one info line per job is what an
    // operator can afford (`job succeeded`, or the failure), and it halves the logging cost.
    debug!(max_attempts = job.max_attempts, "attempt started");
    let spec = JobSpec {
        key: job.key.clone(),
        pipeline: job.pipeline.clone(),
        params: job.params.clone(),
        batch_size: job.batch_size.map(|b| b as usize),
        attempt: job.attempt as u32,
        output_root: shared.settings.output_root.clone(),
    };
    let resume = job.batches_done.max(0) as u32;
    // Opened by the first hop to the blocking pool, taken by the one that finishes.
    let mut slot = Slot {
        spec: Some(spec),
        run: None,
    };
    // The input's batch count, known once the first hop opened it.
    let mut total: Option<i32> = None;
    let mut next_index = resume;
    // This attempt's batches: checkpointed, or computed and not yet checkpointed.
    let mut cps = Checkpoints::new(shared, job);
    let result: Option<Value> = loop {
        if cancel.load(Ordering::SeqCst) {
            if let Err(stop) = cps.settle().await {
                return stopped_at_checkpoint(shared, job, stop).await;
            }
            info!("cancelled by operator at a batch boundary");
            shared.metrics.job(&job.pipeline, "cancelled");
            return end_held(
                shared,
                job,
                HeldEnd::Cancelled,
                "cancelled by operator",
                Disposition::Ack,
            )
            .await;
        }
        if shared.is_draining() {
            // Keep the work done: the next attempt resumes after it.
            if let Err(stop) = cps.flush(false, total).await {
                return stopped_at_checkpoint(shared, job, stop).await;
            }
            info!("shutting down: releasing the job at a batch boundary");
            shared.metrics.job(&job.pipeline, "released");
            return end_held(shared, job, HeldEnd::Released, "", Disposition::Requeue).await;
        }
        // Checkpoints lag by at most a few batches: while Postgres is away, the job pauses
        // instead of running on with nothing recorded (and its lease unrenewed).
        if cps.pending.len() >= MAX_UNCHECKPOINTED
            && let Err(stop) = cps.settle().await
        {
            return stopped_at_checkpoint(shared, job, stop).await;
        }
        // When this hop may reach the end of the input, it also finishes the job (one hop
        // fewer), given every batch's outcome: all are in memory unless earlier attempts
        // did some.
        let may_end = resume == 0 && total.is_none_or(|t| next_index as i32 + 1 >= t);
        let finish_with: Option<Vec<BatchOutcome>> = may_end.then(|| cps.all());
        let batch_span = info_span!("batch", index = next_index, rows = tracing::field::Empty);
        let sh = shared.clone();
        let mut compute = pin!(
            blocking(slot, move |s| s.hop(&sh.registry, resume, finish_with))
                .instrument(batch_span.clone())
        );
        // Checkpoint what is ready while the batch computes; a commit still running when
        // it is done carries on under the next one.
        let computed = loop {
            cps.start(total);
            let Some(commit) = cps.commit.as_mut() else {
                break compute.await;
            };
            let committed = tokio::select! {
                computed = &mut compute => Err(computed),
                committed = commit => Ok(committed),
            };
            match committed {
                Err(computed) => break computed,
                Ok(Ok(cancel_requested)) => {
                    cps.committed();
                    if cancel_requested {
                        cancel.store(true, Ordering::SeqCst);
                    }
                }
                Ok(Err(stop)) => {
                    // No writer outlives its job: let the batch finish before giving up.
                    let _ = compute.await;
                    return stopped_at_checkpoint(shared, job, stop).await;
                }
            }
        };
        let hop = match computed {
            Ok((s, hop)) => {
                slot = s;
                total = hop.total;
                hop
            }
            Err(e) => {
                if let Err(stop) = cps.settle().await {
                    return stopped_at_checkpoint(shared, job, stop).await;
                }
                return failed(shared, job, e, delivery).await;
            }
        };
        for b in hop.batches {
            next_index = b.index + 1;
            batch_span.record("rows", b.rows);
            batch_span.in_scope(|| debug!(batch = b.index, rows = b.rows, "batch done"));
            cps.computed(b);
        }
        if hop.exhausted {
            break hop.result;
        }
    };
    // The last batch is checkpointed with the job's success; any before it first.
    if let Err(stop) = cps.flush(true, total).await {
        return stopped_at_checkpoint(shared, job, stop).await;
    }
    let (done_here, final_batch) = cps.into_parts();
    let result = match result {
        Some(r) => r,
        None => {
            // Earlier attempts did some batches: their outcomes come from the ledger.
            let mut batches = match gather_batches(shared, job, resume, done_here).await {
                Ok(b) => b,
                Err(stop) => return stopped(shared, job, stop).await,
            };
            if let Some(b) = &final_batch {
                batches.retain(|x| x.index != b.index);
                batches.push(b.clone());
            }
            let finished = blocking(slot, move |s| match s.run.take() {
                Some(run) => run.finish(&batches),
                None => Err(PipelineError::transient("job run already finished")),
            })
            .await;
            match finished {
                Ok((_, v)) => v,
                Err(e) => return failed(shared, job, e, delivery).await,
            }
        }
    };
    let completion = Completion {
        final_batch: final_batch.as_ref().map(record_of),
        batches_total: total,
        ..Completion::of(job, result.clone())
    };
    match shared
        .db("complete", || shared.group.complete(completion.clone()))
        .await
    {
        Ok(Ok(())) => {
            if let Some(b) = &final_batch {
                shared.metrics.batch(&job.pipeline, b.rows);
            }
            shared.metrics.job(&job.pipeline, "succeeded");
            info!(result = %result, "job succeeded");
            Disposition::Ack
        }
        Ok(Err(lost)) => {
            warn!(error = %lost, "finished, but the lease was lost; the new owner records the outcome");
            Disposition::Ack
        }
        Err(stop) => stopped(shared, job, stop).await,
    }
}

/// A job's run as it moves to the blocking pool and back: opened by the first hop, consumed
/// by the hop that finishes it.
struct Slot {
    spec: Option<JobSpec>,
    run: Option<JobRun>,
}

/// What one hop to the blocking pool did.
#[derive(Default)]
struct Hop {
    /// Usually one batch; none at the end of the input.
    batches: Vec<BatchOutcome>,
    /// The input is exhausted.
    exhausted: bool,
    /// The job's result, when the hop also finished the job.
    result: Option<Value>,
    /// The input's batch count, when known.
    total: Option<i32>,
}

impl Slot {
    /// Opens the job if not yet open, runs its next batch and, when that was the last
    /// batch the input announced, confirms the input is exhausted and (given every batch's
    /// outcome in `finish_with`) finishes the job: a single-batch job takes one hop, not
    /// three, which matters when thousands of tiny jobs run per second.
    fn hop(
        &mut self,
        registry: &Registry,
        resume: u32,
        finish_with: Option<Vec<BatchOutcome>>,
    ) -> Result<Hop, PipelineError> {
        if self.run.is_none() {
            let spec = self
                .spec
                .take()
                .ok_or_else(|| PipelineError::transient("job run already finished"))?;
            self.run = Some(registry.open(&spec, resume)?);
        }
        let Some(run) = self.run.as_mut() else {
            return Err(PipelineError::transient("job run already finished"));
        };
        let total = run.batches_total().map(|t| t as i32);
        let mut hop = Hop {
            total,
            ..Hop::default()
        };
        loop {
            match run.next_batch()? {
                None => {
                    hop.exhausted = true;
                    break;
                }
                Some(b) => {
                    let last = is_last(&b, total);
                    hop.batches.push(b);
                    if !last {
                        break;
                    }
                }
            }
        }
        if hop.exhausted
            && let Some(mut all) = finish_with
            && let Some(run) = self.run.take()
        {
            all.extend(hop.batches.iter().cloned());
            hop.result = Some(run.finish(&all)?);
        }
        Ok(hop)
    }
}

/// Every batch outcome of the job: this attempt's, plus earlier attempts' from the ledger
/// when it resumed.
async fn gather_batches(
    shared: &Shared,
    job: &ClaimedJob,
    resume: u32,
    done_here: Vec<BatchOutcome>,
) -> Result<Vec<BatchOutcome>, DbStop> {
    if resume == 0 {
        return Ok(done_here);
    }
    let records = shared
        .db("checkpoints", || shared.ledger.checkpoints(job.id))
        .await?;
    let mut by_index: std::collections::BTreeMap<u32, BatchOutcome> = records
        .into_iter()
        .map(|r| {
            let b = BatchOutcome {
                index: r.batch_index as u32,
                rows: r.rows as u64,
                output: r.output,
                checksum: r.checksum,
                summary: serde_json::from_value(r.summary.0).unwrap_or_default(),
            };
            (b.index, b)
        })
        .collect();
    by_index.extend(done_here.into_iter().map(|b| (b.index, b)));
    Ok(by_index.into_values().collect())
}

/// What a batch's checkpoint records in the ledger.
fn record_of(b: &BatchOutcome) -> BatchRecord {
    BatchRecord {
        batch_index: b.index as i32,
        rows: b.rows as i64,
        output: b.output.clone(),
        checksum: b.checksum.clone(),
        summary: sqlx::types::Json(serde_json::to_value(&b.summary).unwrap_or_default()),
    }
}

/// Whether `b` is the last batch the input announced (`total` batches).
fn is_last(b: &BatchOutcome, total: Option<i32>) -> bool {
    total.is_some_and(|t| b.index as i32 + 1 >= t)
}

/// Why a job stopped at a checkpoint.
enum CheckpointStop {
    /// Another worker or an operator took the job: stop and ack (already logged).
    Lost,
    Db(DbStop),
}

/// The delivery's fate when a checkpoint stopped the job: ack after a lost lease (the new
/// owner records the outcome), else give the job back.
async fn stopped_at_checkpoint(
    shared: &Shared,
    job: &ClaimedJob,
    stop: CheckpointStop,
) -> Disposition {
    match stop {
        CheckpointStop::Lost => Disposition::Ack,
        CheckpointStop::Db(stop) => stopped(shared, job, stop).await,
    }
}

/// Batches an attempt computes ahead of its last checkpoint before it waits for one.
const MAX_UNCHECKPOINTED: usize = 8;

/// A commit of checkpoints under way: whether cancellation was requested, or why the job
/// must stop.
type Commit<'a> = Pin<Box<dyn Future<Output = Result<bool, CheckpointStop>> + Send + 'a>>;

/// An attempt's batches and their checkpoints. The pipeline does not wait for them: a
/// batch computes while the ones before it commit, and batches completed during a commit
/// are checkpointed together by the next one, so a checkpoint costs neither wall time nor,
/// when Postgres is slower than the pipeline, a transaction per batch. The job's last
/// batch is held back for the statement that records the job's success.
struct Checkpoints<'a> {
    shared: &'a Shared,
    job: &'a ClaimedJob,
    /// Checkpointed by this attempt (earlier attempts' are read back at the end).
    done: Vec<BatchOutcome>,
    /// Computed, not yet checkpointed, in order; the first `in_flight` are in `commit`.
    pending: Vec<BatchOutcome>,
    in_flight: usize,
    commit: Option<Commit<'a>>,
}

impl<'a> Checkpoints<'a> {
    fn new(shared: &'a Shared, job: &'a ClaimedJob) -> Self {
        Checkpoints {
            shared,
            job,
            done: Vec::new(),
            pending: Vec::new(),
            in_flight: 0,
            commit: None,
        }
    }

    /// Every batch of this attempt, checkpointed or not.
    fn all(&self) -> Vec<BatchOutcome> {
        self.done.iter().chain(&self.pending).cloned().collect()
    }

    fn computed(&mut self, b: BatchOutcome) {
        self.pending.push(b);
    }

    /// Starts committing the pending batches, except the input's announced last one, unless
    /// a commit is already under way.
    fn start(&mut self, total: Option<i32>) {
        let held = usize::from(self.pending.last().is_some_and(|b| is_last(b, total)));
        self.start_first(self.pending.len() - held, total);
    }

    fn start_first(&mut self, n: usize, total: Option<i32>) {
        if self.commit.is_some() || n == 0 {
            return;
        }
        self.in_flight = n;
        let records: Vec<BatchRecord> = self.pending[..n].iter().map(record_of).collect();
        let (shared, job) = (self.shared, self.job);
        self.commit = Some(Box::pin(checkpoint(shared, job, records, total)));
    }

    /// The commit under way succeeded.
    fn committed(&mut self) {
        self.commit = None;
        self.done.extend(self.pending.drain(..self.in_flight));
        self.in_flight = 0;
    }

    /// Waits for the commit under way, if any.
    async fn settle(&mut self) -> Result<(), CheckpointStop> {
        if let Some(commit) = self.commit.as_mut() {
            commit.await?;
            self.committed();
        }
        Ok(())
    }

    /// Checkpoints every pending batch, or all but the last with `keep_last`.
    async fn flush(&mut self, keep_last: bool, total: Option<i32>) -> Result<(), CheckpointStop> {
        self.settle().await?;
        let n = self.pending.len().saturating_sub(usize::from(keep_last));
        self.start_first(n, total);
        self.settle().await
    }

    /// The checkpointed batches and the one left pending (after `flush(true, ..)`).
    fn into_parts(mut self) -> (Vec<BatchOutcome>, Option<BatchOutcome>) {
        let last = self.pending.pop();
        (self.done, last)
    }
}

/// Checkpoints consecutive batches in one transaction (renewing the lease); returns whether
/// cancellation was requested.
async fn checkpoint(
    shared: &Shared,
    job: &ClaimedJob,
    records: Vec<BatchRecord>,
    total: Option<i32>,
) -> Result<bool, CheckpointStop> {
    let worker = shared.settings.worker_id.as_str();
    match shared
        .db("checkpoint", || {
            shared
                .ledger
                .checkpoint_batches(job, worker, &records, total)
        })
        .await
    {
        Ok(Ok(cancel_requested)) => {
            for r in &records {
                shared.metrics.batch(&job.pipeline, r.rows as u64);
            }
            Ok(cancel_requested)
        }
        Ok(Err(lost)) => {
            let batch = records.first().map(|r| r.batch_index);
            warn!(error = %lost, batch, "stopping: lease lost");
            Err(CheckpointStop::Lost)
        }
        Err(stop) => Err(CheckpointStop::Db(stop)),
    }
}

/// A ledger call was abandoned mid-job (shutdown during a Postgres outage, or a query error):
/// give the delivery back; the lease expires or the release below frees the job.
async fn stopped(shared: &Shared, job: &ClaimedJob, stop: DbStop) -> Disposition {
    if let DbStop::Failed(e) = &stop {
        error!(error = %e, "ledger error mid-job; requeueing");
    }
    let _ = shared
        .ledger
        .finish_held(job, &shared.settings.worker_id, HeldEnd::Released, "")
        .await;
    Disposition::Requeue
}

async fn end_held(
    shared: &Shared,
    job: &ClaimedJob,
    end: HeldEnd,
    note: &str,
    d: Disposition,
) -> Disposition {
    match shared
        .db("finish_held", || {
            shared
                .ledger
                .finish_held(job, &shared.settings.worker_id, end, note)
        })
        .await
    {
        Ok(_) => d,
        Err(stop) => stopped(shared, job, stop).await,
    }
}

/// Records a failed attempt and copies dead jobs to the dead-letter queue.
async fn failed(
    shared: &Shared,
    job: &ClaimedJob,
    e: PipelineError,
    delivery: &Incoming,
) -> Disposition {
    let kind = e.kind;
    let text = e.message.clone();
    let outcome = shared
        .db("fail", || {
            shared.ledger.fail(
                job,
                &shared.settings.worker_id,
                kind,
                &text,
                &shared.settings.retry,
            )
        })
        .await;
    match outcome {
        Ok(FailOutcome::Retrying {
            run_at,
            delay,
            envelope,
        }) => {
            shared.metrics.job(&job.pipeline, "retried");
            warn!(error_kind = %kind, error = %text, retry_in_ms = delay.as_millis() as u64, envelope_ms = envelope.as_millis() as u64, run_at = %run_at, "attempt failed; retry scheduled");
            Disposition::Ack
        }
        Ok(FailOutcome::Dead { reason }) => {
            shared.metrics.job(&job.pipeline, "dead");
            error!(error_kind = %kind, error = %text, "job dead: {reason}");
            dead_letter(
                shared,
                &delivery.body,
                delivery.message_id.as_deref(),
                Some(&job.key),
                &reason,
            )
            .await;
            Disposition::Ack
        }
        Ok(FailOutcome::LeaseLost) => {
            warn!(error = %text, "attempt failed after the lease was lost; not recorded");
            Disposition::Ack
        }
        Err(stop) => stopped(shared, job, stop).await,
    }
}
