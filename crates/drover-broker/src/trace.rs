//! W3C trace context across the broker: a producer puts its span's `traceparent` in the
//! message headers ([`traceparent_of`]), the worker continues that trace in its job span
//! ([`continue_trace`]) and records the trace id in the ledger ([`trace_id_of`]).
//!
//! Spans get trace ids whether or not an exporter is configured (the binary installs the
//! OpenTelemetry layer either way), so the producer's trace id shows up in the worker's logs
//! and in the ledger even without a collector.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C `traceparent` of a span, to put in a message's headers.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Continues the trace of a `traceparent` value in `span` (an invalid value is ignored).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let mut carrier: HashMap<String, String> = HashMap::new();
    carrier.insert("traceparent".into(), traceparent.to_string());
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace id of a span (32 hex digits), when it has one.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
