"""drover.exec.serve, the child side of exec protocol v1, driven like drover drives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc
import pytest

CHILD = """
import sys
import drover, drover.exec

def fn(frame, ctx):
    print("batch", ctx.batch_index, "of", ctx.key)  # must not corrupt stdout
    if ctx.params.get("mode") == "transient":
        raise drover.Transient("the rate service is busy")
    if ctx.params.get("mode") == "fail":
        raise ValueError("column amount: negative value -5")
    if ctx.params.get("kind") == "polars":
        import polars as pl
        return frame.with_columns(pl.col("amount") * 2, pl.lit(ctx.batch_index).alias("batch"))
    frame["amount"] = frame["amount"] * 2
    frame["batch"] = ctx.batch_index
    return frame

drover.exec.serve(fn, frame=sys.argv[1])
"""


def stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pyarrow.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def run_child(
    tmp_path: Path, kind: str, params: dict[str, str], batches: list[pa.Table]
) -> subprocess.CompletedProcess[bytes]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(
        os.environ,
        DROVER_PROTOCOL="1",
        DROVER_JOB_KEY="job-1",
        DROVER_ATTEMPT="1",
        DROVER_PARAMS=json.dumps({"kind": kind, **params}),
    )
    return subprocess.run(
        [sys.executable, str(script), kind],
        input=b"".join(stream(t) for t in batches),
        capture_output=True,
        env=env,
        timeout=60,
    )


def read_streams(data: bytes) -> list[pa.Table]:
    src = pa.BufferReader(data)
    out = []
    while src.tell() < len(data):
        out.append(pyarrow.ipc.open_stream(src).read_all())
    return out


@pytest.mark.parametrize("kind", ["pandas", "polars"])
def test_one_stream_per_batch(tmp_path: Path, kind: str) -> None:
    batches = [
        pa.table({"amount": [1, 2, 3]}),
        pa.table({"amount": [10]}),
        pa.table({"amount": pa.array([], pa.int64())}),
    ]
    done = run_child(tmp_path, kind, {}, batches)
    assert done.returncode == 0, done.stderr.decode()
    out = read_streams(done.stdout)
    assert [t.column("amount").to_pylist() for t in out] == [[2, 4, 6], [20], []]
    assert [t.column("batch").to_pylist() for t in out] == [[0, 0, 0], [1], []]
    assert b"batch 0 of job-1" in done.stderr


def test_transient_exits_75_with_the_message_last(tmp_path: Path) -> None:
    done = run_child(tmp_path, "pandas", {"mode": "transient"}, [pa.table({"amount": [1]})])
    assert done.returncode == 75
    assert done.stderr.decode().strip().splitlines()[-1] == "the rate service is busy"
    assert done.stdout == b""


def test_other_errors_exit_1_with_the_message_last(tmp_path: Path) -> None:
    done = run_child(tmp_path, "pandas", {"mode": "fail"}, [pa.table({"amount": [1]})])
    assert done.returncode == 1
    last = done.stderr.decode().strip().splitlines()[-1]
    assert last == "ValueError: column amount: negative value -5"


def test_without_the_protocol_env_it_refuses(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DROVER_")}
    done = subprocess.run(
        [sys.executable, str(script), "pandas"], input=b"", capture_output=True, env=env, timeout=60
    )
    assert done.returncode == 1
    assert "DROVER_PROTOCOL" in done.stderr.decode().splitlines()[-1]
