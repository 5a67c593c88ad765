//! The lifecycle of a long-running service, second part: poison messages at the delivery
//! limit (handled by workers, or by `drover doctor --fix` when none runs), schedules,
//! concurrency limits, a really lowered consumer timeout, consumers reconnecting.

use crate::support::*;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use sqlx::Row;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

/// Takes every delivery of `{ns}.jobs` and gives it back (nack, requeue) without claiming
/// it, as workers that crash right after receiving a message would, until the broker stops
/// delivering it: the delivery limit dead-lettered it. Returns the deliveries seen.
async fn nack_until_dead_lettered(env: &TestEnv) -> usize {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("amqp connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            format!("{}.jobs", env.ns).as_str().into(),
            "crashing-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut seen = 0;
    loop {
        // The last delivery the limit allows carries x-delivery-count = the limit; nacking
        // it dead-letters the message, and nothing more is delivered.
        let d = tokio::time::timeout(T, consumer.next())
            .await
            .expect("a delivery in time")
            .expect("consumer open")
            .expect("delivery");
        seen += 1;
        let count = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned());
        d.acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .expect("nack");
        if matches!(
            count,
            Some(AMQPValue::LongLongInt(2)) | Some(AMQPValue::LongInt(2))
        ) {
            break;
        }
        assert!(seen < 10, "never reached the delivery limit");
    }
    let _ = conn.close(200, "bye".into()).await;
    seen
}

/// A message that reached the delivery limit is poison: its job is marked `dead` with the
/// limit named, not published again by the lost-message sweep (which would loop), and can
/// still be retried by hand.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_dead_lettered_at_the_delivery_limit_marks_its_job_dead() {
    let mut env = TestEnv::new().await;
    env.write_config("[worker]\ndelivery_limit = 2\n");
    // A first worker declares the topology, the poison queue included, then leaves.
    let w = env.start_worker(&[]);
    env.worker(w)
        .wait_log("consuming messages dead-lettered at the delivery limit", T);
    env.worker(w).signal("-TERM");
    assert!(env.worker(w).wait_exit(T).success());

    env.publish_noop("poison-1", &[]);
    assert_eq!(nack_until_dead_lettered(&env).await, 3);

    // The lost-message sweep would see a queued job, no ready message, and waited long
    // enough; the dead-lettered copy decides instead.
    let w = env.start_worker(&["--heartbeat-secs", "1", "--lost-after-secs", "1"]);
    let row = env
        .wait_job("poison-1", T, |r| r.get::<String, _>("state") == "dead")
        .await;
    assert_poisoned(&row);
    let line = env
        .worker(w)
        .wait_log("poison message: marked the job dead", T);
    assert!(line.contains("poison-1"), "{line}");
    assert!(
        !env.worker(w).log().contains("published them again"),
        "the poison message was published again"
    );
    assert_eq!(env.jobs_ready().await, 0);
    // The original stays in {ns}.dead for the operator.
    assert_eq!(env.dead_letters().await.len(), 1);

    // An operator who fixed the cause runs it again.
    let out = env.drover(&["jobs", "retry", "poison-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_job("poison-1", T, |r| {
        r.get::<String, _>("state") == "succeeded"
    })
    .await;
}

/// A job marked dead for its message's delivery limit (2 in these tests), as a permanent
/// failure that names the limit.
fn assert_poisoned(row: &sqlx::postgres::PgRow) {
    let error: String = row.get("last_error");
    assert!(error.contains("delivery limit reached"), "{error}");
    assert!(error.contains("x-delivery-limit 2"), "{error}");
    assert_eq!(
        row.get::<Option<String>, _>("error_kind").as_deref(),
        Some("permanent")
    );
}

/// Messages ready in `{ns}.poison` (a passive declare).
async fn poison_ready(env: &TestEnv) -> u32 {
    env.queue_depth("poison").await.0
}

/// Polls `{ns}.poison` (the broker dead-letters asynchronously) until it holds `n` ready
/// copies, bounded by `T`.
async fn wait_poison_ready(env: &TestEnv, n: u32) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let ready = poison_ready(env).await;
        if ready == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{{ns}}.poison holds {ready} copies, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With no worker running, the copies the broker dead-letters at the delivery limit wait in
