//! The `payroll` pipeline: a monthly gross-to-net run for one client and period, exactly as
//! `docs/payroll.md` (spec v1) says, to the cent.
//!
//! Params: `client_id` (string), `period` (`YYYY-MM`), `input` (`.parquet` or `.csv` path,
//! or a `postgres://` URL together with `input_table`: the client's rows of the period are
//! then read from that table in `employee_id` order, one keyset page per batch), all
//! required, and optional `output` (a directory replacing the default output location).
//!
//! Every batch is validated first (missing columns, nulls, negative amounts, out-of-range
//! rates, unknown codes, rows of another client or period: a permanent error naming the
//! column and the first offending `employee_id`); validation also maps each row's codes to
//! its state rate, benefit premium and filing status (the spec's reference joins). Then the
//! spec's twelve steps run as one pass over the batch's polars columns, in i64 arithmetic
//! only, producing the output frame (see [`compute`] for why not a lazy query).

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

/// The version of the payroll formulas and reference tables (see [`Pipeline::version`]).
pub const VERSION: &str = "payroll-2026.1";

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

    fn describe(&self) -> Option<crate::Description> {
        use crate::Field;
        let cents = "i64 cents";
        Some(crate::Description {
            summary: "monthly gross-to-net payroll for one client and period, to the cent (docs/payroll.md)",
            params: vec![
                Field::new(
                    "client_id",
                    "string",
                    "the client every input row must belong to",
                ),
                Field::new(
                    "period",
                    "string YYYY-MM",
                    "the pay month every input row must belong to",
                ),
                Field::new(
                    "input",
                    ".parquet | .csv path | postgres:// URL",
                    "one row per employee",
                ),
                Field::optional(
                    "input_table",
                    "table name",
                    "none",
                    "the table to read when input is a postgres:// URL (required then)",
                ),
                Field::optional(
                    "output",
                    "directory",
                    "OUTPUT_ROOT/payroll/KEY",
                    "where the parts and _manifest.json go",
                ),
            ],
            input_columns: vec![
                Field::new("employee_id", "i64", "unique within the client"),
                Field::new("client_id", "string", "equal to the client_id param"),
                Field::new("period", "string YYYY-MM", "equal to the period param"),
                Field::new("pay_type", "string", "salaried or hourly"),
                Field::new("annual_salary_cents", cents, "salaried only, 0 for hourly"),
                Field::new("hourly_rate_cents", cents, "hourly only, 0 for salaried"),
                Field::new(
                    "regular_hours_x100",
                    "i64 hundredths of an hour",
                    "hourly only",
                ),
                Field::new(
                    "overtime_hours_x100",
                    "i64 hundredths of an hour",
                    "hourly only, paid at 1.5x",
                ),
                Field::new("bonus_cents", cents, "one-off bonus this period, >= 0"),
                Field::new(
                    "retirement_bp",
                    "i64 basis points",
                    "pre-tax retirement rate, 0..=1500 (1 bp = 0.01 %)",
                ),
                Field::new("benefit_plan", "string", "NONE, BASIC, PLUS or FAMILY"),
                Field::new(
                    "state",
                    "string",
                    "CA, NY, TX, FL, WA, IL, PA, MA, CO or NC",
                ),
                Field::new("filing_status", "string", "single or married"),
                Field::new(
                    "ytd_gross_cents",
                    cents,
                    "gross earned earlier this year, >= 0",
                ),
                Field::new(
                    "ytd_retirement_cents",
                    cents,
                    "retirement contributed earlier this year, >= 0",
                ),
            ],
            output_columns: vec![
                Field::new("employee_id", "i64", "from the input"),
                Field::new("client_id", "string", "from the input"),
                Field::new("period", "string YYYY-MM", "from the input"),
                Field::new("gross", cents, "regular + overtime + bonus"),
                Field::new(
                    "retirement",
                    cents,
                    "pre-tax contribution, capped by the annual limit",
                ),
                Field::new(
                    "benefits",
                    cents,
                    "the plan's monthly premium, at most what is left",
                ),
                Field::new("taxable", cents, "gross - retirement - benefits"),
                Field::new(
                    "federal_tax",
                    cents,
                    "annualised brackets after the standard deduction, / 12",
                ),
                Field::new("social_security", cents, "6.2 % up to the wage base"),
                Field::new("medicare", cents, "1.45 %, plus 0.9 % above the threshold"),
                Field::new("state_tax", cents, "taxable x the state's flat rate"),
                Field::new("net", cents, "gross minus every deduction and tax"),
            ],
            result: "{\"rows\": employees, \"total_gross\": ..., \"total_net\": ...}: rows, and the sum over every employee of each money column as total_<column> (i64 cents)",
        })
    }

    /// The payroll formulas' version (docs/payroll.md): bump it with any change that alters
    /// a cent of output for the same input and reference tables.
    fn version(&self, _params: &PayrollParams) -> String {
        VERSION.to_string()
    }

    /// `employee_id`, `client_id`, `period`, then every money column as i64 cents; no
    /// nulls anywhere.
    fn output_schema(&self, _params: &PayrollParams) -> Option<crate::OutputSchema> {
        let mut schema = crate::OutputSchema::new()
            .column("employee_id", DataType::Int64)
            .column("client_id", DataType::String)
            .column("period", DataType::String);
        for name in MONEY_COLUMNS {
            schema = schema.column(name, DataType::Int64);
        }
        Some(schema)
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
        let codes = validate_batch(&batch, params, reference, ctx.first_row)?;
        Ok(Some(compute(batch, &codes)?))
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

/// What validation learns about a batch's code columns, one entry per row: the reference
/// lookups (the spec's joins) the computation needs, with the filing-status table they
/// index.
pub(crate) struct Codes<'a> {
    tables: Tables<'a>,
    salaried: Vec<bool>,
    /// Index into [`Tables::statuses`].
    status: Vec<usize>,
    state_bp: Vec<i64>,
    premium: Vec<i64>,
}

