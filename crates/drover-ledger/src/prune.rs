//! Retention: deleting finished jobs (with their attempts and checkpoints) from the ledger.
//!
//! Only terminal jobs are ever pruned, oldest first, in bounded statements that skip rows
//! another pruner holds, so `drover prune` and every worker's `[retention]` loop can run at
//! once. Output files are the caller's business: the statement returns the part files the
//! pruned jobs' checkpoints named, and the caller deletes them only when asked.

use crate::{Ledger, LedgerError};
use drover_core::JobState;
use std::time::Duration;

/// A job deleted (or, in a dry run, that would be), with the part files its checkpoints name.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Pruned {
    /// Its idempotency key.
    pub idempotency_key: String,
    /// Its terminal state.
    pub state: String,
    /// The part files its checkpoints recorded.
    pub outputs: Vec<String>,
}

/// The states pruned when none are named: finished jobs nobody needs to look at again.
/// `dead` jobs are kept unless named: a human may still have to handle them.
pub const DEFAULT_PRUNE_STATES: [&str; 3] = ["succeeded", "cancelled", "rejected"];

impl Ledger {
    /// Deletes up to `limit` jobs in one of `states` (terminal states only) that finished
    /// more than `older_than` ago, oldest first; with `dry_run`, only lists them. Returns
    /// what was (or would be) deleted.
    pub async fn prune(
        &self,
        older_than: Duration,
        states: &[String],
        dry_run: bool,
        limit: i64,
    ) -> Result<Vec<Pruned>, LedgerError> {
        let finished = |s: &String| s.parse::<JobState>().is_ok_and(JobState::is_terminal);
        if let Some(bad) = states.iter().find(|s| !finished(s)) {
            return Err(LedgerError::Invalid {
                field: "state",
                message: format!(
                    "{bad:?}: only finished jobs can be pruned (succeeded, dead, cancelled, rejected)"
                ),
            });
        }
        let sql = if dry_run {
            r#"
            WITH doomed AS (
                SELECT id, idempotency_key, state FROM drover.jobs
                WHERE state = ANY($1) AND finished_at < now() - make_interval(secs => $2)
                ORDER BY finished_at LIMIT $3
            )
            SELECT d.idempotency_key, d.state,
                   COALESCE(array_agg(c.output) FILTER (WHERE c.output IS NOT NULL), '{}')
                       AS outputs
            FROM doomed d LEFT JOIN drover.checkpoints c ON c.job_id = d.id
            GROUP BY d.idempotency_key, d.state
            "#
        } else {
            r#"
            WITH doomed AS (
                SELECT id FROM drover.jobs
                WHERE state = ANY($1) AND finished_at < now() - make_interval(secs => $2)
                ORDER BY finished_at LIMIT $3
                FOR UPDATE SKIP LOCKED
            ), outs AS (
                SELECT c.job_id, c.output FROM drover.checkpoints c
                JOIN doomed d ON d.id = c.job_id WHERE c.output IS NOT NULL
            ), del AS (
                DELETE FROM drover.jobs j USING doomed d WHERE j.id = d.id
                RETURNING j.id, j.idempotency_key, j.state
            )
            SELECT del.idempotency_key, del.state,
                   COALESCE(array_agg(outs.output) FILTER (WHERE outs.output IS NOT NULL), '{}')
                       AS outputs
            FROM del LEFT JOIN outs ON outs.job_id = del.id
            GROUP BY del.idempotency_key, del.state
            "#
        };
        Ok(sqlx::query_as(sql)
            .bind(states)
            .bind(older_than.as_secs_f64())
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }
}
