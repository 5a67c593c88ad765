//! The worker's grouped ledger writes (`Group`, `claim_ready`, `complete_many`) against a
//! real Postgres: each job claimed once however many workers race, leases respected, the
//! last batch's checkpoint folded into the success.

use crate::support::TestEnv;
use drover_ledger::{BatchRecord, ClaimedJob, Completion, Group, LeaseLost, Ledger, NewJob};
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

async fn ledger(env: &TestEnv) -> Ledger {
    Ledger::connect(&env.db_url, false, 8, Duration::from_secs(10))
        .await
        .expect("connect ledger")
}

async fn queue(l: &Ledger, keys: &[String]) {
    let jobs: Vec<NewJob> = keys
        .iter()
        .map(|k| NewJob {
            id: uuid::Uuid::new_v4(),
            key: k.clone(),
            pipeline: "noop".into(),
            params: json!({}),
            batch_size: None,
            max_attempts: 3,
            max_attempts_given: true,
            trace_id: None,
        })
        .collect();
    l.insert_queued(&jobs).await.expect("insert queued");
}

/// Queues one job under `key` and claims it as worker `w1`.
async fn claimed_one(l: &Ledger, key: &str) -> ClaimedJob {
    let keys = vec![key.to_string()];
    queue(l, &keys).await;
    l.claim_ready("w1", &keys).await.expect("claim")[0]
        .clone()
        .expect("claimed")
}

/// Another worker takes the job's lease (same attempt), as a takeover would.
async fn steal_lease(env: &TestEnv, key: &str) {
    sqlx::query("UPDATE drover.jobs SET lease_owner = 'w2' WHERE idempotency_key = $1")
        .bind(key)
        .execute(&env.pool)
        .await
        .expect("steal");
}

