//! What the dashboard reads and records: a keyset-paged job list, throughput by minute,
//! the workers holding leases, retries due, a job's checkpoints, and the audit log of the
//! dashboard's actions (`drover.actions`). The actions themselves are the operator
//! transitions of `read.rs` ([`Ledger::redrive`], [`Ledger::request_cancel`]), the same ones
//! `drover jobs retry/cancel` use.
//!
//! The list's queries are built with only the filters given, so each one walks one of the
//! indexes of `migrations/20261203000002_dashboard.sql` in order and stops after a page,
//! however many jobs the ledger holds.

use crate::{Ledger, LedgerError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

/// The largest page the list serves.
pub const MAX_PAGE: i64 = 500;

/// Where a page of the job list starts: after the last row of the previous page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// Newest-first order: the (created_at, id) of the previous page's last job.
    Created { at: DateTime<Utc>, id: Uuid },
    /// Key order (key search): the previous page's last key.
    Key(String),
}

impl Cursor {
    /// The cursor as a URL parameter value: `c<micros>.<uuid>` or `k<key>`.
    pub fn encode(&self) -> String {
        match self {
            Cursor::Created { at, id } => format!("c{}.{}", at.timestamp_micros(), id.simple()),
            Cursor::Key(k) => format!("k{k}"),
        }
    }

    /// Parses [`Cursor::encode`]'s form; the error names the value.
    pub fn decode(s: &str) -> Result<Cursor, LedgerError> {
        let bad = || LedgerError::BadInput {
            field: "after",
            message: format!("{s:?} is not a page cursor"),
        };
        if let Some(k) = s.strip_prefix('k') {
            return Ok(Cursor::Key(k.to_string()));
        }
        let rest = s.strip_prefix('c').ok_or_else(bad)?;
        let (micros, id) = rest.split_once('.').ok_or_else(bad)?;
        let micros: i64 = micros.parse().map_err(|_| bad())?;
        let at = DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(bad)?;
        let id = Uuid::parse_str(id).map_err(|_| bad())?;
        Ok(Cursor::Created { at, id })
    }
}

/// Filters and position of one page of the job list.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub state: Option<String>,
    pub pipeline: Option<String>,
    /// Key prefix: when set, the list is in key order instead of newest first.
    pub key_prefix: Option<String>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
    pub after: Option<Cursor>,
    /// Page size, 1..=[`MAX_PAGE`].
    pub limit: i64,
}

/// One row of the job list.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub idempotency_key: String,
    pub pipeline: String,
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub batches_done: i32,
    pub batches_total: Option<i32>,
    pub rows_done: i64,
    pub error_kind: Option<String>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One page of the job list and where the next one starts (`None`: this is the last).
#[derive(Debug, Clone, Serialize)]
pub struct JobPage {
    pub jobs: Vec<JobRow>,
    #[serde(skip)]
    pub next: Option<Cursor>,
}

/// Jobs finished in one minute: succeeded, and failed for good (dead or rejected).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct MinuteCount {
    pub minute: DateTime<Utc>,
    pub succeeded: i64,
    pub failed: i64,
}

/// A worker as the ledger sees it: the running jobs it holds a lease on.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct WorkerLeases {
    pub worker: String,
    pub jobs: i64,
    /// The keys it holds (at most 20, oldest claim first).
    pub keys: Vec<String>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Whether its newest heartbeat is within the staleness bound given to the query.
    pub alive: bool,
}

/// Retries scheduled in the ledger, and how many of them are due now.
#[derive(Debug, Clone, Copy, Serialize, sqlx::FromRow)]
pub struct RetryCounts {
    pub scheduled: i64,
    pub due: i64,
}

/// One checkpointed batch of a job: a line of its output manifest.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct CheckpointView {
    pub batch_index: i32,
    pub rows: i64,
    pub output: Option<String>,
    pub checksum: Option<String>,
    pub attempt: i32,
    pub committed_at: DateTime<Utc>,
}

/// An action taken from the dashboard, to record in `drover.actions`.
#[derive(Debug, Clone)]
pub struct NewAction<'a> {
    /// `retry`, `cancel` or `bulk_retry_dead`.
    pub action: &'a str,
    pub keys: &'a [String],
    pub filter: Option<Value>,
    pub outcome: &'a str,
    /// `session` (browser) or `bearer` (script).
    pub via: &'a str,
    pub remote_addr: Option<String>,
    pub user_agent: Option<String>,
}

/// One recorded action.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ActionView {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub action: String,
    pub keys: Vec<String>,
    pub filter: Option<sqlx::types::Json<Value>>,
    pub outcome: String,
    pub via: String,
    pub remote_addr: Option<String>,
    pub user_agent: Option<String>,
}

const ROW_COLUMNS: &str = "id, idempotency_key, pipeline, state, attempts, max_attempts, \
     batches_done, batches_total, rows_done, error_kind, left(last_error, 300) AS last_error, \
     created_at, finished_at";

