//! The HTML pages and their forms.

use crate::actions::{self, BULK_LIMIT, Origin};
use crate::auth::{self, LOGIN_COOKIE, Refusal, SESSION_COOKIE, SESSION_TTL};
use crate::error::WebError;
use crate::filters::{ListParams, STATES, encode};
use crate::{AppState, chart};
use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use drover_ledger::{JobView, StateCount};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

/// Checkpoints shown on a job page.
const MANIFEST_ROWS: i64 = 200;

/// Who is looking: the base template's header and the forms' CSRF token.
#[derive(Debug, Clone, Serialize)]
struct Viewer {
    admin: bool,
    has_token: bool,
    csrf: String,
}

fn viewer(app: &AppState, headers: &HeaderMap) -> Viewer {
    let session = app.auth.session(headers);
    Viewer {
        admin: session.is_some(),
        has_token: app.auth.has_token(),
        csrf: session.map(|s| s.csrf).unwrap_or_default(),
    }
}

pub fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn opt_time(t: &Option<DateTime<Utc>>) -> Option<String> {
    t.as_ref().map(time)
}

fn render(
    app: &AppState,
    headers: &HeaderMap,
    status: StatusCode,
    name: &str,
    title: &str,
    nav: &str,
    page: Value,
) -> Response {
    let v = viewer(app, headers);
    let mut ctx = json!({
        "title": title,
        "nav": nav,
        "flash": null,
        "admin": v.admin,
        "has_token": v.has_token,
        "csrf": v.csrf,
    });
    if let (Some(ctx), Value::Object(page)) = (ctx.as_object_mut(), page) {
        ctx.extend(page);
    }
    match app.templates.render(name, &ctx) {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            let e = WebError::from(e);
            (e.status, e.message).into_response()
        }
    }
}

fn error_page(app: &AppState, headers: &HeaderMap, e: WebError) -> Response {
    let title = match e.status {
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::FORBIDDEN => "Not allowed",
        StatusCode::CONFLICT => "Not possible now",
        StatusCode::BAD_REQUEST => "Bad request",
        _ => "Error",
    };
    render(
        app,
        headers,
        e.status,
        "message.html",
        title,
        "",
        json!({"message": e.message, "status": e.status.as_u16()}),
    )
}

/// `page` with the flash message the base template shows above the content.
fn with_flash(mut page: Value, flash: Option<String>) -> Value {
    if let Some(f) = flash {
        page["flash"] = json!(f);
    }
    page
}

/// A fixed message for a `?done=` code after an action (never text from the request).
fn flash(done: Option<&str>, n: Option<usize>) -> Option<String> {
    let n = n.unwrap_or(0);
    Some(match done? {
        "retry" => "Retry scheduled: the job is retrying, due now.".to_string(),
        "cancel" => "Cancelled.".to_string(),
        "cancel-requested" => {
            "Cancel requested: the worker stops the job at its next batch boundary.".to_string()
        }
        "bulk" => format!("Bulk retry: {n} dead job(s) are retrying."),
        "bulk-more" => format!(
            "Bulk retry: {n} dead job(s) are retrying; more match, retry again for the next {BULK_LIMIT}."
        ),
        _ => return None,
    })
}

#[derive(Debug, Default, Deserialize)]
pub struct DoneParams {
    done: Option<String>,
    n: Option<usize>,
}

/// One row of the overview's state × pipeline table.
#[derive(Serialize)]
struct CountRow {
    pipeline: String,
    cells: Vec<Value>,
    total: i64,
}

fn count_rows(counts: &[StateCount]) -> Vec<CountRow> {
    let mut rows: Vec<CountRow> = Vec::new();
    for c in counts {
        if rows.last().is_none_or(|r| r.pipeline != c.pipeline) {
            rows.push(CountRow {
                pipeline: c.pipeline.clone(),
                cells: STATES
                    .iter()
                    .map(|s| json!({"state": s, "jobs": 0}))
                    .collect(),
                total: 0,
            });
        }
        if let Some(row) = rows.last_mut() {
            if let Some(i) = STATES.iter().position(|s| *s == c.state.as_str()) {
                row.cells[i]["jobs"] = json!(c.jobs);
            }
            row.total += c.jobs;
        }
    }
    rows
}

/// `GET /`.
pub async fn overview(State(app): State<AppState>, headers: HeaderMap) -> Response {
    match overview_data(&app).await {
        Ok(mut data) => {
            data["now"] = json!(time(&Utc::now()));
            render(
                &app,
                &headers,
                StatusCode::OK,
                "overview.html",
                "Overview",
                "overview",
                data,
            )
        }
        Err(e) => error_page(&app, &headers, e),
    }
}

