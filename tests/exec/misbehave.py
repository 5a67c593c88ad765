"""Breaks protocol v1 in the way MODE (environment) says, at batch AT (default 0); answers
earlier batches correctly.

MODE: garbage (text instead of a stream), die (half a stream, then exit 3), hang (never
answers), early_exit (exit 0 without answering), extra (two streams for one batch),
exit (exit code CODE, default 1, after the stderr line "bad row: CODE"), stderr_flood
(1 MiB of stderr before answering, to prove drover drains it), env (answers one row with
the protocol environment drover set, and the names of other DROVER_* / DATABASE_URL*
variables it inherited, which should be none), stubborn (ignores SIGTERM, answers every
batch, then keeps running after stdin ends: only SIGKILL stops it).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pyarrow as pa
from protocol import env_int, serve, stdio, write_answer


def misbehave(table: pa.Table, index: int) -> pa.Table:
    mode = os.environ.get("MODE", "")
    out = stdio()[1]
    if index != env_int("AT", 0):
        return table
    if mode == "garbage":
        out.write(b"hello from a print() that should have gone to stderr\n" * 20)
        out.flush()
        time.sleep(3600)
    if mode == "die":
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        data = sink.getvalue().to_pybytes()
        out.write(data[: len(data) // 2])
        out.flush()
        print("segment lost", file=sys.stderr, flush=True)
        os._exit(3)
    if mode == "hang":
        time.sleep(3600)
    if mode == "early_exit":
        sys.exit(0)
    if mode == "extra":
        write_answer(out, table)
        return table
    if mode == "exit":
        code = env_int("CODE", 1)
        print("checking rows", file=sys.stderr)
        print(f"bad row: {code}", file=sys.stderr, flush=True)
        sys.exit(code)
    if mode == "stderr_flood":
        line = "x" * 1023 + "\n"
        for _ in range(1024):
            sys.stderr.write(line)
        sys.stderr.flush()
        return table
    if mode == "env":
        names = ["DROVER_PROTOCOL", "DROVER_JOB_KEY", "DROVER_ATTEMPT", "DROVER_PARAMS"]
        leaked = sorted(
            n
            for n in os.environ
            if n.startswith(("DROVER_", "DATABASE_URL")) and n not in names
        )
        return pa.table(
            {
                **{n.lower(): [os.environ.get(n, "")] for n in names},
                "inherited": [",".join(leaked)],
                "extra": [os.environ.get("EXTRA", "")],
            }
        )
    if mode == "stubborn":
        return table
    raise SystemExit(f"unknown MODE {mode!r}")


if __name__ == "__main__":
    if os.environ.get("MODE") == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(os.environ["PID_FILE"], "w") as f:
            f.write(str(os.getpid()))
    serve(misbehave)
    if os.environ.get("MODE") == "stubborn":
        time.sleep(3600)