/// Adds `key starts with prefix` as a range on the byte-order key index: `>= prefix` and
/// `< prefix + U+10FFFF` bound the index scan (a bind parameter in `LIKE` would not, once
/// Postgres switches a prepared statement to its generic plan), `starts_with` makes it exact.
/// The only keys it misses start with the prefix followed by the noncharacter U+10FFFF.
fn push_prefix(b: &mut QueryBuilder<Postgres>, prefix: &str) {
    b.push(" AND idempotency_key COLLATE \"C\" >= ")
        .push_bind(prefix.to_string())
        .push(" AND idempotency_key COLLATE \"C\" < ")
        .push_bind(format!("{prefix}\u{10FFFF}"))
        .push(" AND starts_with(idempotency_key, ")
        .push_bind(prefix.to_string())
        .push(")");
}

impl Ledger {
    /// One page of jobs matching `q`: newest first, or in key order when searching by key
    /// prefix. Keyset-paged, so page 1,000 costs what page 1 does.
    pub async fn list_page(&self, q: &ListQuery) -> Result<JobPage, LedgerError> {
        if !(1..=MAX_PAGE).contains(&q.limit) {
            return Err(LedgerError::BadInput {
                field: "limit",
                message: format!("{} is not within 1..={MAX_PAGE}", q.limit),
            });
        }
        let by_key = q.key_prefix.is_some();
        let mut b: QueryBuilder<Postgres> =
            QueryBuilder::new(format!("SELECT {ROW_COLUMNS} FROM drover.jobs WHERE true"));
        if let Some(s) = &q.state {
            b.push(" AND state = ").push_bind(s.clone());
        }
        if let Some(p) = &q.pipeline {
            b.push(" AND pipeline = ").push_bind(p.clone());
        }
        if let Some(prefix) = &q.key_prefix {
            push_prefix(&mut b, prefix);
        }
        if let Some(t) = q.since {
            b.push(" AND created_at >= ").push_bind(t);
        }
        if let Some(t) = q.until {
            b.push(" AND created_at < ").push_bind(t);
        }
        match (&q.after, by_key) {
            (None, _) => {}
            (Some(Cursor::Key(k)), true) => {
                b.push(" AND idempotency_key COLLATE \"C\" > ")
                    .push_bind(k.clone());
            }
            (Some(Cursor::Created { at, id }), false) => {
                b.push(" AND (created_at, id) < (")
                    .push_bind(*at)
                    .push(", ")
                    .push_bind(*id)
                    .push(")");
            }
            (Some(_), _) => {
                return Err(LedgerError::BadInput {
                    field: "after",
                    message: "the cursor belongs to another ordering (key search or not)".into(),
                });
            }
        }
        if by_key {
            b.push(" ORDER BY idempotency_key COLLATE \"C\"");
        } else {
            b.push(" ORDER BY created_at DESC, id DESC");
        }
        // One more than a page tells whether there is a next one.
        b.push(" LIMIT ").push_bind(q.limit + 1);
        let mut jobs: Vec<JobRow> = b.build_query_as().fetch_all(&self.pool).await?;
        let more = jobs.len() as i64 > q.limit;
        jobs.truncate(q.limit as usize);
        let next = match (more, jobs.last()) {
            (true, Some(last)) if by_key => Some(Cursor::Key(last.idempotency_key.clone())),
            (true, Some(last)) => Some(Cursor::Created {
                at: last.created_at,
                id: last.id,
            }),
            _ => None,
        };
        Ok(JobPage { jobs, next })
    }

