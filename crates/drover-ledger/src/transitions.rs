//! The worker's side of the state machine: claim, lease, checkpoint, finish.
//!
//! Every write about a running job is conditioned on the caller still holding the lease
//! (`lease_owner = worker AND attempts = attempt AND state = 'running'`). When the condition
//! fails the caller gets [`LeaseLost`] and must stop: another worker took the job over.

use crate::{JobState, Ledger, LedgerError};
use chrono::{DateTime, Utc};
use drover_core::retry::{GiveUpReason, RetryDecision, RetryPolicy};
use drover_core::{ErrorKind, JobMessage};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{Postgres, Transaction};
use std::time::Duration;
use uuid::Uuid;

/// A job this worker now holds the lease on.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedJob {
    pub id: Uuid,
    pub key: String,
    pub pipeline: String,
    pub params: Value,
    pub batch_size: Option<i32>,
    /// This attempt's number (1-based); also the lease generation.
    pub attempt: i32,
    pub max_attempts: i32,
    /// Batches already checkpointed by earlier attempts: resume after them.
    pub batches_done: i32,
    pub trace_id: Option<String>,
    /// Longest an attempt may run, as recorded on the job (the message's `timeout_secs`).
    pub timeout_secs: Option<i32>,
}

/// What a delivery should do, decided by the ledger.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// Run it: the lease is ours.
    Run(ClaimedJob),
    /// Terminal already (or just cancelled): ack without running.
    Done { state: JobState },
    /// Scheduled for later (a retry, or a delayed job's `run_at`); the relay re-publishes it
    /// when due. Ack this copy.
    NotDue { run_at: Option<DateTime<Utc>> },
    /// Another worker holds the lease. Watch its heartbeat before deciding.
    Held { id: Uuid, seen: LeaseSeen },
    /// A concurrency limit is reached: not started, no attempt counted; the job waits in
    /// the ledger until `run_at`, when the relay publishes it again. Ack this copy.
    HeldBack {
        run_at: DateTime<Utc>,
        /// Which limit, e.g. `per_group 1 (client_id = "acme": 1 running)`.
        limit: String,
    },
}

/// A lease as one reader saw it: the owner and its last heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSeen {
    pub state: JobState,
    pub owner: Option<String>,
    pub heartbeat_at: Option<DateTime<Utc>>,
}

/// One completed batch, as checkpointed, with its lineage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct BatchRecord {
    pub batch_index: i32,
    pub rows: i64,
    pub output: Option<String>,
    pub checksum: Option<String>,
    pub summary: sqlx::types::Json<Value>,
    /// First input row the batch read (`None` for batches of a release that recorded no
    /// lineage).
    pub first_row: Option<i64>,
    /// Rows in the batch's output (`None`: no output, or not recorded).
    pub rows_out: Option<i64>,
    /// The attempt that wrote the checkpoint. Filled when read; a write records the
    /// writer's own attempt whatever this says.
    pub attempt: Option<i32>,
}

/// A job's identity as an attempt saw it, recorded with the job (see the migration
/// `20261204000001_lineage.sql`): the pipeline's version and its inputs' fingerprints.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityRecord {
    pub pipeline_version: String,
    /// A JSON list of fingerprints (their shape is the pipeline crate's business).
    pub inputs: Value,
}

/// The worker no longer holds the job's lease (taken over, or changed by an operator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("lease lost: another worker or an operator changed this job")]
pub struct LeaseLost;

/// How a failed attempt was recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum FailOutcome {
    /// `retrying`, due at `run_at`.
    Retrying {
        run_at: DateTime<Utc>,
        /// The jittered delay drawn.
        delay: Duration,
        /// The exponential envelope it was drawn from (grows with each failure, capped).
        envelope: Duration,
    },
    /// `dead`: permanent error, attempts or time budget exhausted.
    Dead { reason: String },
    /// The lease was gone; nothing recorded.
    LeaseLost,
}

#[derive(sqlx::FromRow)]
struct LockedJob {
    id: Uuid,
    #[sqlx(try_from = "String")]
    state: JobState,
    not_due: bool,
    run_at: Option<DateTime<Utc>>,
    lease_owner: Option<String>,
    heartbeat_at: Option<DateTime<Utc>>,
    cancel_requested: bool,
    failures: i32,
    max_attempts: i32,
}

/// Opens a transaction whose commit does not wait for the WAL flush (see
/// [`Ledger::checkpoint`]); `SET LOCAL` ends with the transaction, so the pooled connection
/// goes back with its defaults.
const ASYNC_COMMIT_BEGIN: &str = "BEGIN; SET LOCAL synchronous_commit = off";

const LOCK_JOB: &str = "SELECT id, state, (run_at IS NOT NULL AND run_at > now()) AS not_due, \
     run_at, lease_owner, heartbeat_at, cancel_requested, failures, max_attempts \
     FROM drover.jobs WHERE idempotency_key = $1 FOR UPDATE";

