//! The worker's HTTP port: `/healthz`, `/readyz` and Prometheus `/metrics`.
//!
//! Health and readiness are separate on purpose: `/healthz` answers while the process runs
//! (a liveness probe must not kill a worker that is waiting out a Postgres outage), while
//! `/readyz` says whether this worker is connected to both services and consuming.
//!
//! Readiness asks Postgres itself (`SELECT 1`, bounded by [`READY_DB_TIMEOUT`], the answer
//! cached for [`READY_CACHE`] so a burst of probes costs one query): an idle worker makes no
//! ledger calls, so a flag updated by job traffic would stay "up" through a whole outage.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// How long `/readyz` waits for Postgres to answer before calling it down.
pub const READY_DB_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `/readyz` reuses its last Postgres answer.
pub const READY_CACHE: Duration = Duration::from_secs(1);

/// What the HTTP handlers read: the counters and the ledger readiness is checked against.
#[derive(Clone)]
pub struct HttpState {
    metrics: Arc<Metrics>,
    ledger: drover_ledger::Ledger,
    /// The last ledger check: when, and whether Postgres answered.
    checked: Arc<tokio::sync::Mutex<Option<(Instant, bool)>>>,
}

impl HttpState {
    /// Whether Postgres answers now (or answered within [`READY_CACHE`]). Concurrent probes
    /// wait for one check instead of each sending a query.
    async fn database_up(&self) -> bool {
        let mut last = self.checked.lock().await;
        if let Some((at, up)) = *last
            && at.elapsed() < READY_CACHE
        {
            return up;
        }
        let up = matches!(
            tokio::time::timeout(READY_DB_TIMEOUT, self.ledger.ping()).await,
            Ok(Ok(()))
        );
        *last = Some((Instant::now(), up));
        up
    }
}

/// Labels of `drover_jobs_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub pipeline: String,
    pub outcome: String,
}

/// Labels of per-pipeline series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    pub pipeline: String,
}

/// Everything the worker counts, plus the readiness flags.
pub struct Metrics {
    registry: Registry,
    jobs: Family<OutcomeLabels, Counter>,
    durations: Family<PipelineLabels, Histogram>,
    batches: Family<PipelineLabels, Counter>,
    rows: Family<PipelineLabels, Counter>,
    in_flight: Gauge,
    relay_lag_ms: Gauge,
    relayed: Counter,
    rescued: Counter,
    republished: Counter,
    poisoned: Counter,
    memory_limit: Gauge,
    memory_rss: Gauge,
    memory_reserved: Gauge,
    memory_waiting: Gauge,
    memory_per_row: Family<PipelineLabels, Gauge>,
    /// Connected to RabbitMQ and consuming.
    pub consuming: AtomicBool,
}

