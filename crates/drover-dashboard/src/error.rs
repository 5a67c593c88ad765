//! Errors: [`DashboardError`] for starting and serving; [`WebError`] for one request, shown
//! as an HTML page or a JSON body depending on where it was asked.

use axum::http::StatusCode;
use drover_ledger::LedgerError;
use std::net::SocketAddr;
use thiserror::Error;

/// What can stop the dashboard from starting or serving.
#[derive(Debug, Error)]
pub enum DashboardError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving the dashboard failed")]
    Serve(#[source] std::io::Error),
    #[error("a dashboard template does not compile: {0}")]
    Template(#[from] minijinja::Error),
}

/// One request's failure: the status and a message safe to show (it never holds a secret;
/// it may hold producer-supplied text, which the page escapes).
#[derive(Debug, Clone)]
pub(crate) struct WebError {
    pub status: StatusCode,
    pub message: String,
}

impl WebError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> WebError {
        WebError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> WebError {
        WebError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn forbidden(message: impl Into<String>) -> WebError {
        WebError::new(StatusCode::FORBIDDEN, message)
    }
}

impl From<LedgerError> for WebError {
    fn from(e: LedgerError) -> WebError {
        let status = match &e {
            LedgerError::NotFound(_) => StatusCode::NOT_FOUND,
            LedgerError::WrongState { .. } => StatusCode::CONFLICT,
            LedgerError::BadInput { .. } => StatusCode::BAD_REQUEST,
            _ if e.is_connection() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::warn!(error = %error_chain(&e), "dashboard: ledger error");
        }
        WebError::new(status, error_chain(&e))
    }
}

impl From<minijinja::Error> for WebError {
    fn from(e: minijinja::Error) -> WebError {
        tracing::error!(error = %e, "dashboard: rendering a template failed");
        WebError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the page failed: {e}"),
        )
    }
}

pub(crate) use drover_core::error::error_chain;
