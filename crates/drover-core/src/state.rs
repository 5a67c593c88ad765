//! The job states of the ledger's state machine, as one type: the ledger stores them as text
//! (readable in plain SQL), every other layer matches on [`JobState`].
//!
//! ```text
//! queued → running → succeeded
//! running → retrying → queued → running …   (transient failure, retry scheduled)
//! running → dead                             (permanent failure / attempts exhausted)
//! rejected                                   (invalid message)
//! running → cancelled                        (operator, at a batch boundary)
//! running → queued                           (graceful shutdown released it)
//! ```

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A job's state in the ledger (`drover.jobs.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for a worker (published, or released by a draining worker).
    Queued,
    /// A worker holds its lease and runs an attempt.
    Running,
    /// An attempt failed transiently; the next one is due at `run_at`.
    Retrying,
    /// Done; its result is recorded.
    Succeeded,
    /// Failed permanently, or out of attempts.
    Dead,
    /// Its message was invalid.
    Rejected,
    /// Stopped by an operator.
    Cancelled,
}

impl JobState {
    /// Every state, in the order of the state machine.
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Running,
        JobState::Retrying,
        JobState::Succeeded,
        JobState::Dead,
        JobState::Rejected,
        JobState::Cancelled,
    ];

    /// The states after which nothing more happens to a job.
    pub const TERMINAL: [JobState; 4] = [
        JobState::Succeeded,
        JobState::Dead,
        JobState::Cancelled,
        JobState::Rejected,
    ];

    /// The name stored in the ledger and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Succeeded => "succeeded",
            JobState::Dead => "dead",
            JobState::Rejected => "rejected",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether nothing more will happen to a job in this state.
    pub fn is_terminal(self) -> bool {
        Self::TERMINAL.contains(&self)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is not one of [`JobState::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown job state {0:?} (known: queued, running, retrying, succeeded, dead, rejected, cancelled)"
)]
pub struct UnknownState(pub String);

impl FromStr for JobState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

impl TryFrom<String> for JobState {
    type Error = UnknownState;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!("done".parse::<JobState>(), Err(UnknownState("done".into())));
        assert!(JobState::Dead.is_terminal());
        assert!(!JobState::Retrying.is_terminal());
    }
}
