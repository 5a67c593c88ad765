//! Production security (docs/security.md): TLS to Postgres and RabbitMQ, credentials from
//! files that never show up in what drover prints, least-privilege Postgres roles and
//! RabbitMQ permissions.
//!
//! The RabbitMQ tests run a private node each (scripts/rabbitmq-node.sh, ports 5711-5719
//! and 5761, names `security-*`), stopped and deleted when the test ends; the shared
//! broker's users and settings are never touched. Postgres login roles are created per test
//! with unique names and dropped after the test's database; the TLS-only end-to-end test
//! runs a private Postgres cluster (scripts/postgres-node.sh, port 5751) instead.

use crate::support::*;
use lapin::options::{BasicConsumeOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
/// The local Postgres' certificate (Debian's self-signed "snakeoil"): its own root.
const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/rabbitmq-node.sh")
}

/// A private RabbitMQ node; stopped (and its data deleted) on drop.
struct Node {
    name: String,
}

impl Node {
    fn start(name: &str, port: u16, conf: Option<&Path>) -> Node {
        let mut c = Command::new(script());
        c.args(["start", name, &port.to_string()]);
        if let Some(conf) = conf {
            c.arg(conf);
        }
        let node = Node {
            name: name.to_string(),
        };
        let out = run_bounded(c, Duration::from_secs(180));
        assert!(out.status.success(), "start {name}: {}", stderr(&out));
        node
    }

    fn ctl(&self, args: &[&str]) {
        let mut c = Command::new(script());
        c.args(["ctl", &self.name]).args(args);
        let out = run_bounded(c, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            stderr(&out)
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let mut c = Command::new(script());
        c.args(["stop", &self.name]);
        let _ = run_bounded(c, Duration::from_secs(120));
    }
}

/// A process killed on drop, so a failing assertion leaves nothing running.
struct Proc(Worker);

impl Drop for Proc {
    fn drop(&mut self) {
        self.0.kill();
    }
}

fn openssl(args: &[&str]) {
    let out = run_bounded(
        {
            let mut c = Command::new("openssl");
            c.args(args);
            c
        },
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
}

/// A CA (`{prefix}ca.pem`), and certificates it signs for the server (127.0.0.1) and a
/// client; every file readable by the rabbitmq user that runs the node.
fn make_certs(dir: &Path, prefix: &str) {
    let p = |f: &str| dir.join(format!("{prefix}{f}")).display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN=drover test CA {prefix}"),
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    for (who, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(
            p(&format!("{who}.ext")),
            format!("basicConstraints=CA:FALSE\n{ext}"),
        )
        .expect("write ext");
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN=drover-{who}"),
            "-keyout",
            &p(&format!("{who}.key")),
            "-out",
            &p(&format!("{who}.csr")),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(&format!("{who}.csr")),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p(&format!("{who}.ext")),
            "-out",
            &p(&format!("{who}.pem")),
        ]);
    }
    let chmod = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(dir)
        .status()
        .expect("chmod");
    assert!(chmod.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_tls_require_verify_ca_and_a_wrong_ca() {
    let env = TestEnv::new().await;
    let with = |query: &str| format!("{}?{query}", env.db_url);

    let require = with("sslmode=require");
    let out = run_bounded(
        {
            let mut c = env.command(&["jobs", "list"]);
            c.env("DATABASE_URL", &require);
            c
        },
        T,
    );
    assert!(out.status.success(), "sslmode=require: {}", stderr(&out));

    // verify-ca: a worker and a producer run a job over verified TLS.
    let verify_ca = with(&format!("sslmode=verify-ca&sslrootcert={SNAKEOIL}"));
    let worker = Proc(Worker::spawn({
        let mut c = env.command(&["worker"]);
        c.env("DATABASE_URL", &verify_ca);
        c
    }));
    worker.0.wait_log("\"consuming\"", T);
    let out = run_bounded(
        {
            let mut c = env.command(&["publish", "--pipeline", "noop", "--key", "tls-pg-1"]);
            c.env("DATABASE_URL", &verify_ca);
            c
        },
        T,
    );
    assert!(
        out.status.success(),
        "publish over verify-ca: {}",
        stderr(&out)
    );
    env.wait_job("tls-pg-1", T, |r| {
        sqlx::Row::get::<String, _>(r, "state") == "succeeded"
    })
    .await;
    // Every session of the worker's is encrypted (pg_stat_ssl), as this one's is.
    let (ssl, all): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) WHERE a.datname = current_database()",
    )
    .fetch_one(&env.pool)
    .await
    .expect("pg_stat_ssl");
    assert!(all > 1 && ssl == all, "{ssl} of {all} sessions use TLS");

