#!/usr/bin/env python3
"""Payroll spec v1 (/work/shared/specs/payroll.md, mirrored in crates/drover-pipeline) done
"the pandas way": the comparison baseline of bench/run.sh.

Reads the Parquet input in batches of --batch-size rows with pyarrow
(ParquetFile.iter_batches -> to_pandas), computes the spec vectorised in int64 numpy/pandas
(np.where chains, no Python loop over rows, no floating point), validates like the pipeline
does, writes each batch's output to a Snappy Parquet part file (part-NNNNN.parquet) the way
drover does, calls gc.collect() between batches, and prints the job summary (rows and
total_<money column>) as JSON, in the same shape as `drover run payroll --json`.

usage: pandas_payroll.py --input FILE.parquet --output DIR --batch-size N
                         [--client-id acme --period 2026-11]
"""

import argparse
import gc
import json
import os
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

# Reference tables of spec v1.
FEDERAL = {
    "single": [(0, 1000), (1_192_500, 1200), (4_847_500, 2200), (10_335_000, 2400),
               (19_730_000, 3200), (25_052_500, 3500), (62_635_000, 3700)],
    "married": [(0, 1000), (2_385_000, 1200), (9_695_000, 2200), (20_670_000, 2400),
                (39_460_000, 3200), (50_105_000, 3500), (75_160_000, 3700)],
}
STANDARD_DEDUCTION = {"single": 1_500_000, "married": 3_000_000}
STATE_BP = {"CA": 725, "NY": 640, "TX": 0, "FL": 0, "WA": 0, "IL": 495, "PA": 307,
            "MA": 500, "CO": 440, "NC": 425}
PLAN_PREMIUM = {"NONE": 0, "BASIC": 8_500, "PLUS": 21_000, "FAMILY": 46_000}
RETIREMENT_LIMIT = 2_350_000
SS_WAGE_BASE = 17_610_000
ADDL_MEDICARE_THRESHOLD = 20_000_000

STRING_COLS = ["client_id", "period", "pay_type", "benefit_plan", "state", "filing_status"]
INT_COLS = ["employee_id", "annual_salary_cents", "hourly_rate_cents", "regular_hours_x100",
            "overtime_hours_x100", "bonus_cents", "retirement_bp", "ytd_gross_cents",
            "ytd_retirement_cents"]
REQUIRED = INT_COLS + STRING_COLS
MONEY = ["gross", "retirement", "benefits", "taxable", "federal_tax", "social_security",
         "medicare", "state_tax", "net"]
OUTPUT = ["employee_id", "client_id", "period"] + MONEY


class ValidationError(Exception):
    pass


