//! Memory-aware admission (`drover worker --memory-limit`): jobs whose estimates do not fit
//! together run one after the other, a job that can never fit goes dead with the reason,
//! and the state shows in /metrics.

use crate::support::*;
use serde_json::Value;
use sqlx::Row;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1024 * 1024;

/// The worker's metrics address, from its start-up line.
fn metrics_addr(env: &mut TestEnv, w: usize) -> String {
    let line = env.worker(w).wait_log("serving /healthz", T);
    let v: Value = serde_json::from_str(&line).expect("json log line");
    v["addr"].as_str().expect("addr field").to_string()
}

/// The value of the sample `series` (name and labels, exactly) in a /metrics scrape.
fn sample(addr: &str, series: &str) -> Option<f64> {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until `series` satisfies `ok` (the worker updates some series just after the
/// ledger commit a test waits on), bounded by `T`.
async fn wait_sample(addr: &str, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + T;
    loop {
        if let Some(v) = sample(addr, series)
            && ok(v)
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never as expected: {:?}",
            http_get(addr, "/metrics").1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two large payroll jobs, each estimated at 976.6 MiB (`--memory-per-row payroll=100KiB`
/// times 10,000 rows per batch), under a 1500 MiB limit: one fits, two do not. Both are in
/// the queue before the worker starts, and its prefetch would take both at once; the second
/// waits unclaimed (no attempt) until the first ends, then runs. Each runs exactly once and
/// the attempts do not overlap; the wait shows in the log and in /metrics.
#[tokio::test(flavor = "multi_thread")]
async fn two_large_jobs_under_a_memory_limit_run_one_after_the_other() {
    let mut env = TestEnv::new().await;
    let input = generate(&env, 30_000, "acme.parquet");
    let keys = ["big-1", "big-2"];
    let mut lines = String::new();
    for k in keys {
        lines.push_str(
            &serde_json::json!({
                "v": 1,
                "idempotency_key": k,
                "pipeline": "payroll",
                "batch_size": 10_000,
                "params": {
                    "client_id": "acme",
                    "period": "2026-11",
                    "input": input.display().to_string(),
                    "output": env.path(k).display().to_string(),
                },
            })
            .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(env.path("jobs.jsonl"), lines).expect("write");
    let out = env.drover(&["publish", "--file", "jobs.jsonl"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let w = env.start_worker(&[
        "--prefetch",
        "4",
        "--memory-limit",
        "1500MiB",
        "--memory-per-row",
        "payroll=100KiB",
    ]);
    let addr = metrics_addr(&mut env, w);
    for k in keys {
        let row = env
            .wait_job(k, T, |r| r.get::<String, _>("state") == "succeeded")
            .await;
        assert_eq!(row.get::<i32, _>("attempts"), 1, "{k} ran more than once");
        assert_eq!(row.get::<i64, _>("rows_done"), 30_000, "{k}");
    }
    let spans: Vec<(
        String,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT j.idempotency_key, a.started_at, a.finished_at FROM drover.attempts a \
         JOIN drover.jobs j ON j.id = a.job_id ORDER BY a.started_at",
    )
    .fetch_all(&env.pool)
    .await
    .expect("attempts");
    assert_eq!(spans.len(), 2, "{spans:?}");
    assert!(
        spans[1].1 >= spans[0].2,
        "the two jobs ran at once under the memory limit: {spans:?}"
    );

    let log = env.worker(w).log();
    let wait = log
        .lines()
        .find(|l| l.contains("not enough memory under --memory-limit"))
        .unwrap_or_else(|| panic!("no job waited for memory:\n{log}"));
    assert!(
        wait.contains("976.6 MiB (10000 rows per batch x 100.0 KiB per row, --memory-per-row)"),
        "{wait}"
    );
    assert!(wait.contains("1.5 GiB"), "{wait}");

    let waited = wait_sample(
        &addr,
        "drover_jobs_total{pipeline=\"payroll\",outcome=\"waited_for_memory\"}",
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(waited, 1.0);
    assert_eq!(
        sample(&addr, "drover_memory_limit_bytes"),
        Some((1500 * MIB) as f64)
    );
    assert_eq!(
        sample(&addr, "drover_memory_bytes_per_row{pipeline=\"payroll\"}"),
        Some(102_400.0)
    );
    wait_sample(&addr, "drover_memory_reserved_bytes", |v| v == 0.0).await;
    assert_eq!(sample(&addr, "drover_jobs_waiting_for_memory"), Some(0.0));
    let rss = sample(&addr, "drover_memory_rss_bytes").expect("rss gauge");
    assert!(
        rss > MIB as f64,
        "an RSS under 1 MiB is not a measurement: {rss}"
    );
}

/// Without `--memory-per-row`, a pipeline's bytes per row is learned from its batches (and
/// shown in /metrics); a job whose estimate alone exceeds the limit is failed permanently,
/// once, with the estimate, the limit and what to change, and the worker goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_can_never_fit_goes_dead_and_bytes_per_row_are_learned() {
    let mut env = TestEnv::new().await;
    let input = generate(&env, 2_000, "acme.parquet");
    let w = env.start_worker(&["--memory-limit", "1GiB"]);
    let addr = metrics_addr(&mut env, w);

    // The default estimate, 5,000 rows x 4 KiB, fits 1 GiB.
    let out = env.drover(&[
        "publish",
        "--pipeline",
        "payroll",
        "--key",
        "learn-1",
        "--param",
        "client_id=acme",
        "--param",
        "period=2026-11",
        "--param",
        &format!("input={}", input.display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_job("learn-1", T, |r| r.get::<String, _>("state") == "succeeded")
        .await;
    // Payroll's frames take some tens to hundreds of bytes per row, times the 4 batches a
    // job holds at once.
    let per_row = wait_sample(
        &addr,
        "drover_memory_bytes_per_row{pipeline=\"payroll\"}",
        |v| v > 0.0,
    )
    .await;
    assert!(
        (4.0 * 8.0..4.0 * 4096.0).contains(&per_row),
        "learned {per_row} bytes per row"
    );

    // 2,000,000 rows x 4 KiB (nothing learned for noop yet): 7.6 GiB, over 1 GiB.
    env.publish_noop("huge-1", &["--batch-size", "2000000"]);
    let row = env
        .wait_job("huge-1", T, |r| r.get::<String, _>("state") == "dead")
        .await;
    assert_eq!(
        row.get::<i32, _>("attempts"),
        1,
        "a job that can never fit is not retried"
    );
    let error: String = row.get("last_error");
    for needle in [
        "7.6 GiB (2000000 rows per batch x 4.0 KiB per row",
        "exceeds this worker's --memory-limit 1.0 GiB",
        "raise --memory-limit or lower the job's batch_size",
    ] {
        assert!(error.contains(needle), "{needle:?} not in {error:?}");
    }
    assert_eq!(row.get::<String, _>("error_kind"), "permanent");

    // The worker goes on: a small job still runs.
    env.publish_noop("small-1", &["--batch-size", "100"]);
    env.wait_job("small-1", T, |r| r.get::<String, _>("state") == "succeeded")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_limit_that_is_not_a_size_is_refused() {
    let env = TestEnv::new().await;
    let out = env.drover(&["worker", "--memory-limit", "nonsense"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--memory-limit \"nonsense\": not a size") && err.contains("2GiB"),
        "{err}"
    );
    let out = env.drover(&["worker", "--memory-per-row", "payroll=lots"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--memory-per-row \"payroll=lots\" \"lots\": not a size"),
        "{err}"
    );
    let out = env.drover(&["worker", "--help"]);
    let help = stdout(&out);
    for needle in [
        "--memory-limit <SIZE>",
        "--memory-per-row <PIPELINE=SIZE>",
        "goes dead",
    ] {
        assert!(
            help.contains(needle),
            "{needle:?} not in worker --help:\n{help}"
        );
    }
}