    // A CA that did not sign the server's certificate is refused, with the reason.
    make_certs(env.dir.path(), "other-");
    let wrong = with(&format!(
        "sslmode=verify-ca&sslrootcert={}",
        env.path("other-ca.pem").display()
    ));
    let out = run_bounded(
        {
            let mut c = env.command(&["jobs", "list"]);
            c.env("DATABASE_URL", &wrong);
            c
        },
        T,
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "a wrong CA was accepted");
    assert!(
        err.contains("cannot connect to Postgres") && err.contains("certificate"),
        "{err}"
    );

    // verify-full also checks the name: the snakeoil certificate is not for 127.0.0.1.
    let full = with(&format!("sslmode=verify-full&sslrootcert={SNAKEOIL}"));
    let out = run_bounded(
        {
            let mut c = env.command(&["jobs", "list"]);
            c.env("DATABASE_URL", &full);
            c
        },
        T,
    );
    assert!(
        !out.status.success(),
        "verify-full accepted a certificate for another name"
    );
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn amqps_with_a_client_certificate_runs_a_job_and_a_wrong_ca_is_refused() {
    let env = TestEnv::new().await;
    let certs = tempfile::tempdir().expect("tempdir");
    make_certs(certs.path(), "");
    make_certs(certs.path(), "other-");
    let c = |f: &str| certs.path().join(f).display().to_string();
    let conf = certs.path().join("tls.conf");
    std::fs::write(
        &conf,
        format!(
            "listeners.ssl.default = 127.0.0.1:5712\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n",
            c("ca.pem"),
            c("server.pem"),
            c("server.key")
        ),
    )
    .expect("write tls.conf");
    let _node = Node::start("security-tls", 5711, Some(&conf));

    let url = format!(
        "amqps://guest:guest@127.0.0.1:5712/%2f?cacertfile={}&certfile={}&keyfile={}",
        c("ca.pem"),
        c("client.pem"),
        c("client.key")
    );
    let worker = Proc(Worker::spawn({
        let mut cmd = env.command(&["worker"]);
        cmd.env("DROVER_AMQP_URL", &url);
        cmd
    }));
    let line = worker.0.wait_log("connected to RabbitMQ", T);
    assert!(
        line.contains("127.0.0.1:5712") && line.contains("TLS"),
        "{line}"
    );
    worker.0.wait_log("\"consuming\"", T);
    let out = run_bounded(
        {
            let mut cmd = env.command(&["publish", "--pipeline", "noop", "--key", "tls-amqp-1"]);
            cmd.env("DROVER_AMQP_URL", &url);
            cmd
        },
        T,
    );
    assert!(out.status.success(), "publish over amqps: {}", stderr(&out));
    env.wait_job("tls-amqp-1", T, |r| {
        sqlx::Row::get::<String, _>(r, "state") == "succeeded"
    })
    .await;

    let refused = |url: String| {
        let out = run_bounded(
            {
                let mut cmd = env.command(&["publish", "--pipeline", "noop", "--key", "never"]);
                cmd.env("DROVER_AMQP_URL", url);
                cmd
            },
            T,
        );
        assert!(!out.status.success(), "publish succeeded");
        stderr(&out)
    };
    // The server's certificate is not signed by the CA given: refused, saying why.
    let err = refused(format!(
        "amqps://guest:guest@127.0.0.1:5712/%2f?cacertfile={}&certfile={}&keyfile={}",
        c("other-ca.pem"),
        c("client.pem"),
        c("client.key")
    ));
    assert!(
        err.contains("cannot connect to RabbitMQ at 127.0.0.1:5712") && err.contains("certificate"),
        "{err}"
    );
    assert!(!err.contains("guest:guest"), "{err}");
    // Without a client certificate the broker (fail_if_no_peer_cert) refuses.
    let err = refused(format!(
        "amqps://guest:guest@127.0.0.1:5712/%2f?cacertfile={}",
        c("ca.pem")
    ));
    assert!(
        err.contains("cannot connect to RabbitMQ at 127.0.0.1:5712"),
        "{err}"
    );
    // A CA file that is not there is named.
    let err = refused(format!(
        "amqps://guest:guest@127.0.0.1:5712/%2f?cacertfile={}",
        c("absent.pem")
    ));
    assert!(
        err.contains("cacertfile") && err.contains("absent.pem"),
        "{err}"
    );
}

/// Drops the test's login and group roles, after its database (declared before the
/// `TestEnv`, so dropped after it).
struct Roles(Vec<String>);

impl Drop for Roles {
    fn drop(&mut self) {
        let roles = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            rt.block_on(async move {
                if let Ok(admin) = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&admin_db_url())
                    .await
                {
                    for r in roles {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP ROLE IF EXISTS \"{r}\""
                        )))
                        .execute(&admin)
                        .await;
                    }
                    admin.close().await;
                }
            });
        })
        .join();
    }
}

