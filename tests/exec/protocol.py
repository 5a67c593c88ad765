"""The child side of drover's `exec` protocol v1, in a few lines of pyarrow, shared by the
test children in this directory (`drover.exec.serve` in clients/python is the real one).

Per batch drover writes one Arrow IPC stream to stdin; the child answers with one stream on
stdout before the next batch comes. End of stdin at a stream boundary means no more batches:
the child exits 0.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from typing import cast

import pyarrow as pa

Transform = Callable[[pa.Table, int], pa.Table]


def stdio() -> tuple[io.BufferedReader, io.BufferedWriter]:
    """The binary stdin and stdout (buffered, so stdin can be peeked at)."""
    return cast(io.BufferedReader, sys.stdin.buffer), cast(
        io.BufferedWriter, sys.stdout.buffer
    )


def read_batch(stdin: io.BufferedReader) -> pa.Table | None:
    """The next input stream, or None when drover closed stdin (no more batches)."""
    if not stdin.peek(1):
        return None
    return pa.ipc.open_stream(stdin).read_all()


def write_answer(stdout: io.BufferedWriter, table: pa.Table) -> None:
    """One complete stream (schema, batches, end-of-stream marker), flushed."""
    with pa.ipc.new_stream(stdout, table.schema) as writer:
        writer.write_table(table)
    stdout.flush()


def serve(fn: Transform) -> None:
    """Answers every batch with `fn(table, index)` until stdin ends, then returns."""
    stdin, stdout = stdio()
    index = 0
    while (table := read_batch(stdin)) is not None:
        write_answer(stdout, fn(table, index))
        index += 1


def env_int(name: str, default: int) -> int:
    """An integer from the environment (the job's `env` param), else `default`."""
    value = os.environ.get(name)
    return default if value is None else int(value)