/// The reference tables in the shape the computation reads them.
struct Tables<'a> {
    /// Per filing status, in [`Reference::deductions`] order.
    statuses: Vec<FilingStatus<'a>>,
}

/// A filing status's standard deduction and federal brackets.
struct FilingStatus<'a> {
    name: &'a str,
    deduction: i64,
    /// (lower bound, rate_bp), ascending from 0.
    brackets: &'a [(i64, i64)],
}

impl<'a> Tables<'a> {
    fn new(reference: &'a Reference) -> Result<Self, PipelineError> {
        let statuses = reference
            .deductions
            .iter()
            .map(|(status, deduction)| {
                let brackets = reference.brackets.get(status).ok_or_else(|| {
                    PipelineError::permanent(format!(
                        "payroll: reference tables: no federal brackets for filing status \"{status}\""
                    ))
                })?;
                Ok(FilingStatus {
                    name: status,
                    deduction: *deduction,
                    brackets,
                })
            })
            .collect::<Result<Vec<_>, PipelineError>>()?;
        Ok(Tables { statuses })
    }
}

/// Maps every value of a string column through `find`, in one pass; `Err(row)` names the
/// first value `find` rejects. The column must hold no nulls (validation checks them first).
///
/// A column of a few distinct codes is the common case, so each distinct short value (up to
/// 12 bytes, which polars stores inline in its 16-byte string view) is looked up once and
/// then recognised by its view alone: one integer compare per row instead of a string
/// lookup. Equal views mean equal strings, so a miss only costs the ordinary lookup.
fn map_codes<T: Copy>(
    column: &StringChunked,
    find: impl Fn(&str) -> Option<T>,
    out: &mut Vec<T>,
) -> Result<(), usize> {
    const INLINE: u32 = 12;
    const MEMO: usize = 16;
    let mut memo: Vec<(u128, T)> = Vec::with_capacity(MEMO);
    out.clear();
    out.reserve(column.len());
    let mut row = 0;
    for arr in column.downcast_iter() {
        for (i, view) in arr.views().iter().enumerate() {
            let key = view.as_u128();
            let inline = view.length <= INLINE;
            let hit = if inline {
                memo.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
            } else {
                None
            };
            let value = match hit {
                Some(v) => v,
                None => {
                    let v = find(arr.value(i)).ok_or(row + i)?;
                    if inline && memo.len() < MEMO {
                        memo.push((key, v));
                    }
                    v
                }
            };
            out.push(value);
        }
        row += arr.len();
    }
    Ok(())
}

