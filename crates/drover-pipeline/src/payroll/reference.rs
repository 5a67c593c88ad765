//! Payroll reference data (spec v1): tables shipped as CSV files in `data/`, embedded in the
//! binary and parsed once per job; constants as Rust consts.

use crate::PipelineError;
use std::collections::BTreeMap;

/// Annual limit on pre-tax retirement contributions (cents).
pub const RETIREMENT_ANNUAL_LIMIT: i64 = 2_350_000;
/// Social security wage base (cents of gross per year).
pub const SOCIAL_SECURITY_WAGE_BASE: i64 = 17_610_000;
/// Year-to-date gross above which the additional medicare rate applies (cents).
pub const ADDITIONAL_MEDICARE_THRESHOLD: i64 = 20_000_000;
/// Social security rate (bp).
pub const SOCIAL_SECURITY_BP: i64 = 620;
/// Medicare rate (bp).
pub const MEDICARE_BP: i64 = 145;
/// Additional medicare rate above the threshold (bp).
pub const ADDITIONAL_MEDICARE_BP: i64 = 90;
/// Upper bound of `retirement_bp`.
pub const MAX_RETIREMENT_BP: i64 = 1500;

const FEDERAL_BRACKETS: &str = include_str!("../../data/federal_brackets.csv");
const STANDARD_DEDUCTION: &str = include_str!("../../data/standard_deduction.csv");
const STATE_RATES: &str = include_str!("../../data/state_rates.csv");
const BENEFIT_PLANS: &str = include_str!("../../data/benefit_plans.csv");

/// The payroll reference tables, parsed and ready to look codes up in.
#[derive(Debug, Clone)]
pub struct Reference {
    /// Federal brackets per filing status: `(lower bound, rate_bp)` ascending from 0.
    pub brackets: BTreeMap<String, Vec<(i64, i64)>>,
    /// Standard deduction per filing status (annual cents).
    pub deductions: BTreeMap<String, i64>,
    /// State flat rate (bp) per state code.
    pub states: BTreeMap<String, i64>,
    /// Employee premium per month (cents) per benefit plan code.
    pub plans: BTreeMap<String, i64>,
}

/// Rows of a small embedded CSV (header checked, fields trimmed).
fn rows<'a>(
    name: &str,
    text: &'a str,
    header: &[&str],
) -> Result<Vec<Vec<&'a str>>, PipelineError> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let got: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .collect();
    if got != header {
        return Err(PipelineError::permanent(format!(
            "reference table {name}: header {got:?}, expected {header:?}"
        )));
    }
    lines
        .map(|l| {
            let fields: Vec<&str> = l.split(',').map(str::trim).collect();
            if fields.len() == header.len() {
                Ok(fields)
            } else {
                Err(PipelineError::permanent(format!(
                    "reference table {name}: bad line {l:?}"
                )))
            }
        })
        .collect()
}

fn int(name: &str, s: &str) -> Result<i64, PipelineError> {
    s.parse::<i64>().ok().filter(|v| *v >= 0).ok_or_else(|| {
        PipelineError::permanent(format!("reference table {name}: bad number {s:?}"))
    })
}

/// A `code -> value` table.
fn code_table(
    name: &str,
    text: &str,
    header: &[&str],
) -> Result<BTreeMap<String, i64>, PipelineError> {
    let mut m = BTreeMap::new();
    for r in rows(name, text, header)? {
        if m.insert(r[0].to_string(), int(name, r[1])?).is_some() {
            return Err(PipelineError::permanent(format!(
                "reference table {name}: duplicate code {:?}",
                r[0]
            )));
        }
    }
    Ok(m)
}

impl Reference {
    /// Parses the embedded tables; an error here means a broken build, reported as permanent.
    pub fn load() -> Result<Self, PipelineError> {
        let mut brackets: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
        for r in rows(
            "federal_brackets",
            FEDERAL_BRACKETS,
            &["filing_status", "lower_bound_cents", "rate_bp"],
        )? {
            brackets.entry(r[0].to_string()).or_default().push((
                int("federal_brackets", r[1])?,
                int("federal_brackets", r[2])?,
            ));
        }
        for (status, b) in &brackets {
            let ascending = b.windows(2).all(|w| w[0].0 < w[1].0);
            if b.first().map(|x| x.0) != Some(0) || !ascending {
                return Err(PipelineError::permanent(format!(
                    "reference table federal_brackets: {status} must start at 0 and ascend"
                )));
            }
        }
        let deductions = code_table(
            "standard_deduction",
            STANDARD_DEDUCTION,
            &["filing_status", "deduction_cents"],
        )?;
        if deductions.keys().ne(brackets.keys()) {
            return Err(PipelineError::permanent(
                "reference tables: federal_brackets and standard_deduction disagree on filing statuses",
            ));
        }
        let states = code_table("state_rates", STATE_RATES, &["state", "rate_bp"])?;
        let plans = code_table(
            "benefit_plans",
            BENEFIT_PLANS,
            &["benefit_plan", "premium_cents"],
        )?;
        Ok(Reference {
            brackets,
            deductions,
            states,
            plans,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_match_the_spec() {
        let r = Reference::load().unwrap();
        assert_eq!(r.brackets["single"].len(), 7);
        assert_eq!(r.brackets["married"][6], (75_160_000, 3700));
        assert_eq!(r.deductions["married"], 3_000_000);
        assert_eq!(r.states.len(), 10);
        assert_eq!(r.states["CA"], 725);
        assert_eq!(r.plans["FAMILY"], 46_000);
    }
}
