//! The example binary end to end against the real services: `invoicing migrate`, a worker,
//! `invoicing publish` of an `invoices` job, the ledger and the output, exactly as a team's
//! own binary would be used. It shares the workspace's test harness.

#[path = "../../../tests/integration/support.rs"]
#[allow(dead_code)]
mod support;

/// The binary under test: the example, not `drover`.
pub const BIN: &str = env!("CARGO_BIN_EXE_invoicing");

use sqlx::Row;
use std::time::Duration;
use support::{TestEnv, stderr, stdout};

const T: Duration = Duration::from_secs(120);

fn data(file: &str) -> String {
    format!("{}/data/{file}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_teams_own_pipeline_runs_through_the_whole_cli() {
    let mut env = TestEnv::new().await;
    let out = env.drover(&["pipelines"]);
    assert!(
        stdout(&out).lines().any(|l| l == "invoices"),
        "{}",
        stdout(&out)
    );

    env.start_worker(&[]);
    let input = format!("input={}", data("lines.csv"));
    let rates = format!("rates={}", data("rates.csv"));
    let out = env.drover(&[
        "publish",
        "--pipeline",
        "invoices",
        "--key",
        "inv:2026-11",
        "--param",
        &input,
        "--param",
        &rates,
        "--batch-size",
        "2",
    ]);
    assert!(out.status.success(), "publish: {}", stderr(&out));

    let out = env.drover(&["jobs", "wait", "inv:2026-11", "--timeout", "120"]);
    assert!(
        out.status.success(),
        "wait: {} {}",
        stdout(&out),
        stderr(&out)
    );
    let job = env.show("inv:2026-11");
    assert_eq!(job["state"], "succeeded", "{job}");
    // 725 + 100 + 6249 + 0 + 493: each line's cents × its region's rate, truncated.
    assert_eq!(
        job["result"],
        serde_json::json!({"rows": 5, "tax_cents": 7567})
    );
    assert_eq!(job["batches_done"], 3);

    // The same job in-process gives the same totals.
    let out = env.drover(&[
        "run",
        "invoices",
        "--param",
        &input,
        "--param",
        &rates,
        "--json",
        "--output",
        "local-out",
    ]);
    assert!(out.status.success(), "run: {}", stderr(&out));
    let local: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(local, job["result"]);

    // A line whose region has no rate is a permanent failure naming the row and region.
    let bad = env.path("bad.csv");
    std::fs::write(&bad, "customer,region,cents\nacme,CA,1\nacme,ZZ,2\n").expect("write");
    let out = env.drover(&[
        "publish",
        "--pipeline",
        "invoices",
        "--key",
        "inv:bad",
        "--param",
        &format!("input={}", bad.display()),
        "--param",
        &rates,
    ]);
    assert!(out.status.success(), "publish: {}", stderr(&out));
    env.wait_job("inv:bad", T, |r| r.get::<String, _>("state") == "dead")
        .await;
    let job = env.show("inv:bad");
    let err = job["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("row 1: no tax rate for region \"ZZ\""),
        "{err}"
    );
}

/// The README shows `src/bin/one_customer.rs` whole, as the shortest complete pipeline
/// binary: keep them the same, and under 40 lines.
#[test]
fn the_readme_shows_the_short_example_in_full() {
    let main = include_str!("../src/bin/one_customer.rs");
    let readme = include_str!("../../../README.md");
    assert!(
        readme.contains(main.trim_end()),
        "README.md must contain examples/invoicing/src/bin/one_customer.rs verbatim"
    );
    let code_lines = main.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(
        code_lines < 40,
        "the example is {code_lines} lines; the README promises under 40"
    );
}

#[test]
fn the_short_example_runs_its_pipeline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_one_customer"));
    c.args(["run", "one_customer", "--json", "--param"])
        .arg(format!("input={}", data("lines.csv")))
        .args(["--param", "customer=acme", "--output"])
        .arg(dir.path());
    let out = support::run_bounded(c, T);
    assert!(out.status.success(), "{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    // The default summary counts input rows; the part holds acme's two lines.
    assert_eq!(result, serde_json::json!({"rows": 5}));
}
