"""The examples run as documented."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
from conftest import Env

import drover
import drover.exec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_order_handler_commit_enqueues_rollback_leaves_no_job(env: Env) -> None:
    env.start_worker()
    handler = load("order_handler")
    with psycopg.connect(env.database_url) as conn:
        conn.execute(handler.SCHEMA)
        conn.commit()
        out = handler.handle_order(conn, {"id": 1, "customer": "acme", "cents": 4999})
        assert out == {"order": 1, "invoice_job": "invoice:1", "new": True}
        # The client retries the same request: still one order, one job.
        again = handler.handle_order(conn, {"id": 1, "customer": "acme", "cents": 4999})
        assert again["new"] is False
        # A bad order (the CHECK fails) rolls the whole transaction back: no invoice job.
        with pytest.raises(psycopg.errors.CheckViolation):
            handler.handle_order(conn, {"id": 2, "customer": "acme", "cents": -1})
        orders = conn.execute("SELECT count(*) FROM orders").fetchone()
        assert orders == (1,)
    with drover.Client(
        amqp_url=env.amqp_url, database_url=env.database_url, namespace=env.namespace
    ) as c:
        [job] = c.wait(["invoice:1"], timeout=30)
        assert job.succeeded and job.max_attempts == 3
        assert c.job("invoice:2") is None


def test_order_handler_as_a_script(env: Env) -> None:
    env.start_worker()
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "order_handler.py"), "7", "acme", "100"],
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "invoice:7 succeeded" in done.stdout


def test_pandas_exec_over_a_million_rows(env: Env, tmp_path: Path) -> None:
    """The pandas example as an ``exec`` pipeline over 1,000,000 rows, in batches: its
    parts add up to the same function applied to the whole input at once."""
    import pandas as pd

    data = tmp_path / "payroll.parquet"
    out = env.drover(
        "demo",
        "generate",
        "--rows",
        "1000000",
        "--client",
        "acme",
        "--period",
        "2026-11",
        "--out",
        str(data),
    )
    assert out.returncode == 0, out.stderr
    command = f'command=["{sys.executable}", "{EXAMPLES / "pandas_exec.py"}"]'
    out = env.drover(
        "run",
        "exec",
        "--param",
        command,
        "--param",
        f"input={data}",
        "--batch-size",
        "100000",
        "--key",
        "gross",
        "--output",
        str(tmp_path / "out"),
        "--json",
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    parts = sorted((tmp_path / "out").rglob("part-*.parquet"))
    assert len(parts) == 10
    got = pd.concat([pd.read_parquet(p) for p in parts])
    assert len(got) == 1_000_000
    handler = load("pandas_exec")
    whole = handler.monthly_gross(pd.read_parquet(data), drover.exec.Context("all", 1, {}))
    assert int(got["gross_cents"].sum()) == int(whole["gross_cents"].sum())
    assert any((tmp_path / "out").rglob("_manifest.json")), "the output is complete"
