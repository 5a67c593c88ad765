//! What a new user tripped over (issue #16): errors that say why at once, help and config
//! that read right, values that stay short in messages.

use crate::support::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// A command without any service configuration from the caller's environment.
fn bare(args: &[&str]) -> std::process::Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("DROVER_AMQP_URL")
        .env_remove("DROVER_NAMESPACE")
        .env("DROVER_LOG_FORMAT", "json");
    run_bounded(c, Duration::from_secs(60))
}

/// A local port nobody listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn postgres_down_is_reported_at_once_with_its_cause() {
    let port = closed_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/drover");
    let started = Instant::now();
    let out = bare(&["jobs", "list", "--database-url", &url]);
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")),
        "no host:port: {err}"
    );
    assert!(err.to_lowercase().contains("refused"), "no cause: {err}");
    assert!(!err.contains("pool timed out"), "{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_waits_for_postgres_at_start_up() {
    let env = TestEnv::new().await;
    // The worker is pointed at a port where Postgres is not (yet): it must log why, keep
    // trying, and start once a proxy to the real Postgres listens there.
    let port = closed_port();
    let real = env
        .db_url
        .split_once('@')
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(hostport, _)| hostport.to_string())
        .expect("host:port in the test database url");
    let url = format!("postgres://postgres@127.0.0.1:{port}/{}", env.name);
    let mut cmd = env.command(&["worker", "--metrics-addr", "off", "--database-url", &url]);
    cmd.env("DROVER_LOG", "info");
    let mut w = Worker::spawn(cmd);
    let first = w.wait_log("Postgres unreachable at start-up", Duration::from_secs(10));
    assert!(
        first.contains(&format!("127.0.0.1:{port}")) && first.to_lowercase().contains("refused"),
        "{first}"
    );
    // A second attempt, logged again: it keeps retrying.
    let seen = || {
        w.log()
            .lines()
            .filter(|l| l.contains("Postgres unreachable at start-up"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen() < 2 {
        assert!(Instant::now() < deadline, "one attempt only:\n{}", w.log());
        w.wait_log("retry_in_ms", Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the proxy port");
    let proxy = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let real = real.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(real).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    w.wait_log("\"consuming\"", Duration::from_secs(60));
    w.signal("-TERM");
    assert!(
        w.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        w.log()
    );
    proxy.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_on_a_key_that_does_not_exist_says_so() {
    let env = TestEnv::new().await;
    let started = Instant::now();
    let out = env.drover(&["jobs", "wait", "no-such-key", "--timeout", "600"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no job with key no-such-key"),
        "{}",
        stderr(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_worker_takes_a_free_port_and_a_taken_one_says_how() {
    let mut env = TestEnv::new().await;
    // Port 0 from the config file's [worker] table: the chosen address is in the log.
    env.write_config("[worker]\nmetrics_addr = \"127.0.0.1:0\"\n");
    let i = env.start_worker(&[]);
    let line = env.worker(i).wait_log(
        "serving /healthz, /readyz and /metrics on http://127.0.0.1:",
        Duration::from_secs(10),
    );
    assert!(!line.contains("on http://127.0.0.1:0\""), "{line}");
    // A taken port: the error says how to run a second worker.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = env.drover(&["worker", "--metrics-addr", &addr]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&addr) && err.contains("port 0") && err.contains("off"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_values_are_cut_in_errors_and_logs() {
    let mut env = TestEnv::new().await;
    let i = env.start_worker(&[]);
    let huge = "x".repeat(900_000);
    let body = serde_json::json!({
        "v": 1,
        "idempotency_key": "huge-1",
        "pipeline": "noop",
        "params": {"batches": huge},
    });
    env.publish_raw(body.to_string().as_bytes(), None).await;
    env.wait_job("huge-1", Duration::from_secs(60), |r| {
        sqlx::Row::get::<Option<String>, _>(r, "last_error").is_some()
    })
    .await;
    let shown = env.show("huge-1");
    let error = shown["last_error"].as_str().expect("last_error");
    assert!(
        error.contains("batches") && error.contains("(900 KB)"),
        "{error}"
    );
    assert!(error.len() < 1_000, "{} bytes", error.len());
    let text = env.drover(&["jobs", "show", "huge-1"]);
    assert!(stdout(&text).len() < 5_000, "{} bytes", stdout(&text).len());
    let longest = env.worker(i).log().lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 10_000, "a log line of {longest} bytes");
}

#[test]
fn subcommand_help_puts_the_global_flags_apart() {
    let out = bare(&["jobs", "list", "--help"]);
    let help = stdout(&out);
    let heading = help
        .find("Global options")
        .unwrap_or_else(|| panic!("no heading: {help}"));
    let db = help.find("--database-url").expect("--database-url listed");
    assert!(db > heading, "--database-url before the heading:\n{help}");
}

#[test]
fn a_missing_key_shows_the_real_usage() {
    let mut c = Command::new(BIN);
    c.args(["publish", "--pipeline", "noop"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x")
        .env("DROVER_NAMESPACE", "acme");
    let out = run_bounded(c, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let usage = err
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .unwrap_or_else(|| panic!("no usage: {err}"));
    assert!(usage.contains("--key <KEY>"), "{usage}");
    assert!(
        !usage.contains("--database-url") && !usage.contains("--namespace"),
        "{usage}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn toml_errors_keep_their_line_breaks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("drover.toml");
    std::fs::write(&path, "[worker]\nprefetch = \"eight\"\n").expect("write");
    let path = path.to_string_lossy().to_string();
    let out = bare(&["jobs", "list", "--config", &path]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.lines().count() >= 3, "{err}");
    assert!(err.contains("prefetch = \"eight\""), "{err}");
}

#[test]
fn pipelines_describe_themselves() {
    let out = bare(&["pipelines"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list = stdout(&out);
    for name in ["noop", "payroll", "sql"] {
        let line = list
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not listed: {list}"));
        assert!(line.len() > name.len() + 10, "no summary: {line}");
    }
    let out = bare(&["pipelines", "--describe", "payroll"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "client_id",
        "(required)",
        "retirement_bp",
        "basis points",
        "hundredths of an hour",
        "total_net",
        "i64 cents",
    ] {
        assert!(text.contains(needle), "lacks {needle:?}:\n{text}");
    }
    let out = bare(&["pipelines", "--describe", "noop", "--json"]);
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let batches = d["params"]
        .as_array()
        .and_then(|p| p.iter().find(|f| f["name"] == "batches"))
        .expect("noop describes batches");
    assert_eq!(batches["default"], "1");
    let out = bare(&["pipelines", "--describe", "nope"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nope") && stderr(&out).contains("payroll"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_ctrl_c_stops_at_once_and_releases_the_job() {
    let mut env = TestEnv::new().await;
    let i = env.start_worker(&["--shutdown-grace-secs", "600"]);
    env.publish_noop("long-1", &["--param", "sleep_ms=600000"]);
    env.wait_job("long-1", Duration::from_secs(60), |r| {
        sqlx::Row::get::<String, _>(r, "state") == "running"
    })
    .await;
    env.worker(i).signal("-INT");
    env.worker(i)
        .wait_log("press Ctrl-C again to stop now", Duration::from_secs(10));
    let second = Instant::now();
    env.worker(i).signal("-INT");
    let status = env.worker(i).wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{}", env.worker(i).log());
    assert!(second.elapsed() < Duration::from_secs(30));
    // Released as after the grace period: queued again, its message published again.
    assert_eq!(env.state("long-1").await.as_deref(), Some("queued"));
    let log = env.worker(i).log();
    assert!(
        log.contains("released unfinished job back to queued"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_attempt_is_not_counted_as_a_failure() {
    let mut env = TestEnv::new().await;
    let i = env.start_worker(&["--shutdown-grace-secs", "1", "--metrics-addr", "off"]);
    env.publish_noop(
        "short-1",
        &["--max-attempts", "1", "--param", "sleep_ms=4000"],
    );
    env.wait_job("short-1", Duration::from_secs(60), |r| {
        sqlx::Row::get::<String, _>(r, "state") == "running"
    })
    .await;
    env.worker(i).signal("-TERM");
    assert!(env.worker(i).wait_exit(Duration::from_secs(30)).success());
    env.start_worker(&["--metrics-addr", "off"]);
    env.wait_job("short-1", Duration::from_secs(60), |r| {
        sqlx::Row::get::<String, _>(r, "state") == "succeeded"
    })
    .await;
    let show = env.drover(&["jobs", "show", "short-1"]);
    assert!(
        stdout(&show).contains("failures 0 of 1, attempts 2"),
        "{}",
        stdout(&show)
    );
    assert_eq!(env.show("short-1")["failures"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_job_forgets_its_old_error() {
    let mut env = TestEnv::new().await;
    env.start_worker(&["--metrics-addr", "off"]);
    env.publish_noop(
        "dead-1",
        &[
            "--max-attempts",
            "1",
            "--param",
            "fail_attempts=1",
            "--param",
            "fail_kind=permanent",
        ],
    );
    env.wait_job("dead-1", Duration::from_secs(60), |r| {
        sqlx::Row::get::<String, _>(r, "state") == "dead"
    })
    .await;
    assert!(env.show("dead-1")["last_error"].is_string());
    let out = env.drover(&["jobs", "retry", "dead-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // At once, before the worker has run it again: no old error, no past due time.
    let shown = env.show("dead-1");
    assert!(shown["last_error"].is_null(), "{shown}");
    assert!(shown["error_kind"].is_null(), "{shown}");
    let wait = env.drover(&["jobs", "wait", "dead-1", "--timeout", "60"]);
    assert!(wait.status.success(), "{}", stderr(&wait));
    let text = stdout(&wait);
    assert!(!text.contains("injected"), "old error shown: {text}");
    assert!(
        !text.contains("next attempt at"),
        "past due time shown: {text}"
    );
    // The history keeps the failure.
    let history = env.show("dead-1")["attempt_history"].clone();
    assert!(history[0]["error"].is_string(), "{history}");
}

#[tokio::test(flavor = "multi_thread")]
async fn show_and_run_say_where_the_output_is() {
    let mut env = TestEnv::new().await;
    let input = generate(&env, 300, "acme.parquet");
    let input = input.to_str().expect("utf8 path").to_string();
    let input_param = format!("input={input}");
    let params = [
        "--param",
        "client_id=acme",
        "--param",
        "period=2026-11",
        "--param",
        input_param.as_str(),
    ];
    // drover run: the directory and that the manifest is written.
    let mut run = vec![
        "run",
        "payroll",
        "--key",
        "acme:2026-11",
        "--batch-size",
        "100",
    ];
    run.extend_from_slice(&params);
    let out = env.drover(&run);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = std::fs::canonicalize(env.path("drover-output/payroll"))
        .expect("output root")
        .join(drover_pipeline::key_path("acme:2026-11"));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("output: {}", expected.display()))
            && text.contains("complete: _manifest.json written"),
        "{text}"
    );
    // jobs show: a finished job's directory is complete; a queued one's is not there yet.
    env.start_worker(&["--metrics-addr", "off"]);
    let mut publish = vec![
        "publish",
        "--pipeline",
        "payroll",
        "--key",
        "acme:2026-12",
        "--batch-size",
        "100",
    ];
    publish.extend_from_slice(&params);
    let out = env.drover(&publish);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_job("acme:2026-12", Duration::from_secs(120), |r| {
        sqlx::Row::get::<String, _>(r, "state") == "succeeded"
    })
    .await;
    let shown = env.show("acme:2026-12");
    let dir = std::path::PathBuf::from(shown["output"]["dir"].as_str().expect("dir"));
    assert!(dir.join("_manifest.json").is_file(), "{shown}");
    assert!(dir.ends_with(drover_pipeline::key_path("acme:2026-12")));
    assert_eq!(shown["output"]["manifest"], true);
    let text = stdout(&env.drover(&["jobs", "show", "acme:2026-12"]));
    assert!(
        text.contains("complete: _manifest.json is written"),
        "{text}"
    );
    // A job of a pipeline without output says nothing about output.
    env.publish_noop("no-output-1", &[]);
    assert!(env.show("no-output-1")["output"].is_null());
}