impl Ledger {
    /// Decides what to do with a delivery of `msg` and, when it should run, starts a new
    /// attempt owned by `worker`.
    ///
    /// A key the ledger has never seen (a producer that published straight to the queue) is
    /// recorded first, so every job that ever ran has a row. `takeover` is the lease this
    /// worker saw stale ([`Claim::Held`] of an earlier call): if the job is still running
    /// with exactly that owner and heartbeat, the owner is presumed dead and the job is taken
    /// over, its lost attempt counted as a failure.
    pub async fn claim(
        &self,
        msg: &JobMessage,
        max_attempts: i32,
        worker: &str,
        trace_id: Option<&str>,
        takeover: Option<&LeaseSeen>,
    ) -> Result<Claim, LedgerError> {
        let tx = self.pool.begin().await?;
        Ledger::claim_in(tx, msg, max_attempts, worker, trace_id, takeover, None).await
    }

    /// [`Ledger::claim`] in `tx`, which it commits; with `limits`, an attempt starts only
    /// while the pipeline's concurrency limits allow it (the caller holds the pipeline's
    /// limit lock, see [`Ledger::claim_limited`]).
    pub(crate) async fn claim_in(
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        msg: &JobMessage,
        max_attempts: i32,
        worker: &str,
        trace_id: Option<&str>,
        takeover: Option<&LeaseSeen>,
        limits: Option<&crate::Limits>,
    ) -> Result<Claim, LedgerError> {
        sqlx::query(
            "INSERT INTO drover.jobs (id, idempotency_key, pipeline, params, batch_size, \
             max_attempts, trace_id, state, enqueued_at, timeout_secs) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', now(), $8) \
             ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(Uuid::new_v4())
        .bind(&msg.idempotency_key)
        .bind(&msg.pipeline)
        .bind(sqlx::types::Json(Value::Object(msg.params.clone())))
        .bind(msg.batch_size.map(|b| b as i32))
        .bind(max_attempts)
        .bind(trace_id)
        .bind(msg.timeout_secs.and_then(|t| i32::try_from(t).ok()))
        .execute(&mut *tx)
        .await?;
        let job: LockedJob = sqlx::query_as(LOCK_JOB)
            .bind(&msg.idempotency_key)
            .fetch_one(&mut *tx)
            .await?;

        if job.state.is_terminal() {
            tx.commit().await?;
            return Ok(Claim::Done { state: job.state });
        }
        if (job.state == JobState::Retrying || job.state == JobState::Queued) && job.not_due {
            tx.commit().await?;
            return Ok(Claim::NotDue { run_at: job.run_at });
        }
        if job.state == JobState::Queued
            && let Some(at) = msg.run_at
        {
            // A delayed job arriving early: the ledger keeps its time and no message carries
            // it until the relay publishes it when due.
            let scheduled: Option<DateTime<Utc>> = sqlx::query_scalar(
                "UPDATE drover.jobs SET run_at = $2, enqueued_at = NULL, updated_at = now() \
                 WHERE id = $1 AND $2 > now() RETURNING run_at",
            )
            .bind(job.id)
            .bind(at)
            .fetch_optional(&mut *tx)
            .await?;
            if scheduled.is_some() {
                tx.commit().await?;
                return Ok(Claim::NotDue { run_at: scheduled });
            }
        }
        if job.state == JobState::Running {
            let stale = takeover
                .map(|seen| seen.owner == job.lease_owner && seen.heartbeat_at == job.heartbeat_at)
                .unwrap_or(false);
            if !stale {
                tx.commit().await?;
                return Ok(Claim::Held {
                    id: job.id,
                    seen: LeaseSeen {
                        state: job.state,
                        owner: job.lease_owner,
                        heartbeat_at: job.heartbeat_at,
                    },
                });
            }
            // The owner stopped renewing its lease: record its attempt as lost.
            let failures = job.failures + 1;
            sqlx::query(
                "UPDATE drover.attempts SET outcome = 'lost', finished_at = now(), \
                 error = $2 WHERE job_id = $1 AND attempt = \
                 (SELECT attempts FROM drover.jobs WHERE id = $1) AND outcome = 'running'",
            )
            .bind(job.id)
            .bind(format!(
                "lease expired: worker {} stopped heartbeating; taken over by {worker}",
                job.lease_owner.as_deref().unwrap_or("?")
            ))
            .execute(&mut *tx)
            .await?;
            if failures >= job.max_attempts {
                let reason = format!(
                    "attempts exhausted: {failures} of {} attempts failed or were lost \
                     (last: worker {} vanished mid-run)",
                    job.max_attempts,
                    job.lease_owner.as_deref().unwrap_or("?")
                );
                sqlx::query(
                    "UPDATE drover.jobs SET state = 'dead', failures = $2, lease_owner = NULL, \
                     last_error = $3, error_kind = 'transient', finished_at = now(), \
                     updated_at = now() WHERE id = $1",
                )
                .bind(job.id)
                .bind(failures)
                .bind(&reason)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok(Claim::Done {
                    state: JobState::Dead,
                });
            }
            sqlx::query("UPDATE drover.jobs SET failures = $2 WHERE id = $1")
                .bind(job.id)
                .bind(failures)
                .execute(&mut *tx)
                .await?;
        }
        if job.cancel_requested {
            sqlx::query(
                "UPDATE drover.jobs SET state = 'cancelled', lease_owner = NULL, \
                 finished_at = now(), updated_at = now() WHERE id = $1",
            )
            .bind(job.id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(Claim::Done {
                state: JobState::Cancelled,
            });
        }
        if let Some(limits) = limits
            && job.state != JobState::Running
            && let Some(limit) =
                crate::limits::over_limit(&mut tx, limits, job.id, msg, worker).await?
        {
            let run_at: DateTime<Utc> = sqlx::query_scalar(
                "UPDATE drover.jobs SET run_at = now() + make_interval(secs => $2), \
                 enqueued_at = NULL, updated_at = now() WHERE id = $1 RETURNING run_at",
            )
            .bind(job.id)
            .bind(crate::limits::HOLD_BACK.as_secs_f64())
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(Claim::HeldBack { run_at, limit });
        }
        let claimed = start_attempt(&mut tx, job.id, worker).await?;
        tx.commit().await?;
        Ok(Claim::Run(claimed))
    }

    /// Records a job's attempt timeout (the message's `timeout_secs`) when the row does not
    /// hold it yet, so a message re-published from the ledger carries it again.
    pub async fn record_timeout(&self, id: Uuid, secs: i32) -> Result<(), LedgerError> {
        sqlx::query(
            "UPDATE drover.jobs SET timeout_secs = $2 \
             WHERE id = $1 AND timeout_secs IS DISTINCT FROM $2",
        )
        .bind(id)
        .bind(secs)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The current lease of a job, to watch whether its owner is alive.
    pub async fn lease(&self, id: Uuid) -> Result<LeaseSeen, LedgerError> {
        let (state, owner, heartbeat_at): (String, Option<String>, Option<DateTime<Utc>>) =
            sqlx::query_as(
                "SELECT state, lease_owner, heartbeat_at FROM drover.jobs WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(LeaseSeen {
            state: state.parse()?,
            owner,
            heartbeat_at,
        })
    }

    /// Renews the lease of every job in `ids` held by `worker`. Returns the ids whose
    /// cancellation an operator requested.
    ///
    /// Rows are locked in id order, each looked up by its primary key (`LATERAL ... LIMIT
    /// 1`, as in [`Ledger::claim_ready`]): written as `id = ANY($2) AND state = 'running'`,
    /// the planner scanned the whole partial index of running jobs, dead entries included.
    pub async fn heartbeat(&self, worker: &str, ids: &[Uuid]) -> Result<Vec<Uuid>, LedgerError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cancelled: Vec<Option<Uuid>> = sqlx::query_scalar(
            r#"
            WITH mine AS (
                SELECT cur.id
                FROM (SELECT DISTINCT id FROM unnest($2::uuid[]) AS i(id) ORDER BY id) i,
                LATERAL (SELECT id, lease_owner, state FROM drover.jobs
                         WHERE id = i.id LIMIT 1 FOR UPDATE) cur
                WHERE cur.lease_owner = $1 AND cur.state = 'running'
            )
            UPDATE drover.jobs j SET heartbeat_at = now()
            FROM mine WHERE j.id = mine.id
            RETURNING CASE WHEN j.cancel_requested THEN j.id END
            "#,
        )
        .bind(worker)
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(cancelled.into_iter().flatten().collect())
    }

    /// Checkpoints one completed batch and the job's progress in one transaction (one
    /// statement), renewing the lease. Returns whether cancellation was requested.
    ///
    /// Replaying a batch index overwrites its checkpoint and corrects `rows_done`, so
    /// progress never double counts. `batches_total` fills the job's total if it is unset
    /// (the worker's first checkpoint records it).
    ///
    /// The commit is asynchronous (`synchronous_commit = off`): it returns without waiting
    /// for the WAL flush, which costs more than a batch's compute on many disks and would
    /// set the pace of every job. This is safe because a checkpoint is only a hint of work
    /// that can be redone: if Postgres crashes before flushing it, the job resumes from an
    /// earlier batch and the replay overwrites its own parts. Every commit that acks a
    /// delivery (the job's completion, failure or release) is synchronous, and flushes the
    /// checkpoints before it.
    pub async fn checkpoint(
        &self,
        job: &ClaimedJob,
        worker: &str,
        batch: &BatchRecord,
        batches_total: Option<i32>,
    ) -> Result<Result<bool, LeaseLost>, LedgerError> {
        self.checkpoint_batches(job, worker, std::slice::from_ref(batch), batches_total)
            .await
    }

    /// [`checkpoint`](Self::checkpoint) for consecutive batches, in order, in one
    /// transaction: a worker whose batches complete faster than a commit returns
    /// checkpoints the ones that piled up together. Stops at the first batch that finds the
    /// lease lost (nothing is recorded then). Returns whether cancellation was requested.
    pub async fn checkpoint_batches(
        &self,
        job: &ClaimedJob,
        worker: &str,
        batches: &[BatchRecord],
        batches_total: Option<i32>,
    ) -> Result<Result<bool, LeaseLost>, LedgerError> {
        self.checkpoint_batches_with(job, worker, batches, batches_total, None)
            .await
    }

    /// [`checkpoint_batches`](Self::checkpoint_batches) that also records the job's
    /// identity (pipeline version and input fingerprints) in the same transaction: an
    /// attempt passes it with its first checkpoint.
    pub async fn checkpoint_batches_with(
        &self,
        job: &ClaimedJob,
        worker: &str,
        batches: &[BatchRecord],
        batches_total: Option<i32>,
        identity: Option<&IdentityRecord>,
    ) -> Result<Result<bool, LeaseLost>, LedgerError> {
        let mut tx = self.pool.begin_with(ASYNC_COMMIT_BEGIN).await?;
        let mut cancel = false;
        for batch in batches {
            match checkpoint_in(&mut tx, job, worker, batch, batches_total).await? {
                Some(c) => cancel |= c,
                None => return Ok(Err(LeaseLost)),
            }
        }
        if let Some(id) = identity {
            let n = sqlx::query(
                "UPDATE drover.jobs SET pipeline_version = $4, inputs = $5 \
                 WHERE id = $1 AND lease_owner = $2 AND attempts = $3 AND state = 'running'",
            )
            .bind(job.id)
            .bind(worker)
            .bind(job.attempt)
            .bind(&id.pipeline_version)
            .bind(sqlx::types::Json(&id.inputs))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 0 {
                return Ok(Err(LeaseLost));
            }
        }
        tx.commit().await?;
        Ok(Ok(cancel))
    }

    /// The identity a job's earlier attempt recorded: its pipeline version and input
    /// fingerprints (`None` where nothing was recorded).
    pub async fn identity(
        &self,
        job_id: Uuid,
    ) -> Result<(Option<String>, Option<Value>), LedgerError> {
        let row: Option<(Option<String>, Option<sqlx::types::Json<Value>>)> =
            sqlx::query_as("SELECT pipeline_version, inputs FROM drover.jobs WHERE id = $1")
                .bind(job_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map_or((None, None), |(v, i)| (v, i.map(|j| j.0))))
    }

    /// Every checkpoint of a job, in batch order (to resume, to summarise at the end, and
    /// as its lineage).
    pub async fn checkpoints(&self, job_id: Uuid) -> Result<Vec<BatchRecord>, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT batch_index, rows, output, checksum, summary, first_row, rows_out, attempt \
             FROM drover.checkpoints WHERE job_id = $1 ORDER BY batch_index",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// `running → succeeded`, storing the result summary.
    pub async fn succeed(
        &self,
        job: &ClaimedJob,
        worker: &str,
        result: &Value,
    ) -> Result<Result<(), LeaseLost>, LedgerError> {
        let done: Option<i32> = sqlx::query_scalar(
            r#"
            WITH j AS (
                UPDATE drover.jobs SET state = 'succeeded', result = $4, lease_owner = NULL,
                       finished_at = now(), updated_at = now()
                WHERE id = $1 AND lease_owner = $2 AND attempts = $3 AND state = 'running'
                RETURNING id
            )
            UPDATE drover.attempts a SET outcome = 'succeeded', finished_at = now()
            FROM j WHERE a.job_id = j.id AND a.attempt = $3
            RETURNING a.attempt
            "#,
        )
        .bind(job.id)
        .bind(worker)
        .bind(job.attempt)
        .bind(sqlx::types::Json(result))
        .fetch_optional(&self.pool)
        .await?;
        Ok(done.map(|_| ()).ok_or(LeaseLost))
    }

    /// Records a failed attempt: permanent → `dead`; transient → `retrying` at a jittered,
    /// capped exponential delay, or `dead` when attempts or the time budget are exhausted.
    pub async fn fail(
        &self,
        job: &ClaimedJob,
        worker: &str,
        kind: ErrorKind,
        error: &str,
        policy: &RetryPolicy,
    ) -> Result<FailOutcome, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(i32, i32, f64)> = sqlx::query_as(
            "SELECT failures, max_attempts, \
             EXTRACT(EPOCH FROM now() - COALESCE(started_at, created_at))::float8 \
             FROM drover.jobs WHERE id = $1 AND lease_owner = $2 AND attempts = $3 \
             AND state = 'running' FOR UPDATE",
        )
        .bind(job.id)
        .bind(worker)
        .bind(job.attempt)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((failures, max_attempts, elapsed)) = row else {
            return Ok(FailOutcome::LeaseLost);
        };
        let failures = failures + 1;
        let decision = match kind {
            ErrorKind::Permanent => None,
            ErrorKind::Transient => Some(policy.decide(
                failures as u32,
                max_attempts as u32,
                Duration::from_secs_f64(elapsed.max(0.0)),
            )),
        };
        let outcome = match decision {
            Some(RetryDecision::RetryAfter(delay)) => {
                let run_at: DateTime<Utc> = sqlx::query_scalar(
                    "UPDATE drover.jobs SET state = 'retrying', failures = $2, \
                     run_at = now() + make_interval(secs => $3), lease_owner = NULL, \
                     last_error = $4, error_kind = $5, updated_at = now() \
                     WHERE id = $1 RETURNING run_at",
                )
                .bind(job.id)
                .bind(failures)
                .bind(delay.as_secs_f64())
                .bind(error)
                .bind(kind.as_str())
                .fetch_one(&mut *tx)
                .await?;
                FailOutcome::Retrying {
                    run_at,
                    delay,
                    envelope: policy.envelope(failures as u32),
                }
            }
            other => {
                let reason = match other {
                    None => format!("permanent error: {error}"),
                    Some(RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted)) => {
                        format!("attempts exhausted ({failures} of {max_attempts}): {error}")
                    }
                    Some(_) => {
                        format!("retry time budget exhausted after {failures} attempts: {error}")
                    }
                };
                sqlx::query(
                    "UPDATE drover.jobs SET state = 'dead', failures = $2, lease_owner = NULL, \
                     last_error = $3, error_kind = $4, finished_at = now(), updated_at = now() \
                     WHERE id = $1",
                )
                .bind(job.id)
                .bind(failures)
                .bind(error)
                .bind(kind.as_str())
                .execute(&mut *tx)
                .await?;
                FailOutcome::Dead { reason }
            }
        };
        let attempt_outcome = match outcome {
            FailOutcome::Dead { .. } => "dead",
            _ => "failed",
        };
        sqlx::query(
            "UPDATE drover.attempts SET outcome = $3, error = $4, finished_at = now() \
             WHERE job_id = $1 AND attempt = $2",
        )
        .bind(job.id)
        .bind(job.attempt)
        .bind(attempt_outcome)
        .bind(error)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(outcome)
    }

    /// Ends a held job in a state that is not a failure: `cancelled` (operator request),
    /// `rejected` (its pipeline or params are invalid), or `queued` again (released by a
    /// draining worker; its attempt is recorded as interrupted and does not count as a
    /// failure).
    pub async fn finish_held(
        &self,
        job: &ClaimedJob,
        worker: &str,
        state: HeldEnd,
        note: &str,
    ) -> Result<Result<(), LeaseLost>, LedgerError> {
        let (job_state, attempt_outcome, terminal) = match state {
            HeldEnd::Cancelled => ("cancelled", "cancelled", true),
            HeldEnd::Rejected => ("rejected", "rejected", true),
            HeldEnd::Released => ("queued", "interrupted", false),
        };
        let done: Option<i32> = sqlx::query_scalar(
            r#"
            WITH j AS (
                UPDATE drover.jobs SET state = $4, lease_owner = NULL, heartbeat_at = NULL,
                       finished_at = CASE WHEN $6 THEN now() END,
                       last_error = CASE WHEN $4 = 'rejected' THEN $5 ELSE last_error END,
                       error_kind = CASE WHEN $4 = 'rejected' THEN 'permanent' ELSE error_kind END,
                       updated_at = now()
                WHERE id = $1 AND lease_owner = $2 AND attempts = $3 AND state = 'running'
                RETURNING id
            )
            UPDATE drover.attempts a SET outcome = $7, finished_at = now(),
                   error = NULLIF($5, '')
            FROM j WHERE a.job_id = j.id AND a.attempt = $3
            RETURNING a.attempt
            "#,
        )
        .bind(job.id)
        .bind(worker)
        .bind(job.attempt)
        .bind(job_state)
        .bind(note)
        .bind(terminal)
        .bind(attempt_outcome)
        .fetch_optional(&self.pool)
        .await?;
        Ok(done.map(|_| ()).ok_or(LeaseLost))
    }

    /// Records a message that is not a valid job as `rejected`, when it has a usable key.
    /// A key that exists already is only changed if it is still `queued` (its own content is
    /// what was found invalid); a job that ran or finished is left alone. Returns whether a
    /// row now says `rejected` because of this call.
    pub async fn reject_message(
        &self,
        key: &str,
        pipeline: Option<&str>,
        params: Option<&Value>,
        reason: &str,
    ) -> Result<bool, LedgerError> {
        let n = sqlx::query(
            "INSERT INTO drover.jobs (id, idempotency_key, pipeline, params, max_attempts, state, \
             last_error, error_kind, finished_at, enqueued_at) \
             VALUES ($1, $2, COALESCE($3, ''), COALESCE($4, '{}'::jsonb), 1, 'rejected', $5, \
             'permanent', now(), now()) \
             ON CONFLICT (idempotency_key) DO UPDATE SET state = 'rejected', \
             last_error = EXCLUDED.last_error, error_kind = 'permanent', finished_at = now(), \
             updated_at = now() WHERE drover.jobs.state = 'queued'",
        )
        .bind(Uuid::new_v4())
        .bind(key)
        .bind(pipeline)
        .bind(params.map(sqlx::types::Json))
        .bind(reason)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }
}

