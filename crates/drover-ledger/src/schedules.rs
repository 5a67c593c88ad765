//! Schedules: their rows, and the sweep every worker runs to fire the due ones.
//!
//! Exactly once per slot, leader-free: [`Ledger::fire_schedules`] locks due schedules with
//! `FOR UPDATE SKIP LOCKED`, enqueues each firing slot's job with `drover.enqueue()` (key
//! from the schedule's template, so even a slot fired twice would be one job), and advances
//! `next_slot`, all in one transaction. A worker that dies mid-sweep rolls back: the slot is
//! still due and the next sweep (its own or another worker's) fires it. Time is the
//! database's `now()`, so workers with skewed clocks agree on what is due.

use crate::{Ledger, LedgerError};
use chrono::{DateTime, Utc};
use drover_core::schedule::{self, CatchUp, KeyTemplate, Spec};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;

/// A schedule to add.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    /// 1-64 of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// When its slots fall.
    pub spec: Spec,
    /// The pipeline of its jobs.
    pub pipeline: String,
    /// The params of its jobs (a JSON object).
    pub params: serde_json::Map<String, Value>,
    /// The batch size of its jobs (the pipeline's default when absent).
    pub batch_size: Option<i32>,
    /// The idempotency key of each slot's job.
    pub key_template: KeyTemplate,
    /// What happens to slots missed while no worker ran.
    pub catch_up: CatchUp,
    /// The first slot to fire.
    pub next_slot: DateTime<Utc>,
}

/// A schedule as stored, for `drover schedules list`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ScheduleView {
    pub name: String,
    pub cron: Option<String>,
    pub every_secs: Option<i64>,
    pub pipeline: String,
    pub params: Json<Value>,
    pub batch_size: Option<i32>,
    pub key_template: String,
    pub catch_up: String,
    pub paused: bool,
    pub next_slot: DateTime<Utc>,
    pub last_slot: Option<DateTime<Utc>>,
    pub last_key: Option<String>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// One slot fired by a sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// The schedule.
    pub schedule: String,
    /// The slot.
    pub slot: DateTime<Utc>,
    /// The key of its job.
    pub key: String,
    /// False when a job with that key existed already (nothing new was enqueued).
    pub new: bool,
}

/// What one sweep did.
#[derive(Debug, Default)]
pub struct FireReport {
    /// Slots fired, by schedule then slot.
    pub fired: Vec<Fired>,
    /// Due slots skipped by a catch-up policy: (schedule, how many, policy).
    pub skipped: Vec<(String, u64, CatchUp)>,
    /// Schedules that could not fire: (schedule, why). Stored in `last_error` too.
    pub errors: Vec<(String, String)>,
}

#[derive(sqlx::FromRow)]
struct DueRow {
    name: String,
    cron: Option<String>,
    every_secs: Option<i64>,
    pipeline: String,
    params: Json<Value>,
    batch_size: Option<i32>,
    key_template: String,
    catch_up: String,
    next_slot: DateTime<Utc>,
}

const COLUMNS: &str = "name, cron, every_secs, pipeline, params, batch_size, key_template, \
                       catch_up, paused, next_slot, last_slot, last_key, last_error, created_at";

impl Ledger {
    /// Adds a schedule. Refuses a name in use (names the existing schedule).
    pub async fn add_schedule(&self, s: &NewSchedule) -> Result<(), LedgerError> {
        let inserted = sqlx::query(
            "INSERT INTO drover.schedules (name, cron, every_secs, pipeline, params, batch_size, \
             key_template, catch_up, next_slot) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&s.name)
        .bind(s.spec.cron_expr())
        .bind(s.spec.every_secs())
        .bind(&s.pipeline)
        .bind(Json(Value::Object(s.params.clone())))
        .bind(s.batch_size)
        .bind(s.key_template.as_str())
        .bind(s.catch_up.as_str())
        .bind(s.next_slot)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(LedgerError::Invalid {
                field: "NAME",
                message: format!(
                    "{:?}: a schedule of that name exists; `drover schedules remove {}` first",
                    s.name, s.name
                ),
            });
        }
        Ok(())
    }

