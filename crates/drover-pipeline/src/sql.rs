//! The `sql` pipeline: a team's own transformation as polars SQL, without writing Rust.
//!
//! Params (unknown params are an error):
//!
//! | param | type | meaning |
//! | --- | --- | --- |
//! | `input` | `.parquet` or `.csv` path | read in batches of `batch_size` rows |
//! | `query` | SQL | run on every batch, over the table `batch` |
//! | `reference` | object `{"name": "path"}` (optional) | small `.parquet`/`.csv` tables loaded once per attempt, usable in `query` and `combine` by name |
//! | `combine` | SQL (optional) | run once at the end over the table `parts` (every batch's output); written as `combined.parquet` |
//! | `sum` | array of column names (optional) | integer output columns totalled in the result |
//!
//! Checks, from cheapest to the ones that read files:
//!
//! * [`Pipeline::validate`] (pure, on every delivery): params' shapes, both queries parse
//!   (sqlparser with polars' own dialect and options, so the message is the parser's),
//!   reference names are identifiers other than `batch` and `parts`;
//! * [`Pipeline::preflight`] (where the job is published) and again when an attempt
//!   starts: the queries are planned against empty tables with the input's schema (Parquet
//!   footer, CSV header plus typed first rows) and the reference tables' schemas, so a
//!   missing column or table is refused with polars' words; `sum` columns must be integer
//!   columns of the query's output.
//!
//! Determinism: a replayed batch must write the same part. polars does not promise an order
//! for the rows of a `GROUP BY` or a join, so a query without a top-level `ORDER BY` has its
//! output sorted by all its columns (in order); with an `ORDER BY`, rows come in that order
//! (ties as polars leaves them: order by enough columns to make it total).
//!
//! `combine` runs on polars' streaming engine over a lazy scan of the part files and is
//! sunk straight to Parquet, so its memory is bounded by its own state (a `GROUP BY`'s
//! groups), not by the job's output; without a top-level `ORDER BY` its output is sorted
//! like a batch's, which holds the combined output in memory: give a `combine` that keeps
//! many rows an `ORDER BY`.
//!
//! Result: `{"rows": input rows, "rows_out": output rows, "batches": n, "sum": {column:
//! total}}`, plus `"combined": {"file", "rows", "sha256"}` with `combine`.

use crate::source::{Format, format_of};
use crate::{BatchContext, Input, JobSpec, ParamReader, Pipeline, PipelineError, Summary};
use polars::io::utils::sync_on_close::SyncOnCloseType;
use polars::prelude::*;
use polars::sql::SQLContext;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlparser::ast::Statement;
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::{Parser, ParserOptions};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Name of the combined output in the job's output directory.
pub const COMBINED: &str = "combined.parquet";

/// The table a batch is registered as in `query`.
pub const BATCH_TABLE: &str = "batch";

/// The table the union of every batch's output is registered as in `combine`.
pub const PARTS_TABLE: &str = "parts";

/// CSV rows read to type a CSV file's columns (integers as i64, decimals as f64, the rest
/// text). The same rows type the file every time, so batches of one job always agree.
pub const CSV_INFER_ROWS: usize = 10_000;

/// Summary key prefix of a `sum` column's per-batch total.
const SUM_PREFIX: &str = "sum:";

/// The `sql` pipeline (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sql;

/// Validated `sql` params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlParams {
    /// Input file (`.parquet` or `.csv`).
    pub input: PathBuf,
    /// The per-batch query, over `batch`.
    pub query: Query,
    /// Reference tables by name, in name order.
    pub reference: BTreeMap<String, PathBuf>,
    /// The final query over `parts`.
    pub combine: Option<Query>,
    /// Integer output columns to total.
    pub sum: Vec<String>,
}

/// A query that parsed, and whether it orders its own output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The SQL text as given.
    pub text: String,
    /// True when the statement has a top-level `ORDER BY`.
    pub ordered: bool,
}

/// Parses `text` exactly as polars' `SQLContext::execute` does; the error is the parser's,
/// prefixed with the param's name.
fn parse_query(param: &str, text: &str) -> Result<Query, PipelineError> {
    let bad = |msg: String| PipelineError::permanent(format!("sql: param \"{param}\": {msg}"));
    let statements = Parser::new(&GenericDialect)
        .with_options(ParserOptions {
            trailing_commas: true,
            ..Default::default()
        })
        .try_with_sql(text)
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| bad(e.to_string()))?;
    let [statement] = statements.as_slice() else {
        return Err(bad(format!(
            "expected one SQL statement, got {}",
            statements.len()
        )));
    };
    let Statement::Query(q) = statement else {
        return Err(bad(format!("expected a SELECT query, got: {statement}")));
    };
    Ok(Query {
        text: text.to_string(),
        ordered: q.order_by.is_some(),
    })
}

