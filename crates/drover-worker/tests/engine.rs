//! The engine in-process, against the real RabbitMQ and Postgres: drain and grace expiry are
//! driven through `run`'s shutdown future, with no subprocess and no signal.
//!
//! Each test has its own database and namespace and removes both.

use drover_broker::{Broker, OutgoingJob, Topology};
use drover_core::config::{Connections, FileConfig};
use drover_core::{ExposeSecret, JobMessage};
use drover_ledger::{Ledger, NewJob};
use drover_pipeline::Registry;
use drover_worker::{WorkerConfig, run};
use serde_json::{Value, json};
use sqlx::Row;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};

const WAIT: Duration = Duration::from_secs(60);

struct Env {
    conns: Connections,
    ledger: Ledger,
    admin: String,
    db: String,
}

impl Env {
    async fn new() -> Env {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let db = format!("drover_w_{}", &id[..12]);
        let admin = std::env::var("DROVER_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let base = admin
            .rsplit_once('/')
            .map_or(admin.clone(), |(b, _)| b.to_string());
        let amqp = std::env::var("DROVER_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let conns = Connections::resolve(
            Some(amqp),
            Some(format!("{base}/{db}")),
            Some(format!("w-{}", &id[..12])),
            &FileConfig::default(),
        )
        .expect("connections");
        let ledger = Ledger::connect(conns.database_url.expose_secret(), true, 4, WAIT)
            .await
            .expect("ledger");
        ledger.migrate().await.expect("migrate");
        Env {
            conns,
            ledger,
            admin,
            db,
        }
    }

    fn config(&self, dir: &std::path::Path) -> WorkerConfig {
        let mut c = WorkerConfig::new(self.conns.clone());
        c.output_root = dir.to_path_buf();
        c.heartbeat = Duration::from_secs(1);
        c
    }

    /// Records and publishes a `noop` job, as `drover publish` does.
    async fn publish_noop(&self, key: &str, params: Value) {
        let Value::Object(params) = params else {
            panic!("params must be an object")
        };
        let msg = JobMessage::new(key, "noop", params, None, None).expect("message");
        let id = uuid::Uuid::new_v4();
        self.ledger
            .insert_queued(&[NewJob {
                id,
                key: key.into(),
                pipeline: "noop".into(),
                params: Value::Object(msg.params.clone()),
                batch_size: None,
                max_attempts: 3,
                max_attempts_given: true,
                trace_id: None,
            }])
            .await
            .expect("insert");
        let broker = Broker::connect(self.conns.amqp_url.expose_secret(), "engine-test")
            .await
            .expect("broker");
        let topo = Topology::for_connections(&self.conns);
        broker.declare(&topo).await.expect("declare");
        let publisher = broker.publisher(&topo).await.expect("publisher");
        publisher
            .publish_jobs(&[OutgoingJob::new(id, &msg, None)])
            .await
            .expect("publish");
        let _ = broker.close().await;
    }

    async fn row(&self, key: &str) -> sqlx::postgres::PgRow {
        sqlx::query("SELECT * FROM drover.jobs WHERE idempotency_key = $1")
            .bind(key)
            .fetch_one(self.ledger.pool())
            .await
            .expect("job row")
    }

    /// Waits (LISTEN/NOTIFY, re-checking at least every 200 ms) until `cond` holds.
    async fn wait_for(&self, key: &str, cond: impl Fn(&sqlx::postgres::PgRow) -> bool) {
        let mut listener = self.ledger.listener().await.expect("listener");
        listener.listen("drover_jobs").await.expect("listen");
        let deadline = Instant::now() + WAIT;
        loop {
            let row = self.row(key).await;
            if cond(&row) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {key}");
            let _ = timeout(Duration::from_millis(200), listener.recv()).await;
        }
    }

    async fn outcomes(&self, key: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT a.outcome FROM drover.attempts a JOIN drover.jobs j ON j.id = a.job_id \
             WHERE j.idempotency_key = $1 ORDER BY a.attempt",
        )
        .bind(key)
        .fetch_all(self.ledger.pool())
        .await
        .expect("attempts")
    }

