"""Fails its first attempt with exit code 75 (EX_TEMPFAIL, transient) at batch FAIL_AT
(default 0), after a last stderr line drover reports as the error; later attempts behave
like double.py.
"""

from __future__ import annotations

import os
import sys

import pyarrow as pa
from double import double
from protocol import env_int, serve


def first_attempt_fails(table: pa.Table, index: int) -> pa.Table:
    if os.environ["DROVER_ATTEMPT"] == "1" and index == env_int("FAIL_AT", 0):
        print("warming up the rate cache", file=sys.stderr)
        print("rate service unavailable, try again later", file=sys.stderr, flush=True)
        sys.exit(75)
    return double(table, index)


if __name__ == "__main__":
    serve(first_attempt_fails)
