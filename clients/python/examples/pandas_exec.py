"""A pandas function run by drover as an ``exec`` pipeline, batch by batch.

drover starts this script once per attempt and hands it each batch of the input as a pandas
DataFrame; what it returns becomes the batch's Parquet part. Memory stays bounded by the
batch size however large the input, and drover checkpoints, retries and resumes it like any
pipeline. Publish it with::

    drover publish --pipeline exec --key gross:2026-11 --batch-size 50000 \\
        --param 'command=["python3", "clients/python/examples/pandas_exec.py"]' \\
        --param input=data/acme-2026-11.parquet

The input is payroll input as ``drover demo generate`` writes it.
"""

from __future__ import annotations

import pandas as pd

import drover
import drover.exec


def monthly_gross(frame: pd.DataFrame, ctx: drover.exec.Context) -> pd.DataFrame:
    """Each employee's gross pay for the month, in cents (integers: no float rounding)."""
    if frame.empty:
        return pd.DataFrame({"employee_id": [], "gross_cents": []}, dtype="int64")
    salaried = frame["pay_type"] == "salaried"
    hourly = (
        frame["hourly_rate_cents"] * frame["regular_hours_x100"]
        + frame["hourly_rate_cents"] * frame["overtime_hours_x100"] * 3 // 2
    ) // 100
    gross = hourly.where(~salaried, frame["annual_salary_cents"] // 12) + frame["bonus_cents"]
    if (gross < 0).any():
        # A permanent error: the message is the job's last_error, naming the batch.
        raise ValueError(f"batch {ctx.batch_index}: negative gross pay")
    return pd.DataFrame({"employee_id": frame["employee_id"], "gross_cents": gross})


if __name__ == "__main__":
    drover.exec.serve(monthly_gross)
