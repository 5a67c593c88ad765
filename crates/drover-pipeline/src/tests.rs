//! Crate tests: the payroll spec by hand, Parquet/CSV parity, resume, bad input, noop.

use crate::payroll::{self, PayrollParams, Reference};
use crate::*;
use polars::prelude::*;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// One input row, with neutral defaults (salaried, nothing withheld but taxes).
#[derive(Debug, Clone)]
struct Emp {
    id: i64,
    pay_type: &'static str,
    salary: i64,
    rate: i64,
    regular: i64,
    overtime: i64,
    bonus: i64,
    bp: i64,
    plan: &'static str,
    state: &'static str,
    filing: &'static str,
    ytd_gross: i64,
    ytd_ret: i64,
}

fn emp(id: i64) -> Emp {
    Emp {
        id,
        pay_type: "salaried",
        salary: 0,
        rate: 0,
        regular: 0,
        overtime: 0,
        bonus: 0,
        bp: 0,
        plan: "NONE",
        state: "TX",
        filing: "single",
        ytd_gross: 0,
        ytd_ret: 0,
    }
}

fn frame(rows: &[Emp]) -> DataFrame {
    let n = rows.len();
    let i = |f: fn(&Emp) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
    let s = |f: fn(&Emp) -> &'static str| rows.iter().map(f).collect::<Vec<&str>>();
    DataFrame::new(
        n,
        vec![
            Column::new("employee_id".into(), i(|e| e.id)),
            Column::new("client_id".into(), vec!["acme"; n]),
            Column::new("period".into(), vec!["2026-11"; n]),
            Column::new("pay_type".into(), s(|e| e.pay_type)),
            Column::new("annual_salary_cents".into(), i(|e| e.salary)),
            Column::new("hourly_rate_cents".into(), i(|e| e.rate)),
            Column::new("regular_hours_x100".into(), i(|e| e.regular)),
            Column::new("overtime_hours_x100".into(), i(|e| e.overtime)),
            Column::new("bonus_cents".into(), i(|e| e.bonus)),
            Column::new("retirement_bp".into(), i(|e| e.bp)),
            Column::new("benefit_plan".into(), s(|e| e.plan)),
            Column::new("state".into(), s(|e| e.state)),
            Column::new("filing_status".into(), s(|e| e.filing)),
            Column::new("ytd_gross_cents".into(), i(|e| e.ytd_gross)),
            Column::new("ytd_retirement_cents".into(), i(|e| e.ytd_ret)),
        ],
    )
    .unwrap()
}

fn params() -> PayrollParams {
    PayrollParams {
        client_id: "acme".into(),
        period: "2026-11".into(),
        input: "unused.parquet".into(),
        input_table: None,
        output: None,
    }
}

/// Output money columns of one employee, in `MONEY_COLUMNS` order.
#[derive(Debug, PartialEq, Eq)]
struct Out {
    gross: i64,
    retirement: i64,
    benefits: i64,
    taxable: i64,
    federal_tax: i64,
    social_security: i64,
    medicare: i64,
    state_tax: i64,
    net: i64,
}

fn out_rows(df: &DataFrame) -> Vec<Out> {
    let c = |n: &str| df.column(n).unwrap().i64().unwrap().clone();
    let cols: Vec<Int64Chunked> = payroll::MONEY_COLUMNS.iter().map(|n| c(n)).collect();
    (0..df.height())
        .map(|r| {
            let v = |k: usize| cols[k].get(r).unwrap();
            Out {
                gross: v(0),
                retirement: v(1),
                benefits: v(2),
                taxable: v(3),
                federal_tax: v(4),
                social_security: v(5),
                medicare: v(6),
                state_tax: v(7),
                net: v(8),
            }
        })
        .collect()
}

/// Runs the payroll transform on `rows` (validation included).
fn pay(rows: &[Emp]) -> Vec<Out> {
    let reference = Reference::load().unwrap();
    let df = frame(rows);
    let codes = payroll::validate_batch(&df, &params(), &reference, 0).unwrap();
    let out = payroll::compute(df, &codes).unwrap();
    assert_eq!(
        out.get_column_names_owned(),
        [
            "employee_id",
            "client_id",
            "period",
            "gross",
            "retirement",
            "benefits",
            "taxable",
            "federal_tax",
            "social_security",
            "medicare",
            "state_tax",
            "net"
        ]
    );
    out_rows(&out)
}

fn pay1(e: Emp) -> Out {
    pay(&[e]).remove(0)
}

// ---------------------------------------------------------------------------------------
// The spec, by hand
// ---------------------------------------------------------------------------------------

#[test]
fn salaried_full_computation_by_hand() {
    let e = Emp {
        salary: 6_000_006,
        bp: 500,
        plan: "BASIC",
        state: "CA",
        ..emp(1)
    };
    // 1. regular = rhu(6 000 006, 12) = (6 000 006 + 6) / 12 = 500 001 (500 000.5 rounds up)
    // 3. gross = 500 001
    // 4. retirement = min(rhu(500 001 * 500, 10 000), max(0, 2 350 000 - 0))
    //      = min((250 000 500 + 5 000) / 10 000 = 25 000, 2 350 000) = 25 000
    // 5. benefits = min(8 500, 500 001 - 25 000) = 8 500
    // 6. taxable = 500 001 - 25 000 - 8 500 = 466 501
    // 7. annual_taxable = 466 501 * 12 - 1 500 000 = 5 598 012 - 1 500 000 = 4 098 012
    // 8. 1 192 500 * 1000 + (4 098 012 - 1 192 500) * 1200
    //      = 1 192 500 000 + 3 486 614 400 = 4 679 114 400
    //    annual_federal = (4 679 114 400 + 5 000) / 10 000 = 467 911
    //    federal_tax = (467 911 + 6) / 12 = 38 993
    // 9. social_security = (min(500 001, 17 610 000) * 620 + 5 000) / 10 000
    //      = 310 005 620 / 10 000 = 31 000
    // 10. medicare = (500 001 * 145 + 5 000) / 10 000 = 72 505 145 / 10 000 = 7 250; extra 0
    // 11. state_tax = (466 501 * 725 + 5 000) / 10 000 = 338 218 225 / 10 000 = 33 821
    // 12. net = 500 001 - 25 000 - 8 500 - 38 993 - 31 000 - 7 250 - 33 821 = 355 437
    assert_eq!(
        pay1(e),
        Out {
            gross: 500_001,
            retirement: 25_000,
            benefits: 8_500,
            taxable: 466_501,
            federal_tax: 38_993,
            social_security: 31_000,
            medicare: 7_250,
            state_tax: 33_821,
            net: 355_437,
        }
    );
}

