//! A generator of realistic, deterministic payroll input, for demos, benchmarks and tests.

use super::reference::*;
use super::{INPUT_COLUMNS, valid_period};
use crate::PipelineError;
use crate::sink::{write_atomic_unhashed, write_err};
use crate::source::{Format, format_of};
use polars::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::path::Path;

/// Rows per generated chunk; also the Parquet row-group size, small enough that a reader
/// of one batch decodes little beyond it.
pub const GENERATOR_CHUNK_ROWS: usize = 65_536;

const STATES: [&str; 10] = ["CA", "NY", "TX", "FL", "WA", "IL", "PA", "MA", "CO", "NC"];

/// One chunk's columns, in the spec's input order.
#[derive(Default)]
struct Chunk {
    ints: [Vec<i64>; 9],
    pay_type: Vec<&'static str>,
    benefit_plan: Vec<&'static str>,
    state: Vec<&'static str>,
    filing_status: Vec<&'static str>,
}

/// Index of `employee_id` in `Chunk::ints` (which follows `INT_COLUMNS`).
const ID: usize = 0;

/// Draws one employee. `months_before` = completed months of the year before the period.
fn employee(rng: &mut StdRng, id: i64, months_before: i64, c: &mut Chunk) {
    let pct = |rng: &mut StdRng| rng.random_range(0..100u32);
    let (salary, rate, regular, overtime, monthly) = if pct(rng) < 65 {
        // Salaried: whole-dollar salaries across bands, a thin tail of high earners whose
        // gross passes the social security wage base and the medicare threshold.
        let dollars = match rng.random_range(0..1000u32) {
            0..600 => rng.random_range(35_000..95_000i64),
            600..880 => rng.random_range(95_000..200_000),
            880..970 => rng.random_range(200_000..450_000),
            970..995 => rng.random_range(450_000..1_500_000),
            _ => rng.random_range(1_500_000..6_000_000),
        };
        let salary = dollars * 100;
        (salary, 0, 0, 0, salary / 12)
    } else {
        // Hourly: quarter-hour timesheets, some overtime, a few tiny months (a couple of
        // shifts) whose pay is below the benefit premium.
        let rate = rng.random_range(48..300i64) * 25;
        let regular = if pct(rng) < 2 {
            rng.random_range(4..48i64) * 25
        } else {
            rng.random_range(320..705i64) * 25
        };
        let overtime = if pct(rng) < 40 {
            rng.random_range(1..120i64) * 25
        } else {
            0
        };
        (
            0,
            rate,
            regular,
            overtime,
            rate * (regular + overtime) / 100,
        )
    };
    let bonus = match pct(rng) {
        0..88 => 0,
        88..98 => rng.random_range(100..5_000i64) * 100,
        _ => rng.random_range(5_000..50_000i64) * 100,
    };
    let retirement_bp = match pct(rng) {
        0..20 => 0,
        20..30 => MAX_RETIREMENT_BP,
        _ => rng.random_range(2..25i64) * 50,
    };
    // Year to date: roughly the months already paid; a few employees sit just below the
    // social security wage base, the additional-medicare threshold or the retirement limit,
    // so this period crosses it.
    let mut ytd_gross = monthly * months_before * rng.random_range(90..=110i64) / 100;
    let mut ytd_ret = (ytd_gross * retirement_bp / 10_000).min(RETIREMENT_ANNUAL_LIMIT);
    if months_before > 0 {
        match pct(rng) {
            0..3 => ytd_gross = SOCIAL_SECURITY_WAGE_BASE - rng.random_range(0..=monthly.max(1)),
            3..5 => {
                ytd_gross = ADDITIONAL_MEDICARE_THRESHOLD - rng.random_range(0..=monthly.max(1))
            }
            _ => {}
        }
        if retirement_bp > 0 && pct(rng) < 8 {
            ytd_ret = RETIREMENT_ANNUAL_LIMIT - rng.random_range(0..=60_000i64);
        }
    }
    let plan = match pct(rng) {
        0..15 => "NONE",
        15..50 => "BASIC",
        50..80 => "PLUS",
        _ => "FAMILY",
    };
    // In `INT_COLUMNS` order.
    let ints = [
        id,
        salary,
        rate,
        regular,
        overtime,
        bonus,
        retirement_bp,
        ytd_gross.max(0),
        ytd_ret.max(0),
    ];
    for (col, v) in c.ints.iter_mut().zip(ints) {
        col.push(v);
    }
    c.pay_type
        .push(if salary > 0 { "salaried" } else { "hourly" });
    c.benefit_plan.push(plan);
    c.state.push(STATES[rng.random_range(0..STATES.len())]);
    c.filing_status
        .push(if pct(rng) < 55 { "single" } else { "married" });
}

