//! A Postgres table read in key order, one page per batch (keyset pagination).
//!
//! This is the "load the records for this client" case: rows are selected by equality
//! filters (e.g. `client_id`, `period`), ordered by an integer key, and each batch is
//! `WHERE key > last_key ORDER BY key LIMIT batch_size`, so memory is bounded by the batch
//! and a page costs the same at the end of a large table as at its start (no `OFFSET` scan).
//! The pipeline API is synchronous; the queries run on the caller's tokio runtime through
//! `Handle::block_on`, which is allowed on the blocking-pool threads batches run on.

use crate::PipelineError;
use polars::prelude::*;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Executor, Row};
use std::time::Duration;

/// Where a Postgres input comes from.
#[derive(Debug, Clone)]
pub(crate) struct PgInput {
    pub url: String,
    pub table: String,
    pub key: String,
    pub filters: Vec<(String, String)>,
}

/// An open keyset-paged reader.
pub(crate) struct PgSource {
    handle: tokio::runtime::Handle,
    pool: PgPool,
    page_sql: String,
    /// Declared columns present in the table, with their dtypes.
    columns: Vec<(PlSmallStr, DataType)>,
    filters: Vec<String>,
    last_key: Option<i64>,
    total_rows: u64,
    done: bool,
}

/// A SQL identifier (optionally schema-qualified), quoted; anything else is refused so a
/// param can never inject SQL.
pub(crate) fn quote_ident(name: &str) -> Result<String, PipelineError> {
    let parts: Vec<&str> = name.split('.').collect();
    let ok = !parts.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| {
            let mut chars = p.chars();
            chars
                .next()
                .map(|c| c.is_ascii_alphabetic() || c == '_')
                .unwrap_or(false)
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if !ok {
        return Err(PipelineError::permanent(format!(
            "{name:?} is not a table or column name ([A-Za-z_][A-Za-z0-9_]*, optionally schema.table)"
        )));
    }
    Ok(parts
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join("."))
}

/// Connection trouble is transient; a query Postgres refuses (no such table or column,
/// wrong type) is permanent.
fn pg_error(label: &str, e: sqlx::Error) -> PipelineError {
    let permanent = matches!(&e, sqlx::Error::Database(db)
        if db.code().map(|c| c.starts_with("42") || c.starts_with("22")).unwrap_or(false))
        || matches!(
            e,
            sqlx::Error::Configuration(_) | sqlx::Error::ColumnDecode { .. }
        );
    let msg = format!("input {label}: {e}");
    if permanent {
        PipelineError::permanent(msg)
    } else {
        PipelineError::transient(msg)
    }
}

impl PgSource {
    /// Connects, counts the selected rows, and positions after `skip_rows` of them.
    pub(crate) fn open(
        input: &PgInput,
        declared: &[(PlSmallStr, DataType)],
        skip_rows: u64,
        label: &str,
    ) -> Result<PgSource, PipelineError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            PipelineError::permanent(format!(
                "input {label}: a Postgres input must be read from within the async runtime"
            ))
        })?;
        let table = quote_ident(&input.table)?;
        let key = quote_ident(&input.key)?;
        let mut filters = Vec::new();
        let mut clauses = Vec::new();
        for (i, (col, value)) in input.filters.iter().enumerate() {
            clauses.push(format!("{}::text = ${}", quote_ident(col)?, i + 2));
            filters.push(value.clone());
        }
        let filter_sql = if clauses.is_empty() {
            "TRUE".to_string()
        } else {
            clauses.join(" AND ")
        };
        let pool = handle
            .block_on(
                PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(&input.url),
            )
            .map_err(|e| pg_error(label, e))?;
        // Which declared columns the table has: a missing one is left out of the batch so
        // the pipeline reports it in its own words.
        let describe_sql = format!("SELECT * FROM {table}");
        let described = handle
            .block_on(
                pool.describe(sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(
                    describe_sql,
                ))),
            )
            .map_err(|e| pg_error(label, e))?;
        let present: Vec<String> = described
            .columns()
            .iter()
            .map(|c| sqlx::Column::name(c).to_string())
            .collect();
        let columns: Vec<(PlSmallStr, DataType)> = declared
            .iter()
            .filter(|(n, _)| present.iter().any(|p| p == n.as_str()))
            .cloned()
            .collect();
        if columns.is_empty() {
            return Err(PipelineError::permanent(format!(
                "input {label}: the table has none of the declared columns"
            )));
        }
        let select: Vec<String> = columns
            .iter()
            .map(|(n, t)| {
                let cast = if *t == DataType::Int64 {
                    "int8"
                } else {
                    "text"
                };
                Ok(format!(
                    "{}::{cast} AS {}",
                    quote_ident(n)?,
                    quote_ident(n)?
                ))
            })
            .collect::<Result<_, PipelineError>>()?;
        // $1 = last key (NULL for the first page), $2.. = filters, then the page size.
        let limit_param = filters.len() + 2;
        let page_sql = format!(
            "SELECT {}, {key}::int8 AS \"__drover_key\" FROM {table} \
             WHERE {filter_sql} AND ($1::int8 IS NULL OR {key} > $1) \
             ORDER BY {key} LIMIT ${limit_param}",
            select.join(", ")
        );
        let count_sql =
            format!("SELECT count(*) FROM {table} WHERE {filter_sql} AND $1::int8 IS NULL");
        let mut q = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(count_sql)).bind(None::<i64>);
        for f in &filters {
            q = q.bind(f);
        }
        let total_rows = handle
            .block_on(q.fetch_one(&pool))
            .map_err(|e| pg_error(label, e))? as u64;
        let mut last_key = None;
        if skip_rows > 0 && skip_rows < total_rows {
            // The key of the last skipped row: one OFFSET scan at resume, keyset after it.
            let skip_sql = format!(
                "SELECT {key}::int8 FROM {table} WHERE {filter_sql} AND $1::int8 IS NULL \
                 ORDER BY {key} OFFSET {} LIMIT 1",
                skip_rows - 1
            );
            let mut q =
                sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(skip_sql)).bind(None::<i64>);
            for f in &filters {
                q = q.bind(f);
            }
            last_key = Some(
                handle
                    .block_on(q.fetch_one(&pool))
                    .map_err(|e| pg_error(label, e))?,
            );
        }
        Ok(PgSource {
            handle,
            pool,
            page_sql,
            columns,
            filters,
            last_key,
            total_rows,
            done: skip_rows >= total_rows,
        })
    }

    /// Rows the filters select.
    pub(crate) fn total_rows(&self) -> u64 {
        self.total_rows
    }

    /// The next page as a DataFrame, or `None` after the last.
    pub(crate) fn read(
        &mut self,
        batch_size: usize,
        label: &str,
    ) -> Result<Option<DataFrame>, PipelineError> {
        if self.done {
            return Ok(None);
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(self.page_sql.clone())).bind(self.last_key);
        for f in &self.filters {
            q = q.bind(f);
        }
        q = q.bind(batch_size as i64);
        let rows: Vec<PgRow> = self
            .handle
            .block_on(q.fetch_all(&self.pool))
            .map_err(|e| pg_error(label, e))?;
        if rows.len() < batch_size {
            self.done = true;
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let mut cols = Vec::with_capacity(self.columns.len());
        for (name, dtype) in &self.columns {
            let col = if *dtype == DataType::Int64 {
                let v: Vec<Option<i64>> = rows
                    .iter()
                    .map(|r| r.try_get::<Option<i64>, _>(name.as_str()))
                    .collect::<Result<_, _>>()
                    .map_err(|e| pg_error(label, e))?;
                Column::new(name.clone(), v)
            } else {
                let v: Vec<Option<String>> = rows
                    .iter()
                    .map(|r| r.try_get::<Option<String>, _>(name.as_str()))
                    .collect::<Result<_, _>>()
                    .map_err(|e| pg_error(label, e))?;
                Column::new(name.clone(), v)
            };
            cols.push(col);
        }
        if let Some(last) = rows.last() {
            self.last_key = Some(
                last.try_get::<i64, _>("__drover_key")
                    .map_err(|e| pg_error(label, e))?,
            );
        }
        Ok(Some(DataFrame::new(rows.len(), cols)?))
    }
}
