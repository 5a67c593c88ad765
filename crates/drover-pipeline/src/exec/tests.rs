//! `exec` against real Python children (tests/exec/*.py, pyarrow only), one per failure
//! mode of protocol v1. The interpreter comes from `DROVER_TEST_PYTHON`, which `make test`
//! sets from `scripts/ensure-python.sh`.

use crate::*;
use polars::prelude::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn python() -> String {
    std::env::var("DROVER_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "DROVER_TEST_PYTHON is not set: the exec tests need a Python with pyarrow \
             (make test sets it; by hand: export DROVER_TEST_PYTHON=$(scripts/ensure-python.sh))"
        )
    })
}

fn child(script: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/exec")
        .join(script);
    json!([python(), path])
}

/// `rows` rows: `x` = 0..rows (i64) and `s` = "r<x>" (string), as Parquet.
fn input(dir: &Path, rows: i64) -> PathBuf {
    let path = dir.join("in.parquet");
    let x: Vec<i64> = (0..rows).collect();
    let s: Vec<String> = x.iter().map(|v| format!("r{v}")).collect();
    let mut df = DataFrame::new(
        rows as usize,
        vec![Column::new("x".into(), x), Column::new("s".into(), s)],
    )
    .unwrap();
    ParquetWriter::new(std::fs::File::create(&path).unwrap())
        .finish(&mut df)
        .unwrap();
    path
}

fn spec(dir: &Path, params: Value, batch: usize, attempt: u32) -> JobSpec {
    JobSpec {
        key: "exec:test".into(),
        pipeline: "exec".into(),
        params,
        batch_size: Some(batch),
        attempt,
        output_root: dir.join("out"),
    }
}

/// Runs the job from `resume` to its end or its first error.
fn run(spec: &JobSpec, resume: u32) -> (Vec<BatchOutcome>, Result<Value, PipelineError>) {
    let mut run = Registry::builtin().open(spec, resume).unwrap();
    let mut batches = Vec::new();
    loop {
        match run.next_batch() {
            Ok(Some(b)) => batches.push(b),
            Ok(None) => break,
            Err(e) => return (batches, Err(e)),
        }
    }
    let result = run.finish(&batches);
    (batches, result)
}

fn part(b: &BatchOutcome) -> DataFrame {
    let path = b.output.as_ref().expect("a part");
    ParquetReader::new(std::fs::File::open(path).unwrap())
        .finish()
        .unwrap()
}

fn misbehave(dir: &Path, mode: &str, at: u32, extra: Value) -> JobSpec {
    let mut env = json!({"MODE": mode, "AT": at.to_string()});
    if let (Some(env), Value::Object(extra)) = (env.as_object_mut(), extra) {
        env.extend(extra);
    }
    let params = json!({
        "command": child("misbehave.py"),
        "input": input(dir, 10),
        "env": env,
        "batch_timeout_secs": 20,
    });
    spec(dir, params, 4, 1)
}

