//! The `payroll` pipeline: a monthly gross-to-net run for one client and period, exactly as
//! `specs/payroll.md` (v1) says, to the cent.
//!
//! Params: `client_id` (string), `period` (`YYYY-MM`), `input` (`.parquet` or `.csv` path,
//! or a `postgres://` URL together with `input_table`: the client's rows of the period are
//! then read from that table in `employee_id` order, one keyset page per batch), all
//! required, and optional `output` (a directory replacing the default output location).
//!
//! Every batch is validated first (missing columns, nulls, negative amounts, out-of-range
//! rates, unknown codes, rows of another client or period: a permanent error naming the
//! column and the first offending `employee_id`), then computed with polars expressions in
//! i64 arithmetic only: lookups in the state-rate, benefit-plan and filing-status tables,
//! and conditional expressions for caps, thresholds and the progressive federal brackets.

mod generate;
mod reference;

pub use generate::{GENERATOR_CHUNK_ROWS, generate_payroll};
pub use reference::*;

use crate::source::{describe_row, format_of};
use crate::{BatchContext, Input, JobSpec, Output, ParamReader, Pipeline, PipelineError, Summary};
use polars::prelude::*;
use serde_json::Value;
use std::path::PathBuf;

/// The `payroll` pipeline (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Payroll;

/// Validated `payroll` params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayrollParams {
    /// The client every input row must belong to.
    pub client_id: String,
    /// The pay period (`YYYY-MM`) every input row must belong to.
    pub period: String,
    /// Input file (`.parquet` or `.csv`).
    pub input: PathBuf,
    /// The table to read when `input` is a `postgres://` URL.
    pub input_table: Option<String>,
    /// Output directory override.
    pub output: Option<PathBuf>,
}

/// Integer input columns, in spec order.
pub const INT_COLUMNS: [&str; 9] = [
    "employee_id",
    "annual_salary_cents",
    "hourly_rate_cents",
    "regular_hours_x100",
    "overtime_hours_x100",
    "bonus_cents",
    "retirement_bp",
    "ytd_gross_cents",
    "ytd_retirement_cents",
];

/// Required input columns and their dtypes, in spec order.
pub const INPUT_COLUMNS: [(&str, bool); 15] = [
    ("employee_id", true),
    ("client_id", false),
    ("period", false),
    ("pay_type", false),
    ("annual_salary_cents", true),
    ("hourly_rate_cents", true),
    ("regular_hours_x100", true),
    ("overtime_hours_x100", true),
    ("bonus_cents", true),
    ("retirement_bp", true),
    ("benefit_plan", false),
    ("state", false),
    ("filing_status", false),
    ("ytd_gross_cents", true),
    ("ytd_retirement_cents", true),
];

/// Money columns of the output (all i64 cents), in output order.
pub const MONEY_COLUMNS: [&str; 9] = [
    "gross",
    "retirement",
    "benefits",
    "taxable",
    "federal_tax",
    "social_security",
    "medicare",
    "state_tax",
    "net",
];

/// Largest accepted monetary input (cents; $10 billion). Not in spec v1: with it every
/// intermediate product stays far inside i64, so absurd input fails loudly instead of
/// silently wrapping around.
pub const MAX_AMOUNT_CENTS: i64 = 1_000_000_000_000;
/// Largest accepted hourly rate (cents; $1 million an hour), for the same reason.
pub const MAX_HOURLY_RATE_CENTS: i64 = 100_000_000;
/// Largest accepted hours in a month (x100; 10 000 hours), for the same reason.
pub const MAX_HOURS_X100: i64 = 1_000_000;

/// `YYYY-MM` with a month in 01..=12.
fn valid_period(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 7
        && b[4] == b'-'
        && b[..4].iter().chain(&b[5..]).all(u8::is_ascii_digit)
        && matches!(s[5..].parse::<u8>(), Ok(1..=12))
}

impl Pipeline for Payroll {
    type Params = PayrollParams;
    type Reference = Reference;

