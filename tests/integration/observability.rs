//! What an operator sees: health, readiness and metrics over HTTP, and the producer's trace
//! continued into the worker's logs and the ledger.

use crate::support::*;
use serde_json::Value;
use sqlx::Row;
use std::io::{Read, Write};
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics_over_http() {
    let mut env = TestEnv::new().await;
    let w = env.start_worker(&[]);
    let line = env.worker(w).wait_log("serving /healthz", T);
    let v: Value = serde_json::from_str(&line).expect("json log line");
    let addr = v["addr"].as_str().expect("addr field").to_string();

    let (status, body) = http_get(&addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(&addr, "/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("consuming") && body.contains("postgres: up"),
        "{body}"
    );

    env.publish_noop("m-1", &["--param", "batches=2"]);
    env.wait_job("m-1", T, |r| r.get::<String, _>("state") == "succeeded")
        .await;
    // The ledger says `succeeded` as soon as the completion commits; the worker counts the
    // job just after, so scrape until the counters show it (as Prometheus would, later).
    let needles = [
        "drover_jobs_total{pipeline=\"noop\",outcome=\"succeeded\"} 1",
        "drover_batches_total{pipeline=\"noop\"} 2",
        "drover_job_duration_seconds_count{pipeline=\"noop\"} 1",
        "drover_jobs_in_flight 0",
        "drover_retry_relay_lag_milliseconds",
    ];
    let deadline = std::time::Instant::now() + T;
    loop {
        let (status, metrics) = http_get(&addr, "/metrics");
        assert_eq!(status, 200);
        let missing: Vec<&str> = needles
            .iter()
            .copied()
            .filter(|n| !metrics.contains(n))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics still lack {missing:?} after {T:?}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = http_get(&addr, "/nope");
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_producers_trace_id_reaches_the_worker_logs_and_the_ledger() {
    let mut env = TestEnv::new().await;
    let w = env.start_worker(&[]);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut cmd = env.command(&["publish", "--pipeline", "noop", "--key", "traced-1"]);
    cmd.env("TRACEPARENT", format!("00-{trace_id}-00f067aa0ba902b7-01"));
    let out = run_bounded(cmd, T);
    assert!(out.status.success(), "{}", stderr(&out));
    let row = env
        .wait_job("traced-1", T, |r| {
            r.get::<String, _>("state") == "succeeded"
        })
        .await;
    assert_eq!(
        row.get::<Option<String>, _>("trace_id").as_deref(),
        Some(trace_id)
    );
    let line = env.worker(w).wait_log("job succeeded", T);
    assert!(
        line.contains(trace_id),
        "worker log line lacks the trace id: {line}"
    );
    assert!(
        line.contains("traced-1"),
        "worker log line lacks the key: {line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_are_exported_over_otlp_when_an_endpoint_is_set() {
    let env = TestEnv::new().await;
    // A stand-in OTLP/HTTP collector: accepts one request and reports its request line.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = vec![0u8; 64 * 1024];
            let n = s.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = tx.send(head);
        }
    });
    let mut cmd = env.command(&["publish", "--pipeline", "noop", "--key", "otlp-1"]);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    let out = run_bounded(cmd, T);
    assert!(out.status.success(), "{}", stderr(&out));
    let head = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("no OTLP export arrived");
    assert_eq!(head, "POST /v1/traces HTTP/1.1");
}