#[test]
fn salaried_regular_rounds_half_up() {
    // rhu(6 000 005, 12) = 6 000 011 / 12 = 500 000 (500 000.41..)
    // rhu(6 000 006, 12) = 6 000 012 / 12 = 500 001 (exactly .5 rounds up)
    let a = pay1(Emp {
        salary: 6_000_005,
        ..emp(1)
    });
    let b = pay1(Emp {
        salary: 6_000_006,
        ..emp(2)
    });
    assert_eq!((a.gross, b.gross), (500_000, 500_001));
}

#[test]
fn hourly_regular_and_overtime_round_half_up() {
    let e = Emp {
        pay_type: "hourly",
        rate: 2_551,
        regular: 16_050,
        overtime: 1_025,
        bonus: 10_000,
        // Salaried-only fields are ignored for hourly staff.
        salary: 99_999_999,
        ..emp(1)
    };
    // regular = rhu(2 551 * 16 050, 100) = (40 943 550 + 50) / 100 = 409 436 (409 435.5 up)
    // overtime = rhu(2 551 * 1 025 * 3, 200) = (7 844 325 + 100) / 200 = 39 222 (39 221.625)
    // gross = 409 436 + 39 222 + 10 000 = 458 658
    let o = pay1(e);
    assert_eq!(o.gross, 458_658);
    // Salaried: overtime is 0 whatever the hours say.
    let s = pay1(Emp {
        salary: 1_200_000,
        rate: 2_551,
        regular: 16_050,
        overtime: 1_025,
        ..emp(2)
    });
    assert_eq!(s.gross, 100_000);
}

#[test]
fn social_security_wage_base_crossing() {
    let base = Emp {
        salary: 6_000_006,
        ..emp(1)
    }; // gross 500 001
    // Just under the base: min(500 001, 17 610 000 - 17 500 000 = 110 000) = 110 000
    //   rhu(110 000 * 620, 10 000) = (68 200 000 + 5 000) / 10 000 = 6 820
    let under = pay1(Emp {
        ytd_gross: 17_500_000,
        ..base.clone()
    });
    assert_eq!(under.social_security, 6_820);
    // One cent below: min(500 001, 1) * 620 = 620 -> (620 + 5 000) / 10 000 = 0
    let cent = pay1(Emp {
        ytd_gross: 17_609_999,
        ..base.clone()
    });
    assert_eq!(cent.social_security, 0);
    // Already above: max(0, min(500 001, -90 000)) = 0
    let over = pay1(Emp {
        ytd_gross: 17_700_000,
        ..base.clone()
    });
    assert_eq!(over.social_security, 0);
    // Far below: the whole gross, rhu(500 001 * 620, 10 000) = 31 000
    assert_eq!(pay1(base).social_security, 31_000);
}

#[test]
fn additional_medicare_threshold_crossing() {
    let base = Emp {
        salary: 6_000_006,
        ..emp(1)
    }; // gross 500 001; base medicare rhu(500 001 * 145, 10 000) = 7 250
    // Crossing: extra = max(0, 19 800 000 + 500 001 - 20 000 000) - max(0, -200 000) = 300 001
    //   rhu(300 001 * 90, 10 000) = (27 000 090 + 5 000) / 10 000 = 2 700 -> 7 250 + 2 700
    let crossing = pay1(Emp {
        ytd_gross: 19_800_000,
        ..base.clone()
    });
    assert_eq!(crossing.medicare, 9_950);
    // Above: extra = (20 600 001 - 20 000 000) - (20 100 000 - 20 000 000) = 500 001
    //   rhu(500 001 * 90, 10 000) = (45 000 090 + 5 000) / 10 000 = 4 500 -> 11 750
    let above = pay1(Emp {
        ytd_gross: 20_100_000,
        ..base.clone()
    });
    assert_eq!(above.medicare, 11_750);
    // Below: extra = max(0, 10 500 001 - 20 000 000) - 0 = 0
    let below = pay1(Emp {
        ytd_gross: 10_000_000,
        ..base
    });
    assert_eq!(below.medicare, 7_250);
}

#[test]
fn retirement_annual_limit() {
    let base = Emp {
        salary: 6_000_006,
        bp: 500,
        ..emp(1)
    }; // uncapped retirement rhu(500 001 * 500, 10 000) = 25 000
    // Near the limit: min(25 000, max(0, 2 350 000 - 2 340 000)) = 10 000
    let near = pay1(Emp {
        ytd_ret: 2_340_000,
        ..base.clone()
    });
    assert_eq!(near.retirement, 10_000);
    assert_eq!(near.taxable, 500_001 - 10_000);
    // At or past the limit: max(0, 2 350 000 - 2 400 000) = 0
    let past = pay1(Emp {
        ytd_ret: 2_400_000,
        ..base.clone()
    });
    assert_eq!(past.retirement, 0);
    // Far below: uncapped
    assert_eq!(pay1(base).retirement, 25_000);
}

#[test]
fn tiny_pay_caps_benefits_at_what_is_left() {
    let e = Emp {
        pay_type: "hourly",
        rate: 1_500,
        regular: 300,
        bp: 1_000,
        plan: "FAMILY",
        state: "CA",
        ..emp(1)
    };
    // regular = rhu(1 500 * 300, 100) = 4 500 = gross
    // retirement = rhu(4 500 * 1 000, 10 000) = (4 500 000 + 5 000) / 10 000 = 450
    // benefits = min(46 000, 4 500 - 450) = 4 050; taxable = 0
    // annual_taxable = max(0, 0 - 1 500 000) = 0 -> federal 0; state rhu(0) = 0
    // social_security = (4 500 * 620 + 5 000) / 10 000 = 2 795 000 / 10 000 = 279
    // medicare = (4 500 * 145 + 5 000) / 10 000 = 657 500 / 10 000 = 65
    // net = 4 500 - 450 - 4 050 - 0 - 279 - 65 - 0 = -344 (the spec lets net go negative)
    assert_eq!(
        pay1(e),
        Out {
            gross: 4_500,
            retirement: 450,
            benefits: 4_050,
            taxable: 0,
            federal_tax: 0,
            social_security: 279,
            medicare: 65,
            state_tax: 0,
            net: -344,
        }
    );
}

#[test]
fn single_and_married_brackets() {
    let base = Emp {
        salary: 12_000_000,
        ..emp(1)
    }; // gross = taxable = 1 000 000 a month, 12 000 000 a year
    // single: annual_taxable = 12 000 000 - 1 500 000 = 10 500 000
    //   1 192 500 * 1000 = 1 192 500 000
    //   (4 847 500 - 1 192 500) * 1200 = 4 386 000 000
    //   (10 335 000 - 4 847 500) * 2200 = 12 072 500 000
    //   (10 500 000 - 10 335 000) * 2400 = 396 000 000
    //   sum 18 047 000 000 -> rhu(/10 000) = 1 804 700 -> rhu(/12) = 1 804 706 / 12 = 150 392
    let single = pay1(base.clone());
    assert_eq!(single.federal_tax, 150_392);
    // married: annual_taxable = 12 000 000 - 3 000 000 = 9 000 000
    //   2 385 000 * 1000 + (9 000 000 - 2 385 000) * 1200 = 2 385 000 000 + 7 938 000 000
    //   = 10 323 000 000 -> 1 032 300 -> (1 032 300 + 6) / 12 = 86 025
    let married = pay1(Emp {
        filing: "married",
        ..base
    });
    assert_eq!(married.federal_tax, 86_025);
}