/// A producer's account may publish but not consume: `basic.consume` on `queue` is refused.
async fn assert_consume_refused(conn: &Connection, queue: &str) {
    let ch = conn.create_channel().await.expect("channel");
    let e = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("a producer could consume");
    assert!(e.to_string().contains("ACCESS_REFUSED"), "{e}");
}

/// `drover ARGS` with its Postgres and RabbitMQ URLs only in the files `NAME.database-url`
/// and `NAME.amqp-url` (written here), as Kubernetes and systemd mount them.
fn with_url_files(
    env: &TestEnv,
    name: &str,
    db_url: String,
    amqp_url: String,
    args: &[&str],
) -> Command {
    let db = env.path(&format!("{name}.database-url"));
    let amqp = env.path(&format!("{name}.amqp-url"));
    std::fs::write(&db, db_url + "\n").expect("write url file");
    std::fs::write(&amqp, amqp_url + "\n").expect("write url file");
    let mut c = env.command(args);
    c.env_remove("DATABASE_URL")
        .env_remove("DROVER_AMQP_URL")
        .env("DATABASE_URL_FILE", db)
        .env("DROVER_AMQP_URL_FILE", amqp);
    c
}

/// Runs `cmd` (bounded by [`T`]) and appends what it printed to `printed`, which the tests
/// search for passwords at the end.
fn run_recorded(cmd: Command, printed: &mut String) -> std::process::Output {
    let out = run_bounded(cmd, T);
    printed.push_str(&stdout(&out));
    printed.push_str(&stderr(&out));
    out
}

fn url_with_user(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("scheme");
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{user}:{password}@{host}")
}

