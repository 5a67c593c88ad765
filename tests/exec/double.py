"""Doubles every integer column of each batch (other columns pass through unchanged).

Optional environment (the job's `env` param): DELAY_MS sleeps that long per batch, PID_FILE
receives the child's pid at start (so tests can watch the process). Writes one stderr line
per batch, which drover logs with the job's key.
"""

from __future__ import annotations

import os
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
from protocol import env_int, serve


def double(table: pa.Table, index: int) -> pa.Table:
    delay_ms = env_int("DELAY_MS", 0)
    if delay_ms:
        time.sleep(delay_ms / 1000)
    columns = [
        pc.multiply(col, 2) if pa.types.is_integer(col.type) else col
        for col in table.columns
    ]
    print(f"batch {index}: {table.num_rows} rows", file=sys.stderr, flush=True)
    return pa.Table.from_arrays(columns, names=table.column_names)


def main() -> None:
    pid_file = os.environ.get("PID_FILE")
    if pid_file:
        with open(pid_file + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
    serve(double)


if __name__ == "__main__":
    main()