/// A reference table's name: an SQL identifier that does not shadow `batch` or `parts`.
fn check_table_name(name: &str) -> Result<(), PipelineError> {
    let mut chars = name.chars();
    let ident = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ident {
        return Err(PipelineError::permanent(format!(
            "sql: param \"reference\": table name \"{name}\" is not an identifier ([A-Za-z_][A-Za-z0-9_]*)"
        )));
    }
    if name.eq_ignore_ascii_case(BATCH_TABLE) || name.eq_ignore_ascii_case(PARTS_TABLE) {
        return Err(PipelineError::permanent(format!(
            "sql: param \"reference\": table name \"{name}\" is reserved (\"{BATCH_TABLE}\" and \"{PARTS_TABLE}\" are drover's)"
        )));
    }
    Ok(())
}

/// A `.parquet` or `.csv` path param, checked without touching the file.
fn file_param(param: &str, text: &str) -> Result<PathBuf, PipelineError> {
    let path = PathBuf::from(text);
    if format_of(&path).is_none() {
        return Err(PipelineError::permanent(format!(
            "sql: param \"{param}\": expected a .parquet or .csv path, got \"{text}\""
        )));
    }
    Ok(path)
}

/// The dtype a CSV column is read as: what the first [`CSV_INFER_ROWS`] rows suggest,
/// narrowed to what the batch source can parse (i64, f64, else text).
fn csv_dtype(inferred: &DataType) -> DataType {
    if inferred.is_integer() {
        DataType::Int64
    } else if inferred.is_float() {
        DataType::Float64
    } else {
        DataType::String
    }
}

/// A file's schema as every batch of it (or the whole reference table) will have it:
/// Parquet from its footer, CSV from its header and first rows (see [`csv_dtype`]).
/// `what` names the param in errors.
fn file_schema(path: &Path, what: &str) -> Result<Schema, PipelineError> {
    let ctx = |e: PolarsError| {
        PipelineError::from(e).context(format!("sql: {what} \"{}\"", path.display()))
    };
    let label = PlRefPath::new(path.to_string_lossy().as_ref());
    match format_of(path) {
        Some(Format::Parquet) => LazyFrame::scan_parquet(label, ScanArgsParquet::default())
            .and_then(|mut lf| lf.collect_schema())
            .map(|s| s.as_ref().clone())
            .map_err(ctx),
        Some(Format::Csv) => {
            let schema = LazyCsvReader::new(label)
                .with_has_header(true)
                .with_infer_schema_length(Some(CSV_INFER_ROWS))
                .finish()
                .and_then(|mut lf| lf.collect_schema())
                .map_err(ctx)?;
            Ok(schema
                .iter()
                .map(|(name, dtype)| (name.clone(), csv_dtype(dtype)))
                .collect())
        }
        None => Err(PipelineError::permanent(format!(
            "sql: {what}: expected a .parquet or .csv path, got \"{}\"",
            path.display()
        ))),
    }
}

/// Reads a whole reference table, typed as [`file_schema`] says.
fn load_table(path: &Path, what: &str) -> Result<DataFrame, PipelineError> {
    let schema = file_schema(path, what)?;
    let ctx = |e: PolarsError| {
        PipelineError::from(e).context(format!("sql: {what} \"{}\"", path.display()))
    };
    let label = PlRefPath::new(path.to_string_lossy().as_ref());
    let lf = match format_of(path) {
        Some(Format::Csv) => LazyCsvReader::new(label)
            .with_has_header(true)
            .with_schema(Some(Arc::new(schema)))
            .finish(),
        _ => LazyFrame::scan_parquet(label, ScanArgsParquet::default()),
    };
    lf.and_then(LazyFrame::collect).map_err(ctx)
}

/// Runs `query` with `tables` registered by name; `param` names the query in errors, which
/// are permanent (the same SQL over the same schema fails the same way again) unless they
/// are I/O.
fn execute(
    param: &str,
    query: &Query,
    tables: &[(&str, LazyFrame)],
) -> Result<LazyFrame, PipelineError> {
    let mut ctx = SQLContext::new();
    for (name, lf) in tables {
        ctx.register(name, lf.clone());
    }
    ctx.execute(&query.text)
        .map_err(|e| PipelineError::from(e).context(format!("sql: param \"{param}\"")))
}

/// Plans `query` over empty tables of the given schemas and returns its output schema: a
/// missing column or table fails here with polars' message, before any data is read.
fn output_schema(
    param: &str,
    query: &Query,
    tables: &[(&str, &Schema)],
) -> Result<Schema, PipelineError> {
    let empty: Vec<(&str, LazyFrame)> = tables
        .iter()
        .map(|(n, s)| (*n, DataFrame::empty_with_schema(s).lazy()))
        .collect();
    let df = execute(param, query, &empty)?
        .collect()
        .map_err(|e| PipelineError::from(e).context(format!("sql: param \"{param}\"")))?;
    Ok(df.schema().as_ref().clone())
}

