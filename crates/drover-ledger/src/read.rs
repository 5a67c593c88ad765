//! What the CLI shows: jobs as rows, one job with its attempt history, progress for `wait`,
//! and the two operator transitions (cancel, retry).

use crate::{JobState, Ledger, LedgerError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// One job as `jobs list --json` / `jobs show --json` print it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobView {
    pub id: Uuid,
    pub idempotency_key: String,
    pub pipeline: String,
    pub params: sqlx::types::Json<Value>,
    #[sqlx(try_from = "String")]
    pub state: JobState,
    /// Attempts started, interrupted ones (a drain, a lost lease) included.
    pub attempts: i32,
    /// Attempts that failed; the job is dead when this reaches `max_attempts`.
    pub failures: i32,
    pub max_attempts: i32,
    pub batch_size: Option<i32>,
    pub batches_done: i32,
    pub batches_total: Option<i32>,
    pub rows_done: i64,
    pub result: Option<sqlx::types::Json<Value>>,
    pub last_error: Option<String>,
    pub error_kind: Option<String>,
    pub run_at: Option<DateTime<Utc>>,
    pub lease_owner: Option<String>,
    pub heartbeat_at: Option<DateTime<Utc>>,
    pub cancel_requested: bool,
    pub trace_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One attempt of a job.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AttemptView {
    pub attempt: i32,
    pub worker: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: String,
    pub error: Option<String>,
}

/// Filters for `jobs list`.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub pipeline: Option<String>,
    pub limit: i64,
}

/// The progress of one job, for `jobs wait`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct JobProgress {
    pub idempotency_key: String,
    #[sqlx(try_from = "String")]
    pub state: JobState,
    pub attempts: i32,
    pub batches_done: i32,
    pub batches_total: Option<i32>,
    pub rows_done: i64,
    pub last_error: Option<String>,
    pub run_at: Option<DateTime<Utc>>,
}

impl JobProgress {
    /// Whether nothing more will happen to the job.
    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }
}

const JOB_COLUMNS: &str = "id, idempotency_key, pipeline, params, state, attempts, failures, max_attempts, \
     batch_size, batches_done, batches_total, rows_done, result, last_error, error_kind, run_at, \
     lease_owner, heartbeat_at, cancel_requested, trace_id, created_at, started_at, finished_at";

impl Ledger {
    /// Jobs, newest first.
    pub async fn list(&self, f: &JobFilter) -> Result<Vec<JobView>, LedgerError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM drover.jobs \
             WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR pipeline = $2) \
             ORDER BY created_at DESC, idempotency_key LIMIT $3"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(f.state.map(JobState::as_str))
            .bind(&f.pipeline)
            .bind(f.limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// One job by key.
    pub async fn get(&self, key: &str) -> Result<JobView, LedgerError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM drover.jobs WHERE idempotency_key = $1");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| LedgerError::NotFound(key.to_string()))
    }

    /// A job's attempts, oldest first.
    pub async fn attempts(&self, job_id: Uuid) -> Result<Vec<AttemptView>, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT attempt, worker, started_at, finished_at, outcome, error \
             FROM drover.attempts WHERE job_id = $1 ORDER BY attempt",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Progress of the given keys (keys with no row are absent from the answer).
    pub async fn progress(&self, keys: &[String]) -> Result<Vec<JobProgress>, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT idempotency_key, state, attempts, batches_done, batches_total, rows_done, \
             last_error, run_at FROM drover.jobs WHERE idempotency_key = ANY($1)",
        )
        .bind(keys)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Operator cancel: a queued or retrying job is cancelled at once; a running one is
    /// flagged and its worker stops at the next batch boundary. Returns the resulting state.
    pub async fn request_cancel(&self, key: &str) -> Result<JobState, LedgerError> {
        let row: Option<(String,)> = sqlx::query_as(
            "UPDATE drover.jobs SET \
               state = CASE WHEN state IN ('queued', 'retrying') THEN 'cancelled' ELSE state END, \
               finished_at = CASE WHEN state IN ('queued', 'retrying') THEN now() ELSE finished_at END, \
               cancel_requested = true, updated_at = now() \
             WHERE idempotency_key = $1 AND state IN ('queued', 'retrying', 'running') \
             RETURNING state",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some((state,)) => Ok(state.parse()?),
            None => {
                let job = self.get(key).await?;
                Err(LedgerError::WrongState {
                    key: key.to_string(),
                    state: job.state,
                    message: "only queued, retrying or running jobs can be cancelled".into(),
                })
            }
        }
    }

    /// Operator re-drive of a `dead`, `rejected` or `cancelled` job: it goes back to
    /// `retrying`, due now, with one more attempt allowed than it has used; the relay
    /// publishes it. Attempt numbers continue. The last error is cleared (it belongs to the
    /// attempt that failed, whose row in `drover.attempts` keeps it), so `jobs wait` and
    /// `jobs show` do not present an old failure as the state of the retried job.
    pub async fn redrive(&self, key: &str) -> Result<(), LedgerError> {
        let n = sqlx::query(
            "UPDATE drover.jobs SET state = 'retrying', run_at = now(), cancel_requested = false, \
             last_error = NULL, error_kind = NULL, \
             max_attempts = GREATEST(max_attempts, failures + 1), finished_at = NULL, \
             updated_at = now() \
             WHERE idempotency_key = $1 AND state IN ('dead', 'rejected', 'cancelled')",
        )
        .bind(key)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n == 1 {
            return Ok(());
        }
        let job = self.get(key).await?;
        Err(LedgerError::WrongState {
            key: key.to_string(),
            state: job.state,
            message: "only dead, rejected or cancelled jobs can be retried".into(),
        })
    }
}