/// How [`Ledger::finish_held`] ends a held job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldEnd {
    Cancelled,
    Rejected,
    Released,
}

/// Opens a new attempt on a locked, claimable job.
async fn start_attempt(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    worker: &str,
) -> Result<ClaimedJob, LedgerError> {
    let r: ClaimedRow = sqlx::query_as(
        "UPDATE drover.jobs SET state = 'running', attempts = attempts + 1, lease_owner = $2, \
         heartbeat_at = now(), run_at = NULL, started_at = COALESCE(started_at, now()), \
         enqueued_at = COALESCE(enqueued_at, now()), \
         updated_at = now() WHERE id = $1 \
         RETURNING id, idempotency_key, pipeline, params, batch_size, attempts, max_attempts, \
         batches_done, trace_id, timeout_secs",
    )
    .bind(id)
    .bind(worker)
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query("INSERT INTO drover.attempts (job_id, attempt, worker) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(r.attempts)
        .bind(worker)
        .execute(&mut **tx)
        .await?;
    Ok(ClaimedJob::from(r))
}

/// A job's successful end, for [`Ledger::complete_many`]: its result and, folded into the
/// same statement, the checkpoint of its last batch when that was not committed yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub id: Uuid,
    pub attempt: i32,
    pub result: Value,
    /// The last batch, checkpointed together with the success (saves a commit per job).
    pub final_batch: Option<BatchRecord>,
    /// Fills `batches_total` when it is still unset.
    pub batches_total: Option<i32>,
    /// The job's identity, when this attempt has not recorded it with a checkpoint.
    pub identity: Option<IdentityRecord>,
}

