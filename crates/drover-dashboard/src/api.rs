//! The JSON API under `/api/`: the same reads and actions as the pages. Actions take
//! `Authorization: Bearer TOKEN` (no cookies, hence no CSRF token); errors are
//! `{"error": "..."}` with the status.

use crate::AppState;
use crate::actions::{self, Origin};
use crate::auth::{Refusal, Via, bearer};
use crate::error::WebError;
use crate::filters::{ListParams, encode};
use crate::pages::{job_detail, job_facts, overview_data};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// A [`WebError`] as JSON.
pub struct ApiError(WebError);

impl From<WebError> for ApiError {
    fn from(e: WebError) -> ApiError {
        ApiError(e)
    }
}

impl From<drover_ledger::LedgerError> for ApiError {
    fn from(e: drover_ledger::LedgerError) -> ApiError {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.0.status, Json(json!({"error": self.0.message}))).into_response();
        if self.0.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"drover\""),
            );
        }
        res
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// Bearer authorisation only: 403 when the dashboard is read-only, 401 without or with a
/// wrong token.
fn authorize(app: &AppState, headers: &HeaderMap) -> Result<Via, ApiError> {
    if !app.auth.has_token() {
        return Err(WebError::forbidden(Refusal::ReadOnly.message()).into());
    }
    match bearer(headers) {
        Some(t) if app.auth.token_matches(t) => Ok(Via::Bearer),
        Some(_) => {
            Err(WebError::new(StatusCode::UNAUTHORIZED, Refusal::BadBearer.message()).into())
        }
        None => Err(WebError::new(
            StatusCode::UNAUTHORIZED,
            "send the admin token as Authorization: Bearer TOKEN",
        )
        .into()),
    }
}

/// `GET /api/overview`.
pub async fn overview(State(app): State<AppState>) -> ApiResult {
    let mut v = overview_data(&app).await?;
    if let Some(o) = v.as_object_mut() {
        // Presentation only.
        o.remove("chart");
        o.remove("states");
    }
    Ok(Json(v))
}

/// `GET /api/jobs?state=&pipeline=&q=&since=&until=&after=&limit=`: `{"jobs": [...],
/// "next": cursor or null}`; pass `next` as `after` for the following page.
pub async fn jobs(State(app): State<AppState>, Query(params): Query<ListParams>) -> ApiResult {
    let q = params.to_query()?;
    let page = app.ledger.list_page(&q).await?;
    let jobs: Vec<Value> = page
        .jobs
        .iter()
        .map(|j| {
            let mut v = json!(j);
            if let Some(e) = &j.last_error {
                v["last_error"] = json!(crate::redact::redact_urls(e));
            }
            v["url"] = json!(format!("/api/jobs/{}", encode(&j.idempotency_key)));
            v
        })
        .collect();
    Ok(Json(json!({
        "jobs": jobs,
        "next": page.next.map(|c| c.encode()),
    })))
}

/// `GET /api/jobs/{key}`: the job (params and result redacted), attempts, checkpoints
/// (the first 200 and the count), and the dashboard actions on it.
pub async fn job(State(app): State<AppState>, Path(key): Path<String>) -> ApiResult {
    let d = job_detail(&app, &key).await?;
    let mut job = job_facts(&d.job);
    job["params"] = crate::redact_params(&d.job.params.0);
    job["result"] = d
        .job
        .result
        .as_ref()
        .map(|r| crate::redact_params(&r.0))
        .unwrap_or(Value::Null);
    let attempts: Vec<Value> = d
        .attempts
        .iter()
        .map(|a| {
            let mut v = json!(a);
            if let Some(e) = &a.error {
                v["error"] = json!(crate::redact::redact_urls(e));
            }
            v
        })
        .collect();
    Ok(Json(json!({
        "job": job,
        "attempts": attempts,
        "checkpoints": d.checkpoints,
        "checkpoints_total": d.checkpoints_total,
        "actions": d.actions,
    })))
}

/// `POST /api/jobs/{key}/retry`.
pub async fn retry(
    State(app): State<AppState>,
    headers: HeaderMap,
    origin: Origin,
    Path(key): Path<String>,
) -> ApiResult {
    let via = authorize(&app, &headers)?;
    Ok(Json(json!(actions::retry(&app, &key, via, &origin).await?)))
}

/// `POST /api/jobs/{key}/cancel`.
pub async fn cancel(
    State(app): State<AppState>,
    headers: HeaderMap,
    origin: Origin,
    Path(key): Path<String>,
) -> ApiResult {
    let via = authorize(&app, &headers)?;
    Ok(Json(json!(
        actions::cancel(&app, &key, via, &origin).await?
    )))
}

/// `POST /api/bulk/retry-dead?pipeline=&q=&since=&until=`: re-drives the dead jobs
/// matching the filter (at most 1000; `more` says whether others remain).
pub async fn bulk_retry_dead(
    State(app): State<AppState>,
    headers: HeaderMap,
    origin: Origin,
    Query(mut params): Query<ListParams>,
) -> ApiResult {
    let via = authorize(&app, &headers)?;
    params.state = None;
    params.after = None;
    let q = params.to_query()?;
    let done = actions::bulk_retry_dead(&app, &q, json!(params), via, &origin).await?;
    Ok(Json(json!(done)))
}