impl Chunk {
    fn frame(self, client: &str, period: &str) -> Result<DataFrame, PipelineError> {
        let n = self.ints[ID].len();
        let mut ints = self.ints.into_iter();
        let mut strs = [
            self.pay_type,
            self.benefit_plan,
            self.state,
            self.filing_status,
        ]
        .into_iter();
        let mut columns = Vec::with_capacity(INPUT_COLUMNS.len());
        for (name, is_int) in INPUT_COLUMNS {
            let column = match name {
                "client_id" => Column::new(name.into(), vec![client; n]),
                "period" => Column::new(name.into(), vec![period; n]),
                _ if is_int => Column::new(name.into(), ints.next().unwrap_or_default()),
                _ => Column::new(name.into(), strs.next().unwrap_or_default()),
            };
            columns.push(column);
        }
        Ok(DataFrame::new(n, columns)?)
    }
}

/// Writes `rows` employees of `client` for `period` to `out` (`.parquet` or `.csv`, by
/// extension) and returns the number of rows written.
///
/// Deterministic (the same arguments give the same rows), realistic (salaried and hourly
/// staff, all states, plans and filing statuses, overtime, bonuses, high earners above the
/// social security wage base and the additional-medicare threshold, year-to-date figures
/// just below those thresholds and the retirement limit, tiny pay below the benefit
/// premium), bounded in memory (generated and written in chunks of
/// [`GENERATOR_CHUNK_ROWS`], which are also the Parquet row groups) and atomic (temporary
/// file, fsync, rename).
pub fn generate_payroll(
    rows: u64,
    client: &str,
    period: &str,
    seed: u64,
    out: &Path,
) -> Result<u64, PipelineError> {
    if client.trim().is_empty() {
        return Err(PipelineError::permanent(
            "generate: client must not be empty",
        ));
    }
    if !valid_period(period) {
        return Err(PipelineError::permanent(format!(
            "generate: period: expected YYYY-MM, got \"{period}\""
        )));
    }
    let format = format_of(out).ok_or_else(|| {
        PipelineError::permanent(format!(
            "generate: {}: expected a .parquet or .csv path",
            out.display()
        ))
    })?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| PipelineError::transient(format!("generate: {}: {e}", dir.display())))?;
    }
    let months_before = period[5..].parse::<i64>().unwrap_or(1) - 1;
    let mut rng = StdRng::seed_from_u64(seed);
    let chunks = rows.div_ceil(GENERATOR_CHUNK_ROWS as u64);
    let mut next_id: i64 = 1;
    let mut chunk = |i: u64| -> Result<DataFrame, PipelineError> {
        let n = (rows - i * GENERATOR_CHUNK_ROWS as u64).min(GENERATOR_CHUNK_ROWS as u64) as usize;
        let mut c = Chunk::default();
        for v in c.ints.iter_mut() {
            v.reserve(n);
        }
        for _ in 0..n {
            employee(&mut rng, next_id, months_before, &mut c);
            next_id += 1;
        }
        c.frame(client, period)
    };
    write_atomic_unhashed(out, |w: &mut dyn Write| {
        let schema = chunk_schema();
        match format {
            Format::Parquet => {
                let mut writer = ParquetWriter::new(w)
                    .with_row_group_size(Some(GENERATOR_CHUNK_ROWS))
                    .batched(&schema)
                    .map_err(|e| write_err(out, e))?;
                for i in 0..chunks {
                    writer
                        .write_batch(&chunk(i)?)
                        .map_err(|e| write_err(out, e))?;
                }
                writer.finish().map_err(|e| write_err(out, e))?;
            }
            Format::Csv => {
                let mut writer = CsvWriter::new(w)
                    .include_header(true)
                    .batched(&schema)
                    .map_err(|e| write_err(out, e))?;
                for i in 0..chunks {
                    writer
                        .write_batch(&chunk(i)?)
                        .map_err(|e| write_err(out, e))?;
                }
                writer.finish().map_err(|e| write_err(out, e))?;
            }
        }
        Ok(())
    })?;
    Ok(rows)
}

/// The generated file's schema (the spec's input columns and dtypes).
fn chunk_schema() -> Schema {
    INPUT_COLUMNS
        .iter()
        .map(|(name, int)| {
            let dtype = if *int {
                DataType::Int64
            } else {
                DataType::String
            };
            Field::new((*name).into(), dtype)
        })
        .collect()
}
