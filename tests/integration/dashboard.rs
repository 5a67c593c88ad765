//! `drover dashboard`: HTTP-level tests of auth, CSRF, headers, escaping and paging, and a
//! real headless Chromium (Debian's `chromium` + `chromedriver`, installed by
//! `scripts/ensure-browser.sh`, which `make test` runs) driven over WebDriver with
//! fantoccini, against the real worker and services.

use crate::support::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use sqlx::Row;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(90);
const TOKEN: &str = "test-admin-token-0123456789";
/// Fast retries so a re-driven job does not wait for production delays.
const FAST_RETRY: &str =
    "[retry]\ninitial_delay_ms = 200\nmultiplier = 2.0\nmax_delay_ms = 2000\nbudget_secs = 600\n";
/// A key and an error that would run script if a page put them into HTML unescaped.
const HTML_KEY: &str = "<script>window.__xss=1</script><b>bold</b>";
const HTML_PARAM: &str = "<img src=x onerror=\"window.__xss=2\">";

/// A running `drover dashboard` (killed on drop) and its base URL.
struct Dashboard {
    proc: Worker,
    url: String,
}

impl Dashboard {
    fn start(env: &TestEnv, token: Option<&str>) -> Dashboard {
        let mut args = vec!["dashboard", "--addr", "127.0.0.1:0"];
        if let Some(t) = token {
            args.extend(["--admin-token", t]);
        }
        let proc = Worker::spawn(env.command(&args));
        let line = proc.wait_log("dashboard listening", T);
        let v: Value = serde_json::from_str(&line).expect("JSON log line");
        let addr = v["addr"]
            .as_str()
            .or_else(|| v["fields"]["addr"].as_str())
            .unwrap_or_else(|| panic!("no addr in {line}"))
            .to_string();
        Dashboard {
            proc,
            url: format!("http://{addr}"),
        }
    }

    fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        http(self.addr(), "GET", path, headers, "").await
    }

    async fn post(&self, path: &str, headers: &[(&str, &str)], form: &str) -> Reply {
        let mut h = headers.to_vec();
        h.push(("Content-Type", "application/x-www-form-urlencoded"));
        http(self.addr(), "POST", path, &h, form).await
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

/// One HTTP/1.1 response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn cookies(&self) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

/// A minimal HTTP/1.1 client (one request per connection), bounded by 30 s.
async fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let run = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("HTTP request within 30 s");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect::<Vec<_>>();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The value of `name="csrf"` hidden inputs in a page.
fn csrf_field(html: &str) -> String {
    let i = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    html[i..].split('"').next().expect("csrf value").to_string()
}

/// Logs in over HTTP; returns the session cookie header value and the session's CSRF token.
async fn login(d: &Dashboard) -> (String, String) {
    let form = d.get("/login", &[]).await;
    assert_eq!(form.status, 200);
    let login_cookie = form
        .cookies()
        .into_iter()
        .find(|c| c.starts_with("drover_login="))
        .expect("login cookie")
        .split(';')
        .next()
        .expect("cookie pair")
        .to_string();
    let csrf = csrf_field(&form.body);
    let r = d
        .post(
            "/login",
            &[("Cookie", &login_cookie)],
            &format!("csrf={csrf}&token={}", enc(TOKEN)),
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let session = r
        .cookies()
        .into_iter()
        .find(|c| c.starts_with("drover_session=") && !c.starts_with("drover_session=;"))
        .expect("session cookie")
        .to_string();
    assert!(session.contains("HttpOnly"), "{session}");
    assert!(session.contains("SameSite=Strict"), "{session}");
    let pair = session.split(';').next().expect("pair").to_string();
    let page = d.get("/", &[("Cookie", &pair)]).await;
    assert!(
        page.body.contains("class=\"badge admin\""),
        "logged in: {}",
        page.body
    );
    (pair, csrf_field(&page.body))
}

/// Publishes a job whose first attempt fails permanently: it is `dead` once the worker ran
/// it, and a retry succeeds (the injected failure only hits attempt 1).
fn publish_dead_once(env: &TestEnv, key: &str) {
    env.publish_noop(
        key,
        &[
            "--param",
            "fail_attempts=1",
            "--param",
            "fail_kind=permanent",
        ],
    );
}

async fn wait_state(env: &TestEnv, key: &str, state: &str) {
    let want = state.to_string();
    env.wait_job(key, T, move |r| r.get::<String, _>("state") == want)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_dashboard_serves_pages_with_security_headers_and_refuses_actions() {
    let mut env = TestEnv::new().await;
    env.start_worker(&[]);
    env.publish_noop("ro-1", &[]);
    publish_dead_once(&env, "ro-dead");
    wait_state(&env, "ro-1", "succeeded").await;
    wait_state(&env, "ro-dead", "dead").await;
    let d = Dashboard::start(&env, None);

    for path in ["/", "/jobs", "/jobs/ro-1", "/login", "/nope"] {
        let r = d.get(path, &[]).await;
        let csp = r.header("content-security-policy").unwrap_or("");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert!(
            !r.body.contains("<script>") || path == "/nope",
            "{path}: no inline script"
        );
    }
    let js = d.get("/static/dashboard.js", &[]).await;
    assert_eq!(js.status, 200);
    assert!(
        js.header("content-type")
            .unwrap_or("")
            .starts_with("text/javascript")
    );
    assert_eq!(d.get("/nope", &[]).await.status, 404);

    let overview = d.get("/", &[]).await;
    assert_eq!(overview.status, 200);
    assert!(overview.body.contains("read-only"));
    assert!(
        overview.body.contains(&format!("{}.jobs", env.ns)),
        "queue shown"
    );
    let page = d.get("/jobs/ro-dead", &[]).await;
    assert_eq!(page.status, 200);
    assert!(
        !page.body.contains("retry-button"),
        "no action buttons when read-only"
    );

    // Every action is refused, with or without credentials.
    let r = d.post("/jobs/ro-dead/retry", &[], "csrf=x").await;
    assert_eq!(r.status, 403);
    assert!(r.body.contains("read-only"), "{}", r.body);
    let bearer = format!("Bearer {TOKEN}");
    let r = d
        .post("/api/jobs/ro-dead/retry", &[("Authorization", &bearer)], "")
        .await;
    assert_eq!(r.status, 403);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("read-only")
    );
    let r = d.post("/login", &[], &format!("token={TOKEN}")).await;
    assert_eq!(r.status, 403);
    assert_eq!(env.state("ro-dead").await.as_deref(), Some("dead"));
    let actions: i64 = sqlx::query_scalar("SELECT count(*) FROM drover.actions")
        .fetch_one(&env.pool)
        .await
        .expect("count actions");
    assert_eq!(actions, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn actions_need_the_token_and_a_csrf_token_and_are_recorded() {
    let mut env = TestEnv::new().await;
    env.write_config(FAST_RETRY);
    env.start_worker(&[]);
    for k in ["api-dead", "form-dead", "bulk-1", "bulk-2"] {
        publish_dead_once(&env, k);
    }
    env.publish_noop(
        "slow",
        &["--param", "sleep_ms=100", "--param", "batches=1200"],
    );
    for k in ["api-dead", "form-dead", "bulk-1", "bulk-2"] {
        wait_state(&env, k, "dead").await;
    }
    wait_state(&env, "slow", "running").await;
    let d = Dashboard::start(&env, Some(TOKEN));

    // API: no bearer 401, wrong bearer 401, right bearer retries (and is recorded).
    let r = d.post("/api/jobs/api-dead/retry", &[], "").await;
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap_or("")
            .starts_with("Bearer")
    );
    let r = d
        .post(
            "/api/jobs/api-dead/retry",
            &[("Authorization", "Bearer wrong")],
            "",
        )
        .await;
    assert_eq!(r.status, 401);
    let bearer = format!("Bearer {TOKEN}");
    let r = d
        .post(
            "/api/jobs/api-dead/retry",
            &[("Authorization", &bearer), ("User-Agent", "ops-script/1")],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "retrying");
    wait_state(&env, "api-dead", "succeeded").await;
    // A second retry of a succeeded job is a conflict, recorded as refused.
    let r = d
        .post(
            "/api/jobs/api-dead/retry",
            &[("Authorization", &bearer)],
            "",
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let rows = sqlx::query(
        "SELECT action, outcome, via, user_agent, remote_addr FROM drover.actions \
         WHERE keys = ARRAY['api-dead'] ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("actions");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<String, _>("outcome"), "retrying");
    assert_eq!(rows[0].get::<String, _>("via"), "bearer");
    assert_eq!(
        rows[0].get::<Option<String>, _>("user_agent").as_deref(),
        Some("ops-script/1")
    );
    assert!(
        rows[0]
            .get::<Option<String>, _>("remote_addr")
            .unwrap_or_default()
            .starts_with("127.0.0.1:")
    );
    assert!(rows[1].get::<String, _>("outcome").starts_with("refused"));

    // Forms: no session 403; a session without the right CSRF token 403; with it, 303.
    let r = d.post("/jobs/form-dead/retry", &[], "").await;
    assert_eq!(r.status, 403);
    let (cookie, csrf) = login(&d).await;
    let r = d
        .post(
            "/jobs/form-dead/retry",
            &[("Cookie", &cookie)],
            "csrf=forged",
        )
        .await;
    assert_eq!(r.status, 403);
    let r = d
        .post("/jobs/form-dead/retry", &[("Cookie", &cookie)], "")
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(env.state("form-dead").await.as_deref(), Some("dead"));
    let r = d
        .post(
            "/jobs/form-dead/retry",
            &[("Cookie", &cookie)],
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/jobs/form-dead?done=retry"));
    wait_state(&env, "form-dead", "succeeded").await;

    // Login: a forged login form (no matching cookie) and a wrong token are refused.
    let r = d
        .post("/login", &[], &format!("csrf=x&token={TOKEN}"))
        .await;
    assert_eq!(r.status, 403);
    assert!(
        r.cookies()
            .iter()
            .all(|c| !c.starts_with("drover_session="))
    );

    // Cancel a running job with the session: it stops at its next batch boundary.
    let r = d
        .post(
            "/jobs/slow/cancel",
            &[("Cookie", &cookie)],
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(
        r.header("location"),
        Some("/jobs/slow?done=cancel-requested")
    );
    wait_state(&env, "slow", "cancelled").await;

    // Bulk retry of dead jobs by filter (key prefix), recorded as one action.
    let r = d
        .post(
            "/api/bulk/retry-dead?q=bulk-",
            &[("Authorization", &bearer)],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut retried: Vec<String> =
        serde_json::from_value(r.json()["retried"].clone()).expect("keys");
    retried.sort();
    assert_eq!(retried, ["bulk-1", "bulk-2"]);
    wait_state(&env, "bulk-1", "succeeded").await;
    wait_state(&env, "bulk-2", "succeeded").await;
    let (n, filter): (i64, Value) = sqlx::query_as(
        "SELECT cardinality(keys)::int8, filter FROM drover.actions WHERE action = 'bulk_retry_dead'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("bulk action");
    assert_eq!(n, 2);
    assert_eq!(filter["q"], "bulk-");

    // Logging out ends the session.
    let r = d
        .post("/logout", &[("Cookie", &cookie)], &format!("csrf={csrf}"))
        .await;
    assert_eq!(r.status, 303);
    let r = d
        .post(
            "/jobs/form-dead/retry",
            &[("Cookie", &cookie)],
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(r.status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_list_pages_by_keyset_filters_and_escapes_producer_text() {
    let mut env = TestEnv::new().await;
    // No worker yet: the jobs stay queued while the list is paged.
    let keys: Vec<String> = (0..7).map(|i| format!("page-{i}")).collect();
    for k in &keys {
        env.publish_noop(k, &[]);
    }
    let d = Dashboard::start(&env, None);

    // Every key once, three to a page, newest first.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let path = match &after {
            None => "/api/jobs?state=queued&limit=3".to_string(),
            Some(c) => format!("/api/jobs?state=queued&limit=3&after={}", enc(c)),
        };
        let r = d.get(&path, &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        for j in v["jobs"].as_array().expect("jobs") {
            seen.push(j["idempotency_key"].as_str().expect("key").to_string());
        }
        match v["next"].as_str() {
            Some(c) => after = Some(c.to_string()),
            None => break,
        }
    }
    let mut expected = keys.clone();
    expected.reverse();
    assert_eq!(seen, expected);
    // Key search, in key order.
    let v = d.get("/api/jobs?q=page-&limit=4", &[]).await.json();
    let got: Vec<&str> = v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["idempotency_key"].as_str())
        .collect();
    assert_eq!(got, ["page-0", "page-1", "page-2", "page-3"]);
    // Bad filters name the parameter and the value.
    let r = d.get("/jobs?state=bogus", &[]).await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("state: &quot;bogus&quot;"), "{}", r.body);
    let r = d.get("/api/jobs?since=yesterday", &[]).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("since: \"yesterday\"")
    );

    // Producer text is escaped in the list and the detail page, and in the JSON.
    env.start_worker(&[]);
    let body = json!({"v": 1, "idempotency_key": HTML_KEY, "pipeline": "noop",
                      "params": {"fail_kind": HTML_PARAM}});
    env.publish_raw(body.to_string().as_bytes(), None).await;
    wait_state(&env, HTML_KEY, "rejected").await;
    for path in [
        "/jobs?state=rejected".to_string(),
        format!("/jobs/{}", enc(HTML_KEY)),
    ] {
        let r = d.get(&path, &[]).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            !r.body.contains("<script>window.__xss"),
            "{path}: key unescaped"
        );
        assert!(!r.body.contains("<img src=x"), "{path}: error unescaped");
        assert!(
            r.body
                .contains("&lt;script&gt;window.__xss=1&lt;&#x2f;script&gt;"),
            "{path}"
        );
    }
    let detail = d.get(&format!("/jobs/{}", enc(HTML_KEY)), &[]).await;
    assert!(
        detail.body.contains("&lt;img src=x onerror="),
        "error shown as text"
    );
    let v = d
        .get(&format!("/api/jobs/{}", enc(HTML_KEY)), &[])
        .await
        .json();
    assert_eq!(v["job"]["idempotency_key"], HTML_KEY);
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_in_params_are_redacted() {
    let mut env = TestEnv::new().await;
    env.start_worker(&[]);
    // Unknown params make noop reject the job; the params are still in the ledger.
    let body = json!({"v": 1, "idempotency_key": "secretive", "pipeline": "noop",
        "params": {"db_password": "hunter2", "api_token": "tok-42",
                   "source": "postgres://app:s3cretpw@db/x"}});
    env.publish_raw(body.to_string().as_bytes(), None).await;
    wait_state(&env, "secretive", "rejected").await;
    let d = Dashboard::start(&env, None);
    for path in ["/jobs/secretive", "/api/jobs/secretive"] {
        let r = d.get(path, &[]).await;
        assert_eq!(r.status, 200);
        for secret in ["hunter2", "tok-42", "s3cretpw"] {
            assert!(!r.body.contains(secret), "{path} shows {secret}");
        }
        assert!(r.body.contains("[redacted]"), "{path}");
        // As JSON, or HTML-escaped ('/' is &#x2f;) in the page.
        assert!(
            r.body.contains("postgres://app:***@db/x")
                || r.body.contains("postgres:&#x2f;&#x2f;app:***@db&#x2f;x"),
            "{path}: {}",
            r.body
        );
    }
    assert!(!d.proc.log().contains("hunter2"), "no secret in the log");
}

// --- the browser ---------------------------------------------------------------------

/// A chromedriver process on a free port (killed on drop).
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let mut child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is not installed: run scripts/ensure-browser.sh");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("started successfully") => break,
                Ok(_) => {}
                Err(_) => panic!("chromedriver did not start within 30 s"),
            }
        }
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"]
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        tokio::time::timeout(
            Duration::from_secs(60),
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&self.url),
        )
        .await
        .expect("browser session within 60 s")
        .expect("browser session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn text(b: &Client, css: &str) -> String {
    b.wait()
        .at_most(T)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .expect("text")
}

/// Waits (bounded) until the element's text satisfies `cond`; returns it.
async fn wait_text(
    b: &Client,
    css: &str,
    timeout: Duration,
    cond: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let t = match b.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if cond(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{css}: still {t:?} after {timeout:?}"
        );
        // The browser offers no event to await here; WebDriver is polled, 100 ms apart.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn no_script_ran(b: &Client) {
    let v = b
        .execute("return typeof window.__xss;", vec![])
        .await
        .expect("execute");
    assert_eq!(v, json!("undefined"), "producer text ran as script");
}

/// The browser's way through the dashboard, with screenshots when
/// `DROVER_SCREENSHOT_DIR` is set (`make dashboard-screenshots`).
async fn browse(screenshots: Option<std::path::PathBuf>) {
    let mut env = TestEnv::new().await;
    env.write_config(FAST_RETRY);
    env.start_worker(&["--prefetch", "4"]);
    for i in 0..6 {
        env.publish_noop(
            &format!("acme:2026-{:02}", i + 1),
            &["--param", "batches=3"],
        );
    }
    env.publish_noop("globex:2026-11", &["--param", "batches=2"]);
    publish_dead_once(&env, "acme:dead-once");
    let body = json!({"v": 1, "idempotency_key": HTML_KEY, "pipeline": "noop",
                      "params": {"fail_kind": HTML_PARAM}});
    env.publish_raw(body.to_string().as_bytes(), None).await;
    for k in ["acme:2026-06", "globex:2026-11"] {
        wait_state(&env, k, "succeeded").await;
    }
    wait_state(&env, "acme:dead-once", "dead").await;
    wait_state(&env, HTML_KEY, "rejected").await;
    // A job that runs for a while, batch by batch.
    env.publish_noop(
        "acme:long",
        &["--param", "batches=40", "--param", "sleep_ms=250"],
    );
    wait_state(&env, "acme:long", "running").await;

    let d = Dashboard::start(&env, Some(TOKEN));
    let driver = Driver::start();
    let b = driver.browser().await;
    let shot = |name: &'static str| {
        let b = b.clone();
        let dir = screenshots.clone();
        async move {
            if let Some(dir) = dir {
                let png = b.screenshot().await.expect("screenshot");
                std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
            }
        }
    };

    // The overview: counts by state and pipeline, the chart, the queue, the running job.
    b.goto(&format!("{}/", d.url)).await.expect("goto /");
    let counts = text(&b, "#counts").await;
    assert!(counts.contains("noop"), "{counts}");
    assert!(counts.contains("succeeded"), "{counts}");
    b.find(Locator::Css("#throughput")).await.expect("chart");
    let workers = text(&b, "#workers").await;
    assert!(
        workers.contains("acme:long"),
        "the running job's lease: {workers}"
    );
    assert!(
        text(&b, "#queues")
            .await
            .contains(&format!("{}.jobs", env.ns))
    );
    no_script_ran(&b).await;
    shot("overview").await;

    // The list, filtered by state through the form.
    b.goto(&format!("{}/jobs", d.url))
        .await
        .expect("goto /jobs");
    b.find(Locator::Css("#filter-state"))
        .await
        .expect("state filter")
        .select_by_value("dead")
        .await
        .expect("select dead");
    b.find(Locator::Css("#filter-submit"))
        .await
        .expect("submit")
        .click()
        .await
        .expect("click");
    // The unfiltered page already lists the dead job, so wait for the filtered one: the dead
    // job without the succeeded ones (a broken filter times out here).
    let rows = wait_text(&b, "#jobs", T, |t| {
        t.contains("acme:dead-once") && !t.contains("acme:2026-01")
    })
    .await;
    assert!(!rows.contains("acme:2026-01"), "only dead jobs: {rows}");
    assert!(
        b.current_url()
            .await
            .expect("url")
            .as_str()
            .contains("state=dead")
    );
    // Producer HTML in the list is text.
    b.goto(&format!("{}/jobs?state=rejected", d.url))
        .await
        .expect("goto rejected");
    let rows = text(&b, "#jobs").await;
    assert!(rows.contains(HTML_KEY), "the key shown as text: {rows}");
    assert!(rows.contains(HTML_PARAM), "the error shown as text: {rows}");
    no_script_ran(&b).await;
    b.goto(&format!("{}/jobs", d.url))
        .await
        .expect("goto /jobs");
    shot("jobs").await;

    // A running job's page updates live.
    b.goto(&format!("{}/jobs/{}", d.url, enc("acme:long")))
        .await
        .expect("goto long");
    let first = text(&b, "#batches-done").await;
    let first_n: i64 = first.parse().expect("batches done is a number");
    let later = wait_text(&b, "#batches-done", T, |t| {
        t.parse::<i64>().is_ok_and(|n| n > first_n)
    })
    .await;
    assert!(later.parse::<i64>().expect("number") > first_n);
    assert!(text(&b, "#live-status").await.contains("live"));
    shot("job-running").await;

    // The HTML job's page: key and error are text, nothing ran.
    b.goto(&format!("{}/jobs/{}", d.url, enc(HTML_KEY)))
        .await
        .expect("goto html job");
    assert_eq!(text(&b, "#job-key").await, HTML_KEY);
    assert!(text(&b, "#job-error").await.contains(HTML_PARAM));
    no_script_ran(&b).await;

    // Without logging in: no retry button, and a forged POST is refused.
    let dead_url = format!("{}/jobs/{}", d.url, enc("acme:dead-once"));
    b.goto(&dead_url).await.expect("goto dead");
    assert!(
        b.find(Locator::Css("#retry-button")).await.is_err(),
        "no button before login"
    );
    let status = b
        .execute_async(
            "const done = arguments[arguments.length - 1]; \
             fetch(arguments[0], {method: 'POST'}).then(r => done(r.status));",
            vec![json!(format!("/jobs/{}/retry", enc("acme:dead-once")))],
        )
        .await
        .expect("fetch");
    assert_eq!(status, json!(403));
    assert_eq!(env.state("acme:dead-once").await.as_deref(), Some("dead"));

    // Log in with the token, retry the dead job, watch it succeed.
    b.goto(&format!("{}/login", d.url))
        .await
        .expect("goto login");
    b.find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys(TOKEN)
        .await
        .expect("type");
    b.find(Locator::Css("#login-submit"))
        .await
        .expect("submit")
        .click()
        .await
        .expect("click");
    text(&b, ".badge.admin").await;
    b.goto(&dead_url).await.expect("goto dead");
    shot("job-dead").await;
    b.find(Locator::Css("#retry-button"))
        .await
        .expect("retry button")
        .click()
        .await
        .expect("click");
    assert!(text(&b, "#flash").await.contains("Retry scheduled"));
    wait_text(&b, "#job-state", T, |t| t == "succeeded").await;
    // The page reloads itself once the job is terminal, with the new attempt.
    let attempts = wait_text(&b, "#attempts", T, |t| t.contains("#2")).await;
    assert!(
        attempts.contains("dead") && attempts.contains("succeeded"),
        "{attempts}"
    );
    shot("job-retried").await;
    let row = sqlx::query("SELECT via, user_agent FROM drover.actions WHERE action = 'retry'")
        .fetch_one(&env.pool)
        .await
        .expect("the retry is recorded");
    assert_eq!(row.get::<String, _>("via"), "session");
    assert!(
        row.get::<Option<String>, _>("user_agent")
            .unwrap_or_default()
            .contains("Chrome")
    );

    wait_state(&env, "acme:long", "succeeded").await;
    b.goto(&format!("{}/jobs/{}", d.url, enc("acme:long")))
        .await
        .expect("goto long");
    text(&b, "#manifest").await;
    shot("job-succeeded").await;
    b.goto(&format!("{}/", d.url)).await.expect("goto /");
    text(&b, "#counts").await;
    shot("overview-admin").await;
    b.close().await.expect("close the browser");
}

#[tokio::test(flavor = "multi_thread")]
async fn in_a_browser_overview_filter_live_progress_retry_and_escaping() {
    browse(None).await;
}

/// `make dashboard-screenshots`: the same walk, saving PNGs into `DROVER_SCREENSHOT_DIR`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "writes docs/dashboard/*.png; run by make dashboard-screenshots"]
async fn screenshots() {
    let dir = std::env::var_os("DROVER_SCREENSHOT_DIR")
        .map(std::path::PathBuf::from)
        .expect("DROVER_SCREENSHOT_DIR");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    browse(Some(dir)).await;
}