    /// Every schedule, by name.
    pub async fn schedules(&self) -> Result<Vec<ScheduleView>, LedgerError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM drover.schedules ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await?)
    }

    /// One schedule.
    pub async fn schedule(&self, name: &str) -> Result<Option<ScheduleView>, LedgerError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM drover.schedules WHERE name = $1"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Removes a schedule (its jobs stay). False when there is none of that name.
    pub async fn remove_schedule(&self, name: &str) -> Result<bool, LedgerError> {
        let n = sqlx::query("DELETE FROM drover.schedules WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    /// Pauses a schedule: no slot fires until it is resumed. False when there is none.
    pub async fn pause_schedule(&self, name: &str) -> Result<bool, LedgerError> {
        let n = sqlx::query(
            "UPDATE drover.schedules SET paused = true, updated_at = now() WHERE name = $1",
        )
        .bind(name)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    /// Resumes a schedule from `next_slot` (the first slot after now: slots that fell while
    /// it was paused do not fire). False when there is none.
    pub async fn resume_schedule(
        &self,
        name: &str,
        next_slot: DateTime<Utc>,
    ) -> Result<bool, LedgerError> {
        let n = sqlx::query(
            "UPDATE drover.schedules SET paused = false, next_slot = $2, last_error = NULL, \
             updated_at = now() WHERE name = $1",
        )
        .bind(name)
        .bind(next_slot)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    /// The database's clock (what the sweeps compare slots with).
    pub async fn now(&self) -> Result<DateTime<Utc>, LedgerError> {
        Ok(sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Fires the due slots of up to `limit` due, active schedules (skipping those another
    /// worker is firing), in one transaction: see the module's description.
    pub async fn fire_schedules(&self, limit: i64) -> Result<FireReport, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(&mut *tx)
            .await?;
        let due: Vec<DueRow> = sqlx::query_as(
            "SELECT name, cron, every_secs, pipeline, params, batch_size, key_template, \
             catch_up, next_slot FROM drover.schedules \
             WHERE NOT paused AND next_slot <= now() \
             ORDER BY next_slot LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut report = FireReport::default();
        for row in due {
            let plan = (|| {
                let spec = Spec::stored(row.cron.as_deref(), row.every_secs)?;
                let template = KeyTemplate::parse(&row.key_template)?;
                let catch_up: CatchUp = row.catch_up.parse()?;
                let due = schedule::due_slots(&spec, row.next_slot, now, catch_up)?;
                Ok::<_, schedule::ScheduleError>((template, catch_up, due))
            })();
            let (template, catch_up, due) = match plan {
                Ok(p) => p,
                Err(e) => {
                    let why = format!("cannot evaluate the schedule: {e}");
                    self.schedule_error(&mut tx, &row.name, &why).await?;
                    report.errors.push((row.name.clone(), why));
                    continue;
                }
            };
            let mut last: Option<(DateTime<Utc>, String)> = None;
            let mut failed: Option<String> = None;
            for slot in &due.fire {
                let key = template.render(&row.name, *slot);
                // A savepoint per slot: a refused enqueue (the key exists for another
                // request) leaves the rest of the sweep intact.
                let mut sp = sqlx::Acquire::begin(&mut *tx).await?;
                let new: Result<bool, sqlx::Error> =
                    sqlx::query_scalar("SELECT drover.enqueue($1, $2, $3, $4, NULL, NULL)")
                        .bind(&key)
                        .bind(&row.pipeline)
                        .bind(&row.params)
                        .bind(row.batch_size)
                        .fetch_one(&mut *sp)
                        .await;
                match new {
                    Ok(new) => {
                        sp.commit().await?;
                        report.fired.push(Fired {
                            schedule: row.name.clone(),
                            slot: *slot,
                            key: key.clone(),
                            new,
                        });
                        last = Some((*slot, key));
                    }
                    Err(sqlx::Error::Database(db)) => {
                        sp.rollback().await?;
                        failed = Some(format!("slot {slot}: key {key:?}: {}", db.message()));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if due.skipped > 0 {
                report
                    .skipped
                    .push((row.name.clone(), due.skipped, catch_up));
            }
            sqlx::query(
                "UPDATE drover.schedules SET next_slot = $2, \
                 last_slot = COALESCE($3, last_slot), last_key = COALESCE($4, last_key), \
                 last_error = $5, updated_at = now() WHERE name = $1",
            )
            .bind(&row.name)
            .bind(due.next)
            .bind(last.as_ref().map(|l| l.0))
            .bind(last.as_ref().map(|l| l.1.clone()))
            .bind(&failed)
            .execute(&mut *tx)
            .await?;
            if let Some(why) = failed {
                report.errors.push((row.name.clone(), why));
            }
        }
        tx.commit().await?;
        Ok(report)
    }

    async fn schedule_error(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        name: &str,
        why: &str,
    ) -> Result<(), LedgerError> {
        sqlx::query(
            "UPDATE drover.schedules SET last_error = $2, updated_at = now() WHERE name = $1",
        )
        .bind(name)
        .bind(why)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}