#[test]
fn every_single_bracket_including_the_top() {
    // salary 120 000 000 -> gross 10 000 000; single annual_taxable 118 500 000
    //   1 192 500 * 1000                        =   1 192 500 000
    //   3 655 000 * 1200                        =   4 386 000 000
    //   5 487 500 * 2200                        =  12 072 500 000
    //   (19 730 000 - 10 335 000) 9 395 000 * 2400 = 22 548 000 000
    //   (25 052 500 - 19 730 000) 5 322 500 * 3200 = 17 032 000 000
    //   (62 635 000 - 25 052 500) 37 582 500 * 3500 = 131 538 750 000
    //   (118 500 000 - 62 635 000) 55 865 000 * 3700 = 206 700 500 000
    //   sum 395 470 250 000 -> 39 547 025 -> (39 547 025 + 6) / 12 = 3 295 585
    let o = pay1(Emp {
        salary: 120_000_000,
        ..emp(1)
    });
    assert_eq!(o.federal_tax, 3_295_585);
}

#[test]
fn standard_deduction_floors_at_zero() {
    // single: 100 000 * 12 - 1 500 000 < 0 -> 0 -> no federal tax
    let s = pay1(Emp {
        salary: 1_200_000,
        ..emp(1)
    });
    assert_eq!((s.taxable, s.federal_tax), (100_000, 0));
    // married: 240 000 * 12 - 3 000 000 = -120 000 -> 0
    let m = pay1(Emp {
        salary: 2_880_000,
        filing: "married",
        ..emp(2)
    });
    assert_eq!((m.taxable, m.federal_tax), (240_000, 0));
    // ... while the same pay single is taxed: 2 880 000 - 1 500 000 = 1 380 000
    //   1 192 500 * 1000 + 187 500 * 1200 = 1 417 500 000 -> 141 750 -> 141 756 / 12 = 11 813
    let s2 = pay1(Emp {
        salary: 2_880_000,
        ..emp(3)
    });
    assert_eq!(s2.federal_tax, 11_813);
}

// ---------------------------------------------------------------------------------------
// An independent scalar implementation, to check the polars one row by row
// ---------------------------------------------------------------------------------------

fn rhu(a: i64, b: i64) -> i64 {
    (a + b / 2) / b
}

/// The spec, written as plainly as possible.
fn scalar(row: &[i64; 9], pay_type: &str, plan: &str, state: &str, filing: &str) -> [i64; 9] {
    let r = Reference::load().unwrap();
    let [_, salary, rate, reg_h, ot_h, bonus, bp, ytd_g, ytd_r] = *row;
    let (regular, overtime) = if pay_type == "salaried" {
        (rhu(salary, 12), 0)
    } else {
        (rhu(rate * reg_h, 100), rhu(rate * ot_h * 3, 200))
    };
    let gross = regular + overtime + bonus;
    let retirement = rhu(gross * bp, 10_000).min((2_350_000 - ytd_r).max(0));
    let benefits = r.plans[plan].min(gross - retirement);
    let taxable = gross - retirement - benefits;
    let annual = (taxable * 12 - r.deductions[filing]).max(0);
    let br = &r.brackets[filing];
    let mut sum = 0;
    for (i, (lower, rate_bp)) in br.iter().enumerate() {
        let upper = br.get(i + 1).map_or(annual, |(n, _)| annual.min(*n));
        sum += (upper - lower).max(0) * rate_bp;
    }
    let federal = rhu(rhu(sum, 10_000), 12);
    let ss = rhu(gross.min(17_610_000 - ytd_g).max(0) * 620, 10_000);
    let extra = (ytd_g + gross - 20_000_000).max(0) - (ytd_g - 20_000_000).max(0);
    let medicare = rhu(gross * 145, 10_000) + rhu(extra * 90, 10_000);
    let state_tax = rhu(taxable * r.states[state], 10_000);
    let net = gross - retirement - benefits - federal - ss - medicare - state_tax;
    [
        gross, retirement, benefits, taxable, federal, ss, medicare, state_tax, net,
    ]
}

fn read_parquet(path: &Path) -> DataFrame {
    ParquetReader::new(std::fs::File::open(path).unwrap())
        .finish()
        .unwrap()
}

/// Every output part of a job directory, concatenated and sorted by employee_id.
fn read_parts(dir: &Path) -> DataFrame {
    let mut parts: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    parts.sort();
    let mut all: Option<DataFrame> = None;
    for p in parts {
        let df = read_parquet(&p);
        all = Some(match all {
            None => df,
            Some(mut a) => {
                a.vstack_mut(&df).unwrap();
                a
            }
        });
    }
    all.unwrap()
        .sort(["employee_id"], SortMultipleOptions::default())
        .unwrap()
}

fn spec(key: &str, params: serde_json::Value, batch: usize, root: &Path) -> JobSpec {
    JobSpec {
        key: key.into(),
        pipeline: "payroll".into(),
        params,
        batch_size: Some(batch),
        attempt: 1,
        output_root: root.to_path_buf(),
    }
}

/// Runs a job to the end; returns its batches and result.
fn run_all(spec: &JobSpec) -> (Vec<BatchOutcome>, serde_json::Value) {
    let mut run = Registry::builtin().open(spec, 0).unwrap();
    let mut batches = Vec::new();
    while let Some(b) = run.next_batch().unwrap() {
        batches.push(b);
    }
    let result = run.finish(&batches).unwrap();
    (batches, result)
}

fn job_dir(root: &Path, key: &str) -> PathBuf {
    root.join("payroll").join(key_path(key))
}

