//! Beyond one machine (issue 15): a three-node RabbitMQ cluster on this machine, the jobs
//! queue a quorum queue on all three, and a worker given the three addresses that keeps
//! running jobs while the node it is connected to is stopped and started again.
//!
//! The nodes are private (`scripts/rabbitmq-node.sh`: names `cluster1..3@localhost`, AMQP
//! ports 5731-5733), so the shared broker on 5672 is never touched; Postgres is the shared
//! one, with this test's own database. `#[ignore]`d because starting three nodes takes
//! about half a minute: `make test-cluster` runs it (`--ignored`), and `.ci/run` runs that
//! after `make test`. The nodes are stopped and their data deleted when the test ends,
//! passed or failed (`Cluster`'s `Drop`).

use crate::support::*;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Node names and AMQP ports (the range 5731-5739 is this test's).
const NODES: [(&str, u16); 3] = [("cluster1", 5731), ("cluster2", 5732), ("cluster3", 5733)];
/// Bound of every wait on a job, a log line or a node.
const T: Duration = Duration::from_secs(180);
/// The longest a worker may go without a consumer after losing its node: the broker's
/// connection close, the jittered backoff's first steps, a connect to the next node and a
/// quorum leader election (a few seconds) fit well within it; a worker stuck retrying the
/// stopped node (or stopped) would not.
const MAX_GAP: Duration = Duration::from_secs(30);

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/rabbitmq-node.sh")
}

fn node_script(args: &[&str]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(script()).args(args);
    run_bounded(cmd, T)
}

