//! Logs and traces: human text on a terminal, one JSON object per line otherwise, and
//! OpenTelemetry spans exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! Spans are created (and get trace ids) even without an exporter, so the trace id a
//! producer put in `traceparent` shows up in the worker's logs and in the ledger either way.

use clap::ValueEnum;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (default on a terminal).
    Text,
    /// One JSON object per line with every span field (default otherwise).
    Json,
}

/// Keeps the tracer provider alive; flushes spans when dropped.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).map(|s| !s.is_empty()).unwrap_or(false))
        && std::env::var("OTEL_TRACES_EXPORTER")
            .map(|v| v != "none")
            .unwrap_or(true)
}

fn tracer_provider() -> SdkTracerProvider {
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("drover");
    }
    let builder = SdkTracerProvider::builder().with_resource(resource.build());
    if otlp_configured() {
        // Endpoint, headers, timeout and protocol come from the standard OTEL_* variables.
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => return builder.with_batch_exporter(exporter).build(),
            Err(e) => eprintln!("drover: warning: OTLP exporter not started: {e}"),
        }
    }
    builder.build()
}

/// Installs the global subscriber (filter: `DROVER_LOG`, else `RUST_LOG`, else `info`;
/// `debug` with `-v`) and the W3C trace-context propagator.
pub fn init(format: Option<LogFormat>, verbose: u8) -> Telemetry {
    let default = match verbose {
        0 => "info,sqlx=warn,lapin=warn,amq_protocol=warn",
        1 => "debug,sqlx=warn,lapin=info,polars=info",
        _ => "trace",
    };
    let filter = std::env::var("DROVER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = tracer_provider();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("drover"));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let _ = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(true)
                    .with_span_list(true)
                    .flatten_event(true),
            )
            .try_init(),
    };
    Telemetry { provider }
}