#[test]
fn parquet_and_csv_agree_and_match_the_scalar_spec() {
    let tmp = tempfile::tempdir().unwrap();
    let pq = tmp.path().join("in.parquet");
    let csv = tmp.path().join("in.csv");
    let rows = 20_003;
    assert_eq!(
        generate_payroll(rows, "acme", "2026-11", 7, &pq).unwrap(),
        rows
    );
    assert_eq!(
        generate_payroll(rows, "acme", "2026-11", 7, &csv).unwrap(),
        rows
    );

    let p = |input: &Path| json!({"client_id": "acme", "period": "2026-11", "input": input});
    let (pq_batches, pq_result) = run_all(&spec("k-pq", p(&pq), 3_000, tmp.path()));
    let (csv_batches, csv_result) = run_all(&spec("k-csv", p(&csv), 3_000, tmp.path()));
    assert_eq!(pq_batches.len(), 7);
    assert_eq!(pq_result, csv_result);
    assert_eq!(pq_result["rows"], json!(rows));
    let summaries = |b: &[BatchOutcome]| b.iter().map(|b| b.summary.clone()).collect::<Vec<_>>();
    assert_eq!(summaries(&pq_batches), summaries(&csv_batches));

    let a = read_parts(&job_dir(tmp.path(), "k-pq"));
    let b = read_parts(&job_dir(tmp.path(), "k-csv"));
    assert_eq!(a.height(), rows as usize);
    assert!(a.equals_missing(&b), "parquet and csv outputs differ");
    for name in payroll::MONEY_COLUMNS {
        assert_eq!(a.column(name).unwrap().dtype(), &DataType::Int64);
        let total: i64 = a.column(name).unwrap().i64().unwrap().sum().unwrap();
        assert_eq!(pq_result[format!("total_{name}")], json!(total), "{name}");
    }

    // Row by row against the plain scalar implementation, and the generator covers the
    // cases that matter.
    let input = read_parquet(&pq)
        .sort(["employee_id"], SortMultipleOptions::default())
        .unwrap();
    let ints: Vec<Int64Chunked> = payroll::INT_COLUMNS
        .iter()
        .map(|c| input.column(c).unwrap().i64().unwrap().clone())
        .collect();
    let strs = |c: &str| input.column(c).unwrap().str().unwrap().clone();
    let (pt, plan, st, fs) = (
        strs("pay_type"),
        strs("benefit_plan"),
        strs("state"),
        strs("filing_status"),
    );
    let outs = out_rows(&a);
    let (mut ss_cross, mut med_cross, mut ret_cap, mut tiny, mut hourly_ot) = (0, 0, 0, 0, 0);
    let mut states = std::collections::BTreeSet::new();
    for (r, out) in outs.iter().enumerate() {
        let row: [i64; 9] = std::array::from_fn(|k| ints[k].get(r).unwrap());
        let (pt, plan, st, fs) = (
            pt.get(r).unwrap(),
            plan.get(r).unwrap(),
            st.get(r).unwrap(),
            fs.get(r).unwrap(),
        );
        let want = scalar(&row, pt, plan, st, fs);
        let got = [
            out.gross,
            out.retirement,
            out.benefits,
            out.taxable,
            out.federal_tax,
            out.social_security,
            out.medicare,
            out.state_tax,
            out.net,
        ];
        assert_eq!(got, want, "employee {}", row[0]);
        let (gross, ytd_g, ytd_r) = (out.gross, row[7], row[8]);
        ss_cross += (ytd_g < 17_610_000 && ytd_g + gross > 17_610_000) as u32;
        med_cross += (ytd_g < 20_000_000 && ytd_g + gross > 20_000_000) as u32;
        ret_cap += (out.retirement > 0 && out.retirement == 2_350_000 - ytd_r) as u32;
        tiny += (out.benefits > 0 && out.taxable == 0) as u32;
        hourly_ot += (pt == "hourly" && row[4] > 0) as u32;
        states.insert(st.to_string());
    }
    assert_eq!(states.len(), 10);
    for (what, n) in [
        ("social security crossings", ss_cross),
        ("medicare crossings", med_cross),
        ("retirement caps", ret_cap),
        ("tiny pay", tiny),
        ("hourly overtime", hourly_ot),
    ] {
        assert!(n >= 10, "generator produced only {n} {what}");
    }
}

#[test]
fn generator_is_deterministic_and_uses_row_groups() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.parquet");
    let b = tmp.path().join("sub/b.parquet");
    generate_payroll(70_000, "acme", "2026-01", 3, &a).unwrap();
    generate_payroll(70_000, "acme", "2026-01", 3, &b).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let mut file = std::fs::File::open(&a).unwrap();
    let mut reader = ParquetReader::new(&mut file);
    let md = reader.get_metadata().unwrap();
    assert_eq!(md.row_groups.len(), 2, "65 536-row groups");
    // No temporary files are left behind.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
    assert!(generate_payroll(1, "acme", "2026-13", 3, &a).is_err());
    assert!(generate_payroll(1, "acme", "2026-01", 3, &tmp.path().join("x.txt")).is_err());
    // Zero rows: a valid empty file, and a job over it succeeds with zero batches.
    let empty = tmp.path().join("empty.csv");
    generate_payroll(0, "acme", "2026-11", 3, &empty).unwrap();
    let p = json!({"client_id": "acme", "period": "2026-11", "input": empty});
    let (batches, result) = run_all(&spec("empty", p, 10, tmp.path()));
    assert!(batches.is_empty());
    assert_eq!(result["rows"], json!(0));
}

