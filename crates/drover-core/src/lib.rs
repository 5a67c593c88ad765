//! drover-core: what every other drover crate agrees on.
//!
//! The job message contract (v1), layered configuration, the transient/permanent error
//! distinction and the retry policy. No I/O beyond reading the config file lives here, so
//! the contract can be tested alone.

pub mod config;
pub mod error;
pub mod message;
pub mod retry;
pub mod schedule;
pub mod shown;
pub mod state;

pub use error::ErrorKind;
pub use message::{ContractError, JobMessage};
pub use retry::{RetryDecision, RetryPolicy};
pub use secrecy::{ExposeSecret, SecretString};
pub use state::{JobState, UnknownState};
