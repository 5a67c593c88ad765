#!/usr/bin/env python3
"""The `exec` benchmark's child: payroll spec v1 in pandas (the functions of
bench/pandas_payroll.py), one batch at a time over exec protocol v1.

Each batch arrives on stdin as one Arrow IPC stream; it is converted to pandas, validated and
computed, and the payroll output goes back on stdout as one Arrow IPC stream. At the end of
stdin the child writes its own peak RSS (KiB, from getrusage) to $PEAK_FILE when set, so the
benchmark can report the child's memory apart from drover's.
"""

import gc
import os
import resource
import sys

import pyarrow as pa
from pandas_payroll import ValidationError, payroll, validate


def main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    client_id = os.environ.get("CLIENT_ID")
    period = os.environ.get("PERIOD")
    index = 0
    while stdin.peek(1):
        df = pa.ipc.open_stream(stdin).read_all().to_pandas()
        try:
            validate(df, client_id, period)
        except ValidationError as e:
            print(f"batch {index}: validation error: {e}", file=sys.stderr)
            return 1
        out = pa.Table.from_pandas(payroll(df), preserve_index=False)
        with pa.ipc.new_stream(stdout, out.schema) as w:
            w.write_table(out)
        stdout.flush()
        del df, out
        gc.collect()
        index += 1
    peak = os.environ.get("PEAK_FILE")
    if peak:
        with open(peak, "w") as f:
            f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