#[test]
fn resume_writes_every_row_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    for ext in ["parquet", "csv"] {
        let input = tmp.path().join(format!("in.{ext}"));
        generate_payroll(10_500, "acme", "2026-11", 11, &input).unwrap();
        let params = json!({"client_id": "acme", "period": "2026-11", "input": input});
        let key = format!("acme:2026-11:{ext}");
        let job = spec(&key, params.clone(), 1_000, tmp.path());

        // Attempt 1: batches 0..=4 run, but the "ledger" only recorded 0..=3 before the
        // crash (batch 4's part was written, its checkpoint was not).
        let registry = Registry::builtin();
        let mut run = registry.open(&job, 0).unwrap();
        assert_eq!(run.batches_total(), Some(11));
        let mut ledger = Vec::new();
        for _ in 0..4 {
            ledger.push(run.next_batch().unwrap().unwrap());
        }
        let unrecorded = run.next_batch().unwrap().unwrap();
        assert_eq!(unrecorded.index, 4);
        drop(run);

        // Attempt 2 resumes after the 4 recorded batches; batch 4 is redone in place.
        let job2 = JobSpec {
            attempt: 2,
            ..job.clone()
        };
        let mut run = registry.open(&job2, 4).unwrap();
        assert_eq!(run.batches_total(), Some(11));
        while let Some(b) = run.next_batch().unwrap() {
            ledger.push(b);
        }
        let redone = &ledger[4];
        assert_eq!(redone.index, 4);
        assert_eq!(
            redone.checksum, unrecorded.checksum,
            "replayed part is identical"
        );
        let result = run.finish(&ledger).unwrap();
        assert_eq!(
            ledger.iter().map(|b| b.index).collect::<Vec<_>>(),
            (0..11).collect::<Vec<_>>()
        );
        assert_eq!(ledger.last().unwrap().rows, 500);

        // Every row exactly once, same as an uninterrupted run.
        let dir = job_dir(tmp.path(), &key);
        let out = read_parts(&dir);
        assert_eq!(out.height(), 10_500);
        assert_eq!(
            out.column("employee_id").unwrap().n_unique().unwrap(),
            10_500
        );
        let fresh = spec(&format!("fresh-{ext}"), params, 1_000, tmp.path());
        let (_, fresh_result) = run_all(&fresh);
        assert_eq!(result, fresh_result);
        assert!(out.equals(&read_parts(&job_dir(tmp.path(), &format!("fresh-{ext}")))));

        // The manifest lists every part with its rows and checksum; nothing else is there.
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).unwrap()).unwrap();
        assert_eq!(manifest["key"], json!(key));
        assert_eq!(manifest["pipeline"], json!("payroll"));
        assert_eq!(manifest["rows"], json!(10_500));
        assert_eq!(manifest["batches"], json!(11));
        assert_eq!(manifest["summary"], result);
        let parts = manifest["parts"].as_array().unwrap();
        assert_eq!(parts.len(), 11);
        for (i, part) in parts.iter().enumerate() {
            let file = dir.join(part["file"].as_str().unwrap());
            assert_eq!(part["index"], json!(i));
            assert_eq!(part["file"], json!(format!("part-{i:05}.parquet")));
            let sum = hex::encode(Sha256::digest(std::fs::read(&file).unwrap()));
            assert_eq!(part["sha256"], json!(sum));
            assert_eq!(ledger[i].output.as_deref(), Some(file.to_str().unwrap()));
        }
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names.len(),
            12,
            "11 parts + manifest, no temporaries: {names:?}"
        );

        // The ledger must account for every batch.
        let run = {
            let mut r = registry.open(&job2, 11).unwrap();
            assert!(r.next_batch().unwrap().is_none());
            r
        };
        let e = run.finish(&ledger[..10]).unwrap_err();
        assert!(
            e.is_permanent() && e.message.contains("10 batches recorded"),
            "{e}"
        );
    }
}

#[test]
fn batches_straddling_row_groups_agree_with_csv_and_replay_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let pq = tmp.path().join("in.parquet");
    let csv = tmp.path().join("in.csv");
    // Two row groups (65 536 + 4 464 rows); with batches of 6 000, batch 10 (rows
    // 60 000..66 000) straddles them and batch 11 is a short last batch.
    let rows = payroll::GENERATOR_CHUNK_ROWS as u64 + 4_464;
    generate_payroll(rows, "acme", "2026-11", 5, &pq).unwrap();
    generate_payroll(rows, "acme", "2026-11", 5, &csv).unwrap();
    let p = |input: &Path| json!({"client_id": "acme", "period": "2026-11", "input": input});
    let pq_job = spec("straddle-pq", p(&pq), 6_000, tmp.path());
    let (pq_batches, pq_result) = run_all(&pq_job);
    let (csv_batches, csv_result) = run_all(&spec("straddle-csv", p(&csv), 6_000, tmp.path()));
    assert_eq!(pq_batches.len(), 12);
    assert_eq!(pq_batches[10].rows, 6_000);
    assert_eq!(pq_batches[11].rows, 4_000);
    assert_eq!(pq_result, csv_result);
    assert_eq!(pq_result["rows"], json!(rows));
    for (a, b) in pq_batches.iter().zip(&csv_batches) {
        assert_eq!((a.index, a.rows, &a.summary), (b.index, b.rows, &b.summary));
    }
    let a = read_parts(&job_dir(tmp.path(), "straddle-pq"));
    let b = read_parts(&job_dir(tmp.path(), "straddle-csv"));
    assert_eq!(a.height(), rows as usize);
    assert!(a.equals_missing(&b), "parquet and csv outputs differ");

    // Resuming at the straddling batch rewrites the same parts, byte for byte.
    let mut run = Registry::builtin()
        .open(
            &JobSpec {
                attempt: 2,
                ..pq_job
            },
            10,
        )
        .unwrap();
    let mut replayed = Vec::new();
    while let Some(b) = run.next_batch().unwrap() {
        replayed.push(b);
    }
    // Same rows, parts and checksums; only the attempt that wrote them differs.
    let expected: Vec<BatchOutcome> = pq_batches[10..]
        .iter()
        .map(|b| BatchOutcome {
            attempt: 2,
            ..b.clone()
        })
        .collect();
    assert_eq!(replayed, expected);
}

#[test]
fn an_error_in_a_later_batch_surfaces_in_order_and_sticks() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.csv");
    // Batches of 2: batch 0 good, batch 1 holds an unknown state, batch 2 good.
    let mut lines = with(4, |l| field(l, 11, "ZZ"));
    lines.push(good_line(6));
    std::fs::write(&input, format!("{HEADER}\n{}\n", lines.join("\n"))).unwrap();
    let p = json!({"client_id": "acme", "period": "2026-11", "input": input});
    let mut run = Registry::builtin()
        .open(&spec("later", p, 2, tmp.path()), 0)
        .unwrap();
    let first = run.next_batch().unwrap().unwrap();
    assert_eq!((first.index, first.rows), (0, 2));
    let part = first.output.unwrap();
    assert!(
        Path::new(&part).is_file(),
        "batch 0's part is written when it is returned"
    );
    let want = "validation: column \"state\": unknown code \"ZZ\" for employee_id 4";
    for _ in 0..2 {
        let e = run.next_batch().unwrap_err();
        assert!(e.is_permanent());
        assert_eq!(e.message, want);
    }
    let parts = std::fs::read_dir(job_dir(tmp.path(), "later"))
        .unwrap()
        .count();
    assert_eq!(parts, 1, "no part for the failed batch or the one after it");
}

