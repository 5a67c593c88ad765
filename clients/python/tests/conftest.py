"""Fixtures: a private ledger database (created with ``drover migrate``) and broker namespace
per test, and a real ``drover worker`` subprocess, all removed afterwards."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pika
import psycopg
import pytest

AMQP_URL = os.environ.get("DROVER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
ADMIN_DB_URL = os.environ.get(
    "DROVER_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"
)


def drover_bin() -> str:
    """The binary cargo built: $DROVER_BIN, else $CARGO_TARGET_DIR/debug/drover."""
    explicit = os.environ.get("DROVER_BIN")
    if explicit:
        return explicit
    target = os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache/drover-target"))
    path = Path(target) / "debug" / "drover"
    if not path.exists():
        pytest.fail(f"{path} does not exist: build it with `cargo build -p drover`")
    return str(path)


@dataclass
class Worker:
    """A running ``drover worker`` and its log lines."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def wait_log(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"worker log has no {needle!r} within {timeout}s:\n"
                        + "".join(self.lines[-40:])
                    )
                self.cond.wait(left)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class Env:
    """One test's database, namespace and workers."""

    name: str
    database_url: str
    namespace: str
    amqp_url: str = AMQP_URL
    workers: list[Worker] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e.update(
            DATABASE_URL=self.database_url,
            DROVER_AMQP_URL=self.amqp_url,
            DROVER_NAMESPACE=self.namespace,
            DROVER_LOG_FORMAT="json",
            DROVER_METRICS_ADDR="127.0.0.1:0",
        )
        for k in ("DROVER_CONFIG", "TRACEPARENT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            e.pop(k, None)
        return e

    def drover(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [drover_bin(), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start_worker(self) -> Worker:
        proc = subprocess.Popen(
            [drover_bin(), "worker"],
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        w = Worker(proc)

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                with w.cond:
                    w.lines.append(line)
                    w.cond.notify_all()
            with w.cond:
                w.cond.notify_all()

        threading.Thread(target=pump, daemon=True).start()
        self.workers.append(w)
        w.wait_log('"consuming"', 60)
        return w

    def connect(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.database_url)

    def queue_depth(self) -> int:
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            ch = conn.channel()
            q = ch.queue_declare(f"{self.namespace}.jobs", passive=True)
            return int(q.method.message_count)
        finally:
            conn.close()


@pytest.fixture
def env() -> Iterator[Env]:
    suffix = uuid.uuid4().hex[:12]
    name = f"drover_py_{suffix}"
    base = ADMIN_DB_URL.rsplit("/", 1)[0]
    e = Env(name=name, database_url=f"{base}/{name}", namespace=f"py-{suffix}")
    out = e.drover("migrate")
    assert out.returncode == 0, out.stderr
    try:
        yield e
    finally:
        for w in e.workers:
            w.stop()
        with psycopg.connect(ADMIN_DB_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            ch = conn.channel()
            for q in (f"{e.namespace}.jobs", f"{e.namespace}.dead", f"{e.namespace}.poison"):
                ch.queue_delete(q)
            for x in (e.namespace, f"{e.namespace}.dlx"):
                ch.exchange_delete(x)
        finally:
            conn.close()