fn node_script_ok(args: &[&str]) -> String {
    let out = node_script(args);
    assert!(
        out.status.success(),
        "rabbitmq-node.sh {args:?} failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// The three private nodes, clustered. Dropping it stops them and deletes their data.
struct Cluster;

impl Cluster {
    fn start() -> Cluster {
        // The guard exists before the first node starts, so a failure below still stops
        // whatever did start; a previous run killed before its clean-up leaves nothing
        // behind either (`stop` is a no-op for a node that is not there).
        let cluster = Cluster;
        for (name, _) in NODES {
            node_script(&["stop", name]);
        }
        let starts: Vec<_> = NODES
            .iter()
            .map(|&(name, port)| {
                std::thread::spawn(move || node_script(&["start", name, &port.to_string()]))
            })
            .collect();
        for (start, (name, _)) in starts.into_iter().zip(NODES) {
            let out = start.join().expect("start thread");
            assert!(out.status.success(), "{name}: {}", stderr(&out));
        }
        let seed = format!("{}@localhost", NODES[0].0);
        for (name, _) in &NODES[1..] {
            node_script_ok(&["ctl", name, "stop_app"]);
            node_script_ok(&["ctl", name, "join_cluster", &seed]);
            node_script_ok(&["ctl", name, "start_app"]);
        }
        cluster.await_running(3);
        cluster
    }

    /// Every node's address, as an operator gives them to a worker.
    fn addresses(&self) -> String {
        NODES.map(|(_, port)| url(port)).join(",")
    }

    /// `rabbitmqctl ARGS` against the first node that is up (all three are cluster peers).
    fn ctl_json(&self, via: &str, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["ctl", via];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--formatter", "json"]);
        let text = node_script_ok(&full);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    /// Waits (bounded) until `n` nodes run RabbitMQ, asked of a node known to be up.
    fn await_running(&self, n: usize) {
        let via = NODES[0].0;
        let out = node_script_ok(&[
            "ctl",
            via,
            "await_online_nodes",
            &n.to_string(),
            "--timeout",
            &T.as_secs().to_string(),
        ]);
        let status = self.ctl_json(via, &["cluster_status"]);
        let running = status["running_nodes"].as_array().map_or(0, Vec::len);
        assert_eq!(running, n, "after await_online_nodes: {out}\n{status}");
    }

    /// Stops node `name` (the whole Erlang node, as a crash or an upgrade would), keeping
    /// its data so it rejoins the cluster when started again.
    fn stop_node(&self, name: &str) {
        let base =
            std::env::var("DROVER_RABBIT_NODES").unwrap_or_else(|_| "/tmp/drover-rabbit".into());
        let pid_file = format!("{base}/{name}/pid");
        node_script_ok(&["ctl", name, "stop", &pid_file]);
    }

    fn start_node(&self, name: &str, port: u16) {
        node_script_ok(&["start", name, &port.to_string()]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (name, _) in NODES {
            let out = node_script(&["stop", name]);
            if !out.status.success() {
                eprintln!("stopping {name}: {}", stderr(&out));
            }
        }
    }
}

/// A worker killed when the test ends, whatever happens (the harness's `Worker` is not).
struct Running(Worker);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.kill();
    }
}

/// `drover publish --file` of `n` noop jobs through the cluster's addresses.
fn publish(env: &TestEnv, addresses: &str, prefix: &str, n: usize, params: &str) -> Vec<String> {
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let lines: String = keys
        .iter()
        .map(|k| {
            format!("{{\"v\":1,\"idempotency_key\":\"{k}\",\"pipeline\":\"noop\",\"params\":{params}}}\n")
        })
        .collect();
    let file = format!("{prefix}.jsonl");
    std::fs::write(env.path(&file), lines).expect("write jobs");
    let mut cmd = env.command(&["publish", "--file", &file]);
    cmd.env("DROVER_AMQP_URL", addresses);
    let out = run_bounded(cmd, T);
    assert!(out.status.success(), "publish {prefix}: {}", stderr(&out));
    keys
}

/// `drover jobs wait KEYS...` (bounded); every job must succeed.
fn wait_all(env: &TestEnv, keys: &[String]) {
    let mut args = vec!["jobs", "wait", "--timeout", "180"];
    args.extend(keys.iter().map(String::as_str));
    let out = env.drover(&args);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

/// Which node (of `NODES`) a log line names as its endpoint.
fn node_of(line: &str) -> usize {
    NODES
        .iter()
        .position(|(_, port)| line.contains(&format!("127.0.0.1:{port} ")))
        .unwrap_or_else(|| panic!("no cluster node named in {line}"))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "starts three RabbitMQ nodes (about 30 s); run by make test-cluster"]
async fn worker_fails_over_when_its_node_stops_and_every_job_succeeds_once() {
    let cluster = Cluster::start();
    let addresses = cluster.addresses();
    let env = TestEnv::new().await;

    let mut cmd = env.command(&["worker", "--prefetch", "4"]);
    cmd.env("DROVER_AMQP_URL", &addresses);
    let worker = Running(Worker::spawn(cmd));
    let w = &worker.0;
    let first = w.wait_log("\"consuming\"", T);
    let on = node_of(&first);
    assert!(
        !w.log().contains("guest:guest"),
        "a password was logged:\n{}",
        w.log()
    );

    // The worker declared the jobs queue: a quorum queue with a member on every node.
    let queues = cluster.ctl_json(
        NODES[0].0,
        &["list_queues", "name", "type", "members", "online"],
    );
    let jobs = format!("{}.jobs", env.ns);
    let q = queues
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["name"] == jobs.as_str()))
        .unwrap_or_else(|| panic!("{jobs} not among {queues}"));
    assert_eq!(q["type"], "quorum", "{q}");
    for (name, _) in NODES {
        let member = format!("{name}@localhost");
        for column in ["members", "online"] {
            let has = q[column]
                .as_array()
                .is_some_and(|m| m.iter().any(|n| n == member.as_str()));
            assert!(has, "{member} not in {column} of {q}");
        }
    }

    // Jobs of 8 batches of 150 ms at prefetch 4: the node stops with jobs in flight.
    let params = r#"{"sleep_ms":150,"batches":8}"#;
    let mut keys = publish(&env, &addresses, "before", 16, params);
    env.wait_job(&keys[0], T, |r| {
        sqlx::Row::get::<String, _>(r, "state") == "succeeded"
    })
    .await;

    // Stop the node the worker is on. The gap counts from before the stop command, so it
    // includes the node's own shutdown.
    let (stopped, port) = NODES[on];
    let stop_started = Instant::now();
    cluster.stop_node(stopped);
    w.wait_log("failing over to the next broker node", T);
    let again = w.wait_log("\"reconnects\":1", T);
    let gap = stop_started.elapsed();
    assert!(
        gap < MAX_GAP,
        "no consumer for {gap:?} after the node stopped:\n{}",
        w.log()
    );
    let now_on = node_of(&again);
    assert_ne!(now_on, on, "still on the stopped node: {again}");
    eprintln!(
        "worker was on {}, consuming again on {} {gap:?} after the stop began",
        NODES[on].0, NODES[now_on].0
    );

    // While the node is down: new jobs are published (through the nodes still up) and run.
    let during = publish(&env, &addresses, "during", 8, params);
    wait_all(&env, &during);
    keys.extend(during);

    cluster.start_node(stopped, port);
    cluster.await_running(3);
    let after = publish(&env, &addresses, "after", 8, params);
    keys.extend(after);
    wait_all(&env, &keys);

    // Every job succeeded exactly once: one succeeded attempt each, nothing failed, and its
    // rows (one per batch) counted once.
    let per_job: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT j.idempotency_key, j.state::text, j.rows_done, \
                count(*) FILTER (WHERE a.outcome = 'succeeded') \
           FROM drover.jobs j LEFT JOIN drover.attempts a ON a.job_id = j.id \
          GROUP BY j.id ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .expect("per job");
    assert_eq!(per_job.len(), keys.len(), "{per_job:?}");
    for (key, state, rows, succeeded) in &per_job {
        assert_eq!(state, "succeeded", "{key}: {per_job:?}");
        assert_eq!(*succeeded, 1, "{key} succeeded {succeeded} times");
        assert_eq!(*rows, 8, "{key} counted {rows} rows");
    }
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM drover.attempts WHERE outcome NOT IN ('succeeded', 'lost', 'interrupted')",
    )
    .fetch_one(&env.pool)
    .await
    .expect("failed attempts");
    assert_eq!(failed, 0);

    // The worker never stopped: it is still consuming, and drains cleanly.
    assert!(!w.log().contains("worker stopped"), "{}", w.log());
    let mut worker = worker;
    worker.0.signal("-TERM");
    let status = worker.0.wait_exit(T);
    assert!(
        status.success(),
        "worker exit: {status:?}\n{}",
        worker.0.log()
    );
    drop(env);
    drop(cluster);
}