/// Parts are written several batches ahead (`WRITE_AHEAD`), yet batches come back in order,
/// each with its part complete and matching its checksum; an error further on comes after
/// every batch before it; and a job dropped mid-way leaves no half-written file behind.
#[test]
fn parts_written_ahead_come_back_in_order_and_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.csv");
    // Ten batches of one row; the row of batch 7 (employee 8) has an unknown state.
    let lines: Vec<String> = (1..=10)
        .map(|i| {
            if i == 8 {
                field(good_line(i), 11, "ZZ")
            } else {
                good_line(i)
            }
        })
        .collect();
    std::fs::write(&input, format!("{HEADER}\n{}\n", lines.join("\n"))).unwrap();
    let p = json!({"client_id": "acme", "period": "2026-11", "input": input});
    let mut run = Registry::builtin()
        .open(&spec("ahead", p.clone(), 1, tmp.path()), 0)
        .unwrap();
    for i in 0..7 {
        let b = run.next_batch().unwrap().unwrap();
        assert_eq!((b.index, b.rows), (i, 1));
        let bytes = std::fs::read(b.output.unwrap()).unwrap();
        assert_eq!(b.checksum.unwrap(), hex::encode(Sha256::digest(&bytes)));
    }
    let e = run.next_batch().unwrap_err();
    assert_eq!(
        e.message,
        "validation: column \"state\": unknown code \"ZZ\" for employee_id 8"
    );

    // Dropped after its first batch, with later parts still being written.
    let mut run = Registry::builtin()
        .open(&spec("dropped", p, 1, tmp.path()), 0)
        .unwrap();
    assert_eq!(run.next_batch().unwrap().unwrap().index, 0);
    drop(run);
    let dir = job_dir(tmp.path(), "dropped");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() > 1, "parts were written ahead: {names:?}");
    for (i, name) in names.iter().enumerate() {
        assert_eq!(
            *name,
            crate::sink::part_name(i as u32),
            "no temporary file is left"
        );
        assert_eq!(read_parquet(&dir.join(name)).height(), 1);
    }
}

#[test]
fn output_param_replaces_the_default_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.parquet");
    generate_payroll(10, "acme", "2026-11", 1, &input).unwrap();
    let out = tmp.path().join("custom");
    let p = json!({"client_id": "acme", "period": "2026-11", "input": input, "output": out});
    let (batches, _) = run_all(&spec("k", p, 4, tmp.path()));
    assert_eq!(batches.len(), 3);
    assert!(out.join("part-00002.parquet").is_file());
    assert!(out.join(MANIFEST).is_file());
    assert!(!tmp.path().join("payroll").exists());
}

// ---------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------

const HEADER: &str = "employee_id,client_id,period,pay_type,annual_salary_cents,hourly_rate_cents,\
regular_hours_x100,overtime_hours_x100,bonus_cents,retirement_bp,benefit_plan,state,\
filing_status,ytd_gross_cents,ytd_retirement_cents";

fn good_line(id: i64) -> String {
    format!("{id},acme,2026-11,salaried,6000000,0,0,0,0,500,BASIC,CA,single,0,0")
}

/// Runs a payroll job over CSV `body` (after the header); returns the first error.
fn csv_error(header: &str, lines: &[String]) -> PipelineError {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("bad.csv");
    let mut text = format!("{header}\n");
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(&input, text).unwrap();
    let p = json!({"client_id": "acme", "period": "2026-11", "input": input});
    let mut run = Registry::builtin()
        .open(&spec("bad", p, 100, tmp.path()), 0)
        .unwrap();
    loop {
        match run.next_batch() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("expected a validation error"),
            Err(e) => return e,
        }
    }
}

/// `lines` with row `id` replaced by `line`.
fn with(id: i64, f: impl Fn(String) -> String) -> Vec<String> {
    (1..=5)
        .map(|i| {
            if i == id {
                f(good_line(i))
            } else {
                good_line(i)
            }
        })
        .collect()
}

fn field(line: String, k: usize, value: &str) -> String {
    let mut f: Vec<String> = line.split(',').map(String::from).collect();
    f[k] = value.into();
    f.join(",")
}

#[test]
fn bad_inputs_are_permanent_and_name_column_and_employee() {
    let cases: Vec<(Vec<String>, &str, String)> = vec![
        (
            with(3, |l| field(l, 11, "ZZ")),
            "validation: column \"state\": unknown code \"ZZ\" for employee_id 3",
            HEADER.into(),
        ),
        (
            with(4, |l| field(l, 8, "")),
            "validation: column \"bonus_cents\": null for employee_id 4",
            HEADER.into(),
        ),
        (
            with(2, |l| field(l, 13, "-5")),
            "validation: column \"ytd_gross_cents\": negative amount -5 for employee_id 2",
            HEADER.into(),
        ),
        (
            with(5, |l| field(l, 10, "GOLD")),
            "validation: column \"benefit_plan\": unknown code \"GOLD\" for employee_id 5",
            HEADER.into(),
        ),
        (
            with(2, |l| field(l, 9, "1501")),
            "validation: column \"retirement_bp\": 1501 outside 0..=1500 for employee_id 2",
            HEADER.into(),
        ),
        (
            with(1, |l| field(l, 3, "contractor")),
            "validation: column \"pay_type\": expected salaried or hourly, got \"contractor\" for employee_id 1",
            HEADER.into(),
        ),
        (
            with(3, |l| field(l, 12, "widowed")),
            "validation: column \"filing_status\": expected single or married, got \"widowed\" for employee_id 3",
            HEADER.into(),
        ),
        (
            with(4, |l| field(l, 1, "globex")),
            "validation: column \"client_id\": row of client \"globex\" in a run for client \"acme\" for employee_id 4",
            HEADER.into(),
        ),
        (
            with(4, |l| field(l, 2, "2026-10")),
            "validation: column \"period\": row of period \"2026-10\" in a run for period \"2026-11\" for employee_id 4",
            HEADER.into(),
        ),
        (
            with(2, |l| field(l, 4, "12.5")),
            "validation: column \"annual_salary_cents\": expected i64, got \"12.5\" for employee_id 2",
            HEADER.into(),
        ),
        (
            with(2, |l| field(l, 4, "10000000000000")),
            "validation: column \"annual_salary_cents\": 10000000000000 above the limit 1000000000000 for employee_id 2",
            HEADER.into(),
        ),
        (
            (1..=3)
                .map(|i| {
                    let l = good_line(i);
                    l[..l.rfind(',').unwrap()].to_string()
                })
                .collect(),
            "validation: column \"ytd_retirement_cents\": missing from the input (employee_id n/a)",
            HEADER[..HEADER.rfind(',').unwrap()].into(),
        ),
        (
            with(3, |l| field(l, 0, "")),
            "validation: column \"employee_id\": null for input row 3",
            HEADER.into(),
        ),
    ];
    for (lines, want, header) in cases {
        let e = csv_error(&header, &lines);
        assert!(e.is_permanent(), "{e}");
        assert_eq!(e.message, want);
    }
    // The first offending row wins, in a later batch too (row 150 is in batch 1).
    let mut lines: Vec<String> = (1..=200).map(good_line).collect();
    lines[149] = field(lines[149].clone(), 11, "QQ");
    lines[179] = field(lines[179].clone(), 11, "ZZ");
    let e = csv_error(HEADER, &lines);
    assert_eq!(
        e.message,
        "validation: column \"state\": unknown code \"QQ\" for employee_id 150"
    );
    // Extra columns are ignored.
    let lines: Vec<String> = (1..=3).map(|i| format!("{},x", good_line(i))).collect();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("extra.csv");
    std::fs::write(&input, format!("{HEADER},note\n{}\n", lines.join("\n"))).unwrap();
    let p = json!({"client_id": "acme", "period": "2026-11", "input": input});
    let (_, result) = run_all(&spec("extra", p, 100, tmp.path()));
    assert_eq!(result["rows"], json!(3));
}

