//! Test harness: a private database and namespace per test, the real binary, and bounded,
//! event-driven waits.

use lapin::options::{BasicPublishOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{PgPool, Row};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// The binary under test, named by the including test crate (`drover` here, a team's own
/// binary in `examples/`), so one harness serves both.
pub use crate::BIN;

pub fn amqp_url() -> String {
    std::env::var("DROVER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn admin_db_url() -> String {
    std::env::var("DROVER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn db_url_for(name: &str) -> String {
    let admin = admin_db_url();
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_string())
        .unwrap_or(admin);
    format!("{base}/{name}")
}

/// One test's private world. Use it from `#[tokio::test(flavor = "multi_thread")]`: its
/// `Drop` closes the pool from another thread, which a current-thread runtime (blocked in
/// that `Drop`) could not drive, so the test would hang.
pub struct TestEnv {
    pub name: String,
    pub db_url: String,
    pub ns: String,
    pub dir: tempfile::TempDir,
    pub pool: PgPool,
    workers: Vec<Worker>,
}

impl TestEnv {
    /// Creates the database, migrates it with `drover migrate`.
    pub async fn new() -> TestEnv {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("drover_t_{}", &id[..12]);
        let db_url = db_url_for(&name);
        let dir = tempfile::tempdir().expect("tempdir");
        let ns = format!("t-{}", &id[..12]);
        let out = run_bounded(
            base_command(&["migrate"], dir.path(), &db_url, &ns),
            Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&db_url)
            .await
            .expect("connect test db");
        TestEnv {
            name,
            db_url,
            ns,
            dir,
            pool,
            workers: Vec::new(),
        }
    }

    /// A `drover` command with this test's database, broker namespace and directory.
    pub fn command(&self, args: &[&str]) -> Command {
        base_command(args, self.dir.path(), &self.db_url, &self.ns)
    }

    /// Runs `drover args...` to completion (bounded by 120 s).
    pub fn drover(&self, args: &[&str]) -> Output {
        run_bounded(self.command(args), Duration::from_secs(120))
    }

    /// `drover publish --pipeline noop --key KEY ARGS...`, which must succeed.
    pub fn publish_noop(&self, key: &str, args: &[&str]) {
        let mut full = vec!["publish", "--pipeline", "noop", "--key", key];
        full.extend_from_slice(args);
        let out = self.drover(&full);
        assert!(out.status.success(), "publish {key}: {}", stderr(&out));
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `drover.toml` in the working directory (read by every command).
    pub fn write_config(&self, toml: &str) {
        std::fs::write(self.path("drover.toml"), toml).expect("write drover.toml");
    }

    /// Starts a worker and waits until it consumes.
    pub fn start_worker(&mut self, args: &[&str]) -> usize {
        let mut full = vec!["worker"];
        full.extend_from_slice(args);
        let w = Worker::spawn(self.command(&full));
        w.wait_log("\"consuming\"", Duration::from_secs(60));
        self.workers.push(w);
        self.workers.len() - 1
    }

    pub fn worker(&mut self, i: usize) -> &mut Worker {
        &mut self.workers[i]
    }

    /// Publishes a raw body to `{ns}.jobs` through the default exchange, like a producer in
    /// another language would.
    pub async fn publish_raw(&self, body: &[u8], message_id: Option<&str>) {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("amqp connect");
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(Default::default())
            .await
            .expect("confirm");
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        ch.basic_publish(
            "".into(),
            format!("{}.jobs", self.ns).as_str().into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
        let _ = conn.close(200, "bye".into()).await;
    }

    /// Messages ready in `{ns}.jobs` (a passive declare; delivered, unacked ones not counted).
    pub async fn jobs_ready(&self) -> u32 {
        self.jobs_depth().await.0
    }

    /// `(ready messages, consumers)` of `{ns}.jobs`, from a passive declare.
    pub async fn jobs_depth(&self) -> (u32, u32) {
        self.queue_depth("jobs").await
    }

    /// `(ready messages, consumers)` of `{ns}.{suffix}` (`jobs`, `dead`, `poison`), from a
    /// passive declare.
    pub async fn queue_depth(&self, suffix: &str) -> (u32, u32) {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("amqp connect");
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                format!("{}.{suffix}", self.ns).as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .expect("passive declare");
        let _ = conn.close(200, "bye".into()).await;
        (q.message_count(), q.consumer_count())
    }

    /// Purges `{ns}.jobs`, as an operator (or an accident) would; returns how many went.
    pub async fn purge_jobs(&self) -> u32 {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("amqp connect");
        let ch = conn.create_channel().await.expect("channel");
        let n = ch
            .queue_purge(
                format!("{}.jobs", self.ns).as_str().into(),
                Default::default(),
            )
            .await
            .expect("purge");
        let _ = conn.close(200, "bye".into()).await;
        n
    }

    /// Count of messages waiting in `{ns}.dead`, with their `x-drover-reason` headers.
    pub async fn dead_letters(&self) -> Vec<String> {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("amqp connect");
        let ch = conn.create_channel().await.expect("channel");
        let mut reasons = Vec::new();
        while let Some(msg) = ch
            .basic_get(
                format!("{}.dead", self.ns).as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic_get")
        {
            let reason = msg
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-drover-reason").cloned())
                .map(|v| match v {
                    lapin::types::AMQPValue::LongString(s) => s.to_string(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            reasons.push(reason);
        }
        let _ = conn.close(200, "bye".into()).await;
        reasons
    }

    /// A job's row as `drover jobs show --json` prints it.
    pub fn show(&self, key: &str) -> Value {
        let out = self.drover(&["jobs", "show", key, "--json"]);
        assert!(
            out.status.success(),
            "show {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("show --json is JSON")
    }

    /// Waits (LISTEN/NOTIFY, re-checking on every notification and at least every second)
    /// until `cond` holds for the job's row, bounded by `timeout`.
    pub async fn wait_job(
        &self,
        key: &str,
        timeout: Duration,
        cond: impl Fn(&sqlx::postgres::PgRow) -> bool,
    ) -> sqlx::postgres::PgRow {
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .expect("listener");
        listener.listen("drover_jobs").await.expect("listen");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(row) = sqlx::query("SELECT * FROM drover.jobs WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .expect("select job")
                && cond(&row)
            {
                return row;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for job {key}: {:?}",
                self.show_opt(key)
            );
            let _ = tokio::time::timeout(
                (deadline - now).min(Duration::from_secs(1)),
                listener.recv(),
            )
            .await;
        }
    }

    fn show_opt(&self, key: &str) -> Option<Value> {
        let out = self.drover(&["jobs", "show", key, "--json"]);
        serde_json::from_slice(&out.stdout).ok()
    }

    pub async fn state(&self, key: &str) -> Option<String> {
        sqlx::query("SELECT state FROM drover.jobs WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .expect("select")
            .map(|r| r.get::<String, _>("state"))
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.kill();
        }
        let name = self.name.clone();
        let ns = self.ns.clone();
        let pool = self.pool.clone();
        // Drop runs inside a test's runtime; clean up on a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            rt.block_on(async move {
                pool.close().await;
                if let Ok(admin) = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&admin_db_url())
                    .await
                {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&admin)
                    .await;
                    admin.close().await;
                }
                if let Ok(conn) =
                    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
                    && let Ok(ch) = conn.create_channel().await
                {
                    for q in [
                        format!("{ns}.jobs"),
                        format!("{ns}.dead"),
                        format!("{ns}.poison"),
                    ] {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                    for x in [ns.clone(), format!("{ns}.dlx")] {
                        let _ = ch
                            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                    let _ = conn.close(200, "bye".into()).await;
                }
            });
        })
        .join();
    }
}

/// A `drover` command pointed at one database, namespace and working directory. Workers
/// get a free metrics port so tests can run side by side.
fn base_command(args: &[&str], dir: &Path, db_url: &str, ns: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .current_dir(dir)
        .env("DATABASE_URL", db_url)
        .env("DROVER_AMQP_URL", amqp_url())
        .env("DROVER_NAMESPACE", ns)
        .env("DROVER_LOG_FORMAT", "json")
        .env("DROVER_METRICS_ADDR", "127.0.0.1:0")
        .env_remove("DROVER_CONFIG")
        .env_remove("TRACEPARENT")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null());
    c
}

/// Runs a command with a deadline; panics if it does not finish.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn drover");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("command did not finish within {timeout:?}: {cmd:?}");
        }
    }
}

/// A worker process whose stderr (JSON logs) is collected line by line.
pub struct Worker {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    rx: mpsc::Receiver<String>,
}

impl Worker {
    pub fn spawn(mut cmd: Command) -> Worker {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn worker");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut v) = sink.lock() {
                    v.push(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        Worker {
            child: Some(child),
            lines,
            rx,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits for a log line containing `needle` (already seen, or arriving before the timeout).
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        if let Some(l) = self
            .lines
            .lock()
            .expect("lines")
            .iter()
            .find(|l| l.contains(needle))
        {
            return l.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "no log line with {needle:?} within {timeout:?}; log:\n{}",
                    self.log()
                ),
            }
        }
    }

    pub fn log(&self) -> String {
        self.lines.lock().map(|v| v.join("\n")).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, bounded.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit within {timeout:?}; log:\n{}",
                self.log()
            );
            // Polling a child's exit status has no event to await in std.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `outcome` of each attempt in a `jobs show --json` document, oldest first.
/// `(worker, outcome)` of each attempt in `jobs show --json` output, oldest first.
pub fn workers_and_outcomes(job: &Value) -> Vec<(String, String)> {
    job["attempt_history"]
        .as_array()
        .expect("attempt_history is an array")
        .iter()
        .map(|a| {
            (
                a["worker"].as_str().unwrap_or("").to_string(),
                a["outcome"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

pub fn outcomes(job: &Value) -> Vec<String> {
    job["attempt_history"]
        .as_array()
        .expect("attempt_history is an array")
        .iter()
        .map(|a| a["outcome"].as_str().unwrap_or("").to_string())
        .collect()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes a small payroll input with the binary's generator.
pub fn generate(env: &TestEnv, rows: u64, file: &str) -> PathBuf {
    generate_with(env, rows, file, &[])
}

/// Writes a payroll input with `seed` (same rows and columns for every seed).
pub fn generate_seeded(env: &TestEnv, rows: u64, file: &str, seed: u64) -> PathBuf {
    generate_with(env, rows, file, &["--seed", &seed.to_string()])
}

fn generate_with(env: &TestEnv, rows: u64, file: &str, extra: &[&str]) -> PathBuf {
    let path = env.path(file);
    let rows = rows.to_string();
    let mut args = vec![
        "demo", "generate", "--rows", &rows, "--client", "acme", "--period", "2026-11",
    ];
    args.extend_from_slice(extra);
    args.extend(["--out", path.to_str().expect("utf8 path")]);
    let out = env.drover(&args);
    assert!(out.status.success(), "generate: {}", stderr(&out));
    path
}

/// A plain HTTP/1.0 GET; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (status, text) = http_request(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    );
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Sends `request` (a whole HTTP/1.0 request) to `addr`; returns the status and the whole
/// response, headers included.
pub fn http_request(addr: &str, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect http port");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}
