//! Error kinds: the one distinction the retry machinery cares about.

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
