//! The `exec` pipeline end to end: Python children (tests/exec/*.py) driven by a real
//! worker, against `drover run`, through retries, a kill -9 takeover and a cancel.

use crate::reliability::FAST_RETRY;
use crate::support::*;
use serde_json::Value;
use sqlx::Row;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

/// The interpreter with pyarrow that `make test` exports (scripts/ensure-python.sh).
fn python() -> String {
    std::env::var("DROVER_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "DROVER_TEST_PYTHON is not set: the exec tests need a Python with pyarrow \
             (make test sets it; by hand: export DROVER_TEST_PYTHON=$(scripts/ensure-python.sh))"
        )
    })
}

/// `command=[python, tests/exec/<script>]` as a `--param`.
fn command(script: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/exec")
        .join(script);
    let argv = serde_json::json!([python(), path]);
    format!("command={argv}")
}

/// Publishes an exec job over `input` with `extra` publish arguments; must succeed.
fn publish_exec(env: &TestEnv, key: &str, script: &str, input: &Path, extra: &[&str]) {
    let cmd = command(script);
    let input = format!("input={}", input.display());
    let mut args = vec![
        "publish",
        "--pipeline",
        "exec",
        "--key",
        key,
        "--param",
        &cmd,
        "--param",
        &input,
    ];
    args.extend_from_slice(extra);
    let out = env.drover(&args);
    assert!(out.status.success(), "publish {key}: {}", stderr(&out));
}

/// The `_manifest.json` somewhere under `dir` (the output directory of one job).
fn manifest_under(dir: &Path) -> Value {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "_manifest.json") {
                let text = std::fs::read_to_string(&p).expect("manifest");
                return serde_json::from_str(&text).expect("manifest is JSON");
            }
        }
    }
    panic!("no _manifest.json under {}", dir.display());
}

