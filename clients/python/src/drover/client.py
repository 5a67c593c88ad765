"""The producer API: publish (ledger first, then the broker with confirms), enqueue inside
the caller's own psycopg transaction, read a job, wait for jobs.

The ledger decides what an idempotency key means, with the same SQL functions the Rust
client and ``drover publish`` use (``drover.record_jobs``, ``drover.enqueue``): the same
request again is a harmless ``exists``; a different request under a used key raises
:class:`~drover.errors.Conflict`, and nothing new runs.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ._amqp import ConfirmPublisher
from .errors import Conflict, DroverError, InvalidJob, WaitTimeout
from .schema import validate_message

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/drover"
DEFAULT_NAMESPACE = "drover"
#: Jobs recorded per statement and published per confirm round.
CHUNK = 1000
#: States after which nothing more happens to a job.
TERMINAL_STATES = frozenset({"succeeded", "dead", "cancelled", "rejected"})
_CONFLICT_CONSTRAINT = "drover_idempotency_conflict"


@dataclass(frozen=True)
class Job:
    """One job to publish: the fields of a contract-v1 message."""

    key: str
    pipeline: str
    params: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    max_attempts: int | None = None
    #: The job starts no earlier than this (a timezone-aware datetime).
    run_at: datetime | None = None
    #: Longest one attempt may run, in seconds.
    timeout_secs: int | None = None

    def message(self) -> dict[str, Any]:
        """The contract-v1 message body as a dict (optional fields only when set)."""
        msg: dict[str, Any] = {
            "v": 1,
            "idempotency_key": self.key,
            "pipeline": self.pipeline,
            "params": dict(self.params) if isinstance(self.params, Mapping) else self.params,
        }
        if self.batch_size is not None:
            msg["batch_size"] = self.batch_size
        if self.max_attempts is not None:
            msg["max_attempts"] = self.max_attempts
        if self.run_at is not None:
            msg["run_at"] = self.run_at.isoformat()
        if self.timeout_secs is not None:
            msg["timeout_secs"] = self.timeout_secs
        return msg


@dataclass(frozen=True)
class Outcome:
    """What publishing one job did.

    ``status``: ``published`` (new), ``republished`` (recorded earlier but never confirmed
    by the broker, published now), ``exists`` (the same request was recorded before; nothing
    published) or ``conflict`` (a different request holds the key; nothing published,
    ``differs`` says what differs).
    """

    key: str
    id: uuid.UUID
    status: Literal["published", "republished", "exists", "conflict"]
    state: str
    differs: str | None = None

    def conflict_message(self) -> str:
        """The conflict as one line, like ``drover publish`` prints it."""
        return (
            f"{self.key}: already exists ({self.state}) with different {self.differs}; "
            "nothing published"
        )


@dataclass(frozen=True)
class JobInfo:
    """A job's row in the ledger, as ``drover jobs show --json`` shows it."""

    key: str
    id: uuid.UUID
    pipeline: str
    params: dict[str, Any]
    state: str
    attempts: int
    max_attempts: int
    batch_size: int | None
    batches_done: int
    batches_total: int | None
    rows_done: int
    result: Any
    last_error: str | None
    error_kind: str | None
    run_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def terminal(self) -> bool:
        """Whether nothing more will happen to the job."""
        return self.state in TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        """Whether the job ended ``succeeded``."""
        return self.state == "succeeded"


_JOB_COLUMNS = (
    "idempotency_key AS key, id, pipeline, params, state, attempts, max_attempts, batch_size, "
    "batches_done, batches_total, rows_done, result, last_error, error_kind, run_at, "
    "created_at, started_at, finished_at"
)


def _job_from(params: Mapping[str, Any] | None, key: str) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise InvalidJob(key, "params", f"expected a JSON object, got {type(params).__name__}")
    return dict(params)


