//! Bad input at the command line: one clear line, non-zero exit, no panic.

use crate::support::*;
use std::process::Command;
use std::time::Duration;

fn bare(args: &[&str]) -> std::process::Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("DROVER_AMQP_URL")
        .env("DROVER_LOG_FORMAT", "json");
    run_bounded(c, Duration::from_secs(60))
}

fn assert_clean_failure(out: &std::process::Output, needles: &[&str]) {
    assert!(!out.status.success());
    let err = stderr(out);
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = bare(&["worker", "--prefetchh", "3"]);
    assert_eq!(out.status.code(), Some(2));
    assert_clean_failure(&out, &["--prefetchh"]);
}

#[test]
fn bad_urls_name_the_setting() {
    let out = bare(&["jobs", "list", "--database-url", "mysql://x/y"]);
    assert_clean_failure(&out, &["DATABASE_URL", "mysql://x/y"]);
    let out = bare(&[
        "publish",
        "--pipeline",
        "noop",
        "--key",
        "k",
        "--amqp-url",
        "http://h",
    ]);
    assert_clean_failure(&out, &["DROVER_AMQP_URL"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_services_name_host_and_port() {
    let out = bare(&[
        "jobs",
        "list",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/drover",
    ]);
    assert_clean_failure(&out, &["127.0.0.1:1"]);
    assert_eq!(
        stderr(&out).trim().lines().count(),
        1,
        "one line: {}",
        stderr(&out)
    );
    // A ledger that works and a broker that does not: the worker names the broker.
    let env = TestEnv::new().await;
    let mut cmd = env.command(&[
        "worker",
        "--amqp-url",
        "amqp://guest:sekrit@127.0.0.1:1/%2f",
    ]);
    cmd.env("DROVER_LOG", "off");
    let out = run_bounded(cmd, Duration::from_secs(60));
    assert_clean_failure(&out, &["127.0.0.1:1", "RabbitMQ"]);
    assert!(
        !stderr(&out).contains("sekrit"),
        "password leaked: {}",
        stderr(&out)
    );
}

#[test]
fn invalid_params_are_refused_before_publishing() {
    let out = bare(&["publish", "--pipeline", "nope", "--key", "k"]);
    assert_clean_failure(&out, &["nope"]);
    let out = bare(&[
        "publish",
        "--pipeline",
        "noop",
        "--key",
        "k",
        "--param",
        "batches=zero",
    ]);
    assert_clean_failure(&out, &["batches", "zero"]);
    let out = bare(&[
        "publish",
        "--pipeline",
        "noop",
        "--key",
        "",
        "--param",
        "batches=1",
    ]);
    assert_clean_failure(&out, &["idempotency_key"]);
}

#[test]
fn help_answers_questions() {
    let out = bare(&["--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for n in [
        "DROVER_AMQP_URL",
        "DATABASE_URL",
        "worker",
        "publish",
        "jobs",
        "migrate",
    ] {
        assert!(text.contains(n), "--help lacks {n}");
    }
    let out = bare(&["jobs", "wait", "--help"]);
    assert!(stdout(&out).contains("Exit status"), "{}", stdout(&out));
}
