//! Live updates by server-sent events. One LISTEN connection per dashboard (channel
//! `drover_jobs`, payload = key) fans notifications out to every open job page; each stream
//! re-reads its job's progress when its key is announced, and at least every
//! [`POLL_EVERY`] (so a missed notification, or a heartbeat, still shows), sends it when it
//! changed, and ends once the job is terminal.

use crate::AppState;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use drover_ledger::Ledger;
use futures_util::Stream;
use serde::Serialize;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast;

/// The longest a page waits between two reads of its job.
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// The fan-out of ledger notifications.
pub struct Live {
    tx: broadcast::Sender<String>,
}

impl Live {
    /// Starts the LISTEN task (it reconnects after a lost connection, 1 s apart).
    pub fn start(ledger: Ledger) -> Live {
        let (tx, _) = broadcast::channel(1024);
        let sender = tx.clone();
        tokio::spawn(async move {
            loop {
                match ledger.listener().await {
                    Ok(mut listener) => loop {
                        match listener.recv().await {
                            Ok(n) => {
                                // No receivers is fine: nobody is watching.
                                let _ = sender.send(n.payload().to_string());
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "dashboard: LISTEN connection lost");
                                break;
                            }
                        }
                    },
                    Err(e) => {
                        tracing::debug!(error = %crate::error::error_chain(&e), "dashboard: cannot LISTEN");
                    }
                }
                // A retry delay before reconnecting, not a synchronisation.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Live { tx }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.tx.subscribe()
    }
}

/// What a job page updates live.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub batches_done: i32,
    pub batches_total: Option<i32>,
    pub rows_done: i64,
    pub lease_owner: Option<String>,
    pub heartbeat_at: Option<String>,
    pub last_error: Option<String>,
    pub terminal: bool,
}

async fn progress(ledger: &Ledger, key: &str) -> Option<Progress> {
    let job = ledger.get(key).await.ok()?;
    Some(Progress {
        terminal: job.state.is_terminal(),
        state: job.state.to_string(),
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        batches_done: job.batches_done,
        batches_total: job.batches_total,
        rows_done: job.rows_done,
        lease_owner: job.lease_owner,
        heartbeat_at: job
            .heartbeat_at
            .map(|t| t.format("%H:%M:%S UTC").to_string()),
        last_error: job.last_error.map(|e| crate::redact::redact_urls(&e)),
    })
}

struct Watch {
    app: AppState,
    key: String,
    rx: broadcast::Receiver<String>,
    last: Option<Progress>,
    done: bool,
}

/// `GET /jobs/{key}/events`: `progress` events (JSON) until the job is terminal; 404 for
/// an unknown key.
pub async fn job_events(State(app): State<AppState>, Path(key): Path<String>) -> Response {
    if let Err(e) = app.ledger.get(&key).await {
        let e = crate::error::WebError::from(e);
        return (e.status, e.message).into_response();
    }
    events(app, key).into_response()
}

fn events(app: AppState, key: String) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let watch = Watch {
        rx: app.live.subscribe(),
        app,
        key,
        last: None,
        done: false,
    };
    let stream = futures_util::stream::unfold(watch, |mut w| async move {
        if w.done {
            return None;
        }
        let mut first = w.last.is_none();
        loop {
            if !first {
                // Wait for our key to be announced, or the poll period.
                let deadline = tokio::time::Instant::now() + POLL_EVERY;
                loop {
                    match tokio::time::timeout_at(deadline, w.rx.recv()).await {
                        Ok(Ok(k)) if k == w.key => break,
                        Ok(Ok(_)) => continue,
                        // Lagged: something may be ours; read now.
                        Ok(Err(broadcast::error::RecvError::Lagged(_))) => break,
                        Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => break,
                    }
                }
            }
            first = false;
            let Some(p) = progress(&w.app.ledger, &w.key).await else {
                continue;
            };
            if w.last.as_ref() == Some(&p) {
                continue;
            }
            w.done = p.terminal;
            let data = serde_json::to_string(&p).unwrap_or_else(|_| "{}".into());
            w.last = Some(p);
            return Some((Ok(Event::default().event("progress").data(data)), w));
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
