//! The worker's HTTP port: `/healthz`, `/readyz` and Prometheus `/metrics`.
//!
//! Health and readiness are separate on purpose: `/healthz` answers while the process runs
//! (a liveness probe must not kill a worker that is waiting out a Postgres outage), while
//! `/readyz` says whether this worker is connected to both services and consuming.

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
use tokio::net::TcpListener;

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
    /// Connected to RabbitMQ and consuming.
    pub consuming: AtomicBool,
    /// The last ledger call reached Postgres.
    pub database_up: AtomicBool,
}

impl Metrics {
    /// Registers every series under the `drover_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("drover");
        let jobs = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "jobs",
            "Jobs handled, by pipeline and outcome (succeeded, retried, dead, rejected, cancelled, released, duplicate)",
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
        Metrics {
            registry,
            jobs,
            durations,
            batches,
            rows,
            in_flight,
            relay_lag_ms,
            relayed,
            consuming: AtomicBool::new(false),
            database_up: AtomicBool::new(true),
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

    fn ready(&self) -> bool {
        self.consuming.load(Ordering::SeqCst) && self.database_up.load(Ordering::SeqCst)
    }

    fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let consuming = m.consuming.load(Ordering::SeqCst);
    let db = m.database_up.load(Ordering::SeqCst);
    let body = format!(
        "broker: {}\npostgres: {}\n",
        if consuming {
            "consuming"
        } else {
            "not consuming"
        },
        if db { "up" } else { "down" }
    );
    let status = if m.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

/// Binds `addr` (failing with a clear error if taken) and serves the three endpoints until
/// the task is aborted.
pub async fn serve(
    addr: SocketAddr,
    m: Arc<Metrics>,
) -> Result<tokio::task::JoinHandle<()>, crate::WorkerError> {
    let listen_error = |source| crate::WorkerError::Listen { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(listen_error)?;
    let local = listener.local_addr().map_err(listen_error)?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(m);
    tracing::info!(addr = %local, "serving /healthz, /readyz and /metrics");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    }))
}
