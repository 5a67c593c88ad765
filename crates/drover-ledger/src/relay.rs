//! The retry relay's queries: find retries that are due and hand them back to the broker.
//!
//! Every worker runs the relay; `FOR UPDATE SKIP LOCKED` lets replicas split the due rows
//! between them without a leader. The rows stay locked while their messages are published
//! with confirms, and only then move to `queued`: a crash in between leaves them `retrying`
//! and due, so the next sweep publishes them again (a duplicate message is harmless, the
//! ledger acks it without running).
//!
//! The same sweep publishes jobs recorded but never confirmed: at once for jobs inserted by
//! `drover.enqueue()` (origin `enqueue`: nobody else will publish them; `run_at` delays
//! them), after a grace period for jobs whose producer publishes them itself (origin
//! `publish`: the grace protects a publish still in flight). Workers LISTEN on
//! [`ENQUEUE_CHANNEL`] to sweep as soon as an enqueueing transaction commits.

use crate::{Ledger, LedgerError};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// The channel `drover.enqueue()` notifies (payload: the key) when its transaction commits.
pub const ENQUEUE_CHANNEL: &str = "drover_enqueue";

/// A retry that is due, with what its message needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueJob {
    pub id: Uuid,
    pub idempotency_key: String,
    pub pipeline: String,
    pub params: sqlx::types::Json<serde_json::Value>,
    pub batch_size: Option<i32>,
    pub max_attempts: i32,
    /// The request named no `max_attempts` (`max_attempts` holds a default), so the
    /// message leaves it out too.
    pub max_attempts_default: bool,
    /// Attempts started so far (0: it never ran).
    pub attempts: i32,
    pub trace_id: Option<String>,
    /// The attempt timeout the job's messages carry.
    pub timeout_secs: Option<i32>,
    /// Seconds the job has been due for (relay lag).
    pub overdue_secs: f64,
}

/// An open relay sweep: rows locked until [`RelaySweep::commit`].
pub struct RelaySweep {
    tx: Transaction<'static, Postgres>,
    /// The due jobs this sweep locked.
    pub due: Vec<DueJob>,
}

impl Ledger {
    /// Locks up to `limit` due retries, due delayed jobs (`queued` with a `run_at` that has
    /// come, no message carrying them), jobs enqueued in SQL (`origin = 'enqueue'`) without
    /// a `run_at`, and jobs left `queued` without a confirmed message for over `orphan_secs`
    /// (e.g. a producer that crashed between ledger and broker) unless their `run_at` is
    /// still to come.
    pub async fn relay_sweep(
        &self,
        limit: i64,
        orphan_secs: f64,
    ) -> Result<RelaySweep, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let due: Vec<DueJob> = sqlx::query_as(
            "SELECT id, idempotency_key, pipeline, params, batch_size, max_attempts, \
             max_attempts_default, attempts, trace_id, timeout_secs, \
             EXTRACT(EPOCH FROM now() - COALESCE(run_at, created_at))::float8 AS overdue_secs \
             FROM drover.jobs \
             WHERE (state = 'retrying' AND run_at <= now()) \
                OR (state = 'queued' AND enqueued_at IS NULL \
                    AND (run_at <= now() \
                         OR (run_at IS NULL \
                             AND (origin = 'enqueue' \
                                  OR created_at < now() - make_interval(secs => $2))))) \
             ORDER BY run_at NULLS LAST LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .bind(orphan_secs)
        .fetch_all(&mut *tx)
        .await?;
        Ok(RelaySweep { tx, due })
    }
}

impl Ledger {
    /// A LISTEN connection on [`ENQUEUE_CHANNEL`], so the relay wakes when an enqueueing
    /// transaction commits instead of at its next periodic sweep.
    pub async fn enqueue_listener(&self) -> Result<sqlx::postgres::PgListener, LedgerError> {
        let mut l = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        l.listen(ENQUEUE_CHANNEL).await?;
        Ok(l)
    }
}

impl RelaySweep {
    /// A sweep over rows `tx` has locked.
    pub(crate) fn new(tx: Transaction<'static, Postgres>, due: Vec<DueJob>) -> Self {
        RelaySweep { tx, due }
    }

    /// Stores the attempt limits a worker resolved (a pipeline's default, else the worker's
    /// setting) for swept jobs that never ran and whose request named none: `drover.enqueue`
    /// cannot know them and stores a placeholder. Part of the sweep's transaction.
    pub async fn resolve_max_attempts(
        &mut self,
        limits: &[(Uuid, i32)],
    ) -> Result<(), LedgerError> {
        if limits.is_empty() {
            return Ok(());
        }
        let (ids, ns): (Vec<Uuid>, Vec<i32>) = limits.iter().copied().unzip();
        sqlx::query(
            "UPDATE drover.jobs j SET max_attempts = r.n FROM UNNEST($1::uuid[], $2::int[]) \
             AS r(id, n) WHERE j.id = r.id AND j.max_attempts_default AND j.attempts = 0",
        )
        .bind(&ids)
        .bind(&ns)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Marks the swept jobs `queued` with a confirmed message and releases the locks.
    pub async fn commit(mut self) -> Result<(), LedgerError> {
        let ids: Vec<Uuid> = self.due.iter().map(|d| d.id).collect();
        if !ids.is_empty() {
            sqlx::query(
                "UPDATE drover.jobs SET state = 'queued', run_at = NULL, enqueued_at = now(), \
                 updated_at = now() WHERE id = ANY($1)",
            )
            .bind(&ids)
            .execute(&mut *self.tx)
            .await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}
