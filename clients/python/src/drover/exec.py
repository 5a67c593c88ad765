"""The child side of drover's ``exec`` pipeline, protocol v1.

drover starts the child once per attempt with ``DROVER_PROTOCOL=1``, ``DROVER_JOB_KEY``,
``DROVER_ATTEMPT`` and ``DROVER_PARAMS`` (the job's params as JSON). For each batch it writes
one complete Arrow IPC stream to the child's stdin; the child answers with one complete
Arrow IPC stream on stdout before the next batch comes. After the last batch drover closes
stdin and the child exits 0. Exit code 75 (EX_TEMPFAIL) fails the attempt as transient
(retried), anything else non-zero as permanent; the last stderr line is the error.

:func:`serve` does all of that around a function of one batch::

    import drover.exec

    def double(frame, ctx):
        frame["amount"] = frame["amount"] * 2
        return frame

    drover.exec.serve(double)              # pandas frames; frame="polars" for polars
"""

from __future__ import annotations

import io
import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal, NoReturn

import pyarrow as pa
import pyarrow.ipc

from .errors import Transient

#: The protocol version this module speaks.
PROTOCOL = "1"
#: Exit code for a transient failure (sysexits.h EX_TEMPFAIL).
EXIT_TRANSIENT = 75
#: Exit code for a permanent failure.
EXIT_PERMANENT = 1


@dataclass
class Context:
    """What a batch function knows about its job."""

    key: str
    attempt: int
    params: dict[str, Any]
    #: 0-based index of the batch within this attempt's run of the child.
    batch_index: int = 0
    #: Free for the function's own state between batches (e.g. loaded reference data).
    state: dict[str, Any] = field(default_factory=dict)


def _context_from_env() -> Context:
    protocol = os.environ.get("DROVER_PROTOCOL")
    if protocol != PROTOCOL:
        raise ValueError(
            f"DROVER_PROTOCOL: expected {PROTOCOL!r}, got {protocol!r} (run by drover's exec "
            "pipeline?)"
        )
    raw_params = os.environ.get("DROVER_PARAMS", "{}")
    try:
        params = json.loads(raw_params)
    except json.JSONDecodeError as e:
        raise ValueError(f"DROVER_PARAMS: not JSON ({e})") from e
    if not isinstance(params, dict):
        raise ValueError(f"DROVER_PARAMS: expected a JSON object, got {raw_params[:80]}")
    attempt = os.environ.get("DROVER_ATTEMPT", "1")
    if not attempt.isdigit():
        raise ValueError(f"DROVER_ATTEMPT: expected a positive integer, got {attempt!r}")
    return Context(
        key=os.environ.get("DROVER_JOB_KEY", ""),
        attempt=int(attempt),
        params=params,
    )


def _to_frame(table: pa.Table, kind: str) -> Any:
    if kind == "pandas":
        return table.to_pandas()
    if kind == "polars":
        import polars as pl

        return pl.from_arrow(table)
    return table


def _to_table(result: Any) -> pa.Table:
    if isinstance(result, pa.Table):
        return result
    if isinstance(result, pa.RecordBatch):
        return pa.Table.from_batches([result])
    module = type(result).__module__.split(".")[0]
    if module == "pandas":
        return pa.Table.from_pandas(result, preserve_index=False)
    if module == "polars":
        table: pa.Table = result.to_arrow()
        return table
    raise TypeError(
        f"the batch function returned {type(result).__name__}; expected a pandas or polars "
        "DataFrame or a pyarrow Table"
    )


def _fail(code: int, message: str) -> NoReturn:
    sys.stderr.flush()
    # drover reports the child's last stderr line as the error: keep it on one line.
    sys.stderr.write(" ".join(message.split()) + "\n")
    sys.stderr.flush()
    os._exit(code)


def serve(
    fn: Callable[[Any, Context], Any],
    frame: Literal["pandas", "polars", "arrow"] = "pandas",
    stdin: io.BufferedReader | None = None,
    stdout: io.BufferedIOBase | None = None,
) -> NoReturn:
    """Runs ``fn(frame, ctx)`` on every batch drover sends, then exits 0.

    ``fn`` gets a pandas DataFrame (``frame="polars"``: a polars DataFrame, ``"arrow"``: a
    pyarrow Table) and returns one of those (zero rows is fine). While it runs, ``print``
    goes to stderr (logged by drover with the job's key), so it cannot corrupt the stream.
    ``raise drover.Transient("...")`` exits 75 (retried); any other exception exits 1
    (permanent) with its message as the last stderr line.
    """
    src: Any = stdin or sys.stdin.buffer
    out: Any = stdout or sys.stdout.buffer
    # Anything the function prints must not land in the Arrow stream.
    sys.stdout = sys.stderr
    try:
        ctx = _context_from_env()
    except ValueError as e:
        _fail(EXIT_PERMANENT, str(e))
    while True:
        try:
            if not _has_more(src):
                break
            table = pyarrow.ipc.open_stream(src).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            _fail(EXIT_PERMANENT, f"reading batch {ctx.batch_index} from stdin: {e}")
        try:
            result = _to_table(fn(_to_frame(table, frame), ctx))
        except Transient as e:
            _fail(EXIT_TRANSIENT, f"{e}" or "transient failure")
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            _fail(EXIT_PERMANENT, f"{type(e).__name__}: {e}")
        try:
            with pyarrow.ipc.new_stream(out, result.schema) as writer:
                writer.write_table(result)
            out.flush()
        except (BrokenPipeError, OSError) as e:
            _fail(EXIT_PERMANENT, f"writing batch {ctx.batch_index} to stdout: {e}")
        ctx.batch_index += 1
    sys.stderr.flush()
    out.flush()
    sys.exit(0)


def _has_more(src: BinaryIO) -> bool:
    """Whether another stream follows (False at end of input, when drover closed stdin)."""
    peek = getattr(src, "peek", None)
    if peek is not None:
        return len(peek(1)) > 0
    raise TypeError("stdin must support peek() (a buffered binary stream)")