class Client:
    """A producer's connections to the ledger (Postgres) and the broker (RabbitMQ).

    Arguments default to ``DROVER_AMQP_URL``, ``DATABASE_URL`` and ``DROVER_NAMESPACE``,
    then to the local defaults ``drover`` uses. ``pipelines``, when given, is the set of
    pipeline names the workers run: others are refused at once instead of ending
    ``rejected`` in the worker. Not thread-safe: one client per thread. Use it as a context
    manager, or call :meth:`close`.
    """

    def __init__(
        self,
        amqp_url: str | None = None,
        database_url: str | None = None,
        namespace: str | None = None,
        pipelines: Iterable[str] | None = None,
    ) -> None:
        self.amqp_url = amqp_url or os.environ.get("DROVER_AMQP_URL") or DEFAULT_AMQP_URL
        self.database_url = database_url or os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
        self.namespace = namespace or os.environ.get("DROVER_NAMESPACE") or DEFAULT_NAMESPACE
        self.pipelines = frozenset(pipelines) if pipelines is not None else None
        self._db = psycopg.connect(self.database_url, autocommit=True)
        self._publisher: ConfirmPublisher | None = None

    # -- connections ---------------------------------------------------------------------

    def close(self) -> None:
        """Closes the broker channel and connection cleanly, then the database connection."""
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        self._db.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- publishing ----------------------------------------------------------------------

    def _check(self, job: Job) -> bytes:
        if not isinstance(job.key, str):
            raise InvalidJob(None, "idempotency_key", f"expected a string, got {job.key!r}")
        body = validate_message(job.message())
        if self.pipelines is not None and job.pipeline not in self.pipelines:
            known = ", ".join(sorted(self.pipelines))
            raise InvalidJob(
                job.key, "pipeline", f"{json.dumps(job.pipeline)} is not one of: {known}"
            )
        return body

    def publish(
        self,
        key: str,
        pipeline: str,
        params: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        max_attempts: int | None = None,
        run_at: datetime | None = None,
        timeout_secs: int | None = None,
    ) -> Outcome:
        """Publishes one job: recorded in the ledger first, then sent to the broker and
        confirmed. Raises :class:`InvalidJob` before writing anything when the job is
        invalid, and :class:`Conflict` when the key exists for a different request."""
        job = Job(
            key, pipeline, _job_from(params, key), batch_size, max_attempts, run_at, timeout_secs
        )
        return self.publish_many([job])[0]

    def publish_many(self, jobs: Iterable[Job | Mapping[str, Any]]) -> list[Outcome]:
        """Publishes many jobs, :data:`CHUNK` per round: one ledger statement, pipelined
        broker publishes, one wait for their confirms.

        Every job is validated first; one invalid job means nothing is written. Jobs whose
        key exists for a different request are not published, the others are, and then
        :class:`Conflict` is raised with every outcome. A job may also be a mapping with the
        message's fields (``idempotency_key`` or ``key``, ``pipeline``, ``params``, ...).
        If the broker fails, the jobs recorded but not confirmed are published later by the
        workers' relay, or by publishing them again.
        """
        batch = [j if isinstance(j, Job) else _job_of_mapping(j) for j in jobs]
        bodies = [self._check(j) for j in batch]
        seen: set[str] = set()
        for j in batch:
            if j.key in seen:
                raise InvalidJob(j.key, "idempotency_key", "appears more than once in one call")
            seen.add(j.key)
        outcomes: list[Outcome] = []
        for start in range(0, len(batch), CHUNK):
            chunk = batch[start : start + CHUNK]
            outcomes.extend(self._publish_chunk(chunk, bodies[start : start + CHUNK]))
        conflicts = [o.conflict_message() for o in outcomes if o.status == "conflict"]
        if conflicts:
            raise Conflict(conflicts, outcomes)
        return outcomes

    def _publish_chunk(self, chunk: Sequence[Job], bodies: Sequence[bytes]) -> list[Outcome]:
        ids = [uuid.uuid4() for _ in chunk]
        rows = self._db.execute(
            "SELECT idempotency_key, inserted, id, state, enqueued, differs "
            "FROM drover.record_jobs(%s, %s, %s, %s::jsonb[], %s, %s, %s, %s)",
            (
                ids,
                [j.key for j in chunk],
                [j.pipeline for j in chunk],
                [Jsonb(dict(j.params)) for j in chunk],
                [j.batch_size for j in chunk],
                [j.max_attempts for j in chunk],
                [j.max_attempts is not None for j in chunk],
                [None for _ in chunk],
            ),
        ).fetchall()
        outcomes: list[Outcome] = []
        to_send: list[tuple[uuid.UUID, bytes]] = []
        for (key, inserted, job_id, state, enqueued, differs), body in zip(
            rows, bodies, strict=True
        ):
            if inserted:
                outcomes.append(Outcome(key, job_id, "published", state))
                to_send.append((job_id, body))
            elif differs is not None:
                outcomes.append(Outcome(key, job_id, "conflict", state, differs))
            elif state == "queued" and not enqueued:
                outcomes.append(Outcome(key, job_id, "republished", state))
                to_send.append((job_id, body))
            else:
                outcomes.append(Outcome(key, job_id, "exists", state))
        if to_send:
            self._send(to_send)
            self._db.execute("SELECT drover.mark_published(%s)", ([i for i, _ in to_send],))
        return outcomes

    def _send(self, messages: Sequence[tuple[uuid.UUID, bytes]]) -> None:
        if self._publisher is None or not self._publisher.is_open:
            self._publisher = _connect_any(self.amqp_url)
        try:
            self._publisher.publish(
                f"{self.namespace}.jobs",
                [(str(job_id), body) for job_id, body in messages],
                int(time.time()),
            )
        except DroverError as e:
            raise DroverError(
                f"{e}; the jobs are recorded in the ledger and the workers' relay publishes "
                "them (or publish them again)"
            ) from e

    # -- enqueue in the caller's transaction ---------------------------------------------

    def enqueue(
        self,
        conn: psycopg.Connection[Any],
        key: str,
        pipeline: str,
        params: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        max_attempts: int | None = None,
        run_at: datetime | None = None,
    ) -> bool:
        """Enqueues a job in ``conn``'s current transaction (``drover.enqueue``): it exists,
        and a worker publishes it within a second, only if that transaction commits.

        Returns True when the key is new, False when the same request was enqueued or
        published before. Raises :class:`InvalidJob` (nothing written) for bad input,
        :class:`Conflict` when the key exists for a different request. A SQL error aborts
        the caller's transaction, as any would.
        """
        return enqueue(
            conn, key, pipeline, params, batch_size, max_attempts, run_at, self.pipelines
        )

    # -- reading -------------------------------------------------------------------------

    def job(self, key: str) -> JobInfo | None:
        """The job stored under ``key``, or None."""
        with self._db.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                f"SELECT {_JOB_COLUMNS} FROM drover.jobs WHERE idempotency_key = %s", (key,)
            ).fetchone()
        return JobInfo(**row) if row else None

    def wait(self, keys: Sequence[str] | str, timeout: float = 600.0) -> list[JobInfo]:
        """Blocks until every job is terminal; returns them in the order of ``keys`` (check
        ``succeeded`` on each). Wakes on the ledger's change notifications (LISTEN
        ``drover_jobs``), polling every second as a fallback. A key not in the ledger yet is
        waited for too. Raises :class:`WaitTimeout` after ``timeout`` seconds."""
        wanted = [keys] if isinstance(keys, str) else list(keys)
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.database_url, autocommit=True) as listen:
            listen.execute("LISTEN drover_jobs")
            while True:
                with self._db.cursor(row_factory=dict_row) as cur:
                    rows = cur.execute(
                        f"SELECT {_JOB_COLUMNS} FROM drover.jobs WHERE idempotency_key = ANY(%s)",
                        (wanted,),
                    ).fetchall()
                by_key = {r["key"]: JobInfo(**r) for r in rows}
                if all(k in by_key and by_key[k].terminal for k in wanted):
                    return [by_key[k] for k in wanted]
                left = deadline - time.monotonic()
                if left <= 0:
                    pending = [
                        f"{k} ({by_key[k].state if k in by_key else 'not in the ledger'})"
                        for k in wanted
                        if not (k in by_key and by_key[k].terminal)
                    ]
                    raise WaitTimeout(timeout, pending)
                for _ in listen.notifies(timeout=min(left, 1.0), stop_after=1):
                    pass


