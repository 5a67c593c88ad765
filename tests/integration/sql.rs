//! The built-in `sql` pipeline end to end: through a worker it writes what `drover run`
//! writes; `drover publish` refuses a query that cannot run; a worker killed mid-job leaves
//! a second worker to finish it without a duplicated row.

use crate::support::*;
use serde_json::Value;
use sqlx::Row;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

/// Per batch: the employees' ids and bonuses; at the end: one row of counts over every part.
const QUERY: &str = "SELECT employee_id, state, bonus_cents FROM batch WHERE bonus_cents >= 0";
const COMBINE: &str = "SELECT state, COUNT(*) AS n, SUM(bonus_cents) AS bonus FROM parts GROUP BY state ORDER BY state";

fn params(input: &Path) -> Vec<String> {
    vec![
        format!("input={}", input.display()),
        format!("query={QUERY}"),
        format!("combine={COMBINE}"),
        "sum=[\"employee_id\", \"bonus_cents\"]".to_string(),
    ]
}

fn with_params<'a>(mut args: Vec<&'a str>, params: &'a [String]) -> Vec<&'a str> {
    for p in params {
        args.push("--param");
        args.push(p);
    }
    args
}

fn manifest(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("_manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest is JSON")
}

/// (file, rows, sha256) of every part, in batch order.
fn parts(m: &Value) -> Vec<(String, u64, String)> {
    m["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .map(|p| {
            (
                p["file"].as_str().unwrap_or("").to_string(),
                p["rows"].as_u64().unwrap_or(0),
                p["sha256"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// `drover run` of the same job into `local/`, returning its output directory.
fn run_locally(env: &TestEnv, key: &str, batch: &str, params: &[String]) -> std::path::PathBuf {
    let local = env.path("local");
    let local_s = local.display().to_string();
    let args = with_params(
        vec![
            "run",
            "sql",
            "--key",
            key,
            "--batch-size",
            batch,
            "--output",
            &local_s,
            "--json",
        ],
        params,
    );
    let out = env.drover(&args);
    assert!(out.status.success(), "drover run: {}", stderr(&out));
    local.join("sql").join(key)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_writes_what_drover_run_writes() {
    let mut env = TestEnv::new().await;
    let input = generate(&env, 5000, "in.parquet");
    let p = params(&input);
    env.start_worker(&[]);
    let args = with_params(
        vec![
            "publish",
            "--pipeline",
            "sql",
            "--key",
            "sql-1",
            "--batch-size",
            "700",
        ],
        &p,
    );
    let out = env.drover(&args);
    assert!(out.status.success(), "publish: {}", stderr(&out));
    env.wait_job("sql-1", T, |r| r.get::<String, _>("state") == "succeeded")
        .await;

    let worker_dir = env.path("drover-output/sql/sql-1");
    let local_dir = run_locally(&env, "sql-1", "700", &p);
    let (w, l) = (manifest(&worker_dir), manifest(&local_dir));
    assert_eq!(parts(&w).len(), 8, "5000 rows in batches of 700");
    assert_eq!(parts(&w), parts(&l), "same parts, same checksums");
    assert_eq!(w["summary"], l["summary"]);
    assert_eq!(w["summary"]["rows"], 5000);
    assert_eq!(w["summary"]["sum"]["employee_id"], 5000 * 5001 / 2);
    assert!(worker_dir.join("combined.parquet").is_file());
    assert_eq!(
        std::fs::read(worker_dir.join("combined.parquet")).expect("combined"),
        std::fs::read(local_dir.join("combined.parquet")).expect("combined"),
    );
    let job = env.show("sql-1");
    assert_eq!(job["result"], w["summary"], "the ledger holds the result");
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_refuses_a_bad_query_and_records_nothing() {
    let env = TestEnv::new().await;
    let input = generate(&env, 10, "in.parquet");
    let cases = [
        (
            "SELEKT employee_id FROM batch".to_string(),
            "sql: param \"query\": sql parser error: Expected: an SQL statement, found: SELEKT",
        ),
        ("SELECT salary FROM batch".to_string(), "salary"),
    ];
    for (i, (query, want)) in cases.iter().enumerate() {
        let key = format!("bad-{i}");
        let p = [
            format!("input={}", input.display()),
            format!("query={query}"),
        ];
        let args = with_params(vec!["publish", "--pipeline", "sql", "--key", &key], &p);
        let out = env.drover(&args);
        assert!(!out.status.success(), "published {query}");
        let err = stderr(&out);
        assert!(err.contains("sql: param \"query\""), "{err}");
        assert!(err.contains(want), "{err}\n  wanted {want}");
    }
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM drover.jobs")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(jobs, 0, "nothing reached the ledger");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_sql_job_and_another_worker_finishes_without_duplicates() {
    let mut env = TestEnv::new().await;
    let rows: u64 = 300_000;
    let input = generate(&env, rows, "in.parquet");
    let p = params(&input);
    let a = env.start_worker(&["--heartbeat-secs", "1", "--worker-id", "victim"]);
    let args = with_params(
        vec![
            "publish",
            "--pipeline",
            "sql",
            "--key",
            "sql-kill",
            "--batch-size",
            "200",
        ],
        &p,
    );
    let out = env.drover(&args);
    assert!(out.status.success(), "publish: {}", stderr(&out));
    let row = env
        .wait_job("sql-kill", T, |r| r.get::<i32, _>("batches_done") >= 3)
        .await;
    assert_eq!(row.get::<String, _>("state"), "running", "killed mid-job");
    env.worker(a).signal("-KILL");
    env.worker(a).wait_exit(Duration::from_secs(10));
    env.start_worker(&["--heartbeat-secs", "1", "--worker-id", "rescuer"]);
    env.wait_job("sql-kill", T, |r| {
        r.get::<String, _>("state") == "succeeded"
    })
    .await;
    let job = env.show("sql-kill");
    assert_eq!(outcomes(&job), ["lost", "succeeded"]);
    // Every input row once: the ids' total is 1 + 2 + ... + rows, and the parts hold rows
    // rows, one part per batch.
    let result = &job["result"];
    assert_eq!(result["rows_out"], rows);
    assert_eq!(result["sum"]["employee_id"], rows * (rows + 1) / 2);
    let dir = env.path("drover-output/sql/sql-kill");
    let m = manifest(&dir);
    let ps = parts(&m);
    assert_eq!(ps.len() as u64, rows.div_ceil(200));
    assert_eq!(ps.iter().map(|p| p.1).sum::<u64>(), rows);
    let on_disk = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("part-"))
        .count();
    assert_eq!(on_disk, ps.len(), "no stray parts");
    // The resumed job writes what an uninterrupted run writes.
    let local = run_locally(&env, "sql-kill", "200", &p);
    assert_eq!(parts(&manifest(&local)), ps);
    assert_eq!(manifest(&local)["summary"], m["summary"]);
}