    /// The distinct pipeline names in the ledger, for the list's filter.
    pub async fn pipelines(&self) -> Result<Vec<String>, LedgerError> {
        // A loose index scan over jobs_pipeline_created_idx: one probe per pipeline rather
        // than reading every row.
        Ok(sqlx::query_scalar(
            "WITH RECURSIVE p(name) AS ( \
               (SELECT pipeline FROM drover.jobs ORDER BY pipeline LIMIT 1) \
               UNION ALL \
               SELECT (SELECT pipeline FROM drover.jobs WHERE pipeline > p.name \
                       ORDER BY pipeline LIMIT 1) FROM p WHERE p.name IS NOT NULL) \
             SELECT name FROM p WHERE name IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Jobs that finished in each of the last `minutes` minutes (oldest first, every minute
    /// present, zeros included), succeeded and failed for good.
    pub async fn throughput(&self, minutes: i32) -> Result<Vec<MinuteCount>, LedgerError> {
        Ok(sqlx::query_as(
            "WITH m AS ( \
               SELECT generate_series(date_trunc('minute', now()) - make_interval(mins => $1 - 1), \
                                      date_trunc('minute', now()), interval '1 minute') AS minute), \
             f AS ( \
               SELECT date_trunc('minute', finished_at) AS minute, \
                      count(*) FILTER (WHERE state = 'succeeded') AS succeeded, \
                      count(*) FILTER (WHERE state IN ('dead', 'rejected')) AS failed \
               FROM drover.jobs \
               WHERE finished_at IS NOT NULL \
                 AND finished_at >= date_trunc('minute', now()) - make_interval(mins => $1 - 1) \
               GROUP BY 1) \
             SELECT m.minute, coalesce(f.succeeded, 0) AS succeeded, coalesce(f.failed, 0) AS failed \
             FROM m LEFT JOIN f USING (minute) ORDER BY m.minute",
        )
        .bind(minutes)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Workers holding leases on running jobs, with the keys they hold; `alive` when their
    /// newest heartbeat is younger than `stale_after_secs`.
    pub async fn worker_leases(
        &self,
        stale_after_secs: f64,
    ) -> Result<Vec<WorkerLeases>, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT lease_owner AS worker, count(*) AS jobs, \
               (array_agg(idempotency_key ORDER BY started_at NULLS LAST, idempotency_key))[1:20] AS keys, \
               max(heartbeat_at) AS last_heartbeat, \
               coalesce(max(heartbeat_at) >= now() - make_interval(secs => $1), false) AS alive \
             FROM drover.jobs WHERE state = 'running' AND lease_owner IS NOT NULL \
             GROUP BY lease_owner ORDER BY lease_owner",
        )
        .bind(stale_after_secs)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Retries scheduled, and those due now (the relay publishes them).
    pub async fn retry_counts(&self) -> Result<RetryCounts, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT count(*) AS scheduled, count(*) FILTER (WHERE run_at <= now()) AS due \
             FROM drover.jobs WHERE state = 'retrying'",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// A job's checkpointed batches in order (at most `limit`), and how many there are.
    pub async fn checkpoint_page(
        &self,
        job_id: Uuid,
        limit: i64,
    ) -> Result<(Vec<CheckpointView>, i64), LedgerError> {
        let rows = sqlx::query_as(
            "SELECT batch_index, rows, output, checksum, attempt, committed_at \
             FROM drover.checkpoints WHERE job_id = $1 ORDER BY batch_index LIMIT $2",
        )
        .bind(job_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let total: i64 =
            sqlx::query_scalar("SELECT count(*) FROM drover.checkpoints WHERE job_id = $1")
                .bind(job_id)
                .fetch_one(&self.pool)
                .await?;
        Ok((rows, total))
    }

    /// Keys of dead jobs matching the list filters (state is ignored: always `dead`), at
    /// most `limit`, oldest first: the targets of a bulk retry.
    pub async fn dead_keys(&self, q: &ListQuery, limit: i64) -> Result<Vec<String>, LedgerError> {
        let mut b: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT idempotency_key FROM drover.jobs WHERE state = 'dead'");
        if let Some(p) = &q.pipeline {
            b.push(" AND pipeline = ").push_bind(p.clone());
        }
        if let Some(prefix) = &q.key_prefix {
            push_prefix(&mut b, prefix);
        }
        if let Some(t) = q.since {
            b.push(" AND created_at >= ").push_bind(t);
        }
        if let Some(t) = q.until {
            b.push(" AND created_at < ").push_bind(t);
        }
        b.push(" ORDER BY created_at, id LIMIT ").push_bind(limit);
        Ok(b.build_query_scalar().fetch_all(&self.pool).await?)
    }

    /// Checks the dashboard's migration (`drover.actions`, the list indexes) has run, with
    /// the same hint as [`Ledger::check_schema`] when it has not.
    pub async fn check_dashboard_schema(&self) -> Result<(), LedgerError> {
        self.check_schema().await?;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('drover.actions') IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        if exists {
            Ok(())
        } else {
            Err(LedgerError::NotMigrated {
                url: drover_core::config::redact(&self.url),
            })
        }
    }

    /// Records a dashboard action in `drover.actions`; returns its id.
    pub async fn record_action(&self, a: &NewAction<'_>) -> Result<i64, LedgerError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO drover.actions (action, keys, filter, outcome, via, remote_addr, user_agent) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .bind(a.action)
        .bind(a.keys)
        .bind(a.filter.as_ref().map(sqlx::types::Json))
        .bind(a.outcome)
        .bind(a.via)
        .bind(&a.remote_addr)
        .bind(&a.user_agent)
        .fetch_one(&self.pool)
        .await?)
    }

    /// The newest recorded actions, optionally only those on `key`.
    pub async fn actions(
        &self,
        key: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ActionView>, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT id, at, action, keys, filter, outcome, via, remote_addr, user_agent \
             FROM drover.actions WHERE ($1::text IS NULL OR keys @> ARRAY[$1::text]) \
             ORDER BY id DESC LIMIT $2",
        )
        .bind(key)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let at = DateTime::<Utc>::from_timestamp_micros(1_764_000_000_123_456).unwrap();
        let c = Cursor::Created {
            at,
            id: Uuid::nil(),
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        let k = Cursor::Key("acme:2026-11/x y".into());
        assert_eq!(Cursor::decode(&k.encode()).unwrap(), k);
        for bad in [
            "",
            "x",
            "c12",
            "cabc.00000000000000000000000000000000",
            "c1.nope",
        ] {
            assert!(Cursor::decode(bad).is_err(), "{bad}");
        }
    }
}
