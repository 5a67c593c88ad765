//! Service outages. These stop the machine's shared RabbitMQ or Postgres, so they are
//! `#[ignore]`d in the parallel run and run alone, one at a time, by `make test`
//! (`cargo test --test integration -- --ignored --test-threads=1`).

use crate::support::*;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(180);

fn sh(cmd: &str) {
    let status = Command::new("bash")
        .args(["-c", cmd])
        .status()
        .expect("bash");
    assert!(status.success(), "{cmd} failed");
}

fn publish_noops(env: &TestEnv, prefix: &str, n: usize, params: &str) -> Vec<String> {
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let lines: String = keys
        .iter()
        .map(|k| format!("{{\"v\":1,\"idempotency_key\":\"{k}\",\"pipeline\":\"noop\",\"params\":{params}}}\n"))
        .collect();
    std::fs::write(env.path("jobs.jsonl"), lines).expect("write");
    let out = env.drover(&["publish", "--file", "jobs.jsonl"]);
    assert!(out.status.success(), "{}", stderr(&out));
    keys
}

fn wait_all(env: &TestEnv, keys: &[String]) {
    let mut args = vec!["jobs", "wait", "--timeout", "180"];
    args.extend(keys.iter().map(String::as_str));
    let out = env.drover(&args);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "stops the shared RabbitMQ; run alone by make test"]
async fn broker_stopped_and_started_mid_run() {
    let mut env = TestEnv::new().await;
    let w = env.start_worker(&["--prefetch", "4"]);
    // 24 jobs of 1.2 s at prefetch 4: six rounds, so the broker stops with jobs in flight.
    let keys = publish_noops(&env, "bo", 24, r#"{"sleep_ms":150,"batches":8}"#);
    env.wait_job(&keys[0], T, |_| true).await;
    env.worker(w).wait_log("job succeeded", T);
    sh("rabbitmqctl stop_app >/dev/null");
    env.worker(w).wait_log("reconnecting", T);
    sh("rabbitmqctl start_app >/dev/null && timeout 120 rabbitmqctl await_startup >/dev/null");
    env.worker(w).wait_log("\"consuming\"", T);
    wait_all(&env, &keys);
    // Nothing ran twice to completion, nothing failed.
    let bad: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM drover.attempts WHERE outcome NOT IN ('succeeded', 'lost', 'interrupted')",
    )
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(bad, 0);
    let succeeded: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE outcome = 'succeeded') FROM drover.attempts GROUP BY job_id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("per job");
    assert_eq!(succeeded.len(), 24);
    assert!(succeeded.iter().all(|n| *n == 1), "{succeeded:?}");
    assert!(
        env.worker(w).log().contains("broker"),
        "the outage was noticed"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "stops the shared Postgres; run alone by make test"]
async fn postgres_stopped_for_seconds_mid_run() {
    let mut env = TestEnv::new().await;
    // Flush what earlier tests left dirty now, so the shutdown checkpoint below is short.
    // The outage must begin while jobs are still running: an idle worker has no reason to
    // touch Postgres, so it would never notice. The 8 jobs take two rounds of 10 s each
    // at prefetch 4, far longer than a fast stop even on a loaded machine (CI once took
    // over 2 s to stop Postgres after the parallel tests, when these jobs lasted 3 s).
    sqlx::query("CHECKPOINT")
        .execute(&env.pool)
        .await
        .expect("checkpoint");
    let w = env.start_worker(&["--prefetch", "4"]);
    let keys = publish_noops(&env, "pg", 8, r#"{"sleep_ms":250,"batches":40}"#);
    env.wait_job(&keys[0], T, |r| {
        sqlx::Row::get::<i32, _>(r, "batches_done") >= 1
    })
    .await;
    sh("pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main stop -m fast");
    env.worker(w).wait_log("postgres unavailable", T);
    sh(
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start \
        && for i in $(seq 60); do pg_isready -q -h 127.0.0.1 && exit 0; sleep 0.5; done; exit 1",
    );
    wait_all(&env, &keys);
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM drover.attempts WHERE outcome IN ('failed', 'dead')",
    )
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(failed, 0, "nothing is marked failed because of the outage");
    let rows: i64 = sqlx::query_scalar("SELECT sum(rows_done)::int8 FROM drover.jobs")
        .fetch_one(&env.pool)
        .await
        .expect("sum");
    assert_eq!(rows, 8 * 40, "every batch counted once");
}