    fn name(&self) -> &'static str {
        "payroll"
    }

    fn validate(&self, params: &Value) -> Result<PayrollParams, PipelineError> {
        let mut r = ParamReader::new(self.name(), params)?;
        let client_id = r.required_str("client_id")?.to_string();
        let period = r.required_str("period")?.to_string();
        if !valid_period(&period) {
            return Err(PipelineError::permanent(format!(
                "payroll: param \"period\": expected YYYY-MM, got \"{period}\""
            )));
        }
        let input_text = r.required_str("input")?;
        let input = PathBuf::from(input_text);
        let is_postgres =
            input_text.starts_with("postgres://") || input_text.starts_with("postgresql://");
        let input_table = r.optional_str("input_table")?.map(str::to_string);
        if is_postgres {
            let table = input_table.as_deref().ok_or_else(|| {
                PipelineError::permanent(
                    "payroll: param \"input_table\" is required when \"input\" is a postgres:// URL",
                )
            })?;
            crate::pg_source::quote_ident(table).map_err(|e| {
                PipelineError::permanent(format!("payroll: param \"input_table\": {e}"))
            })?;
        } else if input_table.is_some() {
            return Err(PipelineError::permanent(
                "payroll: param \"input_table\" only applies when \"input\" is a postgres:// URL",
            ));
        } else if format_of(&input).is_none() {
            return Err(PipelineError::permanent(format!(
                "payroll: param \"input\": expected a .parquet or .csv path or a postgres:// URL, got \"{}\"",
                input.display()
            )));
        }
        let output = r.optional_path("output")?;
        r.finish()?;
        Ok(PayrollParams {
            client_id,
            period,
            input,
            input_table,
            output,
        })
    }

    fn input(&self, params: &PayrollParams, _spec: &JobSpec) -> Result<Input, PipelineError> {
        let mut input = match &params.input_table {
            // "Load the records for this client": the client's rows of the period, paged by
            // employee_id.
            Some(table) => Input::postgres(&params.input.to_string_lossy(), table, "employee_id")
                .filter_eq("client_id", &params.client_id)
                .filter_eq("period", &params.period),
            None => Input::file(&params.input),
        }
        .id_column("employee_id");
        for (name, int) in INPUT_COLUMNS {
            let dtype = if int {
                DataType::Int64
            } else {
                DataType::String
            };
            input = input.column(name, dtype);
        }
        Ok(input)
    }

    fn output(&self, params: &PayrollParams) -> Output {
        Output::Parquet {
            dir: params.output.clone(),
        }
    }

    fn load_reference(&self, _params: &PayrollParams) -> Result<Reference, PipelineError> {
        Reference::load()
    }

    fn transform(
        &self,
        params: &PayrollParams,
        reference: &Reference,
        batch: DataFrame,
        ctx: &BatchContext,
    ) -> Result<Option<DataFrame>, PipelineError> {
        validate_batch(&batch, params, reference, ctx.first_row)?;
        Ok(Some(compute(batch, reference)?))
    }

    fn summarise(&self, rows: u64, output: Option<&DataFrame>) -> Result<Summary, PipelineError> {
        let mut s = Summary::from([("rows".to_string(), rows as i64)]);
        for name in MONEY_COLUMNS {
            let total: i128 = match output {
                Some(df) => df
                    .column(name)?
                    .i64()?
                    .into_no_null_iter()
                    .map(i128::from)
                    .sum(),
                None => 0,
            };
            let total = i64::try_from(total).map_err(|_| {
                PipelineError::permanent(format!("payroll: total_{name} overflows i64"))
            })?;
            s.insert(format!("total_{name}"), total);
        }
        Ok(s)
    }

    /// `rows` and every `total_<money column>`, zero when the input had no rows.
    fn result(&self, totals: &Summary, _batches: u32) -> Value {
        let mut m = serde_json::Map::new();
        let keys = std::iter::once("rows".to_string())
            .chain(MONEY_COLUMNS.iter().map(|n| format!("total_{n}")));
        for k in keys {
            let v = totals.get(&k).copied().unwrap_or(0);
            m.insert(k, Value::from(v));
        }
        Value::Object(m)
    }
}

