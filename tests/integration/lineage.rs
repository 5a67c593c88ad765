//! Lineage and end-to-end integrity: a replaced input or a changed pipeline version is never
//! resumed into one output; `--from-scratch` starts over; `drover lineage` locates a row's
//! part; `drover verify` re-hashes parts and names the batch that disagrees.

use crate::support::*;
use serde_json::Value;
use sqlx::Row;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

/// Publishes a payroll job over `input` in batches of `batch` rows.
fn publish_payroll(env: &TestEnv, key: &str, input: &Path, batch: u32) {
    let out = env.drover(&[
        "publish",
        "--pipeline",
        "payroll",
        "--key",
        key,
        "--batch-size",
        &batch.to_string(),
        "--param",
        "client_id=acme",
        "--param",
        "period=2026-11",
        "--param",
        &format!("input={}", input.display()),
    ]);
    assert!(out.status.success(), "publish: {}", stderr(&out));
}

/// The payroll result of `input` computed by `drover run` (no ledger, no worker).
fn run_locally(env: &TestEnv, input: &Path, batch: u32) -> Value {
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
        &batch.to_string(),
        "--output",
        "local",
        "--json",
    ]);
    assert!(out.status.success(), "run: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("run --json")
}

/// Starts a worker, lets `key` checkpoint a few batches, and kills the worker with SIGKILL.
async fn kill_mid_job(env: &mut TestEnv, key: &str) -> i32 {
    let w = env.start_worker(&[
        "--heartbeat-secs",
        "1",
        "--worker-id",
        "victim",
        "--output-root",
        "out",
    ]);
    let row = env
        .wait_job(key, T, |r| r.get::<i32, _>("batches_done") >= 3)
        .await;
    env.worker(w).signal("-KILL");
    env.worker(w).wait_exit(Duration::from_secs(10));
    let done: i32 = row.get("batches_done");
    let total: Option<i32> = row.get("batches_total");
    assert!(
        total.is_some_and(|t| done < t),
        "the job was killed mid-way ({done} of {total:?} batches)"
    );
    done
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_input_ends_the_job_dead_and_from_scratch_gives_the_new_totals() {
    let mut env = TestEnv::new().await;
    env.write_config(crate::reliability::FAST_RETRY);
    let input = generate_seeded(&env, 100_000, "in.parquet", 1);
    let replacement = generate_seeded(&env, 100_000, "other.parquet", 2);
    publish_payroll(&env, "lin-replace", &input, 100);
    kill_mid_job(&mut env, "lin-replace").await;
    let before = env.show("lin-replace");
    let old_sha = before["lineage"]["inputs"][0]["sha256"]
        .as_str()
        .expect("the first attempt recorded the input's fingerprint")
        .to_string();
    assert_eq!(
        before["lineage"]["inputs"][0]["path"],
        input.display().to_string()
    );
    assert_eq!(before["lineage"]["pipeline_version"], "payroll-2026.1");

    // Same columns, same row count, other values: swapped in under the same name.
    std::fs::rename(&replacement, &input).expect("replace the input");
    env.start_worker(&[
        "--heartbeat-secs",
        "1",
        "--worker-id",
        "rescuer",
        "--output-root",
        "out",
    ]);
    let row = env
        .wait_job("lin-replace", T, |r| {
            matches!(r.get::<String, _>("state").as_str(), "dead" | "succeeded")
        })
        .await;
    assert_eq!(row.get::<String, _>("state"), "dead");
    let error: String = row.get("last_error");
    let input_text = input.display().to_string();
    for part in [
        format!("input {input_text} changed"),
        old_sha.clone(),
        "drover jobs retry lin-replace --from-scratch".to_string(),
    ] {
        assert!(error.contains(&part), "{part:?} not in {error}");
    }
    assert_eq!(row.get::<String, _>("error_kind"), "permanent");

    // The way out: start over on the new input, which gives exactly its totals.
    let expected = run_locally(&env, &input, 100);
    let out = env.drover(&["jobs", "retry", "lin-replace", "--from-scratch"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("from batch 0"), "{}", stdout(&out));
    let out = env.drover(&["jobs", "wait", "lin-replace", "--timeout", "120"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let job = env.show("lin-replace");
    assert_eq!(job["result"], expected);
    assert_eq!(job["rows_done"], 100_000);
    let new_sha = job["lineage"]["inputs"][0]["sha256"]
        .as_str()
        .expect("fingerprint recorded again")
        .to_string();
    assert_ne!(new_sha, old_sha);
    assert!(
        error.contains(&new_sha),
        "the dead job's error names the new fingerprint too: {error}"
    );
    let out = env.drover(&["verify", "lin-replace"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resume_under_another_pipeline_version_is_refused() {
    let mut env = TestEnv::new().await;
    env.write_config(crate::reliability::FAST_RETRY);
    let input = generate_seeded(&env, 100_000, "in.parquet", 3);
    publish_payroll(&env, "lin-version", &input, 100);
    kill_mid_job(&mut env, "lin-version").await;
    // The first attempt ran under an earlier release of the formulas.
    sqlx::query(
        "UPDATE drover.jobs SET pipeline_version = 'payroll-2025.4' \
         WHERE idempotency_key = 'lin-version'",
    )
    .execute(&env.pool)
    .await
    .expect("older version");
    env.start_worker(&["--heartbeat-secs", "1", "--output-root", "out"]);
    let row = env
        .wait_job("lin-version", T, |r| {
            matches!(r.get::<String, _>("state").as_str(), "dead" | "succeeded")
        })
        .await;
    assert_eq!(row.get::<String, _>("state"), "dead");
    let error: String = row.get("last_error");
    assert!(
        error.contains("recorded \"payroll-2025.4\", this worker runs \"payroll-2026.1\""),
        "{error}"
    );
    assert!(error.contains("--from-scratch"), "{error}");
    let job = env.show("lin-version");
    assert!(
        job["batches_done"].as_i64().unwrap_or(0) > 0,
        "the checkpoints are kept for inspection: {job}"
    );
}

/// Flips one byte in the middle of `path`.
fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read part");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(path, bytes).expect("write part");
}

#[tokio::test(flavor = "multi_thread")]
async fn lineage_locates_rows_and_verify_names_the_batch_that_disagrees() {
    let mut env = TestEnv::new().await;
    let input = generate(&env, 2_500, "acme.parquet");
    env.start_worker(&["--output-root", "out"]);
    publish_payroll(&env, "lin-good", &input, 1000);
    let out = env.drover(&["jobs", "wait", "lin-good", "--timeout", "120"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));

    // The ledger's lineage and the manifest's agree, batch by batch.
    let job = env.show("lin-good");
    let batches = job["lineage"]["batches"].as_array().expect("batches");
    assert_eq!(batches.len(), 3);
    let dir = PathBuf::from(batches[0]["part"].as_str().expect("part"))
        .parent()
        .expect("dir")
        .to_path_buf();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("_manifest.json")).expect("manifest"))
            .expect("manifest json");
    assert_eq!(manifest["pipeline_version"], "payroll-2026.1");
    assert_eq!(manifest["params"]["client_id"], "acme");
    assert_eq!(manifest["inputs"], job["lineage"]["inputs"]);
    assert_eq!(manifest["summary"], job["result"]);
    for (i, b) in batches.iter().enumerate() {
        let p = &manifest["parts"][i];
        assert_eq!(b["first_row"], 1000 * i as i64);
        assert_eq!(p["first_row"], b["first_row"]);
        assert_eq!(p["sha256"], b["sha256"]);
        assert_eq!(p["rows_out"], b["rows_out"]);
        assert_eq!(p["attempt"], 1);
    }
    assert_eq!(batches[2]["rows"], 500);

    // Input row 1500 is in batch 1's part.
    let out = env.drover(&["lineage", "lin-good", "--row", "1500", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let hit: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(hit["batch"], 1);
    assert_eq!(hit["row_in_batch"], 500);
    assert!(
        hit["part"]
            .as_str()
            .is_some_and(|p| p.ends_with("part-00001.parquet")),
        "{hit}"
    );
    let out = env.drover(&["lineage", "lin-good", "--row", "2500"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("out of range"), "{}", stderr(&out));

    // Good output verifies.
    let out = env.drover(&["verify", "lin-good"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("lin-good: ok"), "{}", stdout(&out));

    // A flipped byte in batch 1's part: named, exit 1.
    let part1 = dir.join("part-00001.parquet");
    let original = std::fs::read(&part1).expect("read");
    flip_byte(&part1);
    let out = env.drover(&["verify", "lin-good"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("first bad batch 1"),
        "{}",
        stdout(&out)
    );
    std::fs::write(&part1, original).expect("restore");

    // A truncated part 2, found through --since.
    let part2 = dir.join("part-00002.parquet");
    let len = std::fs::metadata(&part2).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&part2)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");
    let out = env.drover(&["verify", "--since", "1h", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let line: Value =
        serde_json::from_str(stdout(&out).lines().next().unwrap_or("{}")).expect("json line");
    assert_eq!(line["key"], "lin-good");
    assert_eq!(line["first_bad_batch"], 2);

    // A row a running job has not reached yet.
    env.publish_noop(
        "lin-running",
        &["--param", "batches=200", "--param", "sleep_ms=100"],
    );
    env.wait_job("lin-running", T, |r| r.get::<i32, _>("batches_done") >= 1)
        .await;
    let out = env.drover(&["lineage", "lin-running", "--row", "199"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not processed yet"),
        "{}",
        stderr(&out)
    );
    let out = env.drover(&["jobs", "cancel", "lin-running"]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_job("lin-running", T, |r| {
        r.get::<String, _>("state") == "cancelled"
    })
    .await;
}