/// A completed batch's checkpoint: part `part-NNNNN.parquet`, summary `{"rows": rows}`.
fn record(batch_index: i32, rows: i64, checksum: &str) -> BatchRecord {
    BatchRecord {
        batch_index,
        rows,
        output: Some(format!("part-{batch_index:05}.parquet")),
        checksum: Some(checksum.into()),
        summary: sqlx::types::Json(json!({ "rows": rows })),
        first_row: Some(i64::from(batch_index) * rows),
        rows_out: Some(rows),
        attempt: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_workers_claim_each_job_exactly_once() {
    let env = TestEnv::new().await;
    let l = ledger(&env).await;
    let keys: Vec<String> = (0..200).map(|i| format!("race-{i}")).collect();
    queue(&l, &keys).await;
    let a = Group::new(l.clone(), "worker-a".into(), 32);
    let b = Group::new(l.clone(), "worker-b".into(), 32);
    // Every key is asked for by both workers at once.
    let mut tasks = tokio::task::JoinSet::new();
    for k in &keys {
        for (g, name) in [(a.clone(), "worker-a"), (b.clone(), "worker-b")] {
            let k = k.clone();
            tasks.spawn(async move { (name, k.clone(), g.claim_ready(k).await) });
        }
    }
    let mut claimed = Vec::new();
    while let Some(r) = tokio::time::timeout(Duration::from_secs(60), tasks.join_next())
        .await
        .expect("claims finish within 60 s")
    {
        let (name, key, res) = r.expect("task");
        if let Some(job) = res.expect("claim_ready") {
            assert_eq!(job.key, key);
            assert_eq!(job.attempt, 1);
            claimed.push((name, key));
        }
    }
    let distinct: HashSet<&String> = claimed.iter().map(|(_, k)| k).collect();
    assert_eq!(claimed.len(), 200, "each of 200 jobs claimed exactly once");
    assert_eq!(distinct.len(), 200);
    // The ledger agrees: one running attempt per job, owned by whoever got the claim.
    let rows: Vec<(String, String, i32, i64)> = sqlx::query_as(
        "SELECT j.idempotency_key, j.lease_owner, j.attempts, \
         (SELECT count(*) FROM drover.attempts a WHERE a.job_id = j.id AND a.outcome = 'running') \
         FROM drover.jobs j WHERE j.state = 'running'",
    )
    .fetch_all(&env.pool)
    .await
    .expect("query");
    assert_eq!(rows.len(), 200);
    for (key, owner, attempts, running) in rows {
        let want = claimed.iter().find(|(_, k)| *k == key).map(|(n, _)| *n);
        assert_eq!(Some(owner.as_str()), want, "owner of {key}");
        assert_eq!((attempts, running), (1, 1), "attempts of {key}");
    }
    l.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn claim_ready_leaves_unclaimable_jobs_to_the_slow_path() {
    let env = TestEnv::new().await;
    let l = ledger(&env).await;
    let keys: Vec<String> = ["ok", "later", "due", "cancel", "done"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    queue(&l, &keys).await;
    for sql in [
        "UPDATE drover.jobs SET state = 'retrying', run_at = now() + interval '1 hour' \
         WHERE idempotency_key = 'later'",
        "UPDATE drover.jobs SET state = 'retrying', run_at = now() - interval '1 second' \
         WHERE idempotency_key = 'due'",
        "UPDATE drover.jobs SET cancel_requested = true WHERE idempotency_key = 'cancel'",
        "UPDATE drover.jobs SET state = 'succeeded' WHERE idempotency_key = 'done'",
    ] {
        sqlx::query(sql)
            .execute(&env.pool)
            .await
            .expect("set states");
    }
    let mut asked = keys.clone();
    asked.push("ok".into()); // a duplicate delivery in the same group
    asked.push("unknown".into());
    let got = l.claim_ready("w", &asked).await.expect("claim_ready");
    let claimed: Vec<Option<&str>> = got
        .iter()
        .map(|j| j.as_ref().map(|j| j.key.as_str()))
        .collect();
    assert_eq!(
        claimed,
        vec![
            Some("ok"),
            None,
            Some("due"),
            None,
            None,
            None, // the duplicate: claimed once, for its first occurrence
            None
        ]
    );
    l.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn complete_many_respects_leases_and_folds_the_last_checkpoint() {
    let env = TestEnv::new().await;
    let l = ledger(&env).await;
    let keys: Vec<String> = vec!["mine".into(), "stolen".into(), "nobatch".into()];
    queue(&l, &keys).await;
    let jobs = l.claim_ready("w1", &keys).await.expect("claim");
    let jobs: Vec<_> = jobs.into_iter().map(|j| j.expect("claimed")).collect();
    // "mine" already checkpointed batch 0 in this attempt; batch 1 comes with the success.
    let b0 = record(0, 10, "aa");
    l.checkpoint(&jobs[0], "w1", &b0, Some(2))
        .await
        .expect("checkpoint")
        .expect("lease held");
    // "stolen" was taken over meanwhile.
    sqlx::query(
        "UPDATE drover.jobs SET lease_owner = 'w2', attempts = 2 WHERE idempotency_key = 'stolen'",
    )
    .execute(&env.pool)
    .await
    .expect("steal");
    let last = record(1, 7, "bb");
    let group = Group::new(l.clone(), "w1".into(), 8);
    let (r0, r1, r2) = tokio::join!(
        group.complete(Completion {
            final_batch: Some(last.clone()),
            batches_total: Some(2),
            ..Completion::of(&jobs[0], json!({"rows": 17}))
        }),
        group.complete(Completion {
            final_batch: Some(last.clone()),
            ..Completion::of(&jobs[1], json!({"rows": 7}))
        }),
        group.complete(Completion::of(&jobs[2], json!({"rows": 0}))),
    );
    assert_eq!(r0.expect("complete"), Ok(()));
    assert_eq!(r1.expect("complete"), Err(LeaseLost));
    assert_eq!(r2.expect("complete"), Ok(()));
    let row: (
        String,
        i32,
        Option<i32>,
        i64,
        serde_json::Value,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT state, batches_done, batches_total, rows_done, result, lease_owner \
         FROM drover.jobs WHERE idempotency_key = 'mine'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("job");
    assert_eq!(
        row,
        (
            "succeeded".into(),
            2,
            Some(2),
            17,
            json!({"rows": 17}),
            None
        )
    );
    let parts: Vec<(i32, i64, Option<String>)> = sqlx::query_as(
        "SELECT c.batch_index, c.rows, c.checksum FROM drover.checkpoints c \
         JOIN drover.jobs j ON j.id = c.job_id WHERE j.idempotency_key = 'mine' \
         ORDER BY c.batch_index",
    )
    .fetch_all(&env.pool)
    .await
    .expect("checkpoints");
    assert_eq!(
        parts,
        vec![(0, 10, Some("aa".into())), (1, 7, Some("bb".into()))]
    );
    let states: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT j.idempotency_key, j.state, a.outcome FROM drover.jobs j \
         JOIN drover.attempts a ON a.job_id = j.id AND a.attempt = 1 ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .expect("attempts");
    assert_eq!(
        states,
        vec![
            ("mine".into(), "succeeded".into(), "succeeded".into()),
            ("nobatch".into(), "succeeded".into(), "succeeded".into()),
            // Untouched: the new owner records the outcome.
            ("stolen".into(), "running".into(), "running".into()),
        ]
    );
    let stolen_cps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM drover.checkpoints c JOIN drover.jobs j ON j.id = c.job_id \
         WHERE j.idempotency_key = 'stolen'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(stolen_cps, 0, "no checkpoint written without the lease");
    l.close().await;
}

/// A checkpoint commits without waiting for the WAL flush, but only its own transaction
/// does: the pooled connection comes back with synchronous commits, so the completion that
/// acks the delivery is durable (and flushes the checkpoints before it).
#[tokio::test(flavor = "multi_thread")]
async fn asynchronous_checkpoints_leave_the_connection_synchronous() {
    let env = TestEnv::new().await;
    // One connection, so the checkpoint and the checks below share it.
    let l = Ledger::connect(&env.db_url, false, 1, Duration::from_secs(10))
        .await
        .expect("connect ledger");
    let job = claimed_one(&l, "cp").await;
    let show = || async {
        sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
            .fetch_one(l.pool())
            .await
            .expect("show")
    };
    assert_eq!(show().await, "on");
    for i in 0..3 {
        let cancel = l
            .checkpoint(&job, "w1", &record(i, 5, "cc"), Some(4))
            .await
            .expect("checkpoint");
        assert_eq!(cancel, Ok(false));
        assert_eq!(show().await, "on", "after checkpoint {i}");
    }
    let progress: (i32, Option<i32>, i64) = sqlx::query_as(
        "SELECT batches_done, batches_total, rows_done FROM drover.jobs \
         WHERE idempotency_key = 'cp'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("job");
    assert_eq!(progress, (3, Some(4), 15));
    // A checkpoint under a lost lease writes nothing, and still leaves the connection clean.
    steal_lease(&env, "cp").await;
    let lost = l
        .checkpoint(&job, "w1", &record(3, 5, "cc"), Some(4))
        .await
        .expect("checkpoint");
    assert_eq!(lost, Err(LeaseLost));
    assert_eq!(show().await, "on");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM drover.checkpoints")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(n, 3);
    l.close().await;
}

/// Batches that completed during one commit are checkpointed together by the next: all of
/// them or, when the lease is lost, none. A replayed index corrects the progress instead of
/// counting its rows twice.
#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_of_several_batches_commit_together_or_not_at_all() {
    let env = TestEnv::new().await;
    let l = ledger(&env).await;
    let job = claimed_one(&l, "many").await;
    let progress = || async {
        sqlx::query_as::<_, (i32, Option<i32>, i64, i64)>(
            "SELECT batches_done, batches_total, rows_done, \
             (SELECT count(*) FROM drover.checkpoints WHERE job_id = j.id) \
             FROM drover.jobs j WHERE idempotency_key = 'many'",
        )
        .fetch_one(&env.pool)
        .await
        .expect("job")
    };
    let first = [record(0, 5, "a"), record(1, 5, "b")];
    let cancel = l
        .checkpoint_batches(&job, "w1", &first, Some(5))
        .await
        .expect("checkpoint");
    assert_eq!(cancel, Ok(false));
    assert_eq!(progress().await, (2, Some(5), 10, 2));
    // Batch 1 replayed with 4 rows, then 2 and 3.
    let next = [record(1, 4, "b2"), record(2, 5, "c"), record(3, 5, "d")];
    let cancel = l
        .checkpoint_batches(&job, "w1", &next, Some(5))
        .await
        .expect("checkpoint");
    assert_eq!(cancel, Ok(false));
    assert_eq!(progress().await, (4, Some(5), 19, 4));
    steal_lease(&env, "many").await;
    let lost = l
        .checkpoint_batches(&job, "w1", &[record(4, 5, "e"), record(5, 5, "f")], Some(5))
        .await
        .expect("checkpoint");
    assert_eq!(lost, Err(LeaseLost));
    assert_eq!(
        progress().await,
        (4, Some(5), 19, 4),
        "nothing of the lost call"
    );
    l.close().await;
}