/// The spec's validation rules, checked column by column in spec order; the error names the
/// column and the batch's first offending row by `employee_id`.
pub(crate) fn validate_batch(
    df: &DataFrame,
    params: &PayrollParams,
    reference: &Reference,
    first_row: u64,
) -> Result<(), PipelineError> {
    for (name, _) in INPUT_COLUMNS {
        if df.column(name).is_err() {
            return Err(PipelineError::permanent(format!(
                "validation: column \"{name}\": missing from the input (employee_id n/a)"
            )));
        }
    }
    let ids = df.column("employee_id")?;
    let row = |idx: usize| describe_row(Some(("employee_id", ids)), idx, first_row);
    let fail = |name: &str, what: String, idx: usize| {
        PipelineError::permanent(format!(
            "validation: column \"{name}\": {what} for {}",
            row(idx)
        ))
    };
    for (name, _) in INPUT_COLUMNS {
        let c = df.column(name)?;
        if c.null_count() > 0
            && let Some(idx) = c.is_null().iter().position(|v| v == Some(true))
        {
            return Err(fail(name, "null".into(), idx));
        }
    }
    for name in &INT_COLUMNS[1..] {
        let max = match *name {
            "retirement_bp" => MAX_RETIREMENT_BP,
            "hourly_rate_cents" => MAX_HOURLY_RATE_CENTS,
            "regular_hours_x100" | "overtime_hours_x100" => MAX_HOURS_X100,
            _ => MAX_AMOUNT_CENTS,
        };
        let values = df.column(name)?.i64()?;
        for (idx, v) in values.into_no_null_iter().enumerate() {
            if v < 0 && *name != "retirement_bp" {
                return Err(fail(name, format!("negative amount {v}"), idx));
            }
            if *name == "retirement_bp" && !(0..=MAX_RETIREMENT_BP).contains(&v) {
                return Err(fail(
                    name,
                    format!("{v} outside 0..={MAX_RETIREMENT_BP}"),
                    idx,
                ));
            }
            if v > max {
                return Err(fail(name, format!("{v} above the limit {max}"), idx));
            }
        }
    }
    let check = |name: &str, ok: &dyn Fn(&str) -> bool, what: &dyn Fn(&str) -> String| {
        let values = df.column(name)?.str()?;
        match values.iter().position(|v| v.is_some_and(|v| !ok(v))) {
            Some(idx) => Err(fail(name, what(values.get(idx).unwrap_or_default()), idx)),
            None => Ok(()),
        }
    };
    check("pay_type", &|v| v == "salaried" || v == "hourly", &|v| {
        format!("expected salaried or hourly, got \"{v}\"")
    })?;
    check(
        "filing_status",
        &|v| reference.deductions.contains_key(v),
        &|v| format!("expected single or married, got \"{v}\""),
    )?;
    check("state", &|v| reference.states.contains_key(v), &|v| {
        format!("unknown code \"{v}\"")
    })?;
    check("benefit_plan", &|v| reference.plans.contains_key(v), &|v| {
        format!("unknown code \"{v}\"")
    })?;
    check("client_id", &|v| v == params.client_id, &|v| {
        format!(
            "row of client \"{v}\" in a run for client \"{}\"",
            params.client_id
        )
    })?;
    check("period", &|v| v == params.period, &|v| {
        format!(
            "row of period \"{v}\" in a run for period \"{}\"",
            params.period
        )
    })?;
    Ok(())
}

/// `rhu(a, b) = (a + b/2) / b`: round-half-up integer division (`a >= 0`, even `b > 0`).
/// `Expr / Expr` is polars' `rust_div`: truncating integer division on i64, as the spec's `/`.
fn rhu(a: Expr, b: i64) -> Expr {
    (a + lit(b / 2)) / lit(b)
}

fn min2(a: Expr, b: Expr) -> Expr {
    when(a.clone().lt_eq(b.clone())).then(a).otherwise(b)
}

fn max2(a: Expr, b: Expr) -> Expr {
    when(a.clone().gt_eq(b.clone())).then(a).otherwise(b)
}

/// The spec's annual federal tax before rounding, as a sum of bracket portions times rates,
/// chosen per filing status: `Σ max(0, min(annual_taxable, next lower) − lower) * rate_bp`.
fn bracket_sum(reference: &Reference) -> Expr {
    let at = col("annual_taxable");
    let mut chain: Option<ChainedThen> = None;
    let mut first: Option<Then> = None;
    for (status, brackets) in &reference.brackets {
        let mut sum = lit(0i64);
        for (i, (lower, rate)) in brackets.iter().enumerate() {
            let upper = match brackets.get(i + 1) {
                Some((next, _)) => min2(at.clone(), lit(*next)),
                None => at.clone(),
            };
            sum = sum + max2(upper - lit(*lower), lit(0i64)) * lit(*rate);
        }
        let cond = col("filing_status").eq(lit(status.clone()));
        match (first.take(), chain.take()) {
            (None, None) => first = Some(when(cond).then(sum)),
            (Some(t), _) => chain = Some(t.when(cond).then(sum)),
            (None, Some(c)) => chain = Some(c.when(cond).then(sum)),
        }
    }
    let null = lit(NULL).cast(DataType::Int64);
    match (first, chain) {
        (_, Some(c)) => c.otherwise(null),
        (Some(t), None) => t.otherwise(null),
        (None, None) => null,
    }
}