/// The error of a run expected to fail at batch `at`, after the batches before it.
fn failure(spec: &JobSpec, at: u32) -> PipelineError {
    let (batches, result) = run(spec, 0);
    let e = result.expect_err("the run fails");
    assert_eq!(
        batches.len(),
        at as usize,
        "batches before the failure: {e}"
    );
    assert!(
        e.message.contains(&format!("batch {at}")),
        "names the batch: {}",
        e.message
    );
    e
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits for `path` to hold a pid (bounded); the child writes it when it starts.
fn pid_in(path: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
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

/// Waits until `pid` is gone; returns how long that took.
fn gone_within(pid: u32, limit: Duration) -> Duration {
    let start = Instant::now();
    while alive(pid) {
        assert!(
            start.elapsed() < limit,
            "child {pid} still running after {limit:?}"
        );
        // A foreign process's exit has no event to await in std.
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn params_are_validated_with_the_field_and_value() {
    let exec = Registry::builtin();
    let ok = json!({"command": ["python3", "x.py"], "input": "in.parquet"});
    exec.validate("exec", &ok).unwrap();
    let cases = [
        (json!({"input": "a.csv"}), "param \"command\" is required"),
        (
            json!({"command": "python3 x.py", "input": "a.csv"}),
            "param \"command\": expected a non-empty array of strings (not an array), got \"python3 x.py\"",
        ),
        (
            json!({"command": [], "input": "a.csv"}),
            "param \"command\": expected a non-empty array of strings (it is empty), got []",
        ),
        (
            json!({"command": ["python3", 7], "input": "a.csv"}),
            "element 1 is 7, not a string), got [\"python3\",7]",
        ),
        (
            json!({"command": [""], "input": "a.csv"}),
            "the program name is empty",
        ),
        (json!({"command": ["x"]}), "param \"input\" is required"),
        (
            json!({"command": ["x"], "input": "a.csv", "env": ["A=1"]}),
            "param \"env\": expected an object of strings, got [\"A=1\"]",
        ),
        (
            json!({"command": ["x"], "input": "a.csv", "env": {"N": 3}}),
            "param \"env\": \"N\": expected a string, got 3",
        ),
        (
            json!({"command": ["x"], "input": "a.csv", "env": {"DROVER_PARAMS": "{}"}}),
            "\"DROVER_PARAMS\" is set by drover",
        ),
        (
            json!({"command": ["x"], "input": "a.csv", "batch_timeout_secs": 0}),
            "param \"batch_timeout_secs\": expected an integer in 1..=604800, got 0",
        ),
        (
            json!({"command": ["x"], "input": "a.csv", "batch_timeout": 5}),
            "unknown param \"batch_timeout\"",
        ),
    ];
    for (params, expected) in cases {
        let e = exec.validate("exec", &params).unwrap_err();
        assert!(e.is_permanent());
        assert!(e.message.contains(expected), "{params}: {}", e.message);
    }
}

#[test]
fn a_child_transforms_every_batch_into_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let params = json!({"command": child("double.py"), "input": input(tmp.path(), 10)});
    let (batches, result) = run(&spec(tmp.path(), params, 4, 1), 0);
    assert_eq!(result.unwrap(), json!({"rows": 10, "rows_out": 10}));
    assert_eq!(batches.len(), 3);
    let mut xs = Vec::new();
    for b in &batches {
        let df = part(b);
        assert_eq!(df.get_column_names(), ["x", "s"]);
        assert_eq!(df.height() as u64, b.rows);
        xs.extend(df.column("x").unwrap().i64().unwrap().into_no_null_iter());
        let first = df
            .column("s")
            .unwrap()
            .str()
            .unwrap()
            .get(0)
            .map(str::to_string);
        assert_eq!(
            first,
            Some(format!("r{}", b.index * 4)),
            "strings pass through"
        );
    }
    assert_eq!(xs, (0..10).map(|v| v * 2).collect::<Vec<i64>>());
    assert!(
        tmp.path()
            .join("out/exec")
            .join(key_path("exec:test"))
            .join(MANIFEST)
            .exists()
    );
}

#[test]
fn the_child_gets_the_protocol_environment_and_no_drover_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let s = misbehave(tmp.path(), "env", 0, json!({"EXTRA": "yes"}));
    let s = JobSpec {
        attempt: 3,
        batch_size: Some(100),
        ..s
    };
    let (batches, result) = run(&s, 0);
    result.unwrap();
    let df = part(&batches[0]);
    let get = |c: &str| {
        df.column(c)
            .unwrap()
            .str()
            .unwrap()
            .get(0)
            .unwrap()
            .to_string()
    };
    assert_eq!(get("drover_protocol"), "1");
    assert_eq!(get("drover_job_key"), "exec:test");
    assert_eq!(get("drover_attempt"), "3");
    let params: Value = serde_json::from_str(&get("drover_params")).unwrap();
    assert_eq!(params, s.params);
    assert_eq!(get("extra"), "yes");
    // DROVER_TEST_PYTHON at least is set in this process; the child must not see it.
    assert_eq!(get("inherited"), "");
}

#[test]
fn resume_sends_only_the_remaining_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let params = json!({"command": child("double.py"), "input": input(tmp.path(), 10)});
    let mut run = Registry::builtin()
        .open(&spec(tmp.path(), params, 4, 2), 1)
        .unwrap();
    let mut got = Vec::new();
    while let Some(b) = run.next_batch().unwrap() {
        got.push((b.index, part(&b).column("x").unwrap().i64().unwrap().get(0)));
    }
    assert_eq!(got, [(1, Some(8)), (2, Some(16))]);
}

#[test]
fn garbage_on_stdout_is_a_permanent_protocol_error() {
    let tmp = tempfile::tempdir().unwrap();
    let e = failure(&misbehave(tmp.path(), "garbage", 1, json!({})), 1);
    assert!(e.is_permanent());
    assert!(
        e.message.contains("not an Arrow IPC stream"),
        "{}",
        e.message
    );
    assert!(e.message.contains("child killed"), "{}", e.message);
}

#[test]
fn a_child_dying_mid_answer_fails_with_its_exit_code_and_last_stderr_line() {
    let tmp = tempfile::tempdir().unwrap();
    let e = failure(&misbehave(tmp.path(), "die", 1, json!({})), 1);
    assert!(e.is_permanent());
    assert!(e.message.starts_with("segment lost ("), "{}", e.message);
    assert!(e.message.contains("exited with code 3"), "{}", e.message);
}

#[test]
fn a_hung_child_is_killed_after_the_batch_timeout_as_a_transient_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = misbehave(tmp.path(), "hang", 0, json!({}));
    s.params["batch_timeout_secs"] = json!(1);
    let start = Instant::now();
    let e = failure(&s, 0);
    assert!(!e.is_permanent());
    assert!(
        e.message
            .contains("did not answer within batch_timeout_secs=1; child killed"),
        "{}",
        e.message
    );
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn exit_75_is_transient_and_other_codes_are_permanent() {
    let tmp = tempfile::tempdir().unwrap();
    let params = json!({"command": child("fail_transient.py"), "input": input(tmp.path(), 10)});
    let e = failure(&spec(tmp.path(), params.clone(), 4, 1), 0);
    assert!(!e.is_permanent());
    assert_eq!(
        e.message.split(" (exec:").next(),
        Some("rate service unavailable, try again later"),
        "the last stderr line is the error: {}",
        e.message
    );
    assert!(e.message.contains("exited with code 75"), "{}", e.message);
    // The retry (attempt 2) succeeds.
    let (_, result) = run(&spec(tmp.path(), params, 4, 2), 0);
    assert_eq!(result.unwrap()["rows"], 10);

    let e = failure(&misbehave(tmp.path(), "exit", 2, json!({"CODE": "1"})), 2);
    assert!(e.is_permanent());
    assert!(
        e.message.starts_with("bad row: 1 (exec: batch 2:"),
        "{}",
        e.message
    );
}

#[test]
fn exiting_0_before_answering_every_batch_is_a_protocol_error() {
    let tmp = tempfile::tempdir().unwrap();
    let e = failure(&misbehave(tmp.path(), "early_exit", 1, json!({})), 1);
    assert!(e.is_permanent());
    assert!(
        e.message
            .contains("closed stdout without answering the batch, then exited 0"),
        "{}",
        e.message
    );
}

#[test]
fn extra_output_is_a_protocol_error_at_the_last_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let e = failure(&misbehave(tmp.path(), "extra", 0, json!({})), 2);
    assert!(e.is_permanent());
    assert!(
        e.message.contains("after its answer to the last batch"),
        "{}",
        e.message
    );
}