/// The spec's validation rules, checked column by column in spec order; the error names the
/// column and the batch's first offending row by `employee_id`. Returns the reference
/// lookups of every row.
pub(crate) fn validate_batch<'a>(
    df: &DataFrame,
    params: &PayrollParams,
    reference: &'a Reference,
    first_row: u64,
) -> Result<Codes<'a>, PipelineError> {
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
    let mut codes = Codes {
        tables: Tables::new(reference)?,
        salaried: Vec::new(),
        status: Vec::new(),
        state_bp: Vec::new(),
        premium: Vec::new(),
    };
    // Each code column in one pass, mapped to what the computation needs; the message says
    // what was expected, with the offending value.
    let code_column = |name: &str| df.column(name).and_then(|c| c.str());
    let bad = |name: &str, idx: usize, what: &dyn Fn(&str) -> String| -> PipelineError {
        match code_column(name) {
            Ok(values) => fail(name, what(values.get(idx).unwrap_or_default()), idx),
            Err(e) => e.into(),
        }
    };
    map_codes(
        code_column("pay_type")?,
        |v| match v {
            "salaried" => Some(true),
            "hourly" => Some(false),
            _ => None,
        },
        &mut codes.salaried,
    )
    .map_err(|idx| {
        bad("pay_type", idx, &|v| {
            format!("expected salaried or hourly, got \"{v}\"")
        })
    })?;
    map_codes(
        code_column("filing_status")?,
        |v| codes.tables.statuses.iter().position(|s| s.name == v),
        &mut codes.status,
    )
    .map_err(|idx| {
        bad("filing_status", idx, &|v| {
            format!("expected single or married, got \"{v}\"")
        })
    })?;
    map_codes(
        code_column("state")?,
        |v| reference.states.get(v).copied(),
        &mut codes.state_bp,
    )
    .map_err(|idx| bad("state", idx, &|v| format!("unknown code \"{v}\"")))?;
    map_codes(
        code_column("benefit_plan")?,
        |v| reference.plans.get(v).copied(),
        &mut codes.premium,
    )
    .map_err(|idx| bad("benefit_plan", idx, &|v| format!("unknown code \"{v}\"")))?;
    // Every row belongs to the run's client and period.
    let mut unit = Vec::new();
    for (name, what, want) in [
        ("client_id", "client", &params.client_id),
        ("period", "period", &params.period),
    ] {
        map_codes(code_column(name)?, |v| (v == want).then_some(()), &mut unit).map_err(|idx| {
            bad(name, idx, &|v| {
                format!("row of {what} \"{v}\" in a run for {what} \"{want}\"")
            })
        })?;
    }
    Ok(codes)
}

/// `rhu(a, b) = (a + b/2) / b`: round-half-up integer division (`a >= 0`, even `b > 0`), with
/// Rust's truncating `/`, as the spec's.
fn rhu(a: i64, b: i64) -> i64 {
    (a + b / 2) / b
}

/// The spec's annual federal tax before rounding: `Σ max(0, min(annual_taxable, next lower)
/// − lower) * rate_bp` over the filing status's brackets (ascending, the first at 0).
fn bracket_sum(annual_taxable: i64, brackets: &[(i64, i64)]) -> i64 {
    let mut sum = 0;
    for (i, (lower, rate)) in brackets.iter().enumerate() {
        let upper = match brackets.get(i + 1) {
            Some((next, _)) => annual_taxable.min(*next),
            None => annual_taxable,
        };
        sum += (upper - lower).max(0) * rate;
    }
    sum
}

