//! The core round trip: publish, consume, ledger, CLI.

use crate::support::*;
use serde_json::Value;
use sqlx::Row;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread")]
async fn publish_run_and_inspect_a_job() {
    let mut env = TestEnv::new().await;
    env.start_worker(&["--prefetch", "4"]);
    let out = env.drover(&[
        "publish",
        "--pipeline",
        "noop",
        "--key",
        "rt-1",
        "--param",
        "batches=3",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("rt-1: published"), "{}", stdout(&out));

    let out = env.drover(&["jobs", "wait", "rt-1", "--timeout", "60"]);
    assert!(
        out.status.success(),
        "wait: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("all 1 job(s) succeeded"));

    let job = env.show("rt-1");
    for field in [
        "idempotency_key",
        "pipeline",
        "params",
        "state",
        "attempts",
        "max_attempts",
        "batches_done",
        "batches_total",
        "rows_done",
        "result",
        "last_error",
        "error_kind",
        "created_at",
        "started_at",
        "finished_at",
        "attempt_history",
    ] {
        assert!(job.get(field).is_some(), "show --json lacks {field}: {job}");
    }
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["batches_done"], 3);
    assert_eq!(job["batches_total"], 3);
    assert_eq!(job["params"]["batches"], 3);
    let history = job["attempt_history"].as_array().expect("array");
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["outcome"], "succeeded");
    for t in ["created_at", "started_at", "finished_at"] {
        let s = job[t].as_str().expect("time string");
        chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{t}={s}: {e}"));
    }
    chrono::DateTime::parse_from_rfc3339(history[0]["started_at"].as_str().expect("str"))
        .expect("rfc3339");

    let out = env.drover(&["jobs", "list", "--json", "--state", "succeeded"]);
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).expect("list --json");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["idempotency_key"], "rt-1");
    let table = stdout(&env.drover(&["jobs", "list"]));
    assert!(
        table.contains("KEY") && table.contains("rt-1") && table.contains("succeeded"),
        "{table}"
    );
    let text = stdout(&env.drover(&["jobs", "show", "rt-1"]));
    assert!(
        text.contains("attempt history") && text.contains("3/3 batches"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_publish_makes_one_row_and_one_run() {
    let mut env = TestEnv::new().await;
    let first = env.drover(&["publish", "--pipeline", "noop", "--key", "dup-1"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let second = env.drover(&["publish", "--pipeline", "noop", "--key", "dup-1"]);
    assert!(second.status.success());
    assert!(
        stdout(&second).contains("already exists (queued); nothing published"),
        "{}",
        stdout(&second)
    );
    // A second copy of the message anyway (at-least-once delivery from some producer).
    env.publish_raw(
        br#"{"v":1,"idempotency_key":"dup-1","pipeline":"noop"}"#,
        None,
    )
    .await;
    env.start_worker(&[]);
    env.wait_job("dup-1", T, |r| r.get::<String, _>("state") == "succeeded")
        .await;
    let w = env.worker(0);
    w.wait_log("acking duplicate delivery", T);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM drover.jobs")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(rows, 1);
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM drover.attempts")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(attempts, 1, "the job ran exactly once");
    let after = env.drover(&["publish", "--pipeline", "noop", "--key", "dup-1"]);
    assert!(
        stdout(&after).contains("already exists (succeeded)"),
        "{}",
        stdout(&after)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_external_producer_publishing_to_the_queue_is_served() {
    let mut env = TestEnv::new().await;
    env.start_worker(&[]);
    env.publish_raw(
        br#"{"v":1,"idempotency_key":"ext-1","pipeline":"noop","params":{"batches":2},"max_attempts":3}"#,
        Some("external-id-1"),
    )
    .await;
    let row = env
        .wait_job("ext-1", T, |r| r.get::<String, _>("state") == "succeeded")
        .await;
    assert_eq!(row.get::<i32, _>("max_attempts"), 3);
    assert_eq!(row.get::<i32, _>("batches_done"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_the_queue_and_each_job_runs_once() {
    let mut env = TestEnv::new().await;
    env.start_worker(&["--prefetch", "2", "--worker-id", "w-one"]);
    env.start_worker(&["--prefetch", "2", "--worker-id", "w-two"]);
    let mut lines = String::new();
    for i in 0..30 {
        lines.push_str(&format!(
            "{{\"v\":1,\"idempotency_key\":\"share-{i}\",\"pipeline\":\"noop\",\"params\":{{\"sleep_ms\":50}}}}\n"
        ));
    }
    std::fs::write(env.path("jobs.jsonl"), lines).expect("write");
    let out = env.drover(&["publish", "--file", "jobs.jsonl"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("published 30, already present 0"),
        "{}",
        stdout(&out)
    );
    let keys: Vec<String> = (0..30).map(|i| format!("share-{i}")).collect();
    let mut args = vec!["jobs", "wait", "--timeout", "90"];
    args.extend(keys.iter().map(String::as_str));
    let out = env.drover(&args);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let per_job: Vec<i64> =
        sqlx::query_scalar("SELECT count(*) FROM drover.attempts GROUP BY job_id")
            .fetch_all(&env.pool)
            .await
            .expect("attempts");
    assert_eq!(per_job.len(), 30);
    assert!(
        per_job.iter().all(|n| *n == 1),
        "every job ran exactly once: {per_job:?}"
    );
    let workers: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT worker FROM drover.attempts ORDER BY 1")
            .fetch_all(&env.pool)
            .await
            .expect("workers");
    assert_eq!(
        workers,
        vec!["w-one".to_string(), "w-two".to_string()],
        "both workers took work"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_reports_failures_and_timeouts_by_exit_status() {
    let mut env = TestEnv::new().await;
    env.start_worker(&[]);
    env.publish_noop(
        "perm-1",
        &[
            "--param",
            "fail_attempts=1",
            "--param",
            "fail_kind=permanent",
        ],
    );
    let out = env.drover(&["jobs", "wait", "perm-1", "--timeout", "60"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("perm-1: dead"), "{}", stdout(&out));
    let job = env.show("perm-1");
    assert_eq!(job["error_kind"], "permanent");
    assert_eq!(job["attempts"], 1, "permanent errors are never retried");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("injected"),
        "{job}"
    );
    let dead = env.dead_letters().await;
    assert_eq!(
        dead.len(),
        1,
        "dead job copied to the dead-letter queue: {dead:?}"
    );

    let out = env.drover(&["jobs", "wait", "never-published", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("timed out") && stderr(&out).contains("never-published"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn payroll_runs_through_the_worker() {
    let mut env = TestEnv::new().await;
    let input = generate(&env, 12_000, "acme.parquet");
    env.start_worker(&["--output-root", "out"]);
    let out = env.drover(&[
        "publish",
        "--pipeline",
        "payroll",
        "--key",
        "acme:2026-11",
        "--batch-size",
        "5000",
        "--param",
        "client_id=acme",
        "--param",
        "period=2026-11",
        "--param",
        &format!("input={}", input.display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.drover(&["jobs", "wait", "acme:2026-11", "--timeout", "120"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let job = env.show("acme:2026-11");
    assert_eq!(job["rows_done"], 12_000);
    assert_eq!(job["batches_done"], 3);
    assert_eq!(job["result"]["rows"], 12_000);
    assert!(
        job["result"]["total_net"].as_i64().unwrap_or(0) > 0,
        "{job}"
    );

    // Same input through `drover run`: the same summary, to the cent.
    let out = env.drover(&[
        "run",
        "payroll",
        "--param",
        "client_id=acme",
        "--param",
        "period=2026-11",
        "--param",
        &format!("input={}", input.display()),
        "--batch-size",
        "5000",
        "--output",
        "local",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let local: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(local, job["result"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_is_idempotent_and_safe_to_run_concurrently() {
    // A database that does not exist yet, migrated by four replicas at once.
    let env = TestEnv::new().await;
    let fresh = format!("{}_m", env.name);
    let url = env.db_url.replace(&env.name, &fresh);
    let children: Vec<_> = (0..4)
        .map(|_| {
            let mut c = env.command(&["migrate"]);
            c.env("DATABASE_URL", &url);
            std::thread::spawn(move || run_bounded(c, Duration::from_secs(120)))
        })
        .collect();
    for c in children {
        let out = c.join().expect("thread");
        assert!(out.status.success(), "concurrent migrate: {}", stderr(&out));
    }
    let mut again = env.command(&["migrate"]);
    again.env("DATABASE_URL", &url);
    let out = run_bounded(again, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .expect("migrations table");
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations"))
        .expect("migrations dir")
        .count() as i64;
    assert_eq!(applied, migrations, "each migration applied once");
    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {fresh} WITH (FORCE)"
    )))
    .execute(&env.pool)
    .await
    .expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn payroll_reads_a_clients_rows_from_a_postgres_table_by_keyset_pages() {
    let env = TestEnv::new().await;
    let csv = generate(&env, 12_345, "acme.csv");
    // The same rows in a table, plus another client's rows that must not be read.
    let cols = "employee_id bigint primary key, client_id text, period text, pay_type text, \
        annual_salary_cents bigint, hourly_rate_cents bigint, regular_hours_x100 bigint, \
        overtime_hours_x100 bigint, bonus_cents bigint, retirement_bp bigint, benefit_plan text, \
        state text, filing_status text, ytd_gross_cents bigint, ytd_retirement_cents bigint";
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE payroll_input ({cols})"
    )))
    .execute(&env.pool)
    .await
    .expect("create");
    let status = std::process::Command::new("psql")
        .args([
            &env.db_url,
            "-qc",
            &format!("\\copy payroll_input FROM '{}' CSV HEADER", csv.display()),
        ])
        .status()
        .expect("psql");
    assert!(status.success());
    sqlx::query(
        "INSERT INTO payroll_input SELECT employee_id + 1000000, 'globex', period, pay_type, \
         annual_salary_cents, hourly_rate_cents, regular_hours_x100, overtime_hours_x100, \
         bonus_cents, retirement_bp, benefit_plan, state, filing_status, ytd_gross_cents, \
         ytd_retirement_cents FROM payroll_input",
    )
    .execute(&env.pool)
    .await
    .expect("other client");

    let run = |input: &str, extra: &[&str]| -> Value {
        let mut args = vec![
            "run",
            "payroll",
            "--param",
            "client_id=acme",
            "--param",
            "period=2026-11",
            "--batch-size",
            "5000",
            "--output",
            "out",
            "--json",
        ];
        let input_param = format!("input={input}");
        args.extend(["--param", input_param.as_str()]);
        args.extend_from_slice(extra);
        let out = env.drover(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let from_csv = run(csv.to_str().expect("utf8"), &["--key", "from-csv"]);
    let from_pg = run(
        &env.db_url,
        &["--param", "input_table=payroll_input", "--key", "from-pg"],
    );
    assert_eq!(from_pg["rows"], 12_345, "only acme's rows: {from_pg}");
    assert_eq!(from_pg, from_csv, "same rows, same totals to the cent");

    let bad = env.drover(&[
        "run",
        "payroll",
        "--param",
        "client_id=acme",
        "--param",
        "period=2026-11",
        "--param",
        &format!("input={}", env.db_url),
        "--param",
        "input_table=no_such_table",
    ]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("no_such_table"), "{}", stderr(&bad));
}

/// One configuration for every command: with a non-default `delivery_limit` in the config
/// file, `drover publish` declares the queue exactly as the worker does (RabbitMQ refuses a
/// redeclaration with other arguments, which broke publishing before).
#[tokio::test(flavor = "multi_thread")]
async fn publish_and_worker_agree_on_a_configured_delivery_limit() {
    let mut env = TestEnv::new().await;
    env.write_config("[worker]\ndelivery_limit = 7\n");
    env.start_worker(&[]);
    env.publish_noop("limit-1", &[]);
    env.wait_job("limit-1", T, |r| r.get::<String, _>("state") == "succeeded")
        .await;
    // Publishing again (a fresh key) redeclares the same queue without a conflict.
    env.publish_noop("limit-2", &[]);
    env.wait_job("limit-2", T, |r| r.get::<String, _>("state") == "succeeded")
        .await;
}
