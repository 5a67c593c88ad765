//! The producer's side: record jobs as `queued` before their messages are published.
//!
//! Ledger first, broker second: a job that exists only as a message could be lost to a
//! broker crash with nobody knowing; a job that exists only in the ledger is found again
//! (`enqueued_at IS NULL`) and re-published by the next publish of the same key or by the
//! relay.

use crate::{JobState, Ledger, LedgerError};
use serde_json::Value;
use uuid::Uuid;

/// A job to record.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub key: String,
    pub pipeline: String,
    pub params: Value,
    pub batch_size: Option<i32>,
    pub max_attempts: i32,
    pub trace_id: Option<String>,
}

/// What recording one job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// New row; the message must now be published with this id.
    Inserted { id: Uuid },
    /// The key existed already. `needs_publish` is true when an earlier publish recorded it
    /// but never got the broker's confirm (crash in between), so it should be published now.
    Exists {
        id: Uuid,
        state: JobState,
        needs_publish: bool,
    },
}

#[derive(sqlx::FromRow)]
struct InsertRow {
    key: String,
    inserted: bool,
    id: Option<Uuid>,
    state: Option<String>,
    enqueued: Option<bool>,
}

impl Ledger {
    /// Records `jobs` as `queued` in one statement. Keys that exist already are left as they
    /// are. Outcomes come back in input order. Keys must be distinct within one call.
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
        let traces: Vec<Option<String>> = jobs.iter().map(|j| j.trace_id.clone()).collect();
        let rows: Vec<InsertRow> = sqlx::query_as(
            r#"
            WITH input AS (
                SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[],
                                     $5::int[], $6::int[], $7::text[])
                    WITH ORDINALITY AS t(id, key, pipeline, params, batch_size, max_attempts,
                                         trace_id, ord)
            ), ins AS (
                INSERT INTO drover.jobs (id, idempotency_key, pipeline, params, batch_size,
                                         max_attempts, trace_id, state)
                SELECT id, key, pipeline, params::jsonb, batch_size, max_attempts, trace_id,
                       'queued'
                FROM input ORDER BY ord
                ON CONFLICT (idempotency_key) DO NOTHING
                RETURNING idempotency_key
            )
            SELECT i.key AS key,
                   ins.idempotency_key IS NOT NULL AS inserted,
                   j.id AS id,
                   j.state AS state,
                   j.enqueued_at IS NOT NULL AS enqueued
            FROM input i
            LEFT JOIN ins ON ins.idempotency_key = i.key
            LEFT JOIN drover.jobs j ON j.idempotency_key = i.key
            ORDER BY i.ord
            "#,
        )
        .bind(&ids)
        .bind(&keys)
        .bind(&pipelines)
        .bind(&params)
        .bind(&batch_sizes)
        .bind(&max_attempts)
        .bind(&traces)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (row, job) in rows.into_iter().zip(jobs) {
            debug_assert_eq!(row.key, job.key);
            if row.inserted {
                out.push(InsertOutcome::Inserted { id: job.id });
            } else {
                let state = match row.state {
                    Some(s) => s.parse::<JobState>()?,
                    None => JobState::Queued,
                };
                let needs_publish = state == JobState::Queued && row.enqueued == Some(false);
                out.push(InsertOutcome::Exists {
                    id: row.id.unwrap_or(job.id),
                    state,
                    needs_publish,
                });
            }
        }
        Ok(out)
    }

    /// Notes that the broker confirmed the messages of these jobs.
    ///
    /// Rows a worker is claiming at this instant are skipped rather than waited for (and
    /// the worker not made to wait for this update either): a claim records `enqueued_at`
    /// itself, since a worker holding the message proves it was enqueued.
    pub async fn mark_enqueued(&self, ids: &[Uuid]) -> Result<(), LedgerError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE drover.jobs SET enqueued_at = now() WHERE id IN \
             (SELECT id FROM drover.jobs WHERE id = ANY($1) AND enqueued_at IS NULL \
              ORDER BY id FOR UPDATE SKIP LOCKED)",
        )
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