/// The overview's facts, for the page and `GET /api/overview`.
pub(crate) async fn overview_data(app: &AppState) -> Result<Value, WebError> {
    let stale = app.stale_after.as_secs_f64();
    let (counts, minutes, workers, retries, broker) = tokio::join!(
        app.ledger.state_counts(),
        app.ledger.throughput(60),
        app.ledger.worker_leases(stale),
        app.ledger.retry_counts(),
        app.broker.status(),
    );
    let counts = counts?;
    let minutes = minutes?;
    let workers: Vec<Value> = workers?
        .into_iter()
        .map(|w| {
            json!({
                "worker": w.worker,
                "jobs": w.jobs,
                "keys": w.keys,
                "last_heartbeat": opt_time(&w.last_heartbeat),
                "alive": w.alive,
            })
        })
        .collect();
    Ok(json!({
        "states": STATES,
        "counts": count_rows(&counts),
        "chart": chart::build(&minutes),
        "throughput": minutes,
        "workers": workers,
        "retries": retries?,
        "broker": broker,
    }))
}

/// `GET /jobs`.
pub async fn jobs(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
    Query(done): Query<DoneParams>,
) -> Response {
    let result = async {
        let q = params.to_query()?;
        let (page, pipelines) = tokio::join!(app.ledger.list_page(&q), app.ledger.pipelines());
        let page = page?;
        let pipelines = pipelines?;
        let filter = params.filter_query();
        let sep = if filter.is_empty() { "" } else { "&" };
        let next_link = page
            .next
            .as_ref()
            .map(|c| format!("/jobs?{filter}{sep}after={}", encode(&c.encode())));
        let first_page_link = q.after.as_ref().map(|_| format!("/jobs?{filter}"));
        let jobs: Vec<Value> = page
            .jobs
            .iter()
            .map(|j| {
                json!({
                    "idempotency_key": j.idempotency_key,
                    "pipeline": j.pipeline,
                    "state": j.state,
                    "attempts": j.attempts,
                    "max_attempts": j.max_attempts,
                    "batches_done": j.batches_done,
                    "batches_total": j.batches_total,
                    "rows_done": j.rows_done,
                    "error_kind": j.error_kind,
                    "last_error": j.last_error.as_deref().map(crate::redact::redact_urls),
                    "created": time(&j.created_at),
                })
            })
            .collect();
        Ok::<Value, WebError>(json!({
            "states": STATES,
            "pipelines": pipelines,
            "params": params,
            "jobs": jobs,
            "next_link": next_link,
            "first_page_link": first_page_link,
            "bulk_limit": BULK_LIMIT,
        }))
    }
    .await;
    match result {
        Ok(data) => render(
            &app,
            &headers,
            StatusCode::OK,
            "jobs.html",
            "Jobs",
            "jobs",
            with_flash(data, flash(done.done.as_deref(), done.n)),
        ),
        Err(e) => error_page(&app, &headers, e),
    }
}

/// A job's row without params and result (shown redacted, separately), with times
/// formatted and its error redacted.
pub(crate) fn job_facts(job: &JobView) -> Value {
    json!({
        "id": job.id,
        "idempotency_key": job.idempotency_key,
        "pipeline": job.pipeline,
        "state": job.state,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "batch_size": job.batch_size,
        "batches_done": job.batches_done,
        "batches_total": job.batches_total,
        "rows_done": job.rows_done,
        "error_kind": job.error_kind,
        "last_error": job.last_error.as_deref().map(crate::redact::redact_urls),
        "run_at": job.run_at,
        "lease_owner": job.lease_owner,
        "heartbeat_at": job.heartbeat_at,
        "cancel_requested": job.cancel_requested,
        "trace_id": job.trace_id,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    })
}

/// Everything the job page and `GET /api/jobs/{key}` show.
pub(crate) struct JobDetail {
    pub job: JobView,
    pub attempts: Vec<drover_ledger::AttemptView>,
    pub checkpoints: Vec<drover_ledger::CheckpointView>,
    pub checkpoints_total: i64,
    pub actions: Vec<drover_ledger::ActionView>,
}