#[tokio::test(flavor = "multi_thread")]
async fn least_privilege_accounts_from_files_run_everything_and_never_show_a_password() {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let group = |part: &str| format!("sec_{id}_{part}");
    let login = |part: &str| format!("sec_{id}_{part}_login");
    let _roles = Roles(
        ["worker", "producer", "dashboard", "other"]
            .iter()
            .flat_map(|p| [login(p), group(p)])
            .collect(),
    );
    let env = TestEnv::new().await;
    let pg_pass = format!("PgPw-{id}-Zq7");
    let mq_pass = format!("MqPw-{id}-Xk4");

    // Postgres: the three group roles, and a login in each (plus a second producer).
    let out = env.drover(&[
        "migrate",
        "--roles",
        "--worker-role",
        &group("worker"),
        "--producer-role",
        &group("producer"),
        "--dashboard-role",
        &group("dashboard"),
    ]);
    assert!(out.status.success(), "migrate --roles: {}", stderr(&out));
    for (l, g) in [
        ("worker", "worker"),
        ("producer", "producer"),
        ("dashboard", "dashboard"),
        ("other", "producer"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE \"{}\" LOGIN PASSWORD '{pg_pass}' IN ROLE \"{}\"",
            login(l),
            group(g)
        )))
        .execute(&env.pool)
        .await
        .expect("create login role");
    }

    // RabbitMQ: a vhost of drover's own; an administrator declares the topology, the worker
    // and the producer get only what they need.
    let node = Node::start("security-perm", 5713, None);
    let vhost = "drover-sec";
    node.ctl(&["add_vhost", vhost]);
    let ns = &env.ns;
    let own = format!("^{}(\\.(jobs|dead|dlx|poison))?$", ns.replace('.', "\\."));
    let worker_queues = format!("^{}\\.(jobs|poison)$", ns.replace('.', "\\."));
    for (user, conf, write, read) in [
        ("admin", own.as_str(), own.as_str(), own.as_str()),
        ("worker", "^$", "^amq\\.default$", worker_queues.as_str()),
        ("producer", "^$", "^amq\\.default$", "^$"),
        ("dashboard", "^$", "^$", "^$"),
    ] {
        node.ctl(&["add_user", user, &mq_pass]);
        node.ctl(&["set_permissions", "-p", vhost, user, conf, write, read]);
    }
    let mq = |user: &str| format!("amqp://{user}:{mq_pass}@127.0.0.1:5713/{vhost}");
    let out = run_bounded(
        {
            let mut c = env.command(&["migrate", "--broker"]);
            c.env("DROVER_AMQP_URL", mq("admin"));
            c
        },
        T,
    );
    assert!(out.status.success(), "migrate --broker: {}", stderr(&out));

    // Every credential from a file, as Kubernetes and systemd mount them.
    let as_ = |part: &str, mq_user: &str, args: &[&str]| {
        let db_url = url_with_user(&env.db_url, &login(part), &pg_pass);
        with_url_files(&env, part, db_url, mq(mq_user), args)
    };
    let mut printed = String::new();
    let mut run = |cmd: Command| run_recorded(cmd, &mut printed);

    let worker = Proc(Worker::spawn(as_("worker", "worker", &["worker"])));
    worker.0.wait_log("\"consuming\"", T);
    // The poison queue too: declared by the administrator, readable by the worker.
    worker
        .0
        .wait_log("consuming messages dead-lettered at the delivery limit", T);
    let out = run(as_(
        "producer",
        "producer",
        &["publish", "--pipeline", "noop", "--key", "sec-1"],
    ));
    assert!(
        out.status.success(),
        "publish as producer: {}",
        stderr(&out)
    );
    let out = run(as_(
        "producer",
        "producer",
        &["jobs", "wait", "sec-1", "--timeout", "60"],
    ));
    assert!(
        out.status.success(),
        "jobs wait as producer: {}",
        stderr(&out)
    );
    let out = run(as_(
        "worker",
        "worker",
        &["jobs", "show", "sec-1", "--json"],
    ));
    assert!(out.status.success(), "jobs show: {}", stderr(&out));
    let shown: Value = serde_json::from_slice(&out.stdout).expect("show --json");
    assert_eq!(shown["state"], "succeeded", "{shown}");

    // The dashboard, read-only, and the worker's /metrics.
    let dash = Proc(Worker::spawn(as_(
        "dashboard",
        "dashboard",
        &["dashboard", "--addr", "127.0.0.1:0"],
    )));
    let line = dash.0.wait_log("dashboard listening", T);
    let v: Value = serde_json::from_str(&line).expect("JSON log line");
    let addr = v["addr"]
        .as_str()
        .or_else(|| v["fields"]["addr"].as_str())
        .unwrap_or_else(|| panic!("no addr in {line}"))
        .to_string();
    for path in [
        "/",
        "/jobs",
        "/jobs/sec-1",
        "/api/jobs",
        "/api/jobs/sec-1",
        "/api/overview",
    ] {
        let (status, body) = http_get(&addr, path);
        assert_eq!(status, 200, "dashboard {path}: {body}");
        printed.push_str(&body);
    }
    let line = worker.0.wait_log("serving /healthz", T);
    let v: Value = serde_json::from_str(&line).expect("json log line");
    let maddr = v["addr"].as_str().expect("addr field").to_string();
    let (status, metrics) = http_get(&maddr, "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("drover_"), "{metrics}");
    printed.push_str(&metrics);

    // A producer: only enqueue and its own jobs.
    let producer = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url_with_user(&env.db_url, &login("producer"), &pg_pass))
        .await
        .expect("connect as producer");
    let other = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url_with_user(&env.db_url, &login("other"), &pg_pass))
        .await
        .expect("connect as the other producer");
    let enqueued: bool = sqlx::query_scalar("SELECT drover.enqueue('sec-other', 'noop')")
        .fetch_one(&other)
        .await
        .expect("enqueue as the other producer");
    assert!(enqueued);
    let mine: Vec<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM drover.jobs ORDER BY 1")
            .fetch_all(&producer)
            .await
            .expect("a producer reads its jobs");
    assert_eq!(
        mine,
        ["sec-1"],
        "a producer sees only the jobs it submitted"
    );
    for (what, sql) in [
        ("read attempts", "SELECT count(*) FROM drover.attempts"),
        (
            "read checkpoints",
            "SELECT count(*) FROM drover.checkpoints",
        ),
        (
            "change a job's state",
            "UPDATE drover.jobs SET state = 'cancelled'",
        ),
        ("delete jobs", "DELETE FROM drover.jobs"),
        (
            "insert a job directly",
            "INSERT INTO drover.jobs (id, idempotency_key, pipeline, state, max_attempts) VALUES (gen_random_uuid(), 'x', 'noop', 'queued', 1)",
        ),
        ("create a table", "CREATE TABLE drover.mine (x int)"),
    ] {
        let e = sqlx::query(sql)
            .execute(&producer)
            .await
            .expect_err(&format!("a producer could {what}"));
        assert!(e.to_string().contains("permission denied"), "{what}: {e}");
    }
    // The worker has DML but no DDL.
    let w = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url_with_user(&env.db_url, &login("worker"), &pg_pass))
        .await
        .expect("connect as worker");
    let e = sqlx::query("ALTER TABLE drover.jobs ADD COLUMN x int")
        .execute(&w)
        .await
        .expect_err("a worker could alter a table");
    assert!(
        e.to_string().contains("owner") || e.to_string().contains("permission"),
        "{e}"
    );
    // The read-only dashboard cannot write.
    let d = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url_with_user(&env.db_url, &login("dashboard"), &pg_pass))
        .await
        .expect("connect as dashboard");
    let e = sqlx::query("UPDATE drover.jobs SET cancel_requested = true")
        .execute(&d)
        .await
        .expect_err("a read-only dashboard could update");
    assert!(e.to_string().contains("permission denied"), "{e}");
    for p in [producer, other, w, d] {
        p.close().await;
    }

    // RabbitMQ: a producer cannot consume, a worker cannot delete the queue.
    let jobs = format!("{ns}.jobs");
    let conn = Connection::connect(&mq("producer"), ConnectionProperties::default())
        .await
        .expect("connect as producer");
    assert_consume_refused(&conn, &jobs).await;
    let _ = conn.close(200, "bye".into()).await;
    let conn = Connection::connect(&mq("worker"), ConnectionProperties::default())
        .await
        .expect("connect as worker");
    let ch = conn.create_channel().await.expect("channel");
    let e = ch
        .queue_delete(jobs.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect_err("a worker could delete the queue");
    assert!(e.to_string().contains("ACCESS_REFUSED"), "{e}");
    let _ = conn.close(200, "bye".into()).await;

    // Nothing printed anywhere carries a password.
    printed.push_str(&worker.0.log());
    printed.push_str(&dash.0.log());
    assert!(printed.contains("sec-1"), "the checks saw the run");
    for secret in [&pg_pass, &mq_pass] {
        assert!(
            !printed.contains(secret.as_str()),
            "{secret} was printed:\n{printed}"
        );
    }
    drop(dash);
    drop(worker);
}

