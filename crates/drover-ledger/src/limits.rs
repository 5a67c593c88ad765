//! Concurrency limits beyond the prefetch, enforced in the ledger so they hold across any
//! number of workers: per pipeline per worker, per pipeline across all workers, and per
//! group (at most N running jobs per value of a param such as `client_id`).
//!
//! A delivery of a limited pipeline is claimed by [`Ledger::claim_limited`], which takes a
//! transaction-scoped advisory lock per pipeline, so two workers never both see a free slot:
//! counting the running jobs and starting the attempt happen under it. A job over a limit is
//! held back, not failed: no attempt is counted, it stays `queued` (or `retrying`) with
//! `run_at` [`HOLD_BACK`] ahead and no message, and the relay publishes it again then; the
//! delivery in hand is acked. So it is retried until a slot is free, and it is never lost:
//! the ledger holds it meanwhile.

use crate::{Claim, LeaseSeen, Ledger, LedgerError};
use drover_core::JobMessage;
use std::time::Duration;
use uuid::Uuid;

/// How long a job held back by a limit waits before the relay publishes it again.
pub const HOLD_BACK: Duration = Duration::from_secs(2);

/// The concurrency limits of one pipeline (every worker of a namespace must use the same
/// `total` and group limit: each enforces what it was given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Most jobs of the pipeline running on one worker.
    pub per_worker: Option<u32>,
    /// Most jobs of the pipeline running across all workers.
    pub total: Option<u32>,
    /// Most running jobs per value of a param: (param name, limit). Jobs without the param
    /// are not grouped.
    pub per_group: Option<(String, u32)>,
}

impl Ledger {
    /// [`Ledger::claim`] for a pipeline with `limits`: the same decisions, and an attempt
    /// starts only while every limit has room; otherwise [`Claim::HeldBack`].
    pub async fn claim_limited(
        &self,
        msg: &JobMessage,
        max_attempts: i32,
        worker: &str,
        trace_id: Option<&str>,
        takeover: Option<&LeaseSeen>,
        limits: &Limits,
    ) -> Result<Claim, LedgerError> {
        let mut tx = self.pool.begin().await?;
        // One lock per pipeline, released at commit: the count and the claim are atomic
        // with respect to every other limited claim of the pipeline.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('drover.limits:' || $1, 0))")
            .bind(&msg.pipeline)
            .execute(&mut *tx)
            .await?;
        Ledger::claim_in(
            tx,
            msg,
            max_attempts,
            worker,
            trace_id,
            takeover,
            Some(limits),
        )
        .await
    }
}

/// The first limit that starting job `id` would exceed, described, or `None`.
pub(crate) async fn over_limit(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    limits: &Limits,
    id: Uuid,
    msg: &JobMessage,
    worker: &str,
) -> Result<Option<String>, LedgerError> {
    let group = limits
        .per_group
        .as_ref()
        .and_then(|(param, n)| msg.params.get(param).map(|v| (param, *n, v.clone())));
    let (total, mine, in_group): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE lease_owner = $3), \
         count(*) FILTER (WHERE $4::text IS NOT NULL AND params -> $4::text = $5) \
         FROM drover.jobs WHERE state = 'running' AND pipeline = $1 AND id <> $2",
    )
    .bind(&msg.pipeline)
    .bind(id)
    .bind(worker)
    .bind(group.as_ref().map(|g| g.0.as_str()))
    .bind(group.as_ref().map(|g| sqlx::types::Json(g.2.clone())))
    .fetch_one(&mut **tx)
    .await?;
    if let Some(n) = limits.per_worker
        && mine >= i64::from(n)
    {
        return Ok(Some(format!("per_worker {n} ({mine} running on {worker})")));
    }
    if let Some(n) = limits.total
        && total >= i64::from(n)
    {
        return Ok(Some(format!("total {n} ({total} running)")));
    }
    if let Some((param, n, value)) = &group
        && in_group >= i64::from(*n)
    {
        return Ok(Some(format!(
            "per_group {n} ({param} = {value}: {in_group} running)"
        )));
    }
    Ok(None)
}
