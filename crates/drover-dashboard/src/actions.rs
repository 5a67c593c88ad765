//! The dashboard's actions — retry, cancel, bulk retry of dead jobs — shared by the HTML
//! forms and the JSON API. Each is one of the ledger's operator transitions (the same as
//! `drover jobs retry/cancel`) and is recorded in `drover.actions`, refusals included,
//! with how it was authorised and where it came from.

use crate::AppState;
use crate::auth::Via;
use crate::error::WebError;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use drover_ledger::{LedgerError, ListQuery, NewAction};
use serde::Serialize;
use serde_json::Value;
use std::convert::Infallible;
use std::net::SocketAddr;

/// The most dead jobs one bulk retry re-drives; the rest wait for another click.
pub const BULK_LIMIT: i64 = 1000;

/// Where a request came from: the peer address (not X-Forwarded-For, which anyone can
/// write) and the user agent, shortened.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub remote_addr: Option<String>,
    pub user_agent: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Origin {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Origin, Infallible> {
        Ok(Origin {
            remote_addr: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.to_string()),
            user_agent: parts
                .headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.chars().take(300).collect()),
        })
    }
}

/// What a single-job action did.
#[derive(Debug, Clone, Serialize)]
pub struct Done {
    pub key: String,
    pub action: &'static str,
    /// The job's state afterwards.
    pub state: String,
}

/// What a bulk retry did.
#[derive(Debug, Clone, Serialize)]
pub struct BulkDone {
    pub retried: Vec<String>,
    /// Jobs that changed state between the selection and their re-drive.
    pub skipped: Vec<String>,
    /// True when more dead jobs match than one bulk retry takes.
    pub more: bool,
}

async fn record(
    app: &AppState,
    action: &str,
    keys: &[String],
    filter: Option<Value>,
    outcome: &str,
    via: Via,
    origin: &Origin,
) -> Result<(), WebError> {
    app.ledger
        .record_action(&NewAction {
            action,
            keys,
            filter,
            outcome,
            via: via.as_str(),
            remote_addr: origin.remote_addr.clone(),
            user_agent: origin.user_agent.clone(),
        })
        .await?;
    tracing::info!(
        action,
        jobs = keys.len(),
        first_key = keys.first().map(String::as_str),
        outcome,
        via = via.as_str(),
        remote_addr = origin.remote_addr.as_deref(),
        "dashboard action"
    );
    Ok(())
}

fn refusal(e: &LedgerError) -> String {
    match e {
        LedgerError::WrongState { state, .. } => format!("refused: the job is {state}"),
        LedgerError::NotFound(_) => "refused: no such job".into(),
        _ => "failed".into(),
    }
}

/// `dead`/`rejected`/`cancelled` → `retrying`, due now (the relay publishes it).
pub async fn retry(app: &AppState, key: &str, via: Via, origin: &Origin) -> Result<Done, WebError> {
    let keys = [key.to_string()];
    match app.ledger.redrive(key).await {
        Ok(()) => {
            record(app, "retry", &keys, None, "retrying", via, origin).await?;
            Ok(Done {
                key: key.into(),
                action: "retry",
                state: "retrying".into(),
            })
        }
        Err(e) => {
            record(app, "retry", &keys, None, &refusal(&e), via, origin).await?;
            Err(e.into())
        }
    }
}

/// Cancels a queued or retrying job at once; flags a running one (its worker stops at the
/// next batch boundary).
pub async fn cancel(
    app: &AppState,
    key: &str,
    via: Via,
    origin: &Origin,
) -> Result<Done, WebError> {
    let keys = [key.to_string()];
    match app.ledger.request_cancel(key).await {
        Ok(state) => {
            let outcome = if state == drover_ledger::JobState::Cancelled {
                "cancelled".to_string()
            } else {
                format!("cancel requested ({state})")
            };
            record(app, "cancel", &keys, None, &outcome, via, origin).await?;
            Ok(Done {
                key: key.into(),
                action: "cancel",
                state: state.to_string(),
            })
        }
        Err(e) => {
            record(app, "cancel", &keys, None, &refusal(&e), via, origin).await?;
            Err(e.into())
        }
    }
}

/// Re-drives the dead jobs matching `q` (its state is ignored), at most [`BULK_LIMIT`],
/// recorded as one action listing every key.
pub async fn bulk_retry_dead(
    app: &AppState,
    q: &ListQuery,
    filter: Value,
    via: Via,
    origin: &Origin,
) -> Result<BulkDone, WebError> {
    let mut keys = app.ledger.dead_keys(q, BULK_LIMIT + 1).await?;
    let more = keys.len() as i64 > BULK_LIMIT;
    keys.truncate(BULK_LIMIT as usize);
    let mut retried = Vec::with_capacity(keys.len());
    let mut skipped = Vec::new();
    for key in keys {
        match app.ledger.redrive(&key).await {
            Ok(()) => retried.push(key),
            Err(LedgerError::WrongState { .. } | LedgerError::NotFound(_)) => skipped.push(key),
            Err(e) => {
                // Record what was done before the failure, then report it.
                if !retried.is_empty() {
                    let outcome = format!("retried {} before a ledger error", retried.len());
                    record(
                        app,
                        "bulk_retry_dead",
                        &retried,
                        Some(filter.clone()),
                        &outcome,
                        via,
                        origin,
                    )
                    .await?;
                }
                return Err(e.into());
            }
        }
    }
    let outcome = format!("retried {}, skipped {}", retried.len(), skipped.len());
    record(
        app,
        "bulk_retry_dead",
        &retried,
        Some(filter),
        &outcome,
        via,
        origin,
    )
    .await?;
    Ok(BulkDone {
        retried,
        skipped,
        more,
    })
}
