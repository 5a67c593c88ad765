//! The lifecycle of a long-running service: the ledger, not the broker, decides what runs.
//! Readiness that asks Postgres, traces that survive a retry, secrets that are never shown,
//! expired leases re-driven from the ledger, frozen workers fenced, lost messages published
//! again, and `drover doctor`.

use crate::support::*;
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::PgPoolOptions;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(90);

/// The address a worker serves /readyz on (it picks a free port and logs it).
fn http_addr(env: &mut TestEnv, w: usize) -> String {
    let line = env.worker(w).wait_log("serving /healthz", T);
    let v: Value = serde_json::from_str(&line).expect("json log line");
    v["addr"].as_str().expect("addr field").to_string()
}

/// Asks /readyz until its status is `want`, bounded (a probe has no event to wait for).
fn readyz_until(addr: &str, want: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = http_get(addr, "/readyz");
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status} ({body}) for {within:?}, wanted {want}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_asks_postgres_even_when_the_worker_is_idle() {
    let mut env = TestEnv::new().await;
    let w = env.start_worker(&[]);
    let addr = http_addr(&mut env, w);
    let body = readyz_until(&addr, 200, T);
    assert!(body.contains("postgres: up"), "{body}");

    // Cut this worker's database off (no job traffic at all), then bring it back.
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin_db_url())
        .await
        .expect("admin connection");
    let cut = |allow: bool| format!("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {allow}", env.name);
    sqlx::query(sqlx::AssertSqlSafe(cut(false)))
        .execute(&admin)
        .await
        .expect("disallow connections");
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&env.name)
    .execute(&admin)
    .await
    .expect("terminate backends");
    let body = readyz_until(&addr, 503, Duration::from_secs(20));
    assert!(body.contains("postgres: down"), "{body}");

    sqlx::query(sqlx::AssertSqlSafe(cut(true)))
        .execute(&admin)
        .await
        .expect("allow connections");
    let body = readyz_until(&addr, 200, Duration::from_secs(30));
    assert!(body.contains("postgres: up"), "{body}");
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_job_stays_in_the_producers_trace() {
    let mut env = TestEnv::new().await;
    let w = env.start_worker(&[]);
    let trace_id = "5cf92f3577b34da6a3ce929d0e0e4737";
    let mut cmd = env.command(&[
        "publish",
        "--pipeline",
        "noop",
        "--key",
        "traced-retry",
        "--param",
        "fail_attempts=1",
    ]);
    cmd.env("TRACEPARENT", format!("00-{trace_id}-00f067aa0ba902b7-01"));
    let out = run_bounded(cmd, T);
    assert!(out.status.success(), "{}", stderr(&out));
    let row = env
        .wait_job("traced-retry", T, |r| {
            r.get::<String, _>("state") == "succeeded"
        })
        .await;
    assert_eq!(
        row.get::<i32, _>("attempts"),
        2,
        "the relay re-published it"
    );
    // The second attempt came from the relay's message: its log line carries the trace.
    let line = env.worker(w).wait_log("job succeeded", T);
    assert!(
        line.contains(trace_id),
        "the retried attempt left the producer's trace: {line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_input_password_is_never_shown() {
    let env = TestEnv::new().await;
    let url = "postgres://payroll_reader:s3cr3t-pw@127.0.0.1:5432/hr";
    let out = env.drover(&[
        "publish",
        "--pipeline",
        "payroll",
        "--key",
        "pg-secret",
        "--param",
        "client_id=acme",
        "--param",
        "period=2026-11",
        "--param",
        &format!("input={url}"),
        "--param",
        "input_table=employees",
    ]);
    assert!(out.status.success(), "publish: {}", stderr(&out));
    assert!(!stderr(&out).contains("s3cr3t-pw"), "{}", stderr(&out));
    for args in [
        vec!["jobs", "show", "pg-secret"],
        vec!["jobs", "show", "pg-secret", "--json"],
        vec!["jobs", "list"],
        vec!["jobs", "list", "--json"],
    ] {
        let out = env.drover(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(
            !text.contains("s3cr3t-pw"),
            "{args:?} shows the password: {text}"
        );
    }
    let shown = env.show("pg-secret");
    assert_eq!(
        shown["params"]["input"],
        "postgres://payroll_reader:***@127.0.0.1:5432/hr"
    );
    // The worker still gets the real URL to connect with.
    let stored: Value =
        sqlx::query_scalar("SELECT params FROM drover.jobs WHERE idempotency_key = 'pg-secret'")
            .fetch_one(&env.pool)
            .await
            .expect("params");
    assert_eq!(stored["input"], url);
}

/// Every checkpoint as `(batch, rows, attempt, committed_at)`.
async fn checkpoints(env: &TestEnv) -> Vec<(i32, i64, i32, String)> {
    sqlx::query(
        "SELECT batch_index, rows, attempt, committed_at::text AS at FROM drover.checkpoints \
         ORDER BY batch_index",
    )
    .fetch_all(&env.pool)
    .await
    .expect("checkpoints")
    .iter()
    .map(|r| {
        (
            r.get("batch_index"),
            r.get("rows"),
            r.get("attempt"),
            r.get("at"),
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_worker_is_redriven_from_the_ledger_and_fenced_when_it_resumes() {
    let mut env = TestEnv::new().await;
    let a = env.start_worker(&["--heartbeat-secs", "1", "--worker-id", "frozen"]);
    env.publish_noop(
        "freeze-1",
        &["--param", "batches=20", "--param", "sleep_ms=150"],
    );
    env.wait_job("freeze-1", T, |r| r.get::<i32, _>("batches_done") >= 3)
        .await;
    // Acked at claim: nothing of this job is left in the queue for a broker to redeliver.
    assert_eq!(env.jobs_ready().await, 0);
    env.worker(a).signal("-STOP");
    let frozen_at = Instant::now();

    let b = env.start_worker(&["--heartbeat-secs", "1", "--worker-id", "rescuer"]);
    let row = env
        .wait_job("freeze-1", T, |r| {
            r.get::<String, _>("state") == "running"
                && r.get::<Option<String>, _>("lease_owner").as_deref() == Some("rescuer")
        })
        .await;
    let redriven_in = frozen_at.elapsed();
    assert!(row.get::<i32, _>("attempts") == 2);
    // Two silent periods make the lease stale, the rescuer looks once a period, the relay
    // publishes within half a second: about three periods, plus the rescuer's start-up.
    assert!(
        redriven_in < Duration::from_secs(12),
        "re-driven after {redriven_in:?}; rescuer log:\n{}",
        env.worker(b).log()
    );
    env.worker(b)
        .wait_log("re-driving the job from the ledger", T);
    env.wait_job("freeze-1", T, |r| {
        r.get::<String, _>("state") == "succeeded"
    })
    .await;
    let before = checkpoints(&env).await;
    let job_before = env.show("freeze-1");

    // The frozen worker resumes mid-job: it finds its lease gone and writes nothing.
    env.worker(a).signal("-CONT");
    env.worker(a).wait_log("lease lost", T);
    assert_eq!(
        checkpoints(&env).await,
        before,
        "the fenced worker wrote a checkpoint"
    );
    let job = env.show("freeze-1");
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["rows_done"], 20, "no batch counted twice");
    assert_eq!(job["finished_at"], job_before["finished_at"]);
    assert_eq!(
        workers_and_outcomes(&job),
        [
            ("frozen".to_string(), "lost".to_string()),
            ("rescuer".to_string(), "succeeded".to_string())
        ]
    );
    assert_eq!(before.len(), 20);
    assert!(
        before.iter().filter(|c| c.2 == 1).count() >= 3,
        "the rescuer resumed after the frozen worker's checkpoints"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_leaves_no_message_behind_and_the_ledger_redrives_its_job() {
    let mut env = TestEnv::new().await;
    let a = env.start_worker(&["--heartbeat-secs", "1", "--worker-id", "victim"]);
    env.publish_noop(
        "acked-1",
        &["--param", "batches=30", "--param", "sleep_ms=100"],
    );
    env.wait_job("acked-1", T, |r| r.get::<i32, _>("batches_done") >= 2)
        .await;
    env.worker(a).signal("-KILL");
    env.worker(a).wait_exit(Duration::from_secs(10));
    // Once the broker has dropped the dead consumer, an unacked delivery would be back in
    // the queue. The job was acked at claim: nothing comes back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ready, consumers) = env.jobs_depth().await;
        if consumers == 0 {
            assert_eq!(
                ready, 0,
                "the delivery was still unacked when its worker died"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broker kept the dead consumer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = env.start_worker(&["--heartbeat-secs", "1", "--worker-id", "heir"]);
    env.wait_job("acked-1", T, |r| r.get::<String, _>("state") == "succeeded")
        .await;
    env.worker(b)
        .wait_log("re-driving the job from the ledger", T);
    assert!(
        !env.worker(b).log().contains("taking the job over"),
        "a redelivered message, not the ledger, brought the job back"
    );
    let job = env.show("acked-1");
    assert_eq!(
        workers_and_outcomes(&job),
        [
            ("victim".to_string(), "lost".to_string()),
            ("heir".to_string(), "succeeded".to_string())
        ]
    );
    assert_eq!(job["rows_done"], 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_whose_messages_were_purged_are_published_again() {
    let mut env = TestEnv::new().await;
    let keys = ["lost-1", "lost-2", "lost-3"];
    for k in keys {
        env.publish_noop(k, &[]);
    }
    assert_eq!(env.purge_jobs().await, 3);

    // doctor reports the drift once the jobs have waited --lost-after-secs.
    let deadline = Instant::now() + T;
    let report = loop {
        let out = env.drover(&["doctor", "--lost-after-secs", "1"]);
        // The three were published one after another: wait until all have waited 1 s.
        if !out.status.success() && stdout(&out).contains("lost messages: 3 job(s)") {
            break stdout(&out);
        }
        assert!(
            Instant::now() < deadline,
            "doctor never saw the three lost messages: {}",
            stdout(&out)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(report.contains("lost messages: 3 job(s)"), "{report}");
    assert!(report.contains("no consumers"), "{report}");
    let out = env.drover(&["doctor", "--lost-after-secs", "1", "--fix"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("published 3 message(s)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(env.jobs_ready().await, 3);
    let out = env.drover(&["doctor", "--lost-after-secs", "1"]);
    assert!(out.status.success(), "after the fix: {}", stdout(&out));

    // Purged again: this time a worker's rescuer notices on its own.
    assert_eq!(env.purge_jobs().await, 3);
    let w = env.start_worker(&["--heartbeat-secs", "1", "--lost-after-secs", "2"]);
    for k in keys {
        env.wait_job(k, T, |r| r.get::<String, _>("state") == "succeeded")
            .await;
    }
    env.worker(w)
        .wait_log("had no message in the queue; published them again", T);
    for k in keys {
        assert_eq!(outcomes(&env.show(k)), ["succeeded"], "{k} ran once");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delayed_job_waits_in_the_ledger_and_starts_no_earlier_than_run_at() {
    let mut env = TestEnv::new().await;
    env.start_worker(&[]);
    env.publish_noop("later-1", &["--delay", "3s"]);
    // The worker receives the message at once, records the time and acks it.
    let row = env
        .wait_job("later-1", T, |r| {
            r.get::<Option<chrono::DateTime<chrono::Utc>>, _>("run_at")
                .is_some()
                && r.get::<Option<chrono::DateTime<chrono::Utc>>, _>("enqueued_at")
                    .is_none()
        })
        .await;
    let run_at: chrono::DateTime<chrono::Utc> = row.get("run_at");
    assert_eq!(row.get::<String, _>("state"), "queued");
    let list = env.drover(&["jobs", "list"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let shown = run_at.format("%Y-%m-%d %H:%M:%S").to_string();
    assert!(
        stdout(&list)
            .lines()
            .any(|l| l.contains("later-1") && l.contains(&shown)),
        "jobs list does not show when it runs: {}",
        stdout(&list)
    );
    let row = env
        .wait_job("later-1", T, |r| r.get::<String, _>("state") == "succeeded")
        .await;
    let started: chrono::DateTime<chrono::Utc> = row.get("started_at");
    assert!(
        started >= run_at,
        "started {started} before run_at {run_at}"
    );
    assert_eq!(outcomes(&env.show("later-1")), ["succeeded"]);

    // A producer in another language sets run_at in the message itself.
    let at = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let body =
        format!(r#"{{"v":1,"idempotency_key":"later-2","pipeline":"noop","run_at":"{at}"}}"#);
    env.publish_raw(body.as_bytes(), None).await;
    let row = env
        .wait_job("later-2", T, |r| r.get::<String, _>("state") == "succeeded")
        .await;
    let started: chrono::DateTime<chrono::Utc> = row.get("started_at");
    let at: chrono::DateTime<chrono::Utc> = at.parse().expect("rfc3339");
    assert!(started >= at, "started {started} before run_at {at}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_over_its_timeout_fails_transiently_and_says_so() {
    let mut env = TestEnv::new().await;
    env.start_worker(&[]);
    env.publish_noop(
        "slow-1",
        &[
            "--param",
            "batches=20",
            "--param",
            "sleep_ms=300",
            "--timeout-secs",
            "1",
            "--max-attempts",
            "2",
        ],
    );
    let row = env
        .wait_job("slow-1", T, |r| r.get::<String, _>("state") == "dead")
        .await;
    let error: String = row.get("last_error");
    assert!(error.contains("timeout_secs = 1"), "{error}");
    assert_eq!(
        row.get::<Option<String>, _>("error_kind").as_deref(),
        Some("transient")
    );
    assert_eq!(row.get::<Option<i32>, _>("timeout_secs"), Some(1));
    let job = env.show("slow-1");
    assert_eq!(
        outcomes(&job),
        ["failed", "dead"],
        "retried once, like any transient error"
    );
    assert!(job["batches_done"].as_i64().unwrap_or(99) < 20);
}

/// Makes a finished job look `days` old.
async fn age(env: &TestEnv, key: &str, days: i32) {
    sqlx::query(
        "UPDATE drover.jobs SET finished_at = now() - make_interval(days => $2) \
         WHERE idempotency_key = $1",
    )
    .bind(key)
    .bind(days)
    .execute(&env.pool)
    .await
    .expect("age the job");
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_deletes_old_finished_jobs_and_outputs_only_when_asked() {
    let mut env = TestEnv::new().await;
    let input = generate(&env, 2_000, "acme.parquet");
    let w = env.start_worker(&["--output-root", "out"]);
    let input_param = format!("input={}", input.display());
    for key in ["old-pay", "pay-b"] {
        let out = env.drover(&[
            "publish",
            "--pipeline",
            "payroll",
            "--key",
            key,
            "--batch-size",
            "1000",
            "--param",
            "client_id=acme",
            "--param",
            "period=2026-11",
            "--param",
            &input_param,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    env.publish_noop("old-noop", &[]);
    env.publish_noop("new-noop", &[]);
    env.publish_noop(
        "old-dead",
        &[
            "--param",
            "fail_attempts=1",
            "--param",
            "fail_kind=permanent",
        ],
    );
    for key in ["old-pay", "pay-b", "old-noop", "new-noop"] {
        env.wait_job(key, T, |r| r.get::<String, _>("state") == "succeeded")
            .await;
    }
    env.wait_job("old-dead", T, |r| r.get::<String, _>("state") == "dead")
        .await;
    env.worker(w).kill();
    for key in ["old-pay", "old-noop", "old-dead"] {
        age(&env, key, 40).await;
    }
    age(&env, "pay-b", 20).await;
    let out_dir = env.path("out/payroll");
    let parts = |key: &str| {
        let dir = out_dir.clone();
        let mut n = 0;
        for e in walk(&dir) {
            if e.to_string_lossy().contains(&key.replace(':', "_"))
                && e.extension().is_some_and(|x| x == "parquet")
            {
                n += 1;
            }
        }
        n
    };
    let before = parts("old-pay");
    assert!(before >= 2, "payroll wrote its parts");

    let out = env.drover(&["prune", "--older-than", "30d", "--dry-run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("2 job(s)"), "{}", stdout(&out));
    assert_eq!(
        env.state("old-noop").await.as_deref(),
        Some("succeeded"),
        "a dry run deletes nothing"
    );

    let out = env.drover(&["prune", "--older-than", "30d", "--state", "running"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("\"running\""), "{}", stderr(&out));

    let out = env.drover(&["prune", "--older-than", "30d", "--state", "succeeded"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("pruned 2 job(s)"), "{}", stdout(&out));
    for key in ["old-pay", "old-noop"] {
        assert_eq!(env.state(key).await, None, "{key} pruned");
    }
    assert_eq!(env.state("new-noop").await.as_deref(), Some("succeeded"));
    assert_eq!(
        env.state("old-dead").await.as_deref(),
        Some("dead"),
        "dead kept unless named"
    );
    assert_eq!(parts("old-pay"), before, "outputs kept unless asked");
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM drover.checkpoints c \
        LEFT JOIN drover.jobs j ON j.id = c.job_id WHERE j.id IS NULL",
    )
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(orphans, 0, "checkpoints go with their job");

    // A worker's [retention] applies the same, here with the outputs.
    let b_parts = parts("pay-b");
    assert!(b_parts >= 2);
    age(&env, "new-noop", 40).await;
    age(&env, "pay-b", 40).await;
    env.write_config("[retention]\nolder_than = \"30d\"\nstates = [\"succeeded\", \"dead\"]\ndelete_outputs = true\nevery = \"1s\"\n");
    let w = env.start_worker(&["--output-root", "out"]);
    env.worker(w).wait_log("retention: pruned finished jobs", T);
    assert_eq!(env.state("new-noop").await, None);
    assert_eq!(env.state("old-dead").await, None);
    assert_eq!(env.state("pay-b").await, None);
    assert_eq!(parts("pay-b"), 0, "delete_outputs removed its parts");
    assert_eq!(
        parts("old-pay"),
        before,
        "pruned earlier without its outputs: kept"
    );
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A worker that received a delayed job early defers it (run_at kept in the ledger,
/// enqueued_at cleared so the relay publishes it when due). When the producer's confirm is
/// recorded after that deferral (a fast worker, a slow confirm), `drover.mark_published` must
/// not mark the job again: that race once left a delayed job waiting a minute for the
/// lost-message sweep. A due job is still marked.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_confirm_does_not_unschedule_a_deferred_job() {
    let env = TestEnv::new().await;
    env.publish_noop("deferred", &["--delay", "1h"]);
    env.publish_noop("due", &[]);
    // What a worker's deferral does, then what a late confirm does, to both jobs.
    sqlx::query(
        "UPDATE drover.jobs SET enqueued_at = NULL, \
         run_at = CASE idempotency_key WHEN 'deferred' THEN now() + interval '1 hour' END",
    )
    .execute(&env.pool)
    .await
    .expect("defer");
    sqlx::query("SELECT drover.mark_published(array_agg(id)) FROM drover.jobs")
        .execute(&env.pool)
        .await
        .expect("mark_published");
    let marked: Vec<(String, bool)> = sqlx::query_as(
        "SELECT idempotency_key, enqueued_at IS NOT NULL FROM drover.jobs ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .expect("rows");
    assert_eq!(
        marked,
        [("deferred".to_string(), false), ("due".to_string(), true)],
        "a late confirm must leave the deferred job to the relay and mark the due one"
    );
}