/// The reference value of each row's `key` code as an i64 column `name` (null for a code
/// the table lacks, which validation has already ruled out): the left join of the spec's
/// reference tables, done as a lookup since the tables hold a handful of codes.
fn lookup(
    batch: &DataFrame,
    key: &str,
    table: &std::collections::BTreeMap<String, i64>,
    name: &str,
) -> PolarsResult<Column> {
    let codes = batch.column(key)?.str()?;
    let mut values: Int64Chunked = codes
        .iter()
        .map(|code| code.and_then(|c| table.get(c).copied()))
        .collect();
    values.rename(name.into());
    Ok(values.into_column())
}

/// The spec's computation, steps 1 to 12, on a validated batch.
pub(crate) fn compute(batch: DataFrame, reference: &Reference) -> Result<DataFrame, PipelineError> {
    let salaried = col("pay_type").eq(lit("salaried"));
    let mut batch = batch;
    batch.hstack_mut(&[
        lookup(&batch, "state", &reference.states, "state_rate_bp")?,
        lookup(&batch, "benefit_plan", &reference.plans, "premium_cents")?,
        lookup(
            &batch,
            "filing_status",
            &reference.deductions,
            "std_deduction_cents",
        )?,
    ])?;
    let out = batch
        .lazy()
        // 1-2. regular and overtime pay.
        .with_columns([
            when(salaried.clone())
                .then(rhu(col("annual_salary_cents"), 12))
                .otherwise(rhu(
                    col("hourly_rate_cents") * col("regular_hours_x100"),
                    100,
                ))
                .alias("regular"),
            when(salaried)
                .then(lit(0i64))
                .otherwise(rhu(
                    col("hourly_rate_cents") * col("overtime_hours_x100") * lit(3i64),
                    200,
                ))
                .alias("overtime"),
        ])
        // 3.
        .with_column((col("regular") + col("overtime") + col("bonus_cents")).alias("gross"))
        // 4. retirement, capped by what is left of the annual limit.
        .with_column(
            min2(
                rhu(col("gross") * col("retirement_bp"), 10_000),
                max2(
                    lit(RETIREMENT_ANNUAL_LIMIT) - col("ytd_retirement_cents"),
                    lit(0i64),
                ),
            )
            .alias("retirement"),
        )
        // 5. benefits never exceed what is left of gross.
        .with_column(min2(col("premium_cents"), col("gross") - col("retirement")).alias("benefits"))
        // 6.
        .with_column((col("gross") - col("retirement") - col("benefits")).alias("taxable"))
        // 7.
        .with_column(
            max2(
                col("taxable") * lit(12i64) - col("std_deduction_cents"),
                lit(0i64),
            )
            .alias("annual_taxable"),
        )
        // 8-11.
        .with_columns([
            rhu(rhu(bracket_sum(reference), 10_000), 12).alias("federal_tax"),
            rhu(
                max2(
                    min2(
                        col("gross"),
                        lit(SOCIAL_SECURITY_WAGE_BASE) - col("ytd_gross_cents"),
                    ),
                    lit(0i64),
                ) * lit(SOCIAL_SECURITY_BP),
                10_000,
            )
            .alias("social_security"),
            (rhu(col("gross") * lit(MEDICARE_BP), 10_000)
                + rhu(
                    (max2(
                        col("ytd_gross_cents") + col("gross") - lit(ADDITIONAL_MEDICARE_THRESHOLD),
                        lit(0i64),
                    ) - max2(
                        col("ytd_gross_cents") - lit(ADDITIONAL_MEDICARE_THRESHOLD),
                        lit(0i64),
                    )) * lit(ADDITIONAL_MEDICARE_BP),
                    10_000,
                ))
            .alias("medicare"),
            rhu(col("taxable") * col("state_rate_bp"), 10_000).alias("state_tax"),
        ])
        // 12.
        .with_column(
            (col("gross")
                - col("retirement")
                - col("benefits")
                - col("federal_tax")
                - col("social_security")
                - col("medicare")
                - col("state_tax"))
            .alias("net"),
        )
        .select(
            ["employee_id", "client_id", "period"]
                .into_iter()
                .chain(MONEY_COLUMNS)
                .map(col)
                .collect::<Vec<_>>(),
        )
        .collect()?;
    for name in MONEY_COLUMNS {
        let c = out.column(name)?;
        if c.dtype() != &DataType::Int64 || c.null_count() > 0 {
            return Err(PipelineError::permanent(format!(
                "payroll: internal error: column \"{name}\" is {} with {} nulls",
                c.dtype(),
                c.null_count()
            )));
        }
    }
    Ok(out)
}