pub(crate) async fn job_detail(app: &AppState, key: &str) -> Result<JobDetail, WebError> {
    let job = app.ledger.get(key).await?;
    let (attempts, checkpoints, actions) = tokio::join!(
        app.ledger.attempts(job.id),
        app.ledger.checkpoint_page(job.id, MANIFEST_ROWS),
        app.ledger.actions(Some(key), 20),
    );
    let (checkpoints, checkpoints_total) = checkpoints?;
    Ok(JobDetail {
        job,
        attempts: attempts?,
        checkpoints,
        checkpoints_total,
        actions: actions?,
    })
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// `GET /jobs/{key}`.
pub async fn job(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Query(done): Query<DoneParams>,
) -> Response {
    let d = match job_detail(&app, &key).await {
        Ok(d) => d,
        Err(e) => return error_page(&app, &headers, e),
    };
    let j = &d.job;
    let terminal = j.state.is_terminal();
    let attempts: Vec<Value> = d
        .attempts
        .iter()
        .map(|a| {
            json!({
                "attempt": a.attempt,
                "worker": a.worker,
                "outcome": a.outcome,
                "started": time(&a.started_at),
                "finished": opt_time(&a.finished_at),
                "duration": a.finished_at.map(|f| {
                    let ms = (f - a.started_at).num_milliseconds();
                    format!("{:.1} s", ms as f64 / 1000.0)
                }),
                "error": a.error.as_deref().map(crate::redact::redact_urls),
            })
        })
        .collect();
    let checkpoints: Vec<Value> = d
        .checkpoints
        .iter()
        .map(|c| {
            json!({
                "batch_index": c.batch_index,
                "rows": c.rows,
                "output": c.output,
                "checksum": c.checksum,
                "attempt": c.attempt,
                "committed": time(&c.committed_at),
            })
        })
        .collect();
    let actions: Vec<Value> = d
        .actions
        .iter()
        .map(|a| {
            json!({
                "at": time(&a.at),
                "action": a.action,
                "outcome": a.outcome,
                "via": a.via,
                "remote_addr": a.remote_addr,
            })
        })
        .collect();
    let data = json!({
        "job": job_facts(j),
        "terminal": terminal,
        "events_url": format!("/jobs/{}/events", encode(&j.idempotency_key)),
        "params": pretty(&crate::redact_params(&j.params.0)),
        "result": j.result.as_ref().map(|r| pretty(&crate::redact_params(&r.0))),
        "last_error": j.last_error.as_deref().map(crate::redact::redact_urls),
        "heartbeat": j.heartbeat_at.map(|t| t.format("%H:%M:%S UTC").to_string()),
        "run_at": opt_time(&j.run_at),
        "created": time(&j.created_at),
        "started": opt_time(&j.started_at),
        "finished": opt_time(&j.finished_at),
        "attempts": attempts,
        "checkpoints": checkpoints,
        "checkpoints_total": d.checkpoints_total,
        "actions": actions,
        "can_retry": matches!(j.state.as_str(), "dead" | "rejected" | "cancelled"),
        "can_cancel": matches!(j.state.as_str(), "queued" | "retrying" | "running") && !j.cancel_requested,
    });
    render(
        &app,
        &headers,
        StatusCode::OK,
        "job.html",
        &j.idempotency_key,
        "jobs",
        with_flash(data, flash(done.done.as_deref(), done.n)),
    )
}

/// A form's CSRF field (every action form has one).
#[derive(Debug, Default, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: Option<String>,
}

fn refused(app: &AppState, headers: &HeaderMap, r: Refusal) -> Response {
    error_page(app, headers, WebError::forbidden(r.message()))
}

/// Who may act on a form's POST (bearer token, or session plus the form's CSRF token). A
/// missing or malformed body carries no CSRF token (nor token), so it is refused like any
/// unauthorised request.
fn authorize_form(
    app: &AppState,
    headers: &HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Result<auth::Via, Refusal> {
    let form = form.map(|Form(f)| f).unwrap_or_default();
    app.auth.authorize(headers, form.csrf.as_deref())
}

/// `POST /jobs/{key}/retry`.
pub async fn retry(
    State(app): State<AppState>,
    headers: HeaderMap,
    origin: Origin,
    Path(key): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let via = match authorize_form(&app, &headers, form) {
        Ok(v) => v,
        Err(r) => return refused(&app, &headers, r),
    };
    match actions::retry(&app, &key, via, &origin).await {
        Ok(_) => Redirect::to(&format!("/jobs/{}?done=retry", encode(&key))).into_response(),
        Err(e) => error_page(&app, &headers, e),
    }
}

/// `POST /jobs/{key}/cancel`.
pub async fn cancel(
    State(app): State<AppState>,
    headers: HeaderMap,
    origin: Origin,
    Path(key): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let via = match authorize_form(&app, &headers, form) {
        Ok(v) => v,
        Err(r) => return refused(&app, &headers, r),
    };
    match actions::cancel(&app, &key, via, &origin).await {
        Ok(done) => {
            let code = if done.state == "cancelled" {
                "cancel"
            } else {
                "cancel-requested"
            };
            Redirect::to(&format!("/jobs/{}?done={code}", encode(&key))).into_response()
        }
        Err(e) => error_page(&app, &headers, e),
    }
}

/// The bulk retry form: the CSRF token and the list's filters.
#[derive(Debug, Deserialize)]
pub struct BulkForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(flatten)]
    filters: ListParams,
}