/// `{ns}.poison` and their jobs stay `queued`: `drover doctor` lists each copy with its job's
/// state and leaves everything as it was; `drover doctor --fix` does what a worker's poison
/// consumer does (the still-queued job becomes `dead` with the limit as the reason, a copy
/// whose job already ended is just acked), before its lost-message fix, which therefore does
/// not publish the poisoned job again. The copies are real dead-letters, not published by
/// hand.
#[tokio::test(flavor = "multi_thread")]
async fn doctor_reports_and_fixes_poison_copies_when_no_worker_runs() {
    let env = TestEnv::new().await;
    env.write_config("[worker]\ndelivery_limit = 2\n");
    // doctor declares the topology, {ns}.poison included, as a worker would; nothing to fix.
    let out = env.drover(&["doctor"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "queue {}.poison holds 0 copy(ies) of messages dead-lettered at the delivery limit",
            env.ns
        )),
        "{}",
        stdout(&out)
    );

    env.publish_noop("poison-doc-1", &[]);
    assert_eq!(nack_until_dead_lettered(&env).await, 3);
    env.publish_noop("poison-doc-2", &[]);
    assert_eq!(nack_until_dead_lettered(&env).await, 3);
    wait_poison_ready(&env, 2).await;
    // The second job ended in the meantime (an operator cancelled it).
    let out = env.drover(&["jobs", "cancel", "poison-doc-2"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = env.drover(&["doctor", "--lost-after-secs", "1"]);
    let report = stdout(&out);
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("poison messages: 2 copy(ies)"), "{report}");
    assert!(report.contains("x-delivery-limit 2"), "{report}");
    assert!(
        report.contains("job poison-doc-1: queued; would fix: mark it dead, ack the copy"),
        "{report}"
    );
    assert!(
        report.contains("job poison-doc-2: cancelled; would fix: ack the copy"),
        "{report}"
    );
    // Only a report: the job still waits, the copies are back in the queue.
    assert_eq!(env.state("poison-doc-1").await.as_deref(), Some("queued"));
    assert_eq!(poison_ready(&env).await, 2);

    let out = env.drover(&["doctor", "--lost-after-secs", "1", "--fix"]);
    let fixed = stdout(&out);
    assert!(out.status.success(), "{fixed}{}", stderr(&out));
    assert!(
        fixed.contains("job poison-doc-1: marked dead (delivery limit reached)"),
        "{fixed}"
    );
    assert!(
        fixed.contains("marked 1 poisoned job(s) dead, acked 2 poison copy(ies)"),
        "{fixed}"
    );
    assert!(fixed.contains("published 0 message(s)"), "{fixed}");
    let row = env
        .wait_job("poison-doc-1", T, |r| r.get::<String, _>("state") == "dead")
        .await;
    assert_poisoned(&row);
    assert_eq!(
        env.state("poison-doc-2").await.as_deref(),
        Some("cancelled")
    );
    assert_eq!(poison_ready(&env).await, 0);
    assert_eq!(env.jobs_ready().await, 0);
    // The originals stay in {ns}.dead for the operator.
    assert_eq!(env.dead_letters().await.len(), 2);

    let out = env.drover(&["doctor", "--lost-after-secs", "1"]);
    assert!(out.status.success(), "after the fix: {}", stdout(&out));
}

/// The key `drover schedules add` printed for the first slot.
fn first_key(out: &std::process::Output) -> String {
    let text = stdout(out);
    let start = text.find("(job key ").expect("first key in the output") + "(job key ".len();
    let end = text[start..].rfind(')').expect("closing parenthesis") + start;
    text[start..end].to_string()
}

