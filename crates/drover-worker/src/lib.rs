//! drover-worker: the worker engine behind `drover worker`, as a library.
//!
//! [`run`] takes its configuration, the pipelines it may run and a shutdown future (as
//! mini-redis's `server::run` takes one), so the same engine runs in the `drover` binary, in
//! a team's own binary with its own pipelines, and in-process in tests that drive drain,
//! grace expiry and lease loss without signalling a subprocess.
//!
//! Shape: one consumer loop ([`consume`](crate::consume)) spawns a task per delivery (at most
//! `prefetch` exist, because the broker sends no more unacked messages than that); each task
//! decides its delivery ([`delivery`](crate::delivery)) and runs an attempt batch by batch
//! ([`attempt`](crate::attempt)); a heartbeat loop renews the leases of in-flight jobs and a
//! relay loop re-publishes due retries. Shutdown flips one flag that every loop and job
//! watches.
//!
//! The invariant every path keeps: a delivery is acked only once the ledger holds its job
//! (claimed by this worker, finished, or scheduled); from then on the ledger re-drives it
//! (a rescuer loop retries jobs whose lease expired and publishes again jobs whose message
//! was lost). A delivery not yet claimed is nacked back to the queue (or left unacked,
//! which the broker requeues when the connection closes).
//!
//! ```no_run
//! # async fn example() -> Result<(), drover_worker::WorkerError> {
//! use drover_core::config::{Connections, FileConfig};
//! use drover_worker::{WorkerConfig, run};
//!
//! let conns = Connections::resolve(None, None, None, &FileConfig::default())
//!     .expect("the defaults are valid");
//! let registry = drover_pipeline::Registry::builtin();
//! // Drains and returns when ctrl-c is pressed.
//! run(WorkerConfig::new(conns), registry, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod attempt;
mod config;
mod consume;
mod delivery;
mod error;
mod heartbeat;
mod memory;
mod metrics;
mod poison;
mod reconnect;
mod relay;
mod rescue;
mod retention;
mod schedule;
mod shared;

pub use config::{
    DEFAULT_GRACE, DEFAULT_HEARTBEAT, DEFAULT_LOST_AFTER, DEFAULT_MAX_ATTEMPTS,
    DEFAULT_METRICS_ADDR, DEFAULT_OUTPUT_ROOT, DEFAULT_PREFETCH, WorkerConfig, default_worker_id,
};
pub use error::WorkerError;
pub use memory::{DEFAULT_BYTES_PER_ROW, resident_bytes};
pub use poison::poison_job_key;
pub use rescue::due_message;
pub use retention::{PRUNE_BATCH, Retention, delete_outputs};

