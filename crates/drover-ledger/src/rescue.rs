//! Re-drive from the ledger: the queries behind every worker's rescuer and `drover doctor`.
//!
//! The ledger is the source of truth and the broker only carries work, so a job must not
//! depend on the broker to be run again. Two things can leave a non-terminal job with nobody
//! working on it:
//!
//! - its lease expired (the worker died, froze or lost its network): [`Ledger::rescue_stale`]
//!   records the attempt as `lost` and schedules the job as a retry that is due now, which
//!   the relay publishes like any other retry. A frozen worker that resumes is fenced: every
//!   write it makes is conditioned on the lease it no longer holds.
//! - its message was lost (queue purged, a crash between the ledger and the broker):
//!   [`Ledger::lost_sweep`] locks `queued` jobs that have waited too long so the caller can
//!   publish them again. A duplicate message is harmless: the ledger acks it without running.
//!
//! Leader-free like the relay: every worker runs the same statements, `FOR UPDATE SKIP
//! LOCKED` splits the rows between them.

use crate::relay::{DueJob, RelaySweep};
use crate::{Ledger, LedgerError};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// A running job whose lease had expired, as [`Ledger::rescue_stale`] left it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Rescued {
    /// The job's idempotency key.
    pub idempotency_key: String,
    /// `retrying` (due now; the relay publishes it) or `dead` (that lost attempt was its last).
    pub state: String,
    /// The worker whose lease expired.
    pub lost_owner: Option<String>,
    /// Its last heartbeat.
    pub heartbeat_at: Option<DateTime<Utc>>,
}

/// What `drover doctor` compares with the broker: the ledger's side of the drift.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LedgerDrift {
    /// Jobs `queued` (waiting for a message to be delivered).
    pub queued: i64,
    /// Of those, how many no confirmed message carries (`enqueued_at` unset) for longer than
    /// the orphan age.
    pub unpublished: i64,
    /// Of those, how many have waited longer than the given age.
    pub queued_long: i64,
    /// Running jobs whose heartbeat is older than the given age.
    pub stale_running: i64,
    /// Retries due for longer than the given age (the relay is behind or not running).
    pub overdue_retries: i64,
}