impl Ledger {
    /// `drover jobs retry KEY --from-scratch`: a [`redrive`](Self::redrive) that also
    /// forgets the job's progress, so its next attempt starts at batch 0 and records the
    /// inputs and pipeline version afresh: its checkpoints are deleted, `batches_done`,
    /// `batches_total`, `rows_done` and the recorded identity cleared, in one transaction.
    /// Only a job that is not running (`dead`, `rejected` or `cancelled`) qualifies. The
    /// caller removes the output parts first (while the job cannot run), using
    /// [`checkpoints`](Self::checkpoints) for where they are.
    pub async fn redrive_from_scratch(&self, key: &str) -> Result<u64, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let id: Option<Uuid> = sqlx::query_scalar(
            "UPDATE drover.jobs SET state = 'retrying', run_at = now(), cancel_requested = false, \
             last_error = NULL, error_kind = NULL, result = NULL, \
             batches_done = 0, batches_total = NULL, rows_done = 0, \
             pipeline_version = NULL, inputs = NULL, \
             max_attempts = GREATEST(max_attempts, failures + 1), finished_at = NULL, \
             updated_at = now() \
             WHERE idempotency_key = $1 AND state IN ('dead', 'rejected', 'cancelled') \
             RETURNING id",
        )
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(id) = id else {
            drop(tx);
            let job = self.get(key).await?;
            return Err(LedgerError::WrongState {
                key: key.to_string(),
                state: job.state,
                message: "only dead, rejected or cancelled jobs can be retried".into(),
            });
        };
        let deleted = sqlx::query("DELETE FROM drover.checkpoints WHERE job_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(deleted)
    }

    /// Keys of the jobs that succeeded at or after `since`, oldest first (`drover verify
    /// --since`).
    pub async fn succeeded_since(&self, since: DateTime<Utc>) -> Result<Vec<String>, LedgerError> {
        Ok(sqlx::query_scalar(
            "SELECT idempotency_key FROM drover.jobs \
             WHERE finished_at >= $1 AND state = 'succeeded' ORDER BY finished_at, id",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// One line of `drover stats`: jobs of a pipeline in a state.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StateCount {
    pub pipeline: String,
    #[sqlx(try_from = "String")]
    pub state: JobState,
    pub jobs: i64,
}

/// Durations of jobs of one pipeline that finished within the window.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DurationStats {
    pub pipeline: String,
    pub finished: i64,
    pub p50_secs: Option<f64>,
    pub p95_secs: Option<f64>,
    pub max_secs: Option<f64>,
}

impl Ledger {
    /// Jobs by pipeline and state (all time), for `drover stats`.
    pub async fn state_counts(&self) -> Result<Vec<StateCount>, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT pipeline, state, count(*) AS jobs FROM drover.jobs \
             GROUP BY pipeline, state ORDER BY pipeline, state",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// p50/p95/max of first start → finish for jobs that succeeded in the last
    /// `window_secs`, by pipeline.
    pub async fn duration_stats(
        &self,
        window_secs: f64,
    ) -> Result<Vec<DurationStats>, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT pipeline, count(*) AS finished, \
               percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM finished_at - started_at))::float8 AS p50_secs, \
               percentile_cont(0.95) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM finished_at - started_at))::float8 AS p95_secs, \
               max(EXTRACT(EPOCH FROM finished_at - started_at))::float8 AS max_secs \
             FROM drover.jobs \
             WHERE state = 'succeeded' AND finished_at >= now() - make_interval(secs => $1) \
               AND started_at IS NOT NULL \
             GROUP BY pipeline ORDER BY pipeline",
        )
        .bind(window_secs)
        .fetch_all(&self.pool)
        .await?)
    }
}