/// `POST /bulk/retry-dead`.
pub async fn bulk_retry_dead(
    State(app): State<AppState>,
    headers: HeaderMap,
    origin: Origin,
    form: Result<Form<BulkForm>, FormRejection>,
) -> Response {
    // Authorisation first (a missing or malformed body has no CSRF token), then the filter:
    // an unreadable one is an error, never "no filter" (that would retry every dead job).
    let (csrf, filters) = match form {
        Ok(Form(f)) => (f.csrf, Ok(f.filters)),
        Err(e) => (None, Err(e)),
    };
    let via = match app.auth.authorize(&headers, csrf.as_deref()) {
        Ok(v) => v,
        Err(r) => return refused(&app, &headers, r),
    };
    let mut filters = match filters {
        Ok(f) => f,
        Err(e) => {
            return error_page(
                &app,
                &headers,
                WebError::bad_request(format!("the bulk retry form could not be read: {e}")),
            );
        }
    };
    filters.state = None;
    filters.after = None;
    let q = match filters.to_query() {
        Ok(q) => q,
        Err(e) => return error_page(&app, &headers, e),
    };
    let filter = json!(filters);
    match actions::bulk_retry_dead(&app, &q, filter, via, &origin).await {
        Ok(done) => {
            let code = if done.more { "bulk-more" } else { "bulk" };
            let f = filters.filter_query();
            let sep = if f.is_empty() { "" } else { "&" };
            Redirect::to(&format!(
                "/jobs?{f}{sep}state=retrying&done={code}&n={}",
                done.retried.len()
            ))
            .into_response()
        }
        Err(e) => error_page(&app, &headers, e),
    }
}

/// `GET /login`: the form, with a fresh double-submit CSRF token in a cookie and a field.
pub async fn login_form(State(app): State<AppState>, headers: HeaderMap) -> Response {
    login_page(&app, &headers, StatusCode::OK, None)
}

fn login_page(
    app: &AppState,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    let login_csrf = auth::random_token();
    let mut res = render(
        app,
        headers,
        status,
        "login.html",
        "Log in",
        "",
        json!({"login_csrf": login_csrf, "error": error}),
    );
    if app.auth.has_token()
        && let Ok(v) =
            HeaderValue::from_str(&auth::set_cookie(LOGIN_COOKIE, &login_csrf, "/login", 900))
    {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

#[derive(Debug, Default, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

/// `POST /login`: checks the form's CSRF token against its cookie and the token against
/// the admin token (both in constant time); on success starts a session.
pub async fn login(
    State(app): State<AppState>,
    headers: HeaderMap,
    origin: Origin,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    // A missing or malformed body carries no CSRF token (nor token): refused below.
    let form = form.map(|Form(f)| f).unwrap_or_default();
    if !app.auth.has_token() {
        return refused(&app, &headers, Refusal::ReadOnly);
    }
    let csrf_ok = match (auth::cookie(&headers, LOGIN_COOKIE), form.csrf.as_deref()) {
        (Some(c), Some(f)) => bool::from(c.as_bytes().ct_eq(f.as_bytes())),
        _ => false,
    };
    if !csrf_ok {
        return login_page(
            &app,
            &headers,
            StatusCode::FORBIDDEN,
            Some("The login form expired: try again."),
        );
    }
    if !app.auth.token_matches(form.token.as_deref().unwrap_or("")) {
        tracing::warn!(
            remote_addr = origin.remote_addr.as_deref(),
            "dashboard: login with a wrong token"
        );
        return login_page(
            &app,
            &headers,
            StatusCode::FORBIDDEN,
            Some("That is not the admin token."),
        );
    }
    let (id, _csrf) = app.auth.create_session();
    tracing::info!(
        remote_addr = origin.remote_addr.as_deref(),
        "dashboard: admin logged in"
    );
    let mut res = Redirect::to("/").into_response();
    for c in [
        auth::set_cookie(SESSION_COOKIE, &id, "/", SESSION_TTL.as_secs()),
        auth::set_cookie(LOGIN_COOKIE, "", "/login", 0),
    ] {
        if let Ok(v) = HeaderValue::from_str(&c) {
            res.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    res
}

/// `POST /logout` (with the session's CSRF token, so another site cannot log you out).
pub async fn logout(
    State(app): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    if let Err(r) = authorize_form(&app, &headers, form) {
        return refused(&app, &headers, r);
    }
    app.auth.end_session(&headers);
    let mut res = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&auth::set_cookie(SESSION_COOKIE, "", "/", 0)) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

/// `GET /static/dashboard.js`.
pub async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../static/dashboard.js"),
    )
        .into_response()
}

/// `GET /static/dashboard.css`.
pub async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../static/dashboard.css"),
    )
        .into_response()
}

/// Anything else.
pub async fn not_found(State(app): State<AppState>, headers: HeaderMap) -> Response {
    error_page(
        &app,
        &headers,
        WebError::new(StatusCode::NOT_FOUND, "no such page"),
    )
}
