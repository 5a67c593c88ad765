//! Faults: transient failures and scheduled retries, garbage messages, drain on SIGTERM,
//! takeover after kill -9.

use crate::support::*;
use serde_json::Value;
use sqlx::Row;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

/// Fast retries so tests do not wait for production delays.
pub(crate) const FAST_RETRY: &str =
    "[retry]\ninitial_delay_ms = 200\nmultiplier = 2.0\nmax_delay_ms = 2000\nbudget_secs = 600\n";

#[tokio::test(flavor = "multi_thread")]
async fn transient_failures_are_retried_on_a_schedule_in_the_ledger() {
    let mut env = TestEnv::new().await;
    env.write_config(FAST_RETRY);
    env.start_worker(&[]);
    for key in ["retry-a", "retry-b"] {
        let out = env.drover(&[
            "publish",
            "--pipeline",
            "noop",
            "--key",
            key,
            "--param",
            "fail_attempts=2",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    env.publish_noop(
        "retry-x",
        &["--param", "fail_attempts=9", "--max-attempts", "3"],
    );
    let out = env.drover(&["jobs", "wait", "retry-a", "retry-b", "--timeout", "60"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    for key in ["retry-a", "retry-b"] {
        let job = env.show(key);
        assert_eq!(job["attempts"], 3);
        let outcomes = outcomes(&job);
        assert_eq!(outcomes, ["failed", "failed", "succeeded"], "{job}");
        assert_eq!(job["error_kind"], "transient");
    }
    // Exhausted → dead, copied to the dead-letter queue.
    let out = env.drover(&["jobs", "wait", "retry-x", "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(1));
    let job = env.show("retry-x");
    assert_eq!(job["state"], "dead");
    assert_eq!(job["attempts"], 3);
    let dead = env.dead_letters().await;
    assert!(
        dead.iter().any(|r| r.contains("attempts exhausted")),
        "{dead:?}"
    );
    // The retries were scheduled: per job, the envelope grows (200 ms, 400 ms) and the
    // jittered delay drawn from it differs between jobs.
    let log = env.worker(0).log();
    let retries = |key: &str| -> Vec<(u64, u64)> {
        log.lines()
            .filter(|l| l.contains("retry scheduled") && l.contains(&format!("\"{key}\"")))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| {
                (
                    v["envelope_ms"].as_u64().unwrap_or(0),
                    v["retry_in_ms"].as_u64().unwrap_or(u64::MAX),
                )
            })
            .collect()
    };
    let (a, b) = (retries("retry-a"), retries("retry-b"));
    for r in [&a, &b] {
        let envelopes: Vec<u64> = r.iter().map(|(e, _)| *e).collect();
        assert_eq!(envelopes, [200, 400], "{r:?}");
        assert!(
            r.iter().all(|(e, d)| d <= e),
            "delay within its envelope: {r:?}"
        );
    }
    let delays = |r: &[(u64, u64)]| r.iter().map(|(_, d)| *d).collect::<Vec<_>>();
    assert_ne!(delays(&a), delays(&b), "full jitter spreads jobs apart");
    // The schedule was visible in the ledger while waiting.
    let scheduled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM drover.attempts WHERE outcome = 'failed'")
            .fetch_one(&env.pool)
            .await
            .expect("count");
    assert_eq!(scheduled, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_cancel_a_running_job_and_retry_a_dead_one() {
    let mut env = TestEnv::new().await;
    env.write_config(FAST_RETRY);
    env.start_worker(&["--heartbeat-secs", "1"]);
    env.publish_noop(
        "cancel-1",
        &["--param", "batches=200", "--param", "sleep_ms=50"],
    );
    env.wait_job("cancel-1", T, |r| r.get::<i32, _>("batches_done") >= 2)
        .await;
    let out = env.drover(&["jobs", "cancel", "cancel-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("next batch boundary"),
        "{}",
        stdout(&out)
    );
    let row = env
        .wait_job("cancel-1", T, |r| {
            r.get::<String, _>("state") == "cancelled"
        })
        .await;
    assert!(row.get::<i32, _>("batches_done") < 200, "stopped early");
    let again = env.drover(&["jobs", "cancel", "cancel-1"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("cancelled"), "{}", stderr(&again));

    env.publish_noop(
        "redrive-1",
        &["--param", "fail_attempts=1", "--max-attempts", "1"],
    );
    env.wait_job("redrive-1", T, |r| r.get::<String, _>("state") == "dead")
        .await;
    let out = env.drover(&["jobs", "retry", "redrive-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_job("redrive-1", T, |r| {
        r.get::<String, _>("state") == "succeeded"
    })
    .await;
    let job = env.show("redrive-1");
    let outcomes = outcomes(&job);
    assert_eq!(
        outcomes,
        ["dead", "succeeded"],
        "attempts continue after a re-drive"
    );
    let out = env.drover(&["jobs", "retry", "redrive-1"]);
    assert!(!out.status.success(), "a succeeded job cannot be re-driven");
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_is_dead_lettered_and_valid_jobs_still_succeed() {
    let mut env = TestEnv::new().await;
    // Prefetch 1: deliveries are handled in order, so once the last (valid) job succeeded,
    // every message before it has been recorded and dead-lettered (both happen before the ack).
    env.start_worker(&["--prefetch", "1"]);
    let huge = vec![b'x'; 2 * 1024 * 1024];
    let bodies: Vec<&[u8]> = vec![
        b"",
        b"\xff\xfe\xfd",
        b"{not json",
        br#"{"v":2,"idempotency_key":"bad-version","pipeline":"noop"}"#,
        br#"{"v":1,"idempotency_key":"bad-pipeline","pipeline":"nosuch"}"#,
        br#"{"v":1,"idempotency_key":"bad-params","pipeline":"noop","params":{"batches":"many"}}"#,
        &huge,
    ];
    for b in &bodies {
        env.publish_raw(b, None).await;
    }
    env.publish_raw(
        br#"{"v":1,"idempotency_key":"good-after","pipeline":"noop"}"#,
        None,
    )
    .await;
    env.wait_job("good-after", T, |r| {
        r.get::<String, _>("state") == "succeeded"
    })
    .await;
    for key in ["bad-version", "bad-pipeline", "bad-params"] {
        assert_eq!(env.state(key).await.as_deref(), Some("rejected"), "{key}");
    }
    let job = env.show("bad-params");
    assert!(
        job["last_error"].as_str().unwrap_or("").contains("batches"),
        "{job}"
    );
    let job = env.show("bad-pipeline");
    assert!(
        job["last_error"].as_str().unwrap_or("").contains("nosuch"),
        "{job}"
    );
    // Every bad message is in the dead-letter queue with its reason.
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), bodies.len(), "{dead:?}");
    assert!(dead.iter().all(|r| !r.is_empty()), "{dead:?}");
    assert!(dead.iter().any(|r| r.contains("not JSON")));
    assert!(dead.iter().any(|r| r.contains("limit")));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_at_a_batch_boundary_and_the_job_resumes() {
    let mut env = TestEnv::new().await;
    let w = env.start_worker(&["--shutdown-grace-secs", "20"]);
    env.publish_noop(
        "drain-1",
        &["--param", "batches=40", "--param", "sleep_ms=100"],
    );
    env.wait_job("drain-1", T, |r| r.get::<i32, _>("batches_done") >= 3)
        .await;
    env.worker(w).signal("-TERM");
    let status = env.worker(w).wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "worker exit {status:?}: {}",
        env.worker(w).log()
    );
    let row = env.wait_job("drain-1", T, |_| true).await;
    assert_eq!(
        row.get::<String, _>("state"),
        "queued",
        "released, not failed"
    );
    let done_before: i32 = row.get("batches_done");
    assert!((3..40).contains(&done_before));

    env.start_worker(&[]);
    env.wait_job("drain-1", T, |r| r.get::<String, _>("state") == "succeeded")
        .await;
    let job = env.show("drain-1");
    let outcomes = outcomes(&job);
    assert_eq!(outcomes, ["interrupted", "succeeded"]);
    // Each batch checkpointed once; the second attempt resumed after the first one's batches.
    let resumed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM drover.checkpoints WHERE attempt = 2")
            .fetch_one(&env.pool)
            .await
            .expect("count");
    assert_eq!(resumed, i64::from(40 - done_before));
    assert_eq!(job["batches_done"], 40);
    assert_eq!(job["rows_done"], 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_job_and_another_worker_takes_over_once() {
    let mut env = TestEnv::new().await;
    let a = env.start_worker(&["--heartbeat-secs", "1", "--worker-id", "victim"]);
    env.publish_noop(
        "kill-1",
        &["--param", "batches=30", "--param", "sleep_ms=100"],
    );
    env.wait_job("kill-1", T, |r| r.get::<i32, _>("batches_done") >= 3)
        .await;
    env.worker(a).signal("-KILL");
    env.worker(a).wait_exit(Duration::from_secs(10));
    env.start_worker(&["--heartbeat-secs", "1", "--worker-id", "rescuer"]);
    env.wait_job("kill-1", T, |r| r.get::<String, _>("state") == "succeeded")
        .await;
    let job = env.show("kill-1");
    let summary = workers_and_outcomes(&job);
    assert_eq!(
        summary,
        [
            ("victim".to_string(), "lost".to_string()),
            ("rescuer".to_string(), "succeeded".to_string())
        ]
    );
    let per_batch: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM drover.checkpoints GROUP BY batch_index ORDER BY batch_index",
    )
    .fetch_all(&env.pool)
    .await
    .expect("checkpoints");
    assert_eq!(per_batch.len(), 30);
    assert_eq!(job["rows_done"], 30, "no batch counted twice");
    let first_attempt: i64 =
        sqlx::query_scalar("SELECT count(*) FROM drover.checkpoints WHERE attempt = 1")
            .fetch_one(&env.pool)
            .await
            .expect("count");
    assert!(
        first_attempt >= 3,
        "the rescuer resumed after the victim's checkpoints"
    );
}