#[test]
fn bad_parquet_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("bad.parquet");
    let reference = Reference::load().unwrap();
    // A null in a parquet column, and a negative amount.
    let mut df = frame(&[emp(10), emp(11), emp(12)]);
    let bonus = Column::new("bonus_cents".into(), [Some(0i64), None, Some(0)]);
    df.replace("bonus_cents", bonus).unwrap();
    ParquetWriter::new(std::fs::File::create(&input).unwrap())
        .finish(&mut df)
        .unwrap();
    let p = json!({"client_id": "acme", "period": "2026-11", "input": input});
    let mut run = Registry::builtin()
        .open(&spec("bad", p.clone(), 100, tmp.path()), 0)
        .unwrap();
    let e = run.next_batch().unwrap_err();
    assert_eq!(
        e.message,
        "validation: column \"bonus_cents\": null for employee_id 11"
    );
    let neg = frame(&[
        emp(10),
        Emp {
            salary: -1,
            ..emp(11)
        },
    ]);
    let Err(e) = payroll::validate_batch(&neg, &params(), &reference, 0) else {
        panic!("a negative amount must fail validation");
    };
    assert_eq!(
        e.message,
        "validation: column \"annual_salary_cents\": negative amount -1 for employee_id 11"
    );
    // Floats where integers belong are refused, never truncated.
    let mut df = frame(&[emp(1)]);
    df.replace("bonus_cents", Column::new("bonus_cents".into(), [1.5f64]))
        .unwrap();
    ParquetWriter::new(std::fs::File::create(&input).unwrap())
        .finish(&mut df)
        .unwrap();
    let mut run = Registry::builtin()
        .open(&spec("bad2", p.clone(), 100, tmp.path()), 0)
        .unwrap();
    let e = run.next_batch().unwrap_err();
    assert!(e.is_permanent());
    assert_eq!(
        e.message,
        "validation: column \"bonus_cents\": expected i64, got a column of dtype f64"
    );
    // A missing input file is permanent, at open.
    let p =
        json!({"client_id": "acme", "period": "2026-11", "input": tmp.path().join("nope.parquet")});
    let e = Registry::builtin()
        .open(&spec("nope", p, 100, tmp.path()), 0)
        .unwrap_err();
    assert!(
        e.is_permanent() && e.message.contains("nope.parquet"),
        "{e}"
    );
    assert!(
        !job_dir(tmp.path(), "nope").exists(),
        "no output directory for a failed open"
    );
}

#[test]
fn params_are_validated_strictly() {
    let r = Registry::builtin();
    let ok = json!({"client_id": "acme", "period": "2026-11", "input": "x.parquet"});
    r.validate("payroll", &ok).unwrap();
    r.validate(
        "payroll",
        &json!({"client_id": "acme", "period": "2026-11", "input": "x.CSV", "output": "/tmp/o"}),
    )
    .unwrap();
    let cases = [
        (
            json!({"client_id": "acme", "period": "2026-13", "input": "x.parquet"}),
            "payroll: param \"period\": expected YYYY-MM, got \"2026-13\"",
        ),
        (
            json!({"client_id": "acme", "period": "2026-1", "input": "x.parquet"}),
            "payroll: param \"period\": expected YYYY-MM, got \"2026-1\"",
        ),
        (
            json!({"period": "2026-11", "input": "x.parquet"}),
            "payroll: param \"client_id\" is required",
        ),
        (
            json!({"client_id": 7, "period": "2026-11", "input": "x.parquet"}),
            "payroll: param \"client_id\": expected a non-empty string, got 7",
        ),
        (
            json!({"client_id": "acme", "period": "2026-11", "input": "x.json"}),
            "payroll: param \"input\": expected a .parquet or .csv path or a postgres:// URL, got \"x.json\"",
        ),
        (
            json!({"client_id": "acme", "period": "2026-11", "input": "x.csv", "inptu": 1}),
            "payroll: unknown param \"inptu\" (accepted: client_id, input, input_table, output, period)",
        ),
    ];
    for (p, want) in cases {
        let e = r.validate("payroll", &p).unwrap_err();
        assert!(e.is_permanent());
        assert_eq!(e.message, want);
    }
    let e = r.validate("nope", &json!({})).unwrap_err();
    assert_eq!(
        e.message,
        "unknown pipeline \"nope\" (known: noop, payroll, sql, exec)"
    );
    assert!(r.contains("payroll") && !r.contains("nope"));
    assert_eq!(r.names(), ["noop", "payroll", "sql", "exec"]);
    assert_eq!(r.default_max_attempts("payroll"), None);
    let e = r
        .open(
            &JobSpec {
                batch_size: Some(0),
                ..spec("k", ok, 1, Path::new("/nonexistent"))
            },
            0,
        )
        .unwrap_err();
    assert!(e.is_permanent());
}

// ---------------------------------------------------------------------------------------
// noop
// ---------------------------------------------------------------------------------------

fn noop(params: serde_json::Value, attempt: u32) -> JobSpec {
    JobSpec {
        key: "noop-1".into(),
        pipeline: "noop".into(),
        params,
        batch_size: None,
        attempt,
        output_root: PathBuf::from("/nonexistent/never-created"),
    }
}

#[test]
fn noop_fail_attempts_then_succeeds() {
    let r = Registry::builtin();
    let p = json!({"fail_attempts": 2, "batches": 3});
    for attempt in 1..=2 {
        let mut run = r.open(&noop(p.clone(), attempt), 0).unwrap();
        assert_eq!(run.batches_total(), Some(3));
        let e = run.next_batch().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient);
        assert_eq!(
            e.message,
            format!("noop: injected transient failure on attempt {attempt} of fail_attempts=2")
        );
    }
    let mut run = r.open(&noop(p, 3), 0).unwrap();
    let mut batches = Vec::new();
    while let Some(b) = run.next_batch().unwrap() {
        assert_eq!(b.rows, 1);
        assert_eq!(b.output, None);
        assert_eq!(b.summary, Summary::from([("rows".to_string(), 1)]));
        batches.push(b);
    }
    assert_eq!(
        run.finish(&batches).unwrap(),
        json!({"rows": 3, "batches": 3})
    );

    // Permanent kind; and the first batch *of the attempt* fails, also after a resume.
    let p = json!({"fail_attempts": 1, "fail_kind": "permanent", "batches": 4});
    let mut run = r.open(&noop(p.clone(), 1), 2).unwrap();
    let e = run.next_batch().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    let mut run = r.open(&noop(p, 2), 2).unwrap();
    let b = run.next_batch().unwrap().unwrap();
    assert_eq!(b.index, 2);
    // Defaults: one batch, no failure.
    let (_, res) = {
        let mut run = r.open(&noop(json!({}), 1), 0).unwrap();
        let b = vec![run.next_batch().unwrap().unwrap()];
        assert!(run.next_batch().unwrap().is_none());
        (b.clone(), run.finish(&b).unwrap())
    };
    assert_eq!(res, json!({"rows": 1, "batches": 1}));
    for bad in [
        json!({"batches": 0}),
        json!({"fail_kind": "sometimes"}),
        json!({"sleep": 5}),
        json!({"sleep_ms": -1}),
    ] {
        assert!(
            r.validate("noop", &bad).unwrap_err().is_permanent(),
            "{bad}"
        );
    }
}