use drover_broker::{BrokerAddresses, BrokerError, Topology};
use drover_core::ExposeSecret;
use drover_ledger::{ClaimedJob, Group, HeldEnd, Ledger};
use drover_pipeline::Registry;
use metrics::Metrics;
use shared::Shared;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{RwLock, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

/// How long start-up waits for Postgres to accept a connection.
const LEDGER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One attempt at connecting to the ledger with the worker's pool settings.
async fn connect_ledger_once(config: &WorkerConfig) -> Result<Ledger, drover_ledger::LedgerError> {
    Ledger::connect_with(
        config.conns.database_url.expose_secret(),
        false,
        u32::from(config.prefetch).clamp(4, 32) + 4,
        LEDGER_CONNECT_TIMEOUT,
        Some(config.heartbeat.max(Duration::from_secs(1))),
    )
    .await
}

/// Connects to the ledger, retrying with jittered backoff while Postgres cannot be reached
/// and logging the cause each time; any other error (bad URL, no database, bad password)
/// is returned, since waiting would not fix it.
async fn connect_ledger(config: &WorkerConfig) -> Result<Ledger, WorkerError> {
    use backoff::backoff::Backoff;
    let mut backoff = shared::reconnect_backoff();
    loop {
        match connect_ledger_once(config).await {
            Ok(ledger) => return Ok(ledger),
            Err(e) if e.is_connection() => {
                let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(10));
                let mut cause = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    cause.push_str(": ");
                    cause.push_str(&s.to_string());
                    source = s.source();
                }
                warn!(
                    error = %cause,
                    retry_in_ms = wait.as_millis() as u64,
                    "Postgres unreachable at start-up; retrying"
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs a worker until `shutdown` completes, then drains: stops consuming, lets running jobs
/// reach their next batch boundary within `config.grace`, checkpoints, requeues what did
/// not finish, and closes its connections.
///
/// Fails only at start-up (ledger refusing us or not migrated, broker unreachable, HTTP port
/// taken); a Postgres that cannot be reached is waited for, logging why, as are outages
/// later; job failures end in the ledger.
pub async fn run(
    config: WorkerConfig,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    run_with_stop(config, registry, shutdown, std::future::pending()).await
}

/// [`run`], and when `stop_now` completes during the drain the worker stops waiting for
/// running jobs at once: it releases them to `queued` and publishes them again, as when the
/// grace period runs out. An operator who pressed Ctrl-C and sees a long batch still running
/// presses it again rather than waiting out the grace period (or killing the worker, which
/// leaves the leases to expire).
pub async fn run_with_stop(
    config: WorkerConfig,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
    stop_now: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    if config.prefetch == 0 {
        return Err(WorkerError::Config {
            field: "--prefetch",
            message: "must be at least 1, got 0".into(),
        });
    }
    if config.heartbeat.is_zero() {
        return Err(WorkerError::Config {
            field: "--heartbeat-secs",
            message: "must be at least 1, got 0".into(),
        });
    }
    // Claims and completions are grouped (2 connections); the rest is per job: checkpoints
    // of multi-batch jobs, slow-path claims, failures. Capped at 36 so several workers fit
    // in a default Postgres (max_connections 100); jobs beyond it wait for a connection.
    // No transaction of the worker idles for long; one that idles for a heartbeat period
    // belongs to a frozen worker and must not keep its job's row locked (see
    // `Ledger::connect_with`). The relay publishes inside its sweep's transaction, so the
    // floor leaves a broker confirm time to arrive.
    // Postgres down at start-up is waited out like an outage later (a worker started before
    // its database, by systemd or compose, comes up with it); a shutdown meanwhile exits.
    // The first attempt is not raced with `shutdown`: a worker asked to stop at once still
    // reports a ledger it cannot use (not migrated, bad password).
    let mut shutdown = Box::pin(shutdown);
    let ledger = match connect_ledger_once(&config).await {
        Ok(ledger) => ledger,
        Err(e) if e.is_connection() => tokio::select! {
            ledger = connect_ledger(&config) => ledger?,
            () = &mut shutdown => {
                info!("shutdown requested before Postgres was reachable");
                return Ok(());
            }
        },
        Err(e) => return Err(e.into()),
    };
    ledger.check_schema().await?;
    let topo = Topology::for_connections(&config.conns);
    // Fail fast on a bad URL or an unreachable broker at start-up; later losses reconnect.
    let addresses = broker_addresses(&config)?;
    if addresses.len() > 1 {
        info!(nodes = %addresses.shown(), "broker addresses: failing over between these nodes");
    }
    let first = addresses.connect(&config.worker_id).await?;
    first.declare(&topo).await?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let group = Group::new(
        ledger.clone(),
        config.worker_id.clone(),
        usize::from(config.prefetch),
    );
    let metrics_addr = config.metrics_addr;
    let metrics = Arc::new(Metrics::new());
    let memory = memory::MemoryGate::new(
        config.memory_limit,
        config.memory_per_row.clone(),
        metrics.clone(),
    );
    if let Some(limit) = config.memory_limit.filter(|l| *l > 0) {
        info!(
            limit_bytes = limit,
            rss_bytes = resident_bytes().unwrap_or(0),
            "memory-aware admission: a job is claimed only while resident memory plus its estimate stays under --memory-limit"
        );
    }
    let shared = Arc::new(Shared {
        ledger,
        group,
        registry,
        config,
        topo,
        addresses,
        inflight: Default::default(),
        draining: AtomicBool::new(false),
        shutdown: shutdown_rx,
        publisher: RwLock::new(None),
        metrics,
        memory,
    });
    let http = match metrics_addr {
        Some(addr) => {
            Some(metrics::serve(addr, shared.metrics.clone(), shared.ledger.clone()).await?)
        }
        None => None,
    };
    info!(
        worker = %shared.config.worker_id,
        namespace = %shared.topo.namespace,
        queue = %shared.topo.jobs_queue(),
        prefetch = shared.config.prefetch,
        pipelines = ?shared.registry.names(),
        "worker starting"
    );

    let signals = tokio::spawn(async move {
        shutdown.await;
        let _ = shutdown_tx.send(true);
    });
    let heartbeat = tokio::spawn(heartbeat::heartbeat_loop(shared.clone()));
    let relay = tokio::spawn(relay::relay_loop(shared.clone()));
    let rescuer = tokio::spawn(rescue::rescue_loop(shared.clone()));
    let poison = tokio::spawn(poison::poison_loop(shared.clone()));
    let schedules = tokio::spawn(schedule::schedule_loop(shared.clone()));
    let retention = shared
        .config
        .retention
        .clone()
        .map(|r| tokio::spawn(retention::retention_loop(shared.clone(), r)));

    let mut tasks = JoinSet::new();
    let last_broker = consume::consume_loop(shared.clone(), Some(first), &mut tasks).await;

    // Draining: no new deliveries arrive; running jobs stop at their next batch boundary.
    shared.draining.store(true, Ordering::SeqCst);
    info!(
        in_flight = tasks.len(),
        grace_secs = shared.config.grace.as_secs(),
        "draining"
    );
    let drain = tokio::time::timeout(shared.config.grace, async {
        while tasks.join_next().await.is_some() {}
    });
    let drained = tokio::select! {
        done = drain => done.is_ok(),
        () = stop_now => false,
    };
    if !drained {
        warn!(
            still_running = tasks.len(),
            "grace period over or stop requested; requeueing unfinished jobs"
        );
        tasks.abort_all();
        release_all(&shared).await;
    }
    rescuer.abort();
    poison.abort();
    schedules.abort();
    if let Some(r) = retention {
        r.abort();
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
    info!(worker = %shared.config.worker_id, "worker stopped");
    Ok(())
}

/// The broker addresses the worker connects with (one URL, or a cluster's nodes separated
/// by commas), each with the AMQP heartbeat set to the lease's period (in whole seconds, at
/// least 1) unless the URL names one. A frozen worker's connection then closes within a few
/// periods and the messages RabbitMQ had pushed to it (a rescued job's among them) go to
/// live workers, instead of waiting out the broker's default 60 s.
pub(crate) fn broker_addresses(config: &WorkerConfig) -> Result<BrokerAddresses, BrokerError> {
    let secs = config.heartbeat.as_secs().max(1);
    Ok(
        BrokerAddresses::parse(config.conns.amqp_url.expose_secret())?.map_urls(|url| {
            if url.contains("heartbeat=") {
                return url.to_string();
            }
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}heartbeat={secs}")
        }),
    )
}

/// Releases every job still registered as in flight back to `queued` (after the grace
/// period) and publishes their messages again (their deliveries were acked at claim).
async fn release_all(shared: &Shared) {
    let left: Vec<ClaimedJob> = shared.inflight_jobs();
    let mut released = Vec::with_capacity(left.len());
    for job in left {
        match shared
            .ledger
            .finish_held(&job, &shared.config.worker_id, HeldEnd::Released, "")
            .await
        {
            Ok(Ok(())) => {
                info!(key = %job.key, "released unfinished job back to queued");
                released.push(job);
            }
            Ok(Err(lost)) => {
                info!(key = %job.key, error = %lost, "not released: the job is no longer ours")
            }
            Err(e) => {
                warn!(key = %job.key, error = %e, "could not release job; its lease will expire and another worker takes it over")
            }
        }
    }
    rescue::republish(shared, &released).await;
}