/// Two workers, one schedule firing every second: each slot's job is enqueued once (one
/// "schedule fired" line across both workers), runs once, and is listed like any job.
#[tokio::test(flavor = "multi_thread")]
async fn two_workers_fire_each_slot_of_a_schedule_exactly_once() {
    let mut env = TestEnv::new().await;
    let a = env.start_worker(&["--worker-id", "sched-a"]);
    let b = env.start_worker(&["--worker-id", "sched-b"]);
    let out = env.drover(&[
        "schedules",
        "add",
        "tick",
        "--every",
        "1s",
        "--pipeline",
        "noop",
        "--param",
        "batches=2",
        "--key-template",
        "acme:{name}:{slot}",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first = first_key(&out);
    let slot0: chrono::DateTime<chrono::Utc> = first
        .strip_prefix("acme:tick:")
        .expect("key from the template")
        .parse()
        .expect("slot is RFC 3339");
    let keys: Vec<String> = (0..4)
        .map(|i| {
            let slot = slot0 + chrono::Duration::seconds(i);
            format!(
                "acme:tick:{}",
                slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )
        })
        .collect();
    for k in &keys {
        env.wait_job(k, T, |r| r.get::<String, _>("state") == "succeeded")
            .await;
    }
    let out = env.drover(&["schedules", "remove", "tick"]);
    assert!(out.status.success(), "{}", stderr(&out));

    for k in &keys {
        let fired: usize = [a, b]
            .iter()
            .map(|w| {
                env.worker(*w)
                    .log()
                    .lines()
                    .filter(|l| l.contains("schedule fired") && l.contains(k.as_str()))
                    .count()
            })
            .sum();
        assert_eq!(fired, 1, "slot {k} fired {fired} times");
        assert_eq!(outcomes(&env.show(k)), ["succeeded"], "{k} ran once");
    }
    let list = env.drover(&["jobs", "list", "--pipeline", "noop"]);
    assert!(list.status.success(), "{}", stderr(&list));
    for k in &keys {
        assert!(stdout(&list).contains(k.as_str()), "jobs list lacks {k}");
    }
}

/// Slots missed while no worker ran: `all` fires each, `latest` the most recent, `none`
/// none of them; either way the schedule then waits for its next slot.
#[tokio::test(flavor = "multi_thread")]
async fn catch_up_policies_decide_what_missed_slots_fire() {
    let mut env = TestEnv::new().await;
    for policy in ["all", "latest", "none"] {
        let out = env.drover(&[
            "schedules",
            "add",
            policy,
            "--every",
            "1d",
            "--pipeline",
            "noop",
            "--key-template",
            "{name}:{date}",
            "--catch-up",
            policy,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // No worker ran for three days: the slots of the last three midnights and today's
    // have passed.
    sqlx::query(
        "UPDATE drover.schedules SET next_slot = date_trunc('day', now()) - interval '3 days'",
    )
    .execute(&env.pool)
    .await
    .expect("move the schedules back");
    let today: chrono::NaiveDate = sqlx::query_scalar("SELECT (now() AT TIME ZONE 'UTC')::date")
        .fetch_one(&env.pool)
        .await
        .expect("today");
    let w = env.start_worker(&[]);
    env.wait_job(&format!("all:{today}"), T, |_| true).await;

    let keys: Vec<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM drover.jobs ORDER BY idempotency_key")
            .fetch_all(&env.pool)
            .await
            .expect("keys");
    let days: Vec<String> = (0..4)
        .rev()
        .map(|d| format!("{}", today - chrono::Duration::days(d)))
        .collect();
    let mut want: Vec<String> = days.iter().map(|d| format!("all:{d}")).collect();
    want.push(format!("latest:{today}"));
    assert_eq!(keys, want, "none fires no missed slot");
    let next: Vec<(String, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT name, next_slot FROM drover.schedules ORDER BY name")
            .fetch_all(&env.pool)
            .await
            .expect("schedules");
    let tomorrow = (today + chrono::Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    for (name, slot) in next {
        assert_eq!(slot, tomorrow, "{name} waits for tomorrow");
    }
    env.worker(w)
        .wait_log("missed schedule slots skipped by the catch-up policy", T);

    let list = env.drover(&["schedules", "list", "--json"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(3));
    assert_eq!(v[0]["last_key"], format!("all:{today}"));
}

/// `schedules add` refuses what cannot work, naming the flag and the value.
#[tokio::test(flavor = "multi_thread")]
async fn schedules_add_refuses_bad_input_naming_it() {
    let env = TestEnv::new().await;
    let cases: [(&[&str], &str); 6] = [
        (&["--cron", "61 * * * *"], "--cron \"61 * * * *\""),
        (&["--cron", "0 6 * * 1"], "name the days"),
        (&["--every", "soon"], "--every \"soon\""),
        (
            &["--every", "1h", "--key-template", "k:{when}"],
            "unknown placeholder {when}",
        ),
        (&["--every", "1h", "--key-template", "k:{date}"], "same key"),
        (
            &["--every", "1h", "--catch-up", "sometimes"],
            "--catch-up \"sometimes\"",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["schedules", "add", "bad", "--pipeline", "noop"];
        args.extend_from_slice(extra);
        if !extra.contains(&"--key-template") {
            args.extend_from_slice(&["--key-template", "k:{slot}"]);
        }
        let out = env.drover(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    let out = env.drover(&[
        "schedules",
        "add",
        "bad",
        "--every",
        "1h",
        "--pipeline",
        "nope",
        "--key-template",
        "k:{slot}",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
    let list = env.drover(&["schedules", "list", "--json"]);
    assert_eq!(stdout(&list).trim(), "[]", "nothing was added");

    // Pause and resume are visible in the list.
    let out = env.drover(&[
        "schedules",
        "add",
        "ok",
        "--every",
        "1h",
        "--pipeline",
        "noop",
        "--key-template",
        "k:{slot}",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.drover(&[
        "schedules",
        "add",
        "ok",
        "--every",
        "1h",
        "--pipeline",
        "noop",
        "--key-template",
        "k:{slot}",
    ]);
    assert!(!out.status.success(), "a second schedule of the same name");
    assert!(env.drover(&["schedules", "pause", "ok"]).status.success());
    assert!(stdout(&env.drover(&["schedules", "list"])).contains("paused"));
    assert!(env.drover(&["schedules", "resume", "ok"]).status.success());
    assert!(stdout(&env.drover(&["schedules", "list"])).contains("active"));
    assert!(
        !env.drover(&["schedules", "pause", "missing"])
            .status
            .success()
    );
}

/// A private RabbitMQ node (`scripts/rabbitmq-node.sh`) whose `consumer_timeout` is a few
/// seconds, checked every second; stopped, with its data deleted, when dropped.
struct LowTimeoutNode {
    name: &'static str,
    port: u16,
    workers: Vec<Worker>,
}

const NODE_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/rabbitmq-node.sh"
);

impl LowTimeoutNode {
    fn start(name: &'static str, port: u16, timeout_ms: u64) -> LowTimeoutNode {
        let conf = std::env::temp_dir().join(format!("{name}.conf"));
        std::fs::write(&conf, format!("consumer_timeout = {timeout_ms}\n")).expect("conf");
        let mut start = std::process::Command::new(NODE_SCRIPT);
        start.args(["start", name, &port.to_string()]).arg(&conf);
        let out = run_bounded(start, Duration::from_secs(150));
        let _ = std::fs::remove_file(&conf);
        let node = LowTimeoutNode {
            name,
            port,
            workers: Vec::new(),
        };
        assert!(out.status.success(), "node start: {}", stderr(&out));
        // The broker checks consumer timeouts on its channel tick, every 60 s by default:
        // tick every second so a timeout of a few seconds strikes within a few seconds.
        let mut tick = std::process::Command::new(NODE_SCRIPT);
        tick.args([
            "ctl",
            name,
            "eval",
            "application:set_env(rabbit, channel_tick_interval, 1000).",
        ]);
        let out = run_bounded(tick, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "set channel_tick_interval: {}",
            stderr(&out)
        );
        node
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `drover ARGS` of `env` against this node.
    fn command(&self, env: &TestEnv, args: &[&str]) -> std::process::Command {
        let mut c = env.command(args);
        c.env("DROVER_AMQP_URL", self.url());
        c
    }

    fn start_worker(&mut self, env: &TestEnv, args: &[&str]) -> &Worker {
        let mut full = vec!["worker"];
        full.extend_from_slice(args);
        let w = Worker::spawn(self.command(env, &full));
        w.wait_log("\"consuming\"", T);
        self.workers.push(w);
        self.workers.last().expect("just pushed")
    }
}

impl Drop for LowTimeoutNode {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.kill();
        }
        let mut stop = std::process::Command::new(NODE_SCRIPT);
        stop.args(["stop", self.name]);
        let _ = stop.status();
    }
}

/// With `consumer_timeout` really lowered to 3 s, jobs of about ten seconds each succeed
/// exactly once: deliveries are acked at claim. The delivery waiting unclaimed behind the
/// first job (prefetch 1) is the one the broker times out; the worker reconnects and the
/// second job still runs once.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_far_longer_than_a_lowered_consumer_timeout_succeed_once() {
    let env = TestEnv::new().await;
    let mut node = LowTimeoutNode::start("lifecycle2-ct", 5722, 3000);
    node.start_worker(&env, &["--prefetch", "1", "--heartbeat-secs", "1"]);
    let keys = ["long-1", "long-2"];
    for k in keys {
        let out = run_bounded(
            node.command(
                &env,
                &[
                    "publish",
                    "--pipeline",
                    "noop",
                    "--key",
                    k,
                    "--param",
                    "batches=10",
                    "--param",
                    "sleep_ms=1000",
                ],
            ),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "publish {k}: {}", stderr(&out));
    }
    for k in keys {
        let row = env
            .wait_job(k, Duration::from_secs(120), |r| {
                r.get::<String, _>("state") == "succeeded"
            })
            .await;
        let started: chrono::DateTime<chrono::Utc> = row.get("started_at");
        let finished: chrono::DateTime<chrono::Utc> = row.get("finished_at");
        assert!(
            finished - started >= chrono::Duration::seconds(9),
            "{k} ran {:?}, not longer than the timeout",
            finished - started
        );
        assert_eq!(outcomes(&env.show(k)), ["succeeded"], "{k} ran once");
    }
    // The timeout did strike: the broker closed the channel of the delivery that waited.
    let log = node.workers[0].log();
    assert!(
        log.contains("consumer error; reconnecting") || log.contains("broker connection lost"),
        "the broker never timed a delivery out:\n{log}"
    );
}

/// A group limit (one running job per value of a param) holds across two workers: the jobs
/// of one group never overlap, another group runs beside them, and a job held back by the
/// limit is neither failed nor lost (one attempt each, all succeed).
#[tokio::test(flavor = "multi_thread")]
async fn a_group_limit_holds_across_two_workers() {
    let mut env = TestEnv::new().await;
    // noop's sleep_ms stands in for a param such as client_id: one group per value.
    env.write_config("[limits.noop]\ngroup_by = \"sleep_ms\"\nper_group = 1\n");
    let a = env.start_worker(&["--worker-id", "limit-a", "--prefetch", "4"]);
    let b = env.start_worker(&["--worker-id", "limit-b", "--prefetch", "4"]);
    let groups = [
        ("400", ["g400-1", "g400-2", "g400-3", "g400-4"].as_slice()),
        ("401", ["g401-1", "g401-2"].as_slice()),
    ];
    for (sleep, keys) in groups {
        for k in keys {
            env.publish_noop(
                k,
                &[
                    "--param",
                    "batches=3",
                    "--param",
                    &format!("sleep_ms={sleep}"),
                ],
            );
        }
    }
    for (_, keys) in groups {
        for k in keys {
            env.wait_job(k, T, |r| r.get::<String, _>("state") == "succeeded")
                .await;
        }
    }
    for (sleep, keys) in groups {
        let spans: Vec<(
            String,
            chrono::DateTime<chrono::Utc>,
            chrono::DateTime<chrono::Utc>,
        )> = sqlx::query_as(
            "SELECT j.idempotency_key, a.started_at, a.finished_at FROM drover.attempts a \
                 JOIN drover.jobs j ON j.id = a.job_id \
                 WHERE j.params ->> 'sleep_ms' = $1 ORDER BY a.started_at",
        )
        .bind(sleep)
        .fetch_all(&env.pool)
        .await
        .expect("attempts");
        assert_eq!(spans.len(), keys.len(), "one attempt per job: {spans:?}");
        for pair in spans.windows(2) {
            // A claim's started_at is its transaction's start, which may precede the
            // commit of the completion it waited for by a few milliseconds.
            assert!(
                pair[1].1 + chrono::Duration::milliseconds(250) >= pair[0].2,
                "group {sleep}: {} started before {} finished: {spans:?}",
                pair[1].0,
                pair[0].0
            );
        }
        for k in keys {
            let row = env.wait_job(k, T, |_| true).await;
            assert_eq!(
                row.get::<i32, _>("attempts"),
                1,
                "{k}: held back is no attempt"
            );
            assert_eq!(row.get::<i32, _>("failures"), 0, "{k}");
        }
    }
    let held = [a, b]
        .iter()
        .map(|w| env.worker(*w).log())
        .filter(|l| l.contains("concurrency limit reached: job held back"))
        .count();
    assert!(
        held >= 1,
        "no job was ever held back: the limit was not exercised"
    );
    // The two groups did run side by side at some point.
    let overlap: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM drover.attempts x JOIN drover.jobs jx ON jx.id = x.job_id, \
         drover.attempts y JOIN drover.jobs jy ON jy.id = y.job_id \
         WHERE jx.params ->> 'sleep_ms' = '400' AND jy.params ->> 'sleep_ms' = '401' \
         AND x.started_at < y.finished_at AND y.started_at < x.finished_at)",
    )
    .fetch_one(&env.pool)
    .await
    .expect("overlap");
    assert!(
        overlap,
        "the other group waited too: the limit is not per group"
    );
}

/// `total` holds across workers and `--limit` on one worker: with a total of one, three
/// jobs on two workers run one after another, each after one attempt.
#[tokio::test(flavor = "multi_thread")]
async fn a_total_limit_holds_across_two_workers() {
    let mut env = TestEnv::new().await;
    env.write_config("[limits.noop]\ntotal = 1\n");
    env.start_worker(&["--worker-id", "total-a", "--limit", "noop=3"]);
    env.start_worker(&["--worker-id", "total-b", "--limit", "noop=3"]);
    let keys = ["t-1", "t-2", "t-3"];
    for k in keys {
        env.publish_noop(k, &["--param", "batches=3", "--param", "sleep_ms=300"]);
    }
    for k in keys {
        let row = env
            .wait_job(k, T, |r| r.get::<String, _>("state") == "succeeded")
            .await;
        assert_eq!(row.get::<i32, _>("attempts"), 1, "{k}");
    }
    let spans: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT started_at, finished_at FROM drover.attempts ORDER BY started_at")
            .fetch_all(&env.pool)
            .await
            .expect("attempts");
    assert_eq!(spans.len(), 3);
    for pair in spans.windows(2) {
        assert!(
            pair[1].0 + chrono::Duration::milliseconds(250) >= pair[0].1,
            "two jobs ran at once: {spans:?}"
        );
    }
}

/// Waits until `needle` occurs in `n` lines of the worker's log, bounded by `T` (the log is
/// collected by a thread: polling it is the only way to count lines already seen).
fn wait_log_count(w: &Worker, needle: &str, n: usize) {
    let deadline = std::time::Instant::now() + T;
    while w.log().lines().filter(|l| l.contains(needle)).count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than {n} log lines with {needle:?}; log:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The jobs consumer and the poison consumer share one reconnect skeleton: when the broker
/// closes every connection, both connect and consume again (the jobs consumer counting the
/// lost session) and jobs still run; when the broker is gone, the worker retries with backoff
/// and still stops at once on SIGTERM. The node is private (the shared one is never stopped);
/// its `consumer_timeout` is left at RabbitMQ's default of 30 minutes.
#[tokio::test(flavor = "multi_thread")]
async fn both_consumers_reconnect_and_a_worker_without_a_broker_still_stops() {
    let env = TestEnv::new().await;
    let mut node = LowTimeoutNode::start("lifecycle3-rc", 5771, 1_800_000);
    node.start_worker(&env, &["--heartbeat-secs", "1"]);
    let poison_line = "consuming messages dead-lettered at the delivery limit";
    wait_log_count(&node.workers[0], poison_line, 1);

    let mut close = std::process::Command::new(NODE_SCRIPT);
    close.args([
        "ctl",
        "lifecycle3-rc",
        "close_all_connections",
        "test: reconnect",
    ]);
    let out = run_bounded(close, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "close_all_connections: {}",
        stderr(&out)
    );
    node.workers[0].wait_log("\"reconnects\":1", T);
    wait_log_count(&node.workers[0], poison_line, 2);

    let out = run_bounded(
        node.command(
            &env,
            &["publish", "--pipeline", "noop", "--key", "after-reconnect"],
        ),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "publish: {}", stderr(&out));
    env.wait_job("after-reconnect", T, |r| {
        r.get::<String, _>("state") == "succeeded"
    })
    .await;

    let mut stop = std::process::Command::new(NODE_SCRIPT);
    stop.args(["stop", "lifecycle3-rc"]);
    let out = run_bounded(stop, Duration::from_secs(120));
    assert!(out.status.success(), "node stop: {}", stderr(&out));
    node.workers[0].wait_log("broker unavailable; reconnecting", T);
    node.workers[0].signal("-TERM");
    let status = node.workers[0].wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}:\n{}", node.workers[0].log());
}