impl Completion {
    /// The completion of `job`'s current attempt.
    pub fn of(job: &ClaimedJob, result: Value) -> Self {
        Completion {
            id: job.id,
            attempt: job.attempt,
            result,
            final_batch: None,
            batches_total: None,
            identity: None,
        }
    }
}

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    id: Uuid,
    idempotency_key: String,
    pipeline: String,
    params: sqlx::types::Json<Value>,
    batch_size: Option<i32>,
    attempts: i32,
    max_attempts: i32,
    batches_done: i32,
    trace_id: Option<String>,
    timeout_secs: Option<i32>,
}

impl From<ClaimedRow> for ClaimedJob {
    fn from(r: ClaimedRow) -> Self {
        ClaimedJob {
            id: r.id,
            key: r.idempotency_key,
            pipeline: r.pipeline,
            params: r.params.0,
            batch_size: r.batch_size,
            attempt: r.attempts,
            max_attempts: r.max_attempts,
            batches_done: r.batches_done,
            trace_id: r.trace_id,
            timeout_secs: r.timeout_secs,
        }
    }
}

impl Ledger {
    /// The fast path of [`Ledger::claim`] for many deliveries at once, in one statement (one
    /// commit): every key whose job is plainly claimable (`queued`, or `retrying` and due, and
    /// no cancellation requested) gets a new attempt owned by `worker`. Returns, per key in
    /// order, the claimed job or `None`: the job is unknown, terminal, not due, cancelled,
    /// held by another worker or locked right now, and the caller must decide with
    /// [`Ledger::claim`]. A key given twice is claimed once (for its first occurrence).
    ///
    /// Rows are locked with `SKIP LOCKED`, so concurrent workers never wait on or deadlock
    /// with each other here.
    ///
    /// Each key is looked up on its own through the unique key index (the `LATERAL ...
    /// LIMIT 1`, which also keeps Postgres from pushing the state filter into the lookup).
    /// Written as `idempotency_key = ANY($1) AND state IN (...)`, the planner chose to scan
    /// the state indexes instead whenever its statistics said few jobs were queued: every
    /// claim then read every index entry of a queued or running row, dead ones included,
    /// which under load is thousands of entries for a handful of rows (see
    /// docs/benchmarks.md).
    pub async fn claim_ready(
        &self,
        worker: &str,
        keys: &[String],
    ) -> Result<Vec<Option<ClaimedJob>>, LedgerError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<ClaimedRow> = sqlx::query_as(
            r#"
            WITH c AS (
                SELECT j.id FROM (SELECT DISTINCT key FROM unnest($1::text[]) AS k(key)) k,
                LATERAL (SELECT id, state, run_at, cancel_requested FROM drover.jobs
                         WHERE idempotency_key = k.key
                         LIMIT 1 FOR UPDATE SKIP LOCKED) j
                WHERE j.state IN ('queued', 'retrying')
                  AND (j.run_at IS NULL OR j.run_at <= now())
                  AND NOT j.cancel_requested
            ), u AS (
                UPDATE drover.jobs j
                SET state = 'running', attempts = j.attempts + 1, lease_owner = $2,
                    heartbeat_at = now(), run_at = NULL,
                    enqueued_at = COALESCE(j.enqueued_at, now()),
                    started_at = COALESCE(j.started_at, now()), updated_at = now()
                FROM c WHERE j.id = c.id
                RETURNING j.id, j.idempotency_key, j.pipeline, j.params, j.batch_size,
                          j.attempts, j.max_attempts, j.batches_done, j.trace_id,
                          j.timeout_secs
            ), a AS (
                INSERT INTO drover.attempts (job_id, attempt, worker)
                SELECT id, attempts, $2 FROM u
            )
            SELECT * FROM u
            "#,
        )
        .bind(keys)
        .bind(worker)
        .fetch_all(&self.pool)
        .await?;
        let mut by_key: std::collections::HashMap<String, ClaimedJob> = rows
            .into_iter()
            .map(|r| (r.idempotency_key.clone(), ClaimedJob::from(r)))
            .collect();
        Ok(keys.iter().map(|k| by_key.remove(k)).collect())
    }

    /// `running → succeeded` for many jobs in one statement (one commit), each conditioned
    /// on `worker` still holding its lease, each optionally with its last batch's checkpoint
    /// (replaying a batch index overwrites it and corrects `rows_done`, as
    /// [`Ledger::checkpoint`] does). Returns, per completion in order, `Ok` or [`LeaseLost`].
    ///
    /// Rows are locked in id order, each looked up by its primary key (the `LATERAL ...
    /// LIMIT 1`, for the same reason as in [`Ledger::claim_ready`]).
    pub async fn complete_many(
        &self,
        worker: &str,
        items: &[Completion],
    ) -> Result<Vec<Result<(), LeaseLost>>, LedgerError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let n = items.len();
        let mut ids = Vec::with_capacity(n);
        let mut attempts = Vec::with_capacity(n);
        let mut results = Vec::with_capacity(n);
        let mut indexes: Vec<Option<i32>> = Vec::with_capacity(n);
        let mut rows: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut outputs: Vec<Option<String>> = Vec::with_capacity(n);
        let mut checksums: Vec<Option<String>> = Vec::with_capacity(n);
        let mut summaries = Vec::with_capacity(n);
        let mut totals: Vec<Option<i32>> = Vec::with_capacity(n);
        let mut first_rows: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut rows_out: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut versions: Vec<Option<String>> = Vec::with_capacity(n);
        let mut inputs: Vec<Option<sqlx::types::Json<Value>>> = Vec::with_capacity(n);
        for c in items {
            first_rows.push(c.final_batch.as_ref().and_then(|b| b.first_row));
            rows_out.push(c.final_batch.as_ref().and_then(|b| b.rows_out));
            versions.push(c.identity.as_ref().map(|i| i.pipeline_version.clone()));
            inputs.push(
                c.identity
                    .as_ref()
                    .map(|i| sqlx::types::Json(i.inputs.clone())),
            );
            ids.push(c.id);
            attempts.push(c.attempt);
            results.push(sqlx::types::Json(c.result.clone()));
            let b = c.final_batch.as_ref();
            indexes.push(b.map(|b| b.batch_index));
            rows.push(b.map(|b| b.rows));
            outputs.push(b.and_then(|b| b.output.clone()));
            checksums.push(b.and_then(|b| b.checksum.clone()));
            summaries.push(
                b.map(|b| b.summary.clone())
                    .unwrap_or_else(|| sqlx::types::Json(Value::Object(Default::default()))),
            );
            totals.push(c.batches_total);
        }
        let done: Vec<Uuid> = sqlx::query_scalar(
            r#"
            WITH input AS (
                SELECT * FROM unnest($2::uuid[], $3::int4[], $4::jsonb[], $5::int4[],
                                     $6::int8[], $7::text[], $8::text[], $9::jsonb[],
                                     $10::int4[], $11::int8[], $12::int8[], $13::text[],
                                     $14::jsonb[])
                    AS t(job_id, attempt, result, batch_index, batch_rows, output, checksum,
                         summary, total, first_row, rows_out, version, inputs)
            ), lease AS (
                SELECT i.* FROM (SELECT * FROM input ORDER BY job_id) i,
                LATERAL (SELECT lease_owner, attempts, state FROM drover.jobs
                         WHERE id = i.job_id LIMIT 1 FOR UPDATE) cur
                WHERE cur.lease_owner = $1 AND cur.attempts = i.attempt
                  AND cur.state = 'running'
            ), old AS (
                SELECT c.job_id, c.rows FROM drover.checkpoints c
                JOIN lease l ON c.job_id = l.job_id AND c.batch_index = l.batch_index
            ), cp AS (
                INSERT INTO drover.checkpoints (job_id, batch_index, rows, output, checksum,
                                                summary, attempt, first_row, rows_out)
                SELECT job_id, batch_index, batch_rows, output, checksum, summary, attempt,
                       first_row, rows_out
                FROM lease WHERE batch_index IS NOT NULL
                ON CONFLICT (job_id, batch_index) DO UPDATE
                    SET rows = EXCLUDED.rows, output = EXCLUDED.output,
                        checksum = EXCLUDED.checksum, summary = EXCLUDED.summary,
                        attempt = EXCLUDED.attempt, first_row = EXCLUDED.first_row,
                        rows_out = EXCLUDED.rows_out, committed_at = now()
            ), j AS (
                UPDATE drover.jobs j
                SET state = 'succeeded', result = l.result, lease_owner = NULL,
                    batches_done = CASE WHEN l.batch_index IS NULL THEN j.batches_done
                                        ELSE GREATEST(j.batches_done, l.batch_index + 1) END,
                    batches_total = COALESCE(j.batches_total, l.total),
                    pipeline_version = COALESCE(l.version, j.pipeline_version),
                    inputs = COALESCE(l.inputs, j.inputs),
                    rows_done = j.rows_done + COALESCE(l.batch_rows, 0)
                        - COALESCE((SELECT o.rows FROM old o WHERE o.job_id = l.job_id), 0),
                    finished_at = now(), updated_at = now()
                FROM lease l
                WHERE j.id = l.job_id
                RETURNING j.id, l.attempt
            ), a AS (
                UPDATE drover.attempts a SET outcome = 'succeeded', finished_at = now()
                FROM j WHERE a.job_id = j.id AND a.attempt = j.attempt
            )
            SELECT id FROM j
            "#,
        )
        .bind(worker)
        .bind(&ids)
        .bind(&attempts)
        .bind(&results)
        .bind(&indexes)
        .bind(&rows)
        .bind(&outputs)
        .bind(&checksums)
        .bind(&summaries)
        .bind(&totals)
        .bind(&first_rows)
        .bind(&rows_out)
        .bind(&versions)
        .bind(&inputs)
        .fetch_all(&self.pool)
        .await?;
        let done: std::collections::HashSet<Uuid> = done.into_iter().collect();
        Ok(ids
            .iter()
            .map(|id| {
                if done.contains(id) {
                    Ok(())
                } else {
                    Err(LeaseLost)
                }
            })
            .collect())
    }
}

