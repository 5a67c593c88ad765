//! Error kinds: the one distinction the retry machinery cares about; and the one-line form
//! of an error with its causes that every part of drover prints.

use serde::{Deserialize, Serialize};
use std::fmt;

/// How a failed attempt should be treated.
///
/// Transient faults (I/O, timeouts, lost connections, lock conflicts) are worth retrying;
/// permanent ones (validation, schema, bad params) will fail the same way every time, so the
/// job goes straight to `dead` without another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    Transient,
    Permanent,
}

impl ErrorKind {
    /// The name stored in the ledger's `error_kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        }
    }

    /// Parses the ledger / param spelling (`transient` or `permanent`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "transient" => Some(ErrorKind::Transient),
            "permanent" => Some(ErrorKind::Permanent),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error and its causes on one line, "what: why: cause", like anyhow's `{:#}`, but
/// without a cause whose text the line already holds: some library errors put their
/// source's text in their own message and return it as `source()` too (sqlx's "error
/// communicating with database: Connection refused" over the io error "Connection
/// refused"), which `{:#}` would print twice. An `anyhow::Error` is passed as `&*e`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut cur = Some(e);
    while let Some(cause) = cur {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cur = cause.source();
    }
    line
}
