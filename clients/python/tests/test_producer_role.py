"""The client under the least-privilege producer role (docs/security.md): a login in the
role ``drover migrate --roles`` creates publishes with :meth:`Client.publish` and enqueues in
its own psycopg transaction, reads only the jobs it submitted and nothing else of the
ledger, and cannot change a job's state."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from conftest import Env
from psycopg import sql

from drover import Client, enqueue


def _with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


@pytest.fixture
def producer_url(env: Env) -> Iterator[str]:
    """The URL of a login in a producer group role of this test's own (unique names, as
    role names are cluster-wide), created with ``drover migrate --roles``; both are dropped
    afterwards."""
    suffix = uuid.uuid4().hex[:10]
    groups = {part: f"py_{suffix}_{part}" for part in ("worker", "producer", "dashboard")}
    login = f"py_{suffix}_login"
    password = f"PyPw-{suffix}"
    out = env.drover(
        "migrate",
        "--roles",
        "--worker-role",
        groups["worker"],
        "--producer-role",
        groups["producer"],
        "--dashboard-role",
        groups["dashboard"],
    )
    assert out.returncode == 0, out.stderr
    roles = [login, *groups.values()]
    with psycopg.connect(env.database_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(login), sql.Literal(password), sql.Identifier(groups["producer"])
            )
        )
    try:
        yield _with_user(env.database_url, login, password)
    finally:
        # The grants and the row-level security policy live in the test's database: drop
        # them there, then the (cluster-wide) roles.
        with psycopg.connect(env.database_url, autocommit=True) as admin:
            for r in roles:
                admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(r)))
            for r in roles:
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(r)))


def test_publish_and_enqueue_as_the_producer_role(env: Env, producer_url: str) -> None:
    env.start_worker()
    with Client(amqp_url=env.amqp_url, database_url=producer_url, namespace=env.namespace) as c:
        out = c.publish("role-pub-1", "noop", {"batches": 2})
        assert out.status == "published"
        # enqueue in the producer's own transaction: it exists once that commits ...
        with psycopg.connect(producer_url) as conn:
            with conn.transaction():
                conn.execute("SELECT 1")
                assert c.enqueue(conn, "role-enq-1", "noop")
            # ... and not at all when it rolls back.
            with pytest.raises(RuntimeError), conn.transaction():
                assert enqueue(conn, "role-enq-rolled-back", "noop")
                raise RuntimeError("the caller's transaction fails")
        done = c.wait(["role-pub-1", "role-enq-1"], timeout=60)
        assert [j.state for j in done] == ["succeeded", "succeeded"]
        assert c.job("role-enq-rolled-back") is None

    # A job another role submitted is invisible to the producer.
    with psycopg.connect(env.database_url, autocommit=True) as admin:
        admin.execute("SELECT drover.enqueue('role-admin-1', 'noop')")
    with psycopg.connect(producer_url, autocommit=True) as conn:
        rows = conn.execute("SELECT idempotency_key FROM drover.jobs ORDER BY 1").fetchall()
        assert [r[0] for r in rows] == ["role-enq-1", "role-pub-1"]
        for statement in (
            "SELECT count(*) FROM drover.attempts",
            "SELECT count(*) FROM drover.checkpoints",
            "SELECT count(*) FROM drover.actions",
            "UPDATE drover.jobs SET state = 'cancelled' WHERE idempotency_key = 'role-pub-1'",
            "DELETE FROM drover.jobs",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    with psycopg.connect(env.database_url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT state, submitted_by FROM drover.jobs WHERE idempotency_key = 'role-pub-1'"
        ).fetchone()
    assert row is not None
    assert row[0] == "succeeded"
    assert str(row[1]).startswith("py_") and str(row[1]).endswith("_login")