#[test]
fn job_run_is_send() {
    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send::<JobRun>();
    assert_send_sync::<Registry>();
}

/// Manual probe for bounded memory and speed; run the test binary under `/usr/bin/time -v`:
///
/// ```text
/// DROVER_PROBE=generate DROVER_PROBE_ROWS=4000000 DROVER_PROBE_INPUT=/tmp/x/pay.parquet \
///   /usr/bin/time -v target/debug/deps/drover_pipeline-<hash> --ignored --exact \
///   tests::bounded_memory_probe --nocapture
/// ```
///
/// Modes: `generate` (write `DROVER_PROBE_ROWS` rows), `read` (a full payroll job in
/// batches of `DROVER_PROBE_BATCH`), `scan` (the source alone), `read-all` (the whole file
/// at once, for comparison).
#[test]
#[ignore]
fn bounded_memory_probe() {
    let (Ok(mode), Ok(input)) = (
        std::env::var("DROVER_PROBE"),
        std::env::var("DROVER_PROBE_INPUT"),
    ) else {
        return;
    };
    let input = PathBuf::from(input);
    let num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let started = std::time::Instant::now();
    match mode.as_str() {
        "generate" => {
            let rows = num("DROVER_PROBE_ROWS", 4_000_000);
            generate_payroll(rows, "acme", "2026-11", 42, &input).unwrap();
        }
        "read" => {
            let tmp = tempfile::tempdir().unwrap();
            let p = json!({"client_id": "acme", "period": "2026-11", "input": input});
            let batch = num("DROVER_PROBE_BATCH", 5_000) as usize;
            let (batches, result) = run_all(&spec("probe", p, batch, tmp.path()));
            eprintln!("{} batches, result {result}", batches.len());
        }
        "scan" => {
            // The source alone: read and cast every batch, no transform, no output.
            let batch = num("DROVER_PROBE_BATCH", 5_000) as usize;
            let p = PayrollParams {
                input: input.clone(),
                ..params()
            };
            let input_spec = payroll::Payroll
                .input(&p, &spec("probe", json!({}), batch, Path::new(".")))
                .unwrap();
            let mut src = crate::source::Source::open(&input_spec, batch, 0).unwrap();
            let mut rows = 0;
            while let Some((_, df)) = src.next_batch().unwrap() {
                rows += df.height();
            }
            eprintln!("{rows} rows scanned");
        }
        "read-all" => {
            // For comparison: the whole file in memory at once.
            let df = read_parquet(&input);
            eprintln!(
                "{} rows, {} bytes estimated",
                df.height(),
                df.estimated_size()
            );
        }
        other => panic!("unknown DROVER_PROBE={other}"),
    }
    eprintln!("{mode}: {:.2}s", started.elapsed().as_secs_f64());
}

#[test]
fn csv_with_bom_crlf_quotes_and_blank_lines_reads_like_plain_csv() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain.csv");
    let fancy = tmp.path().join("fancy.csv");
    let lines: Vec<String> = (1..=7).map(good_line).collect();
    std::fs::write(&plain, format!("{HEADER}\n{}\n", lines.join("\n"))).unwrap();
    // BOM, CRLF, quoted values, an ignored extra column whose quoted value holds a newline,
    // a comma and escaped quotes, blank lines, and no newline at the end.
    let mut text = format!("\u{feff}{HEADER},note\r\n");
    for (i, l) in lines.iter().enumerate() {
        let l = l.replace(",acme,", ",\"acme\",");
        text.push_str(&format!("{l},\"two\r\nlines, \"\"quoted\"\"\"\r\n"));
        if i == 2 {
            text.push_str("\r\n\n");
        }
    }
    text.truncate(text.len() - 2);
    std::fs::write(&fancy, text).unwrap();
    let p = |f: &Path| json!({"client_id": "acme", "period": "2026-11", "input": f});
    let (a, ra) = run_all(&spec("plain", p(&plain), 3, tmp.path()));
    let mut run = Registry::builtin()
        .open(&spec("fancy", p(&fancy), 3, tmp.path()), 0)
        .unwrap();
    assert_eq!(run.batches_total(), Some(3));
    let mut b = Vec::new();
    while let Some(x) = run.next_batch().unwrap() {
        b.push(x);
    }
    let rb = run.finish(&b).unwrap();
    assert_eq!(ra, rb);
    assert_eq!(ra["rows"], json!(7));
    let rows = |v: &[BatchOutcome]| v.iter().map(|b| b.rows).collect::<Vec<_>>();
    assert_eq!(rows(&a), [3, 3, 1]);
    assert_eq!(rows(&a), rows(&b));
    let (x, y) = (
        read_parts(&job_dir(tmp.path(), "plain")),
        read_parts(&job_dir(tmp.path(), "fancy")),
    );
    assert!(x.equals(&y));
}

/// What a worker sizes `--memory-limit` estimates from: nothing before the first batch,
/// then the batch's input and output frames per row (payroll's are narrow: tens to hundreds
/// of bytes), the same for batches twice the size.
#[test]
fn a_run_measures_its_frames_bytes_per_row() {
    let tmp = tempfile::tempdir().unwrap();
    let pq = tmp.path().join("in.parquet");
    generate_payroll(4_000, "acme", "2026-11", 7, &pq).unwrap();
    let p = json!({"client_id": "acme", "period": "2026-11", "input": pq});
    let per_row = |key: &str, batch: usize| {
        let mut run = Registry::builtin()
            .open(&spec(key, p.clone(), batch, tmp.path()), 0)
            .unwrap();
        assert_eq!(run.bytes_per_row(), None, "nothing measured before a batch");
        while run.next_batch().unwrap().is_some() {}
        run.bytes_per_row().expect("measured")
    };
    let small = per_row("m-1", 1_000);
    assert!((16..4_096).contains(&small), "{small} bytes per row");
    let large = per_row("m-2", 2_000);
    assert!(
        large.abs_diff(small) * 4 <= small,
        "bytes per row should not depend on the batch size: {small} vs {large}"
    );
}