/// One batch's checkpoint statement; `None` when the lease is lost.
async fn checkpoint_in(
    tx: &mut sqlx::PgConnection,
    job: &ClaimedJob,
    worker: &str,
    batch: &BatchRecord,
    batches_total: Option<i32>,
) -> Result<Option<bool>, LedgerError> {
    let cancel: Option<bool> = sqlx::query_scalar(
        r#"
        WITH lease AS (
            SELECT id FROM drover.jobs
            WHERE id = $1 AND lease_owner = $2 AND attempts = $3 AND state = 'running'
            FOR UPDATE
        ), old AS (
            SELECT rows FROM drover.checkpoints WHERE job_id = $1 AND batch_index = $4
        ), cp AS (
            INSERT INTO drover.checkpoints (job_id, batch_index, rows, output, checksum,
                                            summary, attempt, first_row, rows_out)
            SELECT id, $4, $5, $6, $7, $8, $3, $10, $11 FROM lease
            ON CONFLICT (job_id, batch_index) DO UPDATE
                SET rows = EXCLUDED.rows, output = EXCLUDED.output,
                    checksum = EXCLUDED.checksum, summary = EXCLUDED.summary,
                    attempt = EXCLUDED.attempt, first_row = EXCLUDED.first_row,
                    rows_out = EXCLUDED.rows_out, committed_at = now()
            RETURNING 1
        )
        UPDATE drover.jobs j
        SET batches_done = GREATEST(j.batches_done, $4 + 1),
            batches_total = COALESCE(j.batches_total, $9),
            rows_done = j.rows_done + $5 - COALESCE((SELECT rows FROM old), 0),
            heartbeat_at = now(),
            updated_at = now()
        FROM lease
        WHERE j.id = lease.id AND EXISTS (SELECT 1 FROM cp)
        RETURNING j.cancel_requested
        "#,
    )
    .bind(job.id)
    .bind(worker)
    .bind(job.attempt)
    .bind(batch.batch_index)
    .bind(batch.rows)
    .bind(&batch.output)
    .bind(&batch.checksum)
    .bind(&batch.summary)
    .bind(batches_total)
    .bind(batch.first_row)
    .bind(batch.rows_out)
    .fetch_optional(tx)
    .await?;
    Ok(cancel)
}
