//! Retry policy: exponential backoff with full jitter, capped, inside a total time budget.
//!
//! The exponential envelope comes from the `backoff` crate (no randomisation, so it is a pure
//! function of the attempt number); "full jitter" then draws the actual delay uniformly from
//! `[0, envelope]`, which spreads retries of jobs that failed together (a database blip)
//! instead of sending them back in lock-step.

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How transient failures are retried. All fields have working defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Envelope of the first retry's delay, in milliseconds.
    pub initial_delay_ms: u64,
    /// Growth of the envelope per failed attempt.
    pub multiplier: f64,
    /// Cap on any single delay, in milliseconds.
    pub max_delay_ms: u64,
    /// Total time budget from the job's first start: a retry that would be due after it
    /// is not scheduled and the job goes to `dead`.
    pub budget_secs: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_delay_ms: 1_000,
            multiplier: 2.0,
            max_delay_ms: 300_000,
            budget_secs: 24 * 3600,
        }
    }
}

/// What to do after a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Schedule the next attempt after this delay.
    RetryAfter(Duration),
    /// Out of attempts or out of time budget.
    GiveUp(GiveUpReason),
}

/// Why a transient failure is not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpReason {
    AttemptsExhausted,
    BudgetExhausted,
}

impl RetryPolicy {
    /// The un-jittered delay envelope before retry number `failures` (1 = first retry).
    pub fn envelope(&self, failures: u32) -> Duration {
        let mut eb = ExponentialBackoff {
            current_interval: Duration::from_millis(self.initial_delay_ms),
            initial_interval: Duration::from_millis(self.initial_delay_ms),
            randomization_factor: 0.0,
            multiplier: self.multiplier.max(1.0),
            max_interval: Duration::from_millis(self.max_delay_ms),
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        let mut d = Duration::from_millis(self.initial_delay_ms);
        for _ in 0..failures.max(1) {
            d = eb
                .next_backoff()
                .unwrap_or(Duration::from_millis(self.max_delay_ms));
        }
        d.min(Duration::from_millis(self.max_delay_ms))
    }

    /// Decides the fate of a job whose attempt just failed transiently.
    ///
    /// `failures` counts failed attempts including this one; `elapsed` is the time since the
    /// job first started.
    pub fn decide(&self, failures: u32, max_attempts: u32, elapsed: Duration) -> RetryDecision {
        self.decide_with(failures, max_attempts, elapsed, &mut rand::rng())
    }

    /// [`RetryPolicy::decide`] with a caller-supplied random source (tests).
    pub fn decide_with<R: Rng>(
        &self,
        failures: u32,
        max_attempts: u32,
        elapsed: Duration,
        rng: &mut R,
    ) -> RetryDecision {
        if failures >= max_attempts {
            return RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted);
        }
        let cap = self.envelope(failures).as_millis() as u64;
        let delay = Duration::from_millis(rng.random_range(0..=cap));
        if elapsed + delay > Duration::from_secs(self.budget_secs) {
            return RetryDecision::GiveUp(GiveUpReason::BudgetExhausted);
        }
        RetryDecision::RetryAfter(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn envelope_grows_then_caps() {
        let p = RetryPolicy {
            initial_delay_ms: 100,
            multiplier: 2.0,
            max_delay_ms: 1_000,
            budget_secs: 60,
        };
        let e: Vec<u64> = (1..=6).map(|n| p.envelope(n).as_millis() as u64).collect();
        assert_eq!(e, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_stays_inside_the_envelope_and_varies() {
        let p = RetryPolicy::default();
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            match p.decide_with(3, 10, Duration::ZERO, &mut rng) {
                RetryDecision::RetryAfter(d) => {
                    assert!(d <= p.envelope(3));
                    seen.insert(d);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(seen.len() > 40, "full jitter should spread delays");
    }

    #[test]
    fn gives_up_on_attempts_and_budget() {
        let p = RetryPolicy {
            budget_secs: 10,
            ..RetryPolicy::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            p.decide_with(5, 5, Duration::ZERO, &mut rng),
            RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted)
        );
        assert_eq!(
            p.decide_with(1, 5, Duration::from_secs(11), &mut rng),
            RetryDecision::GiveUp(GiveUpReason::BudgetExhausted)
        );
    }
}