/// `(index, sha256)` of every part in a manifest, in index order.
fn parts(manifest: &Value) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = manifest["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .map(|p| {
            (
                p["index"].as_u64().unwrap_or(u64::MAX),
                p["sha256"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The directory holding a job's parts, from its checkpoints in the ledger.
async fn output_dir(env: &TestEnv) -> PathBuf {
    let output: String = sqlx::query_scalar(
        "SELECT output FROM drover.checkpoints WHERE output IS NOT NULL LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .expect("a checkpoint with output");
    PathBuf::from(output)
        .parent()
        .expect("part in a directory")
        .to_path_buf()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits (bounded) for the pid a child wrote to `path` when it started.
fn pid_in(path: &Path) -> u32 {
    let deadline = Instant::now() + T;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Ok(pid) = s.trim().parse()
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "no pid in {}", path.display());
        // A file appearing has no event to await in std.
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exec_job_through_a_worker_equals_drover_run() {
    let mut env = TestEnv::new().await;
    let input = generate(&env, 12_000, "acme.parquet");
    let w = env.start_worker(&["--output-root", "out"]);
    publish_exec(
        &env,
        "exec:acme",
        "double.py",
        &input,
        &["--batch-size", "5000"],
    );
    let out = env.drover(&["jobs", "wait", "exec:acme", "--timeout", "120"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let job = env.show("exec:acme");
    assert_eq!(job["batches_done"], 3);
    assert_eq!(job["rows_done"], 12_000);
    assert_eq!(
        job["result"],
        serde_json::json!({"rows": 12_000, "rows_out": 12_000})
    );
    // Every stderr line of the child is logged with the job's key.
    let line = env
        .worker(w)
        .wait_log("batch 2: 2000 rows", Duration::from_secs(10));
    assert!(line.contains("exec:acme"), "{line}");

    let cmd = command("double.py");
    let input_param = format!("input={}", input.display());
    let out = env.drover(&[
        "run",
        "exec",
        "--param",
        &cmd,
        "--param",
        &input_param,
        "--batch-size",
        "5000",
        "--output",
        "local",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let local: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(local, job["result"]);
    // Byte for byte the same parts.
    let worker_parts = parts(&manifest_under(&output_dir(&env).await));
    let local_parts = parts(&manifest_under(&env.path("local")));
    assert_eq!(worker_parts.len(), 3);
    assert_eq!(worker_parts, local_parts);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transient_exit_is_retried_and_then_succeeds() {
    let mut env = TestEnv::new().await;
    env.write_config(FAST_RETRY);
    let input = generate(&env, 3_000, "acme.parquet");
    env.start_worker(&["--output-root", "out"]);
    publish_exec(
        &env,
        "exec:retry",
        "fail_transient.py",
        &input,
        &["--batch-size", "1000", "--param", r#"env={"FAIL_AT":"1"}"#],
    );
    let row = env
        .wait_job("exec:retry", T, |r| {
            r.get::<String, _>("state") == "succeeded"
        })
        .await;
    assert_eq!(row.get::<i32, _>("attempts"), 2);
    let job = env.show("exec:retry");
    assert_eq!(outcomes(&job), ["failed", "succeeded"]);
    let first = &job["attempt_history"][0];
    assert!(
        first["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("rate service unavailable, try again later (exec: batch 1:"),
        "{first}"
    );
    assert_eq!(job["result"]["rows_out"], 3_000);
    // Batch 0 was done by the first attempt and not redone by the second.
    let redone: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM drover.checkpoints WHERE attempt = 2 AND batch_index = 0",
    )
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(redone, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_s_exec_job_resumes_on_another_without_duplicate_rows() {
    let mut env = TestEnv::new().await;
    let input = generate(&env, 10_000, "acme.parquet");
    let a = env.start_worker(&[
        "--heartbeat-secs",
        "1",
        "--worker-id",
        "victim",
        "--output-root",
        "out",
    ]);
    publish_exec(
        &env,
        "exec:kill",
        "double.py",
        &input,
        &[
            "--batch-size",
            "500",
            "--param",
            r#"env={"DELAY_MS":"150"}"#,
        ],
    );
    env.wait_job("exec:kill", T, |r| r.get::<i32, _>("batches_done") >= 3)
        .await;
    env.worker(a).signal("-KILL");
    env.worker(a).wait_exit(Duration::from_secs(10));
    env.start_worker(&[
        "--heartbeat-secs",
        "1",
        "--worker-id",
        "rescuer",
        "--output-root",
        "out",
    ]);
    env.wait_job("exec:kill", T, |r| {
        r.get::<String, _>("state") == "succeeded"
    })
    .await;
    let job = env.show("exec:kill");
    let workers = workers_and_outcomes(&job);
    assert_eq!(
        workers,
        [
            ("victim".to_string(), "lost".to_string()),
            ("rescuer".to_string(), "succeeded".to_string())
        ]
    );
    let first_attempt: i64 =
        sqlx::query_scalar("SELECT count(*) FROM drover.checkpoints WHERE attempt = 1")
            .fetch_one(&env.pool)
            .await
            .expect("count");
    assert!(
        first_attempt >= 3,
        "the rescuer resumed after the victim's checkpoints"
    );
    assert_eq!(job["rows_done"], 10_000, "no batch counted twice");
    assert_eq!(job["result"]["rows_out"], 10_000);
    // One part per batch on disk, and the manifest's rows add up to the input.
    let dir = output_dir(&env).await;
    let manifest = manifest_under(&dir);
    assert_eq!(parts(&manifest).len(), 20);
    let part_files = std::fs::read_dir(&dir)
        .expect("read_dir")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "parquet"))
        .count();
    assert_eq!(part_files, 20, "no stray or duplicate part files");
    let rows: u64 = manifest["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .map(|p| p["rows"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(rows, 10_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_an_exec_job_stops_its_child() {
    let mut env = TestEnv::new().await;
    let input = generate(&env, 10_000, "acme.parquet");
    env.start_worker(&["--heartbeat-secs", "1", "--output-root", "out"]);
    let pid_file = env.path("child.pid");
    let child_env = serde_json::json!({"DELAY_MS": "200", "PID_FILE": pid_file});
    publish_exec(
        &env,
        "exec:cancel",
        "double.py",
        &input,
        &[
            "--batch-size",
            "200",
            "--param",
            &format!("env={child_env}"),
        ],
    );
    env.wait_job("exec:cancel", T, |r| r.get::<i32, _>("batches_done") >= 2)
        .await;
    let pid = pid_in(&pid_file);
    assert!(alive(pid), "the child runs while the job does");
    let out = env.drover(&["jobs", "cancel", "exec:cancel"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let row = env
        .wait_job("exec:cancel", T, |r| {
            r.get::<String, _>("state") == "cancelled"
        })
        .await;
    assert!(row.get::<i32, _>("batches_done") < 50, "stopped early");
    // stdin closed and SIGTERM at the batch boundary; SIGKILL would follow after 5 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "child {pid} survived the cancel");
        // A foreign process's exit has no event to await in std.
        std::thread::sleep(Duration::from_millis(50));
    }
}