impl Ledger {
    /// Takes every `running` job whose heartbeat is older than `stale_after` (up to `limit`
    /// of them, oldest first, skipping rows another worker has locked): its attempt becomes
    /// `lost`, the failure is counted, and the job becomes `retrying`, due now (the relay
    /// publishes it within its interval), or `dead` when that was its last attempt. One
    /// statement, so the job is never seen half re-driven.
    ///
    /// The owner, if it is only frozen, finds its lease gone at its next write and stops
    /// without writing (see the crate's lease invariant).
    pub async fn rescue_stale(
        &self,
        stale_after: Duration,
        limit: i64,
    ) -> Result<Vec<Rescued>, LedgerError> {
        Ok(sqlx::query_as(
            r#"
            WITH stale AS (
                SELECT id, lease_owner, heartbeat_at FROM drover.jobs
                WHERE state = 'running'
                  AND heartbeat_at < now() - make_interval(secs => $1)
                ORDER BY heartbeat_at
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            ), j AS (
                UPDATE drover.jobs j
                SET failures = j.failures + 1,
                    state = CASE WHEN j.failures + 1 >= j.max_attempts THEN 'dead'
                                 ELSE 'retrying' END,
                    run_at = CASE WHEN j.failures + 1 >= j.max_attempts THEN NULL
                                  ELSE now() END,
                    lease_owner = NULL, heartbeat_at = NULL,
                    last_error = CASE WHEN j.failures + 1 >= j.max_attempts
                        THEN format('attempts exhausted: %s of %s attempts failed or were lost '
                                    '(last: worker %s stopped heartbeating at %s)',
                                    j.failures + 1, j.max_attempts, s.lease_owner, s.heartbeat_at)
                        ELSE format('lease expired: worker %s stopped heartbeating at %s; '
                                    're-driven from the ledger', s.lease_owner, s.heartbeat_at)
                        END,
                    error_kind = 'transient',
                    finished_at = CASE WHEN j.failures + 1 >= j.max_attempts THEN now() END,
                    updated_at = now()
                FROM stale s
                WHERE j.id = s.id
                RETURNING j.id, j.attempts, j.idempotency_key, j.state,
                          s.lease_owner AS lost_owner, s.heartbeat_at
            ), a AS (
                UPDATE drover.attempts a
                SET outcome = 'lost', finished_at = now(),
                    error = format('lease expired: worker %s stopped heartbeating at %s',
                                   j.lost_owner, j.heartbeat_at)
                FROM j
                WHERE a.job_id = j.id AND a.attempt = j.attempts AND a.outcome = 'running'
            )
            SELECT idempotency_key, state, lost_owner, heartbeat_at FROM j
            "#,
        )
        .bind(stale_after.as_secs_f64())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Locks up to `limit` jobs that have been `queued` for longer than `older_than` with a
    /// confirmed message, to publish them again: call it only when the broker's queue holds
    /// no ready message, so the messages of these jobs are gone (purged, or dead-lettered
    /// by the delivery limit). [`RelaySweep::commit`] marks them published.
    pub async fn lost_sweep(
        &self,
        older_than: Duration,
        limit: i64,
    ) -> Result<RelaySweep, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let due: Vec<DueJob> = sqlx::query_as(
            "SELECT id, idempotency_key, pipeline, params, batch_size, max_attempts, \
             max_attempts_default, attempts, trace_id, timeout_secs, \
             EXTRACT(EPOCH FROM now() - updated_at)::float8 AS overdue_secs \
             FROM drover.jobs \
             WHERE state = 'queued' AND enqueued_at IS NOT NULL \
               AND (run_at IS NULL OR run_at <= now()) \
               AND updated_at < now() - make_interval(secs => $2) \
             ORDER BY updated_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .bind(older_than.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
        Ok(RelaySweep::new(tx, due))
    }

    /// Counts what `drover doctor` compares with the broker: queued jobs (and those without
    /// a confirmed message for over `orphan_after`, and those waiting over `long_after`),
    /// running jobs silent for over `stale_after`, retries overdue by over `long_after`.
    pub async fn drift(
        &self,
        stale_after: Duration,
        orphan_after: Duration,
        long_after: Duration,
    ) -> Result<LedgerDrift, LedgerError> {
        let (queued, unpublished, queued_long, stale_running, overdue_retries): (
            i64,
            i64,
            i64,
            i64,
            i64,
        ) = sqlx::query_as(
            "SELECT \
               count(*) FILTER (WHERE state = 'queued'), \
               count(*) FILTER (WHERE state = 'queued' AND enqueued_at IS NULL \
                                AND (run_at IS NULL OR run_at <= now()) \
                                AND updated_at < now() - make_interval(secs => $2)), \
               count(*) FILTER (WHERE state = 'queued' AND enqueued_at IS NOT NULL \
                                AND (run_at IS NULL OR run_at <= now()) \
                                AND updated_at < now() - make_interval(secs => $3)), \
               count(*) FILTER (WHERE state = 'running' \
                                AND heartbeat_at < now() - make_interval(secs => $1)), \
               count(*) FILTER (WHERE state = 'retrying' \
                                AND run_at < now() - make_interval(secs => $3)) \
             FROM drover.jobs WHERE state IN ('queued', 'running', 'retrying')",
        )
        .bind(stale_after.as_secs_f64())
        .bind(orphan_after.as_secs_f64())
        .bind(long_after.as_secs_f64())
        .fetch_one(&self.pool)
        .await?;
        Ok(LedgerDrift {
            queued,
            unpublished,
            queued_long,
            stale_running,
            overdue_retries,
        })
    }
}