def rhu(a, b):
    """Round-half-up integer division for a >= 0 and even b > 0 (floor == trunc here)."""
    return (a + b // 2) // b


def lookup(codes: np.ndarray, table: dict, column: str, ids: np.ndarray) -> np.ndarray:
    """Map string codes to int64 values with an np.where chain; unknown code -> error."""
    out = np.zeros(len(codes), dtype=np.int64)
    known = np.zeros(len(codes), dtype=bool)
    for code, value in table.items():
        hit = codes == code
        out = np.where(hit, value, out)
        known |= hit
    if not known.all():
        bad = np.flatnonzero(~known)[0]
        raise ValidationError(f"column {column}: unknown code {codes[bad]!r} "
                              f"(employee_id {ids[bad]})")
    return out


def validate(df: pd.DataFrame, client_id, period) -> None:
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValidationError(f"missing required column {missing[0]}")
    ids = df["employee_id"].to_numpy()
    for c in REQUIRED:
        nulls = df[c].isna().to_numpy()
        if nulls.any():
            raise ValidationError(f"column {c}: null (employee_id {ids[np.flatnonzero(nulls)[0]]})")
    for c in INT_COLS[1:]:
        neg = df[c].to_numpy() < 0
        if neg.any():
            raise ValidationError(f"column {c}: negative (employee_id {ids[np.flatnonzero(neg)[0]]})")
    bp = df["retirement_bp"].to_numpy()
    if (bp > 1500).any():
        raise ValidationError(f"column retirement_bp: above 1500 "
                              f"(employee_id {ids[np.flatnonzero(bp > 1500)[0]]})")
    for col, want in (("client_id", client_id), ("period", period)):
        if want is not None:
            wrong = df[col].to_numpy() != want
            if wrong.any():
                raise ValidationError(f"column {col}: not {want!r} "
                                      f"(employee_id {ids[np.flatnonzero(wrong)[0]]})")


def payroll(df: pd.DataFrame) -> pd.DataFrame:
    i64 = lambda c: df[c].to_numpy(dtype=np.int64)  # noqa: E731
    ids = i64("employee_id")
    pay_type = df["pay_type"].to_numpy(dtype=object)
    status = df["filing_status"].to_numpy(dtype=object)
    salaried = pay_type == "salaried"
    hourly = pay_type == "hourly"
    if not (salaried | hourly).all():
        bad = np.flatnonzero(~(salaried | hourly))[0]
        raise ValidationError(f"column pay_type: unknown code {pay_type[bad]!r} (employee_id {ids[bad]})")
    single = status == "single"
    married = status == "married"
    if not (single | married).all():
        bad = np.flatnonzero(~(single | married))[0]
        raise ValidationError(f"column filing_status: unknown code {status[bad]!r} (employee_id {ids[bad]})")
    premium = lookup(df["benefit_plan"].to_numpy(dtype=object), PLAN_PREMIUM, "benefit_plan", ids)
    state_bp = lookup(df["state"].to_numpy(dtype=object), STATE_BP, "state", ids)

    rate = i64("hourly_rate_cents")
    # 1-3
    regular = np.where(salaried, rhu(i64("annual_salary_cents"), 12),
                       rhu(rate * i64("regular_hours_x100"), 100))
    overtime = np.where(hourly, rhu(rate * i64("overtime_hours_x100") * 3, 200), 0)
    gross = regular + overtime + i64("bonus_cents")
    # 4-6
    retirement = np.minimum(rhu(gross * i64("retirement_bp"), 10_000),
                            np.maximum(0, RETIREMENT_LIMIT - i64("ytd_retirement_cents")))
    benefits = np.minimum(premium, gross - retirement)
    taxable = gross - retirement - benefits
    # 7-8
    deduction = np.where(single, STANDARD_DEDUCTION["single"], STANDARD_DEDUCTION["married"])
    annual_taxable = np.maximum(0, taxable * 12 - deduction)
    weighted = np.zeros(len(df), dtype=np.int64)
    for name, mask in (("single", single), ("married", married)):
        brackets = FEDERAL[name]
        acc = np.zeros(len(df), dtype=np.int64)
        for k, (lower, rate_bp) in enumerate(brackets):
            upper = brackets[k + 1][0] if k + 1 < len(brackets) else None
            top = annual_taxable if upper is None else np.minimum(annual_taxable, upper)
            acc += np.maximum(0, top - lower) * rate_bp
        weighted = np.where(mask, acc, weighted)
    federal_tax = rhu(rhu(weighted, 10_000), 12)
    # 9-10
    ytd_gross = i64("ytd_gross_cents")
    social_security = rhu(np.maximum(0, np.minimum(gross, SS_WAGE_BASE - ytd_gross)) * 620, 10_000)
    extra = (np.maximum(0, ytd_gross + gross - ADDL_MEDICARE_THRESHOLD)
             - np.maximum(0, ytd_gross - ADDL_MEDICARE_THRESHOLD))
    medicare = rhu(gross * 145, 10_000) + rhu(extra * 90, 10_000)
    # 11-12
    state_tax = rhu(taxable * state_bp, 10_000)
    net = gross - retirement - benefits - federal_tax - social_security - medicare - state_tax

    return pd.DataFrame({
        "employee_id": ids, "client_id": df["client_id"], "period": df["period"],
        "gross": gross, "retirement": retirement, "benefits": benefits, "taxable": taxable,
        "federal_tax": federal_tax, "social_security": social_security, "medicare": medicare,
        "state_tax": state_tax, "net": net,
    }, columns=OUTPUT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--client-id")
    ap.add_argument("--period")
    args = ap.parse_args()

    os.makedirs(args.output, exist_ok=True)
    totals = {m: 0 for m in MONEY}
    rows = 0
    pf = pq.ParquetFile(args.input)
    try:
        for index, batch in enumerate(pf.iter_batches(batch_size=args.batch_size)):
            df = batch.to_pandas()
            validate(df, args.client_id, args.period)
            out = payroll(df)
            pq.write_table(pa.Table.from_pandas(out, preserve_index=False),
                           os.path.join(args.output, f"part-{index:05d}.parquet"),
                           compression="snappy")
            rows += len(out)
            for m in MONEY:
                totals[m] += int(out[m].sum())
            del df, out, batch
            gc.collect()
    except ValidationError as e:
        print(f"validation error: {e}", file=sys.stderr)
        return 2
    summary = {"rows": rows}
    summary.update({f"total_{m}": totals[m] for m in sorted(MONEY)})
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