/// One employee's results, in [`MONEY_COLUMNS`] order.
fn employee(i: usize, input: &[&[i64]; 9], codes: &Codes) -> [i64; MONEY_COLUMNS.len()] {
    let [
        _,
        annual_salary,
        hourly_rate,
        regular_hours,
        overtime_hours,
        bonus,
        retirement_bp,
        ytd_gross,
        ytd_retirement,
    ] = input;
    let rate = hourly_rate[i];
    // 1-3.
    let (regular, overtime) = if codes.salaried[i] {
        (rhu(annual_salary[i], 12), 0)
    } else {
        (
            rhu(rate * regular_hours[i], 100),
            rhu(rate * overtime_hours[i] * 3, 200),
        )
    };
    let gross = regular + overtime + bonus[i];
    // 4. retirement, capped by what is left of the annual limit.
    let retirement = rhu(gross * retirement_bp[i], 10_000)
        .min((RETIREMENT_ANNUAL_LIMIT - ytd_retirement[i]).max(0));
    // 5. benefits never exceed what is left of gross.
    let benefits = codes.premium[i].min(gross - retirement);
    // 6-8.
    let taxable = gross - retirement - benefits;
    let status = &codes.tables.statuses[codes.status[i]];
    let annual_taxable = (taxable * 12 - status.deduction).max(0);
    let federal_tax = rhu(
        rhu(bracket_sum(annual_taxable, status.brackets), 10_000),
        12,
    );
    // 9-10.
    let ytd = ytd_gross[i];
    let social_security = rhu(
        gross.min(SOCIAL_SECURITY_WAGE_BASE - ytd).max(0) * SOCIAL_SECURITY_BP,
        10_000,
    );
    let extra = (ytd + gross - ADDITIONAL_MEDICARE_THRESHOLD).max(0)
        - (ytd - ADDITIONAL_MEDICARE_THRESHOLD).max(0);
    let medicare = rhu(gross * MEDICARE_BP, 10_000) + rhu(extra * ADDITIONAL_MEDICARE_BP, 10_000);
    // 11-12.
    let state_tax = rhu(taxable * codes.state_bp[i], 10_000);
    let net = gross - retirement - benefits - federal_tax - social_security - medicare - state_tax;
    [
        gross,
        retirement,
        benefits,
        taxable,
        federal_tax,
        social_security,
        medicare,
        state_tax,
        net,
    ]
}

/// The spec's computation, steps 1 to 12, on a batch [`validate_batch`] accepted (its
/// `codes`): one pass over the rows in i64 arithmetic, producing the output frame.
///
/// A hand-written pass rather than a lazy polars query: at a few thousand rows per batch,
/// planning a query of some forty expressions cost more than evaluating it, and every
/// expression materialised a column of its own.
pub(crate) fn compute(batch: DataFrame, codes: &Codes) -> Result<DataFrame, PipelineError> {
    let height = batch.height();
    // Contiguous, null-free i64 columns (validation ruled nulls out; a batch that spans two
    // row groups arrives in two chunks and is joined here).
    let chunked = INT_COLUMNS
        .iter()
        .map(|name| Ok(batch.column(name)?.i64()?.rechunk()))
        .collect::<PolarsResult<Vec<_>>>()?;
    let mut slices: [&[i64]; 9] = [&[]; 9];
    for (slot, ca) in slices.iter_mut().zip(&chunked) {
        *slot = ca.cont_slice()?;
    }
    if codes.salaried.len() != height || codes.status.len() != height {
        return Err(PipelineError::permanent(format!(
            "payroll: internal error: {} rows validated, {height} to compute",
            codes.salaried.len()
        )));
    }
    let mut money: Vec<Vec<i64>> = (0..MONEY_COLUMNS.len())
        .map(|_| Vec::with_capacity(height))
        .collect();
    for i in 0..height {
        for (column, value) in money.iter_mut().zip(employee(i, &slices, codes)) {
            column.push(value);
        }
    }
    let mut columns = Vec::with_capacity(3 + MONEY_COLUMNS.len());
    for name in ["employee_id", "client_id", "period"] {
        columns.push(batch.column(name)?.clone());
    }
    for (name, values) in MONEY_COLUMNS.iter().zip(money) {
        columns.push(Int64Chunked::from_vec((*name).into(), values).into_column());
    }
    Ok(DataFrame::new(height, columns)?)
}