#[tokio::test(flavor = "multi_thread")]
async fn url_files_are_checked_and_named() {
    let env = TestEnv::new().await;
    let missing = env.path("absent-url");
    let out = run_bounded(
        {
            let mut c = env.command(&["jobs", "list"]);
            c.env("DATABASE_URL_FILE", &missing);
            c
        },
        T,
    );
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("DATABASE_URL_FILE") && err.contains("set only one"),
        "{err}"
    );

    let out = run_bounded(
        {
            let mut c = env.command(&["jobs", "list"]);
            c.env_remove("DATABASE_URL")
                .env("DATABASE_URL_FILE", &missing);
            c
        },
        T,
    );
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("DATABASE_URL_FILE") && err.contains(&missing.display().to_string()),
        "{err}"
    );

    let file = env.path("db-url");
    std::fs::write(&file, format!("{}\n", env.db_url)).expect("write");
    let out = run_bounded(
        {
            let mut c = env.command(&["jobs", "list"]);
            c.env_remove("DATABASE_URL").env("DATABASE_URL_FILE", &file);
            c
        },
        T,
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A raw HTTP/1.0 POST with a bearer token; returns the status and the whole response.
fn http_post_bearer(addr: &str, path: &str, token: &str) -> (u16, String) {
    http_request(
        addr,
        &format!(
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: 0\r\n\r\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_role_acts_only_with_dashboard_actions() {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let group = |part: &str| format!("secd_{id}_{part}");
    let dash_login = format!("secd_{id}_login");
    let _roles = Roles(vec![
        dash_login.clone(),
        group("worker"),
        group("producer"),
        group("dashboard"),
    ]);
    let env = TestEnv::new().await;
    let migrate_roles = |extra: &[&str]| {
        let (w, p, d) = (group("worker"), group("producer"), group("dashboard"));
        let mut args = vec![
            "migrate",
            "--roles",
            "--worker-role",
            &w,
            "--producer-role",
            &p,
            "--dashboard-role",
            &d,
        ];
        args.extend_from_slice(extra);
        let out = env.drover(&args);
        assert!(out.status.success(), "migrate --roles: {}", stderr(&out));
    };
    migrate_roles(&[]);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE \"{dash_login}\" LOGIN IN ROLE \"{}\"",
        group("dashboard")
    )))
    .execute(&env.pool)
    .await
    .expect("create login role");
    for key in ["act-1", "act-2"] {
        let queued: bool = sqlx::query_scalar("SELECT drover.enqueue($1, 'noop')")
            .bind(key)
            .fetch_one(&env.pool)
            .await
            .expect("enqueue");
        assert!(queued);
    }
    let token = "dashboard-admin-token-for-the-test";
    let start = || {
        let p = Proc(Worker::spawn({
            let mut c =
                env.command(&["dashboard", "--addr", "127.0.0.1:0", "--admin-token", token]);
            c.env("DATABASE_URL", url_with_user(&env.db_url, &dash_login, "x"));
            c
        }));
        let line = p.0.wait_log("dashboard listening", T);
        let v: Value = serde_json::from_str(&line).expect("JSON log line");
        let addr = v["addr"]
            .as_str()
            .or_else(|| v["fields"]["addr"].as_str())
            .unwrap_or_else(|| panic!("no addr in {line}"))
            .to_string();
        (p, addr)
    };

    // Read-only grants: the cancel is refused by Postgres, the job stays queued.
    let (dash, addr) = start();
    let (status, reply) = http_post_bearer(&addr, "/api/jobs/act-1/cancel", token);
    assert!(status >= 400, "cancel with a read-only role: {reply}");
    assert_eq!(env.state("act-1").await.as_deref(), Some("queued"));
    drop(dash);

    // With --dashboard-actions the same dashboard may cancel, and the action is recorded.
    migrate_roles(&["--dashboard-actions"]);
    let (dash, addr) = start();
    let (status, reply) = http_post_bearer(&addr, "/api/jobs/act-2/cancel", token);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(env.state("act-2").await.as_deref(), Some("cancelled"));
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM drover.actions WHERE 'act-2' = ANY(keys)")
            .fetch_one(&env.pool)
            .await
            .expect("actions");
    assert_eq!(recorded, 1);
    drop(dash);
}

/// `openssl s_server` on `port` with the test CA's server certificate: an HTTPS endpoint that
/// prints what a client sends. Lines arrive on the receiver; killed on drop.
struct TlsEcho {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl TlsEcho {
    fn start(dir: &Path, port: u16) -> TlsEcho {
        use std::io::BufRead;
        let mut child = Command::new("openssl")
            .args(["s_server", "-accept", &format!("127.0.0.1:{port}"), "-cert"])
            .arg(dir.join("server.pem"))
            .arg("-key")
            .arg(dir.join("server.key"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let echo = TlsEcho { child, lines };
        echo.wait_for("ACCEPT");
        echo
    }

    /// Waits (bounded) for a line containing `needle`; false when none came.
    fn saw(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    fn wait_for(&self, needle: &str) {
        assert!(
            self.saw(needle, T),
            "openssl s_server printed no {needle:?}"
        );
    }
}

impl Drop for TlsEcho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn otlp_exports_over_https_trusting_the_configured_ca() {
    let env = TestEnv::new().await;
    make_certs(env.dir.path(), "");
    make_certs(env.dir.path(), "other-");
    let publish = |key: &str, ca: &str| {
        let mut c = env.command(&["publish", "--pipeline", "noop", "--key", key]);
        c.env("OTEL_EXPORTER_OTLP_ENDPOINT", "https://127.0.0.1:5718")
            .env("OTEL_EXPORTER_OTLP_CERTIFICATE", env.path(ca))
            .env("OTEL_EXPORTER_OTLP_TIMEOUT", "2000");
        let out = run_bounded(c, T);
        assert!(out.status.success(), "publish: {}", stderr(&out));
    };

    let echo = TlsEcho::start(env.dir.path(), 5718);
    publish("otlp-1", "ca.pem");
    assert!(
        echo.saw("POST /v1/traces", T),
        "no OTLP request arrived over TLS"
    );
    drop(echo);

    // A CA that did not sign the collector's certificate: the handshake fails, nothing is
    // sent (and publishing is not affected).
    let echo = TlsEcho::start(env.dir.path(), 5718);
    publish("otlp-2", "other-ca.pem");
    assert!(
        !echo.saw("POST /v1/traces", Duration::from_secs(3)),
        "an OTLP request arrived although the collector's certificate is not trusted"
    );
}

fn pg_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/postgres-node.sh")
}

/// A private TLS-only Postgres cluster (scripts/postgres-node.sh); stopped and deleted on
/// drop.
struct PgNode {
    name: String,
}

impl PgNode {
    fn start(name: &str, port: u16, certs: &Path, pwfile: &Path) -> PgNode {
        let mut c = Command::new(pg_script());
        c.args(["start", name, &port.to_string()])
            .arg(certs.join("server.pem"))
            .arg(certs.join("server.key"))
            .arg(pwfile);
        // A leftover of an interrupted run is stopped first (start refuses existing data).
        let node = PgNode {
            name: name.to_string(),
        };
        node.stop();
        let out = run_bounded(c, Duration::from_secs(120));
        assert!(out.status.success(), "start {name}: {}", stderr(&out));
        node
    }
}

impl PgNode {
    fn stop(&self) {
        let mut c = Command::new(pg_script());
        c.args(["stop", &self.name]);
        let _ = run_bounded(c, Duration::from_secs(90));
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The dashboard's address from its "dashboard listening" log line.
fn dashboard_addr(line: &str) -> String {
    let v: Value = serde_json::from_str(line).expect("JSON log line");
    v["addr"]
        .as_str()
        .or_else(|| v["fields"]["addr"].as_str())
        .unwrap_or_else(|| panic!("no addr in {line}"))
        .to_string()
}

/// An AMQP connection over TLS trusting `ca` (lapin's own client, not drover's), for the
/// permission checks.
async fn amqps_connect(url: &str, ca: &Path) -> Connection {
    let uri: lapin::uri::AMQPUri = url.parse().expect("AMQP URI");
    let tls = lapin::tcp::OwnedTLSConfig {
        cert_chain: Some(std::fs::read_to_string(ca).expect("read CA")),
        ..Default::default()
    };
    lapin::DefaultConnectionBuilder::new()
        .expect("connection builder")
        .with_uri(uri)
        .with_tls_config(tls)
        .connect()
        .await
        .expect("connect over amqps")
}

/// The whole of issue #17 at once, on a Postgres and a RabbitMQ that accept TLS only
/// (scripts/postgres-node.sh on 5751, scripts/rabbitmq-node.sh with `listeners.tcp = none`
/// and the RabbitMQ definitions the deploy files mount, deploy/secrets/rabbitmq-definitions.json,
/// on 5761): `migrate --roles --broker` as the administrators, then a worker, a producer and
/// the dashboard each with its least-privilege accounts, read from `*_FILE` files, with
/// `sslmode=verify-full` and `amqps://` trusting the test's CA.
#[tokio::test(flavor = "multi_thread")]
async fn tls_only_services_with_least_privilege_accounts_run_jobs_end_to_end() {
    let env = TestEnv::new().await;
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let certs = tempfile::tempdir().expect("tempdir");
    make_certs(certs.path(), "");
    let ca = certs.path().join("ca.pem");
    let admin_pass = format!("PgAdmin-{id}-Vb2");
    let pg_pass = format!("PgRole-{id}-Qm8");
    let mq_pass = format!("MqUser-{id}-Hc5");
    let pwfile = certs.path().join("pg-admin-password");
    std::fs::write(&pwfile, format!("{admin_pass}\n")).expect("write password file");
    let _pg = PgNode::start("security-e2e", 5751, certs.path(), &pwfile);

    // RabbitMQ: TLS only, users, vhost and permissions from the deploy files' definitions
    // (their demo passwords replaced).
    let defs_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/secrets/rabbitmq-definitions.json");
    let mut defs: Value =
        serde_json::from_str(&std::fs::read_to_string(&defs_path).expect("read definitions"))
            .expect("definitions are JSON");
    for user in defs["users"].as_array_mut().expect("users") {
        user["password"] = Value::String(mq_pass.clone());
    }
    let defs_file = certs.path().join("definitions.json");
    std::fs::write(&defs_file, defs.to_string()).expect("write definitions");
    let conf = certs.path().join("tls-only.conf");
    let c = |f: &str| certs.path().join(f).display().to_string();
    std::fs::write(
        &conf,
        format!(
            "listeners.tcp = none\n\
             listeners.ssl.default = 127.0.0.1:5761\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_none\n\
             ssl_options.fail_if_no_peer_cert = false\n\
             load_definitions = {}\n",
            c("ca.pem"),
            c("server.pem"),
            c("server.key"),
            defs_file.display()
        ),
    )
    .expect("write tls-only.conf");
    let chmod = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(certs.path())
        .status()
        .expect("chmod");
    assert!(chmod.success());
    let node = Node::start("security-e2e", 5761, Some(&conf));

    let pg = |user: &str, pass: &str| {
        format!(
            "postgres://{user}:{pass}@127.0.0.1:5751/drover?sslmode=verify-full&sslrootcert={}",
            ca.display()
        )
    };
    let mq_plain = |user: &str| format!("amqps://{user}:{mq_pass}@127.0.0.1:5761/drover");
    let mq = |user: &str| format!("{}?cacertfile={}", mq_plain(user), ca.display());
    // Every credential from a file; the namespace is drover's default, which the
    // definitions' permissions name.
    let as_ = |part: &str, db_url: String, amqp_url: String, args: &[&str]| {
        let mut c = with_url_files(&env, &format!("e2e-{part}"), db_url, amqp_url, args);
        c.env("DROVER_NAMESPACE", "drover");
        c
    };
    let mut printed = String::new();
    let mut run = |cmd: Command| run_recorded(cmd, &mut printed);

    // The administrators: schema, roles and the broker's topology, over TLS.
    let out = run(as_(
        "admin",
        pg("postgres", &admin_pass),
        mq("drover-admin"),
        &["migrate", "--roles", "--broker"],
    ));
    assert!(
        out.status.success(),
        "migrate --roles --broker: {}",
        stderr(&out)
    );
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&pg("postgres", &admin_pass))
        .await
        .expect("connect as the administrator over TLS");
    for (login, group) in [
        ("drover_w", "drover_worker"),
        ("drover_p", "drover_producer"),
        ("drover_d", "drover_dashboard"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {login} LOGIN PASSWORD '{pg_pass}' IN ROLE {group}"
        )))
        .execute(&admin)
        .await
        .expect("create login role");
    }

    let worker = Proc(Worker::spawn(as_(
        "worker",
        pg("drover_w", &pg_pass),
        mq("drover-worker"),
        &["worker"],
    )));
    let line = worker.0.wait_log("connected to RabbitMQ", T);
    assert!(line.contains("5761") && line.contains("TLS"), "{line}");
    worker.0.wait_log("\"consuming\"", T);
    // The poison consumer too: the administrator declared its queue, the worker may read it.
    worker
        .0
        .wait_log("consuming messages dead-lettered at the delivery limit", T);
    for key in ["e2e-1", "e2e-2"] {
        let out = run(as_(
            "producer",
            pg("drover_p", &pg_pass),
            mq("drover-producer"),
            &["publish", "--pipeline", "noop", "--key", key],
        ));
        assert!(out.status.success(), "publish {key}: {}", stderr(&out));
    }
    let out = run(as_(
        "producer",
        pg("drover_p", &pg_pass),
        mq("drover-producer"),
        &["jobs", "wait", "e2e-1", "e2e-2", "--timeout", "60"],
    ));
    assert!(
        out.status.success(),
        "jobs wait as the producer: {}{}",
        stdout(&out),
        stderr(&out)
    );

    // The dashboard, read-only, sees them (and the queue, through its broker account).
    let dash = Proc(Worker::spawn(as_(
        "dashboard",
        pg("drover_d", &pg_pass),
        mq("drover-dashboard"),
        &["dashboard", "--addr", "127.0.0.1:0"],
    )));
    let addr = dashboard_addr(&dash.0.wait_log("dashboard listening", T));
    let mut pages = String::new();
    for path in ["/jobs", "/api/jobs/e2e-2", "/api/overview"] {
        let (status, body) = http_get(&addr, path);
        assert_eq!(status, 200, "dashboard {path}: {body}");
        pages.push_str(&body);
    }
    let (_, job) = http_get(&addr, "/api/jobs/e2e-2");
    assert!(job.contains("succeeded"), "{job}");

    // The producer role: its own jobs, nothing else.
    let producer = PgPoolOptions::new()
        .max_connections(1)
        .connect(&pg("drover_p", &pg_pass))
        .await
        .expect("connect as the producer over TLS");
    let states: Vec<String> = sqlx::query_scalar("SELECT state FROM drover.jobs ORDER BY 1")
        .fetch_all(&producer)
        .await
        .expect("a producer reads its jobs");
    assert_eq!(states, ["succeeded", "succeeded"]);
    for (what, sql) in [
        ("read attempts", "SELECT count(*) FROM drover.attempts"),
        ("read actions", "SELECT count(*) FROM drover.actions"),
        (
            "change a job's state",
            "UPDATE drover.jobs SET state = 'queued' WHERE idempotency_key = 'e2e-1'",
        ),
    ] {
        let e = sqlx::query(sql)
            .execute(&producer)
            .await
            .expect_err(&format!("a producer could {what}"));
        assert!(e.to_string().contains("permission denied"), "{what}: {e}");
    }
    producer.close().await;

    // RabbitMQ: the producer cannot consume, the worker cannot delete a queue.
    let conn = amqps_connect(&mq_plain("drover-producer"), &ca).await;
    assert_consume_refused(&conn, "drover.jobs").await;
    let _ = conn.close(200, "bye".into()).await;
    let conn = amqps_connect(&mq_plain("drover-worker"), &ca).await;
    for queue in ["drover.jobs", "drover.dead"] {
        let ch = conn.create_channel().await.expect("channel");
        let e = ch
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .expect_err("the worker could delete a queue");
        assert!(e.to_string().contains("ACCESS_REFUSED"), "{queue}: {e}");
    }
    let _ = conn.close(200, "bye".into()).await;

    // Without TLS, both services refuse, whatever the credentials.
    let e = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!(
            "postgres://postgres:{admin_pass}@127.0.0.1:5751/drover?sslmode=disable"
        ))
        .await
        .expect_err("a plain Postgres connection was accepted");
    assert!(e.to_string().contains("no encryption"), "{e}");
    let out = run(as_(
        "plain",
        pg("drover_p", &pg_pass).replace("sslmode=verify-full", "sslmode=disable"),
        format!("amqp://drover-producer:{mq_pass}@127.0.0.1:5761/drover"),
        &["publish", "--pipeline", "noop", "--key", "never-plain"],
    ));
    let err = stderr(&out);
    assert!(!out.status.success(), "a plain publish succeeded");
    assert!(err.contains("cannot connect to Postgres"), "{err}");
    let out = run(as_(
        "plain-amqp",
        pg("drover_p", &pg_pass),
        format!("amqp://drover-producer:{mq_pass}@127.0.0.1:5761/drover"),
        &["publish", "--pipeline", "noop", "--key", "never-plain"],
    ));
    let err = stderr(&out);
    assert!(!out.status.success(), "a plain AMQP publish succeeded");
    assert!(
        err.contains("cannot connect to RabbitMQ at 127.0.0.1:5761"),
        "{err}"
    );
    admin.close().await;

    // Nothing any process printed carries a password.
    printed.push_str(&pages);
    printed.push_str(&worker.0.log());
    printed.push_str(&dash.0.log());
    assert!(printed.contains("e2e-1"), "the checks saw the run");
    for secret in [&admin_pass, &pg_pass, &mq_pass] {
        assert!(
            !printed.contains(secret.as_str()),
            "{secret} was printed:\n{printed}"
        );
    }
    drop(dash);
    drop(worker);
    drop(node);
}