#[test]
fn a_child_writing_lots_of_stderr_does_not_stall() {
    let tmp = tempfile::tempdir().unwrap();
    let (batches, result) = run(&misbehave(tmp.path(), "stderr_flood", 0, json!({})), 0);
    assert_eq!(result.unwrap()["rows_out"], 10);
    assert_eq!(batches.len(), 3);
}

#[test]
fn a_missing_program_is_permanent() {
    let tmp = tempfile::tempdir().unwrap();
    let params = json!({"command": ["/nonexistent/drover-child"], "input": input(tmp.path(), 3)});
    let e = failure(&spec(tmp.path(), params, 4, 1), 0);
    assert!(e.is_permanent());
    assert!(
        e.message
            .contains("cannot start [\"/nonexistent/drover-child\"]"),
        "{}",
        e.message
    );
}

#[test]
fn dropping_a_run_stops_its_child() {
    let tmp = tempfile::tempdir().unwrap();
    let pid_file = tmp.path().join("child.pid");
    let params = json!({
        "command": child("double.py"),
        "input": input(tmp.path(), 10),
        "env": {"PID_FILE": pid_file},
    });
    let mut run = Registry::builtin()
        .open(&spec(tmp.path(), params, 1, 1), 0)
        .unwrap();
    assert_eq!(run.next_batch().unwrap().map(|b| b.index), Some(0));
    let pid = pid_in(&pid_file);
    assert!(alive(pid));
    drop(run);
    // stdin closed and SIGTERM: gone well before the SIGKILL grace.
    assert!(gone_within(pid, Duration::from_secs(4)) < Duration::from_secs(4));
}

#[test]
fn a_child_ignoring_sigterm_is_killed_after_the_grace() {
    let tmp = tempfile::tempdir().unwrap();
    let pid_file = tmp.path().join("child.pid");
    let mut s = misbehave(tmp.path(), "stubborn", 0, json!({"PID_FILE": pid_file}));
    s.batch_size = Some(1);
    let mut run = Registry::builtin().open(&s, 0).unwrap();
    assert!(run.next_batch().unwrap().is_some());
    let pid = pid_in(&pid_file);
    let dropped = Instant::now();
    drop(run);
    gone_within(pid, exec::TERM_GRACE + Duration::from_secs(5));
    assert!(
        dropped.elapsed() >= exec::TERM_GRACE - Duration::from_millis(100),
        "SIGKILL only after the grace: {:?}",
        dropped.elapsed()
    );
}
