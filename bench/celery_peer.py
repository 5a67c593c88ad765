#!/usr/bin/env python3
"""Celery 5 peer for bench/run.sh: the same no-op job as drover's `noop`, with a ledger row.

Each task inserts one row (its key) into a table of the benchmark's Postgres database, in its
own transaction (autocommit, synchronous_commit as the server has it), and is acked after the
insert (`task_acks_late`): like drover, a job's row is durable before its message is gone, and
a worker killed with -9 loses nothing. Same RabbitMQ, same Postgres, same machine as drover's
noop rows of `make bench`.

What it does, in order: creates the table; starts `celery worker` (prefork pool, --concurrency
processes, default nproc; no gossip, mingle, heartbeat, events or remote control) as a child
and waits for its `worker_ready` signal; publishes --jobs tasks from this process (persistent
messages, one kombu producer) while the worker consumes ("live", as drover's live rows); waits
until every row is in the table; stops the worker (SIGTERM, warm shutdown); deletes its queue
and table. The end time is the last row's `done_at` (`clock_timestamp()` in Postgres, the
clock drover's `finished_at` comes from). Prints one JSON object: jobs, seconds, jobs_per_s,
publish_s, worker_cpu_s (user+system of the worker and its pool processes), settings.

Queue: a durable classic queue (Celery's default kind), not the quorum queue drover uses:
classic queues cost the broker less, so the comparison favours the peer.

usage: celery_peer.py --dsn postgres://... [--amqp URL] [--jobs 5000] [--concurrency N]
       [--prefetch-multiplier 16] [--queue NAME] [--timeout 300]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from celery import Celery
from celery.signals import worker_process_init, worker_ready
from kombu import Queue

AMQP = os.environ.get("CELERY_PEER_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2f")
DSN = os.environ.get("CELERY_PEER_DSN", "")
QUEUE = os.environ.get("CELERY_PEER_QUEUE", "celery-peer")
TABLE = os.environ.get("CELERY_PEER_TABLE", "celery_peer_ledger")
READY_FILE = os.environ.get("CELERY_PEER_READY", "")
PREFETCH_MULTIPLIER = int(os.environ.get("CELERY_PEER_PREFETCH_MULTIPLIER", "16"))

app = Celery("celery_peer", broker=AMQP)
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    task_default_queue=QUEUE,
    task_queues=[Queue(QUEUE, durable=True)],
    task_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=PREFETCH_MULTIPLIER,
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

_conn: psycopg.Connection[Any] | None = None


@worker_process_init.connect
def _connect(**_: object) -> None:
    # One connection per pool process, opened after the fork.
    global _conn
    _conn = psycopg.connect(DSN, autocommit=True)


@worker_ready.connect
def _ready(**_: object) -> None:
    if READY_FILE:
        Path(READY_FILE).write_text("ready")


@app.task(name="noop_ledger")
def noop_ledger(key: str) -> None:
    """The no-op job: its ledger row, committed before the ack."""
    global _conn
    if _conn is None or _conn.closed:
        _conn = psycopg.connect(DSN, autocommit=True)
    _conn.execute(f"INSERT INTO {TABLE} (key) VALUES (%s)", (key,))


def cpu_seconds(root: int) -> float:
    """User+system seconds of `root` and its children (the prefork pool), from /proc."""
    hz = os.sysconf("SC_CLK_TCK")
    pids = [root]
    try:
        children = Path(f"/proc/{root}/task/{root}/children").read_text().split()
        pids += [int(p) for p in children]
    except OSError:
        pass
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / hz


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--amqp", default=AMQP, help="RabbitMQ URL (default %(default)s)")
    ap.add_argument(
        "--dsn", required=True, help="Postgres URL of the database for the table"
    )
    ap.add_argument(
        "--jobs", type=int, default=5000, help="tasks to run (default %(default)s)"
    )
    ap.add_argument(
        "--concurrency",
        type=int,
        default=os.cpu_count() or 1,
        help="prefork pool processes (default: nproc, %(default)s)",
    )
    ap.add_argument(
        "--prefetch-multiplier",
        type=int,
        default=PREFETCH_MULTIPLIER,
        help="worker_prefetch_multiplier (default %(default)s)",
    )
    ap.add_argument(
        "--queue",
        default=f"celery-peer-{os.getpid()}",
        help="queue name (deleted at the end; default %(default)s)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for all rows (default %(default)s)",
    )
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error(f"--jobs: must be at least 1, got {args.jobs}")
    if args.concurrency < 1:
        ap.error(f"--concurrency: must be at least 1, got {args.concurrency}")

    table = f"celery_peer_{os.getpid()}"
    with psycopg.connect(args.dsn, autocommit=True) as db:
        db.execute(f"DROP TABLE IF EXISTS {table}")
        db.execute(
            f"CREATE TABLE {table} (key text PRIMARY KEY, "
            "done_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
    ready = Path(tempfile.mkdtemp(prefix="celery-peer-")) / "ready"
    env = dict(
        os.environ,
        CELERY_PEER_AMQP=args.amqp,
        CELERY_PEER_DSN=args.dsn,
        CELERY_PEER_QUEUE=args.queue,
        CELERY_PEER_TABLE=table,
        CELERY_PEER_READY=str(ready),
        CELERY_PEER_PREFETCH_MULTIPLIER=str(args.prefetch_multiplier),
    )
    log = ready.parent / "worker.log"
    here = Path(__file__).resolve().parent
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_peer",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(args.concurrency),
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-Q",
            args.queue,
        ],
        cwd=here,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    result: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if worker.poll() is not None:
                raise SystemExit(
                    f"celery worker exited at start:\n{log.read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"celery worker not ready within 60 s:\n{log.read_text()[-2000:]}"
                )
            time.sleep(0.05)
        # The producer: this process, with the worker's settings for queue and broker.
        app.conf.broker_url = args.amqp
        app.conf.task_default_queue = args.queue
        app.conf.task_queues = [Queue(args.queue, durable=True)]
        cpu0 = cpu_seconds(worker.pid)
        with psycopg.connect(args.dsn, autocommit=True) as db:
            t0 = db.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
            assert t0 is not None
            start = float(t0[0])
            with app.producer_or_acquire() as producer:
                for i in range(args.jobs):
                    noop_ledger.apply_async((f"celery-{i}",), producer=producer)
            t_pub = db.execute(
                "SELECT extract(epoch FROM clock_timestamp())"
            ).fetchone()
            assert t_pub is not None
            deadline = time.monotonic() + args.timeout
            done = 0
            while True:
                row = db.execute(f"SELECT count(*) FROM {table}").fetchone()
                done = int(row[0]) if row else 0
                if done >= args.jobs or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            cpu1 = cpu_seconds(worker.pid)
            end_row = db.execute(
                f"SELECT extract(epoch FROM max(done_at)) FROM {table}"
            ).fetchone()
            end = float(end_row[0]) if end_row and end_row[0] is not None else start
            secs = end - start
            result = {
                "jobs": args.jobs,
                "done": done,
                "seconds": round(secs, 3),
                "jobs_per_s": round(done / secs, 1) if secs > 0 else 0.0,
                "publish_s": round(float(t_pub[0]) - start, 3),
                "worker_cpu_s": round(cpu1 - cpu0, 2),
                "concurrency": args.concurrency,
                "prefetch_multiplier": args.prefetch_multiplier,
                "celery": __import__("celery").__version__,
            }
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        try:
            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(args.queue)
                conn.default_channel.exchange_delete(args.queue)
        except Exception as e:  # noqa: BLE001 - cleanup: report and go on
            print(
                f"celery_peer: could not delete queue/exchange {args.queue}: {e}",
                file=sys.stderr,
            )
        with psycopg.connect(args.dsn, autocommit=True) as db:
            db.execute(f"DROP TABLE IF EXISTS {table}")
        log.unlink(missing_ok=True)
        ready.unlink(missing_ok=True)
        ready.parent.rmdir()
    if result.get("done") != args.jobs:
        print(
            f"celery_peer: only {result.get('done')} of {args.jobs} rows",
            file=sys.stderr,
        )
        print(json.dumps(result))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