def _job_of_mapping(m: Mapping[str, Any]) -> Job:
    key: Any = m.get("idempotency_key", m.get("key"))
    pipeline: Any = m.get("pipeline")
    unknown = set(m) - {
        "v",
        "idempotency_key",
        "key",
        "pipeline",
        "params",
        "batch_size",
        "max_attempts",
        "run_at",
        "timeout_secs",
    }
    if unknown:
        raise InvalidJob(
            key if isinstance(key, str) else None, sorted(unknown)[0], "not part of contract v1"
        )
    # Wrong types are reported by the schema check, naming the field.
    return Job(
        key,
        pipeline,
        m.get("params") or {},
        m.get("batch_size"),
        m.get("max_attempts"),
        m.get("run_at"),
        m.get("timeout_secs"),
    )


def enqueue(
    conn: psycopg.Connection[Any],
    key: str,
    pipeline: str,
    params: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    max_attempts: int | None = None,
    run_at: datetime | None = None,
    pipelines: frozenset[str] | None = None,
) -> bool:
    """:meth:`Client.enqueue` without a client (no broker connection needed): validates
    the job like a publish, then calls ``drover.enqueue`` on ``conn``."""
    if conn.closed:
        raise InvalidJob(key, "conn", "the psycopg connection is closed")
    job = Job(key, pipeline, _job_from(params, key), batch_size, max_attempts)
    validate_message(job.message())
    if pipelines is not None and pipeline not in pipelines:
        raise InvalidJob(
            key, "pipeline", f"{json.dumps(pipeline)} is not one of: {', '.join(sorted(pipelines))}"
        )
    try:
        row = conn.execute(
            "SELECT drover.enqueue(%s, %s, %s, %s, %s, %s)",
            (key, pipeline, Jsonb(dict(job.params)), batch_size, max_attempts, run_at),
        ).fetchone()
    except pg_errors.UniqueViolation as e:
        if e.diag.constraint_name == _CONFLICT_CONSTRAINT:
            raise Conflict([str(e.diag.message_primary)]) from e
        raise
    except pg_errors.InvalidParameterValue as e:
        column = e.diag.column_name or "?"
        message = str(e.diag.message_primary)
        reason = message.split('": ', 1)[1] if message.startswith('field "') else message
        raise InvalidJob(key, column, reason) from e
    if row is None:
        raise DroverError(f"{key}: drover.enqueue returned no row")
    return bool(row[0])


def _connect_any(amqp_url: str) -> ConfirmPublisher:
    """Connects to the first node of ``amqp_url`` that answers: one URL, or a RabbitMQ
    cluster's nodes separated by commas, as the worker takes them (a comma in a password is
    written ``%2C``). When none answers, the error names every node's reason."""
    reasons: list[str] = []
    for url in (u.strip() for u in amqp_url.split(",")):
        try:
            return ConfirmPublisher(url, _redact(url))
        except DroverError as e:
            reasons.append(str(e))
    raise DroverError("; ".join(reasons))


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else url
