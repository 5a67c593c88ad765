//! The producer's side: record jobs as `queued` before their messages are published.
//!
//! Ledger first, broker second: a job that exists only as a message could be lost to a
//! broker crash with nobody knowing; a job that exists only in the ledger is found again
//! (`enqueued_at IS NULL`) and re-published by the next publish of the same key or by the
//! relay.

use crate::{JobState, Ledger, LedgerError};
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

/// A job to enqueue inside the caller's transaction with `drover.enqueue()`.
#[derive(Debug, Clone)]
pub struct EnqueueJob<'a> {
    pub key: &'a str,
    pub pipeline: &'a str,
    pub params: &'a Value,
    pub batch_size: Option<i32>,
    /// `None`: not part of the request; the ledger stores its default.
    pub max_attempts: Option<i32>,
    /// Published no earlier than this (`None`: as soon as the transaction commits).
    pub run_at: Option<DateTime<Utc>>,
}

/// Calls `drover.enqueue()` on `conn`, which may be inside the caller's transaction: the
/// job exists, and is published by a worker, only if that transaction commits. Returns
/// true when the key is new, false when the same request was recorded before.
///
/// Errors: [`LedgerError::EnqueueRefused`] naming the field and value, [`LedgerError::Conflict`]
/// when the key exists for a different request (the transaction is then aborted, as after
/// any SQL error).
pub async fn enqueue(
    conn: &mut sqlx::PgConnection,
    job: &EnqueueJob<'_>,
) -> Result<bool, LedgerError> {
    sqlx::query_scalar("SELECT drover.enqueue($1, $2, $3, $4, $5, $6)")
        .bind(job.key)
        .bind(job.pipeline)
        .bind(sqlx::types::Json(job.params))
        .bind(job.batch_size)
        .bind(job.max_attempts)
        .bind(job.run_at)
        .fetch_one(conn)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db)
                if db.code().as_deref() == Some("23505")
                    && db.constraint() == Some("drover_idempotency_conflict") =>
            {
                LedgerError::Conflict {
                    key: job.key.to_string(),
                    message: db.message().to_string(),
                }
            }
            sqlx::Error::Database(db) if db.code().as_deref() == Some("22023") => {
                LedgerError::EnqueueRefused {
                    message: db.message().to_string(),
                }
            }
            _ => LedgerError::Db(e),
        })
}

/// A job to record.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub key: String,
    pub pipeline: String,
    pub params: Value,
    pub batch_size: Option<i32>,
    /// The attempt limit to store (the request's, else a default the producer resolved).
    pub max_attempts: i32,
    /// Whether the request itself named `max_attempts`: only then is it part of the request
    /// that an idempotency comparison looks at.
    pub max_attempts_given: bool,
    pub trace_id: Option<String>,
}

/// What recording one job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// New row; the message must now be published with this id.
    Inserted { id: Uuid },
    /// The key existed already with the same request. `needs_publish` is true when an
    /// earlier publish recorded it but never got the broker's confirm (crash in between),
    /// so it should be published now.
    Exists {
        id: Uuid,
        state: JobState,
        needs_publish: bool,
    },
    /// The key existed already for a different request: nothing is published. `differs`
    /// names each difference, stored value first (`params (period: "2026-11" vs
    /// "2026-12")`).
    Conflict {
        id: Uuid,
        state: JobState,
        differs: String,
    },
}

#[derive(sqlx::FromRow)]
struct InsertRow {
    idempotency_key: String,
    inserted: bool,
    id: Uuid,
    state: String,
    enqueued: bool,
    differs: Option<String>,
}

impl Ledger {
    /// Records `jobs` as `queued` in one statement (the SQL function `drover.record_jobs`,
    /// shared with the Python client so every producer compares requests the same way).
    /// Keys that exist already are left as they are and compared with the request.
    /// Outcomes come back in input order. Keys must be distinct within one call.
    pub async fn insert_queued(&self, jobs: &[NewJob]) -> Result<Vec<InsertOutcome>, LedgerError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
        let keys: Vec<String> = jobs.iter().map(|j| j.key.clone()).collect();
        let pipelines: Vec<String> = jobs.iter().map(|j| j.pipeline.clone()).collect();
        let params: Vec<String> = jobs.iter().map(|j| j.params.to_string()).collect();
        let batch_sizes: Vec<Option<i32>> = jobs.iter().map(|j| j.batch_size).collect();
        let max_attempts: Vec<i32> = jobs.iter().map(|j| j.max_attempts).collect();
        let given: Vec<bool> = jobs.iter().map(|j| j.max_attempts_given).collect();
        let traces: Vec<Option<String>> = jobs.iter().map(|j| j.trace_id.clone()).collect();
        let rows: Vec<InsertRow> = sqlx::query_as(
            "SELECT idempotency_key, inserted, id, state, enqueued, differs \
             FROM drover.record_jobs($1, $2, $3, $4::text[]::jsonb[], $5, $6, $7, $8)",
        )
        .bind(&ids)
        .bind(&keys)
        .bind(&pipelines)
        .bind(&params)
        .bind(&batch_sizes)
        .bind(&max_attempts)
        .bind(&given)
        .bind(&traces)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (row, job) in rows.into_iter().zip(jobs) {
            debug_assert_eq!(row.idempotency_key, job.key);
            let state: JobState = row.state.parse()?;
            out.push(if row.inserted {
                InsertOutcome::Inserted { id: job.id }
            } else if let Some(differs) = row.differs {
                InsertOutcome::Conflict {
                    id: row.id,
                    state,
                    differs,
                }
            } else {
                let needs_publish = state == JobState::Queued && !row.enqueued;
                InsertOutcome::Exists {
                    id: row.id,
                    state,
                    needs_publish,
                }
            });
        }
        Ok(out)
    }

    /// Notes that the broker confirmed the messages of these jobs (`drover.mark_published`,
    /// shared with the Python client).
    ///
    /// Rows a worker is claiming at this instant are skipped rather than waited for (and
    /// the worker not made to wait for this update either): a claim records `enqueued_at`
    /// itself, since a worker holding the message proves it was enqueued.
    pub async fn mark_enqueued(&self, ids: &[Uuid]) -> Result<(), LedgerError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("SELECT drover.mark_published($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
