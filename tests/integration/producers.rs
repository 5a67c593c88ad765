//! Producers: `drover.enqueue()` in a caller's transaction, the Rust client, and one key =
//! one request (a conflict names what differs) through the CLI, the client and SQL.

use crate::support::{TestEnv, amqp_url, stderr, stdout};
use drover_client::{Client, ClientError, JobMessage, Outcome};
use drover_core::config::{Connections, FileConfig};
use serde_json::json;
use sqlx::Row;
use std::time::{Duration, Instant};

#[allow(dead_code)] // its `main` is for `cargo run --example`
#[path = "../../crates/drover-client/examples/producer.rs"]
mod producer_example;

fn conns(env: &TestEnv) -> Connections {
    Connections::resolve(
        Some(amqp_url()),
        Some(env.db_url.clone()),
        Some(env.ns.clone()),
        &FileConfig::default(),
    )
    .expect("test connections")
}

fn noop(key: &str, params: serde_json::Value) -> JobMessage {
    let params = params.as_object().cloned().expect("params object");
    JobMessage::new(key, "noop", params, None, None).expect("valid job")
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_same_request_is_harmless_a_different_one_is_a_conflict() {
    let env = TestEnv::new().await;
    let first = env.drover(&[
        "publish",
        "--pipeline",
        "noop",
        "--key",
        "acme:2026-11",
        "--param",
        "batches=1",
    ]);
    assert!(first.status.success(), "{}", stderr(&first));
    // No spurious lapin error while the publisher exits.
    assert!(!stderr(&first).contains("ERROR"), "{}", stderr(&first));
    assert!(
        !stderr(&first).contains("invalid channel state"),
        "{}",
        stderr(&first)
    );

    let same = env.drover(&[
        "publish",
        "--pipeline",
        "noop",
        "--key",
        "acme:2026-11",
        "--params-json",
        r#"{"batches": 1}"#,
    ]);
    assert!(same.status.success(), "{}", stderr(&same));
    assert!(stdout(&same).contains("acme:2026-11: already exists (queued); nothing published"));

    let other = env.drover(&[
        "publish",
        "--pipeline",
        "noop",
        "--key",
        "acme:2026-11",
        "--param",
        "batches=2",
        "--batch-size",
        "10",
    ]);
    assert_eq!(other.status.code(), Some(1), "{}", stderr(&other));
    assert!(
        stderr(&other).contains(
            "acme:2026-11: already exists (queued) with different params (batches: 1 vs 2), \
             batch_size (not given vs 10); nothing published"
        ),
        "{}",
        stderr(&other)
    );
    let params: serde_json::Value =
        sqlx::query_scalar("SELECT params FROM drover.jobs WHERE idempotency_key = 'acme:2026-11'")
            .fetch_one(&env.pool)
            .await
            .expect("row");
    assert_eq!(params, json!({"batches": 1}));
}

#[tokio::test(flavor = "multi_thread")]
async fn enqueue_commit_runs_within_a_second_rollback_never() {
    let mut env = TestEnv::new().await;
    env.start_worker(&[]);
    let pool = env.pool.clone();

    let mut tx = pool.begin().await.expect("begin");
    let new = drover_client::enqueue(&mut tx, &noop("rolled-back", json!({})))
        .await
        .expect("enqueue");
    assert!(new);
    tx.rollback().await.expect("rollback");

    let mut tx = pool.begin().await.expect("begin");
    assert!(
        drover_client::enqueue(&mut tx, &noop("committed", json!({"batches": 2})))
            .await
            .expect("enqueue")
    );
    // The same request in the same transaction: one job.
    assert!(
        !drover_client::enqueue(&mut tx, &noop("committed", json!({"batches": 2})))
            .await
            .expect("enqueue again")
    );
    tx.commit().await.expect("commit");
    let row = env
        .wait_job("committed", Duration::from_secs(30), |r| {
            r.get::<String, _>("state") == "succeeded"
        })
        .await;
    let created: chrono::DateTime<chrono::Utc> = row.get("created_at");
    let started: chrono::DateTime<chrono::Utc> = row.get("started_at");
    assert!(
        started - created < chrono::TimeDelta::seconds(1),
        "started {} ms after the enqueue",
        (started - created).num_milliseconds()
    );
    // The worker published it on the NOTIFY, not on the 30 s orphan sweep, and the relay
    // says so in its log.
    env.worker(0)
        .wait_log("relayed due jobs", Duration::from_secs(5));
    assert_eq!(env.state("rolled-back").await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn enqueue_conflict_and_invalid_input_are_sql_errors_naming_the_field() {
    let env = TestEnv::new().await;
    let pool = env.pool.clone();
    let mut tx = pool.begin().await.expect("begin");
    drover_client::enqueue(&mut tx, &noop("k", json!({"period": "2026-11"})))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    let mut tx = pool.begin().await.expect("begin");
    let err = drover_client::enqueue(&mut tx, &noop("k", json!({"period": "2026-12"})))
        .await
        .expect_err("conflict");
    assert!(matches!(err, ClientError::Conflict { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "k: already exists (queued) with different params (period: \"2026-11\" vs \"2026-12\"); \
         nothing published"
    );
    drop(tx);

    for (sql, message) in [
        (
            "SELECT drover.enqueue('', 'noop')",
            "field \"idempotency_key\": must not be empty",
        ),
        (
            "SELECT drover.enqueue(repeat('x', 257), 'noop')",
            "field \"idempotency_key\": 257 bytes, at most 256 allowed",
        ),
        (
            "SELECT drover.enqueue('k2', 'no such')",
            "field \"pipeline\": \"no such\" is not a pipeline name",
        ),
        (
            "SELECT drover.enqueue('k2', 'noop', '[1,2]')",
            "field \"params\": expected a JSON object, got [1, 2]",
        ),
        (
            "SELECT drover.enqueue('k2', 'noop', '{}', 0)",
            "field \"batch_size\": expected an integer from 1 to 10000000, got 0",
        ),
        (
            "SELECT drover.enqueue('k2', 'noop', '{}', NULL, 0)",
            "field \"max_attempts\": expected an integer from 1 to 100, got 0",
        ),
    ] {
        let err = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .expect_err(sql);
        assert!(err.to_string().contains(message), "{sql}: {err}");
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM drover.jobs")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn enqueued_without_a_worker_runs_when_one_starts() {
    let mut env = TestEnv::new().await;
    let mut tx = env.pool.begin().await.expect("begin");
    drover_client::enqueue(&mut tx, &noop("early", json!({})))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    let t0 = Instant::now();
    // The job names no max_attempts: the relay stores this worker's setting for it.
    env.write_config("[worker]\nmax_attempts = 2\n");
    env.start_worker(&[]);
    let row = env
        .wait_job("early", Duration::from_secs(30), |r| {
            r.get::<String, _>("state") == "succeeded"
        })
        .await;
    assert_eq!(row.get::<i32, _>("max_attempts"), 2);
    // Well inside the 30 s grace that applies to producers that publish themselves.
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn client_publish_many_job_and_wait() {
    let mut env = TestEnv::new().await;
    env.start_worker(&[]);
    let client = Client::connect(&conns(&env)).await.expect("connect");
    let jobs: Vec<JobMessage> = (0..50)
        .map(|i| noop(&format!("many-{i}"), json!({"batches": 1})))
        .collect();
    let out = client.publish_many(&jobs).await.expect("publish many");
    assert!(out.iter().all(|o| matches!(o, Outcome::Published { .. })));
    let keys: Vec<String> = jobs.iter().map(|j| j.idempotency_key.clone()).collect();
    let done = client
        .wait(&keys, Duration::from_secs(60))
        .await
        .expect("wait");
    assert!(
        done.iter()
            .all(|p| p.state == drover_client::JobState::Succeeded),
        "{done:?}"
    );
    let job = client.job("many-7").await.expect("job").expect("exists");
    assert_eq!(job.rows_done, 1);
    assert!(client.job("absent").await.expect("job").is_none());

    // Same requests again: harmless. One changed: a conflict, the rest untouched.
    let mut again = jobs.clone();
    again[3] = noop("many-3", json!({"batches": 2}));
    let err = client.publish_many(&again).await.expect_err("conflict");
    let ClientError::Conflict {
        conflicts,
        outcomes,
    } = err
    else {
        panic!("expected a conflict, got {err:?}");
    };
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].differs, "params (batches: 1 vs 2)");
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Exists { .. }))
            .count(),
        49
    );
    let timeout = client
        .wait(&["never-published".to_string()], Duration::from_millis(300))
        .await
        .expect_err("timeout");
    assert!(
        timeout
            .to_string()
            .contains("never-published (not in the ledger)"),
        "{timeout}"
    );
    client.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_producer_example_runs() {
    let mut env = TestEnv::new().await;
    env.start_worker(&[]);
    let states = producer_example::produce(&conns(&env), "ex")
        .await
        .expect("example");
    assert_eq!(states, ["succeeded", "succeeded"]);
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM example_orders")
        .fetch_one(&env.pool)
        .await
        .expect("orders");
    assert_eq!(orders, 1);
}