    async fn cleanup(self) {
        let conn = lapin::Connection::connect(
            self.conns.amqp_url.expose_secret(),
            lapin::ConnectionProperties::default(),
        )
        .await
        .expect("raw connect");
        let topo = Topology::for_connections(&self.conns);
        if let Ok(ch) = conn.create_channel().await {
            for q in [topo.jobs_queue(), topo.dead_queue(), topo.poison_queue()] {
                let _ = ch.queue_delete(q.into(), Default::default()).await;
            }
            for x in [topo.jobs_exchange(), topo.dead_letter_exchange()] {
                let _ = ch.exchange_delete(x.into(), Default::default()).await;
            }
        }
        let _ = conn.close(200, "OK".into()).await;
        self.ledger.close().await;
        if let Ok(admin) = sqlx::PgPool::connect(&self.admin).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db
            )))
            .execute(&admin)
            .await;
            admin.close().await;
        }
    }
}

/// Shutdown while a job runs: it stops at its next batch boundary, is released to `queued`
/// (attempt `interrupted`, not a failure) and `run` returns; a second worker resumes after
/// the last checkpoint and finishes with every batch counted once.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_at_a_batch_boundary_and_a_new_worker_resumes() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    env.publish_noop("drain-1", json!({"batches": 30, "sleep_ms": 100}))
        .await;
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(run(env.config(dir.path()), Registry::builtin(), async {
        let _ = stopped.await;
    }));
    env.wait_for("drain-1", |r| r.get::<i32, _>("batches_done") >= 3)
        .await;
    stop.send(()).expect("worker alive");
    timeout(WAIT, worker)
        .await
        .expect("drained in time")
        .expect("joined")
        .expect("run ok");
    let row = env.row("drain-1").await;
    assert_eq!(row.get::<String, _>("state"), "queued");
    let done = row.get::<i32, _>("batches_done");
    assert!((3..30).contains(&done), "stopped mid-job, at {done}");
    assert_eq!(env.outcomes("drain-1").await, ["interrupted"]);

    // The message went back to the queue: a new worker resumes and finishes.
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(run(env.config(dir.path()), Registry::builtin(), async {
        let _ = stopped.await;
    }));
    env.wait_for("drain-1", |r| r.get::<String, _>("state") == "succeeded")
        .await;
    let row = env.row("drain-1").await;
    assert_eq!(
        row.get::<i64, _>("rows_done"),
        30,
        "each batch counted once"
    );
    assert_eq!(env.outcomes("drain-1").await, ["interrupted", "succeeded"]);
    stop.send(()).expect("worker alive");
    timeout(WAIT, worker)
        .await
        .expect("stopped in time")
        .expect("joined")
        .expect("run ok");
    env.cleanup().await;
}

/// A batch longer than the grace period: `run` returns when the grace is over, releasing
/// the job back to `queued` instead of waiting for the batch.
#[tokio::test(flavor = "multi_thread")]
async fn grace_expiry_releases_a_job_stuck_in_a_long_batch() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    env.publish_noop("grace-1", json!({"batches": 2, "sleep_ms": 20_000}))
        .await;
    let mut config = env.config(dir.path());
    config.grace = Duration::from_millis(300);
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(run(config, Registry::builtin(), async {
        let _ = stopped.await;
    }));
    env.wait_for("grace-1", |r| r.get::<String, _>("state") == "running")
        .await;
    stop.send(()).expect("worker alive");
    timeout(Duration::from_secs(15), worker)
        .await
        .expect("run returned well before the 20 s batch ended")
        .expect("joined")
        .expect("run ok");
    let row = env.row("grace-1").await;
    assert_eq!(row.get::<String, _>("state"), "queued");
    assert!(row.get::<Option<String>, _>("lease_owner").is_none());
    env.cleanup().await;
}

/// Start-up fails with a clear error when the ledger is not migrated, instead of running.
#[tokio::test(flavor = "multi_thread")]
async fn refuses_to_start_on_an_unmigrated_ledger() {
    let env = Env::new().await;
    sqlx::query("DROP SCHEMA drover CASCADE")
        .execute(env.ledger.pool())
        .await
        .expect("drop schema");
    let dir = tempfile::tempdir().expect("tempdir");
    let err = timeout(
        WAIT,
        run(env.config(dir.path()), Registry::builtin(), async {}),
    )
    .await
    .expect("returned")
    .expect_err("must refuse");
    assert!(err.to_string().contains("drover migrate"), "{err}");
    env.cleanup().await;
}