impl Metrics {
    /// Registers every series under the `drover_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("drover");
        let jobs = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "jobs",
            "Jobs handled, by pipeline and outcome (succeeded, retried, dead, rejected, cancelled, released, duplicate, held_back, waited_for_memory)",
            jobs.clone(),
        );
        let durations = Family::<PipelineLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.5, 14))
        });
        registry.register(
            "job_duration_seconds",
            "Duration of attempts that ended (any outcome), by pipeline",
            durations.clone(),
        );
        let batches = Family::<PipelineLabels, Counter>::default();
        registry.register("batches", "Batches checkpointed", batches.clone());
        let rows = Family::<PipelineLabels, Counter>::default();
        registry.register("rows", "Input rows checkpointed", rows.clone());
        let in_flight = Gauge::default();
        registry.register(
            "jobs_in_flight",
            "Jobs running on this worker now",
            in_flight.clone(),
        );
        let relay_lag_ms = Gauge::default();
        registry.register(
            "retry_relay_lag_milliseconds",
            "How overdue the most overdue retry was at the relay's last publish",
            relay_lag_ms.clone(),
        );
        let relayed = Counter::default();
        registry.register(
            "retries_relayed",
            "Due retries re-published by the relay",
            relayed.clone(),
        );
        let rescued = Counter::default();
        registry.register(
            "jobs_rescued",
            "Running jobs whose lease expired (worker dead, frozen or cut off), re-driven from the ledger",
            rescued.clone(),
        );
        let republished = Counter::default();
        registry.register(
            "lost_messages_republished",
            "Queued jobs whose message was gone from the queue, published again",
            republished.clone(),
        );
        let poisoned = Counter::default();
        registry.register(
            "jobs_poisoned",
            "Queued jobs marked dead because the broker dead-lettered their message at the delivery limit",
            poisoned.clone(),
        );
        let memory_limit = Gauge::default();
        registry.register(
            "memory_limit_bytes",
            "--memory-limit: resident memory plus a new job's estimate must stay under it (0: no limit)",
            memory_limit.clone(),
        );
        let memory_rss = Gauge::default();
        registry.register(
            "memory_rss_bytes",
            "Resident memory of this worker process, sampled now",
            memory_rss.clone(),
        );
        let memory_reserved = Gauge::default();
        registry.register(
            "memory_reserved_bytes",
            "Sum of the memory estimates of the jobs admitted and running here (with --memory-limit)",
            memory_reserved.clone(),
        );
        let memory_waiting = Gauge::default();
        registry.register(
            "jobs_waiting_for_memory",
            "Deliveries waiting, unclaimed, until their estimate fits under --memory-limit",
            memory_waiting.clone(),
        );
        let memory_per_row = Family::<PipelineLabels, Gauge>::default();
        registry.register(
            "memory_bytes_per_row",
            "Bytes per row of batch size a job's estimate uses, by pipeline (--memory-per-row, or learned from batches run here)",
            memory_per_row.clone(),
        );
        Metrics {
            registry,
            memory_limit,
            memory_rss,
            memory_reserved,
            memory_waiting,
            memory_per_row,
            poisoned,
            rescued,
            republished,
            jobs,
            durations,
            batches,
            rows,
            in_flight,
            relay_lag_ms,
            relayed,
            consuming: AtomicBool::new(false),
        }
    }

    /// Counts a job outcome.
    pub fn job(&self, pipeline: &str, outcome: &str) {
        self.jobs
            .get_or_create(&OutcomeLabels {
                pipeline: pipeline.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Records how long an attempt ran.
    pub fn duration(&self, pipeline: &str, secs: f64) {
        self.durations
            .get_or_create(&PipelineLabels {
                pipeline: pipeline.to_string(),
            })
            .observe(secs);
    }

    /// Counts one checkpointed batch of `rows` rows.
    pub fn batch(&self, pipeline: &str, rows: u64) {
        let l = PipelineLabels {
            pipeline: pipeline.to_string(),
        };
        self.batches.get_or_create(&l).inc();
        self.rows.get_or_create(&l).inc_by(rows);
    }

    /// Sets the in-flight gauge.
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.set(n as i64);
    }

    /// Records a relay publish of `n` retries, the most overdue by `lag_secs`.
    pub fn relayed(&self, n: usize, lag_secs: f64) {
        self.relayed.inc_by(n as u64);
        self.relay_lag_ms.set((lag_secs * 1000.0) as i64);
    }

    /// Counts a job marked dead because its message reached the delivery limit.
    pub fn poisoned(&self) {
        self.poisoned.inc();
    }

    /// Counts jobs the rescuer re-drove after their lease expired.
    pub fn rescued(&self, n: usize) {
        self.rescued.inc_by(n as u64);
    }

    /// Counts queued jobs published again because their message was lost.
    pub fn republished(&self, n: usize) {
        self.republished.inc_by(n as u64);
    }

    /// Sets the memory limit gauge (0: none).
    pub fn memory_limit(&self, bytes: u64) {
        self.memory_limit.set(saturating_i64(bytes));
    }

    /// Sets the admission gauges: RSS sampled, bytes reserved, deliveries waiting.
    pub fn memory_state(&self, rss: u64, reserved: u64, waiting: i64) {
        self.memory_rss.set(saturating_i64(rss));
        self.memory_reserved.set(saturating_i64(reserved));
        self.memory_waiting.set(waiting);
    }

    /// Sets the bytes per row a pipeline's estimates use.
    pub fn memory_per_row(&self, pipeline: &str, bytes: u64) {
        self.memory_per_row
            .get_or_create(&PipelineLabels {
                pipeline: pipeline.to_string(),
            })
            .set(saturating_i64(bytes));
    }

    fn render(&self) -> String {
        if let Some(rss) = crate::memory::resident_bytes() {
            self.memory_rss.set(saturating_i64(rss));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(h): State<HttpState>) -> impl IntoResponse {
    let consuming = h.metrics.consuming.load(Ordering::SeqCst);
    let db = h.database_up().await;
    let body = format!(
        "broker: {}\npostgres: {}\n",
        if consuming {
            "consuming"
        } else {
            "not consuming"
        },
        if db { "up" } else { "down" }
    );
    let status = if consuming && db {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

async fn metrics(State(h): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.metrics.render(),
    )
}

/// Binds `addr` (failing with a clear error if taken) and serves the three endpoints until
/// the task is aborted; `/readyz` checks `ledger`.
pub async fn serve(
    addr: SocketAddr,
    m: Arc<Metrics>,
    ledger: drover_ledger::Ledger,
) -> Result<tokio::task::JoinHandle<()>, crate::WorkerError> {
    let listen_error = |error| crate::WorkerError::Listen { addr, error };
    let listener = TcpListener::bind(addr).await.map_err(listen_error)?;
    let local = listener.local_addr().map_err(listen_error)?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(HttpState {
            metrics: m,
            ledger,
            checked: Arc::default(),
        });
    // In the message itself, not only as a field: with port 0 this line is the only place
    // the operator learns the port.
    tracing::info!(addr = %local, "serving /healthz, /readyz and /metrics on http://{local}");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    }))
}