/// Every `sum` column must be an integer column of the query's output.
fn check_sum_columns(sum: &[String], schema: &Schema) -> Result<(), PipelineError> {
    for name in sum {
        match schema.get(name) {
            None => {
                let cols: Vec<&str> = schema.iter_names().map(|n| n.as_str()).collect();
                return Err(PipelineError::permanent(format!(
                    "sql: param \"sum\": column \"{name}\" is not in the query's output (columns: {})",
                    cols.join(", ")
                )));
            }
            Some(dtype) if !dtype.is_integer() => {
                return Err(PipelineError::permanent(format!(
                    "sql: param \"sum\": column \"{name}\" must be an integer column, the query's output has it as {dtype}"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Sorts a query's output by all its columns unless the query ordered it itself, so the
/// same rows always come out in the same order (see the module docs).
fn deterministic(lf: LazyFrame, query: &Query, param: &str) -> Result<LazyFrame, PipelineError> {
    if query.ordered {
        return Ok(lf);
    }
    let mut lf = lf;
    let schema = lf
        .collect_schema()
        .map_err(|e| PipelineError::from(e).context(format!("sql: param \"{param}\"")))?;
    let by: Vec<Expr> = schema.iter_names().map(|n| col(n.clone())).collect();
    if by.is_empty() {
        return Ok(lf);
    }
    Ok(lf.sort_by_exprs(by, SortMultipleOptions::default().with_maintain_order(true)))
}

/// What every check of a job needs: the schemas of its tables and of each query's output.
struct Plan {
    output: Schema,
}

/// Plans both queries against the files' schemas and checks `sum` (see the module docs).
fn plan(params: &SqlParams, references: &[(String, Schema)]) -> Result<Plan, PipelineError> {
    let input = file_schema(&params.input, "param \"input\"")?;
    let mut tables: Vec<(&str, &Schema)> = vec![(BATCH_TABLE, &input)];
    tables.extend(references.iter().map(|(n, s)| (n.as_str(), s)));
    let output = output_schema("query", &params.query, &tables)?;
    check_sum_columns(&params.sum, &output)?;
    if let Some(combine) = &params.combine {
        tables[0] = (PARTS_TABLE, &output);
        output_schema("combine", combine, &tables)?;
    }
    Ok(Plan { output })
}

/// Reference tables, loaded once per attempt, and the query's output schema (for a
/// `combine` over a job with no batches).
pub struct SqlReference {
    tables: Vec<(String, DataFrame)>,
    output: Schema,
}

impl SqlReference {
    fn lazy_tables(&self) -> Vec<(&str, LazyFrame)> {
        self.tables
            .iter()
            .map(|(n, df)| (n.as_str(), df.clone().lazy()))
            .collect()
    }
}

/// Hex SHA-256 of a file, streamed.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

impl Pipeline for Sql {
    type Params = SqlParams;
    type Reference = SqlReference;

    fn name(&self) -> &'static str {
        "sql"
    }

    fn describe(&self) -> Option<crate::Description> {
        use crate::Field;
        Some(crate::Description {
            summary: "a team's own batch transformation as SQL (polars dialect), no Rust (docs/pipelines.md)",
            params: vec![
                Field::new(
                    "input",
                    ".parquet | .csv path",
                    "read in batches of the message's batch_size rows",
                ),
                Field::new(
                    "query",
                    "SQL",
                    "run on every batch over the table `batch`; its output is the batch's part",
                ),
                Field::optional(
                    "reference",
                    "object {\"name\": \"path\"}",
                    "none",
                    "small .parquet/.csv tables usable by name in query and combine",
                ),
                Field::optional(
                    "combine",
                    "SQL",
                    "none",
                    "run once at the end over `parts` (every batch's output), written as combined.parquet",
                ),
                Field::optional(
                    "sum",
                    "array of column names",
                    "none",
                    "integer columns of query's output to total in the result",
                ),
            ],
            input_columns: Vec::new(),
            output_columns: Vec::new(),
            result: "{\"rows\": input rows, \"rows_out\": output rows, \"batches\": n, \"sum\": {column: total}, \"combined\": {\"file\", \"rows\", \"sha256\"}}; the columns are whatever query selects",
        })
    }

    fn validate(&self, params: &Value) -> Result<SqlParams, PipelineError> {
        let mut r = ParamReader::new(self.name(), params)?;
        let input = file_param("input", r.required_str("input")?)?;
        let query = parse_query("query", r.required_str("query")?)?;
        let combine = r
            .optional_str("combine")?
            .map(|q| parse_query("combine", q))
            .transpose()?;
        let mut reference = BTreeMap::new();
        match r.optional_json("reference") {
            None => {}
            Some(Value::Object(m)) => {
                for (name, path) in m {
                    check_table_name(name)?;
                    let Some(path) = path.as_str() else {
                        return Err(PipelineError::permanent(format!(
                            "sql: param \"reference\": table \"{name}\": expected a path string, got {path}"
                        )));
                    };
                    let path = file_param(&format!("reference.{name}"), path)?;
                    reference.insert(name.clone(), path);
                }
            }
            Some(other) => {
                return Err(PipelineError::permanent(format!(
                    "sql: param \"reference\": expected an object {{\"name\": \"path\"}}, got {other}"
                )));
            }
        }
        let mut sum: Vec<String> = Vec::new();
        match r.optional_json("sum") {
            None => {}
            Some(Value::Array(items)) => {
                for item in items {
                    match item.as_str() {
                        Some(s) if !s.trim().is_empty() && !sum.iter().any(|c| c == s) => {
                            sum.push(s.to_string())
                        }
                        _ => {
                            return Err(PipelineError::permanent(format!(
                                "sql: param \"sum\": expected distinct column names, got {item}"
                            )));
                        }
                    }
                }
            }
            Some(other) => {
                return Err(PipelineError::permanent(format!(
                    "sql: param \"sum\": expected an array of column names, got {other}"
                )));
            }
        }
        r.finish()?;
        Ok(SqlParams {
            input,
            query,
            reference,
            combine,
            sum,
        })
    }

    fn preflight(&self, params: &SqlParams) -> Result<(), PipelineError> {
        let references = params
            .reference
            .iter()
            .map(|(n, p)| Ok((n.clone(), file_schema(p, &format!("reference \"{n}\""))?)))
            .collect::<Result<Vec<_>, PipelineError>>()?;
        plan(params, &references).map(|_| ())
    }

    /// The query and its settings are params, which a key can never change; what can
    /// change between two attempts is the SQL engine that runs them, so the version names
    /// this pipeline's revision and drover's release.
    fn version(&self, _params: &SqlParams) -> String {
        format!("sql-1 (drover {})", env!("CARGO_PKG_VERSION"))
    }

    fn input(&self, params: &SqlParams, _spec: &JobSpec) -> Result<Input, PipelineError> {
        let input = Input::file(&params.input);
        if format_of(&params.input) != Some(Format::Csv) {
            return Ok(input);
        }
        // CSV batches arrive as text: declare the typed columns so every batch has the
        // schema the queries were checked against.
        let schema = file_schema(&params.input, "param \"input\"")?;
        Ok(schema
            .iter()
            .fold(input, |i, (name, dtype)| i.column(name, dtype.clone())))
    }

    fn load_reference(&self, params: &SqlParams) -> Result<SqlReference, PipelineError> {
        let tables = params
            .reference
            .iter()
            .map(|(n, p)| Ok((n.clone(), load_table(p, &format!("reference \"{n}\""))?)))
            .collect::<Result<Vec<_>, PipelineError>>()?;
        let schemas: Vec<(String, Schema)> = tables
            .iter()
            .map(|(n, df)| (n.clone(), df.schema().as_ref().clone()))
            .collect();
        // The publish-time checks again: a producer that did not run them (or a file
        // replaced since) fails here, before any batch, with the same message.
        let Plan { output } = plan(params, &schemas)?;
        Ok(SqlReference { tables, output })
    }

    fn transform(
        &self,
        params: &SqlParams,
        reference: &SqlReference,
        batch: DataFrame,
        ctx: &BatchContext,
    ) -> Result<Option<DataFrame>, PipelineError> {
        let mut tables = reference.lazy_tables();
        tables.push((BATCH_TABLE, batch.lazy()));
        let lf = execute("query", &params.query, &tables)?;
        let out = deterministic(lf, &params.query, "query")?
            .collect()
            .map_err(|e| {
                PipelineError::from(e).context(format!(
                    "sql: param \"query\" on batch {} (input rows from {})",
                    ctx.index,
                    ctx.first_row + 1
                ))
            })?;
        Ok(Some(out))
    }

    fn summarise_batch(
        &self,
        params: &SqlParams,
        rows: u64,
        output: Option<&DataFrame>,
    ) -> Result<Summary, PipelineError> {
        let rows_out = output.map_or(0, DataFrame::height);
        let mut s = Summary::from([
            ("rows".to_string(), rows as i64),
            ("rows_out".to_string(), rows_out as i64),
        ]);
        for name in &params.sum {
            let total = match output {
                None => 0,
                Some(df) => {
                    let c = df.column(name).map_err(|_| {
                        PipelineError::permanent(format!(
                            "sql: param \"sum\": column \"{name}\" is not in the query's output"
                        ))
                    })?;
                    if !c.dtype().is_integer() {
                        return Err(PipelineError::permanent(format!(
                            "sql: param \"sum\": column \"{name}\" must be an integer column, the query's output has it as {}",
                            c.dtype()
                        )));
                    }
                    let overflow = || {
                        PipelineError::permanent(format!(
                            "sql: param \"sum\": the total of column \"{name}\" overflows i64"
                        ))
                    };
                    let wide = c.strict_cast(&DataType::Int64).map_err(|_| overflow())?;
                    wide.i64()?
                        .iter()
                        .flatten()
                        .try_fold(0i64, |t, v| t.checked_add(v))
                        .ok_or_else(overflow)?
                }
            };
            s.insert(format!("{SUM_PREFIX}{name}"), total);
        }
        Ok(s)
    }

    fn result(&self, totals: &Summary, batches: u32) -> Value {
        let sums: serde_json::Map<String, Value> = totals
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(SUM_PREFIX)?.to_string(), json!(v))))
            .collect();
        json!({
            "rows": totals.get("rows").copied().unwrap_or(0),
            "rows_out": totals.get("rows_out").copied().unwrap_or(0),
            "batches": batches,
            "sum": sums,
        })
    }

    fn finalize(
        &self,
        params: &SqlParams,
        reference: &SqlReference,
        dir: &Path,
        parts: &[PathBuf],
    ) -> Result<Option<Value>, PipelineError> {
        let Some(combine) = &params.combine else {
            return Ok(None);
        };
        let ctx =
            |e: PolarsError| PipelineError::from(e).context("sql: param \"combine\"".to_string());
        let parts_lf = if parts.is_empty() {
            DataFrame::empty_with_schema(&reference.output).lazy()
        } else {
            let paths: Vec<PlRefPath> = parts
                .iter()
                .map(|p| PlRefPath::new(p.to_string_lossy().as_ref()))
                .collect();
            LazyFrame::scan_parquet_files(paths.into(), ScanArgsParquet::default()).map_err(ctx)?
        };
        let mut tables = reference.lazy_tables();
        tables.push((PARTS_TABLE, parts_lf));
        let lf = deterministic(execute("combine", combine, &tables)?, combine, "combine")?;
        let target = dir.join(COMBINED);
        let tmp = crate::sink::temp_name(&target);
        let out_err = |e: std::io::Error, p: &Path| {
            PipelineError::transient(format!("output {}: {e}", p.display()))
        };
        let written = (|| {
            let options = ParquetWriteOptions {
                compression: ParquetCompression::Snappy,
                ..Default::default()
            };
            lf.sink(
                SinkDestination::File {
                    target: SinkTarget::Path(PlRefPath::new(tmp.to_string_lossy().as_ref())),
                },
                FileWriteFormat::Parquet(Arc::new(options)),
                UnifiedSinkArgs {
                    sync_on_close: SyncOnCloseType::All,
                    ..Default::default()
                },
            )
            .and_then(|lf| lf.collect_with_engine(Engine::Streaming))
            .map_err(|e| crate::sink::write_err(&target, e))?;
            std::fs::rename(&tmp, &target).map_err(|e| out_err(e, &target))?;
            crate::sink::sync_dir(dir).map_err(|e| out_err(e, dir))
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        let rows = LazyFrame::scan_parquet(
            PlRefPath::new(target.to_string_lossy().as_ref()),
            ScanArgsParquet::default(),
        )
        .and_then(|lf| lf.select([len()]).collect())
        .map_err(|e| crate::sink::write_err(&target, e))?;
        let rows = rows
            .column("len")
            .and_then(|c| c.get(0).map(|v| v.extract::<u64>()))
            .ok()
            .flatten()
            .ok_or_else(|| {
                PipelineError::transient(format!(
                    "output {}: could not count its rows",
                    target.display()
                ))
            })?;
        let sha256 = sha256_file(&target).map_err(|e| out_err(e, &target))?;
        Ok(Some(json!({
            "combined": {"file": COMBINED, "rows": rows, "sha256": sha256},
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BatchOutcome, Registry};
    use std::fs::File;

    /// `n` rows: `id` 1..=n, `dept` cycling A/B/C, `amount` = id * 10, `ratio` = id / 4.
    fn input_frame(n: i64) -> DataFrame {
        let ids: Vec<i64> = (1..=n).collect();
        let depts: Vec<&str> = ids
            .iter()
            .map(|i| ["A", "B", "C"][(*i % 3) as usize])
            .collect();
        let amounts: Vec<i64> = ids.iter().map(|i| i * 10).collect();
        let ratios: Vec<f64> = ids.iter().map(|i| *i as f64 / 4.0).collect();
        df!("id" => ids, "dept" => depts, "amount" => amounts, "ratio" => ratios).unwrap()
    }

    fn write_parquet(path: &Path, df: &DataFrame) {
        let mut df = df.clone();
        ParquetWriter::new(File::create(path).unwrap())
            .finish(&mut df)
            .unwrap();
    }

    fn write_csv(path: &Path, df: &DataFrame) {
        let mut df = df.clone();
        CsvWriter::new(File::create(path).unwrap())
            .finish(&mut df)
            .unwrap();
    }

    fn read(path: &Path) -> DataFrame {
        ParquetReader::new(File::open(path).unwrap())
            .finish()
            .unwrap()
    }

    struct Job {
        dir: tempfile::TempDir,
    }

    impl Job {
        /// A directory holding `in.parquet` (and `in.csv`) with `n` rows, and `depts.csv`.
        fn new(n: i64) -> Job {
            let dir = tempfile::tempdir().unwrap();
            let df = input_frame(n);
            write_parquet(&dir.path().join("in.parquet"), &df);
            write_csv(&dir.path().join("in.csv"), &df);
            std::fs::write(
                dir.path().join("depts.csv"),
                "dept,dept_name\nA,Accounts\nB,Billing\nC,Cargo\n",
            )
            .unwrap();
            Job { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }

        fn spec(&self, key: &str, params: Value, batch: usize) -> JobSpec {
            JobSpec {
                key: key.into(),
                pipeline: "sql".into(),
                params,
                batch_size: Some(batch),
                attempt: 1,
                output_root: self.dir.path().join("out"),
            }
        }

        fn out(&self, key: &str) -> PathBuf {
            self.dir.path().join("out").join("sql").join(key)
        }
    }

    fn run(spec: &JobSpec) -> Result<(Vec<BatchOutcome>, Value), PipelineError> {
        let reg = Registry::builtin();
        reg.preflight(&spec.pipeline, &spec.params)?;
        let mut job = reg.open(spec, 0)?;
        let mut batches = Vec::new();
        while let Some(b) = job.next_batch()? {
            batches.push(b);
        }
        let result = job.finish(&batches)?;
        Ok((batches, result))
    }

    fn ids(df: &DataFrame, name: &str) -> Vec<i64> {
        df.column(name)
            .unwrap()
            .i64()
            .unwrap()
            .into_no_null_iter()
            .collect()
    }

    #[test]
    fn query_runs_on_every_batch() {
        let job = Job::new(10);
        let params = json!({
            "input": job.path("in.parquet"),
            "query": "SELECT id, amount * 2 AS doubled FROM batch WHERE amount > 20 ORDER BY id",
        });
        let (batches, result) = run(&job.spec("q", params, 3)).unwrap();
        assert_eq!(batches.len(), 4);
        let parts: Vec<Vec<i64>> = batches
            .iter()
            .map(|b| ids(&read(Path::new(b.output.as_ref().unwrap())), "id"))
            .collect();
        // Batches are rows 1-3, 4-6, 7-9, 10; the filter applies inside each one.
        assert_eq!(parts, [vec![3], vec![4, 5, 6], vec![7, 8, 9], vec![10]]);
        let second = read(Path::new(batches[1].output.as_ref().unwrap()));
        assert_eq!(ids(&second, "doubled"), [80, 100, 120]);
        assert_eq!(
            result,
            json!({"rows": 10, "rows_out": 8, "batches": 4, "sum": {}})
        );
        assert!(job.out("q").join(crate::MANIFEST).is_file());
    }

    #[test]
    fn csv_input_is_typed_like_parquet() {
        let job = Job::new(7);
        let query = "SELECT id, dept, amount, ratio FROM batch";
        let mut frames = Vec::new();
        for (key, file) in [("p", "in.parquet"), ("c", "in.csv")] {
            let params = json!({"input": job.path(file), "query": query, "sum": ["amount"]});
            let (batches, result) = run(&job.spec(key, params, 4)).unwrap();
            assert_eq!(result["sum"], json!({"amount": 280}), "{file}");
            let parts: Vec<DataFrame> = batches
                .iter()
                .map(|b| read(Path::new(b.output.as_ref().unwrap())))
                .collect();
            frames.push(parts);
        }
        assert_eq!(frames[0].len(), 2);
        for (p, c) in frames[0].iter().zip(&frames[1]) {
            assert!(p.equals(c), "parquet {p} vs csv {c}");
        }
    }

    #[test]
    fn reference_tables_join_by_name() {
        let job = Job::new(6);
        let params = json!({
            "input": job.path("in.parquet"),
            "query": "SELECT b.id, d.dept_name FROM batch b JOIN depts d ON b.dept = d.dept",
            "reference": {"depts": job.path("depts.csv")},
        });
        let (batches, result) = run(&job.spec("r", params, 4)).unwrap();
        assert_eq!(result["rows_out"], json!(6));
        let first = read(Path::new(batches[0].output.as_ref().unwrap()));
        // No ORDER BY: sorted by all columns, so id order here.
        assert_eq!(ids(&first, "id"), [1, 2, 3, 4]);
        let names: Vec<&str> = first
            .column("dept_name")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .flatten()
            .collect();
        assert_eq!(names, ["Billing", "Cargo", "Accounts", "Billing"]);
    }

    #[test]
    fn combine_across_batches_equals_one_query_over_the_input() {
        let job = Job::new(1000);
        let per_batch = "SELECT dept, amount, CAST(CASE WHEN id % 2 = 0 THEN 1 ELSE 0 END AS BIGINT) AS even FROM batch WHERE id % 7 <> 0";
        let combine = "SELECT dept, SUM(amount) AS total, SUM(even) AS evens, COUNT(*) AS n FROM parts GROUP BY dept ORDER BY dept";
        let params = json!({
            "input": job.path("in.parquet"),
            "query": per_batch,
            "combine": combine,
            "sum": ["amount", "even"],
        });
        let (batches, result) = run(&job.spec("c", params, 64)).unwrap();
        assert_eq!(batches.len(), 16);
        let combined = read(&job.out("c").join(COMBINED));

        // The same answer from one query over the whole input.
        let mut ctx = SQLContext::new();
        ctx.register("batch", input_frame(1000).lazy());
        let whole = ctx.execute(per_batch).unwrap().collect().unwrap();
        let mut ctx = SQLContext::new();
        ctx.register("parts", whole.clone().lazy());
        let expected = ctx.execute(combine).unwrap().collect().unwrap();
        assert!(
            combined.equals(&expected),
            "combined {combined} vs {expected}"
        );
        assert_eq!(result["combined"]["rows"], json!(3));
        assert_eq!(result["combined"]["file"], json!(COMBINED));
        let sha = sha256_file(&job.out("c").join(COMBINED)).unwrap();
        assert_eq!(result["combined"]["sha256"], json!(sha));
        let total: i64 = ids(&whole, "amount").iter().sum();
        assert_eq!(result["sum"]["amount"], json!(total));
        assert_eq!(
            result["sum"]["even"],
            json!(ids(&whole, "even").iter().sum::<i64>())
        );
        assert_eq!(result["rows_out"], json!(whole.height()));
        let manifest: Value =
            serde_json::from_reader(File::open(job.out("c").join(crate::MANIFEST)).unwrap())
                .unwrap();
        assert_eq!(manifest["summary"]["combined"], result["combined"]);
    }

    #[test]
    fn replays_write_the_same_parts_and_combined_file() {
        let job = Job::new(500);
        // GROUP BY without ORDER BY: polars gives no row order, drover sorts.
        let params = json!({
            "input": job.path("in.parquet"),
            "query": "SELECT dept, id % 5 AS k, SUM(amount) AS s FROM batch GROUP BY dept, id % 5",
            "combine": "SELECT k, SUM(s) AS s FROM parts GROUP BY k",
        });
        let (a, ra) = run(&job.spec("one", params.clone(), 50)).unwrap();
        let (b, rb) = run(&job.spec("two", params, 50)).unwrap();
        let sums = |v: &[BatchOutcome]| v.iter().map(|b| b.checksum.clone()).collect::<Vec<_>>();
        assert_eq!(sums(&a), sums(&b));
        assert_eq!(ra["combined"]["sha256"], rb["combined"]["sha256"]);
        let combined = read(&job.out("one").join(COMBINED));
        assert_eq!(ids(&combined, "k"), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn combine_over_an_empty_input_writes_an_empty_table() {
        let job = Job::new(0);
        let params = json!({
            "input": job.path("in.parquet"),
            "query": "SELECT dept, amount FROM batch",
            "combine": "SELECT dept, SUM(amount) AS total FROM parts GROUP BY dept",
            "sum": ["amount"],
        });
        let (batches, result) = run(&job.spec("e", params, 10)).unwrap();
        assert!(batches.is_empty());
        assert_eq!(result["combined"]["rows"], json!(0));
        assert_eq!(result["sum"], json!({}));
        let combined = read(&job.out("e").join(COMBINED));
        assert_eq!(combined.get_column_names(), ["dept", "total"]);
    }

    fn err(params: Value) -> PipelineError {
        let e = Registry::builtin().preflight("sql", &params).unwrap_err();
        assert!(e.is_permanent(), "{e}");
        e
    }

    #[test]
    fn bad_params_are_refused_naming_the_param_and_the_parser() {
        let job = Job::new(3);
        let input = job.path("in.parquet");
        let cases: Vec<(Value, &str)> = vec![
            (
                json!({"input": input, "query": "SELEC id FROM batch"}),
                "sql: param \"query\": sql parser error: Expected: an SQL statement, found: SELEC",
            ),
            (
                json!({"input": input, "query": "SELECT id FROM batch; SELECT 1"}),
                "sql: param \"query\": expected one SQL statement, got 2",
            ),
            (
                json!({"input": input, "query": "DROP TABLE batch"}),
                "sql: param \"query\": expected a SELECT query, got: DROP TABLE batch",
            ),
            (
                json!({"input": input, "query": "SELECT id FROM batch", "combine": "SELECT SUM( FROM parts"}),
                "sql: param \"combine\": sql parser error",
            ),
            (
                json!({"input": "in.txt", "query": "SELECT 1"}),
                "sql: param \"input\": expected a .parquet or .csv path, got \"in.txt\"",
            ),
            (
                json!({"query": "SELECT 1"}),
                "sql: param \"input\" is required",
            ),
            (
                json!({"input": input, "query": "SELECT 1", "reference": {"batch": "x.csv"}}),
                "sql: param \"reference\": table name \"batch\" is reserved",
            ),
            (
                json!({"input": input, "query": "SELECT 1", "reference": {"a b": "x.csv"}}),
                "sql: param \"reference\": table name \"a b\" is not an identifier",
            ),
            (
                json!({"input": input, "query": "SELECT 1", "reference": ["x.csv"]}),
                "sql: param \"reference\": expected an object",
            ),
            (
                json!({"input": input, "query": "SELECT 1", "sum": "amount"}),
                "sql: param \"sum\": expected an array of column names, got \"amount\"",
            ),
            (
                json!({"input": input, "query": "SELECT 1", "sum": ["a", "a"]}),
                "sql: param \"sum\": expected distinct column names, got \"a\"",
            ),
            (
                json!({"input": input, "query": "SELECT 1", "qeury": "x"}),
                "sql: unknown param \"qeury\"",
            ),
        ];
        for (params, want) in cases {
            // Pure validation already refuses these: nothing is read.
            let e = Registry::builtin()
                .validate("sql", &params)
                .expect_err(&params.to_string());
            assert!(e.is_permanent());
            assert!(
                e.message.starts_with(want),
                "{}\n  wanted {want}",
                e.message
            );
        }
    }

    #[test]
    fn missing_columns_and_tables_are_refused_before_publishing() {
        let job = Job::new(3);
        let input = job.path("in.parquet");
        let csv = job.path("in.csv");
        let depts = job.path("depts.csv");
        let cases: Vec<(Value, Vec<&str>)> = vec![
            (
                json!({"input": input, "query": "SELECT id, salary FROM batch"}),
                vec!["sql: param \"query\"", "salary"],
            ),
            (
                json!({"input": csv, "query": "SELECT nope FROM batch"}),
                vec!["sql: param \"query\"", "nope"],
            ),
            (
                json!({"input": input, "query": "SELECT id FROM employees"}),
                vec!["sql: param \"query\"", "employees"],
            ),
            (
                json!({"input": input, "query": "SELECT b.id, d.nope FROM batch b JOIN depts d ON b.dept = d.dept", "reference": {"depts": depts}}),
                vec!["sql: param \"query\"", "nope"],
            ),
            (
                json!({"input": input, "query": "SELECT id FROM batch", "combine": "SELECT SUM(amount) FROM parts"}),
                vec!["sql: param \"combine\"", "amount"],
            ),
            (
                json!({"input": input, "query": "SELECT id FROM batch", "sum": ["amount"]}),
                vec![
                    "sql: param \"sum\": column \"amount\" is not in the query's output (columns: id)",
                ],
            ),
            (
                json!({"input": input, "query": "SELECT dept FROM batch", "sum": ["dept"]}),
                vec![
                    "sql: param \"sum\": column \"dept\" must be an integer column, the query's output has it as str",
                ],
            ),
            (
                json!({"input": input, "query": "SELECT ratio FROM batch", "sum": ["ratio"]}),
                vec!["column \"ratio\" must be an integer column"],
            ),
            (
                json!({"input": job.path("missing.parquet"), "query": "SELECT 1"}),
                vec!["missing.parquet"],
            ),
            (
                json!({"input": input, "query": "SELECT 1", "reference": {"t": job.path("gone.csv")}}),
                vec!["sql: reference \"t\"", "gone.csv"],
            ),
        ];
        for (params, wants) in cases {
            assert!(
                Registry::builtin().validate("sql", &params).is_ok(),
                "{params}"
            );
            let e = err(params.clone());
            for want in &wants {
                assert!(e.message.contains(want), "{}\n  wanted {want}", e.message);
            }
            // The same job published anyway fails permanently when it opens, before any batch.
            let spec = job.spec("bad", params, 2);
            let e = Registry::builtin().open(&spec, 0).unwrap_err();
            assert!(e.is_permanent(), "{e}");
            for want in &wants {
                assert!(e.message.contains(want), "{}\n  wanted {want}", e.message);
            }
        }
    }

    #[test]
    fn a_bad_value_at_run_time_is_permanent_and_names_the_batch() {
        let job = Job::new(4);
        let params = json!({
            "input": job.path("in.parquet"),
            "query": "SELECT CAST(dept AS INTEGER) AS d FROM batch",
        });
        let reg = Registry::builtin();
        let mut run = reg.open(&job.spec("cast", params, 2), 0).unwrap();
        let e = run.next_batch().unwrap_err();
        assert!(e.is_permanent());
        assert!(
            e.message
                .starts_with("sql: param \"query\" on batch 0 (input rows from 1)"),
            "{}",
            e.message
        );
    }

    #[test]
    fn registered_as_builtin() {
        assert!(Registry::builtin().names().contains(&"sql"));
    }
}
