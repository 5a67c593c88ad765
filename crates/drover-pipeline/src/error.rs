//! [`PipelineError`]: a failure plus the one bit the retry machinery needs (transient or
//! permanent).

use drover_core::ErrorKind;
use polars::prelude::PolarsError;
use std::io;

/// A pipeline failure with its retry classification.
///
/// The worker records `message` on the job and uses `kind` to decide between a retry
/// (transient: I/O hiccups, a full disk) and `dead` (permanent: bad params, invalid input,
/// schema problems), so every error raised inside a pipeline must say which one it is.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PipelineError {
    /// Whether retrying the job could succeed.
    pub kind: ErrorKind,
    /// Human-readable reason, stored in the ledger's `last_error`.
    pub message: String,
}

impl PipelineError {
    /// An error that will recur on every attempt (validation, bad params, schema): the job
    /// goes straight to `dead`.
    pub fn permanent(msg: impl Into<String>) -> Self {
        PipelineError {
            kind: ErrorKind::Permanent,
            message: msg.into(),
        }
    }

    /// An error worth retrying (I/O, resource exhaustion): the job is rescheduled.
    pub fn transient(msg: impl Into<String>) -> Self {
        PipelineError {
            kind: ErrorKind::Transient,
            message: msg.into(),
        }
    }

    /// Prefixes the message with where the error happened (`"input data/x.csv: "`), keeping
    /// the classification, so ledger entries say which file or step failed.
    pub fn context(mut self, prefix: impl std::fmt::Display) -> Self {
        self.message = format!("{prefix}: {}", self.message);
        self
    }

    /// True when the job should not be retried.
    pub fn is_permanent(&self) -> bool {
        self.kind == ErrorKind::Permanent
    }
}

/// Missing files and refused permissions will not fix themselves between attempts; every
/// other I/O failure (interrupted reads, a full disk, a flaky mount) is worth a retry.
fn io_kind(e: &io::Error) -> ErrorKind {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => ErrorKind::Permanent,
        _ => ErrorKind::Transient,
    }
}

impl From<io::Error> for PipelineError {
    /// NotFound / PermissionDenied are permanent (a missing or unreadable input stays so);
    /// other I/O errors are transient. Output-side code maps its I/O errors itself.
    fn from(e: io::Error) -> Self {
        PipelineError {
            kind: io_kind(&e),
            message: e.to_string(),
        }
    }
}

/// Classifies a polars error: I/O as for [`io::Error`], everything else (schema,
/// column-not-found, compute, parse errors) permanent, since the same input fails the same way.
pub(crate) fn polars_kind(e: &PolarsError) -> ErrorKind {
    match e {
        PolarsError::IO { error, .. } => io_kind(error),
        PolarsError::Context { error, .. } | PolarsError::ExprContext { error, .. } => {
            polars_kind(error)
        }
        _ => ErrorKind::Permanent,
    }
}

impl From<PolarsError> for PipelineError {
    /// Polars I/O errors follow the I/O rule, the rest (schema, compute, parse) are permanent.
    fn from(e: PolarsError) -> Self {
        PipelineError {
            kind: polars_kind(&e),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let nf: PipelineError = io::Error::new(io::ErrorKind::NotFound, "gone").into();
        assert_eq!(nf.kind, ErrorKind::Permanent);
        let full: PipelineError = io::Error::other("disk full").into();
        assert_eq!(full.kind, ErrorKind::Transient);
        let schema: PipelineError = PolarsError::ColumnNotFound("x".into()).into();
        assert_eq!(schema.kind, ErrorKind::Permanent);
        let pio: PipelineError = PolarsError::from(io::Error::other("reset")).into();
        assert_eq!(pio.kind, ErrorKind::Transient);
        let e = PipelineError::transient("boom").context("batch 3");
        assert_eq!(e.to_string(), "batch 3: boom");
        assert!(!e.is_permanent());
    }
}
