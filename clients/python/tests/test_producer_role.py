"""The client under the least-privilege producer role (docs/security.md): a login in the
role ``drover migrate --roles`` creates publishes with :meth:`Client.publish` and enqueues in
its own psycopg transaction, reads only the jobs it submitted and nothing else of the
ledger, and cannot change a job's state; and it publishes over AMQPS, trusting a private CA
(``cacertfile=``), as the producer's RabbitMQ user of a TLS-only node."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions
import psycopg
import pytest
from conftest import Env, drover_bin
from psycopg import sql

from drover import Client, DroverError, enqueue
from drover._amqp import url_parameters


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


REPO = Path(__file__).resolve().parents[3]
TLS_PORT = 5762


def _openssl(*args: str) -> None:
    out = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.fixture
def tls_broker() -> Iterator[tuple[str, str]]:
    """A private TLS-only RabbitMQ node (scripts/rabbitmq-node.sh: no plain listener, AMQPS
    on 127.0.0.1:5762, the users and permissions of deploy/secrets/rabbitmq-definitions.json
    with a password of the test's); yields its password and the CA file. Stopped and deleted
    afterwards."""
    d = Path(tempfile.mkdtemp(prefix="drover-py-tls-"))
    password = f"PyMq-{uuid.uuid4().hex[:10]}"
    name = "py-tls"
    try:
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=drover python test CA", "-keyout", str(d / "ca.key"),
            "-out", str(d / "ca.pem"), "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        (d / "server.ext").write_text(
            "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "extendedKeyUsage=serverAuth\n"
        )
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=drover-server",
            "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
            "-extfile", str(d / "server.ext"), "-out", str(d / "server.pem"),
        )  # fmt: skip
        defs = json.loads((REPO / "deploy/secrets/rabbitmq-definitions.json").read_text())
        for user in defs["users"]:
            user["password"] = password
        (d / "definitions.json").write_text(json.dumps(defs))
        (d / "tls.conf").write_text(
            "listeners.tcp = none\n"
            f"listeners.ssl.default = 127.0.0.1:{TLS_PORT}\n"
            f"ssl_options.cacertfile = {d / 'ca.pem'}\n"
            f"ssl_options.certfile = {d / 'server.pem'}\n"
            f"ssl_options.keyfile = {d / 'server.key'}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
            f"load_definitions = {d / 'definitions.json'}\n"
        )
        for p in [d, *d.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        out = subprocess.run(
            [
                str(REPO / "scripts/rabbitmq-node.sh"),
                "start",
                name,
                str(TLS_PORT),
                str(d / "tls.conf"),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stderr
        yield password, str(d / "ca.pem")
    finally:
        subprocess.run(
            [str(REPO / "scripts/rabbitmq-node.sh"), "stop", name],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(d, ignore_errors=True)


def test_publish_over_amqps_as_the_producer_user(
    env: Env, producer_url: str, tls_broker: tuple[str, str]
) -> None:
    password, ca = tls_broker

    def url(user: str, scheme: str = "amqps") -> str:
        return f"{scheme}://{user}:{password}@127.0.0.1:{TLS_PORT}/drover?cacertfile={ca}"

    # The administrator declares the topology (the producer may not).
    out = subprocess.run(
        [drover_bin(), "migrate", "--broker"],
        env={**env.env(), "DROVER_AMQP_URL": url("drover-admin"), "DROVER_NAMESPACE": "drover"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr

    with Client(
        amqp_url=url("drover-producer"), database_url=producer_url, namespace="drover"
    ) as c:
        assert c.publish("role-tls-1", "noop").status == "published"

    conn = pika.BlockingConnection(url_parameters(url("drover-admin")))
    try:
        q = conn.channel().queue_declare("drover.jobs", passive=True)
        assert q.method.message_count == 1
    finally:
        conn.close()
    # The producer's user publishes but cannot consume.
    conn = pika.BlockingConnection(url_parameters(url("drover-producer")))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            conn.channel().basic_consume("drover.jobs", lambda *_: None)
        assert refused.value.reply_code == 403
    finally:
        if conn.is_open:
            conn.close()

    # No plain AMQP on the TLS port; TLS parameters on an amqp:// URL and a missing CA file are
    # refused, naming the parameter, not the password.
    for bad, needle in (
        (f"amqp://drover-producer:{password}@127.0.0.1:{TLS_PORT}/drover", "cannot connect"),
        (url("drover-producer", "amqp"), "need an amqps:// URL"),
        (url("drover-producer").replace(ca, "/nonexistent/ca.pem"), "cacertfile"),
    ):
        with (
            Client(amqp_url=bad, database_url=producer_url, namespace="drover") as c,
            pytest.raises(DroverError) as e,
        ):
            c.publish(f"role-tls-bad-{uuid.uuid4().hex[:6]}", "noop")
        assert needle in str(e.value)
        assert password not in str(e.value)
