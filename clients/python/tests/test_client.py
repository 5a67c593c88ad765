"""The Python producer API against the real services and a real worker."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import psycopg
import pytest
from conftest import Env

import drover
from drover import Client, Conflict, InvalidJob, Job, WaitTimeout
from drover.schema import schema

REPO = Path(__file__).resolve().parents[3]


def test_packaged_schema_is_the_projects() -> None:
    packaged = schema()
    original = json.loads((REPO / "docs/job-message.schema.json").read_text())
    assert packaged == original


def test_publish_wait_and_read(env: Env) -> None:
    env.start_worker()
    with Client(amqp_url=env.amqp_url, database_url=env.database_url, namespace=env.namespace) as c:
        out = c.publish("py-1", "noop", {"batches": 3})
        assert out.status == "published"
        [job] = c.wait(["py-1"], timeout=60)
        assert job.succeeded, job
        assert job.result == {"rows": 3, "batches": 3}
        info = c.job("py-1")
        assert info is not None and info.batches_done == 3 and info.id == out.id
        assert c.job("absent") is None


def test_publish_fails_over_to_the_next_broker_address(env: Env) -> None:
    # A port nobody listens on first (a stopped node), then the real broker.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    dead = f"amqp://guest:n0t-shown@127.0.0.1:{dead_port}/%2f"
    env.start_worker()
    with Client(
        amqp_url=f"{dead},{env.amqp_url}",
        database_url=env.database_url,
        namespace=env.namespace,
    ) as c:
        assert c.publish("py-failover", "noop").status == "published"
        [job] = c.wait(["py-failover"], timeout=60)
        assert job.succeeded, job
    with Client(amqp_url=dead, database_url=env.database_url, namespace=env.namespace) as c:
        with pytest.raises(drover.DroverError) as e:
            c.publish("py-nobroker", "noop")
        assert f"127.0.0.1:{dead_port}" in str(e.value)
        assert "n0t-shown" not in str(e.value)


def test_same_request_exists_different_request_conflicts(env: Env) -> None:
    with Client(amqp_url=env.amqp_url, database_url=env.database_url, namespace=env.namespace) as c:
        env.start_worker()
        c.publish("acme:2026-11", "noop", {"batches": 1, "sleep_ms": 0})
        # The same params in another order are the same request.
        again = c.publish("acme:2026-11", "noop", {"sleep_ms": 0, "batches": 1})
        assert again.status == "exists"
        with pytest.raises(Conflict) as e:
            c.publish("acme:2026-11", "noop", {"batches": 2, "sleep_ms": 0})
        assert "acme:2026-11: already exists" in str(e.value)
        assert "params (batches: 1 vs 2)" in str(e.value)
        assert "nothing published" in str(e.value)
        with pytest.raises(Conflict, match=r"max_attempts \(not given vs 3\)"):
            c.publish("acme:2026-11", "noop", {"batches": 1, "sleep_ms": 0}, max_attempts=3)
        [job] = c.wait(["acme:2026-11"], timeout=60)
        assert job.succeeded and job.attempts == 1 and job.params == {"batches": 1, "sleep_ms": 0}


def test_publish_many_publishes_the_rest_and_reports_conflicts(env: Env) -> None:
    env.start_worker()
    with Client(amqp_url=env.amqp_url, database_url=env.database_url, namespace=env.namespace) as c:
        c.publish("k-0", "noop")
        jobs = [Job(f"k-{i}", "noop", {"batches": 1}) for i in range(300)]
        with pytest.raises(Conflict) as e:
            c.publish_many(jobs)
        assert len(e.value.conflicts) == 1 and e.value.conflicts[0].startswith("k-0:")
        statuses = [o.status for o in e.value.outcomes]
        assert statuses.count("published") == 299 and statuses[0] == "conflict"
        done = c.wait([j.key for j in jobs], timeout=120)
        assert all(j.succeeded for j in done)


@pytest.mark.parametrize(
    ("job", "field"),
    [
        (Job("", "noop"), "idempotency_key"),
        (Job("x" * 257, "noop"), "idempotency_key"),
        (Job("é" * 200, "noop"), "idempotency_key"),
        (Job("k", "no such pipeline"), "pipeline"),
        (Job("k", "noop", batch_size=0), "batch_size"),
        (Job("k", "noop", max_attempts=101), "max_attempts"),
        (Job("k", "noop", params={"blob": "x" * (1024 * 1024)}), "params"),
        ({"key": "k", "pipeline": "noop", "params": [1]}, "params"),
        ({"key": 5, "pipeline": "noop"}, "idempotency_key"),
        ({"key": "k", "pipeline": "noop", "priority": 1}, "priority"),
    ],
)
def test_invalid_jobs_name_the_field_and_write_nothing(
    env: Env, job: Job | dict[str, object], field: str
) -> None:
    with Client(amqp_url=env.amqp_url, database_url=env.database_url, namespace=env.namespace) as c:
        with pytest.raises(InvalidJob) as e:
            c.publish_many([job])
        assert e.value.field == field
        assert f'field "{field}"' in str(e.value)
        assert len(str(e.value)) < 400, "huge values are cut in messages"
    with env.connect() as conn:
        assert conn.execute("SELECT count(*) FROM drover.jobs").fetchone() == (0,)


def test_unknown_pipeline_refused_when_the_client_knows_the_pipelines(env: Env) -> None:
    with (
        Client(
            amqp_url=env.amqp_url,
            database_url=env.database_url,
            namespace=env.namespace,
            pipelines=["noop", "payroll"],
        ) as c,
        pytest.raises(InvalidJob, match='field "pipeline": "nope" is not one of'),
    ):
        c.publish("k", "nope")


def test_enqueue_commit_is_published_within_a_second(env: Env) -> None:
    env.start_worker()
    with env.connect() as conn:
        with conn.transaction():
            conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
            conn.execute("INSERT INTO orders VALUES (1)")
            assert drover.enqueue(conn, "invoice:1", "noop", {"batches": 1}) is True
        committed = time.monotonic()
        with Client(
            amqp_url=env.amqp_url, database_url=env.database_url, namespace=env.namespace
        ) as c:
            [job] = c.wait(["invoice:1"], timeout=30)
            assert job.succeeded
            assert job.started_at is not None
            started = time.monotonic()
        assert started - committed < 5.0
        # Published within a second of the commit (the ledger's own clock).
        row = conn.execute(
            "SELECT extract(epoch FROM started_at - created_at)::float8 FROM drover.jobs "
            "WHERE idempotency_key = 'invoice:1'"
        ).fetchone()
        assert row is not None and isinstance(row[0], float) and row[0] < 1.0, row


def test_enqueue_rolled_back_is_never_published(env: Env) -> None:
    env.start_worker()
    with env.connect() as conn:
        with pytest.raises(RuntimeError), conn.transaction():
            assert drover.enqueue(conn, "gone", "noop") is True
            raise RuntimeError("the handler failed")
        # A committed job enqueued after it runs; by then the relay has swept twice.
        with conn.transaction():
            drover.enqueue(conn, "after", "noop")
    with Client(amqp_url=env.amqp_url, database_url=env.database_url, namespace=env.namespace) as c:
        [after] = c.wait(["after"], timeout=30)
        assert after.succeeded
        assert c.job("gone") is None
    assert env.queue_depth() == 0


def test_enqueue_with_no_worker_runs_when_one_starts(env: Env) -> None:
    with env.connect() as conn, conn.transaction():
        assert drover.enqueue(conn, "early", "noop") is True
        # The same request again is harmless, inside the same transaction too.
        assert drover.enqueue(conn, "early", "noop", {}) is False
    env.start_worker()
    with Client(amqp_url=env.amqp_url, database_url=env.database_url, namespace=env.namespace) as c:
        [job] = c.wait(["early"], timeout=30)
        assert job.succeeded


def test_enqueue_conflict_and_invalid_input(env: Env) -> None:
    with env.connect() as conn:
        with conn.transaction():
            drover.enqueue(conn, "acme:2026-11", "noop", {"period": "2026-11"})
        with pytest.raises(Conflict) as e, conn.transaction():
            drover.enqueue(conn, "acme:2026-11", "noop", {"period": "2026-12"})
        assert str(e.value) == (
            "acme:2026-11: already exists (queued) with different params "
            '(period: "2026-11" vs "2026-12"); nothing enqueued'
        )
        # Validated in Python first (the schema), naming the field.
        with pytest.raises(InvalidJob, match='field "batch_size"'):
            drover.enqueue(conn, "k", "noop", batch_size=0)
        # And in SQL for any other language.
        with pytest.raises(
            psycopg.errors.InvalidParameterValue, match='field "idempotency_key": must not be empty'
        ):
            conn.execute("SELECT drover.enqueue('  ', 'noop')")
    closed = psycopg.connect(env.database_url)
    closed.close()
    with pytest.raises(InvalidJob, match='field "conn": the psycopg connection is closed'):
        drover.enqueue(closed, "k", "noop")


def test_enqueue_unknown_pipeline_ends_rejected(env: Env) -> None:
    env.start_worker()
    with env.connect() as conn, conn.transaction():
        drover.enqueue(conn, "typo", "noope")
    with Client(amqp_url=env.amqp_url, database_url=env.database_url, namespace=env.namespace) as c:
        [job] = c.wait(["typo"], timeout=30)
        assert job.state == "rejected"
        assert job.last_error is not None and "noope" in job.last_error


def test_wait_times_out_naming_the_pending_jobs(env: Env) -> None:
    with Client(amqp_url=env.amqp_url, database_url=env.database_url, namespace=env.namespace) as c:
        with env.connect() as conn, conn.transaction():
            drover.enqueue(conn, "nobody-runs-me", "noop")
        with pytest.raises(WaitTimeout, match=r"nobody-runs-me \(queued\)"):
            c.wait(["nobody-runs-me"], timeout=0.5)
