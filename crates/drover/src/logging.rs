//! Logs and traces: human text on a terminal, one JSON object per line otherwise, and
//! OpenTelemetry spans exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! An `https://` endpoint is reached with rustls, trusting the system's roots plus the CA of
//! `OTEL_EXPORTER_OTLP_CERTIFICATE` (or `…_TRACES_CERTIFICATE`), and presenting the client
//! certificate of `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` + `…_CLIENT_KEY` when set (the
//! OpenTelemetry SDKs' standard variables).
//!
//! Spans are created (and get trace ids) even without an exporter, so the trace id a
//! producer put in `traceparent` shows up in the worker's logs and in the ledger either way.

use clap::ValueEnum;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithHttpConfig as _;
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
        let exporter = match otlp_tls_client() {
            Ok(None) => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build(),
            Ok(Some(client)) => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(client)
                .build(),
            Err(e) => {
                eprintln!("drover: warning: OTLP exporter not started: {e}");
                return builder.build();
            }
        };
        match exporter {
            Ok(exporter) => return builder.with_batch_exporter(exporter).build(),
            Err(e) => eprintln!("drover: warning: OTLP exporter not started: {e}"),
        }
    }
    builder.build()
}

/// The first of `names` that is set and not empty.
fn env_first(names: &[&str]) -> Option<(String, String)> {
    names.iter().find_map(|n| {
        std::env::var(n)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| (n.to_string(), v))
    })
}

/// The OTLP HTTP client with the CA and client certificate of the standard variables, or
/// `None` when none is set (the exporter's own client, the system's roots). Errors name the
/// variable and the file.
fn otlp_tls_client() -> Result<Option<reqwest::blocking::Client>, String> {
    let ca = env_first(&[
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
    ]);
    let cert = env_first(&[
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    ]);
    let key = env_first(&[
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    ]);
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    let read = |(var, path): &(String, String)| {
        std::fs::read(path).map_err(|e| format!("{var} {path}: {e}"))
    };
    let timeout = std::env::var("OTEL_EXPORTER_OTLP_TIMEOUT")
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok())
        .map_or(
            std::time::Duration::from_secs(10),
            std::time::Duration::from_millis,
        );
    let mut b = reqwest::blocking::Client::builder().timeout(timeout);
    if let Some(ca) = &ca {
        let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?)
            .map_err(|e| format!("{} {}: not PEM certificates: {e}", ca.0, ca.1))?;
        if certs.is_empty() {
            return Err(format!("{} {}: holds no PEM certificate", ca.0, ca.1));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    match (&cert, &key) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| format!("{} {} / {} {}: {e}", cert.0, cert.1, key.0, key.1))?;
            b = b.identity(id);
        }
        _ => {
            return Err(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together; one is missing".into(),
            );
        }
    }
    // A blocking client owns a runtime of its own; it is built on a thread outside ours
    // (as the exporter does for its default client).
    std::thread::spawn(move || b.build())
        .join()
        .map_err(|_| "building the OTLP HTTP client panicked".to_string())?
        .map(Some)
        .map_err(|e| format!("building the OTLP HTTP client: {e}"))
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
